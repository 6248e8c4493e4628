package kube

import (
	"context"
	"encoding/json"
	"errors"
	"slices"
	"sync"

	snapv1 "github.com/kubernetes-csi/external-snapshotter/client/v8/apis/volumesnapshot/v1"
	snapclient "github.com/kubernetes-csi/external-snapshotter/client/v8/clientset/versioned"
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

// Events on a VolumeSnapshotContent.
const (
	// ReasonAdopted (Normal): labelled for the csi-snapshotter of the node
	// that holds its snapshot.
	ReasonAdopted = "SnapshotContentAdopted"
	// ReasonContentNodeUnknown (Warning): no record names the node that
	// holds it.
	ReasonContentNodeUnknown = "SnapshotContentNodeUnknown"
)

// Adopter gives each node's csi-snapshotter the VolumeSnapshotContents of
// our driver that no csi-snapshotter would ever see.
//
// In distributed snapshotting each node's csi-snapshotter watches only the
// contents labelled managed-by its node, and the snapshot-controller sets
// that label only on the contents it creates for new snapshots of a PVC. A
// pre-provisioned content (an operator importing an existing snapshot by
// its handle, or Kubernetes' own storage tests) has no label, so it would
// stay not ready for ever, and deleting it with policy Delete would never
// delete the snapshot. The adopter labels it with the node its handle
// names (a snapshot ID carries its node), or the node of the PV with its
// source volume handle; when neither names one, it says so on the content.
type Adopter struct {
	driver   string
	client   snapclient.Interface
	recorder record.EventRecorder
	view     *View
	contents snaplisters.VolumeSnapshotContentLister
	synced   []cache.InformerSynced
	queue    workqueue.TypedRateLimitingInterface[string]

	mu     sync.Mutex
	warned map[types.UID]bool // contents told no record names their node
}

// AdopterOptions configure an Adopter.
type AdopterOptions struct {
	DriverName  string
	Client      snapclient.Interface
	Recorder    record.EventRecorder
	View        *View                              // with the snapshot informers
	RateLimiter workqueue.TypedRateLimiter[string] // default exponential, 1s to 5m
}

// NewAdopter sets up the content informer's handlers; Run does the work.
func NewAdopter(o AdopterOptions) (*Adopter, error) {
	if o.DriverName == "" || o.Client == nil || o.Recorder == nil || o.View == nil || o.View.snapInf == nil {
		return nil, errors.New("kube: the content adopter needs a driver name, snapshot client, recorder and a view with the snapshot informers")
	}
	inf := o.View.snapInf.Snapshot().V1().VolumeSnapshotContents()
	a := &Adopter{
		driver: o.DriverName, client: o.Client, recorder: o.Recorder, view: o.View,
		contents: inf.Lister(), synced: append(slices.Clone(o.View.synced), inf.Informer().HasSynced),
		queue:  newQueue("csi-dmthin-adopter", o.RateLimiter),
		warned: map[types.UID]bool{},
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
// informer factories must have been started.
func (a *Adopter) Run(ctx context.Context, workers int) error {
	w := &worker{name: "adopter", what: "content", queue: a.queue, synced: a.synced, sync: a.sync}
	return w.run(ctx, workers, func(logger klog.Logger) {
		logger.Info("Labelling pre-provisioned snapshot contents for the csi-snapshotter of the node that holds them")
	})
}

// sync labels one content for the node its records name. The patch
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
	node, how := a.view.contentNode(vsc)
	if node == "" {
		a.mu.Lock()
		said := a.warned[vsc.UID]
		a.warned[vsc.UID] = true
		a.mu.Unlock()
		if !said {
			a.recorder.Eventf(vsc, corev1.EventTypeWarning, ReasonContentNodeUnknown, "no record names the node that holds snapshot %q (a handle without a node, no PersistentVolume with its source volume handle): label this content %s=<node> for that node's csi-snapshotter to take it", contentHandle(vsc), LabelManagedBy)
		}
		return true, nil // a PV may yet appear; look again with backoff
	}
	labelled, retry, err := labelForNode(ctx, node, vsc.ResourceVersion, func(ctx context.Context, patch []byte) error {
		_, err := a.client.SnapshotV1().VolumeSnapshotContents().Patch(ctx, name, types.MergePatchType, patch, metav1.PatchOptions{})
		return err
	})
	if !labelled {
		return retry, err
	}
	klog.FromContext(ctx).Info("Labelled a snapshot content for the csi-snapshotter of the node that holds it", "content", name, "node", node, "by", how)
	a.recorder.Eventf(vsc, corev1.EventTypeNormal, ReasonAdopted, "node %s holds it (by %s); labelled %s=%s so that node's csi-snapshotter manages this content", node, how, LabelManagedBy, node)
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
