package kube

import (
	"context"
	"errors"
	"maps"
	"slices"
	"strings"
	"sync"

	groupv1 "github.com/kubernetes-csi/external-snapshotter/client/v8/apis/volumegroupsnapshot/v1"
	snapclient "github.com/kubernetes-csi/external-snapshotter/client/v8/clientset/versioned"
	grouplisters "github.com/kubernetes-csi/external-snapshotter/client/v8/listers/volumegroupsnapshot/v1"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/tools/cache"
	"k8s.io/client-go/tools/record"
	"k8s.io/client-go/util/workqueue"
	"k8s.io/klog/v2"

	"github.com/csi-dmthin/csi-dmthin/pkg/csi"
)

// Events on VolumeGroupSnapshotContents.
const (
	// ReasonGroupAdopted (Normal): labelled for the csi-snapshotter of the
	// node that holds what it is of.
	ReasonGroupAdopted = "GroupSnapshotContentAdopted"
	// ReasonGroupSpansNodes (Warning): the group's volumes are not all on
	// one node; no node can take it.
	ReasonGroupSpansNodes = "GroupSnapshotSpansNodes"
	// ReasonGroupNodeUnknown (Warning): no record names the node of some of
	// what it is of.
	ReasonGroupNodeUnknown = "GroupSnapshotNodeUnknown"
	// ReasonGroupClassClaimed (Normal): labelled the content's group
	// snapshot class for the content's node, so its csi-snapshotter can
	// read it.
	ReasonGroupClassClaimed = "GroupSnapshotClassClaimed"
)

// GroupAdopter gives each node's csi-snapshotter the VolumeGroupSnapshot
// contents of our driver that hold that node's volumes.
//
// In distributed snapshotting each node's csi-snapshotter watches only the
// contents labelled managed-by its node, and the snapshot-controller (as of
// v8.7.0) labels the VolumeSnapshotContents it makes but never a
// VolumeGroupSnapshotContent: without this, no group snapshot of a driver
// deployed per node would ever be taken, and none deleted. A content is
// labelled with the node that holds every volume of the group (their PVs'
// node affinity) or, pre-provisioned, every snapshot of it (their handles
// name their node); a group of volumes on several nodes is labelled for
// none, and the content says why (an Event).
//
// It also hands the content's class to the node. The csi-snapshotter (as
// of v8.7.0) in node deployment reads VolumeGroupSnapshotClasses through
// the same label-filtered informer as the contents, so it sees only the
// classes labelled managed-by its node: with the class labelled for none,
// or for another node, the group snapshot is never taken ("class not
// found"). While a content is not ready, its class is labelled for the
// content's node. A class carries one node's label at a time: two nodes
// taking group snapshots of one class at once take turns (each sidecar
// retries with its back-off), and a node whose content is ready needs the
// class no more (deletion does not read it).
type GroupAdopter struct {
	driver   string
	client   snapclient.Interface
	recorder record.EventRecorder
	view     *View
	contents grouplisters.VolumeGroupSnapshotContentLister
	classes  grouplisters.VolumeGroupSnapshotClassLister
	synced   []cache.InformerSynced
	queue    workqueue.TypedRateLimitingInterface[string]

	mu     sync.Mutex
	warned map[types.UID]bool // contents told they have no single node
}

// GroupAdopterOptions configure a GroupAdopter.
type GroupAdopterOptions struct {
	DriverName  string
	Client      snapclient.Interface
	Recorder    record.EventRecorder
	View        *View                              // with the group snapshot informers
	RateLimiter workqueue.TypedRateLimiter[string] // default exponential, 1s to 5m
}

// NewGroupAdopter sets up the group content informer's handlers; Run does
// the work.
func NewGroupAdopter(o GroupAdopterOptions) (*GroupAdopter, error) {
	if o.DriverName == "" || o.Client == nil || o.Recorder == nil || o.View == nil || !o.View.groupAPI {
		return nil, errors.New("kube: the group content adopter needs a driver name, snapshot client, recorder and a view with the group snapshot informers")
	}
	inf := o.View.snapInf.Groupsnapshot().V1().VolumeGroupSnapshotContents()
	cls := o.View.snapInf.Groupsnapshot().V1().VolumeGroupSnapshotClasses()
	a := &GroupAdopter{
		driver: o.DriverName, client: o.Client, recorder: o.Recorder, view: o.View,
		contents: inf.Lister(), classes: cls.Lister(),
		synced: append(slices.Clone(o.View.synced), inf.Informer().HasSynced, cls.Informer().HasSynced),
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

// needsClass reports whether the content is labelled for a node, not
// ready yet, and names a class: that node's sidecar must be able to read
// the class.
func (a *GroupAdopter) needsClass(c *groupv1.VolumeGroupSnapshotContent) bool {
	if c.Spec.Driver != a.driver || c.Labels[LabelManagedBy] == "" || c.DeletionTimestamp != nil {
		return false
	}
	if st := c.Status; st != nil && st.ReadyToUse != nil && *st.ReadyToUse {
		return false
	}
	cl := c.Spec.VolumeGroupSnapshotClassName
	return cl != nil && *cl != ""
}

// Run labels contents with workers goroutines until ctx is done. The
// informer factories must have been started.
func (a *GroupAdopter) Run(ctx context.Context, workers int) error {
	w := &worker{name: "group-adopter", what: "group snapshot content", queue: a.queue, synced: a.synced, sync: a.sync}
	return w.run(ctx, workers, func(logger klog.Logger) {
		logger.Info("Labelling group snapshot contents for the csi-snapshotter of the node that holds their volumes")
	})
}

// node returns the node that holds what the content is of, and says what
// for the log and the Event. With no single node, problem says why:
// members on several nodes (spans), or one whose node no record names.
func (a *GroupAdopter) node(c *groupv1.VolumeGroupSnapshotContent) (node, what, problem string, spans bool) {
	src := c.Spec.Source
	var handles []string
	nodeOf := a.view.volumeNode
	what = "volumes"
	if h := src.GroupSnapshotHandles; h != nil && h.VolumeGroupSnapshotHandle != "" {
		handles, what = h.VolumeSnapshotHandles, "group snapshot "+h.VolumeGroupSnapshotHandle+" of snapshots"
		nodeOf = func(h string) string {
			n, _, _ := csi.SnapshotNode(h)
			return n
		}
	} else {
		handles = src.VolumeHandles
	}
	if len(handles) == 0 {
		return "", "", "it names no volume or snapshot handles", false
	}
	what += " " + strings.Join(handles, ", ")
	byNode := map[string][]string{}
	for _, h := range handles {
		n := nodeOf(h)
		byNode[n] = append(byNode[n], h)
	}
	if unknown := byNode[""]; len(unknown) > 0 {
		return "", what, "no record names the node of " + strings.Join(unknown, ", "), false
	}
	if len(byNode) > 1 {
		var parts []string
		for _, n := range slices.Sorted(maps.Keys(byNode)) {
			parts = append(parts, "node "+n+" holds "+strings.Join(byNode[n], ", "))
		}
		return "", what, strings.Join(parts, "; ") + ": a group snapshot is taken of volumes of one pool on one node, so no node can take this one", true
	}
	for n := range byNode {
		node = n
	}
	return node, what, "", false
}

// sync labels one content for the node that holds what it is of. The
// patch carries the resourceVersion read, so a content that changed
// meanwhile is read again, not written over.
func (a *GroupAdopter) sync(ctx context.Context, name string) (retry bool, err error) {
	c, err := a.contents.Get(name)
	if apierrors.IsNotFound(err) {
		return false, nil
	}
	if err != nil {
		return false, err
	}
	if a.needsClass(c) {
		return a.claimClass(ctx, c, c.Labels[LabelManagedBy])
	}
	if !a.unclaimed(c) {
		return false, nil
	}
	node, what, problem, spans := a.node(c)
	if problem != "" {
		a.mu.Lock()
		said := a.warned[c.UID]
		a.warned[c.UID] = true
		a.mu.Unlock()
		reason := ReasonGroupNodeUnknown
		if spans {
			reason = ReasonGroupSpansNodes
		}
		if !said {
			a.recorder.Event(c, corev1.EventTypeWarning, reason, problem)
		}
		return !spans, nil // a PV may yet appear; a group across nodes stays so
	}
	// The class first, so that the sidecar can read it when it sees the
	// content.
	if cl := c.Spec.VolumeGroupSnapshotClassName; cl != nil && *cl != "" {
		if retry, err := a.claimClass(ctx, c, node); err != nil || retry {
			return retry, err
		}
	}
	labelled, retry, err := labelForNode(ctx, node, c.ResourceVersion, func(ctx context.Context, patch []byte) error {
		_, err := a.client.GroupsnapshotV1().VolumeGroupSnapshotContents().Patch(ctx, name, types.MergePatchType, patch, metav1.PatchOptions{})
		return err
	})
	if !labelled {
		return retry, err
	}
	klog.FromContext(ctx).Info("Labelled a group snapshot content for the csi-snapshotter of the node that holds what it is of", "content", name, "node", node, "of", what)
	a.recorder.Eventf(c, corev1.EventTypeNormal, ReasonGroupAdopted, "node %s holds %s; labelled %s=%s so that node's csi-snapshotter manages this content", node, what, LabelManagedBy, node)
	return false, nil
}

// claimClass labels the content's class for node when it is labelled for
// none or another, so that node's csi-snapshotter can read it. The patch
// carries the resourceVersion read.
func (a *GroupAdopter) claimClass(ctx context.Context, c *groupv1.VolumeGroupSnapshotContent, node string) (retry bool, err error) {
	name := *c.Spec.VolumeGroupSnapshotClassName
	cl, err := a.classes.Get(name)
	if apierrors.IsNotFound(err) {
		return false, nil // the snapshot-controller says so on the group
	}
	if err != nil {
		return false, err
	}
	if cl.Driver != a.driver || cl.Labels[LabelManagedBy] == node {
		return false, nil
	}
	from := cl.Labels[LabelManagedBy]
	labelled, retry, err := labelForNode(ctx, node, cl.ResourceVersion, func(ctx context.Context, patch []byte) error {
		_, err := a.client.GroupsnapshotV1().VolumeGroupSnapshotClasses().Patch(ctx, name, types.MergePatchType, patch, metav1.PatchOptions{})
		return err
	})
	if !labelled {
		return retry, err
	}
	klog.FromContext(ctx).Info("Labelled a group snapshot class for a node's csi-snapshotter, which reads only the classes labelled for its node", "class", name, "node", node, "content", c.Name, "from", from)
	a.recorder.Eventf(c, corev1.EventTypeNormal, ReasonGroupClassClaimed, "labelled class %s %s=%s (was %q): node %s's csi-snapshotter reads only the group snapshot classes labelled for it", name, LabelManagedBy, node, from, node)
	return false, nil
}
