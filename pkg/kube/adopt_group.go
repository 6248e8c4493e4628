package kube

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
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
	// ReasonGroupClassNotForNode (Warning): the content names a class that
	// no node's csi-snapshotter sees; the node's own class would work.
	ReasonGroupClassNotForNode = "GroupSnapshotClassNotForNode"
)

// LabelGroupClassOf names, on a node's copy of a VolumeGroupSnapshotClass,
// the class it was copied from.
const LabelGroupClassOf = "dmthin.io/group-class-of"

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
// It also keeps this node's copy of each of the driver's group snapshot
// classes. The csi-snapshotter (as of v8.7.0) in node deployment reads
// VolumeGroupSnapshotClasses through the same label-filtered informer as
// the contents, so it sees only the classes labelled managed-by its node:
// with a class labelled for none, no group snapshot is ever taken ("class
// not found"). A class can carry one node's label, and a group is of one
// node's volumes anyway, so each node keeps "<class>-<node>", labelled for
// itself and owned by its Node object (deleted with it); a
// VolumeGroupSnapshot names the class of its volumes' node.
type GroupAdopter struct {
	driver, node string
	nodeUID      types.UID
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
	// NodeUID, when known, makes the node's Node object the owner of the
	// node's group snapshot classes.
	NodeUID  types.UID
	Owner    GroupOwner
	Client   snapclient.Interface
	Recorder record.EventRecorder
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
		driver: o.DriverName, node: o.NodeName, nodeUID: o.NodeUID, owner: o.Owner, client: o.Client, recorder: o.Recorder,
		contents: inf.Lister(), classes: cls.Lister(), synced: []cache.InformerSynced{inf.Informer().HasSynced, cls.Informer().HasSynced},
		queue:  newQueue("csi-dmthin-group-adopter", o.RateLimiter),
		warned: map[types.UID]bool{},
	}
	add := func(obj any) {
		if c, ok := obj.(*groupv1.VolumeGroupSnapshotContent); ok && a.unclaimed(c) {
			a.queue.Add(c.Name)
		}
	}
	_, err := inf.Informer().AddEventHandler(cache.ResourceEventHandlerFuncs{
		AddFunc:    add,
		UpdateFunc: func(_, obj any) { add(obj) },
	})
	if err != nil {
		return nil, err
	}
	// A class of the driver labelled for no node is one to copy; a copy of
	// this node's that goes away is made again.
	addClass := func(obj any) {
		c, ok := obj.(*groupv1.VolumeGroupSnapshotClass)
		switch {
		case !ok || c.Driver != a.driver:
		case c.Labels[LabelManagedBy] == "":
			a.queue.Add(classKey + c.Name)
		case c.Labels[LabelManagedBy] == a.node && c.Labels[LabelGroupClassOf] != "":
			a.queue.Add(classKey + c.Labels[LabelGroupClassOf])
		}
	}
	_, err = cls.Informer().AddEventHandler(cache.ResourceEventHandlerFuncs{
		AddFunc:    addClass,
		UpdateFunc: func(_, obj any) { addClass(obj) },
		DeleteFunc: func(obj any) {
			if d, ok := obj.(cache.DeletedFinalStateUnknown); ok {
				obj = d.Obj
			}
			addClass(obj)
		},
	})
	return a, err
}

// classKey prefixes the queue's class keys; a content's name cannot hold
// a slash.
const classKey = "class/"

// NodeGroupClassName is the name of a node's copy of a group snapshot
// class: "<class>-<node>", or, past the 253 characters a name may have,
// cut and ended with a hash of the whole.
func NodeGroupClassName(class, node string) string {
	name := class + "-" + node
	if len(name) <= 253 {
		return name
	}
	sum := sha256.Sum256([]byte(name))
	return name[:253-17] + "-" + hex.EncodeToString(sum[:8])
}

// syncClass makes this node's copy of the class when it is missing. A copy
// that exists is left as it is (the class's parameters cannot change).
func (a *GroupAdopter) syncClass(ctx context.Context, name string) (retry bool, err error) {
	c, err := a.classes.Get(name)
	if apierrors.IsNotFound(err) {
		return false, nil
	}
	if err != nil {
		return false, err
	}
	if c.Driver != a.driver || c.Labels[LabelManagedBy] != "" {
		return false, nil
	}
	copyName := NodeGroupClassName(name, a.node)
	if _, err := a.classes.Get(copyName); err == nil {
		return false, nil
	}
	cp := &groupv1.VolumeGroupSnapshotClass{
		ObjectMeta: metav1.ObjectMeta{
			Name:   copyName,
			Labels: map[string]string{LabelManagedBy: a.node, LabelGroupClassOf: name},
			Annotations: map[string]string{
				"dmthin.io/description": "Group snapshots of volumes on node " + a.node + ", as class " + name + " (csi-dmthin keeps it)",
			},
		},
		Driver:         c.Driver,
		Parameters:     c.Parameters,
		DeletionPolicy: c.DeletionPolicy,
	}
	if a.nodeUID != "" {
		cp.OwnerReferences = []metav1.OwnerReference{{APIVersion: "v1", Kind: "Node", Name: a.node, UID: a.nodeUID}}
	}
	_, err = a.client.GroupsnapshotV1().VolumeGroupSnapshotClasses().Create(ctx, cp, metav1.CreateOptions{})
	if apierrors.IsAlreadyExists(err) {
		return false, nil
	}
	if err != nil {
		return false, fmt.Errorf("group snapshot class %s for node %s: %w", copyName, a.node, err)
	}
	klog.FromContext(ctx).Info("Made this node's group snapshot class, which its csi-snapshotter can see", "class", copyName, "from", name)
	return false, nil
}

func (a *GroupAdopter) unclaimed(c *groupv1.VolumeGroupSnapshotContent) bool {
	return c.Spec.Driver == a.driver && c.Labels[LabelManagedBy] == ""
}

// Run labels contents with workers goroutines until ctx is done. The
// informer factory must have been started.
func (a *GroupAdopter) Run(ctx context.Context, workers int) error {
	sync := func(ctx context.Context, key string) (bool, error) {
		if name, ok := strings.CutPrefix(key, classKey); ok {
			return a.syncClass(ctx, name)
		}
		return a.sync(ctx, key)
	}
	w := &worker{name: "group-adopter", what: "group snapshot content or class", queue: a.queue, synced: a.synced, sync: sync}
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
	labelled, retry, err := labelForNode(ctx, a.node, c.ResourceVersion, func(ctx context.Context, patch []byte) error {
		_, err := a.client.GroupsnapshotV1().VolumeGroupSnapshotContents().Patch(ctx, name, types.MergePatchType, patch, metav1.PatchOptions{})
		return err
	})
	if !labelled {
		return retry, err
	}
	klog.FromContext(ctx).Info("Labelled a group snapshot content for this node's csi-snapshotter: the node holds what it is of", "content", name, "of", what)
	a.recorder.Eventf(c, corev1.EventTypeNormal, ReasonGroupAdopted, "node %s holds %s; labelled %s=%s so that node's csi-snapshotter manages this content", a.node, what, LabelManagedBy, a.node)
	if class := c.Spec.VolumeGroupSnapshotClassName; class != nil && *class != "" {
		if cl, err := a.classes.Get(*class); err == nil && cl.Labels[LabelManagedBy] != a.node {
			a.recorder.Eventf(c, corev1.EventTypeWarning, ReasonGroupClassNotForNode,
				"class %s is not labelled %s=%s, and node %s's csi-snapshotter sees only the group snapshot classes labelled for it: this group snapshot waits; take it again with class %s",
				*class, LabelManagedBy, a.node, a.node, NodeGroupClassName(*class, a.node))
		}
	}
	return false, nil
}
