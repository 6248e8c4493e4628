package kube

import (
	"context"
	"errors"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/csi-dmthin/csi-dmthin/pkg/thinpool"
)

// fakeUsage is a pool whose Usage the test sets.
type fakeUsage struct {
	mu  sync.Mutex
	u   thinpool.Usage
	err error
}

func (f *fakeUsage) Usage() (thinpool.Usage, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.u, f.err
}

func (f *fakeUsage) set(u thinpool.Usage, err error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.u, f.err = u, err
}

// used is a healthy pool with dataPct and metaPct percent used.
func used(dataPct, metaPct int64) thinpool.Usage {
	return thinpool.Usage{DataBytes: 100 << 20, DataUsedBytes: dataPct << 20, MetadataBytes: 100 << 10, MetadataUsedBytes: metaPct << 10, Mode: thinpool.ModeReadWrite}
}

func TestPoolEvents(t *testing.T) {
	type step struct {
		u    thinpool.Usage
		err  error
		want []string // "<type> <reason>" of the Events this check emits
	}
	failed := thinpool.Usage{Failed: true, Mode: thinpool.ModeReadOnly}
	needsCheck := used(50, 10)
	needsCheck.NeedsCheck = true
	needsCheck.Mode = thinpool.ModeReadOnly
	readOnly := used(50, 10)
	readOnly.Mode = thinpool.ModeReadOnly
	fenced := used(50, 10)
	fenced.Fenced = "commit: input/output error"
	for _, c := range []struct {
		name  string
		steps []step
	}{
		{"quiet while healthy", []step{{u: used(10, 10)}, {u: used(89, 89)}, {u: used(50, 5)}}},
		{"data crossing emits once, recovery Normal", []step{
			{u: used(80, 10)},
			{u: used(91, 10), want: []string{"Warning PoolNearlyFull"}},
			{u: used(95, 10)},
			{u: used(89, 10)}, // inside the hysteresis band: still full
			{u: used(70, 10), want: []string{"Normal PoolSpaceRecovered"}},
			{u: used(70, 10)},
			{u: used(90, 10), want: []string{"Warning PoolNearlyFull"}},
		}},
		{"metadata counts too", []step{
			{u: used(10, 93), want: []string{"Warning PoolNearlyFull"}},
			{u: used(10, 50), want: []string{"Normal PoolSpaceRecovered"}},
		}},
		{"full at start is said", []step{{u: used(99, 10), want: []string{"Warning PoolNearlyFull"}}}},
		{"failed pool emits, then healthy again", []step{
			{u: used(10, 10)},
			{u: failed, want: []string{"Warning PoolFailed"}},
			{u: failed},
			{u: used(10, 10), want: []string{"Normal PoolHealthy"}},
		}},
		{"needs_check and read-only", []step{
			{u: needsCheck, want: []string{"Warning PoolNeedsCheck"}},
			{u: readOnly, want: []string{"Warning PoolReadOnly"}},
			{u: readOnly},
			{u: used(10, 10), want: []string{"Normal PoolHealthy"}},
		}},
		{"fenced, then recovered", []step{
			{u: used(10, 10)},
			{u: fenced, want: []string{"Warning PoolFenced"}},
			{u: fenced},
			{u: used(10, 10), want: []string{"Normal PoolHealthy"}},
		}},
		{"unreadable status", []step{
			{err: errors.New("ioctl: no such device"), want: []string{"Warning PoolStatusUnreadable"}},
			{u: used(10, 10), want: []string{"Normal PoolHealthy"}},
		}},
		{"a pool that grows is said once", []step{
			{u: used(95, 10), want: []string{"Warning PoolNearlyFull"}},
			{u: doubled(used(95, 10)), want: []string{"Normal PoolGrown", "Normal PoolSpaceRecovered"}},
			{u: doubled(used(95, 10))},
		}},
		{"a failed full pool keeps its full state", []step{
			{u: used(95, 10), want: []string{"Warning PoolNearlyFull"}},
			{u: failed, want: []string{"Warning PoolFailed"}},
			{u: used(95, 10), want: []string{"Normal PoolHealthy"}},
		}},
	} {
		t.Run(c.name, func(t *testing.T) {
			pool := &fakeUsage{}
			rec := &eventLog{}
			w := NewPoolWatcher(nodeA, map[string]UsageSource{"alpha": pool}, 90, rec)
			for i, s := range c.steps {
				pool.set(s.u, s.err)
				w.Check(t.Context())
				got := rec.take()
				var kinds []string
				for _, e := range got {
					f := strings.Fields(e)
					kinds = append(kinds, f[0]+" "+f[1])
					// On this Node, named as the kubelet names it, and
					// saying which pool.
					if !strings.Contains(e, " Node//"+nodeA+"@"+nodeA+": pool alpha") {
						t.Errorf("step %d: event %q is not on node %s about pool alpha", i, e, nodeA)
					}
				}
				if strings.Join(kinds, ",") != strings.Join(s.want, ",") {
					t.Errorf("step %d: events %q, want %q", i, got, s.want)
				}
			}
		})
	}
}

func TestPoolEventsPerPool(t *testing.T) {
	alpha, beta := &fakeUsage{}, &fakeUsage{}
	alpha.set(used(95, 10), nil)
	beta.set(used(10, 10), nil)
	rec := &eventLog{}
	w := NewPoolWatcher(nodeA, map[string]UsageSource{"alpha": alpha, "beta": beta}, 0 /* default 90 */, rec)
	w.Check(t.Context())
	beta.set(used(91, 10), nil)
	w.Check(t.Context())
	got := rec.take()
	if len(got) != 2 || !strings.Contains(got[0], "pool alpha") || !strings.Contains(got[1], "pool beta") {
		t.Errorf("events = %q, want alpha's then beta's PoolNearlyFull", got)
	}
}

// doubled is u on a data device twice as large.
func doubled(u thinpool.Usage) thinpool.Usage {
	u.DataBytes *= 2
	return u
}

// Wake checks a pool at once, without waiting for the poll.
func TestPoolWatcherWake(t *testing.T) {
	pool := &fakeUsage{}
	pool.set(used(10, 10), nil)
	rec := &eventLog{}
	w := NewPoolWatcher(nodeA, map[string]UsageSource{"alpha": pool}, 90, rec)
	ctx, cancel := context.WithCancel(t.Context())
	done := make(chan struct{})
	go func() { w.Run(ctx, time.Hour); close(done) }()
	defer func() { cancel(); <-done }()
	time.Sleep(50 * time.Millisecond) // the first check, at start
	pool.set(used(95, 10), nil)
	start := time.Now()
	w.Wake("alpha")
	w.Wake("not-a-pool")
	for {
		if got := rec.take(); len(got) > 0 {
			if len(got) != 1 || !strings.Contains(got[0], "PoolNearlyFull") {
				t.Fatalf("events %q", got)
			}
			t.Logf("Event %v after the wake", time.Since(start))
			return
		}
		if time.Since(start) > 5*time.Second {
			t.Fatal("no Event after the wake")
		}
		time.Sleep(5 * time.Millisecond)
	}
}
