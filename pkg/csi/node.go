package csi

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"slices"
	"strings"

	csi "github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"k8s.io/klog/v2"

	"github.com/csi-dmthin/csi-dmthin/pkg/thinpool"
)

func (d *Driver) NodeGetInfo(context.Context, *csi.NodeGetInfoRequest) (*csi.NodeGetInfoResponse, error) {
	return &csi.NodeGetInfoResponse{NodeId: d.nodeID, AccessibleTopology: d.topology()}, nil
}

func (d *Driver) NodeGetCapabilities(context.Context, *csi.NodeGetCapabilitiesRequest) (*csi.NodeGetCapabilitiesResponse, error) {
	var caps []*csi.NodeServiceCapability
	for _, t := range []csi.NodeServiceCapability_RPC_Type{
		csi.NodeServiceCapability_RPC_STAGE_UNSTAGE_VOLUME,
		csi.NodeServiceCapability_RPC_GET_VOLUME_STATS,
		csi.NodeServiceCapability_RPC_EXPAND_VOLUME,
		csi.NodeServiceCapability_RPC_SINGLE_NODE_MULTI_WRITER,
		csi.NodeServiceCapability_RPC_GET_VOLUME_HEALTH,
		csi.NodeServiceCapability_RPC_GET_STORAGE_HEALTH,
	} {
		caps = append(caps, &csi.NodeServiceCapability{Type: &csi.NodeServiceCapability_Rpc{Rpc: &csi.NodeServiceCapability_RPC{Type: t}}})
	}
	return &csi.NodeGetCapabilitiesResponse{Capabilities: caps}, nil
}

// kubeletPath checks that a path the CO gave is absolute and inside the
// kubelet directory: nothing else is ever mounted over or removed.
func (d *Driver) kubeletPath(field, p string) (string, error) {
	if p == "" {
		return "", invalid("%s is required", field)
	}
	if !filepath.IsAbs(p) {
		return "", invalid("%s %q is not absolute", field, p)
	}
	c := filepath.Clean(p)
	if !strings.HasPrefix(c, d.kubeletDir+string(filepath.Separator)) {
		return "", invalid("%s %q is outside the kubelet directory %s", field, p, d.kubeletDir)
	}
	return c, nil
}

// required checks that fields (name, value pairs) are set. A handler calls
// it before it parses or looks anything up: a request missing a field is
// InvalidArgument whatever else is wrong with it.
func required(fieldValues ...string) error {
	for i := 0; i+1 < len(fieldValues); i += 2 {
		if fieldValues[i+1] == "" {
			return invalid("%s is required", fieldValues[i])
		}
	}
	return nil
}

// volumePath checks the volume_path of NodeGetVolumeStats and
// NodeExpandVolume. Nothing is mounted or removed there, so a path that
// cannot hold one of our volumes (relative, or outside the kubelet
// directory) is NotFound, the spec's code for "no such volume at that
// path"; it is never looked at.
func (d *Driver) volumePath(p string) (string, error) {
	c, err := d.kubeletPath("volume_path", p)
	if err != nil {
		return "", notFound("%s", status.Convert(err).Message())
	}
	return c, nil
}

// lockVolume parses a volume_id, takes its lock and looks the volume up:
// the common tail of the node calls that act on a volume, after their
// own field checks. The caller defers unlock.
func (d *Driver) lockVolume(volumeID string) (objectID, *thinpool.Volume, func(), error) {
	id, unlock, err := d.lockID(volumeID)
	if err != nil {
		return objectID{}, nil, nil, err
	}
	v, err := d.getVolume(id)
	if err != nil {
		unlock()
		return objectID{}, nil, nil, err
	}
	return id, v, unlock, nil
}

// lockID parses a volume_id and takes its lock (Aborted while another call
// holds it). The volume need not exist: unstaging or unpublishing one that
// is gone must still succeed.
func (d *Driver) lockID(volumeID string) (objectID, func(), error) {
	id, err := mustParseID("volume_id", volumeID)
	if err != nil {
		return objectID{}, nil, err
	}
	unlock, err := d.locks.lock(id.String())
	if err != nil {
		return objectID{}, nil, err
	}
	return id, unlock, nil
}

// mountOptions are the filesystem's mount options for a capability.
func mountOptions(c *csi.VolumeCapability, fsType string) []string {
	opts := slices.Clone(c.GetMount().GetMountFlags())
	if fsType == "xfs" && !slices.Contains(opts, "nouuid") {
		// A clone or restore shares its source's XFS UUID, and XFS refuses
		// to mount a second filesystem with a UUID already mounted.
		opts = append(opts, "nouuid")
	}
	if c.GetAccessMode().GetMode() == csi.VolumeCapability_AccessMode_SINGLE_NODE_READER_ONLY && !slices.Contains(opts, "ro") {
		opts = append(opts, "ro")
	}
	return opts
}

func fsTypeOf(c *csi.VolumeCapability, volCtx map[string]string) string {
	if fs := c.GetMount().GetFsType(); fs != "" {
		return fs
	}
	if fs := volCtx[ParamFSType]; supportedFS[fs] {
		return fs
	}
	return defaultFS
}

func (d *Driver) NodeStageVolume(ctx context.Context, req *csi.NodeStageVolumeRequest) (*csi.NodeStageVolumeResponse, error) {
	if err := required("volume_id", req.GetVolumeId()); err != nil {
		return nil, err
	}
	staging, err := d.kubeletPath("staging_target_path", req.GetStagingTargetPath())
	if err != nil {
		return nil, err
	}
	if err := checkCapability("volume_capability", req.GetVolumeCapability()); err != nil {
		return nil, err
	}
	id, _, unlock, err := d.lockVolume(req.GetVolumeId())
	if err != nil {
		return nil, err
	}
	defer unlock()
	pool, _ := d.pool(id.pool)
	if req.GetVolumeCapability().GetBlock() != nil {
		// A raw block volume is published straight from its device node.
		if _, err := pool.Activate(ctx, id.name); err != nil {
			return nil, toStatus(err, "activate %s", id)
		}
		return &csi.NodeStageVolumeResponse{}, nil
	}
	fsType := fsTypeOf(req.GetVolumeCapability(), req.GetVolumeContext())
	log := klog.FromContext(ctx)
	mounted, err := d.fs.IsMountPoint(staging)
	if err != nil {
		return nil, toStatus(err, "check staging_target_path %s", staging)
	}
	if mounted {
		// Staged already, or something else is mounted there. Decided
		// before activating, so a refused request changes nothing.
		src, err := d.fs.MountedDevice(staging)
		if err != nil {
			return nil, toStatus(err, "check staging_target_path %s", staging)
		}
		device, err := pool.DevicePath(id.name)
		if err != nil || (src != device && !sameDevice(src, device)) {
			return nil, status.Errorf(codes.AlreadyExists, "staging_target_path %s has %s mounted, not volume %s", staging, src, id)
		}
		return &csi.NodeStageVolumeResponse{}, nil
	}
	device, err := pool.Activate(ctx, id.name)
	if err != nil {
		return nil, toStatus(err, "activate %s", id)
	}
	formatted, err := d.fs.Format(ctx, device, fsType, FormatOptions{})
	if err != nil {
		return nil, toStatus(err, "format volume %s", id)
	}
	if err := os.MkdirAll(staging, 0o750); err != nil {
		return nil, toStatus(err, "make staging_target_path")
	}
	if err := d.fs.Mount(ctx, device, staging, fsType, mountOptions(req.GetVolumeCapability(), fsType)); err != nil {
		return nil, toStatus(err, "mount volume %s at %s", id, staging)
	}
	if !formatted {
		// The device may have grown while it was not staged (offline
		// expansion): grow the filesystem with it.
		if err := d.fs.Resize(ctx, device, staging, fsType); err != nil {
			log.Error(err, "Growing the filesystem at stage failed; NodeExpandVolume will retry", "volume", id)
		}
	}
	log.V(2).Info("Staged volume", "volume", id, "device", device, "fsType", fsType, "formatted", formatted)
	return &csi.NodeStageVolumeResponse{}, nil
}

// sameDevice compares two device paths by what they point at.
func sameDevice(a, b string) bool {
	ra, err1 := filepath.EvalSymlinks(a)
	rb, err2 := filepath.EvalSymlinks(b)
	return err1 == nil && err2 == nil && ra == rb
}

func (d *Driver) NodeUnstageVolume(ctx context.Context, req *csi.NodeUnstageVolumeRequest) (*csi.NodeUnstageVolumeResponse, error) {
	if err := required("volume_id", req.GetVolumeId()); err != nil {
		return nil, err
	}
	staging, err := d.kubeletPath("staging_target_path", req.GetStagingTargetPath())
	if err != nil {
		return nil, err
	}
	id, unlock, err := d.lockID(req.GetVolumeId())
	if err != nil {
		return nil, err
	}
	defer unlock()
	pool, poolErr := d.pool(id.pool)
	device := "" // the volume's active device node, if any
	if poolErr == nil {
		if node, err := pool.DevicePath(id.name); err == nil {
			device = node
		}
	}
	mounted, err := d.fs.IsMountPoint(staging)
	if err != nil {
		return nil, toStatus(err, "check staging_target_path %s", staging)
	}
	// Nothing is changed while the volume is in use: whatever is mounted at
	// staging_target_path must be this volume, and it must not be published
	// anywhere. The kernel refuses to remove a device whose filesystem a
	// bind mount still holds, but a raw block volume's bind mount (of its
	// device node) holds nothing open, and the device would go from under
	// the pod using it.
	var shows []string
	if mounted {
		src, err := d.fs.MountedDevice(staging)
		if err != nil {
			return nil, toStatus(err, "check staging_target_path %s", staging)
		}
		if device == "" || (src != device && !sameDevice(src, device)) {
			return nil, status.Errorf(codes.FailedPrecondition, "staging_target_path %s has %s mounted, not volume %s", staging, src, id)
		}
		shows = append(shows, staging)
	}
	if device != "" {
		shows = append(shows, device)
	}
	for _, p := range shows {
		refs, err := d.fs.MountRefs(p)
		if err != nil {
			return nil, toStatus(err, "find where %s is published", id)
		}
		if len(refs) > 0 {
			return nil, status.Errorf(codes.FailedPrecondition, "volume %s is still published at %s", id, strings.Join(refs, ", "))
		}
	}
	if err := d.fs.Unmount(ctx, staging); err != nil {
		return nil, toStatus(err, "unmount %s", staging)
	}
	if poolErr != nil {
		return &csi.NodeUnstageVolumeResponse{}, nil
	}
	if err := pool.Deactivate(ctx, id.name); err != nil {
		return nil, toStatus(err, "deactivate %s", id)
	}
	return &csi.NodeUnstageVolumeResponse{}, nil
}

func (d *Driver) NodePublishVolume(ctx context.Context, req *csi.NodePublishVolumeRequest) (*csi.NodePublishVolumeResponse, error) {
	if err := required("volume_id", req.GetVolumeId()); err != nil {
		return nil, err
	}
	target, err := d.kubeletPath("target_path", req.GetTargetPath())
	if err != nil {
		return nil, err
	}
	staging, err := d.kubeletPath("staging_target_path", req.GetStagingTargetPath())
	if err != nil {
		return nil, err
	}
	if err := checkCapability("volume_capability", req.GetVolumeCapability()); err != nil {
		return nil, err
	}
	id, _, unlock, err := d.lockVolume(req.GetVolumeId())
	if err != nil {
		return nil, err
	}
	defer unlock()
	if mounted, err := d.fs.IsMountPoint(target); err != nil {
		return nil, toStatus(err, "check target_path %s", target)
	} else if mounted {
		return &csi.NodePublishVolumeResponse{}, nil
	}
	opts := []string{"bind"}
	if req.GetReadonly() {
		opts = append(opts, "ro")
	}
	block := req.GetVolumeCapability().GetBlock() != nil
	// What target will show: the device node, or the staged filesystem.
	source := staging
	if block {
		pool, _ := d.pool(id.pool)
		if source, err = pool.Activate(ctx, id.name); err != nil {
			return nil, toStatus(err, "activate %s", id)
		}
	} else if mounted, err := d.fs.IsMountPoint(staging); err != nil || !mounted {
		return nil, status.Errorf(codes.FailedPrecondition, "volume %s is not staged at %s", id, staging)
	}
	if req.GetVolumeCapability().GetAccessMode().GetMode() == csi.VolumeCapability_AccessMode_SINGLE_NODE_SINGLE_WRITER {
		// The spec: a SINGLE_NODE_SINGLE_WRITER volume published at another
		// target is FailedPrecondition. The mount table says where it is.
		refs, err := d.fs.MountRefs(source)
		if err != nil {
			return nil, toStatus(err, "find where %s is published", id)
		}
		if len(refs) > 0 {
			return nil, status.Errorf(codes.FailedPrecondition, "volume %s is SINGLE_NODE_SINGLE_WRITER and already published at %s", id, strings.Join(refs, ", "))
		}
	}
	if block {
		if err := os.MkdirAll(filepath.Dir(target), 0o750); err != nil {
			return nil, toStatus(err, "make the target's directory")
		}
		f, err := os.OpenFile(target, os.O_CREATE, 0o640)
		if err != nil {
			return nil, toStatus(err, "make target_path %s", target)
		}
		f.Close()
	} else if err := os.MkdirAll(target, 0o750); err != nil {
		return nil, toStatus(err, "make target_path %s", target)
	}
	if err := d.fs.Mount(ctx, source, target, "", opts); err != nil {
		return nil, toStatus(err, "bind %s at %s", source, target)
	}
	return &csi.NodePublishVolumeResponse{}, nil
}

func (d *Driver) NodeUnpublishVolume(ctx context.Context, req *csi.NodeUnpublishVolumeRequest) (*csi.NodeUnpublishVolumeResponse, error) {
	if err := required("volume_id", req.GetVolumeId()); err != nil {
		return nil, err
	}
	target, err := d.kubeletPath("target_path", req.GetTargetPath())
	if err != nil {
		return nil, err
	}
	_, unlock, err := d.lockID(req.GetVolumeId())
	if err != nil {
		return nil, err
	}
	defer unlock()
	if err := d.fs.Unmount(ctx, target); err != nil {
		return nil, toStatus(err, "unmount %s", target)
	}
	return &csi.NodeUnpublishVolumeResponse{}, nil
}

func (d *Driver) NodeGetVolumeStats(ctx context.Context, req *csi.NodeGetVolumeStatsRequest) (*csi.NodeGetVolumeStatsResponse, error) {
	if err := required("volume_id", req.GetVolumeId(), "volume_path", req.GetVolumePath()); err != nil {
		return nil, err
	}
	id, err := mustParseID("volume_id", req.GetVolumeId())
	if err != nil {
		return nil, err
	}
	v, err := d.getVolume(id)
	if err != nil {
		return nil, err
	}
	path, err := d.volumePath(req.GetVolumePath())
	if err != nil {
		return nil, err
	}
	fi, err := os.Stat(path)
	if errors.Is(err, os.ErrNotExist) {
		return nil, notFound("volume_path %s does not exist", path)
	}
	if err != nil {
		return nil, toStatus(err, "stat volume_path")
	}
	// Only a mount point is a volume: statfs of a plain directory would
	// report the filesystem under it.
	if mounted, err := d.fs.IsMountPoint(path); err != nil {
		return nil, toStatus(err, "check volume_path %s", path)
	} else if !mounted {
		return nil, notFound("volume_path %s is not a mounted volume", path)
	}
	if !fi.IsDir() {
		return &csi.NodeGetVolumeStatsResponse{Usage: []*csi.VolumeUsage{{Unit: csi.VolumeUsage_BYTES, Total: v.SizeBytes}}}, nil
	}
	st, err := d.fs.Stats(path)
	if err != nil {
		return nil, toStatus(err, "statfs %s", path)
	}
	return &csi.NodeGetVolumeStatsResponse{Usage: []*csi.VolumeUsage{
		{Unit: csi.VolumeUsage_BYTES, Total: st.TotalBytes, Available: st.AvailableBytes, Used: st.UsedBytes},
		{Unit: csi.VolumeUsage_INODES, Total: st.TotalInodes, Available: st.FreeInodes, Used: st.UsedInodes},
	}}, nil
}

func (d *Driver) NodeExpandVolume(ctx context.Context, req *csi.NodeExpandVolumeRequest) (*csi.NodeExpandVolumeResponse, error) {
	if err := required("volume_id", req.GetVolumeId(), "volume_path", req.GetVolumePath()); err != nil {
		return nil, err
	}
	if req.GetVolumeCapability() != nil {
		if err := checkCapability("volume_capability", req.GetVolumeCapability()); err != nil {
			return nil, err
		}
	}
	id, v, unlock, err := d.lockVolume(req.GetVolumeId())
	if err != nil {
		return nil, err
	}
	defer unlock()
	path, err := d.volumePath(req.GetVolumePath())
	if err != nil {
		return nil, err
	}
	fi, err := os.Stat(path)
	if errors.Is(err, os.ErrNotExist) {
		return nil, notFound("volume_path %s does not exist", path)
	}
	if err != nil {
		return nil, toStatus(err, "stat volume_path")
	}
	size := v.SizeBytes
	if req.GetCapacityRange() != nil {
		if size, err = volumeSize(req.GetCapacityRange(), v.SizeBytes); err != nil {
			return nil, err
		}
	}
	pool, _ := d.pool(id.pool)
	if size > v.SizeBytes {
		if v, err = pool.Grow(ctx, id.name, size); err != nil {
			return nil, toStatus(err, "grow %s", id)
		}
	}
	if req.GetVolumeCapability().GetBlock() != nil || !fi.IsDir() {
		return &csi.NodeExpandVolumeResponse{CapacityBytes: v.SizeBytes}, nil
	}
	device, err := pool.Activate(ctx, id.name)
	if err != nil {
		return nil, toStatus(err, "activate %s", id)
	}
	fsType, err := d.fs.FSType(device)
	if err != nil {
		return nil, toStatus(err, "probe %s", device)
	}
	if err := d.fs.Resize(ctx, device, path, fsType); err != nil {
		return nil, toStatus(err, "grow the filesystem of %s", id)
	}
	return &csi.NodeExpandVolumeResponse{CapacityBytes: v.SizeBytes}, nil
}

func (d *Driver) NodeGetVolumeHealth(ctx context.Context, req *csi.NodeGetVolumeHealthRequest) (*csi.NodeGetVolumeHealthResponse, error) {
	id, err := mustParseID("volume_id", req.GetVolumeId())
	if err != nil {
		return nil, err
	}
	if _, err := d.getVolume(id); err != nil {
		return nil, err
	}
	pool, _ := d.pool(id.pool)
	h := poolHealth(pool)
	for field, p := range map[string]string{"volume_publish_path": req.GetVolumePublishPath(), "staging_target_path": req.GetStagingTargetPath()} {
		if p == "" {
			continue
		}
		if _, err := os.Stat(p); err != nil {
			h = append(h, entry(csi.VolumeHealthErrorType_INACCESSIBLE, "PathMissing", field+" "+p+": "+err.Error()))
		}
	}
	return &csi.NodeGetVolumeHealthResponse{VolumeHealth: &csi.VolumeHealth{VolumeId: id.String(), HealthStatuses: h}}, nil
}

func (d *Driver) NodeGetStorageHealth(ctx context.Context, req *csi.NodeGetStorageHealthRequest) (*csi.NodeGetStorageHealthResponse, error) {
	resp := &csi.NodeGetStorageHealthResponse{}
	for _, p := range d.pools {
		for _, e := range poolHealth(p) {
			s := csi.StorageHealthErrorType_STORAGE_DEGRADED
			if e.Status == csi.VolumeHealthErrorType_INACCESSIBLE {
				s = csi.StorageHealthErrorType_STORAGE_UNREACHABLE
			}
			resp.BackendHealth = append(resp.BackendHealth, &csi.NodeGetStorageHealthResponse_StorageBackendHealth{
				Status: s, Reason: e.Reason, Message: "pool " + p.Name() + ": " + e.Message,
			})
		}
	}
	return resp, nil
}
