package kube

import (
	"context"
	"strings"
	"testing"

	groupv1 "github.com/kubernetes-csi/external-snapshotter/client/v8/apis/volumegroupsnapshot/v1"
	snapinformers "github.com/kubernetes-csi/external-snapshotter/client/v8/informers/externalversions"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/tools/cache"
)

// groupContent is what the snapshot-controller makes for a new
// VolumeGroupSnapshot: the volumes' handles, no label.
func groupContent(name string, handles ...string) *groupv1.VolumeGroupSnapshotContent {
	return &groupv1.VolumeGroupSnapshotContent{
		ObjectMeta: metav1.ObjectMeta{Name: name, ResourceVersion: "1", UID: types.UID("uid-" + name)},
		Spec: groupv1.VolumeGroupSnapshotContentSpec{
			Driver:                 driverName,
			DeletionPolicy:         "Delete",
			VolumeGroupSnapshotRef: corev1.ObjectReference{Kind: "VolumeGroupSnapshot", Namespace: ns, Name: "db"},
			Source:                 groupv1.VolumeGroupSnapshotContentSource{VolumeHandles: handles},
		},
	}
}

type groupAdopterNode struct {
	a   *GroupAdopter
	rec *eventLog
}

func startGroupAdopter(t *testing.T, c *cluster, name string, owner GroupOwner) *groupAdopterNode {
	t.Helper()
	return startGroupAdopterWithUID(t, c, name, "", owner)
}

func startGroupAdopterWithUID(t *testing.T, c *cluster, name string, uid types.UID, owner GroupOwner) *groupAdopterNode {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	inf := snapinformers.NewSharedInformerFactory(c.snap, 0)
	rec := &eventLog{}
	a, err := NewGroupAdopter(GroupAdopterOptions{DriverName: driverName, NodeName: name, NodeUID: uid, Owner: owner, Client: c.snap, Recorder: rec, Informers: inf})
	if err != nil {
		t.Fatal(err)
	}
	inf.Start(ctx.Done())
	t.Cleanup(func() { cancel(); inf.Shutdown() })
	if !cache.WaitForCacheSync(ctx.Done(), a.synced...) {
		t.Fatal("caches did not sync")
	}
	return &groupAdopterNode{a: a, rec: rec}
}

func (n *groupAdopterNode) sync(t *testing.T, name string) {
	t.Helper()
	eventually(t, "the content in the cache", func() bool {
		_, err := n.a.contents.Get(name)
		return err == nil
	})
	if _, err := n.a.sync(context.Background(), name); err != nil {
		t.Fatal(err)
	}
}

func (n *groupAdopterNode) syncClass(t *testing.T, name string) {
	t.Helper()
	eventually(t, "the class in the cache", func() bool {
		_, err := n.a.classes.Get(name)
		return err == nil
	})
	if _, err := n.a.syncClass(context.Background(), name); err != nil {
		t.Fatal(err)
	}
	// What it made is in its cache before the next sync looks.
	if cp := NodeGroupClassName(name, n.a.node); cp != name {
		if c, _ := n.a.classes.Get(name); c != nil && c.Driver == n.a.driver && c.Labels[LabelManagedBy] == "" {
			eventually(t, "the copy in the cache", func() bool {
				_, err := n.a.classes.Get(cp)
				return err == nil
			})
		}
	}
}

func (c *cluster) groupContentLabel(t *testing.T, name string) string {
	t.Helper()
	g, err := c.snap.GroupsnapshotV1().VolumeGroupSnapshotContents().Get(context.Background(), name, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	return g.Labels[LabelManagedBy]
}

// A group content goes to the node holding all its volumes, and to no
// other; a pre-provisioned one to the node holding the group snapshot.
func TestGroupAdopterLabelsTheNodeOfTheVolumes(t *testing.T) {
	c := newCluster(t)
	pre := groupContent("imported-group")
	pre.Spec.Source = groupv1.VolumeGroupSnapshotContentSource{GroupSnapshotHandles: &groupv1.GroupSnapshotHandles{
		VolumeGroupSnapshotHandle: "beta/group-1", VolumeSnapshotHandles: []string{"beta/snap-a"},
	}}
	foreign := groupContent("foreign-group", "alpha/pvc-data")
	foreign.Spec.Driver = "other.csi.example"
	c.create(t, groupContent("db-group", "alpha/pvc-data", "alpha/pvc-log"), pre, foreign)
	a := startGroupAdopter(t, c, nodeA, owning("alpha/pvc-data", "alpha/pvc-log"))
	b := startGroupAdopter(t, c, nodeB, owning("beta/pvc-x", "beta/group-1"))
	for _, n := range []*groupAdopterNode{a, b} {
		for _, name := range []string{"db-group", "imported-group", "foreign-group"} {
			n.sync(t, name)
		}
	}
	for name, want := range map[string]string{"db-group": nodeA, "imported-group": nodeB, "foreign-group": ""} {
		if got := c.groupContentLabel(t, name); got != want {
			t.Errorf("%s labelled %q, want %q", name, got, want)
		}
	}
	if ev := a.rec.take(); len(ev) != 1 || !strings.HasPrefix(ev[0], "Normal "+ReasonGroupAdopted) || !strings.Contains(ev[0], "alpha/pvc-log") {
		t.Errorf("node-a events %q", ev)
	}
	if n := countActions(c.snap.Actions(), "patch", "volumegroupsnapshotcontents"); n != 2 {
		t.Errorf("%d patches, want 2", n)
	}
}

// A group whose volumes are on two nodes is taken by neither; the node of
// its first volume says so, once.
func TestGroupAdopterGroupAcrossNodes(t *testing.T) {
	c := newCluster(t)
	c.create(t, groupContent("split-group", "alpha/pvc-data", "beta/pvc-log"))
	a := startGroupAdopter(t, c, nodeA, owning("alpha/pvc-data"))
	b := startGroupAdopter(t, c, nodeB, owning("beta/pvc-log"))
	for range 2 {
		a.sync(t, "split-group")
		b.sync(t, "split-group")
	}
	if got := c.groupContentLabel(t, "split-group"); got != "" {
		t.Fatalf("a group across nodes labelled %q", got)
	}
	ev := a.rec.take()
	if len(ev) != 1 || !strings.HasPrefix(ev[0], "Warning "+ReasonGroupSpansNodes) || !strings.Contains(ev[0], "beta/pvc-log") {
		t.Errorf("node-a events %q, want one %s naming the volume elsewhere", ev, ReasonGroupSpansNodes)
	}
	if ev := b.rec.take(); len(ev) != 0 {
		t.Errorf("node-b events %q", ev)
	}
}

func groupClass(name, driver string, labels map[string]string) *groupv1.VolumeGroupSnapshotClass {
	return &groupv1.VolumeGroupSnapshotClass{
		ObjectMeta:     metav1.ObjectMeta{Name: name, Labels: labels},
		Driver:         driver,
		Parameters:     map[string]string{"k": "v"},
		DeletionPolicy: "Retain",
	}
}

func (c *cluster) groupClassNames(t *testing.T) map[string]*groupv1.VolumeGroupSnapshotClass {
	t.Helper()
	l, err := c.snap.GroupsnapshotV1().VolumeGroupSnapshotClasses().List(context.Background(), metav1.ListOptions{})
	if err != nil {
		t.Fatal(err)
	}
	m := map[string]*groupv1.VolumeGroupSnapshotClass{}
	for i := range l.Items {
		m[l.Items[i].Name] = &l.Items[i]
	}
	return m
}

// Each node keeps its own copy of the driver's unlabelled group snapshot
// classes, labelled for itself (the only classes its csi-snapshotter
// sees), owned by its Node; another driver's class and a copy are not
// copied; a copy deleted is made again.
func TestGroupAdopterKeepsNodeClasses(t *testing.T) {
	c := newCluster(t)
	c.create(t, groupClass("csi-dmthin", driverName, nil), groupClass("theirs", "other.csi.example", nil),
		groupClass("pinned", driverName, map[string]string{LabelManagedBy: "node-z"}))
	a := startGroupAdopterWithUID(t, c, nodeA, "uid-node-a", owning())
	b := startGroupAdopter(t, c, nodeB, owning())
	for _, n := range []*groupAdopterNode{a, b} {
		for _, name := range []string{"csi-dmthin", "theirs", "pinned"} {
			n.syncClass(t, name)
		}
	}
	got := c.groupClassNames(t)
	if len(got) != 5 {
		t.Errorf("classes %v, want the three and one copy per node", keys(got))
	}
	for node, uid := range map[string]string{nodeA: "uid-node-a", nodeB: ""} {
		cp := got["csi-dmthin-"+node]
		if cp == nil {
			t.Fatalf("no class csi-dmthin-%s in %v", node, keys(got))
		}
		if cp.Labels[LabelManagedBy] != node || cp.Labels[LabelGroupClassOf] != "csi-dmthin" || cp.Driver != driverName ||
			cp.DeletionPolicy != "Retain" || cp.Parameters["k"] != "v" {
			t.Errorf("copy for %s: %+v", node, cp)
		}
		if owners := cp.OwnerReferences; uid == "" && len(owners) != 0 || uid != "" && (len(owners) != 1 || owners[0].Kind != "Node" || owners[0].Name != node || string(owners[0].UID) != uid) {
			t.Errorf("copy for %s owned by %+v", node, owners)
		}
	}
	// Deleted, it comes back; already there, nothing is written.
	if err := c.snap.GroupsnapshotV1().VolumeGroupSnapshotClasses().Delete(context.Background(), "csi-dmthin-"+nodeA, metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	eventually(t, "the copy gone from the cache", func() bool {
		_, err := a.a.classes.Get("csi-dmthin-" + nodeA)
		return err != nil
	})
	creates := countActions(c.snap.Actions(), "create", "volumegroupsnapshotclasses")
	a.syncClass(t, "csi-dmthin")
	b.syncClass(t, "csi-dmthin")
	if n := countActions(c.snap.Actions(), "create", "volumegroupsnapshotclasses") - creates; n != 1 {
		t.Errorf("%d creates after the copy was deleted, want 1 (node-a's)", n)
	}
	if _, ok := c.groupClassNames(t)["csi-dmthin-"+nodeA]; !ok {
		t.Error("node-a's copy not made again")
	}
}

// A content of this node's volumes that names a class labelled for no node
// (or another) is labelled, and a Warning names the class that works.
func TestGroupAdopterWarnsOfClassNotForNode(t *testing.T) {
	c := newCluster(t)
	shared, own := "csi-dmthin", "csi-dmthin-"+nodeA
	wrong := groupContent("wrong-class", "alpha/pvc-data")
	wrong.Spec.VolumeGroupSnapshotClassName = &shared
	right := groupContent("right-class", "alpha/pvc-log")
	right.Spec.VolumeGroupSnapshotClassName = &own
	c.create(t, groupClass(shared, driverName, nil), groupClass(own, driverName, map[string]string{LabelManagedBy: nodeA}), wrong, right)
	a := startGroupAdopter(t, c, nodeA, owning("alpha/pvc-data", "alpha/pvc-log"))
	a.sync(t, "wrong-class")
	ev := a.rec.take()
	if len(ev) != 2 || !strings.HasPrefix(ev[1], "Warning "+ReasonGroupClassNotForNode) || !strings.Contains(ev[1], own) {
		t.Errorf("events %q, want the adoption and a %s naming %s", ev, ReasonGroupClassNotForNode, own)
	}
	a.sync(t, "right-class")
	if ev := a.rec.take(); len(ev) != 1 || !strings.HasPrefix(ev[0], "Normal "+ReasonGroupAdopted) {
		t.Errorf("events %q, want the adoption only", ev)
	}
}

// A copy's name is "<class>-<node>", never longer than a name may be.
func TestNodeGroupClassName(t *testing.T) {
	if got := NodeGroupClassName("csi-dmthin", "node-a"); got != "csi-dmthin-node-a" {
		t.Errorf("got %q", got)
	}
	long := strings.Repeat("n", 250)
	a, b := NodeGroupClassName("csi-dmthin", long), NodeGroupClassName("csi-dmthin", long+"x")
	if len(a) != 253 || len(b) != 253 || a == b {
		t.Errorf("long names %d %d, equal %v", len(a), len(b), a == b)
	}
}

func keys[V any](m map[string]V) []string {
	var out []string
	for k := range m {
		out = append(out, k)
	}
	return out
}
