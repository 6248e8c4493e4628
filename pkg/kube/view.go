package kube

import (
	"errors"
	"fmt"

	snapv1 "github.com/kubernetes-csi/external-snapshotter/client/v8/apis/volumesnapshot/v1"
	snapinformers "github.com/kubernetes-csi/external-snapshotter/client/v8/informers/externalversions"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/resource"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/client-go/dynamic/dynamicinformer"
	"k8s.io/client-go/informers"
	corelisters "k8s.io/client-go/listers/core/v1"
	storagelisters "k8s.io/client-go/listers/storage/v1"
	"k8s.io/client-go/tools/cache"

	"github.com/csi-dmthin/csi-dmthin/pkg/csi"
	"github.com/csi-dmthin/csi-dmthin/pkg/thinpool"
)

// The controller's view of the cluster: the informers the cluster-level
// controllers share (one of each, whatever the number of controllers), and
// the answers they take from the API alone: which node holds a volume or a
// snapshot, and whether a node's pool has room.

// LabelManagedBy is the label the snapshot-controller's distributed mode
// puts on a VolumeSnapshotContent: the node whose snapshotter handles it.
const LabelManagedBy = "snapshot.storage.kubernetes.io/managed-by"

// ViewOptions configure a View.
type ViewOptions struct {
	DriverName string
	// Informers is the factory of the PVC, PV and StorageClass informers;
	// whoever made it starts it (after the controllers are made).
	Informers informers.SharedInformerFactory
	// SnapshotInformers, when set, adds VolumeSnapshots and their contents
	// (and, with GroupSnapshots, the group API); nil when the snapshot API
	// is not installed. Started by whoever made it.
	SnapshotInformers snapinformers.SharedInformerFactory
	GroupSnapshots    bool
	// ThinPools, when set, is the factory of the ThinPool informer (the
	// pool resource's Available and Health tell whether a node's pool has
	// room); nil when the resource is not installed: then no node is
	// refused for room here, and the node's own admission decides.
	ThinPools dynamicinformer.DynamicSharedInformerFactory
}

// View reads the cluster for the controllers.
type View struct {
	driver string

	pvcs     corelisters.PersistentVolumeClaimLister
	pvcInf   cache.SharedIndexInformer
	pvs      corelisters.PersistentVolumeLister
	pvInf    cache.SharedIndexInformer
	classes  storagelisters.StorageClassLister
	snapInf  snapinformers.SharedInformerFactory // nil without the snapshot API
	groupAPI bool
	pools    cache.GenericLister // nil without ThinPools
	synced   []cache.InformerSynced
}

// NewView sets up the shared informers and their indexes.
func NewView(o ViewOptions) (*View, error) {
	if o.DriverName == "" || o.Informers == nil {
		return nil, errors.New("kube: the view needs a driver name and informers")
	}
	if o.GroupSnapshots && o.SnapshotInformers == nil {
		return nil, errors.New("kube: group snapshots need the snapshot informers")
	}
	pvcInf := o.Informers.Core().V1().PersistentVolumeClaims()
	pvInf := o.Informers.Core().V1().PersistentVolumes()
	scInf := o.Informers.Storage().V1().StorageClasses()
	if err := pvcInf.Informer().AddIndexers(cache.Indexers{bySource: pvcSourceIndex}); err != nil {
		return nil, err
	}
	if err := pvInf.Informer().AddIndexers(cache.Indexers{byHandle: pvHandleIndex}); err != nil {
		return nil, err
	}
	v := &View{
		driver: o.DriverName,
		pvcs:   pvcInf.Lister(), pvcInf: pvcInf.Informer(),
		pvs: pvInf.Lister(), pvInf: pvInf.Informer(),
		classes: scInf.Lister(), snapInf: o.SnapshotInformers, groupAPI: o.GroupSnapshots,
		synced: []cache.InformerSynced{pvcInf.Informer().HasSynced, pvInf.Informer().HasSynced, scInf.Informer().HasSynced},
	}
	if o.ThinPools != nil {
		inf := o.ThinPools.ForResource(ThinPoolGVR)
		v.pools = inf.Lister()
		v.synced = append(v.synced, inf.Informer().HasSynced)
	}
	return v, nil
}

// Index names.
const (
	bySource = "dataSource" // PVC by "<namespace>/<Kind>/<name>" of its data source
	byHandle = "csiHandle"  // PV by its CSI volume handle
)

// volumeNode returns the node that holds the volume with this handle, by
// its PV's node affinity; "" when no PV of ours has the handle, or its
// affinity names no single node.
func (v *View) volumeNode(handle string) string {
	objs, err := v.pvInf.GetIndexer().ByIndex(byHandle, v.driver+"/"+handle)
	if err != nil || len(objs) != 1 {
		return ""
	}
	pv, ok := objs[0].(*corev1.PersistentVolume)
	if !ok {
		return ""
	}
	return pvNode(pv)
}

// contentNode returns the node that holds a VolumeSnapshotContent's
// snapshot, and how that is known; "" when no record names one. In order:
// the managed-by label (set by the snapshot-controller in distributed mode
// to the source volume's node), the node in the snapshot handle, the node
// of the PV with the content's source volume handle.
func (v *View) contentNode(vsc *snapv1.VolumeSnapshotContent) (node, how string) {
	if n := vsc.Labels[LabelManagedBy]; n != "" {
		return n, "its label " + LabelManagedBy
	}
	if h := contentHandle(vsc); h != "" {
		if n, _, ok := csi.SnapshotNode(h); ok && n != "" {
			return n, "its snapshot handle"
		}
	}
	if h := vsc.Spec.Source.VolumeHandle; h != nil && *h != "" {
		if n := v.volumeNode(*h); n != "" {
			return n, "its source volume's PersistentVolume"
		}
	}
	return "", ""
}

// contentHandle is a content's snapshot handle: the status's, or the
// spec's for a pre-provisioned content; "" while it has none.
func contentHandle(vsc *snapv1.VolumeSnapshotContent) string {
	if st := vsc.Status; st != nil && st.SnapshotHandle != nil && *st.SnapshotHandle != "" {
		return *st.SnapshotHandle
	}
	if h := vsc.Spec.Source.SnapshotHandle; h != nil {
		return *h
	}
	return ""
}

// pvNode returns the node a PV's required node affinity pins it to on our
// topology key; "" when it names none or more than one.
func pvNode(pv *corev1.PersistentVolume) string {
	if pv.Spec.NodeAffinity == nil || pv.Spec.NodeAffinity.Required == nil {
		return ""
	}
	node := ""
	for _, term := range pv.Spec.NodeAffinity.Required.NodeSelectorTerms {
		for _, e := range term.MatchExpressions {
			if e.Key != csi.TopologyKey || e.Operator != corev1.NodeSelectorOpIn || len(e.Values) != 1 {
				continue
			}
			if node != "" && node != e.Values[0] {
				return ""
			}
			node = e.Values[0]
		}
	}
	return node
}

// room returns nil when the ThinPool of pool on node says it would take a
// new volume of sizeBytes, or when there is no ThinPool to ask (the node's
// own admission decides when it creates the volume); otherwise an error
// wrapping thinpool.ErrPoolUnhealthy or thinpool.ErrNoSpace that says why.
// A ThinPool's status is written by its node when its state changes and,
// when only its use does, at most once a minute: the answer can be late,
// and the node's admission stays the authority.
func (v *View) room(node, pool string, sizeBytes int64) error {
	if v.pools == nil {
		return nil
	}
	obj, err := v.pools.Get(ThinPoolName(node, pool))
	if apierrors.IsNotFound(err) {
		return nil
	}
	if err != nil {
		return err
	}
	u, ok := obj.(*unstructured.Unstructured)
	if !ok {
		return fmt.Errorf("ThinPool %s: unexpected %T", ThinPoolName(node, pool), obj)
	}
	var tp ThinPool
	if err := runtime.DefaultUnstructuredConverter.FromUnstructured(u.Object, &tp); err != nil {
		return fmt.Errorf("ThinPool %s: %w", u.GetName(), err)
	}
	st := tp.Status
	if st.Health != "" && st.Health != HealthHealthy {
		msg := ""
		if st.Message != "" {
			msg = ": " + st.Message
		}
		return fmt.Errorf("pool %s of node %s is %s%s: %w", pool, node, st.Health, msg, thinpool.ErrPoolUnhealthy)
	}
	if st.Health == HealthHealthy && st.Available.Value() < sizeBytes {
		return fmt.Errorf("pool %s of node %s has room for %s (ThinPool %s, status of %s), the new volume needs %s: %w",
			pool, node, st.Available.String(), tp.Name, st.UpdateTime.UTC().Format("15:04:05"), resource.NewQuantity(sizeBytes, resource.BinarySI), thinpool.ErrNoSpace)
	}
	return nil
}
