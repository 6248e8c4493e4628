package kube

import (
	"context"
	"fmt"
	"slices"
	"strings"
	"testing"

	snapv1 "github.com/kubernetes-csi/external-snapshotter/client/v8/apis/volumesnapshot/v1"
	corev1 "k8s.io/api/core/v1"
	storagev1 "k8s.io/api/storage/v1"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	k8stesting "k8s.io/client-go/testing"

	"github.com/csi-dmthin/csi-dmthin/pkg/csi"
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

func wantNoEvents(t *testing.T, n *ctl) {
	t.Helper()
	if ev := n.events(); len(ev) != 0 {
		t.Errorf("recorded %q, want nothing", ev)
	}
}

// The node comes from the records: the content's managed-by label, the
// node in its snapshot handle, or the PV of its source volume handle.
func TestRestoreFromSnapshotSelectsTheSourceNode(t *testing.T) {
	labelled := content("content-1", "snap-1", "alpha/snap-1", nodeA)
	byHandle := content("content-1", "snap-1", nodeB+"/alpha/snap-1", "")
	byHandle.Spec.Source.VolumeHandle = nil // pre-provisioned: a handle alone
	byPV := content("content-1", "snap-1", "alpha/snap-1", "")
	for _, tc := range []struct {
		name    string
		content *snapv1.VolumeSnapshotContent
		extra   []runtime.Object
		want    string
	}{
		{"managed-by label", labelled, nil, nodeA},
		{"handle names the node", byHandle, nil, nodeB},
		{"source volume's PV", byPV, []runtime.Object{volume("pv-src", "alpha/pvc-src", nodeB, "src")}, nodeB},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := newCluster(t)
			c.create(t, append([]runtime.Object{wffc, snapshot("snap-1", "content-1", true), tc.content, claim("restore", wffc.Name, fromSnapshot("snap-1"))}, tc.extra...)...)
			a := startController(t, c, false)
			if retry := a.sync(t, c, "restore"); retry {
				t.Error("asked to retry after placing")
			}
			if got := c.pvc(t, "restore").Annotations[AnnSelectedNode]; got != tc.want {
				t.Fatalf("selected-node = %q, want %q", got, tc.want)
			}
			if ev := a.events(); len(ev) != 1 || count(ev, "Normal "+ReasonSourceNode) != 1 || !strings.Contains(ev[0], "alpha/snap-1") || !strings.Contains(ev[0], "node "+tc.want) {
				t.Errorf("events = %q, want one %s naming the snapshot and %s", ev, ReasonSourceNode, tc.want)
			}
			// Placed: nothing more to do.
			a.sync(t, c, "restore")
			if n := c.pvcUpdates(); n != 1 {
				t.Errorf("%d PVC updates, want 1", n)
			}
			wantNoEvents(t, a)
		})
	}
}

// No record names the source's node: nothing placed, one Warning that
// says how to name it, and another look later.
func TestRestoreWhoseNodeNoRecordNames(t *testing.T) {
	c := newCluster(t)
	c.create(t, wffc, snapshot("snap-1", "content-1", true), content("content-1", "snap-1", "alpha/snap-1", ""),
		claim("restore", wffc.Name, fromSnapshot("snap-1")))
	a := startController(t, c, false)
	for range 3 {
		if !a.sync(t, c, "restore") {
			t.Error("no retry for a source whose node may yet be named")
		}
	}
	if got, ok := c.pvc(t, "restore").Annotations[AnnSelectedNode]; ok {
		t.Errorf("selected-node = %q", got)
	}
	if ev := a.events(); len(ev) != 1 || count(ev, "Warning "+ReasonSourceNodeUnknown) != 1 || !strings.Contains(ev[0], LabelManagedBy) {
		t.Errorf("events = %q, want one %s naming the label to set", ev, ReasonSourceNodeUnknown)
	}
	if n := c.pvcUpdates(); n != 0 {
		t.Errorf("%d PVC updates, want none", n)
	}
}

func TestRestoreWaitsForTheSnapshotToBind(t *testing.T) {
	c := newCluster(t)
	c.create(t, wffc, snapshot("snap-1", "", false), claim("restore", wffc.Name, fromSnapshot("snap-1")))
	a := startController(t, c, true) // workers running
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

// A source that does not exist (past goneGrace) is said once, on the PVC.
func TestMissingSourceIsReportedOnce(t *testing.T) {
	for _, tc := range []struct{ name, pvc, what string }{
		{"snapshot", "restore", "VolumeSnapshot db/gone"},
		{"claim", "clone", "PersistentVolumeClaim db/gone"},
		{"claim's PV", "clone-of-pvless", "PersistentVolume pv-gone"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := newCluster(t)
			c.create(t, wffc, claim("restore", wffc.Name, fromSnapshot("gone")), claim("clone", wffc.Name, fromClaim("gone")),
				boundClaim("pvless", "pv-gone"), claim("clone-of-pvless", wffc.Name, fromClaim("pvless")))
			a := startController(t, c, false)
			for range 3 {
				if a.sync(t, c, tc.pvc) {
					t.Error("retry asked for a source that is gone")
				}
			}
			ev := a.events()
			if len(ev) != 1 || count(ev, "Warning "+ReasonSourceMissing) != 1 || !strings.Contains(ev[0], "PersistentVolumeClaim/db/"+tc.pvc+"@uid-"+tc.pvc+":") || !strings.Contains(ev[0], tc.what) {
				t.Errorf("events = %q, want one %s on the PVC naming %s", ev, ReasonSourceMissing, tc.what)
			}
			if n := c.pvcUpdates(); n != 0 {
				t.Errorf("%d PVC updates, want none", n)
			}
		})
	}
}

func TestMissingSourceOfANewPVCIsAwaited(t *testing.T) {
	// Created together with its snapshot, the PVC may be seen first.
	c := newCluster(t)
	pvc := claim("restore", wffc.Name, fromSnapshot("snap-1"))
	pvc.CreationTimestamp = metav1.Now()
	c.create(t, wffc, pvc)
	a := startController(t, c, false)
	if !a.sync(t, c, "restore") {
		t.Error("a new PVC's missing source was not awaited")
	}
	wantNoEvents(t, a)
	if n := c.pvcUpdates(); n != 0 {
		t.Errorf("%d PVC updates, want none", n)
	}
	// The snapshot arrives and the restore is placed.
	c.create(t, snapshot("snap-1", "content-1", true), content("content-1", "snap-1", "alpha/snap-1", nodeA))
	eventually(t, "the snapshot in the cache", func() bool {
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
	c.create(t, wffc, volume("pv-src", "alpha/pvc-src", nodeB, "src"), boundClaim("src", "pv-src"),
		claim("clone", wffc.Name, fromClaim("src")),
		claim("unbound-src", wffc.Name, nil), claim("clone-of-unbound", wffc.Name, fromClaim("unbound-src")))
	a := startController(t, c, false)
	a.sync(t, c, "clone")
	if got := c.pvc(t, "clone").Annotations[AnnSelectedNode]; got != nodeB {
		t.Errorf("clone's selected-node = %q, want %q", got, nodeB)
	}
	if !a.sync(t, c, "clone-of-unbound") {
		t.Error("a clone of an unbound PVC was not retried")
	}
	if _, ok := c.pvc(t, "clone-of-unbound").Annotations[AnnSelectedNode]; ok {
		t.Error("a clone of an unbound PVC was placed")
	}
}

// Room comes from the source pool's ThinPool: too little Available, or a
// pool not Healthy, leaves the restore unplaced with a Warning, looked at
// again until the pool has room. The new volume is at least as large as
// its source (the content's restoreSize).
func TestSourceNodeFull(t *testing.T) {
	c := newCluster(t)
	vsc := content("content-1", "snap-1", "alpha/snap-1", nodeA)
	vsc.Status.RestoreSize = ptr(int64(4 << 30)) // the claim asks for 1Gi
	c.create(t, wffc, snapshot("snap-1", "content-1", true), vsc, claim("restore", wffc.Name, fromSnapshot("snap-1")))
	a := startController(t, c, false)
	c.setThinPool(t, a, nodeA, "beta", HealthHealthy, "100Gi") // another pool of the node: not asked
	c.setThinPool(t, a, nodeA, "alpha", HealthHealthy, "2Gi")
	for range 3 {
		if !a.sync(t, c, "restore") {
			t.Error("a full source node did not ask to look again")
		}
	}
	if _, ok := c.pvc(t, "restore").Annotations[AnnSelectedNode]; ok {
		t.Fatal("placed on a full node")
	}
	if ev := a.events(); len(ev) != 1 || count(ev, "Warning "+ReasonSourceNodeFull) != 1 || !strings.Contains(ev[0], "4Gi") || !strings.Contains(ev[0], "2Gi") {
		t.Errorf("events = %q, want one %s naming the 4Gi needed and the 2Gi available", ev, ReasonSourceNodeFull)
	}
	c.setThinPool(t, a, nodeA, "alpha", HealthReadOnly, "100Gi")
	if !a.sync(t, c, "restore") {
		t.Error("an unhealthy source pool did not ask to look again")
	}
	if ev := a.events(); len(ev) != 1 || count(ev, "Warning "+ReasonSourcePoolUnhealthy) != 1 || !strings.Contains(ev[0], HealthReadOnly) {
		t.Errorf("events = %q, want one %s", ev, ReasonSourcePoolUnhealthy)
	}
	// Space freed: placed after all.
	c.setThinPool(t, a, nodeA, "alpha", HealthHealthy, "4Gi")
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
			a := startController(t, c, false)
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
	a := startController(t, c, false)
	a.waitCache(t, c, "restore")
	// Between placement's read and its write, the scheduler places the
	// PVC: its write lands first, so placement's carries a stale
	// resourceVersion.
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
	// Placement's write was refused; node-c does not hold the source, so
	// placement looks again rather than leave the claim where it cannot be
	// made...
	if !retry {
		t.Error("no retry after the PVC was placed on a node without the source")
	}
	if got := c.pvc(t, "restore").Annotations[AnnSelectedNode]; got != "node-c" {
		t.Errorf("selected-node = %q, want the other writer's node-c", got)
	}
	if n := c.pvcUpdates(); n != 1 {
		t.Errorf("%d PVC updates, want 1 (placement's, refused)", n)
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
	rec := &eventLog{}
	sink := NewPVCEvents(rec, c.core)
	sink.ProvisioningNoSpace(ns, "data", "node node-a, pool alpha: no space")
	sink.ProvisioningNoSpace(ns, "missing", "node node-a, pool alpha: no space")
	var ev []string
	eventually(t, "two Events", func() bool {
		ev = append(ev, rec.take()...)
		return len(ev) >= 2
	})
	slices.Sort(ev)
	// The PVC read gives the Event its UID (kubectl describe matches on
	// it); one that cannot be read still gets its Event, by name.
	if len(ev) != 2 || ev[0] != "Warning "+ReasonNoSpace+" PersistentVolumeClaim/db/data@uid-data: node node-a, pool alpha: no space" ||
		ev[1] != "Warning "+ReasonNoSpace+" PersistentVolumeClaim/db/missing@: node node-a, pool alpha: no space" {
		t.Errorf("events = %q", ev)
	}
	// Read, not watched: a node keeps no cache of the cluster's PVCs.
	if n := countActions(c.core.Actions(), "get", "persistentvolumeclaims"); n != 2 {
		t.Errorf("%d PVC reads, want 2", n)
	}
	if n := countActions(c.core.Actions(), "list", "persistentvolumeclaims") + countActions(c.core.Actions(), "watch", "persistentvolumeclaims"); n != 0 {
		t.Errorf("%d PVC lists and watches, want none", n)
	}
}

// The scheduler knows nothing of data sources: when it reaches a restore's
// pod first, it selects any node with room. Placement moves the claim to
// the node that holds the source.
func TestRestorePlacedElsewhereMovesToTheSource(t *testing.T) {
	c := newCluster(t)
	pvc := claim("restore", wffc.Name, fromSnapshot("snap-1"))
	pvc.Annotations = map[string]string{AnnSelectedNode: nodeB}
	c.create(t, wffc, snapshot("snap-1", "content-1", true), content("content-1", "snap-1", "alpha/snap-1", nodeA), pvc)
	a := startController(t, c, false)
	if a.sync(t, c, "restore") {
		t.Error("asked to retry after placing")
	}
	if got := c.pvc(t, "restore").Annotations[AnnSelectedNode]; got != nodeA {
		t.Fatalf("selected-node = %q, want %q", got, nodeA)
	}
	if ev := a.events(); len(ev) != 1 || count(ev, "Normal "+ReasonSourceNode) != 1 || !strings.Contains(ev[0], "in place of node "+nodeB) {
		t.Errorf("events = %q, want one %s saying it replaced %s", ev, ReasonSourceNode, nodeB)
	}
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
	if _, err := c.core.CoreV1().Nodes().Update(context.Background(), node, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	c.create(t, wffc, snapshot("snap-1", "content-1", true), content("content-1", "snap-1", "alpha/snap-1", nodeA),
		claim("restore", wffc.Name, fromSnapshot("snap-1")))
	a := startController(t, c, false)
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

// The provisioner clears selected-node when CreateVolume fails on the node
// (a pool fuller than its ThinPool said): placement places the PVC again,
// but each time after a longer wait, not at once (no loop with the
// provisioner).
func TestPlacedAgainOnlyAfterAWait(t *testing.T) {
	c := newCluster(t)
	c.create(t, wffc, snapshot("snap-1", "content-1", true), content("content-1", "snap-1", "alpha/snap-1", nodeA),
		claim("restore", wffc.Name, fromSnapshot("snap-1")))
	a := startController(t, c, false)
	clear := func() {
		pvc := c.pvc(t, "restore")
		delete(pvc.Annotations, AnnSelectedNode)
		if _, err := c.core.CoreV1().PersistentVolumeClaims(ns).Update(context.Background(), pvc, metav1.UpdateOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	a.sync(t, c, "restore")
	clear()
	updates := c.pvcUpdates()
	a.sync(t, c, "restore")
	if got, ok := c.pvc(t, "restore").Annotations[AnnSelectedNode]; ok {
		t.Fatalf("placed again at once (%q)", got)
	}
	if n := c.pvcUpdates(); n != updates {
		t.Errorf("%d PVC updates while waiting, want none", n-updates)
	}
	uid := c.pvc(t, "restore").UID
	first := a.p.reselectWait(uid)
	if first <= 0 || first > reselectBase {
		t.Fatalf("wait %v after one placement, want up to %v", first, reselectBase)
	}
	// The wait over: placed again, and the next wait is longer.
	a.p.mu.Lock()
	s := a.p.selected[uid]
	s.last = s.last.Add(-reselectBase)
	a.p.selected[uid] = s
	a.p.mu.Unlock()
	a.sync(t, c, "restore")
	if got := c.pvc(t, "restore").Annotations[AnnSelectedNode]; got != nodeA {
		t.Fatalf("selected-node = %q after the wait, want %q", got, nodeA)
	}
	if second := a.p.reselectWait(uid); second <= reselectBase {
		t.Errorf("wait %v after two placements, want more than %v", second, reselectBase)
	}
}

// The handle names the node the driver made the snapshot on; a label that
// says otherwise (set by hand) loses.
func TestSnapshotHandleBeatsTheLabel(t *testing.T) {
	c := newCluster(t)
	c.create(t, wffc, snapshot("snap-1", "content-1", true), content("content-1", "snap-1", nodeB+"/alpha/snap-1", nodeA),
		claim("restore", wffc.Name, fromSnapshot("snap-1")))
	a := startController(t, c, false)
	a.sync(t, c, "restore")
	if got := c.pvc(t, "restore").Annotations[AnnSelectedNode]; got != nodeB {
		t.Errorf("selected-node = %q, want the handle's %q", got, nodeB)
	}
}

// A source whose node is not in the cluster: a Warning, nothing placed.
func TestSourceNodeNotInTheCluster(t *testing.T) {
	c := newCluster(t)
	c.create(t, wffc, snapshot("snap-1", "content-1", true), content("content-1", "snap-1", "node-gone/alpha/snap-1", ""),
		claim("restore", wffc.Name, fromSnapshot("snap-1")))
	a := startController(t, c, false)
	if !a.sync(t, c, "restore") {
		t.Error("no retry: the node may come back")
	}
	if got, ok := c.pvc(t, "restore").Annotations[AnnSelectedNode]; ok {
		t.Errorf("placed on %q", got)
	}
	if ev := a.events(); len(ev) != 1 || count(ev, "Warning "+ReasonSourceMissing) != 1 || !strings.Contains(ev[0], "node-gone") {
		t.Errorf("events = %q, want one %s naming the node", ev, ReasonSourceMissing)
	}
}

// Room is asked for the size the driver will make: an xfs class's
// smallest filesystem (300 MiB) for a 64 Mi claim.
func TestRoomForTheSizeTheDriverMakes(t *testing.T) {
	c := newCluster(t)
	xfs := class("dmthin-xfs", driverName, storagev1.VolumeBindingWaitForFirstConsumer)
	xfs.Parameters = map[string]string{"csi.storage.k8s.io/fstype": "xfs"}
	small := claim("restore", xfs.Name, fromSnapshot("snap-1"))
	small.Spec.Resources.Requests[corev1.ResourceStorage] = resource.MustParse("64Mi")
	c.create(t, xfs, snapshot("snap-1", "content-1", true), content("content-1", "snap-1", "alpha/snap-1", nodeA), small)
	a := startController(t, c, false)
	c.setThinPool(t, a, nodeA, "alpha", HealthHealthy, "100Mi")
	if !a.sync(t, c, "restore") {
		t.Error("no retry on a pool too small for the xfs volume")
	}
	if ev := a.events(); len(ev) != 1 || count(ev, "Warning "+ReasonSourceNodeFull) != 1 || !strings.Contains(ev[0], "300Mi") {
		t.Errorf("events = %q, want one %s naming the 300Mi needed", ev, ReasonSourceNodeFull)
	}
}

// Right after its own write, placement's cache still holds the PVC as it
// read it: acting on that copy would only earn a conflict, so it waits
// for the update.
func TestStaleCacheAfterOwnWrite(t *testing.T) {
	c := newCluster(t)
	c.create(t, wffc, snapshot("snap-1", "content-1", true), content("content-1", "snap-1", "alpha/snap-1", nodeA),
		claim("restore", wffc.Name, fromSnapshot("snap-1")))
	a := startController(t, c, false)
	a.waitCache(t, c, "restore")
	old, err := a.p.view.pvcs.PersistentVolumeClaims(ns).Get("restore")
	if err != nil {
		t.Fatal(err)
	}
	a.p.wrote(old)
	if !a.p.staleCache(old) {
		t.Fatal("the copy placement wrote over is not stale")
	}
	retry, err := a.p.sync(context.Background(), ns+"/restore")
	if err != nil || retry {
		t.Fatalf("sync on a stale cache: retry %v, %v", retry, err)
	}
	if n := c.pvcUpdates(); n != 0 {
		t.Errorf("%d PVC updates on a stale cache, want none", n)
	}
	newer := old.DeepCopy()
	newer.ResourceVersion += "1"
	if a.p.staleCache(newer) {
		t.Error("a newer copy is taken for stale")
	}
	if a.p.staleCache(old) {
		t.Error("the mark stays after the cache caught up")
	}
}

// With copies across nodes on, a restore whose snapshot's node is cordoned
// or full is left to the scheduler (no selected-node), with one Normal
// Event that names the node and why; a snapshot whose ID does not name
// its node, a clone, and an unhealthy pool are placed as without copies.
func TestCopyInsteadOfWaiting(t *testing.T) {
	cordon := func(t *testing.T, c *cluster, on bool) {
		node := &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: nodeA}, Spec: corev1.NodeSpec{Unschedulable: on}}
		if _, err := c.core.CoreV1().Nodes().Update(context.Background(), node, metav1.UpdateOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	for _, tc := range []struct {
		name      string
		handle    string // the snapshot's ID
		copies    bool
		cordoned  bool
		available string // room in the source's pool
		health    string
		wantCopy  bool
		wantEvent string
	}{
		{"cordoned", nodeA + "/alpha/snap-1", true, true, "100Gi", HealthHealthy, true, "Normal " + ReasonCopyFromSourceNode},
		{"full", nodeA + "/alpha/snap-1", true, false, "2Gi", HealthHealthy, true, "Normal " + ReasonCopyFromSourceNode},
		{"cordoned, copies off", nodeA + "/alpha/snap-1", false, true, "100Gi", HealthHealthy, false, "Warning " + ReasonSourceNodeCordoned},
		{"full, copies off", nodeA + "/alpha/snap-1", false, false, "2Gi", HealthHealthy, false, "Warning " + ReasonSourceNodeFull},
		{"cordoned, ID without node", "alpha/snap-1", true, true, "100Gi", HealthHealthy, false, "Warning " + ReasonSourceNodeCordoned},
		{"unhealthy pool", nodeA + "/alpha/snap-1", true, false, "100Gi", HealthReadOnly, false, "Warning " + ReasonSourcePoolUnhealthy},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := newCluster(t)
			cordon(t, c, tc.cordoned)
			vsc := content("content-1", "snap-1", tc.handle, nodeA)
			vsc.Status.RestoreSize = ptr(int64(4 << 30))
			c.create(t, wffc, snapshot("snap-1", "content-1", true), vsc, claim("restore", wffc.Name, fromSnapshot("snap-1")))
			a := startControllerWith(t, c, false, tc.copies)
			c.setThinPool(t, a, nodeA, "alpha", tc.health, tc.available)
			retry := a.sync(t, c, "restore")
			a.sync(t, c, "restore")
			if got, ok := c.pvc(t, "restore").Annotations[AnnSelectedNode]; ok {
				t.Fatalf("selected-node = %q, want none", got)
			}
			ev := a.events()
			if len(ev) != 1 || count(ev, tc.wantEvent) != 1 || !strings.Contains(ev[0], nodeA) {
				t.Fatalf("events = %q, want one %q naming %s", ev, tc.wantEvent, nodeA)
			}
			if tc.wantCopy && retry {
				t.Error("asked to retry a restore left to the scheduler")
			}
			if tc.wantCopy && !strings.Contains(ev[0], "copies its blocks") {
				t.Errorf("event %q does not say the snapshot is copied", ev[0])
			}
		})
	}
}

// A clone whose source volume's node is cordoned is left to the scheduler
// too, and the PVC says which node holds its source: a volume ID does not
// name its node, and the node that makes the clone reads it there.
func TestCloneCopiedNamesItsSourceNode(t *testing.T) {
	c := newCluster(t)
	node := &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: nodeB}, Spec: corev1.NodeSpec{Unschedulable: true}}
	if _, err := c.core.CoreV1().Nodes().Update(context.Background(), node, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	c.create(t, wffc, volume("pv-src", "alpha/pvc-src", nodeB, "src"), boundClaim("src", "pv-src"), claim("clone", wffc.Name, fromClaim("src")))
	a := startControllerWith(t, c, false, true)
	for range 3 {
		if a.sync(t, c, "clone") {
			t.Error("asked to retry a clone left to the scheduler")
		}
	}
	pvc := c.pvc(t, "clone")
	if got, ok := pvc.Annotations[AnnSelectedNode]; ok {
		t.Errorf("selected-node = %q on a clone to be copied", got)
	}
	if got := pvc.Annotations[AnnCopyFromNode]; got != nodeB {
		t.Errorf("%s = %q, want %q", AnnCopyFromNode, got, nodeB)
	}
	if n := c.pvcUpdates(); n != 1 {
		t.Errorf("%d PVC updates, want 1", n)
	}
	if ev := a.events(); len(ev) != 1 || count(ev, "Normal "+ReasonCopyFromSourceNode) != 1 || !strings.Contains(ev[0], nodeB) {
		t.Errorf("events = %q, want one %s naming %s", ev, ReasonCopyFromSourceNode, nodeB)
	}
}

// A class whose restorePlacement is anyNode leaves every restore to the
// scheduler when copies are on, the source's node healthy and free or
// not; with copies off, the restore goes to the source's node as ever.
func TestClassAsksForAnyNode(t *testing.T) {
	anyNode := class("dmthin-any", driverName, storagev1.VolumeBindingWaitForFirstConsumer)
	anyNode.Parameters = map[string]string{csi.ParamRestorePlacement: csi.RestoreOnAnyNode}
	for _, copies := range []bool{true, false} {
		t.Run(fmt.Sprintf("copies %v", copies), func(t *testing.T) {
			c := newCluster(t)
			c.create(t, anyNode, snapshot("snap-1", "content-1", true), content("content-1", "snap-1", nodeA+"/alpha/snap-1", nodeA),
				claim("restore", anyNode.Name, fromSnapshot("snap-1")))
			a := startControllerWith(t, c, false, copies)
			a.sync(t, c, "restore")
			got, placed := c.pvc(t, "restore").Annotations[AnnSelectedNode]
			ev := a.events()
			switch {
			case copies && (placed || len(ev) != 1 || count(ev, "Normal "+ReasonCopyFromSourceNode) != 1 || !strings.Contains(ev[0], csi.RestoreOnAnyNode)):
				t.Errorf("selected-node %q (%v), events %q; want none, and one %s saying the class asks for it", got, placed, ev, ReasonCopyFromSourceNode)
			case !copies && got != nodeA:
				t.Errorf("selected-node %q without copies, want %q", got, nodeA)
			}
		})
	}
}
