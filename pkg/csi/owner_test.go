package csi

import (
	"errors"
	"strings"
	"sync"
	"testing"

	csipb "github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc/codes"

	"github.com/csi-dmthin/csi-dmthin/pkg/thinpool"
)

func TestOwnerQuestions(t *testing.T) {
	e := newDriverEnv(t)
	vol := e.createVolume("pvc-1").GetVolumeId()
	snap := e.createSnapshot("snapshot-1", vol).GetSnapshotId()
	for _, c := range []struct {
		id             string
		volume, snapsh bool
	}{
		{vol, true, false},
		{snap, false, true},
		{testPool + "/pvc-gone", false, false},
		{"gamma/pvc-1", false, false}, // a pool this node does not have
		{"not an id", false, false},
		{"", false, false},
	} {
		if got := e.d.HasVolume(c.id); got != c.volume {
			t.Errorf("HasVolume(%q) = %v, want %v", c.id, got, c.volume)
		}
		if got := e.d.HasSnapshot(c.id); got != c.snapsh {
			t.Errorf("HasSnapshot(%q) = %v, want %v", c.id, got, c.snapsh)
		}
	}
}

func TestRoomFor(t *testing.T) {
	// 64 MiB of data, at most 1x provisioned: after a 16 MiB volume and its
	// 16 MiB snapshot, 32 MiB more fits and 33 MiB does not.
	e := newDriverEnv(t, func(c *thinpool.Config) { c.DataFileBytes = 64 << 20; c.OverprovisionRatio = 1 })
	vol := e.createVolume("pvc-1").GetVolumeId()
	snap := e.createSnapshot("snapshot-1", vol).GetSnapshotId()
	for _, c := range []struct {
		name    string
		id      string
		size    int64
		wantErr error
	}{
		{"fits", snap, 32 << 20, nil},
		{"size 0 takes the source's", snap, 0, nil},
		{"over the ratio", snap, 33 << 20, thinpool.ErrNoSpace},
		{"clone of a volume", vol, 16 << 20, nil},
		{"missing source", testPool + "/gone", 1 << 20, thinpool.ErrNotFound},
		{"unknown pool", "gamma/x", 1 << 20, thinpool.ErrNotFound},
		{"not an id", "x", 1 << 20, thinpool.ErrNotFound},
	} {
		err := e.d.RoomFor(c.id, c.size)
		if c.wantErr == nil && err != nil || c.wantErr != nil && !errors.Is(err, c.wantErr) {
			t.Errorf("%s: RoomFor(%q, %d) = %v, want %v", c.name, c.id, c.size, err, c.wantErr)
		}
	}
	// A refusal is the pool's own: it names the pool and the reason.
	if err := e.d.RoomFor(snap, 33<<20); err == nil || !strings.Contains(err.Error(), "pool "+testPool+": ") || !strings.Contains(err.Error(), "would pass 1 times") {
		t.Errorf("RoomFor over the ratio: %v, want the pool and the reason", err)
	}
	// A closed pool (the driver stopping) takes nothing.
	other := e.createVolumeIn(otherPool, "pvc-2")
	if err := e.pools[otherPool].Close(); err != nil {
		t.Fatal(err)
	}
	if err := e.d.RoomFor(other, 1<<20); !errors.Is(err, thinpool.ErrPoolUnhealthy) || !strings.Contains(err.Error(), "pool "+otherPool) {
		t.Errorf("RoomFor in a closed pool: %v, want ErrPoolUnhealthy naming %s", err, otherPool)
	}
}

// RoomFor and the pool's admission agree at the boundary, templates
// counted: what RoomFor says fits is admitted, one byte more is refused by
// both.
func TestRoomForAgreesWithAdmission(t *testing.T) {
	e := newDriverEnv(t, func(c *thinpool.Config) { c.DataFileBytes = 64 << 20; c.OverprovisionRatio = 1 })
	vol := e.createVolume("pvc-1").GetVolumeId()
	p := e.pools[testPool]
	if _, err := p.CreateTemplate(t.Context(), "t1", 8<<20); err != nil {
		t.Fatal(err)
	}
	u, err := p.Usage()
	if err != nil {
		t.Fatal(err)
	}
	limit := u.AvailableBytes
	if limit <= 0 || limit != int64(float64(u.DataBytes)*u.OverprovisionRatio)-u.ProvisionedBytes-u.TemplateBytes {
		t.Fatalf("usage %+v", u)
	}
	if err := e.d.RoomFor(vol, limit+1); !errors.Is(err, thinpool.ErrNoSpace) {
		t.Errorf("RoomFor one byte past the limit: %v", err)
	}
	if _, err := p.CreateVolume(t.Context(), "past", limit+1); !errors.Is(err, thinpool.ErrNoSpace) {
		t.Errorf("admission one byte past the limit: %v", err)
	}
	if err := e.d.RoomFor(vol, limit); err != nil {
		t.Errorf("RoomFor at the limit: %v", err)
	}
	if _, err := p.Clone(t.Context(), "at", "pvc-1", limit); err != nil {
		t.Errorf("admission at the limit: %v", err)
	}
}

// recordingSink is an EventSink that keeps what it was told.
type recordingSink struct {
	mu  sync.Mutex
	got []string // namespace/name: message
}

func (s *recordingSink) ProvisioningNoSpace(ns, name, msg string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.got = append(s.got, ns+"/"+name+": "+msg)
}

func TestNoSpaceReachesEventSink(t *testing.T) {
	e := newDriverEnv(t, func(c *thinpool.Config) { c.DataFileBytes = 64 << 20; c.OverprovisionRatio = 1 })
	sink := &recordingSink{}
	e.d.events = sink
	mk := func(name string, size int64, params map[string]string) error {
		_, err := e.d.CreateVolume(t.Context(), &csipb.CreateVolumeRequest{Name: name, Parameters: params,
			VolumeCapabilities: []*csipb.VolumeCapability{fsCap}, CapacityRange: &csipb.CapacityRange{RequiredBytes: size}})
		return err
	}
	pvc := map[string]string{ParamPVCName: "data", ParamPVCNamespace: "db"}
	if err := mk("fits", 48<<20, pvc); err != nil {
		t.Fatal(err)
	}
	wantCode(t, mk("too-much", 32<<20, pvc), codes.ResourceExhausted)
	// Without the provisioner's metadata there is no PVC to tell.
	wantCode(t, mk("too-much-2", 32<<20, nil), codes.ResourceExhausted)
	// ResourceExhausted for the wrong node is not a lack of space.
	_, err := e.d.CreateVolume(t.Context(), &csipb.CreateVolumeRequest{Name: "elsewhere", Parameters: pvc, VolumeCapabilities: []*csipb.VolumeCapability{fsCap},
		AccessibilityRequirements: &csipb.TopologyRequirement{Requisite: []*csipb.Topology{{Segments: map[string]string{TopologyKey: "node-b"}}}}})
	wantCode(t, err, codes.ResourceExhausted)

	sink.mu.Lock()
	defer sink.mu.Unlock()
	if len(sink.got) != 1 {
		t.Fatalf("sink got %q, want one report", sink.got)
	}
	// The node once, the pool once: admission's message names the pool.
	if g := sink.got[0]; !strings.HasPrefix(g, "db/data: node "+testNode+": ") || strings.Count(g, "pool "+testPool+": ") != 1 || !strings.Contains(g, "no space") {
		t.Errorf("report = %q", g)
	}
}
