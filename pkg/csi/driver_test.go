package csi

import (
	"context"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"

	csipb "github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	"github.com/csi-dmthin/csi-dmthin/pkg/thinpool"
)

// The driver over real thinpool.Pools on a FakeKernel and the fake FS, on
// the host under -race. Handlers are called directly; sanity_test.go goes
// through gRPC.

const (
	testNode      = "node-a"
	testPool      = "alpha" // the default pool
	otherPool     = "beta"
	testPoolBytes = 256 << 20
	testVolBytes  = 16 << 20
)

// driverEnv is a Driver with its fake kernel, pools and FS.
type driverEnv struct {
	t          *testing.T
	k          *thinpool.FakeKernel
	fs         *fakeFS
	d          *Driver
	pools      map[string]*thinpool.Pool
	kubeletDir string
}

// poolOpt adjusts a pool's Config before it is opened.
type poolOpt func(*thinpool.Config)

// newDriverEnv opens the pools testPool and otherPool on a fresh fake kernel
// (opts apply to testPool) and makes a Driver over them. It keeps no
// formatted templates, whose background builds would change the pools
// under tests that compare their state; templates_test.go turns them on.
func newDriverEnv(t *testing.T, opts ...poolOpt) *driverEnv {
	t.Helper()
	return newDriverEnvTemplates(t, -1, opts...)
}

func newDriverEnvTemplates(t *testing.T, templates int, opts ...poolOpt) *driverEnv {
	t.Helper()
	k := thinpool.NewFakeKernel()
	e := &driverEnv{t: t, k: k, fs: newFakeFS(k), pools: map[string]*thinpool.Pool{}, kubeletDir: t.TempDir()}
	pools := map[string]Pool{}
	for _, name := range []string{testPool, otherPool} {
		cfg := loopPoolConfig(t.TempDir(), name, testPoolBytes)
		if name == testPool {
			for _, o := range opts {
				o(&cfg)
			}
		}
		p, err := thinpool.Open(t.Context(), cfg, k)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = p.Close() })
		e.pools[name] = p
		pools[name] = p
	}
	d, err := New(Options{NodeID: testNode, Version: "test", Pools: pools, DefaultPool: testPool, KubeletDir: e.kubeletDir, FS: e.fs, Templates: templates})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(d.templates.stop)
	e.d = d
	return e
}

// leftovers waits for d's template builds and returns what p holds besides
// sealed templates, which stay by design (templates.go).
func leftovers(d *Driver, p Pool) []thinpool.Volume {
	d.templates.stop()
	var left []thinpool.Volume
	for _, v := range p.List() {
		if v.Kind != thinpool.KindTemplate || !v.Sealed {
			left = append(left, v)
		}
	}
	return left
}

// loopPoolConfig is a pool on sparse loop files in dir.
func loopPoolConfig(dir, name string, dataBytes int64) thinpool.Config {
	return thinpool.Config{
		Name: name, StateDir: filepath.Join(dir, "state"),
		DataFile: filepath.Join(dir, "data"), MetadataFile: filepath.Join(dir, "meta"),
		DataFileBytes: dataBytes,
	}
}

func mountCap(fsType string, mode csipb.VolumeCapability_AccessMode_Mode) *csipb.VolumeCapability {
	return &csipb.VolumeCapability{
		AccessType: &csipb.VolumeCapability_Mount{Mount: &csipb.VolumeCapability_MountVolume{FsType: fsType}},
		AccessMode: &csipb.VolumeCapability_AccessMode{Mode: mode},
	}
}

func blockCap(mode csipb.VolumeCapability_AccessMode_Mode) *csipb.VolumeCapability {
	return &csipb.VolumeCapability{
		AccessType: &csipb.VolumeCapability_Block{Block: &csipb.VolumeCapability_BlockVolume{}},
		AccessMode: &csipb.VolumeCapability_AccessMode{Mode: mode},
	}
}

const (
	rwo = csipb.VolumeCapability_AccessMode_SINGLE_NODE_WRITER
	rox = csipb.VolumeCapability_AccessMode_SINGLE_NODE_READER_ONLY
)

var fsCap = mountCap("", rwo)

// path returns a path in the kubelet directory.
func (e *driverEnv) path(elem ...string) string {
	return filepath.Join(append([]string{e.kubeletDir}, elem...)...)
}

// createVolume makes a volume of testVolBytes in the default pool.
func (e *driverEnv) createVolume(name string) *csipb.Volume {
	e.t.Helper()
	resp, err := e.d.CreateVolume(e.t.Context(), &csipb.CreateVolumeRequest{
		Name: name, CapacityRange: &csipb.CapacityRange{RequiredBytes: testVolBytes},
		VolumeCapabilities: []*csipb.VolumeCapability{fsCap},
	})
	if err != nil {
		e.t.Fatalf("CreateVolume %s: %v", name, err)
	}
	return resp.GetVolume()
}

func (e *driverEnv) createSnapshot(name, source string) *csipb.Snapshot {
	e.t.Helper()
	resp, err := e.d.CreateSnapshot(e.t.Context(), &csipb.CreateSnapshotRequest{Name: name, SourceVolumeId: source})
	if err != nil {
		e.t.Fatalf("CreateSnapshot %s: %v", name, err)
	}
	return resp.GetSnapshot()
}

// dev returns the dm device of an active volume, by ID.
func (e *driverEnv) dev(volumeID string) thinpool.Dev {
	e.t.Helper()
	pool, name, _ := strings.Cut(volumeID, "/")
	info, err := e.k.InfoByName("dmthin-" + pool + "-" + name)
	if err != nil {
		e.t.Fatalf("volume %s is not active: %v", volumeID, err)
	}
	return info.Dev
}

// write writes through the volume's device, activating it.
func (e *driverEnv) write(volumeID string, off int64, b []byte) {
	e.t.Helper()
	pool, name, _ := strings.Cut(volumeID, "/")
	if _, err := e.pools[pool].Activate(e.t.Context(), name); err != nil {
		e.t.Fatal(err)
	}
	if err := e.k.WriteData(e.dev(volumeID), off, b); err != nil {
		e.t.Fatal(err)
	}
}

func (e *driverEnv) read(volumeID string, off int64, n int) []byte {
	e.t.Helper()
	pool, name, _ := strings.Cut(volumeID, "/")
	if _, err := e.pools[pool].Activate(e.t.Context(), name); err != nil {
		e.t.Fatal(err)
	}
	b := make([]byte, n)
	if err := e.k.ReadData(e.dev(volumeID), off, b); err != nil {
		e.t.Fatal(err)
	}
	return b
}

// state is everything a request can change: the pools' records, the dm
// devices, the mount table and the files under the kubelet directory.
func (e *driverEnv) state() string {
	e.t.Helper()
	var b strings.Builder
	names := make([]string, 0, len(e.pools))
	for n := range e.pools {
		names = append(names, n)
	}
	sort.Strings(names)
	for _, n := range names {
		fmt.Fprintf(&b, "pool %s: %+v\n", n, e.pools[n].List())
	}
	for _, d := range e.k.Devices() {
		fmt.Fprintf(&b, "dm %s %s live=%v suspended=%v open=%d\n", d.Name, d.Dev, d.LiveTable, d.Suspended, d.OpenCount)
	}
	for _, p := range e.fs.mountPoints() {
		fmt.Fprintf(&b, "mount %s %+v\n", p, e.fs.mountTable()[p])
	}
	_ = filepath.WalkDir(e.kubeletDir, func(p string, d os.DirEntry, err error) error {
		if err == nil {
			fmt.Fprintf(&b, "file %s %v\n", p, d.Type())
		}
		return err
	})
	return b.String()
}

// wantCode checks a call's gRPC code and, for an error, that its message
// contains every one of words.
func wantCode(t *testing.T, err error, want codes.Code, words ...string) {
	t.Helper()
	if got := status.Code(err); got != want {
		t.Fatalf("code %v (%v), want %v", got, err, want)
	}
	for _, w := range words {
		if !strings.Contains(status.Convert(err).Message(), w) {
			t.Errorf("message %q does not name %q", status.Convert(err).Message(), w)
		}
	}
}

// badCase is a request that must fail with code, naming words, and change
// nothing.
type badCase struct {
	name  string
	call  func(ctx context.Context, d *Driver) error
	code  codes.Code
	words []string
}

func runBadCases(t *testing.T, e *driverEnv, cases []badCase) {
	t.Helper()
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			before := e.state()
			err := tc.call(t.Context(), e.d)
			wantCode(t, err, tc.code, tc.words...)
			if after := e.state(); after != before {
				t.Errorf("the request changed the state:\nbefore:\n%s\nafter:\n%s", before, after)
			}
		})
	}
}

// ignore drops a response, keeping the error.
func ignore[T any](_ T, err error) error { return err }

func TestRequiredFields(t *testing.T) {
	e := newDriverEnv(t)
	vol := e.createVolume("vol").GetVolumeId()
	staging, target := e.path("staging", "vol"), e.path("pods", "p1", "vol")
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
		R{"NodeStageVolume/staging_target_path, bad ID", func(ctx context.Context, d *Driver) error {
			return ignore(d.NodeStageVolume(ctx, &csipb.NodeStageVolumeRequest{VolumeId: "not-an-id", VolumeCapability: fsCap}))
		}, codes.InvalidArgument, []string{"staging_target_path"}},
		R{"NodePublishVolume/volume_capability, bad ID", func(ctx context.Context, d *Driver) error {
			return ignore(d.NodePublishVolume(ctx, &csipb.NodePublishVolumeRequest{VolumeId: "not-an-id", TargetPath: target, StagingTargetPath: staging}))
		}, codes.InvalidArgument, []string{"volume_capability"}},
		R{"NodeGetVolumeStats/volume_path, bad ID", func(ctx context.Context, d *Driver) error {
			return ignore(d.NodeGetVolumeStats(ctx, &csipb.NodeGetVolumeStatsRequest{VolumeId: "not-an-id"}))
		}, codes.InvalidArgument, []string{"volume_path"}},
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
		R{"NodeStageVolume/volume_id", func(ctx context.Context, d *Driver) error {
			return ignore(d.NodeStageVolume(ctx, &csipb.NodeStageVolumeRequest{StagingTargetPath: staging, VolumeCapability: fsCap}))
		}, codes.InvalidArgument, []string{"volume_id"}},
		R{"NodeStageVolume/staging_target_path", func(ctx context.Context, d *Driver) error {
			return ignore(d.NodeStageVolume(ctx, &csipb.NodeStageVolumeRequest{VolumeId: vol, VolumeCapability: fsCap}))
		}, codes.InvalidArgument, []string{"staging_target_path"}},
		R{"NodeStageVolume/volume_capability", func(ctx context.Context, d *Driver) error {
			return ignore(d.NodeStageVolume(ctx, &csipb.NodeStageVolumeRequest{VolumeId: vol, StagingTargetPath: staging}))
		}, codes.InvalidArgument, []string{"volume_capability"}},
		R{"NodeStageVolume/access_mode", func(ctx context.Context, d *Driver) error {
			return ignore(d.NodeStageVolume(ctx, &csipb.NodeStageVolumeRequest{VolumeId: vol, StagingTargetPath: staging, VolumeCapability: noMode}))
		}, codes.InvalidArgument, []string{"volume_capability.access_mode"}},
		R{"NodeUnstageVolume/volume_id", func(ctx context.Context, d *Driver) error {
			return ignore(d.NodeUnstageVolume(ctx, &csipb.NodeUnstageVolumeRequest{StagingTargetPath: staging}))
		}, codes.InvalidArgument, []string{"volume_id"}},
		R{"NodeUnstageVolume/staging_target_path", func(ctx context.Context, d *Driver) error {
			return ignore(d.NodeUnstageVolume(ctx, &csipb.NodeUnstageVolumeRequest{VolumeId: vol}))
		}, codes.InvalidArgument, []string{"staging_target_path"}},
		R{"NodePublishVolume/volume_id", func(ctx context.Context, d *Driver) error {
			return ignore(d.NodePublishVolume(ctx, &csipb.NodePublishVolumeRequest{TargetPath: target, StagingTargetPath: staging, VolumeCapability: fsCap}))
		}, codes.InvalidArgument, []string{"volume_id"}},
		R{"NodePublishVolume/target_path", func(ctx context.Context, d *Driver) error {
			return ignore(d.NodePublishVolume(ctx, &csipb.NodePublishVolumeRequest{VolumeId: vol, StagingTargetPath: staging, VolumeCapability: fsCap}))
		}, codes.InvalidArgument, []string{"target_path"}},
		R{"NodePublishVolume/staging_target_path", func(ctx context.Context, d *Driver) error {
			return ignore(d.NodePublishVolume(ctx, &csipb.NodePublishVolumeRequest{VolumeId: vol, TargetPath: target, VolumeCapability: fsCap}))
		}, codes.InvalidArgument, []string{"staging_target_path"}},
		R{"NodePublishVolume/volume_capability", func(ctx context.Context, d *Driver) error {
			return ignore(d.NodePublishVolume(ctx, &csipb.NodePublishVolumeRequest{VolumeId: vol, TargetPath: target, StagingTargetPath: staging}))
		}, codes.InvalidArgument, []string{"volume_capability"}},
		R{"NodeUnpublishVolume/volume_id", func(ctx context.Context, d *Driver) error {
			return ignore(d.NodeUnpublishVolume(ctx, &csipb.NodeUnpublishVolumeRequest{TargetPath: target}))
		}, codes.InvalidArgument, []string{"volume_id"}},
		R{"NodeUnpublishVolume/target_path", func(ctx context.Context, d *Driver) error {
			return ignore(d.NodeUnpublishVolume(ctx, &csipb.NodeUnpublishVolumeRequest{VolumeId: vol}))
		}, codes.InvalidArgument, []string{"target_path"}},
		R{"NodeGetVolumeStats/volume_id", func(ctx context.Context, d *Driver) error {
			return ignore(d.NodeGetVolumeStats(ctx, &csipb.NodeGetVolumeStatsRequest{VolumePath: target}))
		}, codes.InvalidArgument, []string{"volume_id"}},
		R{"NodeGetVolumeStats/volume_path", func(ctx context.Context, d *Driver) error {
			return ignore(d.NodeGetVolumeStats(ctx, &csipb.NodeGetVolumeStatsRequest{VolumeId: vol}))
		}, codes.InvalidArgument, []string{"volume_path"}},
		R{"NodeExpandVolume/volume_id", func(ctx context.Context, d *Driver) error {
			return ignore(d.NodeExpandVolume(ctx, &csipb.NodeExpandVolumeRequest{VolumePath: target}))
		}, codes.InvalidArgument, []string{"volume_id"}},
		R{"NodeExpandVolume/volume_path", func(ctx context.Context, d *Driver) error {
			return ignore(d.NodeExpandVolume(ctx, &csipb.NodeExpandVolumeRequest{VolumeId: vol}))
		}, codes.InvalidArgument, []string{"volume_path"}},
		R{"NodeExpandVolume/access_mode", func(ctx context.Context, d *Driver) error {
			return ignore(d.NodeExpandVolume(ctx, &csipb.NodeExpandVolumeRequest{VolumeId: vol, VolumePath: target, VolumeCapability: noMode}))
		}, codes.InvalidArgument, []string{"volume_capability.access_mode"}},
		R{"NodeGetVolumeHealth/volume_id", func(ctx context.Context, d *Driver) error {
			return ignore(d.NodeGetVolumeHealth(ctx, &csipb.NodeGetVolumeHealthRequest{}))
		}, codes.InvalidArgument, []string{"volume_id"}},
	}
	runBadCases(t, e, cases)
}

func TestUnknownIDs(t *testing.T) {
	e := newDriverEnv(t)
	vol := e.createVolume("vol").GetVolumeId()
	snap := e.createSnapshot("snap", vol).GetSnapshotId()
	staging, target := e.path("staging", "x"), e.path("pods", "p1", "x")
	if err := os.MkdirAll(target, 0o750); err != nil {
		t.Fatal(err)
	}
	ids := map[string]string{
		"malformed":    "not-an-id",
		"empty name":   testPool + "/",
		"bad pool":     "Pool!/vol",
		"unknown pool": "gamma/vol",
		"unknown name": testPool + "/missing",
		"nested":       testPool + "/a/b",
	}
	var cases []badCase
	for what, id := range ids {
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
			badCase{"NodeStageVolume/" + what, func(ctx context.Context, d *Driver) error {
				return ignore(d.NodeStageVolume(ctx, &csipb.NodeStageVolumeRequest{VolumeId: id, StagingTargetPath: staging, VolumeCapability: fsCap}))
			}, codes.NotFound, nil},
			badCase{"NodePublishVolume/" + what, func(ctx context.Context, d *Driver) error {
				return ignore(d.NodePublishVolume(ctx, &csipb.NodePublishVolumeRequest{VolumeId: id, StagingTargetPath: staging, TargetPath: target, VolumeCapability: fsCap}))
			}, codes.NotFound, nil},
			badCase{"NodeGetVolumeStats/" + what, func(ctx context.Context, d *Driver) error {
				return ignore(d.NodeGetVolumeStats(ctx, &csipb.NodeGetVolumeStatsRequest{VolumeId: id, VolumePath: target}))
			}, codes.NotFound, nil},
			badCase{"NodeExpandVolume/" + what, func(ctx context.Context, d *Driver) error {
				return ignore(d.NodeExpandVolume(ctx, &csipb.NodeExpandVolumeRequest{VolumeId: id, VolumePath: target}))
			}, codes.NotFound, nil},
			badCase{"NodeGetVolumeHealth/" + what, func(ctx context.Context, d *Driver) error {
				return ignore(d.NodeGetVolumeHealth(ctx, &csipb.NodeGetVolumeHealthRequest{VolumeId: id}))
			}, codes.NotFound, nil},
			// Deleting what does not exist succeeds.
			badCase{"DeleteVolume/" + what, func(ctx context.Context, d *Driver) error {
				return ignore(d.DeleteVolume(ctx, &csipb.DeleteVolumeRequest{VolumeId: id}))
			}, codes.OK, nil},
			badCase{"DeleteSnapshot/" + what, func(ctx context.Context, d *Driver) error {
				return ignore(d.DeleteSnapshot(ctx, &csipb.DeleteSnapshotRequest{SnapshotId: id}))
			}, codes.OK, nil},
		)
	}
	// A snapshot is not a volume, nor the other way round.
	cases = append(cases,
		badCase{"ControllerGetVolume/a snapshot", func(ctx context.Context, d *Driver) error {
			return ignore(d.ControllerGetVolume(ctx, &csipb.ControllerGetVolumeRequest{VolumeId: snap}))
		}, codes.NotFound, []string{"snapshot"}},
		badCase{"NodeStageVolume/a snapshot", func(ctx context.Context, d *Driver) error {
			return ignore(d.NodeStageVolume(ctx, &csipb.NodeStageVolumeRequest{VolumeId: snap, StagingTargetPath: staging, VolumeCapability: fsCap}))
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
		Parameters: map[string]string{ParamPool: otherPool, ParamFSType: "xfs", "csi.storage.k8s.io/pvc/name": "data"},
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

func TestPathsOutsideKubeletDir(t *testing.T) {
	e := newDriverEnv(t)
	vol := e.createVolume("vol").GetVolumeId()
	outside := t.TempDir() // exists, and must stay untouched
	good := e.path("pods", "p", "vol")
	bad := map[string]string{
		"elsewhere":   filepath.Join(outside, "x"),
		"dot-dot":     e.kubeletDir + "/../" + filepath.Base(outside) + "/x",
		"relative":    "pods/p/vol",
		"kubelet dir": e.kubeletDir,
		"prefix":      e.kubeletDir + "-other/x",
	}
	var cases []badCase
	for what, p := range bad {
		cases = append(cases,
			badCase{"NodeStageVolume/" + what, func(ctx context.Context, d *Driver) error {
				return ignore(d.NodeStageVolume(ctx, &csipb.NodeStageVolumeRequest{VolumeId: vol, StagingTargetPath: p, VolumeCapability: fsCap}))
			}, codes.InvalidArgument, []string{"staging_target_path"}},
			badCase{"NodeUnstageVolume/" + what, func(ctx context.Context, d *Driver) error {
				return ignore(d.NodeUnstageVolume(ctx, &csipb.NodeUnstageVolumeRequest{VolumeId: vol, StagingTargetPath: p}))
			}, codes.InvalidArgument, []string{"staging_target_path"}},
			badCase{"NodePublishVolume target/" + what, func(ctx context.Context, d *Driver) error {
				return ignore(d.NodePublishVolume(ctx, &csipb.NodePublishVolumeRequest{VolumeId: vol, TargetPath: p, StagingTargetPath: good, VolumeCapability: fsCap}))
			}, codes.InvalidArgument, []string{"target_path"}},
			badCase{"NodePublishVolume staging/" + what, func(ctx context.Context, d *Driver) error {
				return ignore(d.NodePublishVolume(ctx, &csipb.NodePublishVolumeRequest{VolumeId: vol, TargetPath: good, StagingTargetPath: p, VolumeCapability: fsCap}))
			}, codes.InvalidArgument, []string{"staging_target_path"}},
			badCase{"NodeUnpublishVolume/" + what, func(ctx context.Context, d *Driver) error {
				return ignore(d.NodeUnpublishVolume(ctx, &csipb.NodeUnpublishVolumeRequest{VolumeId: vol, TargetPath: p}))
			}, codes.InvalidArgument, []string{"target_path"}},
			// volume_path is only looked at, and a path that cannot hold a
			// volume is the spec's NotFound (csi-sanity sends "some/path").
			badCase{"NodeGetVolumeStats/" + what, func(ctx context.Context, d *Driver) error {
				return ignore(d.NodeGetVolumeStats(ctx, &csipb.NodeGetVolumeStatsRequest{VolumeId: vol, VolumePath: p}))
			}, codes.NotFound, []string{"volume_path"}},
			badCase{"NodeExpandVolume/" + what, func(ctx context.Context, d *Driver) error {
				return ignore(d.NodeExpandVolume(ctx, &csipb.NodeExpandVolumeRequest{VolumeId: vol, VolumePath: p,
					CapacityRange: &csipb.CapacityRange{RequiredBytes: 2 * testVolBytes}}))
			}, codes.NotFound, []string{"volume_path"}},
		)
	}
	runBadCases(t, e, cases)
	if entries, err := os.ReadDir(outside); err != nil || len(entries) != 0 {
		t.Errorf("outside directory touched: %v, %v", entries, err)
	}
}

func TestMultiNodeAccessModes(t *testing.T) {
	e := newDriverEnv(t)
	vol := e.createVolume("vol").GetVolumeId()
	staging, target := e.path("staging", "vol"), e.path("pods", "p", "vol")
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
				badCase{"NodeStageVolume/" + name, func(ctx context.Context, d *Driver) error {
					return ignore(d.NodeStageVolume(ctx, &csipb.NodeStageVolumeRequest{VolumeId: vol, StagingTargetPath: staging, VolumeCapability: c}))
				}, codes.InvalidArgument, []string{"volume_capability.access_mode"}},
				badCase{"NodePublishVolume/" + name, func(ctx context.Context, d *Driver) error {
					return ignore(d.NodePublishVolume(ctx, &csipb.NodePublishVolumeRequest{VolumeId: vol, StagingTargetPath: staging, TargetPath: target, VolumeCapability: c}))
				}, codes.InvalidArgument, []string{"volume_capability.access_mode"}},
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

// Concurrent calls on one volume: the second finds the ID locked and gets
// Aborted at once. The fake FS holds the first call inside Mount until the
// test lets it go, so the overlap is certain, not a matter of timing.
func TestConcurrentCallsAborted(t *testing.T) {
	e := newDriverEnv(t)
	ctx := t.Context()
	vol := e.createVolume("vol").GetVolumeId()
	free := e.createVolume("free").GetVolumeId()
	staging := e.path("staging", "vol")

	entered, release := make(chan struct{}), make(chan struct{})
	e.fs.setMountHook(func(target string) error {
		if target == staging {
			close(entered)
			<-release
		}
		return nil
	})
	var wg sync.WaitGroup
	var firstErr error
	wg.Go(func() { firstErr = e.stage(vol, staging, fsCap, nil) })
	<-entered

	others := map[string]func() error{
		"NodeStageVolume": func() error { return e.stage(vol, e.path("staging", "again"), fsCap, nil) },
		"NodePublishVolume": func() error {
			return e.publish(vol, staging, e.path("pods", "p", "vol"), fsCap, false)
		},
		"NodeUnstageVolume":   func() error { return e.unstage(vol, staging) },
		"NodeUnpublishVolume": func() error { return e.unpublish(vol, e.path("pods", "p", "vol")) },
		"NodeExpandVolume": func() error {
			return ignore(e.d.NodeExpandVolume(ctx, &csipb.NodeExpandVolumeRequest{VolumeId: vol, VolumePath: staging}))
		},
		"DeleteVolume": func() error { return ignore(e.d.DeleteVolume(ctx, &csipb.DeleteVolumeRequest{VolumeId: vol})) },
		"CreateSnapshot": func() error {
			return ignore(e.d.CreateSnapshot(ctx, &csipb.CreateSnapshotRequest{Name: "s", SourceVolumeId: vol}))
		},
		"CreateVolume clone": func() error {
			return ignore(e.d.CreateVolume(ctx, &csipb.CreateVolumeRequest{Name: "c", VolumeCapabilities: []*csipb.VolumeCapability{fsCap},
				VolumeContentSource: &csipb.VolumeContentSource{Type: &csipb.VolumeContentSource_Volume{Volume: &csipb.VolumeContentSource_VolumeSource{VolumeId: vol}}}}))
		},
	}
	for name, call := range others {
		if err := call(); status.Code(err) != codes.Aborted {
			t.Errorf("%s while NodeStageVolume holds %s: %v, want Aborted", name, vol, err)
		}
	}
	// Other volumes are not held up.
	mustOK(t, "stage another volume", e.stage(free, e.path("staging", "free"), fsCap, nil))
	close(release)
	wg.Wait()
	mustOK(t, "the first NodeStageVolume", firstErr)
	e.fs.setMountHook(nil)
	if m := e.fs.mountTable()[staging]; m.FSType != defaultFS {
		t.Errorf("staging mount %+v", m)
	}
	// Released: the same calls go through.
	mustOK(t, "stage again", e.stage(vol, staging, fsCap, nil))
}

func TestStripSecrets(t *testing.T) {
	req := &csipb.CreateVolumeRequest{
		Name:               "pvc-1",
		Parameters:         map[string]string{"pool": "alpha"},
		Secrets:            map[string]string{"password": "hunter2"},
		VolumeCapabilities: []*csipb.VolumeCapability{fsCap},
	}
	orig := proto.Clone(req)
	got, ok := stripSecrets(req).(*csipb.CreateVolumeRequest)
	if !ok {
		t.Fatalf("stripSecrets returned %T", stripSecrets(req))
	}
	if len(got.GetSecrets()) != 0 {
		t.Errorf("secrets kept: %v", got.GetSecrets())
	}
	if strings.Contains(fmt.Sprint(got), "hunter2") {
		t.Errorf("the secret is printed: %v", got)
	}
	if got.GetName() != "pvc-1" || got.GetParameters()["pool"] != "alpha" || len(got.GetVolumeCapabilities()) != 1 {
		t.Errorf("other fields lost: %v", got)
	}
	if !proto.Equal(req, orig) {
		t.Errorf("the request was changed: %v", req)
	}

	for name, m := range map[string]proto.Message{
		"NodeStageVolume":   &csipb.NodeStageVolumeRequest{VolumeId: "a/b", Secrets: map[string]string{"k": "hunter2"}, VolumeContext: map[string]string{"c": "d"}},
		"NodePublishVolume": &csipb.NodePublishVolumeRequest{VolumeId: "a/b", Secrets: map[string]string{"k": "hunter2"}},
		"CreateSnapshot":    &csipb.CreateSnapshotRequest{Name: "s", Secrets: map[string]string{"k": "hunter2"}},
		"NodeExpandVolume":  &csipb.NodeExpandVolumeRequest{VolumeId: "a/b", Secrets: map[string]string{"k": "hunter2"}},
	} {
		before := proto.Clone(m)
		out := fmt.Sprint(stripSecrets(m))
		if strings.Contains(out, "hunter2") || !strings.Contains(out, "a/b") && name != "CreateSnapshot" {
			t.Errorf("%s: stripped %s", name, out)
		}
		if !proto.Equal(m, before) {
			t.Errorf("%s: the request was changed", name)
		}
	}
	// Not a message: passed through.
	if got := stripSecrets("plain"); got != "plain" {
		t.Errorf("stripSecrets(string) = %v", got)
	}
}

// Stop before ServeListener (a signal during start-up) must not leave a
// server that never stops.
func TestStopBeforeServe(t *testing.T) {
	e := newDriverEnv(t)
	e.d.Stop()
	l, err := net.Listen("unix", filepath.Join(t.TempDir(), "csi.sock"))
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- e.d.ServeListener(l) }()
	select {
	case err := <-done:
		if err != nil {
			t.Errorf("ServeListener after Stop: %v", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("ServeListener after Stop still serving")
	}
}
