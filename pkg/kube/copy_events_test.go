package kube

import (
	"context"
	"slices"
	"testing"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/csi-dmthin/csi-dmthin/pkg/csi"
)

// A copy's Events go on its PVC, Normal or Warning; whether the PVC still
// exists and which node holds a clone's source are read from that one
// PVC, never from a cache of the cluster's.
func TestCopyEventsAndQuestions(t *testing.T) {
	c := newCluster(t)
	clone := claim("clone", wffc.Name, fromClaim("src"))
	clone.Annotations = map[string]string{AnnCopyFromNode: nodeB}
	gone := claim("going", wffc.Name, nil)
	now := metav1.Now()
	gone.DeletionTimestamp, gone.Finalizers = &now, []string{"kubernetes.io/pvc-protection"}
	bound := boundClaim("bound", "pv-mine")
	placed := claim("placed", wffc.Name, nil)
	placed.Annotations = map[string]string{AnnSelectedNode: nodeA}
	c.create(t, wffc, clone, gone, bound, placed)
	rec := &eventLog{}
	sink := NewPVCEvents(rec, c.core)
	sink.CopyEvent(ns, "clone", false, "CopyStarted", "copying")
	sink.CopyEvent(ns, "clone", true, "CopyFailed", "refused")
	var ev []string
	eventually(t, "two Events", func() bool {
		ev = append(ev, rec.take()...)
		return len(ev) >= 2
	})
	slices.Sort(ev)
	if len(ev) != 2 || ev[0] != "Normal CopyStarted PersistentVolumeClaim/db/clone@uid-clone: copying" || ev[1] != "Warning CopyFailed PersistentVolumeClaim/db/clone@uid-clone: refused" {
		t.Errorf("events = %q", ev)
	}
	ctx := context.Background()
	for _, tc := range []struct {
		ref  csi.ClaimRef
		want bool
	}{
		{csi.ClaimRef{Namespace: ns, Name: "clone"}, true},
		{csi.ClaimRef{Namespace: ns, Name: "clone", UID: "uid-clone", Node: nodeA, Volume: "pvc-uid-clone"}, true},
		{csi.ClaimRef{Namespace: ns, Name: "clone", UID: "uid-other"}, false},
		{csi.ClaimRef{Namespace: ns, Name: "bound", Volume: "pv-mine"}, true},
		{csi.ClaimRef{Namespace: ns, Name: "bound", Volume: "pvc-mine"}, false},
		{csi.ClaimRef{Namespace: ns, Name: "placed", Node: nodeA}, true},
		{csi.ClaimRef{Namespace: ns, Name: "placed", Node: nodeB}, false},
		{csi.ClaimRef{Namespace: ns, Name: "going"}, false},
		{csi.ClaimRef{Namespace: ns, Name: "missing"}, false},
	} {
		if got, err := sink.ClaimWants(ctx, tc.ref); err != nil || got != tc.want {
			t.Errorf("ClaimWants(%+v) = %v, %v; want %v", tc.ref, got, err, tc.want)
		}
	}

	if node, err := sink.CopySourceNode(ctx, ns, "clone"); err != nil || node != nodeB {
		t.Errorf("CopySourceNode(clone) = %q, %v; want %q", node, err, nodeB)
	}
	if node, err := sink.CopySourceNode(ctx, ns, "going"); err != nil || node != "" {
		t.Errorf("CopySourceNode of a PVC without the annotation = %q, %v", node, err)
	}
	if n := countActions(c.core.Actions(), "list", "persistentvolumeclaims") + countActions(c.core.Actions(), "watch", "persistentvolumeclaims"); n != 0 {
		t.Errorf("%d PVC lists and watches, want none", n)
	}
}
