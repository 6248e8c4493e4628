package thinpool

import (
	"fmt"
	"testing"

	"github.com/csi-dmthin/csi-dmthin/pkg/devmapper"
)

// TestAllocFrom: the next free thin id from a start, skipping the ids the
// records own, the suspects and the excluded ones, wrapping past the
// largest id to 1 (0 is never handed out), and the same answer past
// allocProbe taken candidates, where the set of ids in use is built.
func TestAllocFrom(t *testing.T) {
	p := &Pool{vols: map[string]*Volume{}}
	own := func(ids ...uint32) {
		for _, id := range ids {
			p.vols[fmt.Sprint("v", id)] = &Volume{Name: fmt.Sprint("v", id), DeviceID: id}
		}
	}
	own(5, 6, 7, devmapper.MaxDeviceID, 1)
	p.suspects = []uint32{8}
	for _, tc := range []struct {
		name    string
		start   uint32
		exclude []uint32
		want    uint32
	}{
		{"free at once", 3, nil, 3},
		{"owned, then a suspect, then free", 5, nil, 9},
		{"excluded too", 5, []uint32{9, 10}, 11},
		{"0 means 1, which is owned", 0, nil, 2},
		{"wraps past the largest id", devmapper.MaxDeviceID, nil, 2},
		{"past the start of the range", devmapper.MaxDeviceID + 1, nil, 2},
	} {
		t.Run(tc.name, func(t *testing.T) {
			id, next, err := p.allocFrom(tc.start, tc.exclude...)
			if err != nil || id != tc.want || next != tc.want+1 {
				t.Errorf("allocFrom(%d, %v) = %d, %d, %v; want %d, %d", tc.start, tc.exclude, id, next, err, tc.want, tc.want+1)
			}
		})
	}

	// A dense range: more taken candidates than allocProbe.
	for id := uint32(100); id < 100+3*allocProbe; id++ {
		own(id)
	}
	if id, _, err := p.allocFrom(100, 100+3*allocProbe); err != nil || id != 100+3*allocProbe+1 {
		t.Errorf("dense range: allocFrom = %d, %v; want %d", id, err, 100+3*allocProbe+1)
	}
}
