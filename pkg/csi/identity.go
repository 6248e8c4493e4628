package csi

import (
	"context"

	csipb "github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/wrapperspb"
)

func (d *Driver) GetPluginInfo(context.Context, *csipb.GetPluginInfoRequest) (*csipb.GetPluginInfoResponse, error) {
	return &csipb.GetPluginInfoResponse{Name: d.name, VendorVersion: d.version}, nil
}

func (d *Driver) GetPluginCapabilities(context.Context, *csipb.GetPluginCapabilitiesRequest) (*csipb.GetPluginCapabilitiesResponse, error) {
	svc := func(t csipb.PluginCapability_Service_Type) *csipb.PluginCapability {
		return &csipb.PluginCapability{Type: &csipb.PluginCapability_Service_{Service: &csipb.PluginCapability_Service{Type: t}}}
	}
	return &csipb.GetPluginCapabilitiesResponse{Capabilities: []*csipb.PluginCapability{
		svc(csipb.PluginCapability_Service_CONTROLLER_SERVICE),
		svc(csipb.PluginCapability_Service_GROUP_CONTROLLER_SERVICE),
		svc(csipb.PluginCapability_Service_VOLUME_ACCESSIBILITY_CONSTRAINTS),
		// CSI 1.13 (alpha): a snapshot is reachable only on its volume's node.
		svc(csipb.PluginCapability_Service_SNAPSHOT_ACCESSIBILITY_CONSTRAINTS),
		// Expansion happens on the node (NodeExpandVolume grows the thin
		// device and the filesystem); with no controller EXPAND_VOLUME the
		// csi-resizer runs in its trivial mode and never calls us.
		{Type: &csipb.PluginCapability_VolumeExpansion_{VolumeExpansion: &csipb.PluginCapability_VolumeExpansion{Type: csipb.PluginCapability_VolumeExpansion_ONLINE}}},
	}}, nil
}

// Probe reports not ready while any pool is failed, read-only or needs a
// check, or cannot be read.
func (d *Driver) Probe(ctx context.Context, _ *csipb.ProbeRequest) (*csipb.ProbeResponse, error) {
	for name, p := range d.pools {
		u, err := p.Usage()
		if err != nil {
			return nil, status.Errorf(codes.FailedPrecondition, "pool %s: %v", name, err)
		}
		if !u.Healthy() {
			return nil, status.Errorf(codes.FailedPrecondition, "pool %s is unhealthy: mode %s, needs_check %v, failed %v", name, u.Mode, u.NeedsCheck, u.Failed)
		}
	}
	return &csipb.ProbeResponse{Ready: wrapperspb.Bool(true)}, nil
}
