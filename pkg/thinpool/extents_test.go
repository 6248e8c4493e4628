package thinpool

import (
	"context"
	"errors"
	"fmt"
	"reflect"
	"sync"
	"sync/atomic"
	"testing"

	"github.com/csi-dmthin/csi-dmthin/pkg/devmapper"
)

// MappedExtents' pool-level behaviour, on both kernels (TestExtentsFake
// here, TestExtentsKernel in the VM); what it maps is the kernel
// contract's (kcMappedExtents).

func TestExtentsFake(t *testing.T) { runExtentScenarios(t, newFakeEnv) }

func runExtentScenarios(t *testing.T, newEnv func(t *testing.T) env) {
	held := func(t *testing.T, p *Pool) uint64 {
		t.Helper()
		st, err := p.poolStatus()
		if err != nil {
			t.Fatal(err)
		}
		return st.HeldMetadataRoot
	}
	oneBlock := func(t *testing.T, e env, p *Pool, name string) []Extent {
		t.Helper()
		if _, err := p.CreateVolume(ctx, name, 1<<20); err != nil {
			t.Fatal(err)
		}
		if err := e.write(t, p, name, 0, pattern(1, 4096)); err != nil {
			t.Fatal(err)
		}
		return []Extent{{0, int64(p.rec.BlockSectors) * devmapper.SectorSize}}
	}

	t.Run("Errors", func(t *testing.T) {
		e := newEnv(t)
		p := openPool(t, e, testConfig(t, "extents-errors", 64<<20))
		defer teardown(t, e, p)
		if _, err := p.MappedExtents(ctx, "no/such"); !errors.Is(err, ErrInvalid) {
			t.Errorf("an invalid name: %v", err)
		}
		if _, err := p.MappedExtents(ctx, "nothing"); !errors.Is(err, ErrNotFound) {
			t.Errorf("an unknown name: %v", err)
		}
		oneBlock(t, e, p, "gone")
		if err := p.Delete(ctx, "gone"); err != nil {
			t.Fatal(err)
		}
		if _, err := p.MappedExtents(ctx, "gone"); !errors.Is(err, ErrNotFound) {
			t.Errorf("a deleted volume: %v", err)
		}
		oneBlock(t, e, p, "vol")
		cancelled, cancel := context.WithCancel(ctx)
		cancel()
		if _, err := p.MappedExtents(cancelled, "vol"); !errors.Is(err, context.Canceled) {
			t.Errorf("a cancelled call: %v", err)
		}
		if r := held(t, p); r != 0 {
			t.Errorf("a metadata snapshot (root %d) is held after the calls", r)
		}
	})

	t.Run("HeldSnapshotLeftOver", func(t *testing.T) {
		e := newEnv(t)
		cfg := testConfig(t, "extents-held", 64<<20)
		p := openPool(t, e, cfg)
		want := oneBlock(t, e, p, "vol")
		// As a crash between reserve and release leaves it.
		if err := p.k.Message(p.dev, devmapper.ReserveMetadataSnap{}); err != nil {
			t.Fatal(err)
		}
		if got, err := p.MappedExtents(ctx, "vol"); err != nil || !reflect.DeepEqual(got, want) {
			t.Errorf("with a snapshot left held: %v, %v; want %v", got, err, want)
		}
		if r := held(t, p); r != 0 {
			t.Errorf("the snapshot left held is still held (root %d)", r)
		}
		// And across a reboot: the held root is in the metadata.
		if err := p.k.Message(p.dev, devmapper.ReserveMetadataSnap{}); err != nil {
			t.Fatal(err)
		}
		p.Close()
		e.reboot(t, p)
		p = openPool(t, e, cfg)
		defer teardown(t, e, p)
		if r := held(t, p); r == 0 {
			t.Error("the reboot lost the held snapshot; the test tests nothing")
		}
		if got, err := p.MappedExtents(ctx, "vol"); err != nil || !reflect.DeepEqual(got, want) {
			t.Errorf("after a reboot with a snapshot held: %v, %v; want %v", got, err, want)
		}
		if r := held(t, p); r != 0 {
			t.Errorf("still held after the reboot (root %d)", r)
		}
	})

	t.Run("Concurrent", func(t *testing.T) {
		// One snapshot at a time per pool: calls on several volumes, and
		// changes beside them, all succeed.
		e := newEnv(t)
		p := openPool(t, e, testConfig(t, "extents-conc", 64<<20))
		defer teardown(t, e, p)
		want := map[string][]Extent{}
		for i := range 3 {
			name := fmt.Sprint("vol", i)
			want[name] = oneBlock(t, e, p, name)
		}
		var wg sync.WaitGroup
		for name, w := range want {
			for range 3 {
				wg.Go(func() {
					if got, err := p.MappedExtents(ctx, name); err != nil || !reflect.DeepEqual(got, w) {
						t.Errorf("%s: %v, %v; want %v", name, got, err, w)
					}
				})
			}
		}
		wg.Go(func() {
			for i := range 3 {
				if _, err := p.CreateVolume(ctx, fmt.Sprint("new", i), 1<<20); err != nil {
					t.Error(err)
				}
			}
		})
		wg.Wait()
	})
}

// failingReads is a Kernel whose ReadBlock fails while fail is set.
type failingReads struct {
	Kernel
	fail atomic.Bool
}

var errRead = errors.New("injected read error")

func (k *failingReads) ReadBlock(dev devmapper.Dev, off int64, buf []byte) error {
	if k.fail.Load() {
		return errRead
	}
	return k.Kernel.ReadBlock(dev, off, buf)
}

// A failed read of the metadata releases the snapshot and leaves the pool
// unfenced: nothing was changed. On the fake only: the kernel's reads do
// not fail on demand.
func TestExtentsReadFailsFake(t *testing.T) {
	e := newFakeEnv(t)
	k := &failingReads{Kernel: e.kernel()}
	p, err := Open(ctx, testConfig(t, "extents-fail", 64<<20), k)
	if err != nil {
		t.Fatal(err)
	}
	defer teardown(t, e, p)
	if _, err := p.CreateVolume(ctx, "vol", 1<<20); err != nil {
		t.Fatal(err)
	}
	k.fail.Store(true)
	if _, err := p.MappedExtents(ctx, "vol"); !errors.Is(err, errRead) {
		t.Errorf("a failed read: %v", err)
	}
	k.fail.Store(false)
	if st, err := p.poolStatus(); err != nil || st.HeldMetadataRoot != 0 {
		t.Errorf("after a failed read: %+v, %v", st, err)
	}
	p.mu.Lock()
	fenced := p.fenced
	p.mu.Unlock()
	if fenced != nil {
		t.Errorf("a failed read fenced the pool: %v", fenced)
	}
	if got, err := p.MappedExtents(ctx, "vol"); err != nil || got != nil {
		t.Errorf("then: %v, %v", got, err)
	}
}

func TestClipRange(t *testing.T) {
	const bs = 65536
	for _, c := range []struct {
		r      devmapper.BlockRange
		size   int64
		off, n int64
		ok     bool
	}{
		{devmapper.BlockRange{Start: 0, Count: 2}, 10 * bs, 0, 2 * bs, true},
		{devmapper.BlockRange{Start: 9, Count: 1}, 9*bs + 4096, 9 * bs, 4096, true},
		{devmapper.BlockRange{Start: 8, Count: 5}, 9*bs + 4096, 8 * bs, bs + 4096, true},
		{devmapper.BlockRange{Start: 10, Count: 1}, 9*bs + 4096, 0, 0, false},
		{devmapper.BlockRange{Start: 1<<64 - 1, Count: 1}, 10 * bs, 0, 0, false},
		{devmapper.BlockRange{Start: 3, Count: 1<<64 - 3}, 10 * bs, 3 * bs, 7 * bs, true},
	} {
		off, n, ok := clipRange(c.r, bs, c.size)
		if off != c.off || n != c.n || ok != c.ok {
			t.Errorf("clipRange(%+v, size %d) = %d, %d, %v; want %d, %d, %v", c.r, c.size, off, n, ok, c.off, c.n, c.ok)
		}
	}
}

// A read-only pool refuses the snapshot's messages: ErrPoolUnhealthy. On
// the fake only: needs_check is set on demand.
func TestExtentsUnhealthyFake(t *testing.T) {
	e := newFakeEnv(t).(*fakeEnv)
	p := openPool(t, e, testConfig(t, "extents-sick", 64<<20))
	defer p.Close()
	if _, err := p.CreateVolume(ctx, "vol", 1<<20); err != nil {
		t.Fatal(err)
	}
	if err := e.k.SetNeedsCheck(p.dev); err != nil {
		t.Fatal(err)
	}
	if _, err := p.MappedExtents(ctx, "vol"); !errors.Is(err, ErrPoolUnhealthy) {
		t.Errorf("on a needs_check pool: %v", err)
	}
}
