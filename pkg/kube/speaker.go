package kube

import (
	"context"

	snapv1 "github.com/kubernetes-csi/external-snapshotter/client/v8/apis/volumesnapshot/v1"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/klog/v2"

	"github.com/csi-dmthin/csi-dmthin/pkg/csi"
)

// Who speaks about a restore that cannot be placed.
//
// Every node runs placement and sees every such PVC. Only the node that
// holds the source can place it, so "owned elsewhere" needs no word from
// anyone. But "the source is gone" is seen by all N nodes alike, and N
// Events saying the same thing bury the one that matters. So exactly one
// node speaks, chosen from records every node reads the same way:
//
//  1. The node the source's own records name as its holder:
//     - a snapshot: its VolumeSnapshotContent's
//     snapshot.storage.kubernetes.io/managed-by label, which the
//     snapshot-controller sets in distributed mode to the node of the
//     source volume; without the label, the node of the PV whose CSI
//     volume handle is the content's source volume handle;
//     - a clone: the source PV's required node affinity on our topology
//     key (a csi-dmthin PV always has one, naming its node).
//     That node speaks when it does not hold the source (RestoreSourceMissing),
//     and, being the holder, it is the only one that can know its pool is
//     full or unhealthy (SourceNodeFull, SourcePoolUnhealthy). Every other
//     node stays silent.
//  2. When no record names a node (the VolumeSnapshot, its content, the
//     source PVC or its PV no longer exists), the nodes race to mark the
//     PVC with the annotation <driver>/placement-warning=<reason> by an
//     update carrying the resourceVersion each read. The API server lets
//     exactly one such update through; its writer speaks, and the others
//     get a conflict, see the mark on their next look and stay silent.
//
// A node that restarts forgets what it said under rule 1 and may repeat
// itself once; under rule 2 the mark on the PVC remembers.

// warningMark is the annotation rule 2 races on.
func (p *Placement) warningMark() string { return p.driver + "/placement-warning" }

// speakAboutGone says that src is gone, if this node is the one to say it.
// retry asks for another look (after losing or failing the race).
func (p *Placement) speakAboutGone(ctx context.Context, pvc *corev1.PersistentVolumeClaim, src source, msg string) (retry bool, err error) {
	if src.namedNode != "" {
		if src.namedNode == p.node {
			p.warnOnce(ctx, pvc, ReasonSourceMissing, msg)
		}
		return false, nil
	}
	mark := p.warningMark()
	if pvc.Annotations[mark] == ReasonSourceMissing {
		return false, nil // said already, by us or another node
	}
	upd := pvc.DeepCopy()
	if upd.Annotations == nil {
		upd.Annotations = map[string]string{}
	}
	upd.Annotations[mark] = ReasonSourceMissing
	_, err = p.client.CoreV1().PersistentVolumeClaims(pvc.Namespace).Update(ctx, upd, metav1.UpdateOptions{})
	switch {
	case apierrors.IsConflict(err):
		klog.FromContext(ctx).V(4).Info("Another node is reporting the missing source", "pvc", klog.KObj(pvc))
		return true, nil
	case err != nil:
		return false, err
	}
	p.wrote(pvc)
	p.warnOnce(ctx, pvc, ReasonSourceMissing, msg)
	return false, nil
}

// pvNode returns the node a PV's required node affinity pins it to on our
// topology key; "" when it names none or more than one.
func pvNode(pv *corev1.PersistentVolume) string {
	if pv.Spec.NodeAffinity == nil || pv.Spec.NodeAffinity.Required == nil {
		return ""
	}
	node := ""
	for _, term := range pv.Spec.NodeAffinity.Required.NodeSelectorTerms {
		for _, e := range term.MatchExpressions {
			if e.Key != csi.TopologyKey || e.Operator != corev1.NodeSelectorOpIn || len(e.Values) != 1 {
				continue
			}
			if node != "" && node != e.Values[0] {
				return ""
			}
			node = e.Values[0]
		}
	}
	return node
}

// LabelManagedBy is the label the snapshot-controller's distributed mode
// puts on a VolumeSnapshotContent: the node whose snapshotter handles it.
const LabelManagedBy = "snapshot.storage.kubernetes.io/managed-by"

// contentNode returns the node a VolumeSnapshotContent's records name as
// holding its snapshot; "" when none does.
func (p *Placement) contentNode(vsc *snapv1.VolumeSnapshotContent) string {
	if n := vsc.Labels[LabelManagedBy]; n != "" {
		return n
	}
	h := vsc.Spec.Source.VolumeHandle
	if h == nil || *h == "" {
		return ""
	}
	objs, err := p.pvIndex.ByIndex(byHandle, p.driver+"/"+*h)
	if err != nil || len(objs) != 1 {
		return ""
	}
	pv, ok := objs[0].(*corev1.PersistentVolume)
	if !ok {
		return ""
	}
	return pvNode(pv)
}
