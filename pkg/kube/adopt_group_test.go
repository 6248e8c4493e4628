package kube

import (
	"context"
	"strings"
	"testing"

	groupv1 "github.com/kubernetes-csi/external-snapshotter/client/v8/apis/volumegroupsnapshot/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/types"
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

// groupAdopter is the controller's group content adopter over the fake
// cluster.
type groupAdopter struct {
	a   *GroupAdopter
	rec *eventLog
}

func startGroupAdopter(t *testing.T, c *cluster) *groupAdopter {
	t.Helper()
	n := startController(t, c, false)
	return &groupAdopter{a: n.c.groups, rec: n.rec}
}

func (n *groupAdopter) sync(t *testing.T, name string) {
	t.Helper()
	eventually(t, "the content in the cache", func() bool {
		_, err := n.a.contents.Get(name)
		return err == nil
	})
	if _, err := n.a.sync(context.Background(), name); err != nil {
		t.Fatal(err)
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

// The PVs of a group content's volumes, on node-a (alpha) and node-b
// (beta).
func groupPVs() []runtime.Object {
	return []runtime.Object{
		volume("pv-data", "alpha/pvc-data", nodeA, "data"), volume("pv-log", "alpha/pvc-log", nodeA, "log"),
		volume("pv-x", "alpha/pvc-x", nodeA, "x"), volume("pv-y", "alpha/pvc-y", nodeA, "y"),
		volume("pv-b1", "beta/pvc-1", nodeB, "b1"), volume("pv-blog", "beta/pvc-log", nodeB, "blog"),
	}
}

// A group content goes to the node holding all its volumes (their PVs'
// affinity); a pre-provisioned one to the node its snapshot handles name.
func TestGroupAdopterLabelsTheNodeOfTheVolumes(t *testing.T) {
	c := newCluster(t)
	pre := groupContent("imported-group")
	pre.Spec.Source = groupv1.VolumeGroupSnapshotContentSource{GroupSnapshotHandles: &groupv1.GroupSnapshotHandles{
		VolumeGroupSnapshotHandle: "beta/group-1", VolumeSnapshotHandles: []string{nodeB + "/beta/snap-a", nodeB + "/beta/snap-b"},
	}}
	foreign := groupContent("foreign-group", "alpha/pvc-data")
	foreign.Spec.Driver = "other.csi.example"
	c.create(t, append(groupPVs(), groupContent("db-group", "alpha/pvc-data", "alpha/pvc-log"), pre, foreign)...)
	a := startGroupAdopter(t, c)
	for _, name := range []string{"db-group", "imported-group", "foreign-group"} {
		a.sync(t, name)
	}
	for name, want := range map[string]string{"db-group": nodeA, "imported-group": nodeB, "foreign-group": ""} {
		if got := c.groupContentLabel(t, name); got != want {
			t.Errorf("%s labelled %q, want %q", name, got, want)
		}
	}
	if ev := a.rec.take(); len(ev) != 2 || count(ev, "Normal "+ReasonGroupAdopted) != 2 || !strings.Contains(strings.Join(ev, "\n"), "alpha/pvc-log") {
		t.Errorf("events %q, want two %s", ev, ReasonGroupAdopted)
	}
	if n := countActions(c.snap.Actions(), "patch", "volumegroupsnapshotcontents"); n != 2 {
		t.Errorf("%d patches, want 2", n)
	}
}

// A group whose volumes are on two nodes is taken by neither, and says so
// once; one with a volume no PV names: a Warning, and another look later.
func TestGroupAdopterGroupAcrossNodes(t *testing.T) {
	c := newCluster(t)
	c.create(t, append(groupPVs(), groupContent("split-group", "alpha/pvc-data", "beta/pvc-log"), groupContent("pvless-group", "alpha/pvc-data", "alpha/pvc-nopv"))...)
	a := startGroupAdopter(t, c)
	for range 2 {
		a.sync(t, "split-group")
		a.sync(t, "pvless-group")
	}
	for _, name := range []string{"split-group", "pvless-group"} {
		if got := c.groupContentLabel(t, name); got != "" {
			t.Errorf("%s labelled %q", name, got)
		}
	}
	ev := a.rec.take()
	if len(ev) != 2 || count(ev, "Warning "+ReasonGroupSpansNodes) != 1 || count(ev, "Warning "+ReasonGroupNodeUnknown) != 1 {
		t.Fatalf("events %q, want one %s and one %s", ev, ReasonGroupSpansNodes, ReasonGroupNodeUnknown)
	}
	for _, e := range ev {
		if strings.Contains(e, ReasonGroupSpansNodes) && !(strings.Contains(e, "node node-b holds beta/pvc-log") && strings.Contains(e, "node node-a holds alpha/pvc-data")) {
			t.Errorf("%q does not say which node holds what", e)
		}
		if strings.Contains(e, ReasonGroupNodeUnknown) && !strings.Contains(e, "alpha/pvc-nopv") {
			t.Errorf("%q does not name the volume without a node", e)
		}
	}
}

// The node that takes a group snapshot labels its class for itself first
// (its csi-snapshotter reads only the classes labelled for its node), then
// the content; another node holding the class is taken over while this
// node's content is not ready; a ready content, another driver's class or
// a missing class are left alone.
func TestGroupAdopterClaimsTheClass(t *testing.T) {
	c := newCluster(t)
	shared, theirs, missing := "csi-dmthin", "their-class", "gone"
	first := groupContent("first", "alpha/pvc-data")
	first.Spec.VolumeGroupSnapshotClassName = &shared
	foreign := groupContent("foreign-class", "alpha/pvc-log")
	foreign.Spec.VolumeGroupSnapshotClassName = &theirs
	lost := groupContent("missing-class", "alpha/pvc-x")
	lost.Spec.VolumeGroupSnapshotClassName = &missing
	c.create(t, append(groupPVs(), groupClass(shared, driverName, nil), groupClass(theirs, "other.csi.example", nil), first, foreign, lost)...)
	a := startGroupAdopter(t, c)
	a.classesCached(t, shared, theirs)
	for _, name := range []string{"first", "foreign-class", "missing-class"} {
		a.sync(t, name)
	}
	if got := c.groupClassLabel(t, shared); got != nodeA {
		t.Errorf("class %s labelled %q, want %q", shared, got, nodeA)
	}
	if got := c.groupClassLabel(t, theirs); got != "" {
		t.Errorf("another driver's class labelled %q", got)
	}
	for _, name := range []string{"first", "foreign-class", "missing-class"} {
		if got := c.groupContentLabel(t, name); got != nodeA {
			t.Errorf("%s labelled %q", name, got)
		}
	}
	ev := a.rec.take()
	if len(ev) != 4 || !strings.HasPrefix(ev[0], "Normal "+ReasonGroupClassClaimed) || !strings.Contains(ev[0], shared) {
		t.Errorf("events %q, want the class claimed first, then three adoptions", ev)
	}

	// Node b takes a group of its own with the same class: the class goes
	// to b, and comes back to a only for a content of a's that is not
	// ready.
	second := groupContent("second", "beta/pvc-1")
	second.Spec.VolumeGroupSnapshotClassName = &shared
	c.create(t, second)
	a.sync(t, "second")
	if got := c.groupClassLabel(t, shared); got != nodeB {
		t.Errorf("class %s labelled %q after node-b's group, want %q", shared, got, nodeB)
	}
	eventually(t, "the class change in the cache", func() bool {
		got, err := a.a.classes.Get(shared)
		return err == nil && got.Labels[LabelManagedBy] == nodeB
	})
	ready := true
	done, err := c.snap.GroupsnapshotV1().VolumeGroupSnapshotContents().Get(context.Background(), "first", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	done.Status = &groupv1.VolumeGroupSnapshotContentStatus{ReadyToUse: &ready}
	if _, err := c.snap.GroupsnapshotV1().VolumeGroupSnapshotContents().UpdateStatus(context.Background(), done, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	eventually(t, "the ready content in the cache", func() bool {
		got, err := a.a.contents.Get("first")
		return err == nil && got.Status != nil
	})
	a.sync(t, "first")
	if got := c.groupClassLabel(t, shared); got != nodeB {
		t.Errorf("a ready content took the class back: labelled %q", got)
	}
	third := groupContent("third", "alpha/pvc-y")
	third.Spec.VolumeGroupSnapshotClassName = &shared
	third.Labels = map[string]string{LabelManagedBy: nodeA}
	c.create(t, third)
	a.sync(t, "third")
	if got := c.groupClassLabel(t, shared); got != nodeA {
		t.Errorf("class %s labelled %q after node-a's unready content, want %q", shared, got, nodeA)
	}
}

func groupClass(name, driver string, labels map[string]string) *groupv1.VolumeGroupSnapshotClass {
	return &groupv1.VolumeGroupSnapshotClass{
		ObjectMeta:     metav1.ObjectMeta{Name: name, Labels: labels},
		Driver:         driver,
		DeletionPolicy: "Delete",
	}
}

func (c *cluster) groupClassLabel(t *testing.T, name string) string {
	t.Helper()
	g, err := c.snap.GroupsnapshotV1().VolumeGroupSnapshotClasses().Get(context.Background(), name, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	return g.Labels[LabelManagedBy]
}

func (n *groupAdopter) classesCached(t *testing.T, names ...string) {
	t.Helper()
	for _, name := range names {
		eventually(t, "class "+name+" in the cache", func() bool {
			_, err := n.a.classes.Get(name)
			return err == nil
		})
	}
}
