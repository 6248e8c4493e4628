package kube

import (
	"context"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/kubernetes/scheme"
	typedcorev1 "k8s.io/client-go/kubernetes/typed/core/v1"
	corelisters "k8s.io/client-go/listers/core/v1"
	"k8s.io/client-go/tools/record"
	"k8s.io/klog/v2"

	"github.com/csi-dmthin/csi-dmthin/pkg/csi"
)

// Component is the source component of every Event csi-dmthin writes.
const Component = "csi-dmthin"

// ReasonNoSpace is the reason of the Warning put on a PVC whose volume this
// node refused to create for lack of space.
const ReasonNoSpace = "ProvisioningNoSpace"

// NewRecorder starts an event broadcaster writing to the API server through
// client and returns a recorder whose Events name Component and this node
// as their source. Call the returned stop at shutdown.
func NewRecorder(ctx context.Context, client kubernetes.Interface, node string) (record.EventRecorder, func()) {
	b := record.NewBroadcaster(record.WithContext(ctx))
	b.StartStructuredLogging(4)
	b.StartRecordingToSink(&typedcorev1.EventSinkImpl{Interface: client.CoreV1().Events("")})
	return b.NewRecorder(scheme.Scheme, corev1.EventSource{Component: Component, Host: node}), b.Shutdown
}

// PVCEvents turns the driver's refusals into Events on the PVC
// (csi.EventSink).
type PVCEvents struct {
	recorder record.EventRecorder
	pvcs     corelisters.PersistentVolumeClaimLister // may be nil
}

var _ csi.EventSink = (*PVCEvents)(nil)

// NewPVCEvents makes an event sink. pvcs, when set, supplies the PVC's UID,
// without which `kubectl describe pvc` does not show the Event.
func NewPVCEvents(recorder record.EventRecorder, pvcs corelisters.PersistentVolumeClaimLister) *PVCEvents {
	return &PVCEvents{recorder: recorder, pvcs: pvcs}
}

// ProvisioningNoSpace puts a Warning on the PVC. The recorder queues it, so
// the CSI call does not wait on the API server.
func (e *PVCEvents) ProvisioningNoSpace(namespace, name, message string) {
	var obj runtime.Object = &corev1.ObjectReference{Kind: "PersistentVolumeClaim", APIVersion: "v1", Namespace: namespace, Name: name}
	if e.pvcs != nil {
		if pvc, err := e.pvcs.PersistentVolumeClaims(namespace).Get(name); err == nil {
			obj = pvc
		} else {
			klog.V(4).InfoS("PVC not in the cache; the Event carries no UID", "pvc", klog.KRef(namespace, name), "err", err)
		}
	}
	e.recorder.Event(obj, corev1.EventTypeWarning, ReasonNoSpace, message)
}
