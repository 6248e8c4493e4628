package kube

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"time"

	snapinformers "github.com/kubernetes-csi/external-snapshotter/client/v8/informers/externalversions"
	snaplisters "github.com/kubernetes-csi/external-snapshotter/client/v8/listers/volumesnapshot/v1"
	corev1 "k8s.io/api/core/v1"
	storagev1 "k8s.io/api/storage/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes"
	corelisters "k8s.io/client-go/listers/core/v1"
	storagelisters "k8s.io/client-go/listers/storage/v1"
	"k8s.io/client-go/tools/cache"
	"k8s.io/client-go/tools/record"
	"k8s.io/client-go/util/workqueue"
	"k8s.io/klog/v2"

	"github.com/csi-dmthin/csi-dmthin/pkg/thinpool"
)

// AnnSelectedNode is the annotation through which the scheduler and the
// external-provisioner agree where a WaitForFirstConsumer volume goes. Once
// a pending PVC has it, the scheduler's volume binding rejects every other
// node for pods that use the PVC, and the provisioner on that node creates
// the volume.
const AnnSelectedNode = "volume.kubernetes.io/selected-node"

// Reasons of the Events placement puts on a PVC.
const (
	ReasonSourceNode          = "RestoreSourceNode"    // Normal: selected this node, which holds the source
	ReasonSourceMissing       = "RestoreSourceMissing" // Warning: the source is not where its records say
	ReasonSourceNodeFull      = "SourceNodeFull"       // Warning: the source's pool has no room for the new volume
	ReasonSourcePoolUnhealthy = "SourcePoolUnhealthy"  // Warning: the source's pool is failed or read-only
	ReasonSourceNodeCordoned  = "SourceNodeCordoned"   // Warning: the source's node takes no new pods
)

// cordonRecheck is how often a restore waiting for its cordoned source node
// looks again: an uncordon changes a Node, which placement does not watch.
const cordonRecheck = 15 * time.Second

const snapshotGroup = "snapshot.storage.k8s.io"

// goneGrace is how long after a PVC's creation a source that cannot be
// found is taken to be on its way rather than gone: `kubectl apply` of a
// VolumeSnapshot and its restore together can reach this node's informers
// in either order.
const goneGrace = 2 * time.Minute

// Owner is what placement asks of this node's driver (*csi.Driver is one).
// Each answer comes from this node's pools alone.
type Owner interface {
	// HasVolume reports whether id is a volume in one of this node's pools.
	HasVolume(id string) bool
	// HasSnapshot reports whether id is a snapshot in one of this node's pools.
	HasSnapshot(id string) bool
	// RoomFor returns nil when the pool holding sourceID would admit a new
	// volume of sizeBytes made from it; otherwise an error wrapping
	// thinpool.ErrNoSpace, ErrPoolUnhealthy or ErrNotFound.
	RoomFor(sourceID string, sizeBytes int64) error
}

// PlacementOptions configure a Placement.
type PlacementOptions struct {
	DriverName string // CSI driver name: StorageClass provisioner, PV and content driver
	NodeName   string // this node; the value the annotation gets
	Owner      Owner
	Client     kubernetes.Interface
	Recorder   record.EventRecorder
	// Informers is the factory the PVC, PV and StorageClass informers come
	// from; whoever made it starts it (after NewPlacement).
	Informers informers.SharedInformerFactory
	// SnapshotInformers, when set, lets restores from VolumeSnapshots be
	// steered; nil when the snapshot API is not installed (then only clones
	// are). Started by whoever made it, like Informers.
	SnapshotInformers snapinformers.SharedInformerFactory
	// RateLimiter paces retries of a PVC whose source is not ready yet;
	// default exponential from 1s to 5m.
	RateLimiter workqueue.TypedRateLimiter[string]
}

// Placement is the controller that steers restores and clones to the node
// that holds their source.
type Placement struct {
	driver, node string
	owner        Owner
	client       kubernetes.Interface
	recorder     record.EventRecorder

	pvcs      corelisters.PersistentVolumeClaimLister
	pvcIndex  cache.Indexer
	pvs       corelisters.PersistentVolumeLister
	pvIndex   cache.Indexer
	classes   storagelisters.StorageClassLister
	snapshots snaplisters.VolumeSnapshotLister // nil without the snapshot API
	contents  snaplisters.VolumeSnapshotContentLister
	synced    []cache.InformerSynced

	queue workqueue.TypedRateLimitingInterface[string]

	mu     sync.Mutex
	spoken map[types.UID]string // the reason last put on each PVC, so it is said once
	// wroteOver is the resourceVersion of each PVC this node last updated
	// successfully: until the cache moves past it, the cached copy is older
	// than our own write, and acting on it would only earn a conflict.
	wroteOver map[types.UID]string
}

// Index names.
const (
	bySource = "dataSource" // PVC by "<namespace>/<Kind>/<name>" of its data source
	byHandle = "csiHandle"  // PV by its CSI volume handle
)

// NewPlacement sets up the informers' handlers; Run does the work.
func NewPlacement(o PlacementOptions) (*Placement, error) {
	if o.DriverName == "" || o.NodeName == "" || o.Owner == nil || o.Client == nil || o.Recorder == nil || o.Informers == nil {
		return nil, errors.New("kube: placement needs a driver name, node name, owner, client, recorder and informers")
	}
	p := &Placement{
		driver: o.DriverName, node: o.NodeName, owner: o.Owner, client: o.Client, recorder: o.Recorder,
		queue:  newQueue("csi-dmthin-placement", o.RateLimiter),
		spoken: map[types.UID]string{}, wroteOver: map[types.UID]string{},
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
	p.pvcs, p.pvcIndex = pvcInf.Lister(), pvcInf.Informer().GetIndexer()
	p.pvs, p.pvIndex = pvInf.Lister(), pvInf.Informer().GetIndexer()
	p.classes = scInf.Lister()
	p.synced = []cache.InformerSynced{pvcInf.Informer().HasSynced, pvInf.Informer().HasSynced, scInf.Informer().HasSynced}

	watch := func(inf cache.SharedIndexInformer, fn func(obj any)) error {
		_, err := inf.AddEventHandler(cache.ResourceEventHandlerFuncs{
			AddFunc:    fn,
			UpdateFunc: func(_, obj any) { fn(obj) },
		})
		return err
	}
	if err := errors.Join(watch(pvcInf.Informer(), p.pvcChanged), watch(pvInf.Informer(), p.pvChanged)); err != nil {
		return nil, err
	}
	if o.SnapshotInformers != nil {
		vsInf := o.SnapshotInformers.Snapshot().V1().VolumeSnapshots()
		vscInf := o.SnapshotInformers.Snapshot().V1().VolumeSnapshotContents()
		p.snapshots, p.contents = vsInf.Lister(), vscInf.Lister()
		p.synced = append(p.synced, vsInf.Informer().HasSynced, vscInf.Informer().HasSynced)
		if err := errors.Join(watch(vsInf.Informer(), p.snapshotChanged), watch(vscInf.Informer(), p.contentChanged)); err != nil {
			return nil, err
		}
	}
	// PVC deletions only forget what was said about the PVC.
	if _, err := pvcInf.Informer().AddEventHandler(cache.ResourceEventHandlerFuncs{DeleteFunc: p.pvcDeleted}); err != nil {
		return nil, err
	}
	return p, nil
}

// Run processes PVCs with workers goroutines until ctx is done. The
// informer factories must have been started.
func (p *Placement) Run(ctx context.Context, workers int) error {
	w := &worker{name: "placement", what: "pvc", queue: p.queue, synced: p.synced, sync: p.sync}
	return w.run(ctx, workers, func(logger klog.Logger) {
		logger.Info("Steering restores and clones to their source's node", "node", p.node, "snapshots", p.snapshots != nil)
	})
}

// sync decides for one PVC. retry asks for a later, rate-limited retry.
func (p *Placement) sync(ctx context.Context, key string) (retry bool, err error) {
	logger := klog.FromContext(ctx).WithValues("pvc", key)
	ns, name, err := cache.SplitMetaNamespaceKey(key)
	if err != nil {
		return false, nil
	}
	pvc, err := p.pvcs.PersistentVolumeClaims(ns).Get(name)
	if apierrors.IsNotFound(err) {
		return false, nil
	}
	if err != nil {
		return false, err
	}
	if p.staleCache(pvc) {
		logger.V(4).Info("Cache behind this node's own write; waiting for the update")
		return false, nil // the informer's update event brings it back
	}
	if !p.candidate(pvc) {
		return false, nil
	}
	src, ok := p.resolve(pvc)
	if !ok {
		return false, nil // a source of another driver, or a kind we do not serve
	}
	switch {
	case src.notReady != "":
		logger.V(4).Info("Restore source not ready yet", "source", src.what, "why", src.notReady)
		return true, nil
	case src.gone != "" && time.Since(pvc.CreationTimestamp.Time) < goneGrace:
		logger.V(4).Info("Restore source not found yet", "source", src.what, "why", src.gone)
		return true, nil
	case src.gone != "":
		// Nobody holds it; one node says so (speaker.go).
		return p.speakAboutGone(ctx, pvc, src, fmt.Sprintf("%s: %s; the new volume cannot be made on any node", src.what, src.gone))
	}
	owned := p.owner.HasSnapshot(src.id)
	if src.kind == "volume" {
		owned = p.owner.HasVolume(src.id)
	}
	if !owned {
		if src.namedNode == p.node {
			// Our records say we hold it and we do not: nobody else will
			// claim it, so we are the one to say so.
			p.warnOnce(ctx, pvc, ReasonSourceMissing, fmt.Sprintf("%s: %s is not on node %s, where its records place it", src.what, src.id, p.node))
		}
		return false, nil
	}
	size := pvc.Spec.Resources.Requests.Storage().Value()
	if err := p.owner.RoomFor(src.id, size); err != nil {
		reason := ReasonSourceNodeFull
		if errors.Is(err, thinpool.ErrPoolUnhealthy) {
			reason = ReasonSourcePoolUnhealthy
		}
		// Setting the node anyway would only have the provisioner fail with
		// ResourceExhausted and clear it again; any other node lacks the
		// source. So say why, and look again later: space may be freed.
		p.warnOnce(ctx, pvc, reason, fmt.Sprintf("%s is on node %s, which cannot take the new volume: %v", src.what, p.node, err))
		return true, nil
	}
	// A cordoned node takes no new pods, so a volume made there now could
	// not be used; and it is often on its way out. Say so, make nothing,
	// and look again: an uncordon is not an event this controller sees.
	if cordoned, err := p.cordoned(ctx); err != nil {
		return false, err
	} else if cordoned {
		p.warnOnce(ctx, pvc, ReasonSourceNodeCordoned, fmt.Sprintf("%s is on node %s, which is cordoned (unschedulable): the new volume can only be made there, and waits until the node takes pods again", src.what, p.node))
		p.queue.AddAfter(key, cordonRecheck)
		return false, nil
	}
	return p.selectNode(ctx, pvc, src)
}

// cordoned reports whether this node is marked unschedulable.
func (p *Placement) cordoned(ctx context.Context) (bool, error) {
	n, err := p.client.CoreV1().Nodes().Get(ctx, p.node, metav1.GetOptions{})
	if apierrors.IsNotFound(err) {
		return false, nil // not registered (yet): nothing says it is cordoned
	}
	if err != nil {
		return false, err
	}
	return n.Spec.Unschedulable, nil
}

// candidate reports whether pvc is a pending WaitForFirstConsumer PVC of
// our driver that is not placed on this node yet. One the scheduler placed
// on another node is a candidate too: the scheduler knows nothing of data
// sources, and when it gets to a restore's pod before the source's node
// sets the annotation, it picks any node with room; only the source's node
// can make the volume, so that node corrects the choice (see sync).
func (p *Placement) candidate(pvc *corev1.PersistentVolumeClaim) bool {
	if pvc.DeletionTimestamp != nil || pvc.Spec.VolumeName != "" || pvc.Annotations[AnnSelectedNode] == p.node {
		return false
	}
	if ph := pvc.Status.Phase; ph != "" && ph != corev1.ClaimPending {
		return false
	}
	if dataSource(pvc) == nil || pvc.Spec.StorageClassName == nil || *pvc.Spec.StorageClassName == "" {
		return false
	}
	sc, err := p.classes.Get(*pvc.Spec.StorageClassName)
	if err != nil {
		return false // a class created later brings a resync
	}
	return sc.Provisioner == p.driver && sc.VolumeBindingMode != nil && *sc.VolumeBindingMode == storagev1.VolumeBindingWaitForFirstConsumer
}
