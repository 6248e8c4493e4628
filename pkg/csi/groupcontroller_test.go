package csi

import (
	"testing"

	csipb "github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

func TestGroupSnapshots(t *testing.T) {
	e := newDriverEnv(t)
	ctx := t.Context()
	data, log := e.createVolume("pvc-data"), e.createVolume("pvc-log")
	other, err := e.d.CreateVolume(ctx, &csipb.CreateVolumeRequest{
		Name: "pvc-other", CapacityRange: &csipb.CapacityRange{RequiredBytes: testVolBytes},
		VolumeCapabilities: []*csipb.VolumeCapability{fsCap}, Parameters: map[string]string{ParamPool: otherPool},
	})
	if err != nil {
		t.Fatal(err)
	}
	sources := []string{data.VolumeId, log.VolumeId}

	resp, err := e.d.CreateVolumeGroupSnapshot(ctx, &csipb.CreateVolumeGroupSnapshotRequest{Name: "groupsnapshot-1", SourceVolumeIds: sources})
	if err != nil {
		t.Fatal(err)
	}
	g := resp.GetGroupSnapshot()
	if g.GetGroupSnapshotId() != testPool+"/groupsnapshot-1" || !g.GetReadyToUse() || g.GetCreationTime() == nil || len(g.GetSnapshots()) != 2 {
		t.Fatalf("group snapshot %v", g)
	}
	var snapIDs []string
	for _, s := range g.GetSnapshots() {
		if s.GetGroupSnapshotId() != g.GetGroupSnapshotId() || !s.GetReadyToUse() {
			t.Errorf("member %v", s)
		}
		snapIDs = append(snapIDs, s.GetSnapshotId())
	}
	// Repeated: the same group. The same name of other sources: AlreadyExists.
	again, err := e.d.CreateVolumeGroupSnapshot(ctx, &csipb.CreateVolumeGroupSnapshotRequest{Name: "groupsnapshot-1", SourceVolumeIds: []string{log.VolumeId, data.VolumeId}})
	if err != nil || again.GetGroupSnapshot().GetGroupSnapshotId() != g.GetGroupSnapshotId() || len(again.GetGroupSnapshot().GetSnapshots()) != 2 {
		t.Fatalf("repeated: %v, %v", again, err)
	}
	_, err = e.d.CreateVolumeGroupSnapshot(ctx, &csipb.CreateVolumeGroupSnapshotRequest{Name: "groupsnapshot-1", SourceVolumeIds: []string{data.VolumeId}})
	wantCode(t, err, codes.AlreadyExists, "groupsnapshot-1")

	// A member restores like any snapshot.
	if _, err := e.d.CreateVolume(ctx, &csipb.CreateVolumeRequest{
		Name: "pvc-restored", VolumeCapabilities: []*csipb.VolumeCapability{fsCap},
		VolumeContentSource: &csipb.VolumeContentSource{Type: &csipb.VolumeContentSource_Snapshot{Snapshot: &csipb.VolumeContentSource_SnapshotSource{SnapshotId: snapIDs[0]}}},
	}); err != nil {
		t.Fatalf("restore from a member: %v", err)
	}

	get, err := e.d.GetVolumeGroupSnapshot(ctx, &csipb.GetVolumeGroupSnapshotRequest{GroupSnapshotId: g.GetGroupSnapshotId(), SnapshotIds: snapIDs})
	if err != nil || len(get.GetGroupSnapshot().GetSnapshots()) != 2 {
		t.Fatalf("get: %v, %v", get, err)
	}
	_, err = e.d.GetVolumeGroupSnapshot(ctx, &csipb.GetVolumeGroupSnapshotRequest{GroupSnapshotId: g.GetGroupSnapshotId(), SnapshotIds: snapIDs[:1]})
	wantCode(t, err, codes.InvalidArgument, "snapshot_ids")

	for _, c := range []struct {
		name string
		req  *csipb.CreateVolumeGroupSnapshotRequest
		code codes.Code
	}{
		{"no name", &csipb.CreateVolumeGroupSnapshotRequest{SourceVolumeIds: sources}, codes.InvalidArgument},
		{"no sources", &csipb.CreateVolumeGroupSnapshotRequest{Name: "g2"}, codes.InvalidArgument},
		{"a source twice", &csipb.CreateVolumeGroupSnapshotRequest{Name: "g2", SourceVolumeIds: []string{data.VolumeId, data.VolumeId}}, codes.InvalidArgument},
		{"an unknown parameter", &csipb.CreateVolumeGroupSnapshotRequest{Name: "g2", SourceVolumeIds: sources, Parameters: map[string]string{"fast": "yes"}}, codes.InvalidArgument},
		{"two pools", &csipb.CreateVolumeGroupSnapshotRequest{Name: "g2", SourceVolumeIds: []string{data.VolumeId, other.GetVolume().GetVolumeId()}}, codes.FailedPrecondition},
		{"another node's pool", &csipb.CreateVolumeGroupSnapshotRequest{Name: "g2", SourceVolumeIds: []string{data.VolumeId, "gamma/pvc-x"}}, codes.FailedPrecondition},
		{"a missing volume", &csipb.CreateVolumeGroupSnapshotRequest{Name: "g2", SourceVolumeIds: []string{data.VolumeId, testPool + "/pvc-missing"}}, codes.NotFound},
		{"a snapshot as a source", &csipb.CreateVolumeGroupSnapshotRequest{Name: "g2", SourceVolumeIds: []string{snapIDs[0]}}, codes.NotFound},
		{"not an ID", &csipb.CreateVolumeGroupSnapshotRequest{Name: "g2", SourceVolumeIds: []string{"nonsense"}}, codes.NotFound},
	} {
		t.Run(c.name, func(t *testing.T) {
			_, err := e.d.CreateVolumeGroupSnapshot(ctx, c.req)
			if c.code == codes.FailedPrecondition {
				// It names the volume that cannot join, and where it is.
				wantCode(t, err, c.code, "pvc-", testNode)
			} else {
				wantCode(t, err, c.code)
			}
		})
	}
	if _, err := e.pools[testPool].GroupSnapshots("g2"); err == nil {
		t.Fatal("a refused group left snapshots")
	}
	// The class's deletionPolicy, which Kubernetes' storage suite also
	// writes into the parameters, is no parameter of the driver's: taken.
	withPolicy, err := e.d.CreateVolumeGroupSnapshot(ctx, &csipb.CreateVolumeGroupSnapshotRequest{Name: "g3", SourceVolumeIds: sources, Parameters: map[string]string{"deletionPolicy": "Retain"}})
	if err != nil || len(withPolicy.GetGroupSnapshot().GetSnapshots()) != len(sources) {
		t.Fatalf("a group with the parameter deletionPolicy: %v, %v", withPolicy, err)
	}

	// Delete: a list that does not hold every member is refused; then the
	// group goes, and deleting it again, or a group never made, is OK.
	_, err = e.d.DeleteVolumeGroupSnapshot(ctx, &csipb.DeleteVolumeGroupSnapshotRequest{GroupSnapshotId: g.GetGroupSnapshotId(), SnapshotIds: snapIDs[1:]})
	wantCode(t, err, codes.InvalidArgument, "snapshot_ids")
	for range 2 {
		if _, err := e.d.DeleteVolumeGroupSnapshot(ctx, &csipb.DeleteVolumeGroupSnapshotRequest{GroupSnapshotId: g.GetGroupSnapshotId(), SnapshotIds: snapIDs}); err != nil {
			t.Fatalf("delete: %v", err)
		}
	}
	_, err = e.d.GetVolumeGroupSnapshot(ctx, &csipb.GetVolumeGroupSnapshotRequest{GroupSnapshotId: g.GetGroupSnapshotId()})
	wantCode(t, err, codes.NotFound)
	if _, err := e.d.DeleteVolumeGroupSnapshot(ctx, &csipb.DeleteVolumeGroupSnapshotRequest{GroupSnapshotId: "gamma/none"}); err != nil {
		t.Fatalf("delete of another node's group: %v", err)
	}
	for _, id := range snapIDs {
		if _, err := e.d.GetSnapshot(ctx, &csipb.GetSnapshotRequest{SnapshotId: id}); status.Code(err) != codes.NotFound {
			t.Errorf("member %s after the group's delete: %v", id, err)
		}
	}
}
