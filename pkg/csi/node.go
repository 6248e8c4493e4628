package csi

import (
	"context"
	"errors"
	"fmt"
	"os"
	"slices"
	"strings"

	csipb "github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"k8s.io/klog/v2"

	"github.com/csi-dmthin/csi-dmthin/internal/safepath"
	"github.com/csi-dmthin/csi-dmthin/pkg/thinpool"
)

func (d *Driver) NodeGetInfo(context.Context, *csipb.NodeGetInfoRequest) (*csipb.NodeGetInfoResponse, error) {
	return &csipb.NodeGetInfoResponse{NodeId: d.nodeID, AccessibleTopology: d.topology()}, nil
}

func (d *Driver) NodeGetCapabilities(context.Context, *csipb.NodeGetCapabilitiesRequest) (*csipb.NodeGetCapabilitiesResponse, error) {
	var caps []*csipb.NodeServiceCapability
	for _, t := range []csipb.NodeServiceCapability_RPC_Type{
		csipb.NodeServiceCapability_RPC_STAGE_UNSTAGE_VOLUME,
		csipb.NodeServiceCapability_RPC_GET_VOLUME_STATS,
		csipb.NodeServiceCapability_RPC_EXPAND_VOLUME,
		csipb.NodeServiceCapability_RPC_SINGLE_NODE_MULTI_WRITER,
		csipb.NodeServiceCapability_RPC_GET_VOLUME_HEALTH,
		csipb.NodeServiceCapability_RPC_GET_STORAGE_HEALTH,
	} {
		caps = append(caps, &csipb.NodeServiceCapability{Type: &csipb.NodeServiceCapability_Rpc{Rpc: &csipb.NodeServiceCapability_RPC{Type: t}}})
	}
	return &csipb.NodeGetCapabilitiesResponse{Capabilities: caps}, nil
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

// volumePath resolves the volume_path of NodeGetVolumeStats and
// NodeExpandVolume. Nothing is mounted or removed there, so a path that
// cannot hold one of our volumes (relative, outside the kubelet directory,
// missing) is NotFound, the spec's code for "no such volume at that path"
// (csi-sanity sends "some/path"); one through a symbolic link is
// InvalidArgument, as everywhere.
func (d *Driver) volumePath(p string) (*safepath.Path, error) {
	if err := d.checkPath("volume_path", p); err != nil {
		return nil, notFound("%s", status.Convert(err).Message())
	}
	vp, err := d.lookup("volume_path", p)
	if err != nil {
		return nil, err
	}
	if vp == nil {
		return nil, notFound("volume_path %s does not exist", quoted(p))
	}
	return vp, nil
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
	id, err := d.mustParseID("volume_id", volumeID)
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
func mountOptions(c *csipb.VolumeCapability, fsType string) []string {
	opts := slices.Clone(c.GetMount().GetMountFlags())
	if fsType == "xfs" && !slices.Contains(opts, "nouuid") {
		// A clone or restore shares its source's XFS UUID, and XFS refuses
		// to mount a second filesystem with a UUID already mounted.
		opts = append(opts, "nouuid")
	}
	if c.GetAccessMode().GetMode() == csipb.VolumeCapability_AccessMode_SINGLE_NODE_READER_ONLY && !slices.Contains(opts, "ro") {
		opts = append(opts, "ro")
	}
	return opts
}

func fsTypeOf(c *csipb.VolumeCapability, volCtx map[string]string) string {
	if fs := c.GetMount().GetFsType(); fs != "" {
		return fs
	}
	if fs := volCtx[ParamFSType]; supportedFS[fs] {
		return fs
	}
	return defaultFS
}

func (d *Driver) NodeStageVolume(ctx context.Context, req *csipb.NodeStageVolumeRequest) (*csipb.NodeStageVolumeResponse, error) {
	if err := required("volume_id", req.GetVolumeId()); err != nil {
		return nil, err
	}
	staging := req.GetStagingTargetPath()
	if err := d.checkPath("staging_target_path", staging); err != nil {
		return nil, err
	}
	if err := checkCapability("volume_capability", req.GetVolumeCapability()); err != nil {
		return nil, err
	}
	id, v, unlock, err := d.lockVolume(req.GetVolumeId())
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
		return &csipb.NodeStageVolumeResponse{}, nil
	}
	fsType := fsTypeOf(req.GetVolumeCapability(), req.GetVolumeContext())
	log := klog.FromContext(ctx)
	sp, err := d.lookup("staging_target_path", staging)
	if err != nil {
		return nil, err
	}
	if sp != nil {
		defer sp.Close()
		mounted, err := d.fs.IsMountPoint(sp)
		if err != nil {
			return nil, pathError("staging_target_path", staging, err)
		}
		if mounted {
			// Staged already, or something else is mounted there. Decided
			// before activating, so a refused request changes nothing.
			if err := d.showsVolume("staging_target_path", staging, sp, id); status.Code(err) == codes.FailedPrecondition {
				src, _ := d.fs.MountedDevice(sp)
				return nil, status.Errorf(codes.AlreadyExists, "staging_target_path %s has %s mounted, not volume %s", sp, src, id)
			} else if err != nil {
				return nil, err
			}
			return &csipb.NodeStageVolumeResponse{}, nil
		}
	}

	// From here on a failure puts back what the call changed: the device
	// it activated (deactivated again, so the pool does not record it
	// active and bring it back at every start) and the directories it
	// made. A device active before (published as block elsewhere, or
	// recorded active) stays so.
	_, inactive := pool.DevicePath(id.name)
	wasActive := v.Active || inactive == nil
	var undo []func()
	staged := false
	defer func() {
		if staged {
			return
		}
		for i := len(undo) - 1; i >= 0; i-- {
			undo[i]()
		}
	}()
	device, err := pool.Activate(ctx, id.name)
	if !wasActive {
		// Even when the activation itself failed half way; and with the
		// caller's context cancelled (the mkfs it killed is why we are
		// here), so without its cancellation.
		undo = append(undo, func() {
			if err := pool.Deactivate(context.WithoutCancel(ctx), id.name); err != nil {
				log.Error(err, "Deactivating the volume of a failed stage failed", "volume", id)
			}
		})
	}
	if err != nil {
		return nil, toStatus(err, "activate %s", id)
	}
	formatted, err := d.fs.Format(ctx, device, fsType, FormatOptions{})
	if err != nil {
		return nil, toStatus(err, "format volume %s", id)
	}
	rmdirs, err := d.makeDirs("staging_target_path", staging)
	if err != nil {
		return nil, err
	}
	undo = append(undo, rmdirs)
	if sp == nil {
		if sp, err = d.mustLookup("staging_target_path", staging); err != nil {
			return nil, err
		}
		defer sp.Close()
	}
	if err := d.fs.Mount(ctx, device, sp, fsType, mountOptions(req.GetVolumeCapability(), fsType)); err != nil {
		if errors.Is(err, ErrMountOption) {
			return nil, invalid("volume_capability.mount.mount_flags: %v", err)
		}
		return nil, pathError("staging_target_path", staging, fmt.Errorf("mount volume %s: %w", id, err))
	}
	staged = true
	if !formatted {
		// The device may have grown while it was not staged (offline
		// expansion): grow the filesystem with it.
		if err := d.fs.Resize(ctx, device, sp, fsType); err != nil {
			log.Error(err, "Growing the filesystem at stage failed; NodeExpandVolume will retry", "volume", id)
		}
	}
	log.V(2).Info("Staged volume", "volume", id, "device", device, "fsType", fsType, "formatted", formatted)
	return &csipb.NodeStageVolumeResponse{}, nil
}

func (d *Driver) NodeUnstageVolume(ctx context.Context, req *csipb.NodeUnstageVolumeRequest) (*csipb.NodeUnstageVolumeResponse, error) {
	if err := required("volume_id", req.GetVolumeId()); err != nil {
		return nil, err
	}
	staging := req.GetStagingTargetPath()
	if err := d.checkPath("staging_target_path", staging); err != nil {
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
	sp, err := d.lookup("staging_target_path", staging)
	if err != nil {
		return nil, err
	}
	mounted := false
	if sp != nil {
		defer sp.Close()
		if mounted, err = d.fs.IsMountPoint(sp); err != nil {
			return nil, pathError("staging_target_path", staging, err)
		}
	}
	// Nothing is changed while the volume is in use: whatever is mounted at
	// staging_target_path must be this volume, and it must not be published
	// anywhere. The kernel refuses to remove a device whose filesystem a
	// bind mount still holds, but a raw block volume's bind mount (of its
	// device node) holds nothing open, and the device would go from under
	// the pod using it.
	var refs []string
	if mounted {
		if err := d.showsVolume("staging_target_path", staging, sp, id); status.Code(err) == codes.FailedPrecondition {
			src, _ := d.fs.MountedDevice(sp)
			return nil, status.Errorf(codes.FailedPrecondition, "staging_target_path %s has %s mounted, not volume %s", sp, src, id)
		} else if err != nil {
			return nil, err
		}
		if refs, err = d.fs.MountRefs(sp); err != nil {
			return nil, toStatus(err, "find where %s is published", id)
		}
	}
	if device != "" {
		r, err := d.fs.DeviceRefs(device)
		if err != nil {
			return nil, toStatus(err, "find where %s is published", id)
		}
		refs = append(refs, r...)
	}
	if len(refs) > 0 {
		return nil, status.Errorf(codes.FailedPrecondition, "volume %s is still published at %s", id, strings.Join(refs, ", "))
	}
	if sp != nil {
		if err := d.fs.Unmount(ctx, sp); err != nil {
			return nil, pathError("staging_target_path", staging, fmt.Errorf("unmount: %w", err))
		}
		if err := sp.Remove(); err != nil {
			return nil, pathError("staging_target_path", staging, err)
		}
	}
	if poolErr != nil {
		return &csipb.NodeUnstageVolumeResponse{}, nil
	}
	if err := pool.Deactivate(ctx, id.name); err != nil {
		return nil, toStatus(err, "deactivate %s", id)
	}
	return &csipb.NodeUnstageVolumeResponse{}, nil
}

func (d *Driver) NodePublishVolume(ctx context.Context, req *csipb.NodePublishVolumeRequest) (*csipb.NodePublishVolumeResponse, error) {
	if err := required("volume_id", req.GetVolumeId()); err != nil {
		return nil, err
	}
	target, staging := req.GetTargetPath(), req.GetStagingTargetPath()
	if err := d.checkPath("target_path", target); err != nil {
		return nil, err
	}
	if err := d.checkPath("staging_target_path", staging); err != nil {
		return nil, err
	}
	if err := checkCapability("volume_capability", req.GetVolumeCapability()); err != nil {
		return nil, err
	}
	id, v, unlock, err := d.lockVolume(req.GetVolumeId())
	if err != nil {
		return nil, err
	}
	defer unlock()
	log := klog.FromContext(ctx)
	tp, err := d.lookup("target_path", target)
	if err != nil {
		return nil, err
	}
	if tp != nil {
		defer tp.Close()
		if mounted, err := d.fs.IsMountPoint(tp); err != nil {
			return nil, pathError("target_path", target, err)
		} else if mounted {
			// Published already, or something else is mounted there.
			if err := d.showsVolume("target_path", target, tp, id); status.Code(err) == codes.FailedPrecondition {
				return nil, status.Errorf(codes.AlreadyExists, "%s", status.Convert(err).Message())
			} else if err != nil {
				return nil, err
			}
			return &csipb.NodePublishVolumeResponse{}, nil
		}
	}
	// Staged already, or looked up now: the staged filesystem, or a block
	// volume's device node.
	block := req.GetVolumeCapability().GetBlock() != nil
	var sp *safepath.Path
	var device string
	if !block {
		if sp, err = d.lookup("staging_target_path", staging); err != nil {
			return nil, err
		}
		if sp == nil {
			return nil, status.Errorf(codes.FailedPrecondition, "volume %s is not staged at %s", id, quoted(staging))
		}
		defer sp.Close()
		if mounted, err := d.fs.IsMountPoint(sp); err != nil {
			return nil, pathError("staging_target_path", staging, err)
		} else if !mounted {
			return nil, status.Errorf(codes.FailedPrecondition, "volume %s is not staged at %s", id, sp)
		}
	}
	if req.GetVolumeCapability().GetAccessMode().GetMode() == csipb.VolumeCapability_AccessMode_SINGLE_NODE_SINGLE_WRITER {
		// The spec: a SINGLE_NODE_SINGLE_WRITER volume published at another
		// target is FailedPrecondition. The mount table says where it is.
		var refs []string
		if block {
			if node, err := d.activeDevice(id); err == nil {
				refs, err = d.fs.DeviceRefs(node)
				if err != nil {
					return nil, toStatus(err, "find where %s is published", id)
				}
			}
		} else if refs, err = d.fs.MountRefs(sp); err != nil {
			return nil, toStatus(err, "find where %s is published", id)
		}
		if len(refs) > 0 {
			return nil, status.Errorf(codes.FailedPrecondition, "volume %s is SINGLE_NODE_SINGLE_WRITER and already published at %s", id, strings.Join(refs, ", "))
		}
	}

	// From here on a failure puts back what the call changed.
	var undo []func()
	published := false
	defer func() {
		if published {
			return
		}
		for i := len(undo) - 1; i >= 0; i-- {
			undo[i]()
		}
	}()
	if block {
		pool, _ := d.pool(id.pool)
		_, inactive := pool.DevicePath(id.name)
		wasActive := v.Active || inactive == nil
		if device, err = pool.Activate(ctx, id.name); !wasActive {
			undo = append(undo, func() {
				if err := pool.Deactivate(context.WithoutCancel(ctx), id.name); err != nil {
					log.Error(err, "Deactivating the volume of a failed publish failed", "volume", id)
				}
			})
		}
		if err != nil {
			return nil, toStatus(err, "activate %s", id)
		}
		if dir := d.parentDir(target); dir != "" {
			rmdirs, err := d.makeDirs("target_path", dir)
			if err != nil {
				return nil, err
			}
			undo = append(undo, rmdirs)
		}
	} else {
		rmdirs, err := d.makeDirs("target_path", target)
		if err != nil {
			return nil, err
		}
		undo = append(undo, rmdirs)
	}
	if tp == nil {
		if tp, err = d.mustLookup("target_path", target); err != nil {
			return nil, err
		}
		defer tp.Close()
	}
	if block {
		made, err := tp.CreateFile(0o640)
		if err != nil {
			return nil, pathError("target_path", target, err)
		}
		if made {
			undo = append(undo, func() {
				// Looked up again: tp is closed by the time undo runs.
				if err := d.root().Remove(target); err != nil {
					log.Error(err, "Removing the target of a failed publish failed", "path", target)
				}
			})
		}
		err = d.fs.BindDevice(ctx, device, tp, req.GetReadonly())
		if err != nil {
			return nil, pathError("target_path", target, fmt.Errorf("bind %s: %w", device, err))
		}
	} else if err := d.fs.BindMount(ctx, sp, tp, req.GetReadonly()); err != nil {
		return nil, pathError("target_path", target, fmt.Errorf("bind %s: %w", sp, err))
	}
	published = true
	return &csipb.NodePublishVolumeResponse{}, nil
}

// showsVolume checks that the mount at p (the field's path) shows volume
// id: its filesystem, or its device node; FailedPrecondition otherwise.
func (d *Driver) showsVolume(field, path string, p *safepath.Path, id objectID) error {
	device, err := d.activeDevice(id)
	if err != nil {
		return status.Errorf(codes.FailedPrecondition, "%s %s has something mounted, and volume %s is not active", field, p, id)
	}
	shows, err := d.fs.ShowsDevice(p, device)
	if err != nil {
		return pathError(field, path, err)
	}
	if !shows {
		return status.Errorf(codes.FailedPrecondition, "%s %s has something mounted that is not volume %s", field, p, id)
	}
	return nil
}

// activeDevice returns the device node of an active volume.
func (d *Driver) activeDevice(id objectID) (string, error) {
	pool, err := d.pool(id.pool)
	if err != nil {
		return "", err
	}
	return pool.DevicePath(id.name)
}

func (d *Driver) NodeUnpublishVolume(ctx context.Context, req *csipb.NodeUnpublishVolumeRequest) (*csipb.NodeUnpublishVolumeResponse, error) {
	if err := required("volume_id", req.GetVolumeId()); err != nil {
		return nil, err
	}
	target := req.GetTargetPath()
	if err := d.checkPath("target_path", target); err != nil {
		return nil, err
	}
	id, unlock, err := d.lockID(req.GetVolumeId())
	if err != nil {
		return nil, err
	}
	defer unlock()
	tp, err := d.lookup("target_path", target)
	if err != nil || tp == nil {
		return &csipb.NodeUnpublishVolumeResponse{}, err
	}
	defer tp.Close()
	mounted, err := d.fs.IsMountPoint(tp)
	if err != nil {
		return nil, pathError("target_path", target, err)
	}
	if _, poolErr := d.pool(id.pool); mounted && poolErr == nil {
		// Only this volume is unmounted: another one's publish, or
		// anything else, stays.
		if err := d.showsVolume("target_path", target, tp, id); err != nil {
			return nil, err
		}
	}
	if err := d.fs.Unmount(ctx, tp); err != nil {
		return nil, pathError("target_path", target, fmt.Errorf("unmount: %w", err))
	}
	if err := tp.Remove(); err != nil {
		return nil, pathError("target_path", target, err)
	}
	return &csipb.NodeUnpublishVolumeResponse{}, nil
}

func (d *Driver) NodeGetVolumeStats(ctx context.Context, req *csipb.NodeGetVolumeStatsRequest) (*csipb.NodeGetVolumeStatsResponse, error) {
	if err := required("volume_id", req.GetVolumeId(), "volume_path", req.GetVolumePath()); err != nil {
		return nil, err
	}
	id, err := d.mustParseID("volume_id", req.GetVolumeId())
	if err != nil {
		return nil, err
	}
	v, err := d.getVolume(id)
	if err != nil {
		return nil, err
	}
	vp, err := d.volumePath(req.GetVolumePath())
	if err != nil {
		return nil, err
	}
	defer vp.Close()
	fi, err := vp.Stat()
	if errors.Is(err, os.ErrNotExist) {
		return nil, notFound("volume_path %s does not exist", vp)
	}
	if err != nil {
		return nil, pathError("volume_path", req.GetVolumePath(), err)
	}
	// Only a mount point is a volume: statfs of a plain directory would
	// report the filesystem under it.
	if mounted, err := d.fs.IsMountPoint(vp); err != nil {
		return nil, pathError("volume_path", req.GetVolumePath(), err)
	} else if !mounted {
		return nil, notFound("volume_path %s is not a mounted volume", vp)
	}
	if !fi.IsDir() {
		return &csipb.NodeGetVolumeStatsResponse{Usage: []*csipb.VolumeUsage{{Unit: csipb.VolumeUsage_BYTES, Total: v.SizeBytes}}}, nil
	}
	st, err := d.fs.Stats(vp)
	if err != nil {
		return nil, toStatus(err, "statfs %s", vp)
	}
	return &csipb.NodeGetVolumeStatsResponse{Usage: []*csipb.VolumeUsage{
		{Unit: csipb.VolumeUsage_BYTES, Total: st.TotalBytes, Available: st.AvailableBytes, Used: st.UsedBytes},
		{Unit: csipb.VolumeUsage_INODES, Total: st.TotalInodes, Available: st.FreeInodes, Used: st.UsedInodes},
	}}, nil
}

func (d *Driver) NodeExpandVolume(ctx context.Context, req *csipb.NodeExpandVolumeRequest) (*csipb.NodeExpandVolumeResponse, error) {
	if err := required("volume_id", req.GetVolumeId(), "volume_path", req.GetVolumePath()); err != nil {
		return nil, err
	}
	if req.GetVolumeCapability() != nil {
		if err := checkCapability("volume_capability", req.GetVolumeCapability()); err != nil {
			return nil, err
		}
	}
	if err := checkCapacityRange(req.GetCapacityRange()); err != nil {
		return nil, err
	}
	id, v, unlock, err := d.lockVolume(req.GetVolumeId())
	if err != nil {
		return nil, err
	}
	defer unlock()
	vp, err := d.volumePath(req.GetVolumePath())
	if err != nil {
		return nil, err
	}
	defer vp.Close()
	fi, err := vp.Stat()
	if errors.Is(err, os.ErrNotExist) {
		return nil, notFound("volume_path %s does not exist", vp)
	}
	if err != nil {
		return nil, pathError("volume_path", req.GetVolumePath(), err)
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
		return &csipb.NodeExpandVolumeResponse{CapacityBytes: v.SizeBytes}, nil
	}
	device, err := pool.Activate(ctx, id.name)
	if err != nil {
		return nil, toStatus(err, "activate %s", id)
	}
	fsType, err := d.fs.FSType(device)
	if err != nil {
		return nil, toStatus(err, "probe %s", device)
	}
	if err := d.fs.Resize(ctx, device, vp, fsType); err != nil {
		return nil, toStatus(err, "grow the filesystem of %s", id)
	}
	return &csipb.NodeExpandVolumeResponse{CapacityBytes: v.SizeBytes}, nil
}

func (d *Driver) NodeGetVolumeHealth(ctx context.Context, req *csipb.NodeGetVolumeHealthRequest) (*csipb.NodeGetVolumeHealthResponse, error) {
	if err := required("volume_id", req.GetVolumeId()); err != nil {
		return nil, err
	}
	paths := []struct{ field, path string }{
		{"volume_publish_path", req.GetVolumePublishPath()},
		{"staging_target_path", req.GetStagingTargetPath()},
	}
	for _, p := range paths {
		if p.path == "" {
			continue
		}
		if err := d.checkPath(p.field, p.path); err != nil {
			return nil, err
		}
	}
	id, err := d.mustParseID("volume_id", req.GetVolumeId())
	if err != nil {
		return nil, err
	}
	if _, err := d.getVolume(id); err != nil {
		return nil, err
	}
	pool, _ := d.pool(id.pool)
	h := poolHealth(pool)
	for _, p := range paths {
		if p.path == "" {
			continue
		}
		sp, err := d.lookup(p.field, p.path)
		if err != nil {
			return nil, err
		}
		if sp == nil {
			err = os.ErrNotExist
		} else {
			_, err = sp.Stat()
			sp.Close()
		}
		switch {
		case errors.Is(err, safepath.ErrSymlink):
			return nil, pathError(p.field, p.path, err)
		case err != nil:
			h = append(h, entry(csipb.VolumeHealthErrorType_INACCESSIBLE, "PathMissing", p.field+" "+quoted(p.path)+": "+err.Error()))
		}
	}
	return &csipb.NodeGetVolumeHealthResponse{VolumeHealth: &csipb.VolumeHealth{VolumeId: id.String(), HealthStatuses: h}}, nil
}

func (d *Driver) NodeGetStorageHealth(ctx context.Context, req *csipb.NodeGetStorageHealthRequest) (*csipb.NodeGetStorageHealthResponse, error) {
	resp := &csipb.NodeGetStorageHealthResponse{}
	for _, p := range d.pools {
		for _, e := range poolHealth(p) {
			s := csipb.StorageHealthErrorType_STORAGE_DEGRADED
			if e.Status == csipb.VolumeHealthErrorType_INACCESSIBLE {
				s = csipb.StorageHealthErrorType_STORAGE_UNREACHABLE
			}
			resp.BackendHealth = append(resp.BackendHealth, &csipb.NodeGetStorageHealthResponse_StorageBackendHealth{
				Status: s, Reason: e.Reason, Message: "pool " + p.Name() + ": " + e.Message,
			})
		}
	}
	return resp, nil
}
