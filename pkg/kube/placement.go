package kube

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"sync"
	"time"

	snaplisters "github.com/kubernetes-csi/external-snapshotter/client/v8/listers/volumesnapshot/v1"
	corev1 "k8s.io/api/core/v1"
	storagev1 "k8s.io/api/storage/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/cache"
	"k8s.io/client-go/tools/record"
	"k8s.io/client-go/util/workqueue"
	"k8s.io/klog/v2"

	"github.com/csi-dmthin/csi-dmthin/pkg/csi"
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
	ReasonSourceNode          = "RestoreSourceNode"    // Normal: selected the node that holds the source
	ReasonSourceMissing       = "RestoreSourceMissing" // Warning: the source, or a record on the way to it, does not exist
	ReasonSourceNodeUnknown   = "RestoreSourceNodeUnknown"
	ReasonSourceNodeFull      = "SourceNodeFull"      // Warning: the source's pool has no room for the new volume
	ReasonSourcePoolUnhealthy = "SourcePoolUnhealthy" // Warning: the source's pool is failed, read-only or fenced
	ReasonSourceNodeCordoned  = "SourceNodeCordoned"  // Warning: the source's node takes no new pods
	// Normal: the source's node cannot take the new volume, so the
	// scheduler chooses the node and the node's driver copies the source
	// there (CopyAcrossNodes).
	ReasonCopyFromSourceNode = "RestoreCopiedFromSourceNode"
)

// AnnCopyFromNode names, on a restore or clone that placement left to the
// scheduler to be copied, the node that holds its source: a volume ID does
// not name its node, so the node that makes a clone reads it here; and
// placement does not steer a PVC that has it again.
const AnnCopyFromNode = "dmthin.csi.dmthin.io/copy-from-node"

// cordonRecheck is how often a restore waiting for its cordoned source node
// looks again: an uncordon changes a Node, which placement does not watch.
const cordonRecheck = 15 * time.Second

const snapshotGroup = "snapshot.storage.k8s.io"

// goneGrace is how long after a PVC's creation a source that cannot be
// found is taken to be on its way rather than gone: `kubectl apply` of a
// VolumeSnapshot and its restore together can reach the informers in
// either order.
const goneGrace = 2 * time.Minute

// PlacementOptions configure a Placement.
type PlacementOptions struct {
	DriverName string // CSI driver name: StorageClass provisioner, PV and content driver
	Client     kubernetes.Interface
	Recorder   record.EventRecorder
	View       *View
	// RateLimiter paces retries of a PVC whose source is not ready yet;
	// default exponential from 1s to 5m.
	RateLimiter workqueue.TypedRateLimiter[string]
	// CopyAcrossNodes: a restore whose snapshot's node is cordoned or has
	// no room is left to the scheduler, and the node it picks copies the
	// snapshot from its node, instead of waiting for the source's node.
	CopyAcrossNodes bool
}

// Placement is the controller that steers restores and clones to the node
// that holds their source. It runs once for the cluster (the leader of
// `csi-dmthin controller`) and decides from the API alone: the source PV's
// node affinity, the snapshot content's node (its managed-by label, its
// handle, its source volume's PV), the node's ThinPool for room, the Node
// for a cordon.
type Placement struct {
	driver   string
	copy     bool
	client   kubernetes.Interface
	recorder record.EventRecorder
	view     *View

	snapshots snaplisters.VolumeSnapshotLister // nil without the snapshot API
	contents  snaplisters.VolumeSnapshotContentLister
	synced    []cache.InformerSynced

	queue workqueue.TypedRateLimitingInterface[string]

	mu     sync.Mutex
	spoken map[types.UID]string // the reason last put on each PVC, so it is said once
	// wroteOver is the resourceVersion of each PVC placement last updated
	// successfully: until the cache moves past it, the cached copy is older
	// than our own write, and acting on it would only earn a conflict.
	wroteOver map[types.UID]string
	// selected is how often and when placement last placed each PVC.
	selected map[types.UID]selection
}

type selection struct {
	times int
	last  time.Time
}

// NewPlacement sets up the informers' handlers; Run does the work.
func NewPlacement(o PlacementOptions) (*Placement, error) {
	if o.DriverName == "" || o.Client == nil || o.Recorder == nil || o.View == nil {
		return nil, errors.New("kube: placement needs a driver name, client, recorder and view")
	}
	v := o.View
	p := &Placement{
		driver: o.DriverName, copy: o.CopyAcrossNodes, client: o.Client, recorder: o.Recorder, view: v,
		queue:  newQueue("csi-dmthin-placement", o.RateLimiter),
		spoken: map[types.UID]string{}, wroteOver: map[types.UID]string{}, selected: map[types.UID]selection{},
		synced: v.synced,
	}
	watch := func(inf cache.SharedIndexInformer, fn func(obj any)) error {
		_, err := inf.AddEventHandler(cache.ResourceEventHandlerFuncs{
			AddFunc:    fn,
			UpdateFunc: func(_, obj any) { fn(obj) },
		})
		return err
	}
	if err := errors.Join(watch(v.pvcInf, p.pvcChanged), watch(v.pvInf, p.pvChanged)); err != nil {
		return nil, err
	}
	if v.snapInf != nil {
		vsInf := v.snapInf.Snapshot().V1().VolumeSnapshots()
		vscInf := v.snapInf.Snapshot().V1().VolumeSnapshotContents()
		p.snapshots, p.contents = vsInf.Lister(), vscInf.Lister()
		p.synced = append(slices.Clone(p.synced), vsInf.Informer().HasSynced, vscInf.Informer().HasSynced)
		if err := errors.Join(watch(vsInf.Informer(), p.snapshotChanged), watch(vscInf.Informer(), p.contentChanged)); err != nil {
			return nil, err
		}
	}
	// PVC deletions only forget what was said about the PVC.
	if _, err := v.pvcInf.AddEventHandler(cache.ResourceEventHandlerFuncs{DeleteFunc: p.pvcDeleted}); err != nil {
		return nil, err
	}
	return p, nil
}

// Run processes PVCs with workers goroutines until ctx is done. The
// informer factories must have been started.
func (p *Placement) Run(ctx context.Context, workers int) error {
	w := &worker{name: "placement", what: "pvc", queue: p.queue, synced: p.synced, sync: p.sync}
	return w.run(ctx, workers, func(logger klog.Logger) {
		logger.Info("Steering restores and clones to their source's node", "snapshots", p.snapshots != nil, "poolRoom", p.view.pools != nil)
	})
}

// sync decides for one PVC. retry asks for a later, rate-limited retry.
func (p *Placement) sync(ctx context.Context, key string) (retry bool, err error) {
	logger := klog.FromContext(ctx).WithValues("pvc", key)
	ns, name, err := cache.SplitMetaNamespaceKey(key)
	if err != nil {
		return false, nil
	}
	pvc, err := p.view.pvcs.PersistentVolumeClaims(ns).Get(name)
	if apierrors.IsNotFound(err) {
		return false, nil
	}
	if err != nil {
		return false, err
	}
	if p.staleCache(pvc) {
		logger.V(4).Info("Cache behind placement's own write; waiting for the update")
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
		p.warnOnce(ctx, pvc, ReasonSourceMissing, fmt.Sprintf("%s: %s; the new volume cannot be made on any node", src.what, src.gone))
		return false, nil
	case src.node == "":
		// A record may still come (the snapshot-controller labels a
		// content it made); look again with backoff.
		p.warnOnce(ctx, pvc, ReasonSourceNodeUnknown, fmt.Sprintf("%s (%s): no record names the node that holds it (a VolumeSnapshotContent without the label %s, a handle without a node, no PersistentVolume with its source volume handle); label its VolumeSnapshotContent %s=<node> to place the new volume", src.what, src.id, LabelManagedBy, LabelManagedBy))
		return true, nil
	}
	if pvc.Annotations[AnnSelectedNode] == src.node {
		return false, nil
	}
	if pvc.Annotations[AnnCopyFromNode] != "" {
		// Left to the scheduler to be copied, earlier: the node it chose
		// may be copying already, so that choice stands even once the
		// source's node could take the volume again.
		return false, nil
	}
	if wait := p.reselectWait(pvc.UID); wait > 0 {
		// Placed before and cleared since: the provisioner clears the
		// node when CreateVolume fails there (a pool fuller than its
		// ThinPool said, say). Each new try waits longer.
		logger.V(2).Info("Placed before and cleared since; waiting before placing again", "node", src.node, "wait", wait)
		p.queue.AddAfter(key, wait)
		return false, nil
	}
	if p.anyNode(pvc) {
		if copied, retry, err := p.copyInstead(ctx, pvc, src, "need not take it (the StorageClass's "+csi.ParamRestorePlacement+" is "+csi.RestoreOnAnyNode+")"); copied || err != nil {
			return retry, err
		}
	}
	size := csi.VolumeBytes(pvc.Spec.Resources.Requests.Storage().Value(), src.size, p.fsType(pvc))
	if err := p.view.room(src.node, src.pool, size); err != nil {
		reason := ReasonSourceNodeFull
		if errors.Is(err, thinpool.ErrPoolUnhealthy) {
			reason = ReasonSourcePoolUnhealthy
		} else if !errors.Is(err, thinpool.ErrNoSpace) {
			return false, err
		}
		// A full pool can still serve a snapshot to a copy, but not a
		// volume: the copy reads a snapshot made of it, which the pool
		// would refuse.
		if reason == ReasonSourceNodeFull && src.kind == "snapshot" {
			if copied, retry, err := p.copyInstead(ctx, pvc, src, "has no room for it"); copied || err != nil {
				return retry, err
			}
		}
		// Setting the node anyway would only have the provisioner fail with
		// ResourceExhausted and clear it again; any other node lacks the
		// source. So say why, and look again later: space may be freed.
		p.warnOnce(ctx, pvc, reason, fmt.Sprintf("%s is on node %s, which cannot take the new volume: %v", src.what, src.node, err))
		return true, nil
	}
	// A cordoned node takes no new pods, so a volume made there now could
	// not be used; and it is often on its way out. Say so, make nothing,
	// and look again: an uncordon is not an event this controller sees.
	if cordoned, gone, err := p.nodeState(ctx, src.node); err != nil {
		return false, err
	} else if gone {
		p.warnOnce(ctx, pvc, ReasonSourceMissing, fmt.Sprintf("%s is on node %s, which is not in the cluster: the new volume can only be made there", src.what, src.node))
		return true, nil
	} else if cordoned {
		if copied, retry, err := p.copyInstead(ctx, pvc, src, "is cordoned (unschedulable)"); copied || err != nil {
			return retry, err
		}
		p.warnOnce(ctx, pvc, ReasonSourceNodeCordoned, fmt.Sprintf("%s is on node %s, which is cordoned (unschedulable): the new volume can only be made there, and waits until the node takes pods again", src.what, src.node))
		p.queue.AddAfter(key, cordonRecheck)
		return false, nil
	}
	return p.selectNode(ctx, pvc, src)
}

// copyInstead decides for a restore or clone whose source node cannot
// take it: with copies on, it is left to the scheduler, and the node the
// scheduler picks copies the source. That node finds the source's node in
// a snapshot's ID, or, for a clone, in the PVC's AnnCopyFromNode, which
// this sets on both: it also keeps the decision (sync leaves such a PVC
// alone). copied is false when placement goes on as without copies (a
// snapshot ID without its node, copies off, or placed there earlier).
func (p *Placement) copyInstead(ctx context.Context, pvc *corev1.PersistentVolumeClaim, src source, why string) (copied, retry bool, err error) {
	if !p.copy {
		return false, false, nil
	}
	switch src.kind {
	case "snapshot":
		if node, _, ok := csi.SnapshotNode(src.id); !ok || node != src.node {
			return false, false, nil
		}
	case "volume":
	default:
		return false, false, nil
	}
	if pvc.Annotations[AnnSelectedNode] == src.node {
		return false, false, nil // placed there earlier: that choice stands
	}
	if pvc.Annotations[AnnCopyFromNode] != src.node {
		upd := pvc.DeepCopy()
		if upd.Annotations == nil {
			upd.Annotations = map[string]string{}
		}
		upd.Annotations[AnnCopyFromNode] = src.node
		_, err := p.client.CoreV1().PersistentVolumeClaims(pvc.Namespace).Update(ctx, upd, metav1.UpdateOptions{})
		if apierrors.IsConflict(err) {
			return true, true, nil // look again at the fresh copy
		}
		if err != nil {
			return true, false, err
		}
		p.wrote(pvc)
	}
	p.sayOnce(ctx, pvc, corev1.EventTypeNormal, ReasonCopyFromSourceNode, fmt.Sprintf("%s is on node %s, which %s: the scheduler chooses the node, whose driver copies its blocks from node %s", src.what, src.node, why, src.node))
	return true, false, nil
}

// nodeState reports whether node is marked unschedulable, or is not in
// the cluster at all.
func (p *Placement) nodeState(ctx context.Context, node string) (cordoned, gone bool, err error) {
	n, err := p.client.CoreV1().Nodes().Get(ctx, node, metav1.GetOptions{})
	if apierrors.IsNotFound(err) {
		return false, true, nil
	}
	if err != nil {
		return false, false, err
	}
	return n.Spec.Unschedulable, false, nil
}

// anyNode reports whether the PVC's class leaves restores and clones to
// the scheduler (csi.ParamRestorePlacement).
func (p *Placement) anyNode(pvc *corev1.PersistentVolumeClaim) bool {
	sc, err := p.view.classes.Get(*pvc.Spec.StorageClassName)
	return err == nil && sc.Parameters[csi.ParamRestorePlacement] == csi.RestoreOnAnyNode
}

// fsType is the filesystem the new volume gets: none for a raw block
// volume; else the class's csi.storage.k8s.io/fstype (which the
// provisioner passes as the capability's) or its fsType parameter, ext4 by
// default. It changes the smallest size (xfs).
func (p *Placement) fsType(pvc *corev1.PersistentVolumeClaim) string {
	if m := pvc.Spec.VolumeMode; m != nil && *m == corev1.PersistentVolumeBlock {
		return ""
	}
	sc, err := p.view.classes.Get(*pvc.Spec.StorageClassName)
	if err != nil {
		return "ext4"
	}
	for _, k := range []string{"csi.storage.k8s.io/fstype", csi.ParamFSType} {
		if v := sc.Parameters[k]; v != "" {
			return v
		}
	}
	return "ext4"
}

// reselectBase and reselectMax bound the wait before placing a PVC again
// that was placed before and cleared since.
const (
	reselectBase = 2 * time.Second
	reselectMax  = 5 * time.Minute
)

// reselectWait is how long to wait before placing the PVC again: 0 for
// one never placed, or placed long enough ago; else the rest of a wait
// that doubles with each placement.
func (p *Placement) reselectWait(uid types.UID) time.Duration {
	p.mu.Lock()
	defer p.mu.Unlock()
	s, ok := p.selected[uid]
	if !ok {
		return 0
	}
	wait := min(reselectBase<<min(s.times-1, 20), reselectMax)
	return max(time.Until(s.last.Add(wait)), 0)
}

// candidate reports whether pvc is a pending WaitForFirstConsumer PVC of
// our driver with a data source. One the scheduler placed already is a
// candidate too: the scheduler knows nothing of data sources, and when it
// gets to a restore's pod before placement sets the annotation, it picks
// any node with room; only the source's node can make the volume, so
// placement corrects the choice (see sync).
func (p *Placement) candidate(pvc *corev1.PersistentVolumeClaim) bool {
	if pvc.DeletionTimestamp != nil || pvc.Spec.VolumeName != "" {
		return false
	}
	if ph := pvc.Status.Phase; ph != "" && ph != corev1.ClaimPending {
		return false
	}
	if dataSource(pvc) == nil || pvc.Spec.StorageClassName == nil || *pvc.Spec.StorageClassName == "" {
		return false
	}
	sc, err := p.view.classes.Get(*pvc.Spec.StorageClassName)
	if err != nil {
		return false // a class created later brings a resync
	}
	return sc.Provisioner == p.driver && sc.VolumeBindingMode != nil && *sc.VolumeBindingMode == storagev1.VolumeBindingWaitForFirstConsumer
}
