package kube

import (
	"context"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/klog/v2"

	"github.com/csi-dmthin/csi-dmthin/pkg/csi"
)

// A copy from another node reports on its PVC, and stops when the PVC is
// gone: the node reads that one PVC when it needs to, and watches nothing.

var (
	_ csi.CopyEventSink = (*PVCEvents)(nil)
	_ csi.ClaimChecker  = (*PVCEvents)(nil)
)

// CopyEvent puts an Event of a copy on the PVC, in the background.
func (e *PVCEvents) CopyEvent(namespace, name string, warning bool, reason, message string) {
	typ := corev1.EventTypeNormal
	if warning {
		typ = corev1.EventTypeWarning
	}
	go e.event(namespace, name, typ, reason, message)
}

func (e *PVCEvents) event(namespace, name, typ, reason, message string) {
	var obj runtime.Object = &corev1.ObjectReference{Kind: "PersistentVolumeClaim", APIVersion: "v1", Namespace: namespace, Name: name}
	if e.client != nil {
		ctx, cancel := context.WithTimeout(context.Background(), pvcLookup)
		defer cancel()
		if pvc, err := e.client.CoreV1().PersistentVolumeClaims(namespace).Get(ctx, name, metav1.GetOptions{}); err == nil {
			obj = pvc
		} else {
			klog.V(4).InfoS("PVC not readable; the Event carries no UID", "pvc", klog.KRef(namespace, name), "err", err)
		}
	}
	e.recorder.Event(obj, typ, reason, message)
}

// ClaimWants reads the PVC: false when it is gone or being deleted, is
// another PVC of the same name (another UID), is bound to another volume,
// or waits for another node than c.Node.
func (e *PVCEvents) ClaimWants(ctx context.Context, c csi.ClaimRef) (bool, error) {
	if e.client == nil {
		return true, nil
	}
	pvc, err := e.client.CoreV1().PersistentVolumeClaims(c.Namespace).Get(ctx, c.Name, metav1.GetOptions{})
	if apierrors.IsNotFound(err) {
		return false, nil
	}
	if err != nil {
		return false, err
	}
	switch {
	case pvc.DeletionTimestamp != nil,
		c.UID != "" && string(pvc.UID) != c.UID,
		pvc.Spec.VolumeName != "" && c.Volume != "" && pvc.Spec.VolumeName != c.Volume,
		pvc.Annotations[AnnSelectedNode] != "" && c.Node != "" && pvc.Annotations[AnnSelectedNode] != c.Node:
		return false, nil
	}
	return true, nil
}

var _ csi.CloneSourceFinder = (*PVCEvents)(nil)

// CopySourceNode reads the PVC's AnnCopyFromNode, which the controller
// sets on a clone it left to be copied: "" when it has none.
func (e *PVCEvents) CopySourceNode(ctx context.Context, namespace, name string) (string, error) {
	if e.client == nil {
		return "", nil
	}
	pvc, err := e.client.CoreV1().PersistentVolumeClaims(namespace).Get(ctx, name, metav1.GetOptions{})
	if err != nil {
		return "", err
	}
	return pvc.Annotations[AnnCopyFromNode], nil
}
