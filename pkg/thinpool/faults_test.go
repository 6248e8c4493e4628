package thinpool

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"sort"
	"strings"
	"sync"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/csi-dmthin/csi-dmthin/pkg/devmapper"
)

// Fault injection: the kernel interface and the records wrapped so that the
// nth call of a chosen kind fails with a chosen errno, either before the call
// is made (the kernel or the disk said no) or after it (it happened, and the
// caller was told it failed: a commit whose reply was lost, an fsync that
// failed after the write). The sweep below runs every operation with a fault
// at each call it makes, on the fake kernel on the host and on the real one
// in the VM.

// fault is one armed failure.
type fault struct {
	kind  string // a call kind: see faultKernel and faultRecords
	nth   int    // which call of kind fails, counted from when it was armed (1 = the next)
	errno unix.Errno
	after bool // the call is made, then the error returned
	// persistent: every call of kind from the nth on fails, until disarmed.
	persistent bool
}

func (f fault) String() string {
	mode := "before"
	if f.after {
		mode = "after"
	}
	return fmt.Sprintf("%s#%d %s %s", f.kind, f.nth, unix.ErrnoName(f.errno), mode)
}

// faults is the switchboard every wrapped call passes through.
type faults struct {
	mu      sync.Mutex
	tracing bool
	trace   []string
	armed   *fault
	seen    int // calls of armed.kind since it was armed
	fired   int
}

func (f *faults) startTrace() {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.tracing, f.trace = true, nil
}

func (f *faults) stopTrace() []string {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.tracing = false
	return f.trace
}

func (f *faults) arm(fl fault) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.armed, f.seen, f.fired = &fl, 0, 0
}

// disarm stops failing calls and says how many failed.
func (f *faults) disarm() int {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.armed = nil
	return f.fired
}

// call runs do, a call of kind, failing it if the armed fault says so.
// Calls that change nothing (reads) are never failed after the fact.
func (f *faults) call(kind string, do func() error) error {
	f.mu.Lock()
	if f.tracing {
		f.trace = append(f.trace, kind)
	}
	fire := false
	var fl fault
	if a := f.armed; a != nil && a.kind == kind {
		f.seen++
		if f.seen == a.nth || (a.persistent && f.seen > a.nth) {
			fire, fl = true, *a
			f.fired++
		}
	}
	f.mu.Unlock()
	if !fire {
		return do()
	}
	injected := fmt.Errorf("injected fault (%s): %w", fl, fl.errno)
	if fl.after {
		_ = do()
	}
	return injected
}

// mutating reports the kinds of calls that change something, which may
// also fail after they acted.
func mutating(kind string) bool {
	switch kind {
	case "info", "info-by-name", "list", "table", "status", "block-device", "read-block", "device-node", "serial", "records:load":
		return false
	}
	return true
}

// faultKernel is a Kernel whose calls go through faults.
type faultKernel struct {
	k Kernel
	f *faults
}

var _ Kernel = (*faultKernel)(nil)

func messageKind(m devmapper.Message) string {
	s := m.String()
	if i := strings.IndexByte(s, ' '); i > 0 {
		s = s[:i]
	}
	return "msg:" + s
}

func (k *faultKernel) Create(name, uuid string) (info devmapper.DeviceInfo, err error) {
	err = k.f.call("create", func() (e error) { info, e = k.k.Create(name, uuid); return })
	return
}
func (k *faultKernel) Load(dev devmapper.Dev, table []devmapper.Target) error {
	return k.f.call("load", func() error { return k.k.Load(dev, table) })
}
func (k *faultKernel) Suspend(dev devmapper.Dev, flags devmapper.SuspendFlags) error {
	return k.f.call("suspend", func() error { return k.k.Suspend(dev, flags) })
}
func (k *faultKernel) Resume(dev devmapper.Dev) error {
	return k.f.call("resume", func() error { return k.k.Resume(dev) })
}
func (k *faultKernel) Remove(dev devmapper.Dev, deferred bool) error {
	return k.f.call("remove", func() error { return k.k.Remove(dev, deferred) })
}
func (k *faultKernel) CancelDeferredRemove(dev devmapper.Dev) error {
	return k.f.call("cancel-deferred-remove", func() error { return k.k.CancelDeferredRemove(dev) })
}
func (k *faultKernel) Info(dev devmapper.Dev) (info devmapper.DeviceInfo, err error) {
	err = k.f.call("info", func() (e error) { info, e = k.k.Info(dev); return })
	return
}
func (k *faultKernel) InfoByName(name string) (info devmapper.DeviceInfo, err error) {
	err = k.f.call("info-by-name", func() (e error) { info, e = k.k.InfoByName(name); return })
	return
}
func (k *faultKernel) List() (l []devmapper.ListEntry, err error) {
	err = k.f.call("list", func() (e error) { l, e = k.k.List(); return })
	return
}
func (k *faultKernel) Table(dev devmapper.Dev) (t []devmapper.Target, err error) {
	err = k.f.call("table", func() (e error) { t, e = k.k.Table(dev); return })
	return
}
func (k *faultKernel) Status(dev devmapper.Dev, noFlush bool) (t []devmapper.Target, err error) {
	err = k.f.call("status", func() (e error) { t, e = k.k.Status(dev, noFlush); return })
	return
}
func (k *faultKernel) Message(dev devmapper.Dev, m devmapper.Message) error {
	return k.f.call(messageKind(m), func() error { return k.k.Message(dev, m) })
}
func (k *faultKernel) BlockDevice(path string) (d devmapper.Dev, n int64, err error) {
	err = k.f.call("block-device", func() (e error) { d, n, e = k.k.BlockDevice(path); return })
	return
}
func (k *faultKernel) AttachFile(path string) (devmapper.Dev, func(), error) {
	var d devmapper.Dev
	var release func()
	err := k.f.call("attach", func() (e error) { d, release, e = k.k.AttachFile(path); return })
	if err != nil {
		// Attached, then failed: the hold goes with the failure, as it
		// would in the kernel's own error path. (Dropped instead, it would
		// be closed whenever the garbage collector got to it, detaching
		// the device under whoever found it meanwhile.)
		if release != nil {
			release()
		}
		return 0, func() {}, err
	}
	return d, release, nil
}
func (k *faultKernel) ReadBlock(dev devmapper.Dev, off int64, buf []byte) error {
	return k.f.call("read-block", func() error { return k.k.ReadBlock(dev, off, buf) })
}
func (k *faultKernel) ZeroBlock(dev devmapper.Dev, n int) error {
	return k.f.call("zero-block", func() error { return k.k.ZeroBlock(dev, n) })
}
func (k *faultKernel) WriteBlock(dev devmapper.Dev, off int64, buf []byte) error {
	return k.f.call("write-block", func() error { return k.k.WriteBlock(dev, off, buf) })
}
func (k *faultKernel) Serial(dev devmapper.Dev) (s string, err error) {
	err = k.f.call("serial", func() (e error) { s, e = k.k.Serial(dev); return })
	return
}
func (k *faultKernel) DeviceNode(dev devmapper.Dev) (node string, err error) {
	err = k.f.call("device-node", func() (e error) { node, e = k.k.DeviceNode(dev); return })
	return
}
func (k *faultKernel) RefreshSize(dev devmapper.Dev) error {
	return k.f.call("refresh-size", func() error { return k.k.RefreshSize(dev) })
}

// faultRecords is a records store whose calls go through faults. A failed
// apply after the fact models an fsync that failed after the write.
type faultRecords struct {
	r records
	f *faults
}

var _ records = (*faultRecords)(nil)

func (r *faultRecords) load() (s *state, err error) {
	err = r.f.call("records:load", func() (e error) { s, e = r.r.load(); return })
	return
}
func (r *faultRecords) apply(c change) error {
	return r.f.call("records:apply", func() error { return r.r.apply(c) })
}
func (r *faultRecords) rewrite(s *state) error {
	return r.f.call("records:rewrite", func() error { return r.r.rewrite(s) })
}
func (r *faultRecords) close() error { return r.r.close() }

// withFaults makes every kernel and records call of the pool go through f.
func withFaults(f *faults) Option {
	return func(p *Pool) {
		p.k = &faultKernel{k: p.k, f: f}
		p.st = &faultRecords{r: p.st, f: f}
	}
}

// faultOp is an operation the sweep breaks.
type faultOp struct {
	name string
	// newPool: the operation is Open of a new pool; run gets nil and
	// returns the pool it opened.
	newPool bool
	run     func(t *testing.T, e env, p *Pool, f *faults, cfg Config) (*Pool, error)
	// check verifies the operation's effect, after a success or a retry.
	check func(t *testing.T, e env, p *Pool)
	// prepare, when set, runs after faultSetup; its release runs before
	// the pool is torn down.
	prepare func(t *testing.T, e env, p *Pool) (release func())
	// goneAfterCrash: a crash before the operation finished may leave
	// nothing to retry it on (Open deletes a template left unsealed).
	goneAfterCrash string
	// makePool, for an operation that opens the pool, makes what it
	// opens.
	makePool func(t *testing.T, e env, cfg Config)
	// plantsOrphan: prepare takes a thin id in the pool that no record
	// owns, for the operation to meet.
	plantsOrphan bool
}

var faultData = pattern(21, 64<<10)

// checkGroup checks the group snapshot of base and victim that the group
// operations make.
func checkGroup(t *testing.T, e env, p *Pool) {
	t.Helper()
	g, err := p.GroupSnapshots("g1")
	if err != nil || len(g) != 2 || g[0].Name != "g-base" || g[1].Name != "g-victim" || g[0].Source != "base" || g[1].Source != "victim" {
		t.Fatalf("group g1: %+v, %v", g, err)
	}
	if got := e.read(t, p, "g-base", 0, len(faultData)); !bytes.Equal(got, faultData) {
		t.Error("g-base does not hold base's data")
	}
}

// faultSetup gives each case the same pool: "base" (written, active),
// "victim" (inactive), and "t-seal", a template written and deactivated,
// not yet sealed.
func faultSetup(t *testing.T, e env, p *Pool) {
	t.Helper()
	if _, err := p.CreateVolume(ctx, "base", 8<<20); err != nil {
		t.Fatal(err)
	}
	if err := e.write(t, p, "base", 0, faultData); err != nil {
		t.Fatal(err)
	}
	if _, err := p.CreateVolume(ctx, "victim", 8<<20); err != nil {
		t.Fatal(err)
	}
	if _, err := p.CreateTemplate(ctx, "t-seal", 8<<20); err != nil {
		t.Fatal(err)
	}
	if err := e.write(t, p, "t-seal", 0, faultData[:4096]); err != nil {
		t.Fatal(err)
	}
	if err := p.Deactivate(ctx, "t-seal"); err != nil {
		t.Fatal(err)
	}
}

func faultOps() []faultOp {
	on := func(run func(p *Pool) error) func(*testing.T, env, *Pool, *faults, Config) (*Pool, error) {
		return func(_ *testing.T, _ env, p *Pool, _ *faults, _ Config) (*Pool, error) { return p, run(p) }
	}
	return []faultOp{
		{name: "create", run: on(func(p *Pool) error { _, err := p.CreateVolume(ctx, "new", 4<<20); return err }),
			check: func(t *testing.T, e env, p *Pool) {
				if v, err := p.Get("new"); err != nil || v.SizeBytes != 4<<20 {
					t.Errorf("new: %+v, %v", v, err)
				}
			}},
		{name: "snapshot", run: on(func(p *Pool) error { _, err := p.Snapshot(ctx, "snap", "base"); return err }),
			check: func(t *testing.T, e env, p *Pool) {
				if got := e.read(t, p, "snap", 0, len(faultData)); !bytes.Equal(got, faultData) {
					t.Error("snapshot data differs")
				}
			}},
		{name: "clone", run: on(func(p *Pool) error { _, err := p.Clone(ctx, "clone", "base", 16<<20); return err }),
			check: func(t *testing.T, e env, p *Pool) {
				if got := e.read(t, p, "clone", 0, len(faultData)); !bytes.Equal(got, faultData) {
					t.Error("clone data differs")
				}
			}},
		{name: "delete", run: on(func(p *Pool) error { return p.Delete(ctx, "victim") }),
			check: func(t *testing.T, e env, p *Pool) {
				if _, err := p.Get("victim"); !errors.Is(err, ErrNotFound) {
					t.Errorf("victim after delete: %v", err)
				}
			}},
		{name: "grow", run: on(func(p *Pool) error { _, err := p.Grow(ctx, "base", 12<<20); return err }),
			check: func(t *testing.T, e env, p *Pool) {
				if v, err := p.Get("base"); err != nil || v.SizeBytes != 12<<20 {
					t.Errorf("base after grow: %+v, %v", v, err)
				}
				if err := e.write(t, p, "base", 12<<20-4096, faultData[:4096]); err != nil {
					t.Errorf("write past the old end: %v", err)
				}
			}},
		{name: "activate", run: on(func(p *Pool) error { _, err := p.Activate(ctx, "victim"); return err }),
			check: func(t *testing.T, e env, p *Pool) {
				if _, err := p.DevicePath("victim"); err != nil {
					t.Errorf("victim not active: %v", err)
				}
				if v, err := p.Get("victim"); err != nil || !v.Active {
					t.Errorf("victim not recorded active: %+v, %v", v, err)
				}
			}},
		{name: "deactivate", run: on(func(p *Pool) error { return p.Deactivate(ctx, "base") }),
			check: func(t *testing.T, e env, p *Pool) {
				if _, err := p.DevicePath("base"); err == nil {
					t.Error("base still active")
				}
				if v, err := p.Get("base"); err != nil || v.Active {
					t.Errorf("base still recorded active: %+v, %v", v, err)
				}
			}},
		{name: "seal", goneAfterCrash: "t-seal", run: on(func(p *Pool) error { return p.SealTemplate(ctx, "t-seal") }),
			check: func(t *testing.T, e env, p *Pool) {
				if v, err := p.Get("t-seal"); err != nil || !v.Sealed {
					t.Errorf("t-seal: %+v, %v", v, err)
				}
			}},
		{name: "create-suspect", plantsOrphan: true, run: on(func(p *Pool) error { _, err := p.CreateVolume(ctx, "new", 4<<20); return err }),
			// The next thin id is taken in the pool, by no record: the
			// create meets EEXIST, records the id as suspect and takes
			// the next one.
			prepare: func(t *testing.T, e env, p *Pool) func() {
				p.mu.Lock()
				id, _, err := p.allocID()
				p.mu.Unlock()
				if err != nil {
					t.Fatal(err)
				}
				if err := e.kernel().Message(p.dev, devmapper.CreateThin{DeviceID: id}); err != nil {
					t.Fatal(err)
				}
				return func() {}
			},
			check: func(t *testing.T, e env, p *Pool) {
				if v, err := p.Get("new"); err != nil || v.SizeBytes != 4<<20 {
					t.Errorf("new: %+v, %v", v, err)
				}
			}},
		{name: "delete-open", run: on(func(p *Pool) error { return p.Delete(ctx, "victim") }),
			// victim is open (mounted): its device is removed when it is
			// closed, and the delete waits as a tombstone.
			prepare: func(t *testing.T, e env, p *Pool) func() { return e.hold(t, p, "victim") },
			check: func(t *testing.T, e env, p *Pool) {
				if _, err := p.Get("victim"); !errors.Is(err, ErrNotFound) {
					t.Errorf("victim after delete: %v", err)
				}
			}},
		{name: "group-snapshot", run: on(func(p *Pool) error {
			_, err := p.SnapshotGroup(ctx, "g1", []GroupMember{{"g-base", "base"}, {"g-victim", "victim"}})
			return err
		}),
			check: checkGroup},
		{name: "group-suspect", plantsOrphan: true, run: on(func(p *Pool) error {
			_, err := p.SnapshotGroup(ctx, "g1", []GroupMember{{"g-base", "base"}, {"g-victim", "victim"}})
			return err
		}),
			// The second member's id is taken in the pool by no record.
			prepare: func(t *testing.T, e env, p *Pool) func() {
				p.mu.Lock()
				_, next, err := p.allocID()
				if err == nil {
					next, _, err = p.allocFrom(next)
				}
				p.mu.Unlock()
				if err != nil {
					t.Fatal(err)
				}
				if err := e.kernel().Message(p.dev, devmapper.CreateThin{DeviceID: next}); err != nil {
					t.Fatal(err)
				}
				return func() {}
			},
			check: checkGroup},
		{name: "grow-pool", run: on(func(p *Pool) error {
			_, err := p.GrowPool(ctx, GrowRequest{DataFileBytes: 96 << 20, MetadataFileBytes: 24 << 20})
			return err
		}),
			check: func(t *testing.T, e env, p *Pool) {
				u, err := p.Usage()
				if err != nil || u.DataBytes != 96<<20 || u.MetadataBytes != 24<<20 || !u.Healthy() {
					t.Errorf("after growing the pool: %+v, %v", u, err)
				}
				if err := e.write(t, p, "base", 4<<20, faultData); err != nil {
					t.Errorf("write after growing: %v", err)
				}
			}},
		{name: "create-pool", newPool: true,
			run: func(t *testing.T, e env, _ *Pool, f *faults, cfg Config) (*Pool, error) {
				return Open(ctx, cfg, e.kernel(), withFaults(f))
			},
			check: func(t *testing.T, e env, p *Pool) {
				if _, err := p.CreateVolume(ctx, "after", 4<<20); err != nil {
					t.Errorf("the new pool does not work: %v", err)
				}
			}},
		{name: "add-marker", newPool: true,
			// Open of a pool made before markers existed writes one.
			makePool: func(t *testing.T, e env, cfg Config) {
				p := openPool(t, e, cfg)
				faultSetup(t, e, p)
				stripMarker(t, e, p)
				p.Close()
			},
			run: func(t *testing.T, e env, _ *Pool, f *faults, cfg Config) (*Pool, error) {
				return Open(ctx, cfg, e.kernel(), withFaults(f))
			},
			check: func(t *testing.T, e env, p *Pool) {
				if !p.rec.Marker {
					t.Error("no marker recorded")
				}
				if got := e.read(t, p, "base", 0, len(faultData)); !bytes.Equal(got, faultData) {
					t.Error("committed data lost")
				}
			}},
	}
}

// faultCase is one row of the fault matrix.
type faultCase struct {
	op      string
	call    int // index in the operation's calls
	f       fault
	outcome string
}

// faultErrnos and faultModes are the sweep's axes; the kernel runs may
// take fewer.
var faultErrnos = []unix.Errno{unix.EIO, unix.EINTR, unix.ENOSPC, unix.EBUSY}

var poolSeq struct {
	sync.Mutex
	n int
}

// faultPoolName gives each case a pool of its own, so that on the real
// kernel nothing one case leaves behind can meet the next.
func faultPoolName() string {
	poolSeq.Lock()
	defer poolSeq.Unlock()
	poolSeq.n++
	return fmt.Sprintf("f%d", poolSeq.n)
}

// runFaultSweep runs every operation with a fault at each call it makes,
// each errno and both modes, and returns the matrix.
func runFaultSweep(t *testing.T, newEnv func(t *testing.T) env, errnos []unix.Errno) []faultCase {
	var matrix []faultCase
	for _, op := range faultOps() {
		calls := traceOp(t, newEnv, op)
		seen := map[string]int{}
		for i, kind := range calls {
			seen[kind]++
			for _, errno := range errnos {
				for _, after := range []bool{false, true} {
					if after && !mutating(kind) {
						continue
					}
					fl := fault{kind: kind, nth: seen[kind], errno: errno, after: after}
					c := faultCase{op: op.name, call: i, f: fl}
					ran := false
					t.Run(fmt.Sprintf("%s/%02d-%s", op.name, i, fl), func(t *testing.T) {
						ran = true
						c.outcome = runFaultCase(t, newEnv(t), op, fl)
					})
					if ran { // not filtered out by -run
						matrix = append(matrix, c)
					}
				}
			}
		}
	}
	return matrix
}

// traceOp lists the kinds of the calls op makes, in order.
// It returns nil when -run filtered the trace out, and the operation's
// cases with it.
func traceOp(t *testing.T, newEnv func(t *testing.T) env, op faultOp) []string {
	var calls []string
	t.Run(op.name+"/trace", func(t *testing.T) {
		e := newEnv(t)
		f := &faults{}
		cfg := testConfig(t, faultPoolName(), 64<<20)
		p, release := faultPool(t, e, op, f, cfg)
		f.startTrace()
		p, err := op.run(t, e, p, f, cfg)
		calls = f.stopTrace()
		if err != nil {
			t.Fatalf("%s without a fault: %v", op.name, err)
		}
		if len(calls) == 0 {
			t.Fatalf("%s makes no call", op.name)
		}
		release()
		teardown(t, e, p)
	})
	return calls
}

// faultPool opens the pool an operation starts from, with f wired in:
// none for an operation that makes the pool.
func faultPool(t *testing.T, e env, op faultOp, f *faults, cfg Config) (*Pool, func()) {
	t.Helper()
	if op.newPool {
		if op.makePool != nil {
			op.makePool(t, e, cfg)
		}
		return nil, func() {}
	}
	p := openPool(t, e, cfg, withFaults(f))
	faultSetup(t, e, p)
	release := func() {}
	if op.prepare != nil {
		release = op.prepare(t, e, p)
	}
	return p, release
}

// runFaultCase runs op with fl armed and checks what the answer claimed,
// that a retry succeeds, and that after a reopen nothing is lost, leaked or
// left suspended. It returns the outcome for the matrix.
func runFaultCase(t *testing.T, e env, op faultOp, fl fault) string {
	f := &faults{}
	cfg := testConfig(t, faultPoolName(), 64<<20)
	p, release := faultPool(t, e, op, f, cfg)
	f.arm(fl)
	got, err := op.run(t, e, p, f, cfg)
	fired := f.disarm()
	if fired == 0 {
		t.Fatalf("the fault was never reached (the call sequence differs from the trace)")
	}
	outcome := "ok"
	switch {
	case err == nil:
	case errors.Is(err, ErrFenced):
		outcome = "fenced"
	default:
		outcome = "error"
	}
	if op.newPool {
		if err == nil {
			// An OK is the truth: the pool works now and after a reopen.
			op.check(t, e, got)
			got.Close()
		}
		// The retry (a second Open, as a restarted driver does).
		p = openPool(t, e, cfg)
	} else {
		if err == nil {
			op.check(t, e, p)
		} else {
			t.Logf("%s failed as it should: %v", op.name, err)
		}
		p.mu.Lock()
		stillFenced := p.fenced != nil
		p.mu.Unlock()
		if stillFenced {
			outcome += ", stayed fenced"
		}
		if _, rerr := op.run(t, e, p, f, cfg); rerr != nil {
			t.Fatalf("retry after %s: %v", fl, rerr)
		}
		op.check(t, e, p)
		checkInvariants(t, e, p)
		p.Close()
		p = openPool(t, e, cfg)
	}
	defer teardown(t, e, p)
	defer release()
	checkInvariants(t, e, p)
	op.check(t, e, p)
	if !op.newPool {
		if got := e.read(t, p, "base", 0, len(faultData)); !bytes.Equal(got, faultData) {
			t.Error("committed data lost")
		}
	}
	if err == nil {
		return outcome
	}
	return outcome + ", retry ok"
}

// printFaultMatrix writes the matrix (operation x call x errno x mode ->
// outcome) to the test log, and returns the count per outcome.
func printFaultMatrix(t *testing.T, matrix []faultCase) map[string]int {
	var b strings.Builder
	counts := map[string]int{}
	fmt.Fprintf(&b, "fault matrix: %d cases\n", len(matrix))
	fmt.Fprintf(&b, "%-12s %4s %-26s %-7s %-6s %s\n", "operation", "call", "kind", "errno", "mode", "outcome")
	for _, c := range matrix {
		mode := "before"
		if c.f.after {
			mode = "after"
		}
		o := c.outcome
		if o == "" {
			o = "test failed"
		}
		counts[o]++
		fmt.Fprintf(&b, "%-12s %4d %-26s %-7s %-6s %s\n", c.op, c.call, fmt.Sprintf("%s#%d", c.f.kind, c.f.nth), unix.ErrnoName(c.f.errno), mode, o)
	}
	keys := make([]string, 0, len(counts))
	for k := range counts {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	for _, k := range keys {
		fmt.Fprintf(&b, "  %-30s %d\n", k, counts[k])
	}
	if os.Getenv("CSI_DMTHIN_FAULT_MATRIX") != "" {
		t.Log("\n" + b.String())
	} else {
		// The whole table is long: its totals always, the rows on request.
		lines := strings.Split(strings.TrimSpace(b.String()), "\n")
		t.Logf("%s\n%s", lines[0], strings.Join(lines[len(lines)-len(keys):], "\n"))
	}
	return counts
}

// checkFaultMatrix prints the matrix and fails unless it has at least min
// cases and every case ended with a truthful answer and a clean pool.
func checkFaultMatrix(t *testing.T, matrix []faultCase, min int) {
	t.Helper()
	counts := printFaultMatrix(t, matrix)
	if len(matrix) < min {
		t.Errorf("the sweep ran %d cases, want at least %d: an operation makes fewer calls than it did", len(matrix), min)
	}
	if n := counts["test failed"]; n > 0 {
		t.Errorf("%d of %d cases failed", n, len(matrix))
	}
}

// runPersistentFaults makes the first call of each changing kind an
// operation makes fail, and every one after it, until disarmed: a disk that
// stays full, a pool that keeps refusing. The operation must fail, a retry
// must fail the same way and change nothing, and once the fault is gone a
// retry must succeed with nothing lost or leaked.
func runPersistentFaults(t *testing.T, newEnv func(t *testing.T) env) []faultCase {
	var matrix []faultCase
	for _, op := range faultOps() {
		calls := traceOp(t, newEnv, op)
		done := map[string]bool{}
		for i, kind := range calls {
			if done[kind] || !mutating(kind) {
				continue
			}
			done[kind] = true
			errno := unix.EIO
			if strings.HasPrefix(kind, "records:") {
				errno = unix.ENOSPC
			}
			fl := fault{kind: kind, nth: 1, errno: errno, persistent: true}
			c := faultCase{op: op.name, call: i, f: fl}
			ran := false
			t.Run(fmt.Sprintf("%s/%02d-%s-persistent", op.name, i, fl), func(t *testing.T) {
				ran = true
				c.outcome = runPersistentCase(t, newEnv(t), op, fl)
			})
			if ran {
				matrix = append(matrix, c)
			}
		}
	}
	return matrix
}

func runPersistentCase(t *testing.T, e env, op faultOp, fl fault) string {
	f := &faults{}
	cfg := testConfig(t, faultPoolName(), 64<<20)
	p, release := faultPool(t, e, op, f, cfg)
	f.arm(fl)
	_, err1 := op.run(t, e, p, f, cfg)
	_, err2 := op.run(t, e, p, f, cfg)
	if f.disarm() == 0 {
		t.Fatal("the fault was never reached")
	}
	// Some calls are allowed to fail: a failed reactivation of a volume
	// that is already active, say, is not one the operation needs.
	if err1 == nil && err2 == nil {
		if !op.newPool {
			op.check(t, e, p)
			p.Close()
		}
		p = openPool(t, e, cfg)
		defer teardown(t, e, p)
		defer release()
		checkInvariants(t, e, p)
		op.check(t, e, p)
		return "ok (the call is not needed)"
	}
	if err1 == nil || err2 == nil {
		t.Fatalf("a persistent fault: first %v, then %v", err1, err2)
	}
	if !op.newPool && errors.Is(err1, ErrFenced) != errors.Is(err2, ErrFenced) {
		t.Errorf("the retry failed differently: %v, then %v", err1, err2)
	}
	if !strings.Contains(err2.Error(), unix.ErrnoName(fl.errno)) && !strings.Contains(err2.Error(), fl.errno.Error()) {
		t.Errorf("the error does not say what failed: %v", err2)
	}
	outcome := "error"
	if errors.Is(err2, ErrFenced) {
		outcome = "fenced"
	}
	if op.newPool {
		p = openPool(t, e, cfg)
	} else {
		if _, err := op.run(t, e, p, f, cfg); err != nil {
			t.Fatalf("retry once the fault is gone: %v", err)
		}
		op.check(t, e, p)
		checkInvariants(t, e, p)
		p.Close()
		p = openPool(t, e, cfg)
	}
	defer teardown(t, e, p)
	defer release()
	checkInvariants(t, e, p)
	op.check(t, e, p)
	return outcome + " until cleared, then retry ok"
}
