package kube

import (
	"context"
	"fmt"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	groupv1 "github.com/kubernetes-csi/external-snapshotter/client/v8/apis/volumegroupsnapshot/v1"
	snapv1 "github.com/kubernetes-csi/external-snapshotter/client/v8/apis/volumesnapshot/v1"
	snapfake "github.com/kubernetes-csi/external-snapshotter/client/v8/clientset/versioned/fake"
	corev1 "k8s.io/api/core/v1"
	storagev1 "k8s.io/api/storage/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/apimachinery/pkg/types"
	dynamicfake "k8s.io/client-go/dynamic/fake"
	"k8s.io/client-go/kubernetes/fake"
	k8stesting "k8s.io/client-go/testing"
	"k8s.io/client-go/tools/cache"
	"k8s.io/client-go/tools/record"
	"k8s.io/client-go/tools/reference"
	"k8s.io/client-go/util/workqueue"

	"github.com/csi-dmthin/csi-dmthin/pkg/csi"
)

// The cluster the tests run against: client-go's fake clientset, made to
// keep resourceVersions on PVCs the way the API server does (the fake
// tracker alone lets every stale update through), and the snapshot
// client's fake.

const (
	driverName = csi.DefaultDriverName
	nodeA      = "node-a"
	nodeB      = "node-b"
	ns         = "db"
)

var pvcGVR = corev1.SchemeGroupVersion.WithResource("persistentvolumeclaims")

type cluster struct {
	core *fake.Clientset
	snap *snapfake.Clientset
	dyn  *dynamicfake.FakeDynamicClient // ThinPools
	rv   atomic.Int64
	mu   sync.Mutex // makes the resourceVersion check and the write one step
}

func newCluster(tb testing.TB) *cluster {
	tb.Helper()
	c := &cluster{
		core: fake.NewClientset(), snap: snapfake.NewSimpleClientset(),
		dyn: dynamicfake.NewSimpleDynamicClientWithCustomListKinds(runtime.NewScheme(), map[schema.GroupVersionResource]string{ThinPoolGVR: ThinPoolKind + "List"}),
	}
	c.rv.Store(100)
	for _, n := range []string{nodeA, nodeB} {
		if err := c.core.Tracker().Add(&corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: n}}); err != nil {
			tb.Fatal(err)
		}
	}
	c.core.PrependReactor("create", "persistentvolumeclaims", func(a k8stesting.Action) (bool, runtime.Object, error) {
		pvc := a.(k8stesting.CreateAction).GetObject().(*corev1.PersistentVolumeClaim).DeepCopy()
		if pvc.UID == "" {
			pvc.UID = types.UID("uid-" + pvc.Name)
		}
		pvc.ResourceVersion = fmt.Sprint(c.rv.Add(1))
		return true, pvc, c.core.Tracker().Create(pvcGVR, pvc, pvc.Namespace)
	})
	c.core.PrependReactor("update", "persistentvolumeclaims", func(a k8stesting.Action) (bool, runtime.Object, error) {
		c.mu.Lock()
		defer c.mu.Unlock()
		pvc := a.(k8stesting.UpdateAction).GetObject().(*corev1.PersistentVolumeClaim).DeepCopy()
		cur, err := c.core.Tracker().Get(pvcGVR, pvc.Namespace, pvc.Name)
		if err != nil {
			return true, nil, err
		}
		if have := cur.(*corev1.PersistentVolumeClaim).ResourceVersion; pvc.ResourceVersion != have {
			return true, nil, apierrors.NewConflict(pvcGVR.GroupResource(), pvc.Name, fmt.Errorf("resourceVersion %s, stored %s", pvc.ResourceVersion, have))
		}
		pvc.ResourceVersion = fmt.Sprint(c.rv.Add(1))
		return true, pvc, c.core.Tracker().Update(pvcGVR, pvc, pvc.Namespace)
	})
	return c
}

// pvcUpdates counts the PVC updates sent so far (successful or not).
func (c *cluster) pvcUpdates() int {
	return countActions(c.core.Actions(), "update", "persistentvolumeclaims")
}

// countActions counts the requests of one verb on one resource.
func countActions(actions []k8stesting.Action, verb, resource string) int {
	n := 0
	for _, a := range actions {
		if a.GetVerb() == verb && a.GetResource().Resource == resource {
			n++
		}
	}
	return n
}

func (c *cluster) pvc(t *testing.T, name string) *corev1.PersistentVolumeClaim {
	t.Helper()
	pvc, err := c.core.CoreV1().PersistentVolumeClaims(ns).Get(context.Background(), name, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	return pvc
}

func (c *cluster) create(t *testing.T, objs ...runtime.Object) {
	t.Helper()
	ctx := context.Background()
	for _, o := range objs {
		var err error
		switch o := o.(type) {
		case *corev1.PersistentVolumeClaim:
			_, err = c.core.CoreV1().PersistentVolumeClaims(o.Namespace).Create(ctx, o, metav1.CreateOptions{})
		case *corev1.PersistentVolume:
			_, err = c.core.CoreV1().PersistentVolumes().Create(ctx, o, metav1.CreateOptions{})
		case *corev1.Node:
			_, err = c.core.CoreV1().Nodes().Create(ctx, o, metav1.CreateOptions{})
		case *storagev1.StorageClass:
			_, err = c.core.StorageV1().StorageClasses().Create(ctx, o, metav1.CreateOptions{})
		case *snapv1.VolumeSnapshot:
			_, err = c.snap.SnapshotV1().VolumeSnapshots(o.Namespace).Create(ctx, o, metav1.CreateOptions{})
		case *snapv1.VolumeSnapshotContent:
			_, err = c.snap.SnapshotV1().VolumeSnapshotContents().Create(ctx, o, metav1.CreateOptions{})
		case *groupv1.VolumeGroupSnapshotContent:
			_, err = c.snap.GroupsnapshotV1().VolumeGroupSnapshotContents().Create(ctx, o, metav1.CreateOptions{})
		case *groupv1.VolumeGroupSnapshotClass:
			_, err = c.snap.GroupsnapshotV1().VolumeGroupSnapshotClasses().Create(ctx, o, metav1.CreateOptions{})
		default:
			t.Fatalf("create %T", o)
		}
		if err != nil {
			t.Fatal(err)
		}
	}
}

// ctl is the cluster's controller over the fake cluster, with its
// informers started and synced. Its workers run only when run is true;
// otherwise tests call the controllers' sync themselves.
type ctl struct {
	c   *Controller
	p   *Placement
	rec *eventLog
}

func startController(t *testing.T, c *cluster, run bool) *ctl {
	t.Helper()
	return startControllerWith(t, c, run, false)
}

// startControllerWith is startController with copies across nodes on or
// off.
func startControllerWith(t *testing.T, c *cluster, run, copyAcrossNodes bool) *ctl {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	rec := &eventLog{}
	ctrl, err := NewController(ControllerOptions{
		DriverName: driverName, Client: c.core, Snapshots: c.snap, GroupSnapshots: true, ThinPools: c.dyn, Recorder: rec,
		CopyAcrossNodes: copyAcrossNodes,
		RateLimiter: func() workqueue.TypedRateLimiter[string] {
			return workqueue.NewTypedItemExponentialFailureRateLimiter[string](5*time.Millisecond, 50*time.Millisecond)
		},
	})
	if err != nil {
		t.Fatal(err)
	}
	ctrl.start(ctx)
	done := make(chan struct{})
	go func() {
		defer close(done)
		if run {
			if err := ctrl.Run(ctx, 2); err != nil && ctx.Err() == nil {
				t.Errorf("Run: %v", err)
			}
		}
	}()
	t.Cleanup(func() {
		cancel()
		<-done
		ctrl.core.Shutdown()
		ctrl.snaps.Shutdown()
		ctrl.pools.Shutdown()
	})
	syncCtx, syncCancel := context.WithTimeout(ctx, 10*time.Second)
	defer syncCancel()
	if !cache.WaitForCacheSync(syncCtx.Done(), ctrl.synced()...) {
		t.Fatal("caches did not sync")
	}
	return &ctl{c: ctrl, p: ctrl.Placement, rec: rec}
}

// sync runs placement's decision for one PVC, after waiting until the
// cache holds the PVC as the API server has it now (the informers are
// asynchronous; the tests want the decision on current state).
func (n *ctl) sync(t *testing.T, c *cluster, pvc string) bool {
	t.Helper()
	n.waitCache(t, c, pvc)
	retry, err := n.p.sync(context.Background(), ns+"/"+pvc)
	if err != nil {
		t.Fatalf("sync %s: %v", pvc, err)
	}
	return retry
}

func (n *ctl) waitCache(t *testing.T, c *cluster, pvc string) {
	t.Helper()
	want := c.pvc(t, pvc).ResourceVersion
	eventually(t, fmt.Sprintf("the cache to reach %s@%s", pvc, want), func() bool {
		got, err := n.p.view.pvcs.PersistentVolumeClaims(ns).Get(pvc)
		return err == nil && got.ResourceVersion == want
	})
}

// events returns the Events the controller recorded since the last call.
func (n *ctl) events() []string { return n.rec.take() }

// eventLog is an EventRecorder that keeps each Event as
// "<type> <reason> <kind>/<namespace>/<name>@<uid>: <message>", the
// object named the way the real recorder names it (through the scheme).
type eventLog struct {
	mu  sync.Mutex
	got []string
}

var _ record.EventRecorder = (*eventLog)(nil)

func (l *eventLog) Event(obj runtime.Object, eventtype, reason, message string) {
	ref, err := reference.GetReference(EventScheme, obj)
	if err != nil {
		// The real recorder drops such an Event: a test that records
		// one fails.
		panic(fmt.Sprintf("an Event on an object the recorder cannot name (%T): %v", obj, err))
	}
	what := fmt.Sprintf("%s/%s/%s@%s", ref.Kind, ref.Namespace, ref.Name, ref.UID)
	l.mu.Lock()
	defer l.mu.Unlock()
	l.got = append(l.got, eventtype+" "+reason+" "+what+": "+message)
}

func (l *eventLog) Eventf(obj runtime.Object, eventtype, reason, format string, args ...any) {
	l.Event(obj, eventtype, reason, fmt.Sprintf(format, args...))
}

func (l *eventLog) AnnotatedEventf(obj runtime.Object, _ map[string]string, eventtype, reason, format string, args ...any) {
	l.Eventf(obj, eventtype, reason, format, args...)
}

func (l *eventLog) take() []string {
	l.mu.Lock()
	defer l.mu.Unlock()
	out := l.got
	l.got = nil
	return out
}

func eventually(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// Objects.

func ptr[T any](v T) *T { return &v }

func class(name, provisioner string, mode storagev1.VolumeBindingMode) *storagev1.StorageClass {
	return &storagev1.StorageClass{ObjectMeta: metav1.ObjectMeta{Name: name}, Provisioner: provisioner, VolumeBindingMode: &mode}
}

var (
	wffc      = class("dmthin", driverName, storagev1.VolumeBindingWaitForFirstConsumer)
	immediate = class("dmthin-now", driverName, storagev1.VolumeBindingImmediate)
	foreign   = class("other", "ebs.csi.aws.com", storagev1.VolumeBindingWaitForFirstConsumer)
)

// claim is a pending PVC. Its CreationTimestamp is zero, so it counts as
// long past goneGrace: a source missing now is gone.
func claim(name, className string, src *corev1.TypedLocalObjectReference) *corev1.PersistentVolumeClaim {
	pvc := &corev1.PersistentVolumeClaim{
		ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: ns},
		Spec: corev1.PersistentVolumeClaimSpec{
			StorageClassName: ptr(className),
			AccessModes:      []corev1.PersistentVolumeAccessMode{corev1.ReadWriteOnce},
			Resources:        corev1.VolumeResourceRequirements{Requests: corev1.ResourceList{corev1.ResourceStorage: resource.MustParse("1Gi")}},
			DataSource:       src,
		},
		Status: corev1.PersistentVolumeClaimStatus{Phase: corev1.ClaimPending},
	}
	if src != nil {
		pvc.Spec.DataSourceRef = &corev1.TypedObjectReference{APIGroup: src.APIGroup, Kind: src.Kind, Name: src.Name}
	}
	return pvc
}

func fromSnapshot(name string) *corev1.TypedLocalObjectReference {
	return &corev1.TypedLocalObjectReference{APIGroup: ptr(snapshotGroup), Kind: "VolumeSnapshot", Name: name}
}

func fromClaim(name string) *corev1.TypedLocalObjectReference {
	return &corev1.TypedLocalObjectReference{Kind: "PersistentVolumeClaim", Name: name}
}

// snapshot is a VolumeSnapshot bound to content (bound false: not yet).
func snapshot(name, content string, bound bool) *snapv1.VolumeSnapshot {
	vs := &snapv1.VolumeSnapshot{
		ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: ns},
		Spec:       snapv1.VolumeSnapshotSpec{Source: snapv1.VolumeSnapshotSource{PersistentVolumeClaimName: ptr("src")}},
	}
	if bound {
		vs.Status = &snapv1.VolumeSnapshotStatus{BoundVolumeSnapshotContentName: ptr(content), ReadyToUse: ptr(true)}
	}
	return vs
}

// content is a VolumeSnapshotContent of our driver with handle, labelled
// managed-by managedBy when that is set.
func content(name, snap, handle, managedBy string) *snapv1.VolumeSnapshotContent {
	vsc := &snapv1.VolumeSnapshotContent{
		ObjectMeta: metav1.ObjectMeta{Name: name},
		Spec: snapv1.VolumeSnapshotContentSpec{
			Driver:            driverName,
			VolumeSnapshotRef: corev1.ObjectReference{Kind: "VolumeSnapshot", Namespace: ns, Name: snap},
			Source:            snapv1.VolumeSnapshotContentSource{VolumeHandle: ptr("alpha/pvc-src")},
		},
		Status: &snapv1.VolumeSnapshotContentStatus{SnapshotHandle: ptr(handle), ReadyToUse: ptr(true)},
	}
	if managedBy != "" {
		vsc.Labels = map[string]string{LabelManagedBy: managedBy}
	}
	return vsc
}

// volume is a PV of driverName with handle on node, bound to claim.
func volume(name, handle, node, claimName string) *corev1.PersistentVolume {
	return &corev1.PersistentVolume{
		ObjectMeta: metav1.ObjectMeta{Name: name},
		Spec: corev1.PersistentVolumeSpec{
			PersistentVolumeSource: corev1.PersistentVolumeSource{CSI: &corev1.CSIPersistentVolumeSource{Driver: driverName, VolumeHandle: handle}},
			ClaimRef:               &corev1.ObjectReference{Namespace: ns, Name: claimName},
			NodeAffinity: &corev1.VolumeNodeAffinity{Required: &corev1.NodeSelector{NodeSelectorTerms: []corev1.NodeSelectorTerm{{
				MatchExpressions: []corev1.NodeSelectorRequirement{{Key: csi.TopologyKey, Operator: corev1.NodeSelectorOpIn, Values: []string{node}}},
			}}}},
		},
	}
}

// boundClaim is a source PVC bound to pv.
func boundClaim(name, pv string) *corev1.PersistentVolumeClaim {
	pvc := claim(name, wffc.Name, nil)
	pvc.Spec.VolumeName = pv
	pvc.Status.Phase = corev1.ClaimBound
	return pvc
}

// setThinPool creates or replaces the ThinPool of pool on node with the
// given health and available space, and waits until the controller's
// cache has it.
func (c *cluster) setThinPool(t *testing.T, n *ctl, node, pool, health, available string) {
	t.Helper()
	tp := &ThinPool{
		TypeMeta:   metav1.TypeMeta{APIVersion: ThinPoolGVR.GroupVersion().String(), Kind: ThinPoolKind},
		ObjectMeta: metav1.ObjectMeta{Name: ThinPoolName(node, pool)},
		Spec:       ThinPoolSpec{NodeName: node, Pool: pool, Driver: driverName},
		Status:     ThinPoolStatus{Health: health, Available: resource.MustParse(available)},
	}
	obj, err := runtime.DefaultUnstructuredConverter.ToUnstructured(tp)
	if err != nil {
		t.Fatal(err)
	}
	u := &unstructured.Unstructured{Object: obj}
	ctx := context.Background()
	res := c.dyn.Resource(ThinPoolGVR)
	if _, err := res.Get(ctx, tp.Name, metav1.GetOptions{}); apierrors.IsNotFound(err) {
		_, err = res.Create(ctx, u, metav1.CreateOptions{})
		if err != nil {
			t.Fatal(err)
		}
	} else if _, err := res.Update(ctx, u, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	eventually(t, "ThinPool "+tp.Name+" in the cache", func() bool {
		got, err := n.c.View.pools.Get(tp.Name)
		if err != nil {
			return false
		}
		st, _, _ := unstructured.NestedString(got.(*unstructured.Unstructured).Object, "status", "health")
		av, _, _ := unstructured.NestedString(got.(*unstructured.Unstructured).Object, "status", "available")
		return st == health && av == available
	})
}
