package csi

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strconv"
	"strings"

	csipb "github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/timestamppb"
	"k8s.io/klog/v2"

	"github.com/csi-dmthin/csi-dmthin/pkg/thinpool"
)

// StorageClass parameters.
const (
	ParamPool   = "pool"   // the pool on the node; default: the node's default pool
	ParamFSType = "fsType" // ext4 (default) or xfs, when the capability names none
	// ParamRestorePlacement is where a restore or clone of the class
	// goes: RestoreOnSourceNode (the default) steers it to its source's
	// node, which copies only when that node is cordoned or full;
	// RestoreOnAnyNode leaves it to the scheduler, and the node chosen
	// copies the source when it is another's (the cluster's controller
	// reads it; CreateVolume only checks it).
	ParamRestorePlacement = "restorePlacement"
	RestoreOnSourceNode   = "sourceNode"
	RestoreOnAnyNode      = "anyNode"
	// Keys the external-provisioner adds (--extra-create-metadata) start
	// with this prefix; they are accepted and ignored.
	csiParamPrefix = "csi.storage.k8s.io/"
)

const (
	defaultVolumeBytes = 1 << 30
	minVolumeBytes     = 1 << 20   // room for a filesystem's own structures
	minXFSBytes        = 300 << 20 // mkfs.xfs's smallest filesystem
	// maxVolumeBytes bounds every size a request asks for before any
	// arithmetic on it (rounding up near MaxInt64 overflowed to a negative
	// size); pkg/thinpool refuses anything larger too.
	maxVolumeBytes = 1 << 60
)

// usesFS reports whether a volume with these capabilities (and fsType
// parameter) gets a filesystem of type fs.
func usesFS(caps []*csipb.VolumeCapability, fsParam, fs string) bool {
	for _, c := range caps {
		if m := c.GetMount(); m != nil && (m.GetFsType() == fs || (m.GetFsType() == "" && fsParam == fs)) {
			return true
		}
	}
	return false
}

func (d *Driver) ControllerGetCapabilities(context.Context, *csipb.ControllerGetCapabilitiesRequest) (*csipb.ControllerGetCapabilitiesResponse, error) {
	var caps []*csipb.ControllerServiceCapability
	for _, t := range []csipb.ControllerServiceCapability_RPC_Type{
		csipb.ControllerServiceCapability_RPC_CREATE_DELETE_VOLUME,
		csipb.ControllerServiceCapability_RPC_CREATE_DELETE_SNAPSHOT,
		csipb.ControllerServiceCapability_RPC_LIST_SNAPSHOTS,
		csipb.ControllerServiceCapability_RPC_GET_SNAPSHOT,
		csipb.ControllerServiceCapability_RPC_LIST_VOLUMES,
		csipb.ControllerServiceCapability_RPC_GET_CAPACITY,
		csipb.ControllerServiceCapability_RPC_CLONE_VOLUME,
		csipb.ControllerServiceCapability_RPC_GET_VOLUME,
		csipb.ControllerServiceCapability_RPC_GET_VOLUME_HEALTH,
		csipb.ControllerServiceCapability_RPC_LIST_VOLUME_HEALTH,
		csipb.ControllerServiceCapability_RPC_SINGLE_NODE_MULTI_WRITER,
	} {
		caps = append(caps, &csipb.ControllerServiceCapability{Type: &csipb.ControllerServiceCapability_Rpc{Rpc: &csipb.ControllerServiceCapability_RPC{Type: t}}})
	}
	return &csipb.ControllerGetCapabilitiesResponse{Capabilities: caps}, nil
}

type createParams struct {
	pool   string
	fsType string
}

func parseParams(params map[string]string) (createParams, error) {
	var p createParams
	for k, v := range params {
		switch {
		case k == ParamPool:
			p.pool = v
		case k == ParamFSType:
			if !supportedFS[v] {
				return p, invalid("parameters.%s %q: want ext4 or xfs", k, v)
			}
			p.fsType = v
		case k == ParamRestorePlacement:
			if v != RestoreOnSourceNode && v != RestoreOnAnyNode {
				return p, invalid("parameters.%s %q: want %s or %s", k, v, RestoreOnSourceNode, RestoreOnAnyNode)
			}
		case strings.HasPrefix(k, csiParamPrefix):
		default:
			return p, invalid("parameters.%s is not a csi-dmthin parameter (known: %s, %s, %s)", k, ParamPool, ParamFSType, ParamRestorePlacement)
		}
	}
	return p, nil
}

// checkCapacityRange validates a capacity range on its own: no negative
// bytes (InvalidArgument), no required size over maxVolumeBytes
// (OutOfRange). A larger limit is no limit, and is taken as the largest
// size.
func checkCapacityRange(r *csipb.CapacityRange) error {
	req, lim := r.GetRequiredBytes(), r.GetLimitBytes()
	switch {
	case req < 0:
		return invalid("capacity_range.required_bytes %d is negative", req)
	case lim < 0:
		return invalid("capacity_range.limit_bytes %d is negative", lim)
	case req > maxVolumeBytes:
		return status.Errorf(codes.OutOfRange, "capacity_range.required_bytes %d is over the largest volume, %d bytes (2^60)", req, int64(maxVolumeBytes))
	}
	return nil
}

// volumeSize picks the size for a capacity range: the required bytes (or
// the default), rounded up to 4 KiB, and within the limit.
func volumeSize(r *csipb.CapacityRange, minBytes int64) (int64, error) {
	if err := checkCapacityRange(r); err != nil {
		return 0, err
	}
	req, lim := r.GetRequiredBytes(), min(r.GetLimitBytes(), maxVolumeBytes)
	if minBytes > maxVolumeBytes {
		return 0, status.Errorf(codes.OutOfRange, "a volume of %d bytes is over the largest volume, %d bytes (2^60)", minBytes, int64(maxVolumeBytes))
	}
	if lim != 0 && req > lim {
		return 0, status.Errorf(codes.OutOfRange, "capacity_range: required %d bytes is over the %d-byte limit", req, lim)
	}
	size := req
	if size == 0 {
		size = defaultVolumeBytes
		if lim != 0 {
			size = min(size, lim)
		}
	}
	size = max(size, minBytes, minVolumeBytes)
	size = (size + 4095) &^ 4095
	if lim != 0 && size > lim {
		return 0, status.Errorf(codes.OutOfRange, "capacity_range: the smallest volume that fits is %s, over the %d-byte limit", fmtBytes(size), lim)
	}
	return size, nil
}

// VolumeBytes is the size CreateVolume makes for a request of
// requestBytes restored or cloned from a source of sourceBytes (0: none),
// with a filesystem of type fs ("" for a raw block volume), when no limit
// is given: the same rule (the source's size at least, a filesystem's
// smallest, 4 KiB rounding). The cluster's controller asks it to know how
// much room a restore needs before it picks the node.
func VolumeBytes(requestBytes, sourceBytes int64, fs string) int64 {
	minBytes := sourceBytes
	if fs == "xfs" {
		minBytes = max(minBytes, minXFSBytes)
	}
	r := &csipb.CapacityRange{RequiredBytes: max(requestBytes, 0)}
	if sourceBytes > 0 && requestBytes == 0 {
		r.RequiredBytes = minBytes
	}
	size, err := volumeSize(r, minBytes)
	if err != nil {
		return max(requestBytes, minBytes) // over the largest volume: CreateVolume refuses it anyway
	}
	return size
}

// fits reports whether an existing size satisfies a capacity range.
func fits(size int64, r *csipb.CapacityRange) bool {
	return size >= r.GetRequiredBytes() && (r.GetLimitBytes() == 0 || size <= r.GetLimitBytes())
}

// checkTopology refuses a request whose requisite topology excludes this
// node. ResourceExhausted makes the external-provisioner try another node.
func (d *Driver) checkTopology(req *csipb.TopologyRequirement) error {
	if len(req.GetRequisite()) == 0 {
		return nil
	}
	for _, t := range req.GetRequisite() {
		if t.GetSegments()[TopologyKey] == d.nodeID {
			return nil
		}
	}
	return status.Errorf(codes.ResourceExhausted, "accessibility_requirements.requisite does not include node %s, where this controller's pools are", d.nodeID)
}

func (d *Driver) volumeFor(pool Pool, v *thinpool.Volume, fsType string, src *csipb.VolumeContentSource) *csipb.Volume {
	ctx := map[string]string{ParamPool: pool.Name()}
	if fsType != "" {
		ctx[ParamFSType] = fsType
	}
	return &csipb.Volume{
		VolumeId:           objectID{pool: pool.Name(), name: v.Name}.String(),
		CapacityBytes:      v.SizeBytes,
		VolumeContext:      ctx,
		ContentSource:      src,
		AccessibleTopology: []*csipb.Topology{d.topology()},
	}
}

func (d *Driver) CreateVolume(ctx context.Context, req *csipb.CreateVolumeRequest) (*csipb.CreateVolumeResponse, error) {
	if err := checkName("name", req.GetName()); err != nil {
		return nil, err
	}
	if err := checkCapabilities("volume_capabilities", req.GetVolumeCapabilities()); err != nil {
		return nil, err
	}
	if err := checkCapacityRange(req.GetCapacityRange()); err != nil {
		return nil, err
	}
	params, err := parseParams(req.GetParameters())
	if err != nil {
		return nil, err
	}
	if err := d.checkTopology(req.GetAccessibilityRequirements()); err != nil {
		return nil, err
	}
	pool, err := d.pool(params.pool)
	if err != nil {
		return nil, status.Errorf(codes.InvalidArgument, "parameters.%s: %v", ParamPool, status.Convert(err).Message())
	}
	name := deviceName(req.GetName())

	// The source, if any: a snapshot or a volume in the same pool.
	var source *thinpool.Volume
	var sourceID string
	src := req.GetVolumeContentSource()
	switch {
	case src == nil:
	case src.GetSnapshot() != nil:
		sourceID = src.GetSnapshot().GetSnapshotId()
	case src.GetVolume() != nil:
		sourceID = src.GetVolume().GetVolumeId()
	default:
		return nil, invalid("volume_content_source: want a snapshot or a volume")
	}
	lockIDs := []string{objectID{pool: pool.Name(), name: name}.String()}
	if src != nil {
		field := "volume_content_source.snapshot.snapshot_id"
		if src.GetVolume() != nil {
			field = "volume_content_source.volume.volume_id"
		}
		if src.GetSnapshot() != nil {
			if id, ok := parseID(sourceID); ok && id.node != "" && id.node != d.nodeID {
				// A snapshot on another node: copied here (copy.go).
				return d.createFromRemote(ctx, req, pool, name, params, id, src)
			}
		}
		parse := d.mustParseSnapshotID
		if src.GetVolume() != nil {
			parse = d.mustParseID
		}
		id, err := parse(field, sourceID)
		if err != nil {
			return nil, err
		}
		if src.GetVolume() != nil && d.copies != nil {
			if _, lerr := pool.Get(id.name); id.pool != pool.Name() || errors.Is(lerr, thinpool.ErrNotFound) {
				// Not here: a clone of another node's volume, left by
				// the controller to be copied here, names that node on
				// its PVC.
				if node := d.copies.cloneSourceNode(ctx, req); node != "" && node != d.nodeID {
					id.node = node
					return d.createFromRemote(ctx, req, pool, name, params, id, src)
				}
			}
		}
		if id.pool != pool.Name() {
			return nil, notFound("%s %s is in pool %s, not %s: a clone or restore stays in its source's pool", field, sourceID, id.pool, pool.Name())
		}
		source, err = pool.Get(id.name)
		if err != nil {
			return nil, toStatus(err, "%s %s", field, sourceID)
		}
		wantKind := thinpool.KindSnapshot
		if src.GetVolume() != nil {
			wantKind = thinpool.KindVolume
		}
		if source.Kind != wantKind {
			return nil, notFound("%s %s is a %s, not a %s", field, sourceID, source.Kind, wantKind)
		}
		lockIDs = append(lockIDs, id.String())
	}
	minBytes := int64(0)
	if usesFS(req.GetVolumeCapabilities(), params.fsType, "xfs") {
		minBytes = minXFSBytes // mkfs.xfs refuses anything smaller
	}
	var size int64
	if source != nil && req.GetCapacityRange().GetRequiredBytes() == 0 {
		// A clone or restore without a size takes its source's.
		size, err = volumeSize(&csipb.CapacityRange{RequiredBytes: max(source.SizeBytes, minBytes), LimitBytes: req.GetCapacityRange().GetLimitBytes()}, 0)
	} else {
		if source != nil {
			minBytes = max(minBytes, source.SizeBytes)
		}
		size, err = volumeSize(req.GetCapacityRange(), minBytes)
	}
	if err != nil {
		return nil, err
	}
	unlock, err := d.locks.lock(lockIDs...)
	if err != nil {
		return nil, err
	}
	defer unlock()

	// Repeated request: return what exists if it matches.
	if v, err := pool.Get(name); err == nil {
		if v.Kind != thinpool.KindVolume || !fits(v.SizeBytes, req.GetCapacityRange()) || (source != nil && v.Source != source.Name) || (source == nil && v.Source != "" && !isTemplateName(v.Source)) {
			return nil, status.Errorf(codes.AlreadyExists, "volume %q exists with a different size or source (%s from %q)", req.GetName(), fmtBytes(v.SizeBytes), v.Source)
		}
		return &csipb.CreateVolumeResponse{Volume: d.volumeFor(pool, v, params.fsType, src)}, nil
	}
	var v *thinpool.Volume
	switch tmplFS := templateFS(req.GetVolumeCapabilities(), params.fsType); {
	case source != nil:
		v, err = pool.Clone(ctx, name, source.Name, size)
	case tmplFS != "":
		// A filesystem volume: a clone of a formatted template when there
		// is one, which leaves nothing for mkfs to do at stage.
		t, release := d.templates.lookup(pool, tmplFS, size)
		if t != "" {
			v, err = pool.Clone(ctx, name, t, size)
			release()
			if errors.Is(err, thinpool.ErrNotFound) {
				v, err = pool.CreateVolume(ctx, name, size) // gone meanwhile
			}
		} else {
			release()
			v, err = pool.CreateVolume(ctx, name, size)
			if err == nil {
				// The pool admitted a volume of this size: only now is a
				// template of it worth its space.
				d.templates.build(pool, tmplFS, size)
			}
		}
	default:
		v, err = pool.CreateVolume(ctx, name, size)
	}
	if err != nil {
		return nil, d.reportNoSpace(req, pool.Name(), toStatus(err, "create volume %q", req.GetName()))
	}
	klog.FromContext(ctx).Info("Created volume", "volume", objectID{pool: pool.Name(), name: name}, "bytes", v.SizeBytes, "source", sourceID, "template", isTemplateName(v.Source))
	return &csipb.CreateVolumeResponse{Volume: d.volumeFor(pool, v, params.fsType, src)}, nil
}

func (d *Driver) DeleteVolume(ctx context.Context, req *csipb.DeleteVolumeRequest) (*csipb.DeleteVolumeResponse, error) {
	if err := d.deleteObject(ctx, "volume_id", req.GetVolumeId(), thinpool.KindVolume); err != nil {
		return nil, err
	}
	return &csipb.DeleteVolumeResponse{}, nil
}

// deleteObject deletes a volume or a snapshot by ID. An ID that is not ours,
// or names a pool that was never on this node or an object that does not
// exist, is success: deleting what does not exist succeeds. An ID of the
// other kind is NotFound. An ID in a pool recorded on this node but not
// configured is FailedPrecondition: its device may well exist, out of
// reach until the pool is configured again, and success would leak it.
func (d *Driver) deleteObject(ctx context.Context, field, s string, kind thinpool.Kind) error {
	if s == "" {
		return invalid("%s is required", field)
	}
	id, ok := parseID(s)
	if !ok {
		return nil
	}
	if id.node != "" && kind != thinpool.KindSnapshot {
		if id.node == d.nodeID {
			return notFound("%s %s is a snapshot ID (<node>/<pool>/<name>), not a volume ID (<pool>/<name>)", field, s)
		}
		return nil // a volume ID never names a node: not ours
	}
	if id.node != "" && id.node != d.nodeID {
		// It exists, for all this node knows, on the node it names:
		// success here would have Kubernetes forget it there.
		return status.Errorf(codes.FailedPrecondition, "%s %s is on node %s, not on this node %s", field, s, id.node, d.nodeID)
	}
	pool, err := d.pool(id.pool)
	if err != nil {
		if d.unconfigured[id.pool] {
			return status.Errorf(codes.FailedPrecondition, "%s %s: pool %s is recorded on node %s but not configured: its %ss cannot be deleted until it is configured again", field, s, id.pool, d.nodeID, kind)
		}
		return nil
	}
	unlock, err := d.locks.lock(id.String())
	if err != nil {
		return err
	}
	defer unlock()
	v, err := pool.Get(id.name)
	if errors.Is(err, thinpool.ErrNotFound) {
		if kind == thinpool.KindVolume {
			// A copy's record may outlive a volume never made.
			if err := d.copies.forget(id.pool, id.name); err != nil {
				return status.Errorf(codes.Internal, "delete %s %s: its copy record: %v", kind, id, err)
			}
		}
		return nil
	}
	if err != nil {
		return toStatus(err, "delete %s %s", kind, id)
	}
	if v.Kind != kind {
		return notFound("%s %s is a %s, not a %s", field, id, v.Kind, kind)
	}
	if kind == thinpool.KindVolume {
		d.copies.cancelJob(id.pool, id.name)
	}
	if err := pool.Delete(ctx, id.name); err != nil {
		return toStatus(err, "delete %s %s", kind, id)
	}
	if kind == thinpool.KindVolume {
		if err := d.copies.forget(id.pool, id.name); err != nil {
			// The volume is gone; a record left names a volume that no
			// longer exists, which a new copy under the name replaces.
			klog.FromContext(ctx).Error(err, "Removing the copy record of a deleted volume", "volume", id)
		}
	}
	return nil
}

func (d *Driver) ValidateVolumeCapabilities(ctx context.Context, req *csipb.ValidateVolumeCapabilitiesRequest) (*csipb.ValidateVolumeCapabilitiesResponse, error) {
	if err := required("volume_id", req.GetVolumeId()); err != nil {
		return nil, err
	}
	if len(req.GetVolumeCapabilities()) == 0 {
		return nil, invalid("volume_capabilities is required")
	}
	id, err := d.mustParseID("volume_id", req.GetVolumeId())
	if err != nil {
		return nil, err
	}
	if _, err := d.getVolume(id); err != nil {
		return nil, err
	}
	if _, err := parseParams(req.GetParameters()); err != nil {
		return &csipb.ValidateVolumeCapabilitiesResponse{Message: status.Convert(err).Message()}, nil
	}
	if err := checkCapabilities("volume_capabilities", req.GetVolumeCapabilities()); err != nil {
		return &csipb.ValidateVolumeCapabilitiesResponse{Message: status.Convert(err).Message()}, nil
	}
	return &csipb.ValidateVolumeCapabilitiesResponse{Confirmed: &csipb.ValidateVolumeCapabilitiesResponse_Confirmed{
		VolumeContext: req.GetVolumeContext(), VolumeCapabilities: req.GetVolumeCapabilities(), Parameters: req.GetParameters(),
	}}, nil
}

// getVolume finds a volume (not a snapshot) by ID.
func (d *Driver) getVolume(id objectID) (*thinpool.Volume, error) {
	pool, err := d.pool(id.pool)
	if err != nil {
		return nil, err
	}
	v, err := pool.Get(id.name)
	if err != nil {
		return nil, toStatus(err, "volume %s", id)
	}
	if v.Kind != thinpool.KindVolume {
		return nil, notFound("%s is a %s, not a volume", id, v.Kind)
	}
	return v, nil
}

func (d *Driver) ControllerGetVolume(ctx context.Context, req *csipb.ControllerGetVolumeRequest) (*csipb.ControllerGetVolumeResponse, error) {
	id, err := d.mustParseID("volume_id", req.GetVolumeId())
	if err != nil {
		return nil, err
	}
	v, err := d.getVolume(id)
	if err != nil {
		return nil, err
	}
	pool, _ := d.pool(id.pool)
	return &csipb.ControllerGetVolumeResponse{
		Volume: d.volumeFor(pool, v, "", nil),
		Status: &csipb.ControllerGetVolumeResponse_VolumeStatus{},
	}, nil
}

// page cuts a sorted list at an opaque token (the index to start at) and
// max entries; a token that is not one of ours is Aborted, as the spec says.
func page[T any](items []T, token string, maxEntries int32) ([]T, string, error) {
	if maxEntries < 0 {
		return nil, "", invalid("max_entries must not be negative")
	}
	start := 0
	if token != "" {
		n, err := strconv.Atoi(token)
		if err != nil || n < 0 || n > len(items) {
			return nil, "", status.Errorf(codes.Aborted, "starting_token %q is not valid (any longer)", token)
		}
		start = n
	}
	end := len(items)
	if maxEntries > 0 && start+int(maxEntries) < end {
		end = start + int(maxEntries)
	}
	next := ""
	if end < len(items) {
		next = strconv.Itoa(end)
	}
	return items[start:end], next, nil
}

// listed is one object of a list call: its pool, record and ID.
type listed struct {
	pool Pool
	v    thinpool.Volume
	id   string
}

// all returns every pool's objects of a kind, sorted by ID, each ID built
// once. Every page of a list call copies and sorts every record (10 ms a
// page with 10,000 volumes on the host, BenchmarkScale10000).
func (d *Driver) all(kind thinpool.Kind) []listed {
	var out []listed
	for _, p := range d.pools {
		for _, v := range p.List() {
			if v.Kind == kind && !d.copies.pending(p.Name(), v.Name) && !isCopySnapshotName(v.Name) {
				out = append(out, listed{pool: p, v: v, id: objectID{pool: p.Name(), name: v.Name}.String()})
			}
		}
	}
	slices.SortFunc(out, func(a, b listed) int { return strings.Compare(a.id, b.id) })
	return out
}

func (d *Driver) ListVolumes(ctx context.Context, req *csipb.ListVolumesRequest) (*csipb.ListVolumesResponse, error) {
	items, next, err := page(d.all(thinpool.KindVolume), req.GetStartingToken(), req.GetMaxEntries())
	if err != nil {
		return nil, err
	}
	resp := &csipb.ListVolumesResponse{NextToken: next}
	for _, it := range items {
		v := it.v
		resp.Entries = append(resp.Entries, &csipb.ListVolumesResponse_Entry{
			Volume: d.volumeFor(it.pool, &v, "", nil),
			Status: &csipb.ListVolumesResponse_VolumeStatus{},
		})
	}
	return resp, nil
}

func (d *Driver) GetCapacity(ctx context.Context, req *csipb.GetCapacityRequest) (*csipb.GetCapacityResponse, error) {
	for i, c := range req.GetVolumeCapabilities() {
		if err := checkCapability(fmt.Sprintf("volume_capabilities[%d]", i), c); err != nil {
			return &csipb.GetCapacityResponse{}, nil // nothing of that kind can be made here
		}
	}
	if t := req.GetAccessibleTopology(); t != nil && t.GetSegments()[TopologyKey] != d.nodeID {
		return &csipb.GetCapacityResponse{}, nil
	}
	params, err := parseParams(req.GetParameters())
	if err != nil {
		return nil, err
	}
	pool, err := d.pool(params.pool)
	if err != nil {
		return nil, status.Errorf(codes.InvalidArgument, "parameters.%s: %v", ParamPool, status.Convert(err).Message())
	}
	u, err := pool.Usage()
	if err != nil {
		return nil, toStatus(err, "pool %s usage", pool.Name())
	}
	return &csipb.GetCapacityResponse{
		AvailableCapacity: u.AvailableBytes,
		// A thin volume may be larger than the free space; what limits one
		// volume is the same as what limits their sum.
		MaximumVolumeSize: wrapInt64(u.AvailableBytes),
		MinimumVolumeSize: wrapInt64(minVolumeBytes),
	}, nil
}

func (d *Driver) snapshotFor(pool Pool, v *thinpool.Volume) *csipb.Snapshot {
	return &csipb.Snapshot{
		SnapshotId:         snapshotID(d.nodeID, pool.Name(), v.Name),
		SourceVolumeId:     objectID{pool: pool.Name(), name: v.Source}.String(),
		SizeBytes:          v.SizeBytes,
		CreationTime:       timestamppb.New(v.CreatedAt),
		ReadyToUse:         true,
		AccessibleTopology: []*csipb.Topology{d.topology()},
	}
}

func (d *Driver) CreateSnapshot(ctx context.Context, req *csipb.CreateSnapshotRequest) (*csipb.CreateSnapshotResponse, error) {
	if err := checkName("name", req.GetName()); err != nil {
		return nil, err
	}
	src, err := d.mustParseID("source_volume_id", req.GetSourceVolumeId())
	if err != nil {
		return nil, err
	}
	for k := range req.GetParameters() {
		if !strings.HasPrefix(k, "csi.storage.k8s.io/") {
			return nil, invalid("parameters.%s: snapshots take no parameters", k)
		}
	}
	source, err := d.getVolume(src)
	if err != nil {
		return nil, err
	}
	pool, _ := d.pool(src.pool)
	name := deviceName(req.GetName())
	snapID := objectID{pool: pool.Name(), name: name}.String()
	unlock, err := d.locks.lock(snapID, src.String())
	if err != nil {
		return nil, err
	}
	defer unlock()
	if v, err := pool.Get(name); err == nil {
		if v.Kind != thinpool.KindSnapshot || v.Source != source.Name {
			return nil, status.Errorf(codes.AlreadyExists, "snapshot %q exists for another source (%s from %q)", req.GetName(), v.Kind, v.Source)
		}
		return &csipb.CreateSnapshotResponse{Snapshot: d.snapshotFor(pool, v)}, nil
	}
	v, err := pool.Snapshot(ctx, name, source.Name)
	if err != nil {
		return nil, toStatus(err, "snapshot %q of %s", req.GetName(), src)
	}
	klog.FromContext(ctx).Info("Created snapshot", "snapshot", snapID, "source", src)
	return &csipb.CreateSnapshotResponse{Snapshot: d.snapshotFor(pool, v)}, nil
}

func (d *Driver) DeleteSnapshot(ctx context.Context, req *csipb.DeleteSnapshotRequest) (*csipb.DeleteSnapshotResponse, error) {
	if err := d.deleteObject(ctx, "snapshot_id", req.GetSnapshotId(), thinpool.KindSnapshot); err != nil {
		return nil, err
	}
	return &csipb.DeleteSnapshotResponse{}, nil
}

func (d *Driver) ListSnapshots(ctx context.Context, req *csipb.ListSnapshotsRequest) (*csipb.ListSnapshotsResponse, error) {
	all := d.all(thinpool.KindSnapshot)
	filtered := all[:0:0]
	wantID, wantOK := "", true
	if want := req.GetSnapshotId(); want != "" {
		id, ok := d.parseID(want)
		wantID, wantOK = id.String(), ok
	}
	for _, it := range all {
		if req.GetSnapshotId() != "" && (!wantOK || wantID != it.id) {
			continue
		}
		if req.GetSourceVolumeId() != "" && req.GetSourceVolumeId() != (objectID{pool: it.pool.Name(), name: it.v.Source}).String() {
			continue
		}
		filtered = append(filtered, it)
	}
	items, next, err := page(filtered, req.GetStartingToken(), req.GetMaxEntries())
	if err != nil {
		return nil, err
	}
	resp := &csipb.ListSnapshotsResponse{NextToken: next}
	for _, it := range items {
		v := it.v
		resp.Entries = append(resp.Entries, &csipb.ListSnapshotsResponse_Entry{Snapshot: d.snapshotFor(it.pool, &v)})
	}
	return resp, nil
}

func (d *Driver) GetSnapshot(ctx context.Context, req *csipb.GetSnapshotRequest) (*csipb.GetSnapshotResponse, error) {
	id, err := d.mustParseSnapshotID("snapshot_id", req.GetSnapshotId())
	if err != nil {
		return nil, err
	}
	pool, err := d.pool(id.pool)
	if err != nil {
		return nil, err
	}
	v, err := pool.Get(id.name)
	if err != nil {
		return nil, toStatus(err, "snapshot %s", id)
	}
	if v.Kind != thinpool.KindSnapshot {
		return nil, notFound("%s is a volume, not a snapshot", id)
	}
	return &csipb.GetSnapshotResponse{Snapshot: d.snapshotFor(pool, v)}, nil
}
