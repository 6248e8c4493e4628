package kube

import (
	"encoding/json"
	"fmt"
	"maps"
	"reflect"
	"runtime"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	groupv1 "github.com/kubernetes-csi/external-snapshotter/client/v8/apis/volumegroupsnapshot/v1"
	snapv1 "github.com/kubernetes-csi/external-snapshotter/client/v8/apis/volumesnapshot/v1"
	corev1 "k8s.io/api/core/v1"
	storagev1 "k8s.io/api/storage/v1"
	"k8s.io/apimachinery/pkg/api/meta"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/labels"
	k8sruntime "k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/apimachinery/pkg/watch"
	k8stesting "k8s.io/client-go/testing"

	"github.com/csi-dmthin/csi-dmthin/pkg/csi"
)

// The scale measurements' instruments: a meter of the requests the fakes
// serve, and the heap.

// call is a kind of request: its verb and resource ("thinpools/status" for
// a subresource).
type call struct{ verb, resource string }

// calls are the requests of one kind.
type calls struct {
	n int
	// scopes are the distinct scopes asked for: for a list or watch its
	// namespace and selectors (scopeOf), for a get, update, patch or
	// delete the object's namespace and name, for a create its namespace.
	scopes map[string]bool
	// objects is how many objects the lists served, after their label
	// selector, and owners those objects by the node they belong to
	// (nodeOf; "" for an object of no node).
	objects int
	owners  map[string]int
}

func (c *calls) clone() *calls {
	return &calls{n: c.n, scopes: maps.Clone(c.scopes), objects: c.objects, owners: maps.Clone(c.owners)}
}

// apiMeter counts every request the cluster's fakes serve, and serves
// every list through JSON.
type apiMeter struct {
	mu  sync.Mutex
	got map[call]*calls
}

// newAPIMeter puts the meter in front of the cluster's fakes (core,
// snapshot, dynamic). Its reactors decline each request after counting it,
// so the fakes' own handlers still serve it, except that a list is served
// through JSON: a fake's list returns deep copies that share their strings
// with the fake's own objects, which would hide most of a cache's memory.
func newAPIMeter(s *bigCluster) *apiMeter {
	m := &apiMeter{got: map[call]*calls{}}
	for _, f := range []struct {
		fake    *k8stesting.Fake
		tracker k8stesting.ObjectTracker
	}{{&s.core.Fake, s.core.Tracker()}, {&s.snap.Fake, s.snap.Tracker()}, {&s.dyn.Fake, s.dyn.Tracker()}} {
		f.fake.PrependReactor("list", "*", func(a k8stesting.Action) (bool, k8sruntime.Object, error) {
			l := a.(k8stesting.ListActionImpl)
			obj, err := f.tracker.List(l.GetResource(), l.GetKind(), l.GetNamespace(), l.ListOptions)
			if err != nil {
				return true, nil, err
			}
			if u, ok := obj.(*unstructured.UnstructuredList); ok && u.GetKind() == "" {
				// JSON needs the kind to decode an unstructured list.
				u.SetGroupVersionKind(l.GetKind().GroupVersion().WithKind(l.GetKind().Kind + "List"))
			}
			wire, err := overTheWire(obj)
			if err != nil {
				return true, nil, err
			}
			return true, wire, m.served(l, wire)
		})
		f.fake.PrependReactor("*", "*", func(a k8stesting.Action) (bool, k8sruntime.Object, error) {
			m.count(a)
			return false, nil, nil
		})
		f.fake.PrependWatchReactor("*", func(a k8stesting.Action) (bool, watch.Interface, error) {
			m.count(a)
			return false, nil, nil
		})
	}
	return m
}

func (m *apiMeter) reset() {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.got = map[call]*calls{}
}

func callOf(a k8stesting.Action) call {
	r := a.GetResource().Resource
	if sub := a.GetSubresource(); sub != "" {
		r += "/" + sub
	}
	return call{a.GetVerb(), r}
}

func (m *apiMeter) count(a k8stesting.Action) {
	sc := actionScope(a)
	m.mu.Lock()
	defer m.mu.Unlock()
	c := m.at(callOf(a))
	c.n++
	c.scopes[sc] = true
}

func (m *apiMeter) at(k call) *calls {
	c := m.got[k]
	if c == nil {
		c = &calls{scopes: map[string]bool{}, owners: map[string]int{}}
		m.got[k] = c
	}
	return c
}

// served counts the objects of list that l's label selector selects (the
// fake client filters the list by it after the meter serves it).
func (m *apiMeter) served(l k8stesting.ListActionImpl, list k8sruntime.Object) error {
	objs, err := meta.ExtractList(list)
	if err != nil {
		return err
	}
	sel := l.GetListRestrictions().Labels
	if sel == nil {
		sel = labels.Everything()
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	c := m.at(callOf(l))
	for _, o := range objs {
		a, err := meta.Accessor(o)
		if err != nil {
			return err
		}
		if sel.Matches(labels.Set(a.GetLabels())) {
			c.objects++
			c.owners[nodeOf(o)]++
		}
	}
	return nil
}

// snapshot is a copy of the counts so far.
func (m *apiMeter) snapshot() map[call]*calls {
	m.mu.Lock()
	defer m.mu.Unlock()
	out := map[call]*calls{}
	for k, c := range m.got {
		out[k] = c.clone()
	}
	return out
}

// n is how many requests of verb on resource were served so far.
func (m *apiMeter) n(verb, resource string) int {
	m.mu.Lock()
	defer m.mu.Unlock()
	if c := m.got[call{verb, resource}]; c != nil {
		return c.n
	}
	return 0
}

// since is what was counted in now and not in before.
func since(before, now map[call]*calls) map[call]*calls {
	out := map[call]*calls{}
	for k, c := range now {
		d := c.clone()
		if b := before[k]; b != nil {
			d.n -= b.n
			d.objects -= b.objects
			for o, n := range b.owners {
				if d.owners[o] -= n; d.owners[o] == 0 {
					delete(d.owners, o)
				}
			}
		}
		if d.n > 0 {
			out[k] = d
		}
	}
	return out
}

// sortedCalls orders calls by resource, then verb.
func sortedCalls[V any](m map[call]V) []call {
	ks := slices.Collect(maps.Keys(m))
	slices.SortFunc(ks, func(a, b call) int {
		if c := strings.Compare(a.resource, b.resource); c != 0 {
			return c
		}
		return strings.Compare(a.verb, b.verb)
	})
	return ks
}

// writeVerbs are the verbs that change something.
var writeVerbs = []string{"create", "update", "patch", "delete", "delete-collection"}

// nodeOf is the node an object belongs to by its own fields, "" for an
// object of none (a class) or of a kind the meter does not know.
func nodeOf(obj k8sruntime.Object) string {
	switch o := obj.(type) {
	case *corev1.Node:
		return o.Name
	case *corev1.PersistentVolume:
		return pvNode(o)
	case *corev1.PersistentVolumeClaim:
		return o.Annotations[AnnSelectedNode]
	case *storagev1.CSIStorageCapacity:
		if t := o.NodeTopology; t != nil && len(t.MatchLabels) == 1 && len(t.MatchExpressions) == 0 {
			return t.MatchLabels[csi.TopologyKey]
		}
	case *snapv1.VolumeSnapshotContent:
		return o.Labels[LabelManagedBy]
	case *groupv1.VolumeGroupSnapshotContent:
		return o.Labels[LabelManagedBy]
	case *unstructured.Unstructured:
		if o.GetKind() == ThinPoolKind {
			n, _, _ := unstructured.NestedString(o.Object, "spec", "nodeName")
			return n
		}
	}
	return ""
}

// actionScope names what a request asked for (see calls.scopes).
func actionScope(a k8stesting.Action) string {
	obj := func(ns, name string) string {
		if ns == "" {
			return name
		}
		return ns + "/" + name
	}
	switch a := a.(type) {
	case k8stesting.ListAction:
		r := a.GetListRestrictions()
		return scopeOf(a.GetNamespace(), r.Labels.String(), r.Fields.String())
	case k8stesting.WatchAction:
		r := a.GetWatchRestrictions()
		return scopeOf(a.GetNamespace(), r.Labels.String(), r.Fields.String())
	}
	switch a.GetVerb() {
	case "get":
		return obj(a.GetNamespace(), a.(k8stesting.GetAction).GetName())
	case "patch":
		return obj(a.GetNamespace(), a.(k8stesting.PatchAction).GetName())
	case "delete":
		return obj(a.GetNamespace(), a.(k8stesting.DeleteAction).GetName())
	case "update":
		if m, err := meta.Accessor(a.(k8stesting.UpdateAction).GetObject()); err == nil {
			return obj(a.GetNamespace(), m.GetName())
		}
	case "create":
		// An Event's name is made up: its namespace says more.
		if m, err := meta.Accessor(a.(k8stesting.CreateAction).GetObject()); err == nil && a.GetResource().Resource != "events" {
			return obj(a.GetNamespace(), m.GetName())
		}
	}
	return scopeOf(a.GetNamespace(), "", "")
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

// scopesOf prints a set of scopes, or their number when there are many.
func scopesOf(set map[string]bool) string {
	if len(set) > 3 {
		return fmt.Sprintf("%d objects", len(set))
	}
	return strings.Join(slices.Sorted(maps.Keys(set)), "; ")
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

func mib(b int64) float64 { return float64(b) / (1 << 20) }

// decodedBytes is the heap that the objects of resource in namespace ns
// ("" for all) matching the label selector sel take once decoded, each in
// its own allocation as a reflector stores them; without their
// managedFields when noManagedFields (as a cache that drops them keeps
// them).
func (s *bigCluster) decodedBytes(res, ns, sel string, noManagedFields bool) (int64, error) {
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
		if u, ok := list.(*unstructured.UnstructuredList); ok && u.GetKind() == "" {
			u.SetGroupVersionKind(k.gvk.GroupVersion().WithKind(k.gvk.Kind + "List"))
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
				if noManagedFields {
					m.SetManagedFields(nil)
				}
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

// settle waits until cond holds; a measurement that has not settled within
// scaleWait is broken, not slow.
func settle(tb testing.TB, what string, cond func() bool) {
	tb.Helper()
	deadline := time.Now().Add(scaleWait)
	for !cond() {
		if time.Now().After(deadline) {
			tb.Fatalf("%s: not within %v", what, scaleWait)
		}
		time.Sleep(5 * time.Millisecond)
	}
}
