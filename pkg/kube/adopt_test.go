package kube

import (
	"context"
	"strings"
	"testing"
	"time"

	snapv1 "github.com/kubernetes-csi/external-snapshotter/client/v8/apis/volumesnapshot/v1"
	snapinformers "github.com/kubernetes-csi/external-snapshotter/client/v8/informers/externalversions"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
	k8stesting "k8s.io/client-go/testing"
	"k8s.io/client-go/tools/cache"
)

// preProvisioned is a content an operator makes for an existing snapshot:
// a snapshot handle, no status, no label.
func preProvisioned(name, handle string) *snapv1.VolumeSnapshotContent {
	return &snapv1.VolumeSnapshotContent{
		ObjectMeta: metav1.ObjectMeta{Name: name, ResourceVersion: "1"},
		Spec: snapv1.VolumeSnapshotContentSpec{
			Driver:            driverName,
			DeletionPolicy:    snapv1.VolumeSnapshotContentDelete,
			VolumeSnapshotRef: corev1.ObjectReference{Kind: "VolumeSnapshot", Namespace: ns, Name: "imported"},
			Source:            snapv1.VolumeSnapshotContentSource{SnapshotHandle: ptr(handle)},
		},
	}
}

type adopterNode struct {
	a   *Adopter
	rec *eventLog
}

func startAdopter(t *testing.T, c *cluster, name string, owner Owner) *adopterNode {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	inf := snapinformers.NewSharedInformerFactory(c.snap, 0)
	rec := &eventLog{}
	a, err := NewAdopter(AdopterOptions{DriverName: driverName, NodeName: name, Owner: owner, Client: c.snap, Recorder: rec, Informers: inf})
	if err != nil {
		t.Fatal(err)
	}
	inf.Start(ctx.Done())
	t.Cleanup(func() { cancel(); inf.Shutdown() })
	if !cache.WaitForCacheSync(ctx.Done(), a.synced) {
		t.Fatal("caches did not sync")
	}
	return &adopterNode{a: a, rec: rec}
}

// sync decides for one content once the node's cache has it.
func (n *adopterNode) sync(t *testing.T, name string) bool {
	t.Helper()
	eventually(t, "the content in the cache", func() bool {
		_, err := n.a.contents.Get(name)
		return err == nil
	})
	retry, err := n.a.sync(context.Background(), name)
	if err != nil {
		t.Fatal(err)
	}
	return retry
}

func (c *cluster) contentLabel(t *testing.T, name string) string {
	t.Helper()
	vsc, err := c.snap.SnapshotV1().VolumeSnapshotContents().Get(context.Background(), name, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	return vsc.Labels[LabelManagedBy]
}

func (c *cluster) contentPatches() int {
	return countActions(c.snap.Actions(), "patch", "volumesnapshotcontents")
}

// A pre-provisioned content is labelled by the node that holds its
// snapshot, and only by that node, once.
func TestAdopterLabelsPreProvisionedContentOnItsNode(t *testing.T) {
	c := newCluster(t)
	c.create(t, preProvisioned("imported-content", "alpha/snap-1"))
	a := startAdopter(t, c, nodeA, owning("alpha/snap-1"))
	b := startAdopter(t, c, nodeB, owning("beta/snap-9"))

	if b.sync(t, "imported-content") {
		t.Error("node-b asked to retry a content it does not hold")
	}
	if got := c.contentLabel(t, "imported-content"); got != "" {
		t.Fatalf("node-b labelled it %q", got)
	}
	if a.sync(t, "imported-content") {
		t.Error("node-a asked to retry after labelling")
	}
	if got := c.contentLabel(t, "imported-content"); got != nodeA {
		t.Fatalf("managed-by = %q, want %q", got, nodeA)
	}
	ev := a.rec.take()
	if len(ev) != 1 || !strings.HasPrefix(ev[0], "Normal "+ReasonAdopted) || !strings.Contains(ev[0], "alpha/snap-1") {
		t.Errorf("node-a events %q, want one %s naming the snapshot", ev, ReasonAdopted)
	}
	if ev := b.rec.take(); len(ev) != 0 {
		t.Errorf("node-b events %q", ev)
	}
	// Labelled now: neither node touches it again.
	eventually(t, "the label in node-a's cache", func() bool {
		vsc, err := a.a.contents.Get("imported-content")
		return err == nil && vsc.Labels[LabelManagedBy] == nodeA
	})
	a.sync(t, "imported-content")
	if n := c.contentPatches(); n != 1 {
		t.Errorf("%d content patches, want 1", n)
	}
}

// A content made from a volume without the label (the snapshot-controller
// ran without distributed snapshotting) goes to the volume's node; contents
// already labelled, or of another driver, are left alone.
func TestAdopterVolumeSourceAndLeftAlone(t *testing.T) {
	c := newCluster(t)
	fromVolume := content("dynamic-content", "snap-1", "alpha/snap-1", "")
	labelled := content("labelled-content", "snap-2", "alpha/snap-2", nodeB)
	foreign := preProvisioned("foreign-content", "alpha/snap-3")
	foreign.Spec.Driver = "ebs.csi.aws.com"
	c.create(t, fromVolume, labelled, foreign)
	a := startAdopter(t, c, nodeA, owning("alpha/pvc-src", "alpha/snap-2", "alpha/snap-3"))
	for _, name := range []string{"dynamic-content", "labelled-content", "foreign-content"} {
		a.sync(t, name)
	}
	if got := c.contentLabel(t, "dynamic-content"); got != nodeA {
		t.Errorf("content from a volume of node-a labelled %q", got)
	}
	if got := c.contentLabel(t, "labelled-content"); got != nodeB {
		t.Errorf("a content labelled for node-b now says %q", got)
	}
	if got := c.contentLabel(t, "foreign-content"); got != "" {
		t.Errorf("another driver's content labelled %q", got)
	}
	if n := c.contentPatches(); n != 1 {
		t.Errorf("%d content patches, want 1", n)
	}
}

// A content that changed since it was read is read again, not written over.
func TestAdopterRetriesOnConflict(t *testing.T) {
	c := newCluster(t)
	c.create(t, preProvisioned("imported-content", "alpha/snap-1"))
	c.snap.PrependReactor("patch", "volumesnapshotcontents", func(k8stesting.Action) (bool, runtime.Object, error) {
		return true, nil, apierrors.NewConflict(schema.GroupResource{Group: snapshotGroup, Resource: "volumesnapshotcontents"}, "imported-content", nil)
	})
	a := startAdopter(t, c, nodeA, owning("alpha/snap-1"))
	if !a.sync(t, "imported-content") {
		t.Error("no retry after a conflict")
	}
	if got := c.contentLabel(t, "imported-content"); got != "" {
		t.Errorf("labelled %q despite the conflict", got)
	}
	if ev := a.rec.take(); len(ev) != 0 {
		t.Errorf("events after a conflict: %q", ev)
	}
}

// Run picks a new content up from the informer by itself.
func TestAdopterRunLabelsNewContent(t *testing.T) {
	c := newCluster(t)
	a := startAdopter(t, c, nodeA, owning("alpha/snap-1"))
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- a.a.Run(ctx, 1) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("Run: %v", err)
		}
	})
	c.create(t, preProvisioned("imported-content", "alpha/snap-1"))
	deadline := time.Now().Add(10 * time.Second)
	for c.contentLabel(t, "imported-content") != nodeA {
		if time.Now().After(deadline) {
			t.Fatal("Run did not label the new content")
		}
		time.Sleep(5 * time.Millisecond)
	}
}
