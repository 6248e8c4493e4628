package thinpool

import (
	"testing"
	"time"

	"github.com/csi-dmthin/csi-dmthin/pkg/devmapper"
)

// suspendGate is a kernel whose Suspend waits until the test lets it go,
// like an origin whose flush takes long.
type suspendGate struct {
	Kernel
	entered chan struct{}
	release chan struct{}
}

func (g *suspendGate) Suspend(dev devmapper.Dev, flags devmapper.SuspendFlags) error {
	g.entered <- struct{}{}
	<-g.release
	return g.Kernel.Suspend(dev, flags)
}

// While a snapshot's origin is being suspended (flushing), the pool's
// usage can be read and another volume can be made: the suspend holds the
// volumes' locks, not the pool's.
func TestSuspendOutsidePoolLock(t *testing.T) {
	e := newFakeEnv(t)
	gate := &suspendGate{Kernel: e.kernel(), entered: make(chan struct{}), release: make(chan struct{})}
	p, err := Open(ctx, testConfig(t, "gate", 64<<20), gate)
	if err != nil {
		t.Fatal(err)
	}
	defer teardown(t, e, p)
	if _, err := p.CreateVolume(ctx, "origin", 8<<20); err != nil {
		t.Fatal(err)
	}
	if _, err := p.Activate(ctx, "origin"); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { _, err := p.Snapshot(ctx, "snap", "origin"); done <- err }()
	<-gate.entered // the origin is being suspended

	during := make(chan error, 1)
	go func() {
		if _, err := p.Usage(); err != nil {
			during <- err
			return
		}
		_, err := p.CreateVolume(ctx, "other", 4<<20)
		during <- err
	}()
	select {
	case err := <-during:
		if err != nil {
			t.Fatalf("during the suspend: %v", err)
		}
	case <-time.After(time.Minute):
		close(gate.release)
		t.Fatal("reading the usage and making another volume waited for the origin's suspend")
	}
	close(gate.release)
	if err := <-done; err != nil {
		t.Fatalf("snapshot: %v", err)
	}
	if info, err := e.kernel().InfoByName(p.volDMName("origin")); err != nil || info.Suspended {
		t.Fatalf("origin after the snapshot: %+v, %v", info, err)
	}
	checkInvariants(t, e, p)
}
