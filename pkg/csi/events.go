package csi

import (
	"strings"

	csipb "github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// Parameters the external-provisioner adds with --extra-create-metadata.
const (
	ParamPVCName      = csiParamPrefix + "pvc/name"
	ParamPVCNamespace = csiParamPrefix + "pvc/namespace"
)

// EventSink turns what the driver refused into Kubernetes Events for an
// operator (pkg/kube has one). It is optional. Its methods are called on
// the RPC's goroutine and must return quickly: they may queue, never wait
// on the API server.
type EventSink interface {
	// ProvisioningNoSpace: CreateVolume for the PVC namespace/name was
	// refused because the pool had no room; message says which node and
	// pool and why.
	ProvisioningNoSpace(namespace, name, message string)
}

// reportNoSpace passes a ResourceExhausted refusal of CreateVolume to the
// event sink, naming the PVC the provisioner put in the parameters, and
// returns err unchanged.
func (d *Driver) reportNoSpace(req *csipb.CreateVolumeRequest, pool string, err error) error {
	if d.events == nil || status.Code(err) != codes.ResourceExhausted {
		return err
	}
	name, ns := req.GetParameters()[ParamPVCName], req.GetParameters()[ParamPVCNamespace]
	if name == "" || ns == "" {
		return err // not from a provisioner with --extra-create-metadata
	}
	// The pool's admission names the pool; other refusals may not.
	msg, where := status.Convert(err).Message(), "node "+d.nodeID
	if !strings.Contains(msg, "pool "+pool+": ") {
		where += ", pool " + pool
	}
	d.events.ProvisioningNoSpace(ns, name, where+": "+msg)
	return err
}
