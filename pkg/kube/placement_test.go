package kube

import (
	"context"
	"fmt"
	"strings"
	"testing"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	k8stesting "k8s.io/client-go/testing"

	"github.com/csi-dmthin/csi-dmthin/pkg/thinpool"
)

// count returns how many events start with prefix ("Warning RestoreSourceMissing").
func count(events []string, prefix string) int {
	n := 0
	for _, e := range events {
		if strings.HasPrefix(e, prefix) {
			n++
		}
	}
	return n
}

func wantNoEvents(t *testing.T, n *node) {
	t.Helper()
	if ev := n.events(); len(ev) != 0 {
		t.Errorf("%s recorded %q, want nothing", n.name, ev)
	}
}

func TestRestoreFromSnapshotOwnedHereSelectsThisNode(t *testing.T) {
	c := newCluster(t)
	c.create(t, wffc, snapshot("snap-1", "content-1", true), content("content-1", "snap-1", "alpha/snap-1", nodeA),
		claim("restore", wffc.Name, fromSnapshot("snap-1")))
	a := startNode(t, c, nodeA, owning("alpha/snap-1"), false)
	b := startNode(t, c, nodeB, owning(), false)

	if b.sync(t, c, "restore") {
		t.Error("node-b asked to retry a restore it does not hold")
	}
	if retry := a.sync(t, c, "restore"); retry {
		t.Error("node-a asked to retry after placing")
	}
	if got := c.pvc(t, "restore").Annotations[AnnSelectedNode]; got != nodeA {
		t.Fatalf("selected-node = %q, want %q", got, nodeA)
	}
	if ev := a.events(); len(ev) != 1 || count(ev, "Normal "+ReasonSourceNode) != 1 || !strings.Contains(ev[0], "alpha/snap-1") {
		t.Errorf("node-a events = %q, want one %s naming the snapshot", ev, ReasonSourceNode)
	}
	wantNoEvents(t, b)
	// Placed: nothing more to do on either node.
	a.sync(t, c, "restore")
	b.sync(t, c, "restore")
	if n := c.pvcUpdates(); n != 1 {
		t.Errorf("%d PVC updates, want 1", n)
	}
}

func TestRestoreOwnedElsewhereIsLeftAlone(t *testing.T) {
	c := newCluster(t)
	c.create(t, wffc, snapshot("snap-1", "content-1", true), content("content-1", "snap-1", "alpha/snap-1", nodeA),
		claim("restore", wffc.Name, fromSnapshot("snap-1")))
	b := startNode(t, c, nodeB, owning("alpha/snap-other"), false)
	if b.sync(t, c, "restore") {
		t.Error("retry asked for a source held elsewhere")
	}
	if got, ok := c.pvc(t, "restore").Annotations[AnnSelectedNode]; ok {
		t.Errorf("selected-node set to %q by a node without the source", got)
	}
	if n := c.pvcUpdates(); n != 0 {
		t.Errorf("%d PVC updates, want none", n)
	}
	wantNoEvents(t, b)
}

func TestRestoreWaitsForTheSnapshotToBind(t *testing.T) {
	c := newCluster(t)
	c.create(t, wffc, snapshot("snap-1", "", false), claim("restore", wffc.Name, fromSnapshot("snap-1")))
	a := startNode(t, c, nodeA, owning("alpha/snap-1"), true) // workers running
	key := ns + "/restore"
	eventually(t, "the unbound snapshot's PVC to be requeued", func() bool { return a.p.queue.NumRequeues(key) >= 2 })
	if _, ok := c.pvc(t, "restore").Annotations[AnnSelectedNode]; ok {
		t.Fatal("placed before the snapshot was bound")
	}

	// The snapshotter binds it.
	ctx := context.Background()
	c.create(t, content("content-1", "snap-1", "alpha/snap-1", nodeA))
	vs, err := c.snap.SnapshotV1().VolumeSnapshots(ns).Get(ctx, "snap-1", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	vs.Status = snapshot("snap-1", "content-1", true).Status
	if _, err := c.snap.SnapshotV1().VolumeSnapshots(ns).UpdateStatus(ctx, vs, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	eventually(t, "selected-node after binding", func() bool { return c.pvc(t, "restore").Annotations[AnnSelectedNode] == nodeA })
	eventually(t, "the queue to forget the PVC", func() bool { return a.p.queue.NumRequeues(key) == 0 })
	if n := c.pvcUpdates(); n != 1 {
		t.Errorf("%d PVC updates, want 1", n)
	}
	if ev := a.events(); count(ev, "Warning") != 0 || count(ev, "Normal "+ReasonSourceNode) != 1 {
		t.Errorf("events = %q", ev)
	}
}

func TestMissingSourceIsReportedByOneNode(t *testing.T) {
	t.Run("records name the node", func(t *testing.T) {
		// The content says node-a holds alpha/snap-1, and node-a does not.
		c := newCluster(t)
		c.create(t, wffc, snapshot("snap-1", "content-1", true), content("content-1", "snap-1", "alpha/snap-1", nodeA),
			claim("restore", wffc.Name, fromSnapshot("snap-1")))
		a := startNode(t, c, nodeA, owning(), false)
		b := startNode(t, c, nodeB, owning(), false)
		for range 3 {
			a.sync(t, c, "restore")
			b.sync(t, c, "restore")
		}
		ev := a.events()
		if len(ev) != 1 || count(ev, "Warning "+ReasonSourceMissing) != 1 || !strings.Contains(ev[0], "PersistentVolumeClaim/db/restore@uid-restore:") || !strings.Contains(ev[0], "alpha/snap-1") {
			t.Errorf("node-a events = %q, want one %s on the PVC", ev, ReasonSourceMissing)
		}
		wantNoEvents(t, b)
		if _, ok := c.pvc(t, "restore").Annotations[AnnSelectedNode]; ok {
			t.Error("a missing source was placed")
		}
	})
	t.Run("the content's source PV names the node", func(t *testing.T) {
		// No managed-by label (distributed snapshotting off): the PV whose
		// handle the content came from names node-b.
		c := newCluster(t)
		c.create(t, wffc, volume("pv-src", "alpha/pvc-src", nodeB, "src"), snapshot("snap-1", "content-1", true),
			content("content-1", "snap-1", "alpha/snap-1", ""), claim("restore", wffc.Name, fromSnapshot("snap-1")))
		a := startNode(t, c, nodeA, owning(), false)
		b := startNode(t, c, nodeB, owning(), false)
		for range 2 {
			a.sync(t, c, "restore")
			b.sync(t, c, "restore")
		}
		wantNoEvents(t, a)
		if ev := b.events(); len(ev) != 1 || count(ev, "Warning "+ReasonSourceMissing) != 1 {
			t.Errorf("node-b events = %q, want one %s", ev, ReasonSourceMissing)
		}
	})
	t.Run("no record names a node", func(t *testing.T) {
		// The VolumeSnapshot itself is gone: the nodes race on the PVC.
		c := newCluster(t)
		c.create(t, wffc, claim("restore", wffc.Name, fromSnapshot("gone")))
		a := startNode(t, c, nodeA, owning(), false)
		b := startNode(t, c, nodeB, owning(), false)
		// Both decide on the same resourceVersion: node-b's cached copy is
		// taken before node-a writes, which is the race the mark settles.
		rv := c.pvc(t, "restore").ResourceVersion
		b.waitCache(t, c, "restore")
		stale, err := b.p.pvcs.PersistentVolumeClaims(ns).Get("restore")
		if err != nil {
			t.Fatal(err)
		}
		if a.sync(t, c, "restore") {
			t.Error("the winner asked to look again")
		}
		if c.pvc(t, "restore").ResourceVersion == rv {
			t.Fatal("nobody marked the PVC")
		}
		src, _ := b.p.resolve(stale)
		retry, err := b.p.speakAboutGone(context.Background(), stale, src, "msg")
		if err != nil || !retry {
			t.Errorf("the loser: retry %v, err %v; want a conflict and another look", retry, err)
		}
		// The loser looks again, sees the mark and stays silent.
		b.sync(t, c, "restore")
		a.sync(t, c, "restore")
		if ev := a.events(); len(ev) != 1 || count(ev, "Warning "+ReasonSourceMissing) != 1 || !strings.Contains(ev[0], "VolumeSnapshot db/gone") {
			t.Errorf("node-a events = %q, want one %s", ev, ReasonSourceMissing)
		}
		wantNoEvents(t, b)
		if got := c.pvc(t, "restore").Annotations[driverName+"/placement-warning"]; got != ReasonSourceMissing {
			t.Errorf("mark = %q", got)
		}
		if n := c.pvcUpdates(); n != 2 {
			t.Errorf("%d PVC updates, want 2 (the winner's and the loser's conflicting one)", n)
		}
	})
}

func TestMissingSourceOfANewPVCIsAwaited(t *testing.T) {
	// Created together with its snapshot, the PVC may be seen first.
	c := newCluster(t)
	pvc := claim("restore", wffc.Name, fromSnapshot("snap-1"))
	pvc.CreationTimestamp = metav1.Now()
	c.create(t, wffc, pvc)
	a := startNode(t, c, nodeA, owning("alpha/snap-1"), false)
	if !a.sync(t, c, "restore") {
		t.Error("a new PVC's missing source was not awaited")
	}
	wantNoEvents(t, a)
	if n := c.pvcUpdates(); n != 0 {
		t.Errorf("%d PVC updates, want none", n)
	}
	// The snapshot arrives and the restore is placed.
	c.create(t, snapshot("snap-1", "content-1", true), content("content-1", "snap-1", "alpha/snap-1", nodeA))
	eventually(t, "the snapshot in node-a's cache", func() bool {
		_, err := a.p.contents.Get("content-1")
		_, err2 := a.p.snapshots.VolumeSnapshots(ns).Get("snap-1")
		return err == nil && err2 == nil
	})
	a.sync(t, c, "restore")
	if got := c.pvc(t, "restore").Annotations[AnnSelectedNode]; got != nodeA {
		t.Errorf("selected-node = %q, want %q", got, nodeA)
	}
}

func TestCloneOfAClaim(t *testing.T) {
	c := newCluster(t)
	c.create(t, wffc, volume("pv-src", "alpha/pvc-src", nodeA, "src"), boundClaim("src", "pv-src"),
		claim("clone", wffc.Name, fromClaim("src")),
		claim("unbound-src", wffc.Name, nil), claim("clone-of-unbound", wffc.Name, fromClaim("unbound-src")))
	a := startNode(t, c, nodeA, owning("alpha/pvc-src"), false)
	b := startNode(t, c, nodeB, owning(), false)
	b.sync(t, c, "clone")
	a.sync(t, c, "clone")
	if got := c.pvc(t, "clone").Annotations[AnnSelectedNode]; got != nodeA {
		t.Errorf("clone's selected-node = %q, want %q", got, nodeA)
	}
	if !a.sync(t, c, "clone-of-unbound") {
		t.Error("a clone of an unbound PVC was not retried")
	}
	if _, ok := c.pvc(t, "clone-of-unbound").Annotations[AnnSelectedNode]; ok {
		t.Error("a clone of an unbound PVC was placed")
	}
	wantNoEvents(t, b)
}

func TestSourceNodeFull(t *testing.T) {
	c := newCluster(t)
	c.create(t, wffc, snapshot("snap-1", "content-1", true), content("content-1", "snap-1", "alpha/snap-1", nodeA),
		claim("restore", wffc.Name, fromSnapshot("snap-1")))
	owner := owning("alpha/snap-1")
	owner.setRoom(fmt.Errorf("pool alpha: %w", thinpool.ErrNoSpace))
	a := startNode(t, c, nodeA, owner, false)
	for range 3 {
		if !a.sync(t, c, "restore") {
			t.Error("a full source node did not ask to look again")
		}
	}
	if _, ok := c.pvc(t, "restore").Annotations[AnnSelectedNode]; ok {
		t.Fatal("placed on a full node")
	}
	if ev := a.events(); len(ev) != 1 || count(ev, "Warning "+ReasonSourceNodeFull) != 1 {
		t.Errorf("events = %q, want one %s", ev, ReasonSourceNodeFull)
	}
	owner.setRoom(fmt.Errorf("pool alpha: %w", thinpool.ErrPoolUnhealthy))
	a.sync(t, c, "restore")
	if ev := a.events(); len(ev) != 1 || count(ev, "Warning "+ReasonSourcePoolUnhealthy) != 1 {
		t.Errorf("events = %q, want one %s", ev, ReasonSourcePoolUnhealthy)
	}
	// Space freed: placed after all.
	owner.setRoom(nil)
	a.sync(t, c, "restore")
	if got := c.pvc(t, "restore").Annotations[AnnSelectedNode]; got != nodeA {
		t.Errorf("selected-node = %q after space was freed", got)
	}
}

func TestPVCsPlacementLeavesAlone(t *testing.T) {
	placed := claim("placed", wffc.Name, fromSnapshot("snap-1"))
	placed.Annotations = map[string]string{AnnSelectedNode: nodeA}
	bound := claim("bound", wffc.Name, fromSnapshot("snap-1"))
	bound.Status.Phase = corev1.ClaimBound
	bound.Spec.VolumeName = "pv-x"
	other := claim("other-kind", wffc.Name, &corev1.TypedLocalObjectReference{APIGroup: ptr("example.com"), Kind: "Backup", Name: "b"})
	noClass := claim("no-class", "", fromSnapshot("snap-1"))
	for _, pvc := range []*corev1.PersistentVolumeClaim{
		claim("other-driver", foreign.Name, fromSnapshot("snap-1")),
		claim("immediate", immediate.Name, fromSnapshot("snap-1")),
		claim("no-source", wffc.Name, nil),
		placed, bound, other, noClass,
	} {
		t.Run(pvc.Name, func(t *testing.T) {
			c := newCluster(t)
			c.create(t, wffc, immediate, foreign, snapshot("snap-1", "content-1", true),
				content("content-1", "snap-1", "alpha/snap-1", nodeA), pvc)
			a := startNode(t, c, nodeA, owning("alpha/snap-1"), false)
			if a.sync(t, c, pvc.Name) {
				t.Error("retry asked")
			}
			if got := c.pvc(t, pvc.Name).Annotations[AnnSelectedNode]; got != pvc.Annotations[AnnSelectedNode] {
				t.Errorf("selected-node = %q, want it unchanged (%q)", got, pvc.Annotations[AnnSelectedNode])
			}
			if n := c.pvcUpdates(); n != 0 {
				t.Errorf("%d PVC updates, want none", n)
			}
			wantNoEvents(t, a)
		})
	}
}

func TestConflictRereadsAndLooksAgain(t *testing.T) {
	c := newCluster(t)
	c.create(t, wffc, snapshot("snap-1", "content-1", true), content("content-1", "snap-1", "alpha/snap-1", nodeA),
		claim("restore", wffc.Name, fromSnapshot("snap-1")))
	a := startNode(t, c, nodeA, owning("alpha/snap-1"), false)
	a.waitCache(t, c, "restore")
	// Between node-a's read and its write, someone else places the PVC:
	// their write lands first, so node-a's carries a stale resourceVersion.
	// (The fake clientset is locked while a reactor runs, so the other
	// writer goes to its tracker directly.)
	first := true
	c.core.PrependReactor("update", "persistentvolumeclaims", func(k8stesting.Action) (bool, runtime.Object, error) {
		if first {
			first = false
			c.mu.Lock()
			defer c.mu.Unlock()
			obj, err := c.core.Tracker().Get(pvcGVR, ns, "restore")
			if err != nil {
				t.Errorf("the other writer: %v", err)
				return false, nil, nil
			}
			other := obj.(*corev1.PersistentVolumeClaim).DeepCopy()
			other.Annotations = map[string]string{AnnSelectedNode: "node-c"}
			other.ResourceVersion = fmt.Sprint(c.rv.Add(1))
			if err := c.core.Tracker().Update(pvcGVR, other, ns); err != nil {
				t.Errorf("the other writer: %v", err)
			}
		}
		return false, nil, nil // on to the resourceVersion check
	})
	retry, err := a.p.sync(context.Background(), ns+"/restore")
	if err != nil {
		t.Fatal(err)
	}
	// node-a's write was refused; node-c does not hold the source, so
	// node-a looks again rather than leave the claim where it cannot be
	// made...
	if !retry {
		t.Error("no retry after another node, without the source, placed the PVC")
	}
	if got := c.pvc(t, "restore").Annotations[AnnSelectedNode]; got != "node-c" {
		t.Errorf("selected-node = %q, want the other writer's node-c", got)
	}
	if n := c.pvcUpdates(); n != 1 {
		t.Errorf("%d PVC updates, want 1 (node-a's, refused)", n)
	}
	// ... and then moves it, once.
	a.sync(t, c, "restore")
	if got := c.pvc(t, "restore").Annotations[AnnSelectedNode]; got != nodeA {
		t.Errorf("selected-node = %q, want %q", got, nodeA)
	}
	if n := c.pvcUpdates(); n != 2 {
		t.Errorf("%d PVC updates, want 2", n)
	}
}

func TestNoSpaceEventOnThePVC(t *testing.T) {
	c := newCluster(t)
	c.create(t, wffc, claim("data", wffc.Name, nil))
	a := startNode(t, c, nodeA, owning(), false)
	a.waitCache(t, c, "data")
	sink := NewPVCEvents(a.rec, a.p.pvcs)
	sink.ProvisioningNoSpace(ns, "data", "node node-a, pool alpha: no space")
	sink.ProvisioningNoSpace(ns, "not-cached", "node node-a, pool alpha: no space")
	ev := a.events()
	if len(ev) != 2 {
		t.Fatalf("events = %q", ev)
	}
	// The cached PVC gives the Event its UID (kubectl describe matches on
	// it); an uncached one still gets its Event, by name.
	if ev[0] != "Warning "+ReasonNoSpace+" PersistentVolumeClaim/db/data@uid-data: node node-a, pool alpha: no space" ||
		ev[1] != "Warning "+ReasonNoSpace+" PersistentVolumeClaim/db/not-cached@: node node-a, pool alpha: no space" {
		t.Errorf("events = %q", ev)
	}
}

// The scheduler knows nothing of data sources: when it reaches a restore's
// pod first, it selects any node with room. The node that holds the source
// moves the claim to itself; the others leave it be.
func TestRestorePlacedElsewhereMovesToTheSource(t *testing.T) {
	c := newCluster(t)
	pvc := claim("restore", wffc.Name, fromSnapshot("snap-1"))
	pvc.Annotations = map[string]string{AnnSelectedNode: nodeB}
	c.create(t, wffc, snapshot("snap-1", "content-1", true), content("content-1", "snap-1", "alpha/snap-1", nodeA), pvc)
	a := startNode(t, c, nodeA, owning("alpha/snap-1"), false)
	b := startNode(t, c, nodeB, owning(), false)
	if b.sync(t, c, "restore") {
		t.Error("node-b asked to retry")
	}
	if got := c.pvc(t, "restore").Annotations[AnnSelectedNode]; got != nodeB {
		t.Fatalf("selected-node = %q after node-b's look, want it left at %q", got, nodeB)
	}
	if a.sync(t, c, "restore") {
		t.Error("node-a asked to retry after placing")
	}
	if got := c.pvc(t, "restore").Annotations[AnnSelectedNode]; got != nodeA {
		t.Fatalf("selected-node = %q, want %q", got, nodeA)
	}
	if ev := a.events(); len(ev) != 1 || count(ev, "Normal "+ReasonSourceNode) != 1 || !strings.Contains(ev[0], "in place of node "+nodeB) {
		t.Errorf("node-a events = %q, want one %s saying it replaced %s", ev, ReasonSourceNode, nodeB)
	}
	wantNoEvents(t, b)
	a.sync(t, c, "restore")
	if n := c.pvcUpdates(); n != 1 {
		t.Errorf("%d PVC updates, want 1", n)
	}
}

// A cordoned source node: a Warning that names it, nothing selected, and
// the claim placed once the node is uncordoned.
func TestRestoreWaitsForCordonedSourceNode(t *testing.T) {
	c := newCluster(t)
	node := &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: nodeA}, Spec: corev1.NodeSpec{Unschedulable: true}}
	c.create(t, wffc, node, snapshot("snap-1", "content-1", true), content("content-1", "snap-1", "alpha/snap-1", nodeA),
		claim("restore", wffc.Name, fromSnapshot("snap-1")))
	a := startNode(t, c, nodeA, owning("alpha/snap-1"), false)
	for range 2 {
		a.sync(t, c, "restore")
	}
	if got, ok := c.pvc(t, "restore").Annotations[AnnSelectedNode]; ok {
		t.Fatalf("selected-node = %q on a cordoned node", got)
	}
	if ev := a.events(); len(ev) != 1 || count(ev, "Warning "+ReasonSourceNodeCordoned) != 1 || !strings.Contains(ev[0], nodeA) {
		t.Errorf("events = %q, want one %s naming %s", ev, ReasonSourceNodeCordoned, nodeA)
	}
	node.Spec.Unschedulable = false
	if _, err := c.core.CoreV1().Nodes().Update(context.Background(), node, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	a.sync(t, c, "restore")
	if got := c.pvc(t, "restore").Annotations[AnnSelectedNode]; got != nodeA {
		t.Errorf("selected-node = %q after the uncordon, want %q", got, nodeA)
	}
}
