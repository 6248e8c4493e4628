package kube

import (
	"context"
	"strings"
	"testing"
	"time"

	snapv1 "github.com/kubernetes-csi/external-snapshotter/client/v8/apis/volumesnapshot/v1"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
	k8stesting "k8s.io/client-go/testing"
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

// adopter is the controller's content adopter over the fake cluster.
type adopter struct {
	a   *Adopter
	rec *eventLog
}

func startAdopter(t *testing.T, c *cluster) *adopter {
	t.Helper()
	n := startController(t, c, false)
	return &adopter{a: n.c.adopter, rec: n.rec}
}

// sync decides for one content once the cache has it.
func (n *adopter) sync(t *testing.T, name string) bool {
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

// A pre-provisioned content is labelled for the node its handle names,
// once.
func TestAdopterLabelsPreProvisionedContentForItsNode(t *testing.T) {
	c := newCluster(t)
	c.create(t, preProvisioned("imported-content", nodeB+"/alpha/snap-1"))
	a := startAdopter(t, c)
	if a.sync(t, "imported-content") {
		t.Error("asked to retry after labelling")
	}
	if got := c.contentLabel(t, "imported-content"); got != nodeB {
		t.Fatalf("managed-by = %q, want %q", got, nodeB)
	}
	ev := a.rec.take()
	if len(ev) != 1 || !strings.HasPrefix(ev[0], "Normal "+ReasonAdopted) || !strings.Contains(ev[0], "node "+nodeB) {
		t.Errorf("events %q, want one %s naming the node", ev, ReasonAdopted)
	}
	// Labelled now: not touched again.
	eventually(t, "the label in the cache", func() bool {
		vsc, err := a.a.contents.Get("imported-content")
		return err == nil && vsc.Labels[LabelManagedBy] == nodeB
	})
	a.sync(t, "imported-content")
	if n := c.contentPatches(); n != 1 {
		t.Errorf("%d content patches, want 1", n)
	}
}

// A content made from a volume without the label (the snapshot-controller
// ran without distributed snapshotting) goes to the volume's node by its
// PV; contents already labelled, or of another driver, are left alone; a
// handle without a node and no PV: a Warning, once, and another look
// later.
func TestAdopterVolumeSourceAndLeftAlone(t *testing.T) {
	c := newCluster(t)
	fromVolume := content("dynamic-content", "snap-1", "alpha/snap-1", "")
	labelled := content("labelled-content", "snap-2", "alpha/snap-2", nodeB)
	foreign := preProvisioned("foreign-content", nodeA+"/alpha/snap-3")
	foreign.Spec.Driver = "ebs.csi.aws.com"
	unknown := preProvisioned("old-handle-content", "alpha/snap-4") // made before handles named their node
	c.create(t, volume("pv-src", "alpha/pvc-src", nodeA, "src"), fromVolume, labelled, foreign, unknown)
	a := startAdopter(t, c)
	for _, name := range []string{"dynamic-content", "labelled-content", "foreign-content"} {
		if a.sync(t, name) {
			t.Errorf("%s: retry asked", name)
		}
	}
	for range 2 {
		if !a.sync(t, "old-handle-content") {
			t.Error("no retry for a content whose node may yet be named")
		}
	}
	for name, want := range map[string]string{"dynamic-content": nodeA, "labelled-content": nodeB, "foreign-content": "", "old-handle-content": ""} {
		if got := c.contentLabel(t, name); got != want {
			t.Errorf("%s labelled %q, want %q", name, got, want)
		}
	}
	if n := c.contentPatches(); n != 1 {
		t.Errorf("%d content patches, want 1", n)
	}
	ev := a.rec.take()
	if len(ev) != 2 || count(ev, "Normal "+ReasonAdopted) != 1 || count(ev, "Warning "+ReasonContentNodeUnknown) != 1 {
		t.Errorf("events %q, want one %s and one %s", ev, ReasonAdopted, ReasonContentNodeUnknown)
	}
}

// A content that changed since it was read is read again, not written over.
func TestAdopterRetriesOnConflict(t *testing.T) {
	c := newCluster(t)
	c.create(t, preProvisioned("imported-content", nodeA+"/alpha/snap-1"))
	c.snap.PrependReactor("patch", "volumesnapshotcontents", func(k8stesting.Action) (bool, runtime.Object, error) {
		return true, nil, apierrors.NewConflict(schema.GroupResource{Group: snapshotGroup, Resource: "volumesnapshotcontents"}, "imported-content", nil)
	})
	a := startAdopter(t, c)
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
	startController(t, c, true)
	c.create(t, preProvisioned("imported-content", nodeA+"/alpha/snap-1"))
	deadline := time.Now().Add(10 * time.Second)
	for c.contentLabel(t, "imported-content") != nodeA {
		if time.Now().After(deadline) {
			t.Fatal("Run did not label the new content")
		}
		time.Sleep(5 * time.Millisecond)
	}
}
