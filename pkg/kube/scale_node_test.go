package kube

import (
	"context"
	"fmt"
	"runtime"
	"slices"
	"strings"
	"testing"
	"text/tabwriter"

	"github.com/csi-dmthin/csi-dmthin/pkg/csi"
)

// One node's Kubernetes side at scale, as cmd/csi-dmthin's kubeSide.start
// builds it with --kube-api, --thinpools and --capacity-namespace: the
// PoolWatcher (Events on the Node), the ThinPoolWriter (the node's
// ThinPools), the CapacityRefresher (the node's CSIStorageCapacity values)
// and PVCEvents (no-space Events on a PVC). None runs its loop: each step
// below calls what the loop would call at that moment, so the requests of
// each moment are counted apart and nothing waits on a ticker.

// nodeStep is one moment in the life of a node's side.
type nodeStep struct {
	name string
	// events is how many Events the step writes (through the recorder, in
	// the background): the step is over once they are.
	events int
	run    func(ctx context.Context)
}

// nodeFootprint is what one node's side asked of the API server, step by
// step, and the heap it keeps.
type nodeFootprint struct {
	node      string
	steps     []string
	calls     []map[call]*calls // by step
	heapBytes int64
}

// measureNodeSide builds node's side with two pools (one nearly full),
// runs its steps and measures it. It fails if the side opens a watch, or
// lists anything but its own node's objects.
func measureNodeSide(ctx context.Context, tb testing.TB, s *bigCluster, m *apiMeter, node string) *nodeFootprint {
	tb.Helper()
	m.reset()
	before := heapAfterGC()
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()

	rec, stopRecorder := NewRecorder(ctx, s.core, Component, node)
	defer stopRecorder()
	alpha, beta := &fakeUsage{u: scaleUsage(40)}, &fakeUsage{u: scaleUsage(95)}
	pools := map[string]UsageSource{scalePool: alpha, "beta": beta}
	watcher := NewPoolWatcher(node, pools, 90, rec)
	writer, err := NewThinPoolWriter(ThinPoolWriterOptions{Client: s.dyn, Core: s.core, Driver: driverName, Node: node, Version: "scale", Pools: pools})
	if err != nil {
		tb.Fatal(err)
	}
	refresher, err := NewCapacityRefresher(s.core, scaleNamespace, driverName, node, poolCapacity(pools))
	if err != nil {
		tb.Fatal(err)
	}
	sink := NewPVCEvents(rec, s.core)
	i := slices.Index(s.nodes, node)
	claim, claimNS := fmt.Sprintf("data-db-%04d-0", i), fmt.Sprintf("team-%02d", i%50)

	steps := []nodeStep{
		{name: "start", events: 1, run: func(ctx context.Context) {
			watcher.Check(ctx) // beta is over 90%: one Event
			writer.setOwner(ctx)
			if err := writer.removeStale(ctx); err != nil {
				tb.Fatal(err)
			}
			writer.sync(ctx, writer.names())
		}},
		{name: "each check", run: func(ctx context.Context) {
			// Every --pool-check-interval; use changed a little, state not.
			alpha.set(scaleUsage(41), nil)
			watcher.Check(ctx)
			writer.sync(ctx, writer.names())
		}},
		{name: "a pool event", run: func(ctx context.Context) {
			// The kernel's low-water event on alpha: what Run does on Wake.
			alpha.set(scaleUsage(45), nil)
			watcher.checkPool(ctx, scalePool)
			writer.Wake(scalePool, true)
			writer.sync(ctx, writer.wake.take())
			if _, err := refresher.Refresh(ctx); err != nil {
				tb.Fatal(err)
			}
		}},
		{name: "a no-space refusal", events: 1, run: func(ctx context.Context) {
			sink.noSpace(claimNS, claim, "pool alpha has no room for 10Gi")
		}},
	}
	f := &nodeFootprint{node: node}
	events := 0
	last := m.snapshot()
	for _, st := range steps {
		st.run(ctx)
		events += st.events
		settle(tb, "the Events of step "+st.name, func() bool { return m.n("create", "events") >= events })
		now := m.snapshot()
		f.steps = append(f.steps, st.name)
		f.calls = append(f.calls, since(last, now))
		last = now
	}
	f.heapBytes = int64(heapAfterGC()) - int64(before)
	runtime.KeepAlive([]any{watcher, writer, refresher, sink, rec})
	if err := f.check(); err != nil {
		tb.Fatal(err)
	}
	return f
}

// check holds the side to what the issue asks of it: no watch (so no
// cache), and lists of its own node's objects only, by a label selector.
func (f *nodeFootprint) check() error {
	for i, cs := range f.calls {
		for k, c := range cs {
			switch {
			case k.verb == "watch":
				return fmt.Errorf("step %s: %d watches of %s (%s): a node's side must watch nothing", f.steps[i], c.n, k.resource, scopesOf(c.scopes))
			case k.verb != "list":
				continue
			}
			for sc := range c.scopes {
				if _, sel, _ := splitScope(sc); sel == "" {
					return fmt.Errorf("step %s: %s listed without a label selector (%s)", f.steps[i], k.resource, sc)
				}
			}
			for owner, n := range c.owners {
				if owner != f.node {
					return fmt.Errorf("step %s: a list of %s (%s) served %d objects of node %q, not only this node's (%s)", f.steps[i], k.resource, scopesOf(c.scopes), n, owner, f.node)
				}
			}
		}
	}
	return nil
}

// total sums the requests of every step.
func (f *nodeFootprint) total() map[call]*calls {
	out := map[call]*calls{}
	for _, cs := range f.calls {
		for k, c := range cs {
			t := out[k]
			if t == nil {
				t = &calls{scopes: map[string]bool{}, owners: map[string]int{}}
				out[k] = t
			}
			t.n += c.n
			t.objects += c.objects
			for sc := range c.scopes {
				t.scopes[sc] = true
			}
		}
	}
	return out
}

func (f *nodeFootprint) count(verb string) int {
	n := 0
	for k, c := range f.total() {
		if k.verb == verb {
			n += c.n
		}
	}
	return n
}

func (f *nodeFootprint) table() string {
	var sb strings.Builder
	w := tabwriter.NewWriter(&sb, 0, 4, 2, ' ', 0)
	fmt.Fprintf(w, "request\t%s\tobjects listed\tscope\n", strings.Join(f.steps, "\t"))
	total := f.total()
	for _, k := range sortedCalls(total) {
		fmt.Fprintf(w, "%s %s", k.verb, k.resource)
		for _, cs := range f.calls {
			n := 0
			if c := cs[k]; c != nil {
				n = c.n
			}
			fmt.Fprintf(w, "\t%d", n)
		}
		listed := ""
		if k.verb == "list" {
			listed = fmt.Sprintf("%d, %s's only", total[k].objects, f.node)
		}
		fmt.Fprintf(w, "\t%s\t%s\n", listed, scopesOf(total[k].scopes))
	}
	w.Flush()
	fmt.Fprintf(&sb, "watches: %d; informers: none, so no object is cached\n", f.count("watch"))
	fmt.Fprintf(&sb, "heap kept by the side after its steps: %.3f MiB (%d bytes; another node's side ran first, so the process's one-time caches are not in it; the fake API server's copies of the few objects the side wrote are)",
		mib(f.heapBytes), f.heapBytes)
	return sb.String()
}

// poolCapacity is GetCapacity over fake pools: the available bytes of the
// pool a class's parameters name, as the driver answers.
type poolCapacity map[string]UsageSource

func (p poolCapacity) Capacity(_ context.Context, params map[string]string) (int64, *int64, error) {
	src, ok := p[params[csi.ParamPool]]
	if !ok {
		return 0, nil, fmt.Errorf("no pool %q", params[csi.ParamPool])
	}
	u, err := src.Usage()
	if err != nil {
		return 0, nil, err
	}
	return u.AvailableBytes, nil, nil
}
