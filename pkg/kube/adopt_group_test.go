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
	ctx, cancel := context.WithCancel(context.Background())
	inf := snapinformers.NewSharedInformerFactory(c.snap, 0)
	rec := &eventLog{}
	a, err := NewGroupAdopter(GroupAdopterOptions{DriverName: driverName, NodeName: name, Owner: owner, Client: c.snap, Recorder: rec, Informers: inf})
	if err != nil {
		t.Fatal(err)
	}
	inf.Start(ctx.Done())
	t.Cleanup(func() { cancel(); inf.Shutdown() })
	if !cache.WaitForCacheSync(ctx.Done(), a.synced) {
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
