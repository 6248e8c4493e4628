package kube

import (
	"context"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/kubernetes/scheme"
	typedcorev1 "k8s.io/client-go/kubernetes/typed/core/v1"
	"k8s.io/client-go/tools/record"
	"k8s.io/klog/v2"

	"github.com/csi-dmthin/csi-dmthin/pkg/csi"
)

// Component is the source component of every Event a node's csi-dmthin
// writes; ControllerComponent of the cluster's controller's.
const (
	Component           = "csi-dmthin"
	ControllerComponent = "csi-dmthin-controller"
)

// ReasonNoSpace is the reason of the Warning put on a PVC whose volume this
// node refused to create for lack of space.
const ReasonNoSpace = "ProvisioningNoSpace"

// NewRecorder starts an event broadcaster writing to the API server through
// client and returns a recorder whose Events name component and host (a
// node's name; "" for the controller) as their source. Call the returned
// stop at shutdown.
func NewRecorder(ctx context.Context, client kubernetes.Interface, component, host string) (record.EventRecorder, func()) {
	b := record.NewBroadcaster(record.WithContext(ctx))
	b.StartStructuredLogging(4)
	b.StartRecordingToSink(&typedcorev1.EventSinkImpl{Interface: client.CoreV1().Events("")})
	return b.NewRecorder(scheme.Scheme, corev1.EventSource{Component: component, Host: host}), b.Shutdown
}

// PVCEvents turns the driver's refusals into Events on the PVC
// (csi.EventSink).
type PVCEvents struct {
	recorder record.EventRecorder
	client   kubernetes.Interface // may be nil
}

var _ csi.EventSink = (*PVCEvents)(nil)

// pvcLookup bounds the read of the PVC an Event goes on.
const pvcLookup = 10 * time.Second

// NewPVCEvents makes an event sink. client, when set, reads the PVC for
// its UID, without which `kubectl describe pvc` does not show the Event;
// it is read when needed, not watched: a node keeps no cache of the
// cluster's PVCs.
func NewPVCEvents(recorder record.EventRecorder, client kubernetes.Interface) *PVCEvents {
	return &PVCEvents{recorder: recorder, client: client}
}

// ProvisioningNoSpace puts a Warning on the PVC. The PVC is read and the
// Event queued in the background, so the CSI call does not wait on the
// API server.
func (e *PVCEvents) ProvisioningNoSpace(namespace, name, message string) {
	go e.noSpace(namespace, name, message)
}

func (e *PVCEvents) noSpace(namespace, name, message string) {
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
	e.recorder.Event(obj, corev1.EventTypeWarning, ReasonNoSpace, message)
}
