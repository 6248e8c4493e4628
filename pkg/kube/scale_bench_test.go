package kube

import (
	"context"
	"encoding/json"
	"fmt"
	"maps"
	"reflect"
	"runtime"
	"slices"
	"strings"
	"sync"
	"testing"
	"text/tabwriter"
	"time"

	snapinformers "github.com/kubernetes-csi/external-snapshotter/client/v8/informers/externalversions"
	"k8s.io/apimachinery/pkg/api/meta"
	"k8s.io/apimachinery/pkg/labels"
	k8sruntime "k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/apimachinery/pkg/watch"
	"k8s.io/client-go/informers"
	k8stesting "k8s.io/client-go/testing"
	"k8s.io/client-go/tools/cache"
)

// What one node's Kubernetes side costs at scale (issue 12): the lists and
// watches it opens, the objects its informers keep and the heap they take,
// with the side wired as cmd/csi-dmthin's kubeSide.start wires it. Every
// node runs the same side, so the cluster's cost is one node's times the
// number of nodes; nothing here extrapolates.
//
//	go test -run '^$' -bench NodeScale -benchtime 1x ./pkg/kube

const (
	scaleNodes       = 1000
	scalePVCsPerNode = 10
	// scaleResync is cmd/csi-dmthin's informerResync.
	scaleResync = 10 * time.Minute
	// scaleWait bounds each wait for the side to settle: a side that has
	// not synced by then is broken, not slow.
	scaleWait = 5 * time.Minute
)

func BenchmarkNodeScale(b *testing.B) {
	s := scaleCluster(b, scaleNodes, scalePVCsPerNode)
	m := newAPIMeter(s)
	node := s.nodes[0]
	var f *footprint
	b.ResetTimer()
	for range b.N {
		f = measureNodeSide(b, s, m, node)
	}
	b.StopTimer()
	watches, lists, held := 0, 0, 0
	for _, r := range f.resources() {
		watches += f.watches[r]
		lists += f.lists[r]
		held += f.held[r]
	}
	b.ReportMetric(float64(watches), "watches/node")
	b.ReportMetric(float64(lists), "lists/node")
	b.ReportMetric(float64(held), "objects/node")
	b.ReportMetric(float64(f.heapBytes)/(1<<20), "heap-MiB/node")
	side, err := sidecarsOn(s, node)
	if err != nil {
		b.Fatal(err)
	}
	b.ReportMetric(float64(side), "sidecar-objects/node")
	// Once, to stdout: a benchmark's log is cut at ten lines.
	fmt.Printf("cluster: %d nodes, %d claims per node; seeded %s\n\n", len(s.nodes), scalePVCsPerNode, s.seededSummary())
	fmt.Printf("node %s's side, as kubeSide.start wires it:\n%s\n\n", node, f.table())
	fmt.Printf("the sidecars beside it on the same node, each informer counted as a list with its scope:\n%s\n", sidecarTable(s, node))
}

// TestNodeSideFootprint runs the measurement on a small cluster, so that
// plain `go test` keeps it working; its checks are the measurement's own.
func TestNodeSideFootprint(t *testing.T) {
	s := scaleCluster(t, 3, scaleRestoreOf)
	f := measureNodeSide(t, s, newAPIMeter(s), s.nodes[1])
	if len(f.resources()) == 0 {
		t.Fatal("the side watched nothing")
	}
	if _, err := sidecarsOn(s, s.nodes[1]); err != nil {
		t.Fatal(err)
	}
	t.Logf("\n%s", f.table())
}

// footprint is what one node's side asked of the API server and keeps.
type footprint struct {
	watches, lists map[string]int      // calls, by resource
	scopes         map[string][]string // the distinct scopes those calls asked for
	held           map[string]int      // objects in the started informers' stores
	served         map[string]int      // objects the side's list options select
	heapBytes      int64               // heap the side keeps once settled
	// objectBytes is, by resource, the heap of the objects alone, decoded
	// from a list with the side's scope: the rest of heapBytes is the
	// informers' keys and indexes, the queues and the fixed costs.
	objectBytes map[string]int64
}

// measureNodeSide builds node's side, waits until it has synced and
// settled, and measures it. The heap is measured against a baseline taken
// after seeding, so the fakes' own copies of the cluster are not counted;
// every list the side makes is served through JSON (newAPIMeter), so the
// side's objects share no memory with the fakes', as over the wire.
func measureNodeSide(tb testing.TB, s *bigCluster, m *apiMeter, node string) *footprint {
	tb.Helper()
	if b, ok := tb.(*testing.B); ok {
		b.StopTimer()
		defer b.StopTimer()
	}
	m.reset()
	writesBefore := writes(s)
	before := heapAfterGC()
	if b, ok := tb.(*testing.B); ok {
		b.StartTimer()
	}

	ctx, cancel := context.WithCancel(context.Background())
	rec, stopRecorder := NewRecorder(ctx, s.core, node)
	core := informers.NewSharedInformerFactory(s.core, scaleResync)
	snaps := snapinformers.NewSharedInformerFactory(s.snap, scaleResync)
	sink := NewPVCEvents(rec, core.Core().V1().PersistentVolumeClaims().Lister())
	owner := s.owner(node)
	p, err := NewPlacement(PlacementOptions{
		DriverName: driverName, NodeName: node, Owner: owner, Client: s.core, Recorder: rec,
		Informers: core, SnapshotInformers: snaps,
	})
	if err != nil {
		tb.Fatal(err)
	}
	adopter, err := NewAdopter(AdopterOptions{DriverName: driverName, NodeName: node, Owner: owner, Client: s.snap, Recorder: rec, Informers: snaps})
	if err != nil {
		tb.Fatal(err)
	}
	groups, err := NewGroupAdopter(GroupAdopterOptions{DriverName: driverName, NodeName: node, Owner: owner, Client: s.snap, Recorder: rec, Informers: snaps})
	if err != nil {
		tb.Fatal(err)
	}
	var wg sync.WaitGroup
	runs := map[string]func(context.Context, int) error{"adopter": adopter.Run, "group adopter": groups.Run}
	for name, run := range runs {
		wg.Go(func() {
			if err := run(ctx, 1); err != nil && ctx.Err() == nil {
				tb.Errorf("%s: %v", name, err)
			}
		})
	}
	core.Start(ctx.Done())
	snaps.Start(ctx.Done())
	wg.Go(func() {
		if err := p.Run(ctx, 2); err != nil && ctx.Err() == nil {
			tb.Errorf("placement: %v", err)
		}
	})
	defer func() {
		cancel()
		wg.Wait()
		core.Shutdown()
		snaps.Shutdown()
		stopRecorder()
	}()

	syncCtx, syncCancel := context.WithTimeout(ctx, scaleWait)
	defer syncCancel()
	started := map[reflect.Type]func(k8sruntime.Object) cache.SharedIndexInformer{}
	for t, ok := range core.WaitForCacheSync(syncCtx.Done()) {
		if !ok {
			tb.Fatalf("%v informer did not sync in %v", t, scaleWait)
		}
		started[t] = func(o k8sruntime.Object) cache.SharedIndexInformer { return core.InformerFor(o, nil) }
	}
	for t, ok := range snaps.WaitForCacheSync(syncCtx.Done()) {
		if !ok {
			tb.Fatalf("%v informer did not sync in %v", t, scaleWait)
		}
		started[t] = func(o k8sruntime.Object) cache.SharedIndexInformer { return snaps.InformerFor(o, nil) }
	}
	resources := map[string]reflect.Type{}
	for t := range started {
		resources[resourceOf(t)] = t
	}
	// A reflector opens its watch just after its list has filled the store.
	settle(tb, "every informer's watch", func() bool {
		m.mu.Lock()
		defer m.mu.Unlock()
		for r := range resources {
			if m.watches[r] == 0 {
				return false
			}
		}
		return true
	})
	settle(tb, "the controllers' queues to drain", func() bool {
		return p.queue.Len() == 0 && adopter.queue.Len() == 0 && groups.queue.Len() == 0
	})

	if b, ok := tb.(*testing.B); ok {
		b.StopTimer()
	}
	f := &footprint{held: map[string]int{}, served: map[string]int{}}
	f.watches, f.lists, f.scopes = m.snapshot()
	f.heapBytes = int64(heapAfterGC()) - int64(before)
	runtime.KeepAlive(sink)

	for r, t := range resources {
		f.held[r] = len(started[t](reflect.New(t.Elem()).Interface().(k8sruntime.Object)).GetStore().ListKeys())
	}
	if err := f.check(s, resources); err != nil {
		tb.Fatal(err)
	}
	f.objectBytes = map[string]int64{}
	for r := range resources {
		ns, labelSel, _ := splitScope(f.scopes[r][0])
		if f.objectBytes[r], err = s.decodedBytes(r, ns, labelSel); err != nil {
			tb.Fatal(err)
		}
	}
	// The seeded cluster leaves the side nothing to do: a write means the
	// seeding, not the side, is wrong.
	if w := writes(s); len(w) != len(writesBefore) {
		tb.Fatalf("the side wrote on a cluster where nothing waits for it: %v", w[len(writesBefore):])
	}
	return f
}

// check holds the counts to what was seeded: every informer watches and
// lists once, holds exactly what its list selects, and a list without a
// selector selects every seeded object of its resource.
func (f *footprint) check(s *bigCluster, resources map[string]reflect.Type) error {
	for r := range f.watches {
		if _, ok := resources[r]; !ok {
			return fmt.Errorf("%s watched, but no started informer holds it", r)
		}
	}
	for r := range resources {
		scopes := f.scopes[r]
		if len(scopes) != 1 {
			return fmt.Errorf("%s listed and watched with %d scopes %q: count each informer on its own", r, len(scopes), scopes)
		}
		ns, labelSel, fieldSel := splitScope(scopes[0])
		if fieldSel != "" {
			return fmt.Errorf("%s listed with field selector %q, which the fake ignores: count it by hand", r, fieldSel)
		}
		n, err := s.served(r, ns, labelSel)
		if err != nil {
			return err
		}
		f.served[r] = n
		if ns == "" && labelSel == "" && s.seeded[r] != nil && n != s.seeded[r].n {
			return fmt.Errorf("%s: a list of all serves %d, but %d were seeded", r, n, s.seeded[r].n)
		}
		if f.held[r] != n {
			return fmt.Errorf("%s: the informer holds %d objects, its list selects %d", r, f.held[r], n)
		}
		if f.lists[r] != 1 || f.watches[r] != 1 {
			return fmt.Errorf("%s: %d lists and %d watches, want one of each: a relist or rewatch would skew the counts", r, f.lists[r], f.watches[r])
		}
	}
	return nil
}

func (f *footprint) resources() []string {
	var rs []string
	for r := range f.held {
		rs = append(rs, r)
	}
	slices.Sort(rs)
	return rs
}

func (f *footprint) table() string {
	var sb strings.Builder
	w := tabwriter.NewWriter(&sb, 0, 4, 2, ' ', 0)
	fmt.Fprintln(w, "resource\twatches\tlists\tobjects held\tobjects' MiB\tscope")
	watches, lists, held, objBytes := 0, 0, 0, int64(0)
	for _, r := range f.resources() {
		fmt.Fprintf(w, "%s\t%d\t%d\t%d\t%.1f\t%s\n", r, f.watches[r], f.lists[r], f.held[r], mib(f.objectBytes[r]), strings.Join(f.scopes[r], "; "))
		watches, lists, held, objBytes = watches+f.watches[r], lists+f.lists[r], held+f.held[r], objBytes+f.objectBytes[r]
	}
	fmt.Fprintf(w, "total\t%d\t%d\t%d\t%.1f\t\n", watches, lists, held, mib(objBytes))
	w.Flush()
	fmt.Fprintf(&sb, "heap kept by the side once synced: %.1f MiB (%d bytes, %.0f per object held); of it the objects %.1f MiB, the rest (keys, indexes, queues, fixed costs) %.1f MiB",
		mib(f.heapBytes), f.heapBytes, float64(f.heapBytes)/float64(max(held, 1)), mib(objBytes), mib(f.heapBytes-objBytes))
	return sb.String()
}

// sidecarInformer is one informer a sidecar of the chart's DaemonSet opens
// on each node, read from the sidecar's source (file and line at its
// release tag): its resource and scope.
type sidecarInformer struct {
	sidecar, resource string
	namespace, labels string // "" for all; labels may name the node as %[1]s
	where             string
	leaderOnly        bool // runs on the one elected node, not on every node
}

var sidecarInformers = []sidecarInformer{
	{sidecar: "csi-provisioner v6.4.0", resource: "persistentvolumeclaims", where: "cmd/csi-provisioner/csi-provisioner.go:303,397"},
	{sidecar: "csi-provisioner v6.4.0", resource: "storageclasses", where: "cmd/csi-provisioner/csi-provisioner.go:309,539"},
	{sidecar: "csi-provisioner v6.4.0", resource: "persistentvolumes", where: "sig-storage-lib-external-provisioner v13.1.0 controller/controller.go:710,755"},
	{sidecar: "csi-provisioner v6.4.0", resource: "storageclasses", where: "sig-storage-lib-external-provisioner v13.1.0 controller/controller.go:710,765"},
	{sidecar: "csi-provisioner v6.4.0", resource: "volumesnapshots", where: "pkg/controller/snapshot_finalizer_controller.go:62-73, cmd/csi-provisioner/csi-provisioner.go:613"},
	{sidecar: "csi-provisioner v6.4.0", resource: "csistoragecapacities", namespace: scaleNamespace,
		labels: "csi.storage.k8s.io/drivername=" + driverName + ",csi.storage.k8s.io/managed-by=external-provisioner-%[1]s", where: "cmd/csi-provisioner/csi-provisioner.go:515-526"},
	{sidecar: "csi-snapshotter v8.7.0", resource: "volumesnapshotcontents", labels: LabelManagedBy + "=%[1]s", where: "cmd/csi-snapshotter/main.go:161-162,298"},
	{sidecar: "csi-snapshotter v8.7.0", resource: "volumesnapshotclasses", where: "cmd/csi-snapshotter/main.go:153,299"},
	{sidecar: "csi-snapshotter v8.7.0", resource: "volumegroupsnapshotcontents", labels: LabelManagedBy + "=%[1]s", where: "cmd/csi-snapshotter/main.go:290"},
	{sidecar: "csi-snapshotter v8.7.0", resource: "volumegroupsnapshotclasses", labels: LabelManagedBy + "=%[1]s", where: "cmd/csi-snapshotter/main.go:291"},
	{sidecar: "csi-resizer v2.3.0", resource: "persistentvolumes", where: "pkg/controller/controller.go:95", leaderOnly: true},
	{sidecar: "csi-resizer v2.3.0", resource: "persistentvolumeclaims", where: "pkg/controller/controller.go:96", leaderOnly: true},
	{sidecar: "csi-resizer v2.3.0", resource: "pods", where: "pkg/controller/controller.go:135, cmd/csi-resizer/main.go:84", leaderOnly: true},
}

// sidecarsOn is how many objects the sidecars' informers hold on node, on
// every node (the elected resizer's are not counted).
func sidecarsOn(s *bigCluster, node string) (int, error) {
	n := 0
	for _, i := range sidecarInformers {
		if i.leaderOnly {
			continue
		}
		c, err := s.served(i.resource, i.namespace, sidecarLabels(i, node))
		if err != nil {
			return 0, err
		}
		n += c
	}
	return n, nil
}

func sidecarLabels(i sidecarInformer, node string) string {
	if i.labels == "" {
		return ""
	}
	return fmt.Sprintf(i.labels, node)
}

func sidecarTable(s *bigCluster, node string) string {
	var sb strings.Builder
	w := tabwriter.NewWriter(&sb, 0, 4, 2, ' ', 0)
	fmt.Fprintln(w, "sidecar\tresource\twatches\tobjects held\tscope\tsource")
	for _, i := range sidecarInformers {
		held := "not seeded"
		if s.seeded[i.resource] != nil {
			n, err := s.served(i.resource, i.namespace, sidecarLabels(i, node))
			if err != nil {
				held = err.Error()
			} else {
				held = fmt.Sprint(n)
			}
		}
		who := i.sidecar
		if i.leaderOnly {
			who += " (elected node only)"
		}
		fmt.Fprintf(w, "%s\t%s\t1\t%s\t%s\t%s\n", who, i.resource, held, scopeOf(i.namespace, sidecarLabels(i, node), ""), i.where)
	}
	w.Flush()
	return sb.String()
}

// apiMeter counts the lists and watches the fakes serve, by resource and
// scope, and serves every list through JSON.
type apiMeter struct {
	mu             sync.Mutex
	watches, lists map[string]int
	scopes         map[string]map[string]bool
}

// newAPIMeter puts the meter in front of the cluster's fakes. Its
// reactors decline each call after counting it, so the fakes' own
// handlers still serve it, except that a list is served through JSON: a
// fake's list returns deep copies that share their strings with the
// fake's objects, which would hide most of a cache's memory.
func newAPIMeter(s *bigCluster) *apiMeter {
	m := &apiMeter{}
	m.reset()
	for _, f := range []struct {
		fake    *k8stesting.Fake
		tracker k8stesting.ObjectTracker
	}{{&s.core.Fake, s.core.Tracker()}, {&s.snap.Fake, s.snap.Tracker()}} {
		f.fake.PrependReactor("list", "*", func(a k8stesting.Action) (bool, k8sruntime.Object, error) {
			l := a.(k8stesting.ListActionImpl)
			obj, err := f.tracker.List(l.GetResource(), l.GetKind(), l.GetNamespace(), l.ListOptions)
			if err != nil {
				return true, nil, err
			}
			wire, err := overTheWire(obj)
			return true, wire, err
		})
		f.fake.PrependReactor("list", "*", func(a k8stesting.Action) (bool, k8sruntime.Object, error) {
			m.count(m.lists, a)
			return false, nil, nil
		})
		f.fake.PrependWatchReactor("*", func(a k8stesting.Action) (bool, watch.Interface, error) {
			m.count(m.watches, a)
			return false, nil, nil
		})
	}
	return m
}

func (m *apiMeter) reset() {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.watches, m.lists, m.scopes = map[string]int{}, map[string]int{}, map[string]map[string]bool{}
}

func (m *apiMeter) count(calls map[string]int, a k8stesting.Action) {
	r := a.GetResource().Resource
	var sc string
	switch a := a.(type) {
	case k8stesting.ListAction:
		r := a.GetListRestrictions()
		sc = scopeOf(a.GetNamespace(), r.Labels.String(), r.Fields.String())
	case k8stesting.WatchAction:
		r := a.GetWatchRestrictions()
		sc = scopeOf(a.GetNamespace(), r.Labels.String(), r.Fields.String())
	default:
		sc = fmt.Sprintf("unknown: %T", a)
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	calls[r]++
	if m.scopes[r] == nil {
		m.scopes[r] = map[string]bool{}
	}
	m.scopes[r][sc] = true
}

func (m *apiMeter) snapshot() (watches, lists map[string]int, scopes map[string][]string) {
	m.mu.Lock()
	defer m.mu.Unlock()
	scopes = map[string][]string{}
	for r, set := range m.scopes {
		for sc := range set {
			scopes[r] = append(scopes[r], sc)
		}
		slices.Sort(scopes[r])
	}
	return maps.Clone(m.watches), maps.Clone(m.lists), scopes
}

// scopeOf names a list's or watch's scope: "all" objects of the resource,
// or a namespace, then the selectors; splitScope reads it back.
func scopeOf(ns, labels, fields string) string {
	if ns == "" {
		ns = "all"
	}
	sc := ns
	if labels != "" {
		sc += " | labels " + labels
	}
	if fields != "" {
		sc += " | fields " + fields
	}
	return sc
}

func splitScope(sc string) (ns, labels, fields string) {
	parts := strings.Split(sc, " | ")
	if ns = parts[0]; ns == "all" {
		ns = ""
	}
	for _, p := range parts[1:] {
		if v, ok := strings.CutPrefix(p, "labels "); ok {
			labels = v
		} else if v, ok := strings.CutPrefix(p, "fields "); ok {
			fields = v
		}
	}
	return ns, labels, fields
}

// overTheWire is obj encoded and decoded again, sharing nothing with it.
func overTheWire(obj k8sruntime.Object) (k8sruntime.Object, error) {
	data, err := json.Marshal(obj)
	if err != nil {
		return nil, err
	}
	out := reflect.New(reflect.TypeOf(obj).Elem()).Interface().(k8sruntime.Object)
	return out, json.Unmarshal(data, out)
}

// resourceOf names the resource of an informer's object type
// (*v1.PersistentVolumeClaim: persistentvolumeclaims) as the fakes do.
func resourceOf(t reflect.Type) string {
	gvr, _ := meta.UnsafeGuessKindToResource(schema.GroupVersionKind{Kind: t.Elem().Name()})
	return gvr.Resource
}

// writes are the requests that changed something, on both fakes, as
// "verb resource".
func writes(s *bigCluster) []string {
	var w []string
	for _, a := range append(s.core.Actions(), s.snap.Actions()...) {
		switch a.GetVerb() {
		case "create", "update", "patch", "delete":
			w = append(w, a.GetVerb()+" "+a.GetResource().Resource)
		}
	}
	return w
}

func mib(b int64) float64 { return float64(b) / (1 << 20) }

// decodedBytes is the heap that the objects of resource in namespace ns
// ("" for all) matching the label selector sel take once decoded, each in
// its own allocation as a reflector stores them.
func (s *bigCluster) decodedBytes(res, ns, sel string) (int64, error) {
	k := s.seeded[res]
	if k == nil {
		return 0, nil
	}
	selector, err := labels.Parse(sel)
	if err != nil {
		return 0, err
	}
	before := heapAfterGC()
	items, err := func() ([]k8sruntime.Object, error) {
		list, err := k.tracker.List(k.gvr, k.gvk, ns)
		if err != nil {
			return nil, err
		}
		if list, err = overTheWire(list); err != nil {
			return nil, err
		}
		all, err := meta.ExtractListWithAlloc(list)
		if err != nil {
			return nil, err
		}
		var items []k8sruntime.Object
		for _, o := range all {
			if m, err := meta.Accessor(o); err == nil && selector.Matches(labels.Set(m.GetLabels())) {
				items = append(items, o)
			}
		}
		return items, nil
	}()
	if err != nil {
		return 0, err
	}
	b := int64(heapAfterGC()) - int64(before)
	runtime.KeepAlive(items)
	return b, nil
}

func heapAfterGC() uint64 {
	runtime.GC()
	runtime.GC() // the first runs the finalizers that keep some garbage alive
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	return ms.HeapAlloc
}

func settle(tb testing.TB, what string, cond func() bool) {
	tb.Helper()
	deadline := time.Now().Add(scaleWait)
	for !cond() {
		if time.Now().After(deadline) {
			tb.Fatalf("%s: not within %v", what, scaleWait)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func (s *bigCluster) seededSummary() string {
	var rs []string
	for r := range s.seeded {
		rs = append(rs, r)
	}
	slices.Sort(rs)
	var parts []string
	for _, r := range rs {
		parts = append(parts, fmt.Sprintf("%d %s", s.seeded[r].n, r))
	}
	return strings.Join(parts, ", ")
}
