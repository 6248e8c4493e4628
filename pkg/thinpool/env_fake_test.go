package thinpool

import (
	"errors"
	"fmt"
	"sync/atomic"
	"testing"
	"time"

	"github.com/csi-dmthin/csi-dmthin/internal/vmtest"
	"github.com/csi-dmthin/csi-dmthin/pkg/devmapper"
	"github.com/csi-dmthin/csi-dmthin/pkg/thinpool/thinpooltest"
)

// The scenarios on the fake kernel, on the host, under -race.

// The fake kernel lives in thinpooltest, which imports nothing of this
// package so that these tests can use it; here it is tied to the
// interfaces it implements.
var (
	_ Kernel      = (*thinpooltest.FakeKernel)(nil)
	_ EventWaiter = (*thinpooltest.FakeKernel)(nil)
)

type fakeEnv struct{ k *thinpooltest.FakeKernel }

// newFakeEnv gives each test its own fake kernel, as each VM test run has
// its own.
func newFakeEnv(t *testing.T) env { return &fakeEnv{k: thinpooltest.NewFakeKernel()} }

func (e *fakeEnv) kernel() Kernel { return e.k }

// activate activates vol and returns its dm device.
func (e *fakeEnv) activate(t *testing.T, p *Pool, vol string) Dev {
	t.Helper()
	if _, err := p.Activate(ctx, vol); err != nil {
		t.Fatal(err)
	}
	info, err := e.k.InfoByName(p.volDMName(vol))
	if err != nil {
		t.Fatal(err)
	}
	return info.Dev
}

func (e *fakeEnv) write(t *testing.T, p *Pool, vol string, off int64, b []byte) error {
	t.Helper()
	return e.writeDev(t, e.activate(t, p, vol), off, b)
}

func (e *fakeEnv) read(t *testing.T, p *Pool, vol string, off int64, n int) []byte {
	t.Helper()
	return e.readDev(t, e.activate(t, p, vol), off, n)
}

func (e *fakeEnv) hold(t *testing.T, p *Pool, vol string) func() {
	t.Helper()
	return e.holdDev(t, e.activate(t, p, vol))
}

var fakeDisks atomic.Int64

func (e *fakeEnv) disk(t *testing.T, sizeBytes int64) Dev {
	return e.k.AddBlockDevice(fmt.Sprintf("/dev/fake-disk-%d", fakeDisks.Add(1)), sizeBytes)
}

func (e *fakeEnv) writeDev(t *testing.T, dev Dev, off int64, b []byte) error {
	return e.k.WriteData(dev, off, b)
}

func (e *fakeEnv) readDev(t *testing.T, dev Dev, off int64, n int) []byte {
	t.Helper()
	out := make([]byte, n)
	if err := e.k.ReadData(dev, off, out); err != nil {
		t.Fatal(err)
	}
	return out
}

func (e *fakeEnv) holdDev(t *testing.T, dev Dev) func() {
	t.Helper()
	if err := e.k.SetOpen(dev, 1); err != nil {
		t.Fatal(err)
	}
	return func() { _ = e.k.SetOpen(dev, 0) }
}

func (e *fakeEnv) reboot(t *testing.T, p *Pool) { e.k.Reboot() }

func (e *fakeEnv) swapFiles(t *testing.T, a, b string) { e.k.SwapPaths(a, b) }

func (e *fakeEnv) writeFile(t *testing.T, path string, off int64, b []byte) {
	t.Helper()
	if err := e.k.WriteFile(path, off, b); err != nil {
		t.Fatal(err)
	}
}

func TestScenariosFake(t *testing.T) { runScenarios(t, newFakeEnv) }

func TestKernelContractFake(t *testing.T) { runKernelContract(t, newFakeEnv) }

// TestOutOfDataSpaceQueueFake is the contract's OutOfDataSpace on a
// queue_if_no_space pool, which the real kernel answers only after
// no_space_timeout (60 s) and the fake at once: see kcOutOfDataSpace.
func TestOutOfDataSpaceQueueFake(t *testing.T) { kcOutOfDataSpace(false)(t, newFakeEnv(t)) }

// skipInGuest skips a long test of the fake kernel in the VM: the host runs
// it, and the VM's time goes to the real kernel's.
func skipInGuest(t *testing.T) {
	if vmtest.InGuest() {
		t.Skip("a fake-kernel test: it runs on the host")
	}
}

func TestCrashRecoveryFake(t *testing.T) {
	skipInGuest(t)
	n, r := runCrashTests(t, newFakeEnv, true)
	t.Logf("crash points covered on the fake kernel: %d, and %d more in the recoveries from them", n, r)
	if n < 44 || r < 200 {
		t.Errorf("%d crash points and %d in recoveries: an operation or a recovery passes fewer steps than it did", n, r)
	}
}

// A pool the kernel marked needs_check refuses changes with
// ErrPoolUnhealthy and reports no capacity; reads of records still work.
// (The real kernel only gets there through metadata errors, which the VM
// tests cannot cause safely.)
func TestUnhealthyPoolFake(t *testing.T) {
	e := newFakeEnv(t).(*fakeEnv)
	p := openPool(t, e, testConfig(t, "sick", 64<<20))
	if _, err := p.CreateVolume(ctx, "ok", 4<<20); err != nil {
		t.Fatal(err)
	}
	if err := e.k.SetNeedsCheck(p.dev); err != nil {
		t.Fatal(err)
	}
	if _, err := p.CreateVolume(ctx, "refused", 4<<20); !errors.Is(err, ErrPoolUnhealthy) {
		t.Fatalf("create on a needs_check pool: %v", err)
	}
	if err := p.Delete(ctx, "ok"); !errors.Is(err, ErrPoolUnhealthy) {
		t.Fatalf("delete on a needs_check pool: %v", err)
	}
	u, err := p.Usage()
	if err != nil || u.Healthy() || !u.NeedsCheck || u.AvailableBytes != 0 {
		t.Fatalf("usage of a needs_check pool: %+v, %v", u, err)
	}
	if _, err := p.Get("ok"); err != nil {
		t.Fatalf("records unreadable: %v", err)
	}
	if err := e.k.FailPool(p.dev); err != nil {
		t.Fatal(err)
	}
	p.Close()
	if _, err := Open(ctx, p.cfg, e.k); !errors.Is(err, ErrPoolUnhealthy) {
		t.Fatalf("open of a failed pool: %v", err)
	}
}

// TestFaultSweepFake breaks every operation at each call it makes, with
// each errno, before and after the call, on the fake kernel.
func TestFaultSweepFake(t *testing.T) {
	skipInGuest(t)
	matrix := runFaultSweep(t, newFakeEnv, faultErrnos)
	matrix = append(matrix, runPersistentFaults(t, newFakeEnv)...)
	checkFaultMatrix(t, matrix, 950)
}

func TestIdentityFake(t *testing.T) { runIdentityScenarios(t, newFakeEnv) }

// Usage answers while a change holds the pool's lock (a snapshot holds it
// across its kernel messages and commits, its origin suspended), with the
// records' sums of the last change recorded and the pool's block size,
// and says ErrClosed once the pool is closed.
func TestUsageTakesNoLockFake(t *testing.T) {
	e := newFakeEnv(t).(*fakeEnv)
	p := openPool(t, e, testConfig(t, "poll", 64<<20))
	if _, err := p.CreateVolume(ctx, "a", 4<<20); err != nil {
		t.Fatal(err)
	}
	if _, err := p.Snapshot(ctx, "a-snap", "a"); err != nil {
		t.Fatal(err)
	}
	p.mu.Lock()
	got := make(chan Usage, 1)
	go func() {
		u, err := p.Usage()
		if err != nil {
			t.Error(err)
		}
		got <- u
	}()
	var u Usage
	select {
	case u = <-got:
	case <-time.After(time.Minute):
		t.Fatal("Usage is still waiting for the pool's lock after a minute")
	}
	p.mu.Unlock()
	if u.Volumes != 1 || u.Snapshots != 1 || u.ProvisionedBytes != 8<<20 || u.DataBytes != 64<<20 {
		t.Errorf("usage while a change holds the lock: %+v", u)
	}
	if err := p.Close(); err != nil {
		t.Fatal(err)
	}
	if _, err := p.Usage(); !errors.Is(err, ErrClosed) {
		t.Errorf("Usage of a closed pool: %v, want ErrClosed", err)
	}
}

// listSpy is a Kernel that calls onList at each List: the recovery lists
// the devices to resume (resumeSuspended).
type listSpy struct {
	Kernel
	onList func()
}

func (k listSpy) List() ([]devmapper.ListEntry, error) {
	if k.onList != nil {
		k.onList()
	}
	return k.Kernel.List()
}

// A failed step that the recovery settles at once is not shown to Usage,
// which takes no lock: during the recovery Usage still says what it said
// before. (A fence the recovery cannot lift is published: checkInvariants
// compares the published view with the pool's after every fault.)
func TestUsageHidesASettledFenceFake(t *testing.T) {
	e := newFakeEnv(t).(*fakeEnv)
	spy := &listSpy{Kernel: e.k}
	p, err := Open(ctx, testConfig(t, "fence", 64<<20), spy)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = p.Close() })
	if _, err := p.CreateVolume(ctx, "a", 4<<20); err != nil {
		t.Fatal(err)
	}
	listed := 0
	spy.onList = func() {
		listed++
		if u, err := p.Usage(); err != nil || u.Fenced != "" {
			t.Errorf("during the recovery Usage says fenced %q (%v)", u.Fenced, err)
		}
	}
	p.mu.Lock()
	err = p.fail(errors.New("a step failed; the recovery settles it"))
	p.mu.Unlock()
	spy.onList = nil
	if err != nil || listed == 0 {
		t.Fatalf("recovery: %v, devices listed %d times", err, listed)
	}
	if u, err := p.Usage(); err != nil || u.Fenced != "" {
		t.Errorf("after the recovery: fenced %q, %v", u.Fenced, err)
	}
}
