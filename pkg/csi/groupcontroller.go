package csi

import (
	"context"
	"errors"
	"slices"
	"sort"
	"strings"

	csipb "github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/timestamppb"
	"k8s.io/klog/v2"

	"github.com/csi-dmthin/csi-dmthin/pkg/thinpool"
)

// The group controller service: crash-consistent snapshots of several
// volumes of one pool (thinpool.SnapshotGroup). A group snapshot's ID is
// "<pool>/<group>", its snapshots' IDs "<pool>/<name>" like any snapshot's;
// each snapshot's record names its group, so the group needs no record of
// its own.

func (d *Driver) GroupControllerGetCapabilities(context.Context, *csipb.GroupControllerGetCapabilitiesRequest) (*csipb.GroupControllerGetCapabilitiesResponse, error) {
	return &csipb.GroupControllerGetCapabilitiesResponse{Capabilities: []*csipb.GroupControllerServiceCapability{{
		Type: &csipb.GroupControllerServiceCapability_Rpc{Rpc: &csipb.GroupControllerServiceCapability_RPC{
			Type: csipb.GroupControllerServiceCapability_RPC_CREATE_DELETE_GET_VOLUME_GROUP_SNAPSHOT,
		}},
	}}}, nil
}

// groupMemberName is the snapshot a group takes of one source: derived from
// both, so a repeated request finds what the first made.
func groupMemberName(group, source string) string { return deviceName(group + "-" + source) }

func (d *Driver) CreateVolumeGroupSnapshot(ctx context.Context, req *csipb.CreateVolumeGroupSnapshotRequest) (*csipb.CreateVolumeGroupSnapshotResponse, error) {
	if err := checkName("name", req.GetName()); err != nil {
		return nil, err
	}
	if len(req.GetSourceVolumeIds()) == 0 {
		return nil, invalid("source_volume_ids is required")
	}
	for k := range req.GetParameters() {
		// deletionPolicy: Kubernetes' storage suite writes the class's
		// policy into its parameters too; it is the class's business, and
		// nothing for the driver to do.
		if !strings.HasPrefix(k, csiParamPrefix) && k != "deletionPolicy" {
			return nil, invalid("parameters.%s: group snapshots take no parameters", k)
		}
	}
	// Every source must be a volume of one pool of this node: a group is
	// one suspend window and one commit of one pool.
	var pool Pool
	ids := make([]objectID, 0, len(req.GetSourceVolumeIds()))
	seen := map[string]bool{}
	var elsewhere []string
	for i, s := range req.GetSourceVolumeIds() {
		id, err := d.mustParseID("source_volume_ids", s)
		if err != nil {
			return nil, status.Errorf(codes.NotFound, "source_volume_ids[%d]: %s", i, status.Convert(err).Message())
		}
		if seen[id.String()] {
			return nil, invalid("source_volume_ids[%d]: %s is listed twice", i, id)
		}
		seen[id.String()] = true
		p, ok := d.pools[id.pool]
		if !ok {
			elsewhere = append(elsewhere, id.String()+" (pool "+id.pool+" is not on node "+d.nodeID+")")
			continue
		}
		if pool == nil {
			pool = p
		} else if p.Name() != pool.Name() {
			elsewhere = append(elsewhere, id.String()+" (pool "+id.pool+", not "+pool.Name()+")")
			continue
		}
		if _, err := d.getVolume(id); err != nil {
			return nil, status.Errorf(status.Code(err), "source_volume_ids[%d]: %s", i, status.Convert(err).Message())
		}
		ids = append(ids, id)
	}
	if len(elsewhere) > 0 {
		return nil, status.Errorf(codes.FailedPrecondition, "a group snapshot is taken of volumes of one pool on one node; %s cannot join the others in pool %s on node %s",
			strings.Join(elsewhere, ", "), poolName(pool), d.nodeID)
	}
	group := deviceName(req.GetName())
	groupID := objectID{pool: pool.Name(), name: group}.String()
	members := make([]thinpool.GroupMember, len(ids))
	lockIDs := []string{groupID}
	for i, id := range ids {
		members[i] = thinpool.GroupMember{Name: groupMemberName(group, id.name), Source: id.name}
		lockIDs = append(lockIDs, id.String())
	}
	unlock, err := d.locks.lock(lockIDs...)
	if err != nil {
		return nil, err
	}
	defer unlock()
	// A repeated request: the same sources, or AlreadyExists.
	if have, err := pool.GroupSnapshots(group); err == nil {
		var haveSrc, wantSrc []string
		for _, v := range have {
			haveSrc = append(haveSrc, v.Source)
		}
		for _, m := range members {
			wantSrc = append(wantSrc, m.Source)
		}
		sort.Strings(haveSrc)
		sort.Strings(wantSrc)
		if !slices.Equal(haveSrc, wantSrc) {
			return nil, status.Errorf(codes.AlreadyExists, "group snapshot %q exists of %s, not of the volumes asked for", req.GetName(), strings.Join(haveSrc, ", "))
		}
		return &csipb.CreateVolumeGroupSnapshotResponse{GroupSnapshot: d.groupFor(pool, group, have)}, nil
	} else if !errors.Is(err, thinpool.ErrNotFound) {
		return nil, toStatus(err, "group snapshot %q", req.GetName())
	}
	made, err := pool.SnapshotGroup(ctx, group, members)
	if err != nil {
		return nil, toStatus(err, "group snapshot %q", req.GetName())
	}
	vols := make([]thinpool.Volume, len(made))
	for i, v := range made {
		vols[i] = *v
	}
	klog.FromContext(ctx).Info("Created group snapshot", "groupSnapshot", groupID, "snapshots", len(vols))
	return &csipb.CreateVolumeGroupSnapshotResponse{GroupSnapshot: d.groupFor(pool, group, vols)}, nil
}

func poolName(p Pool) string {
	if p == nil {
		return "(none of them here)"
	}
	return p.Name()
}

// groupFor is a group snapshot's CSI form.
func (d *Driver) groupFor(pool Pool, group string, vols []thinpool.Volume) *csipb.VolumeGroupSnapshot {
	g := &csipb.VolumeGroupSnapshot{GroupSnapshotId: objectID{pool: pool.Name(), name: group}.String(), ReadyToUse: true}
	for i := range vols {
		s := d.snapshotFor(pool, &vols[i])
		s.GroupSnapshotId = g.GroupSnapshotId
		g.Snapshots = append(g.Snapshots, s)
		if g.CreationTime == nil || vols[i].CreatedAt.Before(g.CreationTime.AsTime()) {
			g.CreationTime = timestamppb.New(vols[i].CreatedAt)
		}
	}
	return g
}

// lookupGroup finds a group snapshot by ID and checks snapshot_ids against
// its members when the caller gave them: the same set, or, with partOK
// (a delete that failed part way and is retried), a set that holds every
// member left.
func (d *Driver) lookupGroup(field, s string, snapshotIDs []string, partOK bool) (Pool, string, []thinpool.Volume, error) {
	id, ok := d.parseID(s)
	if !ok {
		return nil, "", nil, notFound("%s %q is not a csi-dmthin ID (<pool>/<name>)", field, s)
	}
	pool, ok := d.pools[id.pool]
	if !ok {
		return nil, "", nil, notFound("%s %s: pool %s is not on node %s", field, id, id.pool, d.nodeID)
	}
	vols, err := pool.GroupSnapshots(id.name)
	if err != nil {
		return nil, "", nil, toStatus(err, "%s %s", field, id)
	}
	if len(snapshotIDs) > 0 {
		var have, want []string
		for _, v := range vols {
			have = append(have, objectID{pool: pool.Name(), name: v.Name}.String())
		}
		for _, s := range snapshotIDs {
			// Either form of a snapshot ID of this node names the same
			// snapshot.
			if id, ok := d.parseID(s); ok {
				s = id.String()
			}
			want = append(want, s)
		}
		sort.Strings(have)
		sort.Strings(want)
		match := slices.Equal(have, want)
		if partOK {
			match = true
			for _, h := range have {
				match = match && slices.Contains(want, h)
			}
		}
		if !match {
			return nil, "", nil, invalid("snapshot_ids %s are not the snapshots of group snapshot %s (%s)", strings.Join(want, ", "), id, strings.Join(have, ", "))
		}
	}
	return pool, id.name, vols, nil
}

func (d *Driver) GetVolumeGroupSnapshot(ctx context.Context, req *csipb.GetVolumeGroupSnapshotRequest) (*csipb.GetVolumeGroupSnapshotResponse, error) {
	if err := required("group_snapshot_id", req.GetGroupSnapshotId()); err != nil {
		return nil, err
	}
	pool, group, vols, err := d.lookupGroup("group_snapshot_id", req.GetGroupSnapshotId(), req.GetSnapshotIds(), false)
	if err != nil {
		return nil, err
	}
	return &csipb.GetVolumeGroupSnapshotResponse{GroupSnapshot: d.groupFor(pool, group, vols)}, nil
}

func (d *Driver) DeleteVolumeGroupSnapshot(ctx context.Context, req *csipb.DeleteVolumeGroupSnapshotRequest) (*csipb.DeleteVolumeGroupSnapshotResponse, error) {
	if err := required("group_snapshot_id", req.GetGroupSnapshotId()); err != nil {
		return nil, err
	}
	unlock, err := d.locks.lock(req.GetGroupSnapshotId())
	if err != nil {
		return nil, err
	}
	defer unlock()
	pool, _, vols, err := d.lookupGroup("group_snapshot_id", req.GetGroupSnapshotId(), req.GetSnapshotIds(), true)
	if status.Code(err) == codes.NotFound {
		return &csipb.DeleteVolumeGroupSnapshotResponse{}, nil // deleting what is gone
	}
	if err != nil {
		return nil, err
	}
	// One by one: a failure part way leaves the rest for the retry, which
	// finds the group smaller.
	for _, v := range vols {
		if err := pool.Delete(ctx, v.Name); err != nil {
			return nil, toStatus(err, "delete snapshot %s of group snapshot %s", v.Name, req.GetGroupSnapshotId())
		}
	}
	klog.FromContext(ctx).Info("Deleted group snapshot", "groupSnapshot", req.GetGroupSnapshotId(), "snapshots", len(vols))
	return &csipb.DeleteVolumeGroupSnapshotResponse{}, nil
}
