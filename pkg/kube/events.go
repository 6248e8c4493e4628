package kube

import (
	"context"
	"time"

	snapscheme "github.com/kubernetes-csi/external-snapshotter/client/v8/clientset/versioned/scheme"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/runtime"
	utilruntime "k8s.io/apimachinery/pkg/util/runtime"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/kubernetes/scheme"
	typedcorev1 "k8s.io/client-go/kubernetes/typed/core/v1"
	"k8s.io/client-go/tools/record"

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
	return b.NewRecorder(EventScheme, corev1.EventSource{Component: component, Host: host}), b.Shutdown
}

// EventScheme knows every kind csi-dmthin puts Events on: Kubernetes'
// own, and the snapshot and group snapshot kinds. An object's kind comes
// from the scheme (objects from informers carry no TypeMeta), and the
// recorder drops an Event on a kind it cannot name.
var EventScheme = func() *runtime.Scheme {
	s := runtime.NewScheme()
	utilruntime.Must(scheme.AddToScheme(s))
	utilruntime.Must(snapscheme.AddToScheme(s))
	return s
}()

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
	e.event(namespace, name, corev1.EventTypeWarning, ReasonNoSpace, message)
}
