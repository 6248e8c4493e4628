package csi

import (
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strconv"
	"testing"

	csipb "github.com/container-storage-interface/spec/lib/go/csi"
	"k8s.io/klog/v2"

	"github.com/csi-dmthin/csi-dmthin/pkg/thinpool"
	"github.com/csi-dmthin/csi-dmthin/pkg/thinpool/thinpooltest"
)

// scaleVolumes is how many volumes BenchmarkScale10000's pool holds.
const scaleVolumes = 10000

// BenchmarkScale10000 measures the driver's own cost of its controller
// calls with 10,000 volumes in the pool: the pool on thinpooltest's fake
// kernel (no kernel time; the records are real), the calls in-process. The kernel's side at scale is measured by
// dmthin-bench's streams part in the VM. The records are on /dev/shm when
// there is one, so the 10,000 creates of the set-up take seconds, not
// minutes of fsyncs; CreateVolume's figure is then the driver's and the
// records' CPU, without the disk.
func BenchmarkScale10000(b *testing.B) {
	// The driver's log lines would bury the results.
	klog.SetOutput(io.Discard)
	klog.LogToStderr(false)
	defer klog.LogToStderr(true)
	k := thinpooltest.NewFakeKernel()
	dir, err := os.MkdirTemp("/dev/shm", "csi-scale-bench-")
	if err != nil {
		dir = b.TempDir()
	} else {
		defer os.RemoveAll(dir)
	}
	p, err := thinpool.Open(b.Context(), thinpool.Config{
		Name: testPool, StateDir: filepath.Join(dir, "state"),
		DataFile: filepath.Join(dir, "data"), MetadataFile: filepath.Join(dir, "meta"),
		DataFileBytes: 1 << 40, OverprovisionRatio: -1,
	}, k)
	if err != nil {
		b.Fatal(err)
	}
	defer p.Close()
	for i := range scaleVolumes {
		if _, err := p.CreateVolume(b.Context(), fmt.Sprintf("pvc-%05d", i), testVolBytes); err != nil {
			b.Fatal(err)
		}
	}
	d, err := New(Options{NodeID: testNode, Version: "bench", Pools: map[string]Pool{testPool: p}, DefaultPool: testPool, KubeletDir: b.TempDir(), FS: newFakeFS(k), Templates: -1})
	if err != nil {
		b.Fatal(err)
	}
	defer d.templates.stop()
	caps := []*csipb.VolumeCapability{blockCap(rwo)}

	b.Run("ListVolumesPage500", func(b *testing.B) {
		for b.Loop() {
			r, err := d.ListVolumes(b.Context(), &csipb.ListVolumesRequest{MaxEntries: 500, StartingToken: "5000"})
			if err != nil || len(r.GetEntries()) != 500 {
				b.Fatalf("%d entries, %v", len(r.GetEntries()), err)
			}
		}
	})
	b.Run("ListVolumesWalk500", func(b *testing.B) {
		for b.Loop() {
			n, token := 0, ""
			for {
				r, err := d.ListVolumes(b.Context(), &csipb.ListVolumesRequest{MaxEntries: 500, StartingToken: token})
				if err != nil {
					b.Fatal(err)
				}
				n += len(r.GetEntries())
				if token = r.GetNextToken(); token == "" {
					break
				}
			}
			if n != scaleVolumes {
				b.Fatalf("the walk saw %d volumes, want %d", n, scaleVolumes)
			}
		}
	})
	b.Run("GetCapacity", func(b *testing.B) {
		for b.Loop() {
			if _, err := d.GetCapacity(b.Context(), &csipb.GetCapacityRequest{}); err != nil {
				b.Fatal(err)
			}
		}
	})
	// Last: it adds volumes to the pool the others measure.
	// The framework calls it again with a larger b.N: the names go on
	// from the last call's, so that each call makes new volumes instead of
	// finding the last call's (an idempotent repeat).
	created := 0
	b.Run("CreateVolume", func(b *testing.B) {
		for b.Loop() {
			created++
			if _, err := d.CreateVolume(b.Context(), &csipb.CreateVolumeRequest{
				Name: "new-" + strconv.Itoa(created), CapacityRange: &csipb.CapacityRange{RequiredBytes: testVolBytes}, VolumeCapabilities: caps,
			}); err != nil {
				b.Fatal(err)
			}
		}
	})
}
