package kube

import (
	"context"
	"errors"
	"strings"
	"sync"

	groupv1 "github.com/kubernetes-csi/external-snapshotter/client/v8/apis/volumegroupsnapshot/v1"
	snapclient "github.com/kubernetes-csi/external-snapshotter/client/v8/clientset/versioned"
	snapinformers "github.com/kubernetes-csi/external-snapshotter/client/v8/informers/externalversions"
	grouplisters "github.com/kubernetes-csi/external-snapshotter/client/v8/listers/volumegroupsnapshot/v1"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/tools/cache"
	"k8s.io/client-go/tools/record"
	"k8s.io/client-go/util/workqueue"
	"k8s.io/klog/v2"
)

// Events on VolumeGroupSnapshotContents.
const (
	// ReasonGroupAdopted (Normal): this node labelled the content for its
	// own csi-snapshotter.
	ReasonGroupAdopted = "GroupSnapshotContentAdopted"
	// ReasonGroupSpansNodes (Warning): the group's volumes are not all on
	// this node, which holds the first of them; no node can take it.
	ReasonGroupSpansNodes = "GroupSnapshotSpansNodes"
	// ReasonGroupClassClaimed (Normal): this node labelled the content's
	// group snapshot class for itself, so its csi-snapshotter can read it.
	ReasonGroupClassClaimed = "GroupSnapshotClassClaimed"
)

// GroupOwner answers, from this node's pools alone, whether the node holds
// volumes and group snapshots (*csi.Driver is one).
type GroupOwner interface {
	HasVolume(id string) bool
	HasGroupSnapshot(id string) bool
}

// GroupAdopter gives this node's csi-snapshotter the VolumeGroupSnapshot
// contents of our driver that hold this node's volumes.
//
// In distributed snapshotting each node's csi-snapshotter watches only the
// contents labelled managed-by its node, and the snapshot-controller (as of
// v8.7.0) labels the VolumeSnapshotContents it makes but never a
// VolumeGroupSnapshotContent: without this, no group snapshot of a driver
// deployed per node would ever be taken, and none deleted. The node whose
// pool holds every volume of the group (or the pre-provisioned group
// snapshot) labels the content; a group of volumes on several nodes is
// labelled by none, and its VolumeGroupSnapshot says why (an Event).
//
// It also hands the content's class to the node. The csi-snapshotter (as
// of v8.7.0) in node deployment reads VolumeGroupSnapshotClasses through
// the same label-filtered informer as the contents, so it sees only the
// classes labelled managed-by its node: with the class labelled for none,
// or for another node, the group snapshot is never taken ("class not
// found"). While a content of this node's is not ready, the node labels
// its class for itself. A class carries one node's label at a time: two
// nodes taking group snapshots of one class at once take turns (each
// sidecar retries with its back-off), and a node whose content is ready
// needs the class no more (deletion does not read it).
type GroupAdopter struct {
	driver, node string
	owner        GroupOwner
	client       snapclient.Interface
	recorder     record.EventRecorder
	contents     grouplisters.VolumeGroupSnapshotContentLister
	classes      grouplisters.VolumeGroupSnapshotClassLister
	synced       []cache.InformerSynced
	queue        workqueue.TypedRateLimitingInterface[string]

	mu     sync.Mutex
	warned map[types.UID]bool // contents told they span nodes
}

// GroupAdopterOptions configure a GroupAdopter.
type GroupAdopterOptions struct {
	DriverName string
	NodeName   string
	Owner      GroupOwner
	Client     snapclient.Interface
	Recorder   record.EventRecorder
	// Informers is the snapshot informer factory, for a cluster that
	// serves the groupsnapshot.storage.k8s.io/v1 API; whoever made it
	// starts it (after NewGroupAdopter).
	Informers   snapinformers.SharedInformerFactory
	RateLimiter workqueue.TypedRateLimiter[string] // default exponential, 1s to 5m
}

// NewGroupAdopter sets up the group content informer's handlers; Run does
// the work.
func NewGroupAdopter(o GroupAdopterOptions) (*GroupAdopter, error) {
	if o.DriverName == "" || o.NodeName == "" || o.Owner == nil || o.Client == nil || o.Recorder == nil || o.Informers == nil {
		return nil, errors.New("kube: the group content adopter needs a driver name, node name, owner, snapshot client, recorder and informers")
	}
	inf := o.Informers.Groupsnapshot().V1().VolumeGroupSnapshotContents()
	cls := o.Informers.Groupsnapshot().V1().VolumeGroupSnapshotClasses()
	a := &GroupAdopter{
		driver: o.DriverName, node: o.NodeName, owner: o.Owner, client: o.Client, recorder: o.Recorder,
		contents: inf.Lister(), classes: cls.Lister(), synced: []cache.InformerSynced{inf.Informer().HasSynced, cls.Informer().HasSynced},
		queue:  newQueue("csi-dmthin-group-adopter", o.RateLimiter),
		warned: map[types.UID]bool{},
	}
	add := func(obj any) {
		if c, ok := obj.(*groupv1.VolumeGroupSnapshotContent); ok && (a.unclaimed(c) || a.needsClass(c)) {
			a.queue.Add(c.Name)
		}
	}
	_, err := inf.Informer().AddEventHandler(cache.ResourceEventHandlerFuncs{
		AddFunc:    add,
		UpdateFunc: func(_, obj any) { add(obj) },
	})
	return a, err
}

func (a *GroupAdopter) unclaimed(c *groupv1.VolumeGroupSnapshotContent) bool {
	return c.Spec.Driver == a.driver && c.Labels[LabelManagedBy] == ""
}

// needsClass reports whether the content is this node's, not ready yet,
// and names a class: its sidecar must be able to read that class.
func (a *GroupAdopter) needsClass(c *groupv1.VolumeGroupSnapshotContent) bool {
	if c.Spec.Driver != a.driver || c.Labels[LabelManagedBy] != a.node || c.DeletionTimestamp != nil {
		return false
	}
	if st := c.Status; st != nil && st.ReadyToUse != nil && *st.ReadyToUse {
		return false
	}
	cl := c.Spec.VolumeGroupSnapshotClassName
	return cl != nil && *cl != ""
}

// Run labels contents with workers goroutines until ctx is done. The
// informer factory must have been started.
func (a *GroupAdopter) Run(ctx context.Context, workers int) error {
	w := &worker{name: "group-adopter", what: "group snapshot content", queue: a.queue, synced: a.synced, sync: a.sync}
	return w.run(ctx, workers, func(logger klog.Logger) {
		logger.Info("Labelling group snapshot contents of this node's volumes for its csi-snapshotter", "node", a.node)
	})
}

// mine reports whether this node holds what the content is of, and says
// what for the log and the Event; elsewhere lists the volumes this node
// lacks when it holds the group's first volume but not all of them.
func (a *GroupAdopter) mine(c *groupv1.VolumeGroupSnapshotContent) (ok bool, what string, elsewhere []string) {
	src := c.Spec.Source
	if h := src.GroupSnapshotHandles; h != nil && h.VolumeGroupSnapshotHandle != "" {
		return a.owner.HasGroupSnapshot(h.VolumeGroupSnapshotHandle), "group snapshot " + h.VolumeGroupSnapshotHandle, nil
	}
	if len(src.VolumeHandles) == 0 {
		return false, "", nil
	}
	// All of them or none: a group snapshot is of one pool of one node.
	for _, h := range src.VolumeHandles {
		if !a.owner.HasVolume(h) {
			elsewhere = append(elsewhere, h)
		}
	}
	if len(elsewhere) == 0 {
		return true, "volumes " + strings.Join(src.VolumeHandles, ", "), nil
	}
	if !a.owner.HasVolume(src.VolumeHandles[0]) {
		return false, "", nil // the first volume's node speaks, if any does
	}
	return false, "", elsewhere
}

// sync labels one content when this node holds what it is of. The patch
// carries the resourceVersion read, so a content that changed meanwhile is
// read again, not written over.
func (a *GroupAdopter) sync(ctx context.Context, name string) (retry bool, err error) {
	c, err := a.contents.Get(name)
	if apierrors.IsNotFound(err) {
		return false, nil
	}
	if err != nil {
		return false, err
	}
	if a.needsClass(c) {
		return a.claimClass(ctx, c)
	}
	if !a.unclaimed(c) {
		return false, nil
	}
	ok, what, elsewhere := a.mine(c)
	if len(elsewhere) > 0 {
		a.mu.Lock()
		said := a.warned[c.UID]
		a.warned[c.UID] = true
		a.mu.Unlock()
		if !said {
			a.recorder.Eventf(c, corev1.EventTypeWarning, ReasonGroupSpansNodes, "node %s holds %s but not %s: a group snapshot is taken of volumes of one pool on one node, so no node can take this one",
				a.node, c.Spec.Source.VolumeHandles[0], strings.Join(elsewhere, ", "))
		}
		return false, nil
	}
	if !ok {
		return false, nil // another node's, or nobody's
	}
	// The class first, so that the sidecar can read it when it sees the
	// content.
	if cl := c.Spec.VolumeGroupSnapshotClassName; cl != nil && *cl != "" {
		if retry, err := a.claimClass(ctx, c); err != nil || retry {
			return retry, err
		}
	}
	labelled, retry, err := labelForNode(ctx, a.node, c.ResourceVersion, func(ctx context.Context, patch []byte) error {
		_, err := a.client.GroupsnapshotV1().VolumeGroupSnapshotContents().Patch(ctx, name, types.MergePatchType, patch, metav1.PatchOptions{})
		return err
	})
	if !labelled {
		return retry, err
	}
	klog.FromContext(ctx).Info("Labelled a group snapshot content for this node's csi-snapshotter: the node holds what it is of", "content", name, "of", what)
	a.recorder.Eventf(c, corev1.EventTypeNormal, ReasonGroupAdopted, "node %s holds %s; labelled %s=%s so that node's csi-snapshotter manages this content", a.node, what, LabelManagedBy, a.node)
	return false, nil
}

// claimClass labels the content's class for this node when it is labelled
// for none or another, so that this node's csi-snapshotter can read it.
// The patch carries the resourceVersion read.
func (a *GroupAdopter) claimClass(ctx context.Context, c *groupv1.VolumeGroupSnapshotContent) (retry bool, err error) {
	name := *c.Spec.VolumeGroupSnapshotClassName
	cl, err := a.classes.Get(name)
	if apierrors.IsNotFound(err) {
		return false, nil // the snapshot-controller says so on the group
	}
	if err != nil {
		return false, err
	}
	if cl.Driver != a.driver || cl.Labels[LabelManagedBy] == a.node {
		return false, nil
	}
	from := cl.Labels[LabelManagedBy]
	labelled, retry, err := labelForNode(ctx, a.node, cl.ResourceVersion, func(ctx context.Context, patch []byte) error {
		_, err := a.client.GroupsnapshotV1().VolumeGroupSnapshotClasses().Patch(ctx, name, types.MergePatchType, patch, metav1.PatchOptions{})
		return err
	})
	if !labelled {
		return retry, err
	}
	klog.FromContext(ctx).Info("Labelled a group snapshot class for this node's csi-snapshotter, which reads only the classes labelled for its node", "class", name, "content", c.Name, "from", from)
	a.recorder.Eventf(c, corev1.EventTypeNormal, ReasonGroupClassClaimed, "labelled class %s %s=%s (was %q): node %s's csi-snapshotter reads only the group snapshot classes labelled for it", name, LabelManagedBy, a.node, from, a.node)
	return false, nil
}
