package kube

import (
	"fmt"
	"maps"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	groupv1 "github.com/kubernetes-csi/external-snapshotter/client/v8/apis/volumegroupsnapshot/v1"
	snapv1 "github.com/kubernetes-csi/external-snapshotter/client/v8/apis/volumesnapshot/v1"
	snapscheme "github.com/kubernetes-csi/external-snapshotter/client/v8/clientset/versioned/scheme"
	corev1 "k8s.io/api/core/v1"
	storagev1 "k8s.io/api/storage/v1"
	"k8s.io/apimachinery/pkg/api/meta"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/kubernetes/scheme"
	k8stesting "k8s.io/client-go/testing"

	"github.com/csi-dmthin/csi-dmthin/pkg/csi"
	"github.com/csi-dmthin/csi-dmthin/pkg/thinpool"
)

// A cluster at the scale of issue 12, for measuring what one node's side
// asks of the API server, what the cluster's controller lists, watches and
// keeps, and how fast it places restores. Every node holds the same number
// of bound claims of our driver, their volumes, one snapshot of each
// (labelled for the node, as distributed snapshotting labels them, and
// with a handle that names the node, as the driver makes them) and the
// ThinPool of its pool; a few nodes hold a group snapshot. Objects carry
// what the API server would serve for them (annotations, finalizers,
// managedFields, status), so that a cache's memory is that of a real
// cluster's objects and not of skeletons.

const (
	scaleNamespace = "csi-dmthin" // the driver's: the CSIStorageCapacity objects
	scalePool      = "alpha"
	scaleClass     = "dmthin"       // our WaitForFirstConsumer class, every claim's
	scaleClassXFS  = "dmthin-xfs"   // our second class: capacity is published for it too
	scaleGroups    = 5              // nodes holding a group snapshot, at most
	scaleSnapClass = "dmthin-snaps" // our VolumeSnapshotClass
	scaleGroupCls  = "dmthin-group" // our VolumeGroupSnapshotClass
	scaleRestoreOf = 5              // every 5th claim of a node is a restore of the one before
)

// scaleTime is every seeded object's creation time: well past goneGrace.
var scaleTime = metav1.NewTime(time.Date(2026, 1, 5, 9, 0, 0, 0, time.UTC))

// bigCluster is a seeded cluster and what it holds.
type bigCluster struct {
	*cluster
	nodes []string
	// volumes are the CSI IDs of each node's volumes.
	volumes map[string][]string
	seeded  map[string]*seededKind // by resource, "persistentvolumeclaims"
	// restores counts the restore claims made so far, for unique names.
	restores int
}

// seededKind is one resource of the seeded cluster: where it is kept and
// how many objects it has.
type seededKind struct {
	tracker k8stesting.ObjectTracker
	gvr     schema.GroupVersionResource
	gvk     schema.GroupVersionKind
	n       int
}

// scaleCluster seeds a cluster of nodes nodes with pvcsPerNode bound claims
// each. The objects go straight into the fakes' trackers: no action is
// recorded and no watch event sent, so what a measurement counts
// afterwards is its own.
func scaleCluster(tb testing.TB, nodes, pvcsPerNode int) *bigCluster {
	tb.Helper()
	s := &bigCluster{
		cluster: newCluster(tb),
		volumes: map[string][]string{}, seeded: map[string]*seededKind{},
	}
	add := func(obj runtime.Object) {
		if err := s.add(obj); err != nil {
			tb.Fatalf("seeding %T: %v", obj, err)
		}
	}
	add(s.storageClass(scaleClass, driverName, map[string]string{"csi.storage.k8s.io/fstype": "ext4", csi.ParamPool: scalePool}, 0))
	add(s.storageClass(scaleClassXFS, driverName, map[string]string{"csi.storage.k8s.io/fstype": "xfs", csi.ParamPool: scalePool}, 1))
	add(s.storageClass("standard", "ebs.csi.aws.com", map[string]string{"type": "gp3"}, 2))
	for k, c := range []struct{ name, driver string }{{scaleSnapClass, driverName}, {"other-snaps", "ebs.csi.aws.com"}} {
		c := &snapv1.VolumeSnapshotClass{ObjectMeta: s.meta(c.name, "", 'k', 0, k), Driver: c.driver, DeletionPolicy: snapv1.VolumeSnapshotContentDelete}
		c.ManagedFields = []metav1.ManagedFieldsEntry{helmManaged("snapshot.storage.k8s.io/v1", `"f:deletionPolicy":{},"f:driver":{}`)}
		add(c)
	}
	for i := range nodes {
		node := fmt.Sprintf("node-%04d", i)
		s.nodes = append(s.nodes, node)
		add(s.node(node, i))
		add(s.thinPool(node, i))
		for k, class := range []string{scaleClass, scaleClassXFS} {
			add(s.capacity(node, class, i, k))
		}
		ns := fmt.Sprintf("team-%02d", i%50)
		for j := range pvcsPerNode {
			c := s.claim(node, ns, i, j)
			add(c)
			add(s.volume(node, c, i, j))
			vs := s.snapshot(c, i, j)
			add(vs)
			add(s.content(node, c, vs, i, j))
		}
		if i < scaleGroups && pvcsPerNode >= 2 {
			add(s.groupContent(node, i))
		}
	}
	if nodes > 0 {
		// Labelled for the first node: the last to take a group snapshot of
		// it (see GroupAdopter).
		cls := &groupv1.VolumeGroupSnapshotClass{ObjectMeta: s.meta(scaleGroupCls, "", 'g', 0, 0), Driver: driverName, DeletionPolicy: snapv1.VolumeSnapshotContentDelete}
		cls.Labels = map[string]string{LabelManagedBy: s.nodes[0]}
		cls.ManagedFields = []metav1.ManagedFieldsEntry{
			helmManaged("groupsnapshot.storage.k8s.io/v1", `"f:deletionPolicy":{},"f:driver":{}`),
			managed(Component+"-controller", "groupsnapshot.storage.k8s.io/v1", `{"f:metadata":{"f:labels":{"f:snapshot.storage.kubernetes.io/managed-by":{}}}}`, false),
		}
		add(cls)
	}
	other := &groupv1.VolumeGroupSnapshotClass{ObjectMeta: s.meta("other-group", "", 'g', 0, 1), Driver: "ebs.csi.aws.com", DeletionPolicy: snapv1.VolumeSnapshotContentDelete}
	other.ManagedFields = []metav1.ManagedFieldsEntry{helmManaged("groupsnapshot.storage.k8s.io/v1", `"f:deletionPolicy":{},"f:driver":{}`)}
	add(other)
	return s
}

// add puts obj into the tracker of its API group and counts it.
func (s *bigCluster) add(obj runtime.Object) error {
	var tracker k8stesting.ObjectTracker
	var gvk schema.GroupVersionKind
	switch obj.(type) {
	case *unstructured.Unstructured: // a ThinPool
		tracker, gvk = s.dyn.Tracker(), obj.GetObjectKind().GroupVersionKind()
	case *snapv1.VolumeSnapshot, *snapv1.VolumeSnapshotContent, *snapv1.VolumeSnapshotClass,
		*groupv1.VolumeGroupSnapshotContent, *groupv1.VolumeGroupSnapshotClass:
		tracker = s.snap.Tracker()
		gvks, _, err := snapscheme.Scheme.ObjectKinds(obj)
		if err != nil {
			return err
		}
		gvk = gvks[0]
	default:
		tracker = s.core.Tracker()
		gvks, _, err := scheme.Scheme.ObjectKinds(obj)
		if err != nil {
			return err
		}
		gvk = gvks[0]
	}
	gvr, _ := meta.UnsafeGuessKindToResource(gvk) // as the tracker names it
	k := s.seeded[gvr.Resource]
	if k == nil {
		k = &seededKind{tracker: tracker, gvr: gvr, gvk: gvk}
		s.seeded[gvr.Resource] = k
	}
	if err := tracker.Add(obj); err != nil {
		return err
	}
	k.n++
	return nil
}

// served is how many objects of resource a list in namespace ns ("" for
// all) with the label selector sel returns: what an informer with those
// options holds once synced.
func (s *bigCluster) served(res, ns, sel string) (int, error) {
	k := s.seeded[res]
	if k == nil {
		return 0, nil
	}
	selector, err := labels.Parse(sel)
	if err != nil {
		return 0, err
	}
	list, err := k.tracker.List(k.gvr, k.gvk, ns)
	if err != nil {
		return 0, err
	}
	objs, err := meta.ExtractList(list)
	if err != nil {
		return 0, err
	}
	n := 0
	for _, o := range objs {
		m, err := meta.Accessor(o)
		if err != nil {
			return 0, err
		}
		if selector.Matches(labels.Set(m.GetLabels())) {
			n++
		}
	}
	return n, nil
}

// meta is an object's metadata with a UID made of kind, i and j (unique per
// kind) and a resourceVersion from the cluster's sequence.
func (s *bigCluster) meta(name, ns string, kind byte, i, j int) metav1.ObjectMeta {
	return metav1.ObjectMeta{
		Name: name, Namespace: ns, UID: scaleUID(kind, i, j),
		ResourceVersion:   strconv.FormatInt(s.rv.Add(1), 10),
		CreationTimestamp: scaleTime,
	}
}

func scaleUID(kind byte, i, j int) types.UID {
	return types.UID(fmt.Sprintf("%08x-%04x-4000-8000-%012x", i, kind, j))
}

// helmManaged is the managedFields entry of a class Helm installed, with
// its labels and the top-level fields given (FieldsV1 JSON, unbraced).
func helmManaged(apiVersion, fields string) metav1.ManagedFieldsEntry {
	return managed("helm", apiVersion, `{"f:metadata":{"f:labels":{".":{},"f:app.kubernetes.io/managed-by":{},"f:app.kubernetes.io/name":{}}},`+fields+`}`, false)
}

// managed is a managedFields entry of manager, written with an update (of
// the status subresource when status is set); fields is its FieldsV1 JSON.
func managed(manager, apiVersion, fields string, status bool) metav1.ManagedFieldsEntry {
	e := metav1.ManagedFieldsEntry{
		Manager: manager, Operation: metav1.ManagedFieldsOperationUpdate, APIVersion: apiVersion,
		Time: &scaleTime, FieldsType: "FieldsV1", FieldsV1: &metav1.FieldsV1{Raw: []byte(fields)},
	}
	if status {
		e.Subresource = "status"
	}
	return e
}

// storageClass is a WaitForFirstConsumer class as the chart makes it; the
// first (k 0) is the default class.
func (s *bigCluster) storageClass(name, provisioner string, params map[string]string, k int) *storagev1.StorageClass {
	c := class(name, provisioner, storagev1.VolumeBindingWaitForFirstConsumer)
	c.ObjectMeta = s.meta(name, "", 'C', 0, k)
	c.Labels = map[string]string{"app.kubernetes.io/name": "csi-dmthin", "app.kubernetes.io/managed-by": "Helm"}
	if k == 0 {
		c.Annotations = map[string]string{"storageclass.kubernetes.io/is-default-class": "true"}
	}
	c.Parameters = params
	c.ReclaimPolicy = ptr(corev1.PersistentVolumeReclaimDelete)
	c.AllowVolumeExpansion = ptr(true)
	c.ManagedFields = []metav1.ManagedFieldsEntry{helmManaged("storage.k8s.io/v1", `"f:allowVolumeExpansion":{},"f:parameters":{".":{},"f:csi.storage.k8s.io/fstype":{},"f:pool":{}},"f:provisioner":{},"f:reclaimPolicy":{},"f:volumeBindingMode":{}`)}
	return c
}

// node is a Node as the kubelet reports it, without its image list.
func (s *bigCluster) node(name string, i int) *corev1.Node {
	n := &corev1.Node{ObjectMeta: s.meta(name, "", 'n', i, 0)}
	n.Labels = map[string]string{
		"kubernetes.io/hostname": name, "kubernetes.io/os": "linux", "kubernetes.io/arch": "amd64",
		"beta.kubernetes.io/os": "linux", "beta.kubernetes.io/arch": "amd64",
		"topology.kubernetes.io/zone": fmt.Sprintf("zone-%d", i%3), csi.TopologyKey: name,
	}
	n.Annotations = map[string]string{
		"node.alpha.kubernetes.io/ttl":                           "0",
		"volumes.kubernetes.io/controller-managed-attach-detach": "true",
		"csi.volume.kubernetes.io/nodeid":                        fmt.Sprintf(`{%q:%q}`, driverName, name),
	}
	n.Spec.PodCIDR = fmt.Sprintf("10.%d.%d.0/24", 64+i/256, i%256)
	n.Spec.PodCIDRs = []string{n.Spec.PodCIDR}
	res := corev1.ResourceList{
		corev1.ResourceCPU: resource.MustParse("16"), corev1.ResourceMemory: resource.MustParse("64Gi"),
		corev1.ResourcePods: resource.MustParse("110"), corev1.ResourceEphemeralStorage: resource.MustParse("200Gi"),
	}
	n.Status.Capacity, n.Status.Allocatable = res, res.DeepCopy()
	for _, c := range []corev1.NodeConditionType{corev1.NodeMemoryPressure, corev1.NodeDiskPressure, corev1.NodePIDPressure, corev1.NodeReady} {
		st := corev1.ConditionFalse
		if c == corev1.NodeReady {
			st = corev1.ConditionTrue
		}
		n.Status.Conditions = append(n.Status.Conditions, corev1.NodeCondition{
			Type: c, Status: st, LastHeartbeatTime: scaleTime, LastTransitionTime: scaleTime, Reason: "Kubelet" + string(c), Message: "kubelet reports " + string(c) + " " + string(st),
		})
	}
	n.Status.Addresses = []corev1.NodeAddress{{Type: corev1.NodeInternalIP, Address: fmt.Sprintf("10.0.%d.%d", i/256, i%256)}, {Type: corev1.NodeHostName, Address: name}}
	n.Status.NodeInfo = corev1.NodeSystemInfo{
		MachineID: string(scaleUID('m', i, 0)), SystemUUID: string(scaleUID('u', i, 0)), BootID: string(scaleUID('b', i, 0)),
		KernelVersion: "6.8.0-45-generic", OSImage: "Ubuntu 24.04.1 LTS", ContainerRuntimeVersion: "containerd://1.7.22",
		KubeletVersion: "v1.34.1", OperatingSystem: "linux", Architecture: "amd64",
	}
	return n
}

// capacity is the CSIStorageCapacity the node's csi-provisioner publishes
// for one of our classes.
func (s *bigCluster) capacity(node, class string, i, k int) *storagev1.CSIStorageCapacity {
	c := &storagev1.CSIStorageCapacity{ObjectMeta: s.meta(fmt.Sprintf("csisc-%08x%d", i, k), scaleNamespace, 'p', i, k)}
	c.Labels = map[string]string{"csi.storage.k8s.io/drivername": driverName, "csi.storage.k8s.io/managed-by": "external-provisioner-" + node}
	c.OwnerReferences = []metav1.OwnerReference{{APIVersion: "apps/v1", Kind: "DaemonSet", Name: "csi-dmthin-node-default", UID: scaleUID('d', 0, 0), Controller: ptr(true)}}
	c.NodeTopology = &metav1.LabelSelector{MatchLabels: map[string]string{csi.TopologyKey: node}}
	c.StorageClassName = class
	c.Capacity = ptr(resource.MustParse("812Gi"))
	c.MaximumVolumeSize = ptr(resource.MustParse("900Gi"))
	return c
}

// claim is the jth claim on node: made from a StatefulSet's template,
// placed by the scheduler, provisioned and bound; every scaleRestoreOf-th
// is a restore of the previous claim's snapshot.
func (s *bigCluster) claim(node, ns string, i, j int) *corev1.PersistentVolumeClaim {
	name := fmt.Sprintf("data-db-%04d-%d", i, j)
	c := boundClaim(name, "")
	c.ObjectMeta = s.meta(name, ns, 'c', i, j)
	c.Spec.VolumeName = "pvc-" + string(c.UID)
	c.Labels = map[string]string{"app.kubernetes.io/name": "db", "app.kubernetes.io/instance": fmt.Sprintf("db-%04d", i), "app.kubernetes.io/component": "storage"}
	c.Annotations = map[string]string{
		"pv.kubernetes.io/bind-completed":               "yes",
		"pv.kubernetes.io/bound-by-controller":          "yes",
		"volume.beta.kubernetes.io/storage-provisioner": driverName,
		"volume.kubernetes.io/storage-provisioner":      driverName,
		AnnSelectedNode: node,
	}
	c.Finalizers = []string{"kubernetes.io/pvc-protection"}
	c.ManagedFields = []metav1.ManagedFieldsEntry{
		managed("kube-controller-manager", "v1", `{"f:metadata":{"f:labels":{".":{},"f:app.kubernetes.io/component":{},"f:app.kubernetes.io/instance":{},"f:app.kubernetes.io/name":{}}},"f:spec":{"f:accessModes":{},"f:resources":{"f:requests":{".":{},"f:storage":{}}},"f:storageClassName":{},"f:volumeMode":{}}}`, false),
		managed("kube-scheduler", "v1", `{"f:metadata":{"f:annotations":{".":{},"f:volume.kubernetes.io/selected-node":{}}}}`, false),
		managed("kube-controller-manager", "v1", `{"f:metadata":{"f:annotations":{"f:pv.kubernetes.io/bind-completed":{},"f:pv.kubernetes.io/bound-by-controller":{},"f:volume.beta.kubernetes.io/storage-provisioner":{},"f:volume.kubernetes.io/storage-provisioner":{}}},"f:spec":{"f:volumeName":{}}}`, false),
		managed("kube-controller-manager", "v1", `{"f:status":{"f:accessModes":{},"f:capacity":{".":{},"f:storage":{}},"f:phase":{}}}`, true),
	}
	c.Spec.StorageClassName = ptr(scaleClass)
	c.Spec.VolumeMode = ptr(corev1.PersistentVolumeFilesystem)
	c.Spec.Resources.Requests[corev1.ResourceStorage] = resource.MustParse("10Gi")
	if j%scaleRestoreOf == scaleRestoreOf-1 {
		src := fromSnapshot(fmt.Sprintf("snap-data-db-%04d-%d", i, j-1))
		c.Spec.DataSource = src
		c.Spec.DataSourceRef = &corev1.TypedObjectReference{APIGroup: src.APIGroup, Kind: src.Kind, Name: src.Name}
	}
	c.Status.AccessModes = c.Spec.AccessModes
	c.Status.Capacity = corev1.ResourceList{corev1.ResourceStorage: resource.MustParse("10Gi")}
	return c
}

// volume is the PV the node's csi-provisioner made for c.
func (s *bigCluster) volume(node string, c *corev1.PersistentVolumeClaim, i, j int) *corev1.PersistentVolume {
	handle := scalePool + "/" + c.Spec.VolumeName
	s.volumes[node] = append(s.volumes[node], handle)
	v := volume(c.Spec.VolumeName, handle, node, c.Name)
	v.ObjectMeta = s.meta(c.Spec.VolumeName, "", 'v', i, j)
	v.Annotations = map[string]string{"pv.kubernetes.io/provisioned-by": driverName, "volume.kubernetes.io/provisioner-deletion-secret-name": "", "volume.kubernetes.io/provisioner-deletion-secret-namespace": ""}
	v.Finalizers = []string{"external-provisioner.volume.kubernetes.io/finalizer", "kubernetes.io/pv-protection"}
	v.ManagedFields = []metav1.ManagedFieldsEntry{
		managed("csi-provisioner", "v1", `{"f:metadata":{"f:annotations":{".":{},"f:pv.kubernetes.io/provisioned-by":{},"f:volume.kubernetes.io/provisioner-deletion-secret-name":{},"f:volume.kubernetes.io/provisioner-deletion-secret-namespace":{}},"f:finalizers":{".":{},"v:\"external-provisioner.volume.kubernetes.io/finalizer\"":{}}},"f:spec":{"f:accessModes":{},"f:capacity":{".":{},"f:storage":{}},"f:claimRef":{".":{},"f:apiVersion":{},"f:kind":{},"f:name":{},"f:namespace":{},"f:resourceVersion":{},"f:uid":{}},"f:csi":{".":{},"f:driver":{},"f:fsType":{},"f:volumeAttributes":{".":{},"f:fsType":{},"f:pool":{}},"f:volumeHandle":{}},"f:nodeAffinity":{".":{},"f:required":{}},"f:persistentVolumeReclaimPolicy":{},"f:storageClassName":{},"f:volumeMode":{}}}`, false),
		managed("kube-controller-manager", "v1", `{"f:status":{"f:phase":{}}}`, true),
	}
	v.Spec.Capacity = corev1.ResourceList{corev1.ResourceStorage: resource.MustParse("10Gi")}
	v.Spec.AccessModes = c.Spec.AccessModes
	v.Spec.ClaimRef = &corev1.ObjectReference{Kind: "PersistentVolumeClaim", APIVersion: "v1", Namespace: c.Namespace, Name: c.Name, UID: c.UID, ResourceVersion: c.ResourceVersion}
	v.Spec.CSI.FSType = "ext4"
	v.Spec.CSI.VolumeAttributes = map[string]string{csi.ParamPool: scalePool, csi.ParamFSType: "ext4"}
	v.Spec.PersistentVolumeReclaimPolicy = corev1.PersistentVolumeReclaimDelete
	v.Spec.StorageClassName = scaleClass
	v.Spec.VolumeMode = ptr(corev1.PersistentVolumeFilesystem)
	v.Status.Phase = corev1.VolumeBound
	return v
}

// snapshot is a ready VolumeSnapshot of c.
func (s *bigCluster) snapshot(c *corev1.PersistentVolumeClaim, i, j int) *snapv1.VolumeSnapshot {
	vs := &snapv1.VolumeSnapshot{ObjectMeta: s.meta("snap-"+c.Name, c.Namespace, 's', i, j)}
	vs.Finalizers = []string{"snapshot.storage.kubernetes.io/volumesnapshot-as-source-protection", "snapshot.storage.kubernetes.io/volumesnapshot-bound-protection"}
	vs.ManagedFields = []metav1.ManagedFieldsEntry{
		managed("kubectl-client-side-apply", "snapshot.storage.k8s.io/v1", `{"f:spec":{".":{},"f:source":{".":{},"f:persistentVolumeClaimName":{}},"f:volumeSnapshotClassName":{}}}`, false),
		managed("snapshot-controller", "snapshot.storage.k8s.io/v1", `{"f:metadata":{"f:finalizers":{".":{},"v:\"snapshot.storage.kubernetes.io/volumesnapshot-as-source-protection\"":{},"v:\"snapshot.storage.kubernetes.io/volumesnapshot-bound-protection\"":{}}}}`, false),
		managed("snapshot-controller", "snapshot.storage.k8s.io/v1", `{"f:status":{".":{},"f:boundVolumeSnapshotContentName":{},"f:creationTime":{},"f:readyToUse":{},"f:restoreSize":{}}}`, true),
	}
	vs.Spec.Source.PersistentVolumeClaimName = ptr(c.Name)
	vs.Spec.VolumeSnapshotClassName = ptr(scaleSnapClass)
	vs.Status = &snapv1.VolumeSnapshotStatus{
		BoundVolumeSnapshotContentName: ptr("snapcontent-" + string(vs.UID)),
		CreationTime:                   &scaleTime, ReadyToUse: ptr(true), RestoreSize: ptr(resource.MustParse("10Gi")),
	}
	return vs
}

// content is the VolumeSnapshotContent of vs, labelled for node by the
// snapshot-controller and taken by the node's csi-snapshotter.
func (s *bigCluster) content(node string, c *corev1.PersistentVolumeClaim, vs *snapv1.VolumeSnapshot, i, j int) *snapv1.VolumeSnapshotContent {
	handle := node + "/" + scalePool + "/snapshot-" + string(vs.UID)
	vsc := &snapv1.VolumeSnapshotContent{ObjectMeta: s.meta(*vs.Status.BoundVolumeSnapshotContentName, "", 'S', i, j)}
	vsc.Labels = map[string]string{LabelManagedBy: node}
	vsc.Finalizers = []string{"snapshot.storage.kubernetes.io/volumesnapshotcontent-bound-protection"}
	vsc.ManagedFields = []metav1.ManagedFieldsEntry{
		managed("snapshot-controller", "snapshot.storage.k8s.io/v1", `{"f:metadata":{"f:finalizers":{".":{},"v:\"snapshot.storage.kubernetes.io/volumesnapshotcontent-bound-protection\"":{}},"f:labels":{".":{},"f:snapshot.storage.kubernetes.io/managed-by":{}}},"f:spec":{".":{},"f:deletionPolicy":{},"f:driver":{},"f:source":{".":{},"f:volumeHandle":{}},"f:sourceVolumeMode":{},"f:volumeSnapshotClassName":{},"f:volumeSnapshotRef":{}}}`, false),
		managed("csi-snapshotter", "snapshot.storage.k8s.io/v1", `{"f:status":{".":{},"f:creationTime":{},"f:readyToUse":{},"f:restoreSize":{},"f:snapshotHandle":{}}}`, true),
	}
	vsc.Spec = snapv1.VolumeSnapshotContentSpec{
		VolumeSnapshotRef: corev1.ObjectReference{Kind: "VolumeSnapshot", APIVersion: "snapshot.storage.k8s.io/v1", Namespace: vs.Namespace, Name: vs.Name, UID: vs.UID, ResourceVersion: vs.ResourceVersion},
		DeletionPolicy:    snapv1.VolumeSnapshotContentDelete, Driver: driverName,
		VolumeSnapshotClassName: ptr(scaleSnapClass),
		Source:                  snapv1.VolumeSnapshotContentSource{VolumeHandle: ptr(scalePool + "/" + c.Spec.VolumeName)},
		SourceVolumeMode:        ptr(corev1.PersistentVolumeFilesystem),
	}
	vsc.Status = &snapv1.VolumeSnapshotContentStatus{
		SnapshotHandle: ptr(handle), CreationTime: ptr(scaleTime.UnixNano()), RestoreSize: ptr(int64(10 << 30)), ReadyToUse: ptr(true),
	}
	return vsc
}

// groupContent is a ready group snapshot of the node's first two volumes,
// labelled for the node.
func (s *bigCluster) groupContent(node string, i int) *groupv1.VolumeGroupSnapshotContent {
	uid := scaleUID('G', i, 0)
	handle := scalePool + "/group-" + string(uid)
	c := &groupv1.VolumeGroupSnapshotContent{ObjectMeta: s.meta("groupsnapcontent-"+string(uid), "", 'G', i, 0)}
	c.Labels = map[string]string{LabelManagedBy: node}
	c.Finalizers = []string{"groupsnapshot.storage.kubernetes.io/volumegroupsnapshotcontent-bound-protection"}
	c.ManagedFields = []metav1.ManagedFieldsEntry{
		managed("snapshot-controller", "groupsnapshot.storage.k8s.io/v1", `{"f:metadata":{"f:finalizers":{".":{},"v:\"groupsnapshot.storage.kubernetes.io/volumegroupsnapshotcontent-bound-protection\"":{}}},"f:spec":{".":{},"f:deletionPolicy":{},"f:driver":{},"f:source":{".":{},"f:volumeHandles":{}},"f:volumeGroupSnapshotClassName":{},"f:volumeGroupSnapshotRef":{}}}`, false),
		managed(Component+"-controller", "groupsnapshot.storage.k8s.io/v1", `{"f:metadata":{"f:labels":{".":{},"f:snapshot.storage.kubernetes.io/managed-by":{}}}}`, false),
		managed("csi-snapshotter", "groupsnapshot.storage.k8s.io/v1", `{"f:status":{".":{},"f:creationTime":{},"f:readyToUse":{},"f:volumeGroupSnapshotHandle":{},"f:volumeSnapshotInfoList":{}}}`, true),
	}
	vols := s.volumes[node][:2]
	c.Spec = groupv1.VolumeGroupSnapshotContentSpec{
		VolumeGroupSnapshotRef: corev1.ObjectReference{Kind: "VolumeGroupSnapshot", APIVersion: "groupsnapshot.storage.k8s.io/v1", Namespace: fmt.Sprintf("team-%02d", i%50), Name: fmt.Sprintf("db-%04d-group", i)},
		DeletionPolicy:         snapv1.VolumeSnapshotContentDelete, Driver: driverName,
		VolumeGroupSnapshotClassName: ptr(scaleGroupCls),
		Source:                       groupv1.VolumeGroupSnapshotContentSource{VolumeHandles: vols},
	}
	c.Status = &groupv1.VolumeGroupSnapshotContentStatus{VolumeGroupSnapshotHandle: ptr(handle), CreationTime: &scaleTime, ReadyToUse: ptr(true)}
	for k, v := range vols {
		c.Status.VolumeSnapshotInfoList = append(c.Status.VolumeSnapshotInfoList, groupv1.VolumeSnapshotInfo{
			VolumeHandle: v, SnapshotHandle: fmt.Sprintf("%s/gsnap-%s-%d", scalePool, uid, k), ReadyToUse: ptr(true), RestoreSize: ptr(int64(10 << 30)),
		})
	}
	return c
}

// thinPool is the ThinPool of the node's pool as its driver keeps it: made
// by the driver (owned by the Node), its status patched since.
func (s *bigCluster) thinPool(node string, i int) *unstructured.Unstructured {
	tp := &ThinPool{
		TypeMeta:   metav1.TypeMeta{APIVersion: ThinPoolGVR.GroupVersion().String(), Kind: ThinPoolKind},
		ObjectMeta: s.meta(ThinPoolName(node, scalePool), "", 't', i, 0),
		Spec:       ThinPoolSpec{NodeName: node, Pool: scalePool, Driver: driverName},
	}
	tp.Labels = map[string]string{LabelThinPoolNode: node, LabelThinPoolPool: scalePool}
	tp.OwnerReferences = []metav1.OwnerReference{{APIVersion: "v1", Kind: "Node", Name: node, UID: scaleUID('n', i, 0)}}
	gv := ThinPoolGVR.GroupVersion().String()
	tp.ManagedFields = []metav1.ManagedFieldsEntry{
		managed(Component, gv, `{"f:metadata":{"f:labels":{".":{},"f:dmthin.io/node":{},"f:dmthin.io/pool":{}},"f:ownerReferences":{".":{},"k:{\"uid\":\"`+string(scaleUID('n', i, 0))+`\"}":{}}},"f:spec":{".":{},"f:driver":{},"f:nodeName":{},"f:pool":{}}}`, false),
		managed(Component, gv, `{"f:status":{".":{},"f:available":{},"f:data":{".":{},"f:size":{},"f:used":{},"f:usedPercent":{}},"f:driverVersion":{},"f:health":{},"f:metadata":{".":{},"f:size":{},"f:used":{},"f:usedPercent":{}},"f:mode":{},"f:overprovisionLimit":{},"f:overprovisioning":{},"f:provisioned":{},"f:snapshots":{},"f:templates":{},"f:updateTime":{},"f:volumes":{}}}`, true),
	}
	fillStatus(&tp.Status, scaleUsage(40), nil)
	tp.Status.DriverVersion, tp.Status.UpdateTime = "v0.9.0", scaleTime
	obj, err := runtime.DefaultUnstructuredConverter.ToUnstructured(tp)
	if err != nil {
		panic(err) // a ThinPool always converts
	}
	return &unstructured.Unstructured{Object: obj}
}

// scaleUsage is a healthy 1 TiB pool with usedPercent of its data used.
func scaleUsage(usedPercent int64) thinpool.Usage {
	const data, meta = 1 << 40, 1 << 30
	return thinpool.Usage{
		DataBytes: data, DataUsedBytes: data * usedPercent / 100, MetadataBytes: meta, MetadataUsedBytes: meta * usedPercent / 200,
		ProvisionedBytes: 2 * data, OverprovisionRatio: -1, AvailableBytes: data * (100 - usedPercent) / 100,
		Volumes: scalePVCsPerNode, Snapshots: scalePVCsPerNode, Mode: thinpool.ModeReadWrite,
	}
}

// restore is a pending claim, just made, that restores the snapshot of the
// first claim of the ith node: where it must be placed is that node.
func (s *bigCluster) restore(i int) (pvc *corev1.PersistentVolumeClaim, node string) {
	s.restores++
	src := fmt.Sprintf("snap-data-db-%04d-0", i)
	pvc = claim(fmt.Sprintf("restore-%05d", s.restores), scaleClass, fromSnapshot(src))
	pvc.Namespace = fmt.Sprintf("team-%02d", i%50)
	pvc.CreationTimestamp = metav1.Now()
	pvc.Spec.Resources.Requests[corev1.ResourceStorage] = resource.MustParse("10Gi")
	return pvc, s.nodes[i]
}

// seededSummary lists what was seeded: "2000 csistoragecapacities, ...".
func (s *bigCluster) seededSummary() string {
	var parts []string
	for _, r := range slices.Sorted(maps.Keys(s.seeded)) {
		parts = append(parts, fmt.Sprintf("%d %s", s.seeded[r].n, r))
	}
	return strings.Join(parts, ", ")
}

// hasManagedFields reports whether any object of resource has managedFields.
func (s *bigCluster) hasManagedFields(res string) (bool, error) {
	k := s.seeded[res]
	if k == nil {
		return false, nil
	}
	list, err := k.tracker.List(k.gvr, k.gvk, "")
	if err != nil {
		return false, err
	}
	objs, err := meta.ExtractList(list)
	if err != nil {
		return false, err
	}
	return slices.ContainsFunc(objs, func(o runtime.Object) bool {
		a, err := meta.Accessor(o)
		return err == nil && len(a.GetManagedFields()) > 0
	}), nil
}
