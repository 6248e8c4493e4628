package kube

import (
	"context"
	"slices"
	"sync"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
	dynfake "k8s.io/client-go/dynamic/fake"
	"k8s.io/client-go/kubernetes/fake"
	k8stesting "k8s.io/client-go/testing"

	"github.com/csi-dmthin/csi-dmthin/pkg/blockcopy"
	"github.com/csi-dmthin/csi-dmthin/pkg/thinpool"
)

// thinPoolCluster is a dynamic fake that counts the writes to ThinPools.
type thinPoolCluster struct {
	dyn *dynfake.FakeDynamicClient
	mu  sync.Mutex
	// statusWrites counts status patches by object name.
	statusWrites map[string]int
	creates      int
}

func newThinPoolCluster(t *testing.T, objs ...runtime.Object) *thinPoolCluster {
	t.Helper()
	c := &thinPoolCluster{statusWrites: map[string]int{}}
	c.dyn = dynfake.NewSimpleDynamicClientWithCustomListKinds(runtime.NewScheme(), map[schema.GroupVersionResource]string{ThinPoolGVR: "ThinPoolList"}, objs...)
	c.dyn.PrependReactor("patch", "thinpools", func(a k8stesting.Action) (bool, runtime.Object, error) {
		if a.GetSubresource() == "status" {
			c.mu.Lock()
			c.statusWrites[a.(k8stesting.PatchAction).GetName()]++
			c.mu.Unlock()
		}
		return false, nil, nil
	})
	c.dyn.PrependReactor("create", "thinpools", func(a k8stesting.Action) (bool, runtime.Object, error) {
		c.mu.Lock()
		c.creates++
		c.mu.Unlock()
		return false, nil, nil
	})
	return c
}

func (c *thinPoolCluster) writes(name string) int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.statusWrites[name]
}

func (c *thinPoolCluster) get(t *testing.T, name string) *ThinPool {
	t.Helper()
	u, err := c.dyn.Resource(ThinPoolGVR).Get(context.Background(), name, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	var tp ThinPool
	if err := runtime.DefaultUnstructuredConverter.FromUnstructured(u.Object, &tp); err != nil {
		t.Fatal(err)
	}
	return &tp
}

func thinPoolObject(node, pool string) *unstructured.Unstructured {
	u := &unstructured.Unstructured{}
	u.SetAPIVersion(ThinPoolGroup + "/" + ThinPoolVersion)
	u.SetKind(ThinPoolKind)
	u.SetName(ThinPoolName(node, pool))
	u.SetLabels(map[string]string{LabelThinPoolNode: node, LabelThinPoolPool: pool})
	_ = unstructured.SetNestedField(u.Object, node, "spec", "nodeName")
	_ = unstructured.SetNestedField(u.Object, pool, "spec", "pool")
	return u
}

// clock is a settable time.
type clock struct {
	mu  sync.Mutex
	now time.Time
}

func (c *clock) Now() time.Time { c.mu.Lock(); defer c.mu.Unlock(); return c.now }
func (c *clock) add(d time.Duration) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.now = c.now.Add(d)
}

func TestThinPoolWriter(t *testing.T) {
	ctx := context.Background()
	cl := newThinPoolCluster(t, thinPoolObject(nodeA, "old"), thinPoolObject(nodeB, "old"))
	core := fake.NewClientset(&corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: nodeA, UID: "node-a-uid"}})
	fast := &fakeUsage{}
	u := used(40, 10)
	u.Volumes, u.Snapshots, u.ProvisionedBytes, u.AvailableBytes, u.OverprovisionRatio = 3, 1, 250<<20, 20<<20, 10
	fast.set(u, nil)
	clk := &clock{now: time.Date(2026, 11, 30, 12, 0, 0, 0, time.UTC)}
	w, err := NewThinPoolWriter(ThinPoolWriterOptions{
		Client: cl.dyn, Core: core, Driver: driverName, Node: nodeA, Version: "1.2.3",
		Pools: map[string]UsageSource{"fast": fast}, Unconfigured: []string{"gone"},
		MinInterval: time.Minute, QPS: 1000, Burst: 1000, Now: clk.Now,
	})
	if err != nil {
		t.Fatal(err)
	}
	w.setOwner(ctx)
	if err := w.removeStale(ctx); err != nil {
		t.Fatal(err)
	}
	// This node's ThinPool of a pool it no longer has is gone; another
	// node's stays.
	if _, err := cl.dyn.Resource(ThinPoolGVR).Get(ctx, ThinPoolName(nodeA, "old"), metav1.GetOptions{}); !apierrors.IsNotFound(err) {
		t.Errorf("the stale ThinPool of this node: %v", err)
	}
	if _, err := cl.dyn.Resource(ThinPoolGVR).Get(ctx, ThinPoolName(nodeB, "old"), metav1.GetOptions{}); err != nil {
		t.Errorf("another node's ThinPool: %v", err)
	}

	w.sync(ctx, w.names())
	tp := cl.get(t, "node-a.fast")
	if tp.Spec != (ThinPoolSpec{NodeName: nodeA, Pool: "fast", Driver: driverName}) ||
		tp.Labels[LabelThinPoolNode] != nodeA || tp.Labels[LabelThinPoolPool] != "fast" ||
		len(tp.OwnerReferences) != 1 || tp.OwnerReferences[0].Kind != "Node" || tp.OwnerReferences[0].UID != "node-a-uid" {
		t.Errorf("ThinPool object %+v", tp.ObjectMeta)
	}
	st := tp.Status
	if st.Health != HealthHealthy || st.Mode != "rw" || st.Data.Size.String() != "100Mi" || st.Data.Used.String() != "40Mi" || st.Data.UsedPercent != 40 ||
		st.Metadata.UsedPercent != 10 || st.Volumes != 3 || st.Snapshots != 1 || st.Provisioned.String() != "250Mi" || st.Available.String() != "20Mi" ||
		st.Overprovisioning != "2.50" || st.OverprovisionLimit != "10.00" || st.DriverVersion != "1.2.3" || !st.UpdateTime.Time.Equal(clk.Now()) {
		t.Errorf("status %+v", st)
	}
	if g := cl.get(t, "node-a.gone").Status; g.Health != HealthNotConfigured || g.Message == "" {
		t.Errorf("a recorded pool not configured: %+v", g)
	}

	// Nothing changed: nothing written.
	w.sync(ctx, w.names())
	if n := cl.writes("node-a.fast"); n != 1 {
		t.Fatalf("%d writes after an unchanged look, want 1", n)
	}
	// Use alone changed: held back until MinInterval has passed.
	u.DataUsedBytes = 45 << 20
	fast.set(u, nil)
	clk.add(30 * time.Second)
	w.sync(ctx, []string{"fast"})
	if n := cl.writes("node-a.fast"); n != 1 {
		t.Fatalf("a change of use alone was written before MinInterval: %d writes", n)
	}
	clk.add(31 * time.Second)
	w.sync(ctx, []string{"fast"})
	if n := cl.writes("node-a.fast"); n != 2 || cl.get(t, "node-a.fast").Status.Data.UsedPercent != 45 {
		t.Fatalf("after MinInterval: %d writes, %+v", n, cl.get(t, "node-a.fast").Status.Data)
	}
	// A change of state is written at once; a kernel event is recorded.
	u.Mode, u.DataUsedBytes = thinpool.ModeOutOfDataSpace, 100<<20
	fast.set(u, nil)
	clk.add(time.Second)
	w.Wake("fast", true)
	w.sync(ctx, w.wake.take())
	st = cl.get(t, "node-a.fast").Status
	if cl.writes("node-a.fast") != 3 || st.Health != HealthOutOfDataSpace || st.LastEvent == nil || st.LastEvent.Reason != "ModeChanged" ||
		!st.LastEvent.Time.Time.Equal(clk.Now()) || st.Data.UsedPercent != 100 {
		t.Fatalf("after the pool filled: %d writes, %+v", cl.writes("node-a.fast"), st)
	}
	// A growth is recorded, written at once.
	u.Mode, u.DataBytes = thinpool.ModeReadWrite, 200<<20
	fast.set(u, nil)
	clk.add(time.Second)
	w.Wake("fast", false)
	w.sync(ctx, w.wake.take())
	st = cl.get(t, "node-a.fast").Status
	if st.LastGrowth == nil || st.LastGrowth.DataFrom.String() != "100Mi" || st.LastGrowth.DataTo.String() != "200Mi" || st.Health != HealthHealthy || st.LastEvent.Reason != "ModeChanged" {
		t.Fatalf("after growing: %+v", st)
	}
	// A status that cannot be read says so.
	fast.set(thinpool.Usage{}, thinpool.ErrClosed)
	w.sync(ctx, []string{"fast"})
	if st := cl.get(t, "node-a.fast").Status; st.Health != HealthUnreadable || st.Message == "" {
		t.Fatalf("an unreadable pool: %+v", st)
	}
	// Deleted under the writer: made again at the next write.
	if err := cl.dyn.Resource(ThinPoolGVR).Delete(ctx, "node-a.fast", metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	fast.set(u, nil)
	w.sync(ctx, []string{"fast"})
	if st := cl.get(t, "node-a.fast").Status; st.Health != HealthHealthy {
		t.Fatalf("after the object was deleted: %+v", st)
	}
}

// The node's writes share a token bucket: a burst of changes beyond it
// waits, and the retry writes the latest status.
func TestThinPoolWriterRateLimit(t *testing.T) {
	ctx := context.Background()
	cl := newThinPoolCluster(t)
	pools := map[string]UsageSource{}
	srcs := map[string]*fakeUsage{}
	for _, n := range []string{"a", "b", "c"} {
		srcs[n] = &fakeUsage{}
		srcs[n].set(used(10, 10), nil)
		pools[n] = srcs[n]
	}
	w, err := NewThinPoolWriter(ThinPoolWriterOptions{Client: cl.dyn, Driver: driverName, Node: nodeA, Pools: pools, QPS: 0.001, Burst: 2})
	if err != nil {
		t.Fatal(err)
	}
	w.sync(ctx, w.names())
	if got := cl.writes("node-a.a") + cl.writes("node-a.b") + cl.writes("node-a.c"); got != 2 {
		t.Fatalf("%d writes with a burst of 2", got)
	}
	if p := w.pendingNames(); len(p) != 1 || p[0] != "c" {
		t.Fatalf("pending %q, want [c]", p)
	}
}

// Run writes at start and on Wake, and stops with its context.
func TestThinPoolWriterRun(t *testing.T) {
	cl := newThinPoolCluster(t)
	src := &fakeUsage{}
	src.set(used(10, 10), nil)
	w, err := NewThinPoolWriter(ThinPoolWriterOptions{Client: cl.dyn, Driver: driverName, Node: nodeA, Pools: map[string]UsageSource{"p": src}})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { w.Run(ctx, time.Hour); close(done) }()
	waitFor(t, func() bool { return cl.writes("node-a.p") == 1 })
	bad := used(10, 10)
	bad.NeedsCheck, bad.Mode = true, thinpool.ModeReadOnly
	src.set(bad, nil)
	w.Wake("p", true)
	waitFor(t, func() bool { return cl.writes("node-a.p") == 2 })
	if st := cl.get(t, "node-a.p").Status; st.Health != HealthNeedsCheck || st.LastEvent == nil {
		t.Errorf("status %+v", st)
	}
	cancel()
	<-done
}

func waitFor(t *testing.T, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatal("timed out")
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func TestThinPoolName(t *testing.T) {
	if got := ThinPoolName("node-1.example.org", "fast"); got != "node-1.example.org.fast" {
		t.Errorf("name %q", got)
	}
	long := ""
	for len(long) < 250 {
		long += "abcdefghij."
	}
	long = long[:250]
	a, b := ThinPoolName(long, "pool-a"), ThinPoolName(long[:249]+"x", "pool-a")
	if len(a) > 253 || a == b || a[len(a)-len(".pool-a"):] != ".pool-a" {
		t.Errorf("long names %q, %q", a, b)
	}
	if nodeLabelValue(long) != "" || nodeLabelValue("node-a") != "node-a" {
		t.Error("node label values")
	}
}

// A write that keeps failing is retried less and less often.
func TestThinPoolWriterBacksOff(t *testing.T) {
	ctx := context.Background()
	cl := newThinPoolCluster(t)
	var attempts int
	cl.dyn.PrependReactor("create", "thinpools", func(k8stesting.Action) (bool, runtime.Object, error) {
		attempts++
		return true, nil, apierrors.NewForbidden(ThinPoolGVR.GroupResource(), "x", nil)
	})
	src := &fakeUsage{}
	src.set(used(10, 10), nil)
	clk := &clock{now: time.Unix(1000, 0)}
	w, err := NewThinPoolWriter(ThinPoolWriterOptions{Client: cl.dyn, Driver: driverName, Node: nodeA, Pools: map[string]UsageSource{"p": src}, QPS: 1000, Burst: 1000, Now: clk.Now})
	if err != nil {
		t.Fatal(err)
	}
	w.sync(ctx, w.names())
	// Once a second for 10 minutes: with backoff, a handful of tries.
	for range 600 {
		clk.add(time.Second)
		w.sync(ctx, w.pendingNames())
	}
	if attempts < 5 || attempts > 15 {
		t.Errorf("%d attempts in 10 minutes of failures, want a handful (1 s doubling to 5 min)", attempts)
	}
	// Once it succeeds, the next change is written at once.
	cl.dyn.ReactionChain = cl.dyn.ReactionChain[1:]
	clk.add(thinPoolMaxBackoff)
	w.sync(ctx, w.pendingNames())
	if cl.writes("node-a.p") != 1 {
		t.Fatalf("%d writes after the failures ended", cl.writes("node-a.p"))
	}
}

// The copy endpoint is published in every pool's status, a new one at
// once (a restart with a new pod IP, a new certificate), and one no longer
// served is removed, not left for other nodes to dial.
func TestThinPoolWriterCopyEndpoint(t *testing.T) {
	ctx := context.Background()
	// An earlier run published an endpoint this one no longer serves.
	stale := thinPoolObject(nodeA, "fast")
	if err := unstructured.SetNestedMap(stale.Object, map[string]any{"address": "10.0.0.9:9811", "certSHA256": "old"}, "status", "copy"); err != nil {
		t.Fatal(err)
	}
	cl := newThinPoolCluster(t, stale)
	pools := map[string]UsageSource{}
	for _, n := range []string{"fast", "slow"} {
		src := &fakeUsage{}
		src.set(used(10, 10), nil)
		pools[n] = src
	}
	clk := &clock{now: time.Unix(1000, 0)}
	first := &blockcopy.Endpoint{Address: "10.0.0.1:9811", CertSHA256: "aa"}
	w, err := NewThinPoolWriter(ThinPoolWriterOptions{Client: cl.dyn, Driver: driverName, Node: nodeA, Pools: pools,
		CopyEndpoint: first, MinInterval: time.Hour, QPS: 1000, Burst: 1000, Now: clk.Now})
	if err != nil {
		t.Fatal(err)
	}
	copyOf := func(pool string) *CopyEndpoint { return cl.get(t, ThinPoolName(nodeA, pool)).Status.Copy }

	w.sync(ctx, w.names())
	for _, p := range []string{"fast", "slow"} {
		if c := copyOf(p); c == nil || *c != (CopyEndpoint{Address: "10.0.0.1:9811", CertSHA256: "aa"}) {
			t.Errorf("pool %s: copy endpoint %+v, want this run's", p, c)
		}
	}
	// A new endpoint is a change of state: written at once, well within
	// MinInterval, for every pool, which SetCopyEndpoint wakes.
	clk.add(time.Second)
	w.SetCopyEndpoint(&blockcopy.Endpoint{Address: "10.0.0.1:9811", CertSHA256: "bb"})
	if woken := w.wake.take(); !slices.Equal(woken, []string{"fast", "slow"}) {
		t.Errorf("SetCopyEndpoint woke %q", woken)
	}
	w.sync(ctx, w.names())
	for _, p := range []string{"fast", "slow"} {
		if c := copyOf(p); c == nil || c.CertSHA256 != "bb" || c.Address != "10.0.0.1:9811" {
			t.Errorf("pool %s: copy endpoint %+v after a new certificate", p, c)
		}
		if n := cl.writes(ThinPoolName(nodeA, p)); n != 2 {
			t.Errorf("pool %s: %d writes, want 2", p, n)
		}
	}
	// Nothing changed: nothing written.
	w.sync(ctx, w.names())
	if n := cl.writes(ThinPoolName(nodeA, "fast")); n != 2 {
		t.Errorf("%d writes after an unchanged look", n)
	}

	// None served any more: removed from the object, not kept by the
	// merge patch.
	w.SetCopyEndpoint(nil)
	w.sync(ctx, w.wake.take())
	u, err := cl.dyn.Resource(ThinPoolGVR).Get(ctx, ThinPoolName(nodeA, "fast"), metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if c, found, _ := unstructured.NestedFieldNoCopy(u.Object, "status", "copy"); found {
		t.Errorf("the copy endpoint %v is still published", c)
	}
	if h, _, _ := unstructured.NestedString(u.Object, "status", "health"); h != HealthHealthy {
		t.Errorf("health %q after removing the endpoint", h)
	}
}

// A writer started without an endpoint removes the one an earlier run
// left.
func TestThinPoolWriterRemovesStaleCopyEndpoint(t *testing.T) {
	stale := thinPoolObject(nodeA, "fast")
	if err := unstructured.SetNestedMap(stale.Object, map[string]any{"address": "10.0.0.9:9811", "certSHA256": "old"}, "status", "copy"); err != nil {
		t.Fatal(err)
	}
	cl := newThinPoolCluster(t, stale)
	src := &fakeUsage{}
	src.set(used(10, 10), nil)
	w, err := NewThinPoolWriter(ThinPoolWriterOptions{Client: cl.dyn, Driver: driverName, Node: nodeA, Pools: map[string]UsageSource{"fast": src}})
	if err != nil {
		t.Fatal(err)
	}
	w.sync(context.Background(), w.names())
	if st := cl.get(t, ThinPoolName(nodeA, "fast")).Status; st.Copy != nil || st.Health != HealthHealthy {
		t.Errorf("status %+v: the stale copy endpoint is still there", st)
	}
}
