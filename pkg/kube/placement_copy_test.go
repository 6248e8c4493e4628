package kube

import (
	"context"
	"testing"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// A restore left to the scheduler because its source node was cordoned is
// copied on the node the scheduler picked (node-b). Once the source node
// is uncordoned, a later sync of the still-pending PVC must not move it to
// the source's node: the copy on node-b would be abandoned. (Found by a
// review: the decision was not kept.)
func TestCopyDecisionStands(t *testing.T) {
	c := newCluster(t)
	setCordon := func(on bool) {
		node := &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: nodeA}, Spec: corev1.NodeSpec{Unschedulable: on}}
		if _, err := c.core.CoreV1().Nodes().Update(context.Background(), node, metav1.UpdateOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	setCordon(true)
	vsc := content("content-1", "snap-1", nodeA+"/alpha/snap-1", nodeA)
	vsc.Status.RestoreSize = ptr(int64(4 << 30))
	c.create(t, wffc, snapshot("snap-1", "content-1", true), vsc, claim("restore", wffc.Name, fromSnapshot("snap-1")))
	a := startControllerWith(t, c, false, true)
	c.setThinPool(t, a, nodeA, "alpha", HealthHealthy, "100Gi")
	a.sync(t, c, "restore")
	// The scheduler picks node-b; its provisioner starts the copy there.
	pvc := c.pvc(t, "restore")
	if pvc.Annotations == nil {
		pvc.Annotations = map[string]string{}
	}
	pvc.Annotations[AnnSelectedNode] = nodeB
	if _, err := c.core.CoreV1().PersistentVolumeClaims(ns).Update(context.Background(), pvc, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	a.sync(t, c, "restore")
	setCordon(false)
	a.sync(t, c, "restore")
	if got := c.pvc(t, "restore").Annotations[AnnCopyFromNode]; got != nodeA {
		t.Errorf("%s = %q, want %q", AnnCopyFromNode, got, nodeA)
	}
	if got := c.pvc(t, "restore").Annotations[AnnSelectedNode]; got != nodeB {
		t.Errorf("selected-node = %q after the source node's uncordon; want %q, where the copy runs (events %q)", got, nodeB, a.events())
	}
}
