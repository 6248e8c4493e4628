package kube

import (
	"context"
	"fmt"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	groupv1 "github.com/kubernetes-csi/external-snapshotter/client/v8/apis/volumegroupsnapshot/v1"
	snapv1 "github.com/kubernetes-csi/external-snapshotter/client/v8/apis/volumesnapshot/v1"
	snapfake "github.com/kubernetes-csi/external-snapshotter/client/v8/clientset/versioned/fake"
	snapinformers "github.com/kubernetes-csi/external-snapshotter/client/v8/informers/externalversions"
	corev1 "k8s.io/api/core/v1"
	storagev1 "k8s.io/api/storage/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes/fake"
	"k8s.io/client-go/kubernetes/scheme"
	k8stesting "k8s.io/client-go/testing"
	"k8s.io/client-go/tools/cache"
	"k8s.io/client-go/tools/record"
	"k8s.io/client-go/tools/reference"
	"k8s.io/client-go/util/workqueue"

	"github.com/csi-dmthin/csi-dmthin/pkg/csi"
	"github.com/csi-dmthin/csi-dmthin/pkg/thinpool"
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
	rv   atomic.Int64
	mu   sync.Mutex // makes the resourceVersion check and the write one step
}

func newCluster(tb testing.TB) *cluster {
	tb.Helper()
	c := &cluster{core: fake.NewClientset(), snap: snapfake.NewSimpleClientset()}
	c.rv.Store(100)
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

// fakeOwner is one node's driver as placement sees it.
type fakeOwner struct {
	mu        sync.Mutex
	volumes   map[string]bool
	snapshots map[string]bool
	groups    map[string]bool
	room      error // what RoomFor says for anything held
}

// owning holds ids: group snapshots when they say "group", snapshots when
// they say "snap", else volumes.
func owning(ids ...string) *fakeOwner {
	o := &fakeOwner{volumes: map[string]bool{}, snapshots: map[string]bool{}, groups: map[string]bool{}}
	for _, id := range ids {
		switch {
		case strings.Contains(id, "group"):
			o.groups[id] = true
		case strings.Contains(id, "snap"):
			o.snapshots[id] = true
		default:
			o.volumes[id] = true
		}
	}
	return o
}

func (o *fakeOwner) HasGroupSnapshot(id string) bool {
	o.mu.Lock()
	defer o.mu.Unlock()
	return o.groups[id]
}

func (o *fakeOwner) HasVolume(id string) bool {
	o.mu.Lock()
	defer o.mu.Unlock()
	return o.volumes[id]
}

func (o *fakeOwner) HasSnapshot(id string) bool {
	o.mu.Lock()
	defer o.mu.Unlock()
	return o.snapshots[id]
}

func (o *fakeOwner) RoomFor(id string, _ int64) error {
	o.mu.Lock()
	defer o.mu.Unlock()
	if !o.volumes[id] && !o.snapshots[id] {
		return fmt.Errorf("%s: %w", id, thinpool.ErrNotFound)
	}
	return o.room
}

func (o *fakeOwner) setRoom(err error) {
	o.mu.Lock()
	defer o.mu.Unlock()
	o.room = err
}

var _ Owner = (*fakeOwner)(nil)

// node is one node's placement controller over the shared cluster, with
// its informers started and synced. Its workers run only when run is true;
// otherwise tests call sync themselves.
type node struct {
	name string
	p    *Placement
	rec  *eventLog
}

func startNode(t *testing.T, c *cluster, name string, owner Owner, run bool) *node {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	core := informers.NewSharedInformerFactory(c.core, 0)
	snaps := snapinformers.NewSharedInformerFactory(c.snap, 0)
	rec := &eventLog{}
	p, err := NewPlacement(PlacementOptions{
		DriverName: driverName, NodeName: name, Owner: owner, Client: c.core, Recorder: rec,
		Informers: core, SnapshotInformers: snaps,
		RateLimiter: workqueue.NewTypedItemExponentialFailureRateLimiter[string](5*time.Millisecond, 50*time.Millisecond),
	})
	if err != nil {
		t.Fatal(err)
	}
	core.Start(ctx.Done())
	snaps.Start(ctx.Done())
	done := make(chan struct{})
	go func() {
		defer close(done)
		if run {
			if err := p.Run(ctx, 2); err != nil && ctx.Err() == nil {
				t.Errorf("Run: %v", err)
			}
		}
	}()
	t.Cleanup(func() {
		cancel()
		<-done
		core.Shutdown()
		snaps.Shutdown()
	})
	syncCtx, syncCancel := context.WithTimeout(ctx, 10*time.Second)
	defer syncCancel()
	if !cache.WaitForCacheSync(syncCtx.Done(), p.synced...) {
		t.Fatal("caches did not sync")
	}
	return &node{name: name, p: p, rec: rec}
}

// sync runs the controller's decision for one PVC, after waiting until the
// node's cache holds the PVC as the API server has it now (the informers
// are asynchronous; the tests want the decision on current state).
func (n *node) sync(t *testing.T, c *cluster, pvc string) bool {
	t.Helper()
	n.waitCache(t, c, pvc)
	retry, err := n.p.sync(context.Background(), ns+"/"+pvc)
	if err != nil {
		t.Fatalf("%s: sync %s: %v", n.name, pvc, err)
	}
	return retry
}

func (n *node) waitCache(t *testing.T, c *cluster, pvc string) {
	t.Helper()
	want := c.pvc(t, pvc).ResourceVersion
	eventually(t, fmt.Sprintf("%s's cache to reach %s@%s", n.name, pvc, want), func() bool {
		got, err := n.p.pvcs.PersistentVolumeClaims(ns).Get(pvc)
		return err == nil && got.ResourceVersion == want
	})
}

// events returns the Events the node recorded since the last call.
func (n *node) events() []string { return n.rec.take() }

// eventLog is an EventRecorder that keeps each Event as
// "<type> <reason> <kind>/<namespace>/<name>@<uid>: <message>", the
// object named the way the real recorder names it (through the scheme).
type eventLog struct {
	mu  sync.Mutex
	got []string
}

var _ record.EventRecorder = (*eventLog)(nil)

func (l *eventLog) Event(obj runtime.Object, eventtype, reason, message string) {
	ref, err := reference.GetReference(scheme.Scheme, obj)
	what := fmt.Sprintf("unreferenceable %T: %v", obj, err)
	if err == nil {
		what = fmt.Sprintf("%s/%s/%s@%s", ref.Kind, ref.Namespace, ref.Name, ref.UID)
	}
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
