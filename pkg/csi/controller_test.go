package csi

import (
	"bytes"
	"context"
	"fmt"
	"slices"
	"strings"
	"testing"

	csipb "github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	"github.com/csi-dmthin/csi-dmthin/pkg/thinpool"
)

// The driver over real thinpool.Pools on a FakeKernel and the fake FS, on
// the host under -race. Handlers are called directly; sanity_test.go goes
// through gRPC.

func TestCreateVolumeIdempotent(t *testing.T) {
	e := newDriverEnv(t)
	ctx := t.Context()
	req := &csipb.CreateVolumeRequest{
		Name: "pvc-1", CapacityRange: &csipb.CapacityRange{RequiredBytes: testVolBytes},
		VolumeCapabilities: []*csipb.VolumeCapability{fsCap},
		Parameters:         map[string]string{ParamFSType: "ext4"},
	}
	first, err := e.d.CreateVolume(ctx, req)
	if err != nil {
		t.Fatal(err)
	}
	v := first.GetVolume()
	if v.GetVolumeId() != testPool+"/pvc-1" || v.GetCapacityBytes() != testVolBytes {
		t.Errorf("volume %v", v)
	}
	if topo := v.GetAccessibleTopology(); len(topo) != 1 || topo[0].GetSegments()[TopologyKey] != testNode {
		t.Errorf("accessible topology %v", topo)
	}
	for range 3 {
		again, err := e.d.CreateVolume(ctx, req)
		if err != nil {
			t.Fatal(err)
		}
		if !proto.Equal(again.GetVolume(), v) {
			t.Errorf("repeat gave %v, first %v", again.GetVolume(), v)
		}
	}
	// A range the existing volume fits is the same request.
	fits, err := e.d.CreateVolume(ctx, &csipb.CreateVolumeRequest{Name: "pvc-1", VolumeCapabilities: req.VolumeCapabilities,
		CapacityRange: &csipb.CapacityRange{RequiredBytes: 1 << 20, LimitBytes: 32 << 20}})
	if err != nil || fits.GetVolume().GetVolumeId() != v.GetVolumeId() {
		t.Errorf("a fitting range: %v, %v", fits, err)
	}
	if n := len(e.pools[testPool].List()); n != 1 {
		t.Errorf("%d devices after repeats, want 1", n)
	}
	src := e.createVolume("other").GetVolumeId()
	runBadCases(t, e, []badCase{
		{"larger", func(ctx context.Context, d *Driver) error {
			return ignore(d.CreateVolume(ctx, &csipb.CreateVolumeRequest{Name: "pvc-1", VolumeCapabilities: req.VolumeCapabilities, CapacityRange: &csipb.CapacityRange{RequiredBytes: 2 * testVolBytes}}))
		}, codes.AlreadyExists, []string{"pvc-1"}},
		{"under the limit", func(ctx context.Context, d *Driver) error {
			return ignore(d.CreateVolume(ctx, &csipb.CreateVolumeRequest{Name: "pvc-1", VolumeCapabilities: req.VolumeCapabilities, CapacityRange: &csipb.CapacityRange{LimitBytes: testVolBytes / 2}}))
		}, codes.AlreadyExists, []string{"pvc-1"}},
		{"with a source", func(ctx context.Context, d *Driver) error {
			return ignore(d.CreateVolume(ctx, &csipb.CreateVolumeRequest{Name: "pvc-1", VolumeCapabilities: req.VolumeCapabilities, CapacityRange: req.CapacityRange,
				VolumeContentSource: &csipb.VolumeContentSource{Type: &csipb.VolumeContentSource_Volume{Volume: &csipb.VolumeContentSource_VolumeSource{VolumeId: src}}}}))
		}, codes.AlreadyExists, []string{"pvc-1"}},
		{"limit under required", func(ctx context.Context, d *Driver) error {
			return ignore(d.CreateVolume(ctx, &csipb.CreateVolumeRequest{Name: "new", VolumeCapabilities: req.VolumeCapabilities, CapacityRange: &csipb.CapacityRange{RequiredBytes: 2 << 20, LimitBytes: 1 << 20}}))
		}, codes.OutOfRange, []string{"limit"}},
		{"negative", func(ctx context.Context, d *Driver) error {
			return ignore(d.CreateVolume(ctx, &csipb.CreateVolumeRequest{Name: "new", VolumeCapabilities: req.VolumeCapabilities, CapacityRange: &csipb.CapacityRange{RequiredBytes: -1}}))
		}, codes.InvalidArgument, []string{"capacity_range"}},
	})

	// Names that are not device names map to one device each, the same
	// one every time.
	long := strings.Repeat("ü", 60) // 120 bytes
	a, err := e.d.CreateVolume(ctx, &csipb.CreateVolumeRequest{Name: long, VolumeCapabilities: req.VolumeCapabilities})
	if err != nil {
		t.Fatal(err)
	}
	b, err := e.d.CreateVolume(ctx, &csipb.CreateVolumeRequest{Name: long, VolumeCapabilities: req.VolumeCapabilities})
	if err != nil || a.GetVolume().GetVolumeId() != b.GetVolume().GetVolumeId() {
		t.Errorf("hashed name not idempotent: %v, %v, %v", a, b, err)
	}
	if a.GetVolume().GetCapacityBytes() != defaultVolumeBytes {
		t.Errorf("no capacity range gave %d bytes, want %d", a.GetVolume().GetCapacityBytes(), defaultVolumeBytes)
	}
}

func TestCreateVolumeNoSpace(t *testing.T) {
	// 64 MiB of data, at most 1x provisioned, 10% free floor.
	e := newDriverEnv(t, func(c *thinpool.Config) { c.DataFileBytes = 64 << 20; c.OverprovisionRatio = 1 })
	ctx := t.Context()
	mk := func(name string, size int64) (*csipb.CreateVolumeResponse, error) {
		return e.d.CreateVolume(ctx, &csipb.CreateVolumeRequest{Name: name, VolumeCapabilities: []*csipb.VolumeCapability{fsCap}, CapacityRange: &csipb.CapacityRange{RequiredBytes: size}})
	}
	if _, err := mk("fits", 48<<20); err != nil {
		t.Fatal(err)
	}
	runBadCases(t, e, []badCase{
		{"over the ratio", func(ctx context.Context, d *Driver) error { return ignore(mk("too-much", 32<<20)) }, codes.ResourceExhausted, nil},
		{"other node's topology", func(ctx context.Context, d *Driver) error {
			return ignore(d.CreateVolume(ctx, &csipb.CreateVolumeRequest{Name: "elsewhere", VolumeCapabilities: []*csipb.VolumeCapability{fsCap},
				AccessibilityRequirements: &csipb.TopologyRequirement{Requisite: []*csipb.Topology{{Segments: map[string]string{TopologyKey: "node-b"}}}}}))
		}, codes.ResourceExhausted, []string{"requisite", testNode}},
	})
	// Requisite topology that includes this node is fine.
	if _, err := e.d.CreateVolume(ctx, &csipb.CreateVolumeRequest{Name: "here", VolumeCapabilities: []*csipb.VolumeCapability{fsCap},
		CapacityRange: &csipb.CapacityRange{RequiredBytes: 4 << 20},
		AccessibilityRequirements: &csipb.TopologyRequirement{
			Requisite: []*csipb.Topology{{Segments: map[string]string{TopologyKey: "node-b"}}, {Segments: map[string]string{TopologyKey: testNode}}},
			Preferred: []*csipb.Topology{{Segments: map[string]string{TopologyKey: "node-b"}}},
		}}); err != nil {
		t.Errorf("requisite including this node: %v", err)
	}
}

func TestCloneAndRestore(t *testing.T) {
	e := newDriverEnv(t)
	ctx := t.Context()
	src := e.createVolume("src").GetVolumeId()
	data := bytes.Repeat([]byte("dm-thin!"), 1024)
	e.write(src, 1<<20, data)
	snap := e.createSnapshot("snap", src)
	if snap.GetSourceVolumeId() != src || !snap.GetReadyToUse() || snap.GetSizeBytes() != testVolBytes {
		t.Errorf("snapshot %v", snap)
	}
	// The source changes after the snapshot; the snapshot keeps the old data.
	e.write(src, 1<<20, bytes.Repeat([]byte("changed!"), 1024))

	fromSnap := &csipb.VolumeContentSource{Type: &csipb.VolumeContentSource_Snapshot{Snapshot: &csipb.VolumeContentSource_SnapshotSource{SnapshotId: snap.GetSnapshotId()}}}
	restored, err := e.d.CreateVolume(ctx, &csipb.CreateVolumeRequest{Name: "restored", VolumeCapabilities: []*csipb.VolumeCapability{fsCap},
		CapacityRange: &csipb.CapacityRange{RequiredBytes: 2 * testVolBytes}, VolumeContentSource: fromSnap})
	if err != nil {
		t.Fatal(err)
	}
	if !proto.Equal(restored.GetVolume().GetContentSource(), fromSnap) || restored.GetVolume().GetCapacityBytes() != 2*testVolBytes {
		t.Errorf("restored volume %v", restored.GetVolume())
	}
	if got := e.read(restored.GetVolume().GetVolumeId(), 1<<20, len(data)); !bytes.Equal(got, data) {
		t.Errorf("restored data differs from the snapshot's")
	}

	fromVol := &csipb.VolumeContentSource{Type: &csipb.VolumeContentSource_Volume{Volume: &csipb.VolumeContentSource_VolumeSource{VolumeId: src}}}
	cloneReq := &csipb.CreateVolumeRequest{Name: "clone", VolumeCapabilities: []*csipb.VolumeCapability{fsCap},
		CapacityRange: &csipb.CapacityRange{RequiredBytes: testVolBytes}, VolumeContentSource: fromVol}
	clone, err := e.d.CreateVolume(ctx, cloneReq)
	if err != nil {
		t.Fatal(err)
	}
	if !proto.Equal(clone.GetVolume().GetContentSource(), fromVol) || clone.GetVolume().GetCapacityBytes() != testVolBytes {
		t.Errorf("clone %v", clone.GetVolume())
	}
	if got := e.read(clone.GetVolume().GetVolumeId(), 1<<20, 8); string(got) != "changed!" {
		t.Errorf("clone reads %q, want the source's current data", got)
	}
	// Repeats are idempotent.
	again, err := e.d.CreateVolume(ctx, cloneReq)
	if err != nil || !proto.Equal(again.GetVolume(), clone.GetVolume()) {
		t.Errorf("repeated clone: %v, %v", again, err)
	}

	betaVol := e.createVolumeIn(otherPool, "b")
	runBadCases(t, e, []badCase{
		{"smaller than the source", func(ctx context.Context, d *Driver) error {
			return ignore(d.CreateVolume(ctx, &csipb.CreateVolumeRequest{Name: "small", VolumeCapabilities: []*csipb.VolumeCapability{fsCap},
				CapacityRange: &csipb.CapacityRange{LimitBytes: testVolBytes / 2}, VolumeContentSource: fromSnap}))
		}, codes.OutOfRange, nil},
		{"source in another pool", func(ctx context.Context, d *Driver) error {
			return ignore(d.CreateVolume(ctx, &csipb.CreateVolumeRequest{Name: "x", VolumeCapabilities: []*csipb.VolumeCapability{fsCap},
				VolumeContentSource: &csipb.VolumeContentSource{Type: &csipb.VolumeContentSource_Volume{Volume: &csipb.VolumeContentSource_VolumeSource{VolumeId: betaVol}}}}))
		}, codes.NotFound, []string{otherPool}},
		{"restore under another name's source", func(ctx context.Context, d *Driver) error {
			return ignore(d.CreateVolume(ctx, &csipb.CreateVolumeRequest{Name: "restored", VolumeCapabilities: []*csipb.VolumeCapability{fsCap}, VolumeContentSource: fromVol}))
		}, codes.AlreadyExists, nil},
	})
}

func (e *driverEnv) createVolumeIn(pool, name string) string {
	e.t.Helper()
	resp, err := e.d.CreateVolume(e.t.Context(), &csipb.CreateVolumeRequest{Name: name, VolumeCapabilities: []*csipb.VolumeCapability{fsCap},
		CapacityRange: &csipb.CapacityRange{RequiredBytes: testVolBytes}, Parameters: map[string]string{ParamPool: pool}})
	if err != nil {
		e.t.Fatal(err)
	}
	return resp.GetVolume().GetVolumeId()
}

func TestCreateSnapshotIdempotent(t *testing.T) {
	e := newDriverEnv(t)
	ctx := t.Context()
	a := e.createVolume("a").GetVolumeId()
	b := e.createVolume("b").GetVolumeId()
	s := e.createSnapshot("snap-1", a)
	if s.GetSnapshotId() != testNode+"/"+testPool+"/snap-1" || s.GetCreationTime() == nil {
		t.Errorf("snapshot %v", s)
	}
	if topo := s.GetAccessibleTopology(); len(topo) != 1 || topo[0].GetSegments()[TopologyKey] != testNode {
		t.Errorf("snapshot topology %v", topo)
	}
	again := e.createSnapshot("snap-1", a)
	if !proto.Equal(again, s) {
		t.Errorf("repeat gave %v, first %v", again, s)
	}
	got, err := e.d.GetSnapshot(ctx, &csipb.GetSnapshotRequest{SnapshotId: s.GetSnapshotId()})
	if err != nil || !proto.Equal(got.GetSnapshot(), s) {
		t.Errorf("GetSnapshot: %v, %v", got, err)
	}
	runBadCases(t, e, []badCase{
		{"other source", func(ctx context.Context, d *Driver) error {
			return ignore(d.CreateSnapshot(ctx, &csipb.CreateSnapshotRequest{Name: "snap-1", SourceVolumeId: b}))
		}, codes.AlreadyExists, []string{"snap-1"}},
		{"a volume's name", func(ctx context.Context, d *Driver) error {
			return ignore(d.CreateSnapshot(ctx, &csipb.CreateSnapshotRequest{Name: "b", SourceVolumeId: a}))
		}, codes.AlreadyExists, nil},
		{"volume with a snapshot's name", func(ctx context.Context, d *Driver) error {
			return ignore(d.CreateVolume(ctx, &csipb.CreateVolumeRequest{Name: "snap-1", VolumeCapabilities: []*csipb.VolumeCapability{fsCap}}))
		}, codes.AlreadyExists, nil},
	})
	// Deleting the source leaves the snapshot; deletes are idempotent.
	for range 2 {
		if _, err := e.d.DeleteVolume(ctx, &csipb.DeleteVolumeRequest{VolumeId: a}); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := e.d.GetSnapshot(ctx, &csipb.GetSnapshotRequest{SnapshotId: s.GetSnapshotId()}); err != nil {
		t.Errorf("snapshot gone with its source: %v", err)
	}
	for range 2 {
		if _, err := e.d.DeleteSnapshot(ctx, &csipb.DeleteSnapshotRequest{SnapshotId: s.GetSnapshotId()}); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := e.d.GetSnapshot(ctx, &csipb.GetSnapshotRequest{SnapshotId: s.GetSnapshotId()}); status.Code(err) != codes.NotFound {
		t.Errorf("deleted snapshot: %v", err)
	}
}

func TestListPagination(t *testing.T) {
	e := newDriverEnv(t)
	ctx := t.Context()
	var vols []string
	for i := range 5 {
		vols = append(vols, e.createVolume(fmt.Sprintf("v%d", i)).GetVolumeId())
	}
	vols = append(vols, e.createVolumeIn(otherPool, "w"))
	snaps := map[string]string{} // snapshot ID -> source ID
	for i, src := range []string{vols[0], vols[0], vols[1]} {
		snaps[e.createSnapshot(fmt.Sprintf("s%d", i), src).GetSnapshotId()] = src
	}

	var got []string
	token := ""
	for pages := 0; ; pages++ {
		resp, err := e.d.ListVolumes(ctx, &csipb.ListVolumesRequest{MaxEntries: 2, StartingToken: token})
		if err != nil {
			t.Fatal(err)
		}
		if len(resp.GetEntries()) > 2 {
			t.Fatalf("page of %d entries, max 2", len(resp.GetEntries()))
		}
		for _, en := range resp.GetEntries() {
			got = append(got, en.GetVolume().GetVolumeId())
			if en.GetVolume().GetCapacityBytes() != testVolBytes {
				t.Errorf("entry %v", en)
			}
		}
		token = resp.GetNextToken()
		if token == "" {
			break
		}
		if pages > 10 {
			t.Fatal("pagination does not end")
		}
	}
	want := slices.Sorted(slices.Values(vols))
	if !slices.Equal(got, want) {
		t.Errorf("paged ListVolumes = %v, want %v (snapshots excluded)", got, want)
	}
	all, err := e.d.ListVolumes(ctx, &csipb.ListVolumesRequest{})
	if err != nil || len(all.GetEntries()) != len(vols) || all.GetNextToken() != "" {
		t.Errorf("unpaged ListVolumes: %d entries, token %q, %v", len(all.GetEntries()), all.GetNextToken(), err)
	}

	runBadCases(t, e, []badCase{
		{"ListVolumes/bad token", func(ctx context.Context, d *Driver) error {
			return ignore(d.ListVolumes(ctx, &csipb.ListVolumesRequest{StartingToken: "invalid-token"}))
		}, codes.Aborted, []string{"starting_token"}},
		{"ListVolumes/token past the end", func(ctx context.Context, d *Driver) error {
			return ignore(d.ListVolumes(ctx, &csipb.ListVolumesRequest{StartingToken: "99"}))
		}, codes.Aborted, nil},
		{"ListVolumes/negative max_entries", func(ctx context.Context, d *Driver) error {
			return ignore(d.ListVolumes(ctx, &csipb.ListVolumesRequest{MaxEntries: -1}))
		}, codes.InvalidArgument, []string{"max_entries"}},
		{"ListSnapshots/bad token", func(ctx context.Context, d *Driver) error {
			return ignore(d.ListSnapshots(ctx, &csipb.ListSnapshotsRequest{StartingToken: "-1"}))
		}, codes.Aborted, nil},
		{"ControllerListVolumeHealth/bad token", func(ctx context.Context, d *Driver) error {
			return ignore(d.ControllerListVolumeHealth(ctx, &csipb.ControllerListVolumeHealthRequest{StartingToken: "x"}))
		}, codes.Aborted, nil},
	})

	listSnaps := func(req *csipb.ListSnapshotsRequest) []string {
		t.Helper()
		var ids []string
		for {
			resp, err := e.d.ListSnapshots(ctx, req)
			if err != nil {
				t.Fatal(err)
			}
			for _, en := range resp.GetEntries() {
				ids = append(ids, en.GetSnapshot().GetSnapshotId())
				if snaps[en.GetSnapshot().GetSnapshotId()] != en.GetSnapshot().GetSourceVolumeId() {
					t.Errorf("entry %v: wrong source", en)
				}
			}
			if resp.GetNextToken() == "" {
				return ids
			}
			req = proto.Clone(req).(*csipb.ListSnapshotsRequest)
			req.StartingToken = resp.GetNextToken()
		}
	}
	for name, tc := range map[string]struct {
		req  *csipb.ListSnapshotsRequest
		want []string
	}{
		"all, paged":         {&csipb.ListSnapshotsRequest{MaxEntries: 1}, []string{snapID("s0"), snapID("s1"), snapID("s2")}},
		"by id":              {&csipb.ListSnapshotsRequest{SnapshotId: snapID("s1")}, []string{snapID("s1")}},
		"by id without node": {&csipb.ListSnapshotsRequest{SnapshotId: testPool + "/s1"}, []string{snapID("s1")}},
		"by other node's id": {&csipb.ListSnapshotsRequest{SnapshotId: "node-b/" + testPool + "/s1"}, nil},
		"by unknown id":      {&csipb.ListSnapshotsRequest{SnapshotId: snapID("nope")}, nil},
		"by malformed id":    {&csipb.ListSnapshotsRequest{SnapshotId: "nope"}, nil},
		"by a volume's id":   {&csipb.ListSnapshotsRequest{SnapshotId: vols[0]}, nil},
		"by source":          {&csipb.ListSnapshotsRequest{SourceVolumeId: vols[0], MaxEntries: 1}, []string{snapID("s0"), snapID("s1")}},
		"by source and id":   {&csipb.ListSnapshotsRequest{SourceVolumeId: vols[1], SnapshotId: snapID("s0")}, nil},
		"by unknown source":  {&csipb.ListSnapshotsRequest{SourceVolumeId: "gamma/v0"}, nil},
		"by snapless source": {&csipb.ListSnapshotsRequest{SourceVolumeId: vols[2]}, nil},
	} {
		if got := listSnaps(tc.req); !slices.Equal(got, tc.want) {
			t.Errorf("ListSnapshots %s = %v, want %v", name, got, tc.want)
		}
	}
}

func TestGetCapacity(t *testing.T) {
	e := newDriverEnv(t, func(c *thinpool.Config) { c.OverprovisionRatio = 1 })
	ctx := t.Context()
	capacity := func(req *csipb.GetCapacityRequest) int64 {
		t.Helper()
		resp, err := e.d.GetCapacity(ctx, req)
		if err != nil {
			t.Fatal(err)
		}
		return resp.GetAvailableCapacity()
	}
	here := &csipb.Topology{Segments: map[string]string{TopologyKey: testNode}}
	before := capacity(&csipb.GetCapacityRequest{AccessibleTopology: here, VolumeCapabilities: []*csipb.VolumeCapability{fsCap}})
	if before <= 0 {
		t.Fatalf("capacity of an empty pool: %d", before)
	}
	resp, err := e.d.GetCapacity(ctx, &csipb.GetCapacityRequest{})
	if err != nil || resp.GetMinimumVolumeSize().GetValue() != minVolumeBytes || resp.GetMaximumVolumeSize().GetValue() != before {
		t.Errorf("GetCapacity %v, %v", resp, err)
	}
	// At most 1x of 256 MiB may be provisioned: with 64 MiB of volumes,
	// 192 MiB are left, under the free data above the 10% floor.
	for i := range 4 {
		e.createVolume(fmt.Sprintf("v%d", i))
	}
	if after := capacity(&csipb.GetCapacityRequest{}); after != testPoolBytes-4*testVolBytes || after >= before {
		t.Errorf("capacity %d after 4 volumes, %d before; want %d", after, before, testPoolBytes-4*testVolBytes)
	}
	// The other pool keeps the default limit: what it allows, more than
	// its free data (a thin volume may be larger than the pool).
	otherUsage, err := e.pools[otherPool].Usage()
	if err != nil {
		t.Fatal(err)
	}
	want := int64(float64(otherUsage.DataBytes) * otherUsage.OverprovisionRatio)
	if other := capacity(&csipb.GetCapacityRequest{Parameters: map[string]string{ParamPool: otherPool}}); other != want || other <= otherUsage.DataBytes {
		t.Errorf("capacity of the untouched pool %s = %d, want %d (%gx its %d bytes)", otherPool, other, want, otherUsage.OverprovisionRatio, otherUsage.DataBytes)
	}
	for name, topo := range map[string]*csipb.Topology{
		"other node":  {Segments: map[string]string{TopologyKey: "node-b"}},
		"no node key": {Segments: map[string]string{"zone": "z1"}},
	} {
		if c := capacity(&csipb.GetCapacityRequest{AccessibleTopology: topo}); c != 0 {
			t.Errorf("capacity for %s = %d, want 0", name, c)
		}
	}
}

// An xfs volume is made at least as large as mkfs.xfs accepts, and a clone
// without a size takes its source's.
func TestCreateVolumeSizesXFSAndClones(t *testing.T) {
	d := newDriverEnv(t).d
	ctx := context.Background()
	xfsCap := &csipb.VolumeCapability{
		AccessType: &csipb.VolumeCapability_Mount{Mount: &csipb.VolumeCapability_MountVolume{FsType: "xfs"}},
		AccessMode: &csipb.VolumeCapability_AccessMode{Mode: csipb.VolumeCapability_AccessMode_SINGLE_NODE_WRITER},
	}
	r, err := d.CreateVolume(ctx, &csipb.CreateVolumeRequest{Name: "small-xfs", CapacityRange: &csipb.CapacityRange{RequiredBytes: 16 << 20}, VolumeCapabilities: []*csipb.VolumeCapability{xfsCap}})
	if err != nil {
		t.Fatal(err)
	}
	if got := r.GetVolume().GetCapacityBytes(); got != minXFSBytes {
		t.Errorf("xfs volume of %d bytes, want %d", got, minXFSBytes)
	}
	if _, err := d.CreateVolume(ctx, &csipb.CreateVolumeRequest{Name: "capped-xfs", CapacityRange: &csipb.CapacityRange{RequiredBytes: 16 << 20, LimitBytes: 32 << 20}, VolumeCapabilities: []*csipb.VolumeCapability{xfsCap}}); status.Code(err) != codes.OutOfRange {
		t.Errorf("xfs volume under a 32 MiB limit: %v, want OutOfRange", err)
	}
	src, err := d.CreateVolume(ctx, &csipb.CreateVolumeRequest{Name: "src", CapacityRange: &csipb.CapacityRange{RequiredBytes: 64 << 20}, VolumeCapabilities: []*csipb.VolumeCapability{mountCap("ext4", csipb.VolumeCapability_AccessMode_SINGLE_NODE_WRITER)}})
	if err != nil {
		t.Fatal(err)
	}
	c, err := d.CreateVolume(ctx, &csipb.CreateVolumeRequest{Name: "clone", VolumeCapabilities: []*csipb.VolumeCapability{mountCap("ext4", csipb.VolumeCapability_AccessMode_SINGLE_NODE_WRITER)},
		VolumeContentSource: &csipb.VolumeContentSource{Type: &csipb.VolumeContentSource_Volume{Volume: &csipb.VolumeContentSource_VolumeSource{VolumeId: src.GetVolume().GetVolumeId()}}}})
	if err != nil {
		t.Fatal(err)
	}
	if got := c.GetVolume().GetCapacityBytes(); got != 64<<20 {
		t.Errorf("clone without a size has %d bytes, want its source's %d", got, 64<<20)
	}
}

// A request missing a field the spec requires is InvalidArgument naming
// the field, and changes nothing.
func TestControllerRequiredFields(t *testing.T) {
	e := newDriverEnv(t)
	vol := e.createVolume("vol").GetVolumeId()
	noAccessType := &csipb.VolumeCapability{AccessMode: &csipb.VolumeCapability_AccessMode{Mode: rwo}}
	noMode := &csipb.VolumeCapability{AccessType: &csipb.VolumeCapability_Mount{Mount: &csipb.VolumeCapability_MountVolume{}}}
	caps := []*csipb.VolumeCapability{fsCap}
	type R = badCase
	cases := []badCase{
		R{"CreateVolume/name", func(ctx context.Context, d *Driver) error {
			return ignore(d.CreateVolume(ctx, &csipb.CreateVolumeRequest{VolumeCapabilities: caps}))
		}, codes.InvalidArgument, []string{"name"}},
		R{"CreateVolume/name too long", func(ctx context.Context, d *Driver) error {
			return ignore(d.CreateVolume(ctx, &csipb.CreateVolumeRequest{Name: strings.Repeat("n", 129), VolumeCapabilities: caps}))
		}, codes.InvalidArgument, []string{"name"}},
		R{"CreateVolume/volume_capabilities", func(ctx context.Context, d *Driver) error {
			return ignore(d.CreateVolume(ctx, &csipb.CreateVolumeRequest{Name: "new"}))
		}, codes.InvalidArgument, []string{"volume_capabilities"}},
		R{"CreateVolume/access_mode", func(ctx context.Context, d *Driver) error {
			return ignore(d.CreateVolume(ctx, &csipb.CreateVolumeRequest{Name: "new", VolumeCapabilities: []*csipb.VolumeCapability{noMode}}))
		}, codes.InvalidArgument, []string{"volume_capabilities[0].access_mode"}},
		R{"CreateVolume/access_type", func(ctx context.Context, d *Driver) error {
			return ignore(d.CreateVolume(ctx, &csipb.CreateVolumeRequest{Name: "new", VolumeCapabilities: []*csipb.VolumeCapability{noAccessType}}))
		}, codes.InvalidArgument, []string{"volume_capabilities[0]", "mount or block"}},
		R{"CreateVolume/snapshot_id", func(ctx context.Context, d *Driver) error {
			return ignore(d.CreateVolume(ctx, &csipb.CreateVolumeRequest{Name: "new", VolumeCapabilities: caps,
				VolumeContentSource: &csipb.VolumeContentSource{Type: &csipb.VolumeContentSource_Snapshot{Snapshot: &csipb.VolumeContentSource_SnapshotSource{}}}}))
		}, codes.InvalidArgument, []string{"volume_content_source.snapshot.snapshot_id"}},
		R{"CreateVolume/source volume_id", func(ctx context.Context, d *Driver) error {
			return ignore(d.CreateVolume(ctx, &csipb.CreateVolumeRequest{Name: "new", VolumeCapabilities: caps,
				VolumeContentSource: &csipb.VolumeContentSource{Type: &csipb.VolumeContentSource_Volume{Volume: &csipb.VolumeContentSource_VolumeSource{}}}}))
		}, codes.InvalidArgument, []string{"volume_content_source.volume.volume_id"}},
		R{"DeleteVolume/volume_id", func(ctx context.Context, d *Driver) error {
			return ignore(d.DeleteVolume(ctx, &csipb.DeleteVolumeRequest{}))
		}, codes.InvalidArgument, []string{"volume_id"}},
		R{"ValidateVolumeCapabilities/volume_id", func(ctx context.Context, d *Driver) error {
			return ignore(d.ValidateVolumeCapabilities(ctx, &csipb.ValidateVolumeCapabilitiesRequest{VolumeCapabilities: caps}))
		}, codes.InvalidArgument, []string{"volume_id"}},
		R{"ValidateVolumeCapabilities/volume_capabilities", func(ctx context.Context, d *Driver) error {
			return ignore(d.ValidateVolumeCapabilities(ctx, &csipb.ValidateVolumeCapabilitiesRequest{VolumeId: vol}))
		}, codes.InvalidArgument, []string{"volume_capabilities"}},
		// A missing field is InvalidArgument even when the ID is not ours.
		R{"ValidateVolumeCapabilities/volume_capabilities, bad ID", func(ctx context.Context, d *Driver) error {
			return ignore(d.ValidateVolumeCapabilities(ctx, &csipb.ValidateVolumeCapabilitiesRequest{VolumeId: "not-an-id"}))
		}, codes.InvalidArgument, []string{"volume_capabilities"}},
		R{"ControllerGetVolume/volume_id", func(ctx context.Context, d *Driver) error {
			return ignore(d.ControllerGetVolume(ctx, &csipb.ControllerGetVolumeRequest{}))
		}, codes.InvalidArgument, []string{"volume_id"}},
		R{"ControllerGetVolumeHealth/volume_id", func(ctx context.Context, d *Driver) error {
			return ignore(d.ControllerGetVolumeHealth(ctx, &csipb.ControllerGetVolumeHealthRequest{}))
		}, codes.InvalidArgument, []string{"volume_id"}},
		R{"CreateSnapshot/name", func(ctx context.Context, d *Driver) error {
			return ignore(d.CreateSnapshot(ctx, &csipb.CreateSnapshotRequest{SourceVolumeId: vol}))
		}, codes.InvalidArgument, []string{"name"}},
		R{"CreateSnapshot/source_volume_id", func(ctx context.Context, d *Driver) error {
			return ignore(d.CreateSnapshot(ctx, &csipb.CreateSnapshotRequest{Name: "snap"}))
		}, codes.InvalidArgument, []string{"source_volume_id"}},
		R{"DeleteSnapshot/snapshot_id", func(ctx context.Context, d *Driver) error {
			return ignore(d.DeleteSnapshot(ctx, &csipb.DeleteSnapshotRequest{}))
		}, codes.InvalidArgument, []string{"snapshot_id"}},
		R{"GetSnapshot/snapshot_id", func(ctx context.Context, d *Driver) error {
			return ignore(d.GetSnapshot(ctx, &csipb.GetSnapshotRequest{}))
		}, codes.InvalidArgument, []string{"snapshot_id"}},
	}
	runBadCases(t, e, cases)
}

func TestControllerUnknownIDs(t *testing.T) {
	e := newDriverEnv(t)
	vol := e.createVolume("vol").GetVolumeId()
	snap := e.createSnapshot("snap", vol).GetSnapshotId()
	ids := map[string]string{
		"malformed":    "not-an-id",
		"empty name":   testPool + "/",
		"bad pool":     "Pool!/vol",
		"unknown pool": "gamma/vol",
		"unknown name": testPool + "/missing",
		"nested":       testPool + "/a/b/c",
		// A snapshot ID naming another node: that node's, not this one's.
		"other node's": "node-b/" + testPool + "/snap",
	}
	var cases []badCase
	for what, id := range ids {
		// Deleting what does not exist succeeds; a snapshot on another
		// node exists there, and success would have it forgotten.
		deleteSnapshot := codes.OK
		if what == "other node's" {
			deleteSnapshot = codes.FailedPrecondition
		}
		cases = append(cases,
			badCase{"ControllerGetVolume/" + what, func(ctx context.Context, d *Driver) error {
				return ignore(d.ControllerGetVolume(ctx, &csipb.ControllerGetVolumeRequest{VolumeId: id}))
			}, codes.NotFound, nil},
			badCase{"ValidateVolumeCapabilities/" + what, func(ctx context.Context, d *Driver) error {
				return ignore(d.ValidateVolumeCapabilities(ctx, &csipb.ValidateVolumeCapabilitiesRequest{VolumeId: id, VolumeCapabilities: []*csipb.VolumeCapability{fsCap}}))
			}, codes.NotFound, nil},
			badCase{"ControllerGetVolumeHealth/" + what, func(ctx context.Context, d *Driver) error {
				return ignore(d.ControllerGetVolumeHealth(ctx, &csipb.ControllerGetVolumeHealthRequest{VolumeId: id}))
			}, codes.NotFound, nil},
			badCase{"CreateSnapshot/" + what, func(ctx context.Context, d *Driver) error {
				return ignore(d.CreateSnapshot(ctx, &csipb.CreateSnapshotRequest{Name: "s2", SourceVolumeId: id}))
			}, codes.NotFound, nil},
			badCase{"CreateVolume from snapshot/" + what, func(ctx context.Context, d *Driver) error {
				return ignore(d.CreateVolume(ctx, &csipb.CreateVolumeRequest{Name: "v2", VolumeCapabilities: []*csipb.VolumeCapability{fsCap},
					VolumeContentSource: &csipb.VolumeContentSource{Type: &csipb.VolumeContentSource_Snapshot{Snapshot: &csipb.VolumeContentSource_SnapshotSource{SnapshotId: id}}}}))
			}, codes.NotFound, nil},
			badCase{"CreateVolume from volume/" + what, func(ctx context.Context, d *Driver) error {
				return ignore(d.CreateVolume(ctx, &csipb.CreateVolumeRequest{Name: "v2", VolumeCapabilities: []*csipb.VolumeCapability{fsCap},
					VolumeContentSource: &csipb.VolumeContentSource{Type: &csipb.VolumeContentSource_Volume{Volume: &csipb.VolumeContentSource_VolumeSource{VolumeId: id}}}}))
			}, codes.NotFound, nil},
			badCase{"GetSnapshot/" + what, func(ctx context.Context, d *Driver) error {
				return ignore(d.GetSnapshot(ctx, &csipb.GetSnapshotRequest{SnapshotId: id}))
			}, codes.NotFound, nil},
			// Deleting what does not exist succeeds.
			badCase{"DeleteVolume/" + what, func(ctx context.Context, d *Driver) error {
				return ignore(d.DeleteVolume(ctx, &csipb.DeleteVolumeRequest{VolumeId: id}))
			}, codes.OK, nil},
			badCase{"DeleteSnapshot/" + what, func(ctx context.Context, d *Driver) error {
				return ignore(d.DeleteSnapshot(ctx, &csipb.DeleteSnapshotRequest{SnapshotId: id}))
			}, deleteSnapshot, nil},
		)
	}
	// A snapshot is not a volume, nor the other way round.
	cases = append(cases,
		badCase{"ControllerGetVolume/a snapshot", func(ctx context.Context, d *Driver) error {
			return ignore(d.ControllerGetVolume(ctx, &csipb.ControllerGetVolumeRequest{VolumeId: snap}))
		}, codes.NotFound, []string{"snapshot"}},
		badCase{"CreateSnapshot/of a snapshot", func(ctx context.Context, d *Driver) error {
			return ignore(d.CreateSnapshot(ctx, &csipb.CreateSnapshotRequest{Name: "s2", SourceVolumeId: snap}))
		}, codes.NotFound, []string{"snapshot"}},
		badCase{"CreateVolume/volume source is a snapshot", func(ctx context.Context, d *Driver) error {
			return ignore(d.CreateVolume(ctx, &csipb.CreateVolumeRequest{Name: "v2", VolumeCapabilities: []*csipb.VolumeCapability{fsCap},
				VolumeContentSource: &csipb.VolumeContentSource{Type: &csipb.VolumeContentSource_Volume{Volume: &csipb.VolumeContentSource_VolumeSource{VolumeId: snap}}}}))
		}, codes.NotFound, nil},
		badCase{"GetSnapshot/a volume", func(ctx context.Context, d *Driver) error {
			return ignore(d.GetSnapshot(ctx, &csipb.GetSnapshotRequest{SnapshotId: vol}))
		}, codes.NotFound, []string{"volume"}},
		badCase{"DeleteVolume/a snapshot", func(ctx context.Context, d *Driver) error {
			return ignore(d.DeleteVolume(ctx, &csipb.DeleteVolumeRequest{VolumeId: snap}))
		}, codes.NotFound, []string{"snapshot"}},
		badCase{"DeleteSnapshot/a volume", func(ctx context.Context, d *Driver) error {
			return ignore(d.DeleteSnapshot(ctx, &csipb.DeleteSnapshotRequest{SnapshotId: vol}))
		}, codes.NotFound, []string{"volume"}},
	)
	runBadCases(t, e, cases)
}

func TestParameters(t *testing.T) {
	e := newDriverEnv(t)
	vol := e.createVolume("vol").GetVolumeId()
	caps := []*csipb.VolumeCapability{fsCap}
	runBadCases(t, e, []badCase{
		{"CreateVolume/unknown", func(ctx context.Context, d *Driver) error {
			return ignore(d.CreateVolume(ctx, &csipb.CreateVolumeRequest{Name: "new", VolumeCapabilities: caps, Parameters: map[string]string{"thinness": "very"}}))
		}, codes.InvalidArgument, []string{"parameters.thinness"}},
		{"CreateVolume/fsType", func(ctx context.Context, d *Driver) error {
			return ignore(d.CreateVolume(ctx, &csipb.CreateVolumeRequest{Name: "new", VolumeCapabilities: caps, Parameters: map[string]string{ParamFSType: "btrfs"}}))
		}, codes.InvalidArgument, []string{"parameters.fsType", "btrfs"}},
		{"CreateVolume/pool", func(ctx context.Context, d *Driver) error {
			return ignore(d.CreateVolume(ctx, &csipb.CreateVolumeRequest{Name: "new", VolumeCapabilities: caps, Parameters: map[string]string{ParamPool: "gamma"}}))
		}, codes.InvalidArgument, []string{"parameters.pool", "gamma"}},
		{"CreateVolume/restorePlacement", func(ctx context.Context, d *Driver) error {
			return ignore(d.CreateVolume(ctx, &csipb.CreateVolumeRequest{Name: "new", VolumeCapabilities: caps, Parameters: map[string]string{ParamRestorePlacement: "elsewhere"}}))
		}, codes.InvalidArgument, []string{"parameters.restorePlacement", "elsewhere", RestoreOnAnyNode}},
		{"CreateVolume/capability fs_type", func(ctx context.Context, d *Driver) error {
			return ignore(d.CreateVolume(ctx, &csipb.CreateVolumeRequest{Name: "new", VolumeCapabilities: []*csipb.VolumeCapability{mountCap("ntfs", rwo)}}))
		}, codes.InvalidArgument, []string{"volume_capabilities[0].mount.fs_type", "ntfs"}},
		{"GetCapacity/unknown", func(ctx context.Context, d *Driver) error {
			return ignore(d.GetCapacity(ctx, &csipb.GetCapacityRequest{Parameters: map[string]string{"thinness": "very"}}))
		}, codes.InvalidArgument, []string{"parameters.thinness"}},
		{"GetCapacity/pool", func(ctx context.Context, d *Driver) error {
			return ignore(d.GetCapacity(ctx, &csipb.GetCapacityRequest{Parameters: map[string]string{ParamPool: "gamma"}}))
		}, codes.InvalidArgument, []string{"parameters.pool"}},
		{"CreateSnapshot/unknown", func(ctx context.Context, d *Driver) error {
			return ignore(d.CreateSnapshot(ctx, &csipb.CreateSnapshotRequest{Name: "snap", SourceVolumeId: vol, Parameters: map[string]string{"retain": "yes"}}))
		}, codes.InvalidArgument, []string{"parameters.retain"}},
	})

	// The provisioner's extra metadata is accepted and ignored, and the
	// pool and fsType parameters are honoured.
	resp, err := e.d.CreateVolume(t.Context(), &csipb.CreateVolumeRequest{
		Name: "in-beta", VolumeCapabilities: caps, CapacityRange: &csipb.CapacityRange{RequiredBytes: testVolBytes},
		Parameters: map[string]string{ParamPool: otherPool, ParamFSType: "xfs", ParamRestorePlacement: RestoreOnAnyNode, "csi.storage.k8s.io/pvc/name": "data"},
	})
	if err != nil {
		t.Fatal(err)
	}
	if got := resp.GetVolume(); got.GetVolumeId() != otherPool+"/in-beta" || got.GetVolumeContext()[ParamFSType] != "xfs" || got.GetVolumeContext()[ParamPool] != otherPool {
		t.Errorf("volume %v", got)
	}
	if _, err := e.pools[otherPool].Get("in-beta"); err != nil {
		t.Errorf("not in pool %s: %v", otherPool, err)
	}

	// ValidateVolumeCapabilities answers with a message, not an error, for
	// what it cannot confirm.
	for name, req := range map[string]*csipb.ValidateVolumeCapabilitiesRequest{
		"parameter":  {VolumeId: vol, VolumeCapabilities: caps, Parameters: map[string]string{"thinness": "very"}},
		"multi-node": {VolumeId: vol, VolumeCapabilities: []*csipb.VolumeCapability{mountCap("", csipb.VolumeCapability_AccessMode_MULTI_NODE_MULTI_WRITER)}},
		"fs_type":    {VolumeId: vol, VolumeCapabilities: []*csipb.VolumeCapability{mountCap("zfs", rwo)}},
	} {
		resp, err := e.d.ValidateVolumeCapabilities(t.Context(), req)
		if err != nil || resp.GetConfirmed() != nil || resp.GetMessage() == "" {
			t.Errorf("%s: confirmed %v, message %q, err %v", name, resp.GetConfirmed(), resp.GetMessage(), err)
		}
	}
	resp2, err := e.d.ValidateVolumeCapabilities(t.Context(), &csipb.ValidateVolumeCapabilitiesRequest{VolumeId: vol, VolumeCapabilities: []*csipb.VolumeCapability{fsCap, blockCap(rox)}})
	if err != nil || resp2.GetConfirmed() == nil {
		t.Errorf("supported capabilities not confirmed: %v, %v", resp2, err)
	}
}

func TestControllerMultiNodeAccessModes(t *testing.T) {
	e := newDriverEnv(t)
	var cases []badCase
	for _, m := range []csipb.VolumeCapability_AccessMode_Mode{
		csipb.VolumeCapability_AccessMode_MULTI_NODE_READER_ONLY,
		csipb.VolumeCapability_AccessMode_MULTI_NODE_SINGLE_WRITER,
		csipb.VolumeCapability_AccessMode_MULTI_NODE_MULTI_WRITER,
		csipb.VolumeCapability_AccessMode_UNKNOWN,
	} {
		for kind, c := range map[string]*csipb.VolumeCapability{"mount": mountCap("", m), "block": blockCap(m)} {
			name := m.String() + "/" + kind
			cases = append(cases,
				badCase{"CreateVolume/" + name, func(ctx context.Context, d *Driver) error {
					return ignore(d.CreateVolume(ctx, &csipb.CreateVolumeRequest{Name: "new", VolumeCapabilities: []*csipb.VolumeCapability{fsCap, c}}))
				}, codes.InvalidArgument, []string{"volume_capabilities[1].access_mode", m.String()}},
			)
		}
	}
	runBadCases(t, e, cases)

	// GetCapacity for a capability the driver cannot serve is 0, not an
	// error (the CO asks per StorageClass).
	resp, err := e.d.GetCapacity(t.Context(), &csipb.GetCapacityRequest{VolumeCapabilities: []*csipb.VolumeCapability{mountCap("", csipb.VolumeCapability_AccessMode_MULTI_NODE_MULTI_WRITER)}})
	if err != nil || resp.GetAvailableCapacity() != 0 {
		t.Errorf("GetCapacity for MULTI_NODE: %v, %v", resp, err)
	}
}
