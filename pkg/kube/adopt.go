package kube

import (
	"context"
	"encoding/json"
	"errors"

	snapv1 "github.com/kubernetes-csi/external-snapshotter/client/v8/apis/volumesnapshot/v1"
	snapclient "github.com/kubernetes-csi/external-snapshotter/client/v8/clientset/versioned"
	snapinformers "github.com/kubernetes-csi/external-snapshotter/client/v8/informers/externalversions"
	snaplisters "github.com/kubernetes-csi/external-snapshotter/client/v8/listers/volumesnapshot/v1"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/tools/cache"
	"k8s.io/client-go/tools/record"
	"k8s.io/client-go/util/workqueue"
	"k8s.io/klog/v2"
)

// ReasonAdopted is the Normal Event on a VolumeSnapshotContent this node
// labelled for its own csi-snapshotter.
const ReasonAdopted = "SnapshotContentAdopted"

// Adopter gives this node's csi-snapshotter the VolumeSnapshotContents of
// our driver that no csi-snapshotter would ever see.
//
// In distributed snapshotting each node's csi-snapshotter watches only the
// contents labelled managed-by its node, and the snapshot-controller sets
// that label only on the contents it creates for new snapshots of a PVC. A
// pre-provisioned content (an operator importing an existing snapshot by
// its handle, or Kubernetes' own storage tests) has no label, so it would
// stay not ready for ever, and deleting it with policy Delete would never
// delete the snapshot. The node whose pool holds the snapshot (or, for a
// content made from a volume before distributed snapshotting was turned
// on, the volume) labels it, and its csi-snapshotter takes it from there.
type Adopter struct {
	driver, node string
	owner        Owner
	client       snapclient.Interface
	recorder     record.EventRecorder
	contents     snaplisters.VolumeSnapshotContentLister
	synced       cache.InformerSynced
	queue        workqueue.TypedRateLimitingInterface[string]
}

// AdopterOptions configure an Adopter.
type AdopterOptions struct {
	DriverName string
	NodeName   string
	Owner      Owner
	Client     snapclient.Interface
	Recorder   record.EventRecorder
	// Informers is the snapshot informer factory; whoever made it starts it
	// (after NewAdopter).
	Informers   snapinformers.SharedInformerFactory
	RateLimiter workqueue.TypedRateLimiter[string] // default exponential, 1s to 5m
}

// NewAdopter sets up the content informer's handlers; Run does the work.
func NewAdopter(o AdopterOptions) (*Adopter, error) {
	if o.DriverName == "" || o.NodeName == "" || o.Owner == nil || o.Client == nil || o.Recorder == nil || o.Informers == nil {
		return nil, errors.New("kube: the content adopter needs a driver name, node name, owner, snapshot client, recorder and informers")
	}
	inf := o.Informers.Snapshot().V1().VolumeSnapshotContents()
	a := &Adopter{
		driver: o.DriverName, node: o.NodeName, owner: o.Owner, client: o.Client, recorder: o.Recorder,
		contents: inf.Lister(), synced: inf.Informer().HasSynced,
		queue: newQueue("csi-dmthin-adopter", o.RateLimiter),
	}
	add := func(obj any) {
		if vsc, ok := obj.(*snapv1.VolumeSnapshotContent); ok && a.unclaimed(vsc) {
			a.queue.Add(vsc.Name)
		}
	}
	_, err := inf.Informer().AddEventHandler(cache.ResourceEventHandlerFuncs{
		AddFunc:    add,
		UpdateFunc: func(_, obj any) { add(obj) },
	})
	return a, err
}

// unclaimed reports whether vsc is one of our driver's contents that no
// node's csi-snapshotter watches.
func (a *Adopter) unclaimed(vsc *snapv1.VolumeSnapshotContent) bool {
	return vsc.Spec.Driver == a.driver && vsc.Labels[LabelManagedBy] == ""
}

// Run labels contents with workers goroutines until ctx is done. The
// informer factory must have been started.
func (a *Adopter) Run(ctx context.Context, workers int) error {
	w := &worker{name: "adopter", what: "content", queue: a.queue, synced: []cache.InformerSynced{a.synced}, sync: a.sync}
	return w.run(ctx, workers, func(logger klog.Logger) {
		logger.Info("Labelling pre-provisioned snapshot contents held on this node for its csi-snapshotter", "node", a.node)
	})
}

// sync labels one content when this node holds its source. The patch
// carries the resourceVersion read, so a content that changed meanwhile
// (labelled by the snapshot-controller, say) is read again, not written
// over.
func (a *Adopter) sync(ctx context.Context, name string) (retry bool, err error) {
	vsc, err := a.contents.Get(name)
	if apierrors.IsNotFound(err) {
		return false, nil
	}
	if err != nil {
		return false, err
	}
	if !a.unclaimed(vsc) {
		return false, nil
	}
	var what, id string
	switch src := vsc.Spec.Source; {
	case src.SnapshotHandle != nil && *src.SnapshotHandle != "":
		what, id = "snapshot", *src.SnapshotHandle
		if !a.owner.HasSnapshot(id) {
			return false, nil // another node's, or nobody's
		}
	case src.VolumeHandle != nil && *src.VolumeHandle != "":
		what, id = "volume", *src.VolumeHandle
		if !a.owner.HasVolume(id) {
			return false, nil
		}
	default:
		return false, nil
	}
	labelled, retry, err := labelForNode(ctx, a.node, vsc.ResourceVersion, func(ctx context.Context, patch []byte) error {
		_, err := a.client.SnapshotV1().VolumeSnapshotContents().Patch(ctx, name, types.MergePatchType, patch, metav1.PatchOptions{})
		return err
	})
	if !labelled {
		return retry, err
	}
	klog.FromContext(ctx).Info("Labelled a snapshot content for this node's csi-snapshotter: the node holds its source", "content", name, what, id)
	a.recorder.Eventf(vsc, corev1.EventTypeNormal, ReasonAdopted, "node %s holds %s %s; labelled %s=%s so that node's csi-snapshotter manages this content", a.node, what, id, LabelManagedBy, a.node)
	return false, nil
}

// labelForNode sets the managed-by label to node through patch, with the
// resourceVersion the object was read at: an object that changed meanwhile
// is read again (retry), one that is gone is left alone.
func labelForNode(ctx context.Context, node, resourceVersion string, patch func(context.Context, []byte) error) (labelled, retry bool, err error) {
	data, err := json.Marshal(map[string]any{"metadata": map[string]any{
		"resourceVersion": resourceVersion,
		"labels":          map[string]string{LabelManagedBy: node},
	}})
	if err != nil {
		return false, false, err
	}
	err = patch(ctx, data)
	switch {
	case apierrors.IsConflict(err):
		return false, true, nil
	case apierrors.IsNotFound(err):
		return false, false, nil
	case err != nil:
		return false, false, err
	}
	return true, false, nil
}
