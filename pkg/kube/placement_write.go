package kube

import (
	"context"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/klog/v2"
)

// The API writes placement makes (the selected-node annotation, Warning
// Events) and the state that keeps them from repeating.

// selectNode sets the annotation with an update that carries the
// resourceVersion read, so it is decided once: a conflict means the PVC
// changed under us (most likely the scheduler chose); re-read it and look
// again rather than write over the change.
func (p *Placement) selectNode(ctx context.Context, pvc *corev1.PersistentVolumeClaim, src source) (bool, error) {
	logger := klog.FromContext(ctx)
	upd := pvc.DeepCopy()
	if upd.Annotations == nil {
		upd.Annotations = map[string]string{}
	}
	previous := upd.Annotations[AnnSelectedNode]
	upd.Annotations[AnnSelectedNode] = src.node
	_, err := p.client.CoreV1().PersistentVolumeClaims(pvc.Namespace).Update(ctx, upd, metav1.UpdateOptions{})
	if apierrors.IsConflict(err) {
		fresh, gerr := p.client.CoreV1().PersistentVolumeClaims(pvc.Namespace).Get(ctx, pvc.Name, metav1.GetOptions{})
		if gerr != nil {
			return false, gerr
		}
		if n := fresh.Annotations[AnnSelectedNode]; n == src.node || fresh.Spec.VolumeName != "" {
			logger.V(2).Info("PVC was placed meanwhile", "pvc", klog.KObj(pvc), "node", n)
			return false, nil
		}
		logger.V(2).Info("PVC changed while placing it; looking again", "pvc", klog.KObj(pvc))
		return true, nil
	}
	if err != nil {
		return false, err
	}
	p.wrote(pvc)
	p.mu.Lock()
	p.selected[pvc.UID] = selection{times: p.selected[pvc.UID].times + 1, last: time.Now()}
	p.mu.Unlock()
	logger.Info("Selected the node that holds the source for a restore or clone", "pvc", klog.KObj(pvc), "node", src.node, "source", src.what, "id", src.id, "replaced", previous)
	if previous != "" {
		p.recorder.Eventf(pvc, corev1.EventTypeNormal, ReasonSourceNode, "node %s holds %s (%s); selected it for the new volume in place of node %s, which does not", src.node, src.what, src.id, previous)
	} else {
		p.recorder.Eventf(pvc, corev1.EventTypeNormal, ReasonSourceNode, "node %s holds %s (%s); selected it for the new volume", src.node, src.what, src.id)
	}
	p.forget(pvc.UID)
	return false, nil
}

// warnOnce puts a Warning Event on the PVC unless placement already said
// the same for it. (A restart forgets; the event recorder's own aggregation
// then folds a repeat into the first Event's count.)
func (p *Placement) warnOnce(ctx context.Context, pvc *corev1.PersistentVolumeClaim, reason, msg string) {
	p.sayOnce(ctx, pvc, corev1.EventTypeWarning, reason, msg)
}

// sayOnce puts an Event of type and reason on pvc, unless the last one
// placement put there had the same reason.
func (p *Placement) sayOnce(ctx context.Context, pvc *corev1.PersistentVolumeClaim, eventType, reason, msg string) {
	p.mu.Lock()
	said := p.spoken[pvc.UID] == reason
	p.spoken[pvc.UID] = reason
	p.mu.Unlock()
	if said {
		return
	}
	klog.FromContext(ctx).Info("Restore not placed on its source's node", "pvc", klog.KObj(pvc), "reason", reason, "message", msg)
	p.recorder.Event(pvc, eventType, reason, msg)
}

func (p *Placement) forget(uid types.UID) {
	p.mu.Lock()
	delete(p.spoken, uid)
	p.mu.Unlock()
}

// wrote notes that placement updated pvc, read at its resourceVersion.
func (p *Placement) wrote(pvc *corev1.PersistentVolumeClaim) {
	p.mu.Lock()
	p.wroteOver[pvc.UID] = pvc.ResourceVersion
	p.mu.Unlock()
}

// staleCache reports whether pvc is the copy placement last wrote over.
func (p *Placement) staleCache(pvc *corev1.PersistentVolumeClaim) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	rv, ok := p.wroteOver[pvc.UID]
	if ok && rv != pvc.ResourceVersion {
		delete(p.wroteOver, pvc.UID) // caught up
		return false
	}
	return ok
}
