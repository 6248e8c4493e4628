package kube

import (
	"context"
	"fmt"
	"math"
	"reflect"
	"slices"
	"strings"
	"sync"
	"testing"
	"text/tabwriter"
	"time"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	k8sruntime "k8s.io/apimachinery/pkg/runtime"
	k8stesting "k8s.io/client-go/testing"
	"k8s.io/client-go/tools/cache"
)

// The cluster's controller at scale: what it lists, watches and keeps,
// once for the cluster, and how fast it places restores.

// scaleWorkers is the chart's --workers (cmd/csi-dmthin controller's
// default).
const scaleWorkers = 4

// controllerFootprint is what the controller asked of the API server to
// start and what it keeps.
type controllerFootprint struct {
	calls    map[call]*calls
	held     map[string]int  // objects in each informer's store
	served   map[string]int  // objects the informer's list options select
	stripped map[string]bool // the store keeps the objects without managedFields
	// hadManagedFields: the API server's objects have managedFields.
	hadManagedFields map[string]bool
	heapBytes        int64 // heap the controller keeps once synced
	// objectBytes is, by resource, the heap of the objects alone, decoded
	// from a list with the informer's scope and kept as the store keeps
	// them: the rest of heapBytes is the keys and indexes, the queues and
	// the fixed costs.
	objectBytes map[string]int64
}

// measureController starts the controller as `csi-dmthin controller` does
// once it leads, measures it once it has synced and its queues are empty,
// and leaves it running for measurePlacement until stop.
func measureController(ctx context.Context, tb testing.TB, s *bigCluster, m *apiMeter) (stop func(), f *controllerFootprint) {
	tb.Helper()
	m.reset()
	before := heapAfterGC()
	ctx, cancel := context.WithCancel(ctx)
	rec, stopRecorder := NewRecorder(ctx, s.core, ControllerComponent, "")
	c, err := NewController(ControllerOptions{
		DriverName: driverName, Client: s.core, Snapshots: s.snap, GroupSnapshots: true, ThinPools: s.dyn,
		Recorder: rec, Resync: scaleResync,
	})
	if err != nil {
		tb.Fatal(err)
	}
	c.start(ctx) // Run starts them too; started here, WaitForCacheSync below sees them
	done := make(chan error, 1)
	go func() { done <- c.Run(ctx, scaleWorkers) }()
	stop = sync.OnceFunc(func() {
		cancel()
		if err := <-done; err != nil {
			tb.Errorf("controller: %v", err)
		}
		stopRecorder()
	})
	tb.Cleanup(stop) // should a check below fail

	syncCtx, syncCancel := context.WithTimeout(ctx, scaleWait)
	defer syncCancel()
	stores := map[string]cache.Store{}
	for t, ok := range c.core.WaitForCacheSync(syncCtx.Done()) {
		if !ok {
			tb.Fatalf("%v informer did not sync in %v", t, scaleWait)
		}
		stores[resourceOf(t)] = c.core.InformerFor(reflect.New(t.Elem()).Interface().(k8sruntime.Object), nil).GetStore()
	}
	for t, ok := range c.snaps.WaitForCacheSync(syncCtx.Done()) {
		if !ok {
			tb.Fatalf("%v informer did not sync in %v", t, scaleWait)
		}
		stores[resourceOf(t)] = c.snaps.InformerFor(reflect.New(t.Elem()).Interface().(k8sruntime.Object), nil).GetStore()
	}
	for gvr, ok := range c.pools.WaitForCacheSync(syncCtx.Done()) {
		if !ok {
			tb.Fatalf("%v informer did not sync in %v", gvr, scaleWait)
		}
		stores[gvr.Resource] = c.pools.ForResource(gvr).Informer().GetStore()
	}
	// A reflector opens its watch just after its list has filled the store.
	settle(tb, "every informer's watch", func() bool {
		for r := range stores {
			if m.n("watch", r) == 0 {
				return false
			}
		}
		return true
	})
	settle(tb, "the controllers' queues to drain", func() bool {
		return c.Placement.queue.Len() == 0 && c.adopter.queue.Len() == 0 && c.groups.queue.Len() == 0
	})

	f = &controllerFootprint{
		calls: m.snapshot(), held: map[string]int{}, served: map[string]int{},
		stripped: map[string]bool{}, hadManagedFields: map[string]bool{}, objectBytes: map[string]int64{},
	}
	f.heapBytes = int64(heapAfterGC()) - int64(before)
	for r, st := range stores {
		objs := st.List()
		f.held[r] = len(objs)
		f.stripped[r] = !slices.ContainsFunc(objs, func(o any) bool {
			a, err := meta.Accessor(o)
			return err == nil && len(a.GetManagedFields()) > 0
		})
	}
	for r := range stores {
		if f.hadManagedFields[r], err = s.hasManagedFields(r); err != nil {
			tb.Fatal(err)
		}
	}
	if err := f.check(s, stores); err != nil {
		tb.Fatal(err)
	}
	for r := range stores {
		ns, sel, _ := splitScope(f.scope("list", r))
		if f.objectBytes[r], err = s.decodedBytes(r, ns, sel, f.stripped[r]); err != nil {
			tb.Fatal(err)
		}
	}
	return stop, f
}

// check holds the counts to the cluster: every informer lists and watches
// once with one scope, holds exactly what its list selects (and, listing
// all, at least what was seeded), and nothing is written on a cluster
// where nothing waits for the controller.
func (f *controllerFootprint) check(s *bigCluster, stores map[string]cache.Store) error {
	for k, c := range f.calls {
		if _, ok := stores[k.resource]; !ok && (k.verb == "list" || k.verb == "watch") {
			return fmt.Errorf("%s %s, but no started informer holds it", k.verb, k.resource)
		}
		if slices.Contains(writeVerbs, k.verb) {
			return fmt.Errorf("the controller wrote (%d %s %s) on a cluster where nothing waits for it", c.n, k.verb, k.resource)
		}
	}
	for r := range stores {
		for _, verb := range []string{"list", "watch"} {
			c := f.calls[call{verb, r}]
			if c == nil || c.n != 1 || len(c.scopes) != 1 {
				return fmt.Errorf("%s: want one %s with one scope, got %+v: a relist or rewatch would skew the counts", r, verb, c)
			}
		}
		ns, sel, fields := splitScope(f.scope("list", r))
		if fields != "" {
			return fmt.Errorf("%s listed with field selector %q, which the fake ignores: count it by hand", r, fields)
		}
		n, err := s.served(r, ns, sel)
		if err != nil {
			return err
		}
		f.served[r] = n
		if ns == "" && sel == "" && n < s.seeded[r].n {
			return fmt.Errorf("%s: a list of all serves %d, but %d were seeded", r, n, s.seeded[r].n)
		}
		if f.held[r] != n {
			return fmt.Errorf("%s: the informer holds %d objects, its list selects %d", r, f.held[r], n)
		}
	}
	return nil
}

// scope is the one scope of the resource's verb requests.
func (f *controllerFootprint) scope(verb, r string) string {
	if c := f.calls[call{verb, r}]; c != nil {
		for sc := range c.scopes {
			return sc
		}
	}
	return ""
}

func (f *controllerFootprint) resources() []string {
	return slices.Sorted(func(yield func(string) bool) {
		for r := range f.held {
			if !yield(r) {
				return
			}
		}
	})
}

// totals are the watches, lists and objects held of every informer.
func (f *controllerFootprint) totals() (watches, lists, held int, objBytes int64) {
	for _, r := range f.resources() {
		watches += f.calls[call{"watch", r}].n
		lists += f.calls[call{"list", r}].n
		held += f.held[r]
		objBytes += f.objectBytes[r]
	}
	return watches, lists, held, objBytes
}

func (f *controllerFootprint) table() string {
	var sb strings.Builder
	w := tabwriter.NewWriter(&sb, 0, 4, 2, ' ', 0)
	fmt.Fprintln(w, "resource\twatches\tlists\tobjects held\tobjects' MiB\tmanagedFields\tscope")
	for _, r := range f.resources() {
		mf := "kept"
		switch {
		case f.stripped[r] && f.hadManagedFields[r]:
			mf = "dropped"
		case f.stripped[r]:
			mf = "none served"
		}
		fmt.Fprintf(w, "%s\t%d\t%d\t%d\t%.1f\t%s\t%s\n", r, f.calls[call{"watch", r}].n, f.calls[call{"list", r}].n, f.held[r], mib(f.objectBytes[r]), mf, f.scope("list", r))
	}
	watches, lists, held, objBytes := f.totals()
	fmt.Fprintf(w, "total\t%d\t%d\t%d\t%.1f\t\t\n", watches, lists, held, mib(objBytes))
	w.Flush()
	var other []string
	for _, k := range sortedCalls(f.calls) {
		if k.verb != "list" && k.verb != "watch" {
			other = append(other, fmt.Sprintf("%d %s %s", f.calls[k].n, k.verb, k.resource))
		}
	}
	if len(other) == 0 {
		other = []string{"none"}
	}
	fmt.Fprintf(&sb, "other requests to start: %s\n", strings.Join(other, ", "))
	fmt.Fprintf(&sb, "heap kept by the controller once synced: %.1f MiB (%d bytes, %.0f per object held); of it the objects %.1f MiB, the rest (keys, indexes, queues, fixed costs) %.1f MiB",
		mib(f.heapBytes), f.heapBytes, float64(f.heapBytes)/float64(max(held, 1)), mib(objBytes), mib(f.heapBytes-objBytes))
	return sb.String()
}

// placementTimes are the decision latencies of restores made at once.
type placementTimes struct {
	each []time.Duration // per restore, from its Create returning to its node's selection, sorted
	all  time.Duration   // from the first Create to the last selection
	// creates is from the first Create to the last Create's return.
	creates time.Duration
	calls   map[call]*calls // every request meanwhile, the Creates too
}

// percentile is the nearest-rank percentile p (0 < p <= 100).
func (t *placementTimes) percentile(p float64) time.Duration {
	i := int(math.Ceil(p/100*float64(len(t.each)))) - 1
	return t.each[max(i, 0)]
}

// measurePlacement creates n restores at once, of snapshots spread over the
// nodes, with the controller running, and times each until its node is
// selected. It fails when one is placed on another node than its
// snapshot's.
//
// A selection is timed when its update reaches the fake API server (a
// reactor sees the request just before the fake applies it); each restore
// is then checked in the fake's store.
func measurePlacement(tb testing.TB, s *bigCluster, m *apiMeter, n int) *placementTimes {
	tb.Helper()
	type restore struct {
		pvc     *corev1.PersistentVolumeClaim
		node    string
		created time.Time
	}
	restores := make([]restore, n)
	index := map[string]int{} // by namespace/name; read only once made
	for k := range restores {
		pvc, node := s.restore(k * len(s.nodes) / n)
		restores[k] = restore{pvc: pvc, node: node}
		index[pvc.Namespace+"/"+pvc.Name] = k
	}
	var mu sync.Mutex
	selected := make([]time.Time, n)
	s.core.PrependReactor("update", "persistentvolumeclaims", func(a k8stesting.Action) (bool, k8sruntime.Object, error) {
		pvc, ok := a.(k8stesting.UpdateAction).GetObject().(*corev1.PersistentVolumeClaim)
		if !ok || pvc.Annotations[AnnSelectedNode] == "" {
			return false, nil, nil
		}
		if k, ok := index[pvc.Namespace+"/"+pvc.Name]; ok {
			mu.Lock()
			selected[k] = time.Now() // the last try, should one conflict
			mu.Unlock()
		}
		return false, nil, nil
	})

	m.reset()
	ctx := context.Background()
	start := time.Now()
	for k := range restores {
		r := &restores[k]
		if _, err := s.core.CoreV1().PersistentVolumeClaims(r.pvc.Namespace).Create(ctx, r.pvc, metav1.CreateOptions{}); err != nil {
			tb.Fatal(err)
		}
		r.created = time.Now()
	}
	settle(tb, fmt.Sprintf("%d restores to be placed", n), func() bool {
		mu.Lock()
		pending := slices.ContainsFunc(selected, time.Time.IsZero)
		mu.Unlock()
		if pending {
			return false
		}
		for _, r := range restores {
			obj, err := s.core.Tracker().Get(pvcGVR, r.pvc.Namespace, r.pvc.Name)
			if err != nil {
				tb.Fatal(err)
			}
			switch got := obj.(*corev1.PersistentVolumeClaim).Annotations[AnnSelectedNode]; got {
			case r.node:
			case "":
				return false // its update conflicted; the retry comes
			default:
				tb.Fatalf("restore %s/%s of a snapshot on %s was placed on %s", r.pvc.Namespace, r.pvc.Name, r.node, got)
			}
		}
		return true
	})
	t := &placementTimes{calls: m.snapshot()}
	mu.Lock()
	defer mu.Unlock()
	last := start
	for k, r := range restores {
		t.each = append(t.each, selected[k].Sub(r.created))
		if selected[k].After(last) {
			last = selected[k]
		}
	}
	t.all = last.Sub(start)
	t.creates = restores[n-1].created.Sub(start)
	slices.Sort(t.each)
	// Each placement says so in an Event, in the background: let them all
	// be written before the controller's recorder stops.
	settle(tb, "the placements' Events", func() bool { return m.n("create", "events") >= n })
	return t
}

func (t *placementTimes) table() string {
	var sb strings.Builder
	w := tabwriter.NewWriter(&sb, 0, 4, 2, ' ', 0)
	fmt.Fprintln(w, "restores\tworkers\tp50\tp90\tmax\tall placed\tof which creating them")
	fmt.Fprintf(w, "%d\t%d\t%v\t%v\t%v\t%v\t%v\n", len(t.each), scaleWorkers, ms(t.percentile(50)), ms(t.percentile(90)), ms(t.each[len(t.each)-1]), ms(t.all), ms(t.creates))
	w.Flush()
	var req []string
	for _, k := range sortedCalls(t.calls) {
		req = append(req, fmt.Sprintf("%d %s %s", t.calls[k].n, k.verb, k.resource))
	}
	fmt.Fprintf(&sb, "requests until the last was placed (the restores' creates too; Events are written in the background): %s", strings.Join(req, ", "))
	return sb.String()
}

// ms rounds d to 10 µs, for a table.
func ms(d time.Duration) time.Duration { return d.Round(10 * time.Microsecond) }
