package kube

import (
	"testing"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// The controller's caches keep objects without their managedFields, and
// placement's update of a cached PVC leaves the PVC's managedFields as they
// were.
func TestControllerCachesWithoutManagedFields(t *testing.T) {
	c := newCluster(t)
	restore := claim("restore", wffc.Name, fromSnapshot("snap-1"))
	restore.ManagedFields = []metav1.ManagedFieldsEntry{{
		Manager: "kubectl-client-side-apply", Operation: metav1.ManagedFieldsOperationUpdate, APIVersion: "v1",
		FieldsType: "FieldsV1", FieldsV1: &metav1.FieldsV1{Raw: []byte(`{"f:spec":{"f:dataSource":{}}}`)},
	}}
	c.create(t, wffc, snapshot("snap-1", "content-1", true), content("content-1", "snap-1", "alpha/snap-1", nodeA))
	// Straight into the tracker: the fake's create would write its own
	// entry in place of the creator's.
	if err := c.core.Tracker().Add(restore); err != nil {
		t.Fatal(err)
	}
	n := startController(t, c, false)
	n.waitCache(t, c, "restore")
	cached, err := n.p.view.pvcs.PersistentVolumeClaims(ns).Get("restore")
	if err != nil {
		t.Fatal(err)
	}
	if len(cached.ManagedFields) != 0 {
		t.Errorf("the cache keeps the PVC's managedFields: %v", cached.ManagedFields)
	}
	n.sync(t, c, "restore")
	got := c.pvc(t, "restore")
	if got.Annotations[AnnSelectedNode] != nodeA {
		t.Fatalf("selected-node = %q, want %q", got.Annotations[AnnSelectedNode], nodeA)
	}
	if !hasManager(got.ManagedFields, "kubectl-client-side-apply") {
		t.Errorf("after placement's update, managedFields = %v: the creator's entry is gone", got.ManagedFields)
	}
}

func hasManager(entries []metav1.ManagedFieldsEntry, manager string) bool {
	for _, e := range entries {
		if e.Manager == manager {
			return true
		}
	}
	return false
}
