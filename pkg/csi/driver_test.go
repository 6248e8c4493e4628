package csi

import (
	"bytes"
	"context"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"

	csi "github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	"github.com/csi-dmthin/csi-dmthin/pkg/devmapper"
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

func mountCap(fsType string, mode csi.VolumeCapability_AccessMode_Mode) *csi.VolumeCapability {
	return &csi.VolumeCapability{
		AccessType: &csi.VolumeCapability_Mount{Mount: &csi.VolumeCapability_MountVolume{FsType: fsType}},
		AccessMode: &csi.VolumeCapability_AccessMode{Mode: mode},
	}
}

func blockCap(mode csi.VolumeCapability_AccessMode_Mode) *csi.VolumeCapability {
	return &csi.VolumeCapability{
		AccessType: &csi.VolumeCapability_Block{Block: &csi.VolumeCapability_BlockVolume{}},
		AccessMode: &csi.VolumeCapability_AccessMode{Mode: mode},
	}
}

const (
	rwo = csi.VolumeCapability_AccessMode_SINGLE_NODE_WRITER
	rox = csi.VolumeCapability_AccessMode_SINGLE_NODE_READER_ONLY
)

var fsCap = mountCap("", rwo)

// path returns a path in the kubelet directory.
func (e *driverEnv) path(elem ...string) string {
	return filepath.Join(append([]string{e.kubeletDir}, elem...)...)
}

// createVolume makes a volume of testVolBytes in the default pool.
func (e *driverEnv) createVolume(name string) *csi.Volume {
	e.t.Helper()
	resp, err := e.d.CreateVolume(e.t.Context(), &csi.CreateVolumeRequest{
		Name: name, CapacityRange: &csi.CapacityRange{RequiredBytes: testVolBytes},
		VolumeCapabilities: []*csi.VolumeCapability{fsCap},
	})
	if err != nil {
		e.t.Fatalf("CreateVolume %s: %v", name, err)
	}
	return resp.GetVolume()
}

func (e *driverEnv) createSnapshot(name, source string) *csi.Snapshot {
	e.t.Helper()
	resp, err := e.d.CreateSnapshot(e.t.Context(), &csi.CreateSnapshotRequest{Name: name, SourceVolumeId: source})
	if err != nil {
		e.t.Fatalf("CreateSnapshot %s: %v", name, err)
	}
	return resp.GetSnapshot()
}

// dev returns the dm device of an active volume, by ID.
func (e *driverEnv) dev(volumeID string) devmapper.Dev {
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
	noAccessType := &csi.VolumeCapability{AccessMode: &csi.VolumeCapability_AccessMode{Mode: rwo}}
	noMode := &csi.VolumeCapability{AccessType: &csi.VolumeCapability_Mount{Mount: &csi.VolumeCapability_MountVolume{}}}
	caps := []*csi.VolumeCapability{fsCap}
	type R = badCase
	cases := []badCase{
		R{"CreateVolume/name", func(ctx context.Context, d *Driver) error {
			return ignore(d.CreateVolume(ctx, &csi.CreateVolumeRequest{VolumeCapabilities: caps}))
		}, codes.InvalidArgument, []string{"name"}},
		R{"CreateVolume/name too long", func(ctx context.Context, d *Driver) error {
			return ignore(d.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: strings.Repeat("n", 129), VolumeCapabilities: caps}))
		}, codes.InvalidArgument, []string{"name"}},
		R{"CreateVolume/volume_capabilities", func(ctx context.Context, d *Driver) error {
			return ignore(d.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: "new"}))
		}, codes.InvalidArgument, []string{"volume_capabilities"}},
		R{"CreateVolume/access_mode", func(ctx context.Context, d *Driver) error {
			return ignore(d.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: "new", VolumeCapabilities: []*csi.VolumeCapability{noMode}}))
		}, codes.InvalidArgument, []string{"volume_capabilities[0].access_mode"}},
		R{"CreateVolume/access_type", func(ctx context.Context, d *Driver) error {
			return ignore(d.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: "new", VolumeCapabilities: []*csi.VolumeCapability{noAccessType}}))
		}, codes.InvalidArgument, []string{"volume_capabilities[0]", "mount or block"}},
		R{"CreateVolume/snapshot_id", func(ctx context.Context, d *Driver) error {
			return ignore(d.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: "new", VolumeCapabilities: caps,
				VolumeContentSource: &csi.VolumeContentSource{Type: &csi.VolumeContentSource_Snapshot{Snapshot: &csi.VolumeContentSource_SnapshotSource{}}}}))
		}, codes.InvalidArgument, []string{"volume_content_source.snapshot.snapshot_id"}},
		R{"CreateVolume/source volume_id", func(ctx context.Context, d *Driver) error {
			return ignore(d.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: "new", VolumeCapabilities: caps,
				VolumeContentSource: &csi.VolumeContentSource{Type: &csi.VolumeContentSource_Volume{Volume: &csi.VolumeContentSource_VolumeSource{}}}}))
		}, codes.InvalidArgument, []string{"volume_content_source.volume.volume_id"}},
		R{"DeleteVolume/volume_id", func(ctx context.Context, d *Driver) error {
			return ignore(d.DeleteVolume(ctx, &csi.DeleteVolumeRequest{}))
		}, codes.InvalidArgument, []string{"volume_id"}},
		R{"ValidateVolumeCapabilities/volume_id", func(ctx context.Context, d *Driver) error {
			return ignore(d.ValidateVolumeCapabilities(ctx, &csi.ValidateVolumeCapabilitiesRequest{VolumeCapabilities: caps}))
		}, codes.InvalidArgument, []string{"volume_id"}},
		R{"ValidateVolumeCapabilities/volume_capabilities", func(ctx context.Context, d *Driver) error {
			return ignore(d.ValidateVolumeCapabilities(ctx, &csi.ValidateVolumeCapabilitiesRequest{VolumeId: vol}))
		}, codes.InvalidArgument, []string{"volume_capabilities"}},
		// A missing field is InvalidArgument even when the ID is not ours.
		R{"ValidateVolumeCapabilities/volume_capabilities, bad ID", func(ctx context.Context, d *Driver) error {
			return ignore(d.ValidateVolumeCapabilities(ctx, &csi.ValidateVolumeCapabilitiesRequest{VolumeId: "not-an-id"}))
		}, codes.InvalidArgument, []string{"volume_capabilities"}},
		R{"NodeStageVolume/staging_target_path, bad ID", func(ctx context.Context, d *Driver) error {
			return ignore(d.NodeStageVolume(ctx, &csi.NodeStageVolumeRequest{VolumeId: "not-an-id", VolumeCapability: fsCap}))
		}, codes.InvalidArgument, []string{"staging_target_path"}},
		R{"NodePublishVolume/volume_capability, bad ID", func(ctx context.Context, d *Driver) error {
			return ignore(d.NodePublishVolume(ctx, &csi.NodePublishVolumeRequest{VolumeId: "not-an-id", TargetPath: target, StagingTargetPath: staging}))
		}, codes.InvalidArgument, []string{"volume_capability"}},
		R{"NodeGetVolumeStats/volume_path, bad ID", func(ctx context.Context, d *Driver) error {
			return ignore(d.NodeGetVolumeStats(ctx, &csi.NodeGetVolumeStatsRequest{VolumeId: "not-an-id"}))
		}, codes.InvalidArgument, []string{"volume_path"}},
		R{"ControllerGetVolume/volume_id", func(ctx context.Context, d *Driver) error {
			return ignore(d.ControllerGetVolume(ctx, &csi.ControllerGetVolumeRequest{}))
		}, codes.InvalidArgument, []string{"volume_id"}},
		R{"ControllerGetVolumeHealth/volume_id", func(ctx context.Context, d *Driver) error {
			return ignore(d.ControllerGetVolumeHealth(ctx, &csi.ControllerGetVolumeHealthRequest{}))
		}, codes.InvalidArgument, []string{"volume_id"}},
		R{"CreateSnapshot/name", func(ctx context.Context, d *Driver) error {
			return ignore(d.CreateSnapshot(ctx, &csi.CreateSnapshotRequest{SourceVolumeId: vol}))
		}, codes.InvalidArgument, []string{"name"}},
		R{"CreateSnapshot/source_volume_id", func(ctx context.Context, d *Driver) error {
			return ignore(d.CreateSnapshot(ctx, &csi.CreateSnapshotRequest{Name: "snap"}))
		}, codes.InvalidArgument, []string{"source_volume_id"}},
		R{"DeleteSnapshot/snapshot_id", func(ctx context.Context, d *Driver) error {
			return ignore(d.DeleteSnapshot(ctx, &csi.DeleteSnapshotRequest{}))
		}, codes.InvalidArgument, []string{"snapshot_id"}},
		R{"GetSnapshot/snapshot_id", func(ctx context.Context, d *Driver) error {
			return ignore(d.GetSnapshot(ctx, &csi.GetSnapshotRequest{}))
		}, codes.InvalidArgument, []string{"snapshot_id"}},
		R{"NodeStageVolume/volume_id", func(ctx context.Context, d *Driver) error {
			return ignore(d.NodeStageVolume(ctx, &csi.NodeStageVolumeRequest{StagingTargetPath: staging, VolumeCapability: fsCap}))
		}, codes.InvalidArgument, []string{"volume_id"}},
		R{"NodeStageVolume/staging_target_path", func(ctx context.Context, d *Driver) error {
			return ignore(d.NodeStageVolume(ctx, &csi.NodeStageVolumeRequest{VolumeId: vol, VolumeCapability: fsCap}))
		}, codes.InvalidArgument, []string{"staging_target_path"}},
		R{"NodeStageVolume/volume_capability", func(ctx context.Context, d *Driver) error {
			return ignore(d.NodeStageVolume(ctx, &csi.NodeStageVolumeRequest{VolumeId: vol, StagingTargetPath: staging}))
		}, codes.InvalidArgument, []string{"volume_capability"}},
		R{"NodeStageVolume/access_mode", func(ctx context.Context, d *Driver) error {
			return ignore(d.NodeStageVolume(ctx, &csi.NodeStageVolumeRequest{VolumeId: vol, StagingTargetPath: staging, VolumeCapability: noMode}))
		}, codes.InvalidArgument, []string{"volume_capability.access_mode"}},
		R{"NodeUnstageVolume/volume_id", func(ctx context.Context, d *Driver) error {
			return ignore(d.NodeUnstageVolume(ctx, &csi.NodeUnstageVolumeRequest{StagingTargetPath: staging}))
		}, codes.InvalidArgument, []string{"volume_id"}},
		R{"NodeUnstageVolume/staging_target_path", func(ctx context.Context, d *Driver) error {
			return ignore(d.NodeUnstageVolume(ctx, &csi.NodeUnstageVolumeRequest{VolumeId: vol}))
		}, codes.InvalidArgument, []string{"staging_target_path"}},
		R{"NodePublishVolume/volume_id", func(ctx context.Context, d *Driver) error {
			return ignore(d.NodePublishVolume(ctx, &csi.NodePublishVolumeRequest{TargetPath: target, StagingTargetPath: staging, VolumeCapability: fsCap}))
		}, codes.InvalidArgument, []string{"volume_id"}},
		R{"NodePublishVolume/target_path", func(ctx context.Context, d *Driver) error {
			return ignore(d.NodePublishVolume(ctx, &csi.NodePublishVolumeRequest{VolumeId: vol, StagingTargetPath: staging, VolumeCapability: fsCap}))
		}, codes.InvalidArgument, []string{"target_path"}},
		R{"NodePublishVolume/staging_target_path", func(ctx context.Context, d *Driver) error {
			return ignore(d.NodePublishVolume(ctx, &csi.NodePublishVolumeRequest{VolumeId: vol, TargetPath: target, VolumeCapability: fsCap}))
		}, codes.InvalidArgument, []string{"staging_target_path"}},
		R{"NodePublishVolume/volume_capability", func(ctx context.Context, d *Driver) error {
			return ignore(d.NodePublishVolume(ctx, &csi.NodePublishVolumeRequest{VolumeId: vol, TargetPath: target, StagingTargetPath: staging}))
		}, codes.InvalidArgument, []string{"volume_capability"}},
		R{"NodeUnpublishVolume/volume_id", func(ctx context.Context, d *Driver) error {
			return ignore(d.NodeUnpublishVolume(ctx, &csi.NodeUnpublishVolumeRequest{TargetPath: target}))
		}, codes.InvalidArgument, []string{"volume_id"}},
		R{"NodeUnpublishVolume/target_path", func(ctx context.Context, d *Driver) error {
			return ignore(d.NodeUnpublishVolume(ctx, &csi.NodeUnpublishVolumeRequest{VolumeId: vol}))
		}, codes.InvalidArgument, []string{"target_path"}},
		R{"NodeGetVolumeStats/volume_id", func(ctx context.Context, d *Driver) error {
			return ignore(d.NodeGetVolumeStats(ctx, &csi.NodeGetVolumeStatsRequest{VolumePath: target}))
		}, codes.InvalidArgument, []string{"volume_id"}},
		R{"NodeGetVolumeStats/volume_path", func(ctx context.Context, d *Driver) error {
			return ignore(d.NodeGetVolumeStats(ctx, &csi.NodeGetVolumeStatsRequest{VolumeId: vol}))
		}, codes.InvalidArgument, []string{"volume_path"}},
		R{"NodeExpandVolume/volume_id", func(ctx context.Context, d *Driver) error {
			return ignore(d.NodeExpandVolume(ctx, &csi.NodeExpandVolumeRequest{VolumePath: target}))
		}, codes.InvalidArgument, []string{"volume_id"}},
		R{"NodeExpandVolume/volume_path", func(ctx context.Context, d *Driver) error {
			return ignore(d.NodeExpandVolume(ctx, &csi.NodeExpandVolumeRequest{VolumeId: vol}))
		}, codes.InvalidArgument, []string{"volume_path"}},
		R{"NodeExpandVolume/access_mode", func(ctx context.Context, d *Driver) error {
			return ignore(d.NodeExpandVolume(ctx, &csi.NodeExpandVolumeRequest{VolumeId: vol, VolumePath: target, VolumeCapability: noMode}))
		}, codes.InvalidArgument, []string{"volume_capability.access_mode"}},
		R{"NodeGetVolumeHealth/volume_id", func(ctx context.Context, d *Driver) error {
			return ignore(d.NodeGetVolumeHealth(ctx, &csi.NodeGetVolumeHealthRequest{}))
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
				return ignore(d.ControllerGetVolume(ctx, &csi.ControllerGetVolumeRequest{VolumeId: id}))
			}, codes.NotFound, nil},
			badCase{"ValidateVolumeCapabilities/" + what, func(ctx context.Context, d *Driver) error {
				return ignore(d.ValidateVolumeCapabilities(ctx, &csi.ValidateVolumeCapabilitiesRequest{VolumeId: id, VolumeCapabilities: []*csi.VolumeCapability{fsCap}}))
			}, codes.NotFound, nil},
			badCase{"ControllerGetVolumeHealth/" + what, func(ctx context.Context, d *Driver) error {
				return ignore(d.ControllerGetVolumeHealth(ctx, &csi.ControllerGetVolumeHealthRequest{VolumeId: id}))
			}, codes.NotFound, nil},
			badCase{"CreateSnapshot/" + what, func(ctx context.Context, d *Driver) error {
				return ignore(d.CreateSnapshot(ctx, &csi.CreateSnapshotRequest{Name: "s2", SourceVolumeId: id}))
			}, codes.NotFound, nil},
			badCase{"CreateVolume from snapshot/" + what, func(ctx context.Context, d *Driver) error {
				return ignore(d.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: "v2", VolumeCapabilities: []*csi.VolumeCapability{fsCap},
					VolumeContentSource: &csi.VolumeContentSource{Type: &csi.VolumeContentSource_Snapshot{Snapshot: &csi.VolumeContentSource_SnapshotSource{SnapshotId: id}}}}))
			}, codes.NotFound, nil},
			badCase{"CreateVolume from volume/" + what, func(ctx context.Context, d *Driver) error {
				return ignore(d.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: "v2", VolumeCapabilities: []*csi.VolumeCapability{fsCap},
					VolumeContentSource: &csi.VolumeContentSource{Type: &csi.VolumeContentSource_Volume{Volume: &csi.VolumeContentSource_VolumeSource{VolumeId: id}}}}))
			}, codes.NotFound, nil},
			badCase{"GetSnapshot/" + what, func(ctx context.Context, d *Driver) error {
				return ignore(d.GetSnapshot(ctx, &csi.GetSnapshotRequest{SnapshotId: id}))
			}, codes.NotFound, nil},
			badCase{"NodeStageVolume/" + what, func(ctx context.Context, d *Driver) error {
				return ignore(d.NodeStageVolume(ctx, &csi.NodeStageVolumeRequest{VolumeId: id, StagingTargetPath: staging, VolumeCapability: fsCap}))
			}, codes.NotFound, nil},
			badCase{"NodePublishVolume/" + what, func(ctx context.Context, d *Driver) error {
				return ignore(d.NodePublishVolume(ctx, &csi.NodePublishVolumeRequest{VolumeId: id, StagingTargetPath: staging, TargetPath: target, VolumeCapability: fsCap}))
			}, codes.NotFound, nil},
			badCase{"NodeGetVolumeStats/" + what, func(ctx context.Context, d *Driver) error {
				return ignore(d.NodeGetVolumeStats(ctx, &csi.NodeGetVolumeStatsRequest{VolumeId: id, VolumePath: target}))
			}, codes.NotFound, nil},
			badCase{"NodeExpandVolume/" + what, func(ctx context.Context, d *Driver) error {
				return ignore(d.NodeExpandVolume(ctx, &csi.NodeExpandVolumeRequest{VolumeId: id, VolumePath: target}))
			}, codes.NotFound, nil},
			badCase{"NodeGetVolumeHealth/" + what, func(ctx context.Context, d *Driver) error {
				return ignore(d.NodeGetVolumeHealth(ctx, &csi.NodeGetVolumeHealthRequest{VolumeId: id}))
			}, codes.NotFound, nil},
			// Deleting what does not exist succeeds.
			badCase{"DeleteVolume/" + what, func(ctx context.Context, d *Driver) error {
				return ignore(d.DeleteVolume(ctx, &csi.DeleteVolumeRequest{VolumeId: id}))
			}, codes.OK, nil},
			badCase{"DeleteSnapshot/" + what, func(ctx context.Context, d *Driver) error {
				return ignore(d.DeleteSnapshot(ctx, &csi.DeleteSnapshotRequest{SnapshotId: id}))
			}, codes.OK, nil},
		)
	}
	// A snapshot is not a volume, nor the other way round.
	cases = append(cases,
		badCase{"ControllerGetVolume/a snapshot", func(ctx context.Context, d *Driver) error {
			return ignore(d.ControllerGetVolume(ctx, &csi.ControllerGetVolumeRequest{VolumeId: snap}))
		}, codes.NotFound, []string{"snapshot"}},
		badCase{"NodeStageVolume/a snapshot", func(ctx context.Context, d *Driver) error {
			return ignore(d.NodeStageVolume(ctx, &csi.NodeStageVolumeRequest{VolumeId: snap, StagingTargetPath: staging, VolumeCapability: fsCap}))
		}, codes.NotFound, []string{"snapshot"}},
		badCase{"CreateSnapshot/of a snapshot", func(ctx context.Context, d *Driver) error {
			return ignore(d.CreateSnapshot(ctx, &csi.CreateSnapshotRequest{Name: "s2", SourceVolumeId: snap}))
		}, codes.NotFound, []string{"snapshot"}},
		badCase{"CreateVolume/volume source is a snapshot", func(ctx context.Context, d *Driver) error {
			return ignore(d.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: "v2", VolumeCapabilities: []*csi.VolumeCapability{fsCap},
				VolumeContentSource: &csi.VolumeContentSource{Type: &csi.VolumeContentSource_Volume{Volume: &csi.VolumeContentSource_VolumeSource{VolumeId: snap}}}}))
		}, codes.NotFound, nil},
		badCase{"GetSnapshot/a volume", func(ctx context.Context, d *Driver) error {
			return ignore(d.GetSnapshot(ctx, &csi.GetSnapshotRequest{SnapshotId: vol}))
		}, codes.NotFound, []string{"volume"}},
		badCase{"DeleteVolume/a snapshot", func(ctx context.Context, d *Driver) error {
			return ignore(d.DeleteVolume(ctx, &csi.DeleteVolumeRequest{VolumeId: snap}))
		}, codes.NotFound, []string{"snapshot"}},
		badCase{"DeleteSnapshot/a volume", func(ctx context.Context, d *Driver) error {
			return ignore(d.DeleteSnapshot(ctx, &csi.DeleteSnapshotRequest{SnapshotId: vol}))
		}, codes.NotFound, []string{"volume"}},
	)
	runBadCases(t, e, cases)
}

func TestParameters(t *testing.T) {
	e := newDriverEnv(t)
	vol := e.createVolume("vol").GetVolumeId()
	caps := []*csi.VolumeCapability{fsCap}
	runBadCases(t, e, []badCase{
		{"CreateVolume/unknown", func(ctx context.Context, d *Driver) error {
			return ignore(d.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: "new", VolumeCapabilities: caps, Parameters: map[string]string{"thinness": "very"}}))
		}, codes.InvalidArgument, []string{"parameters.thinness"}},
		{"CreateVolume/fsType", func(ctx context.Context, d *Driver) error {
			return ignore(d.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: "new", VolumeCapabilities: caps, Parameters: map[string]string{ParamFSType: "btrfs"}}))
		}, codes.InvalidArgument, []string{"parameters.fsType", "btrfs"}},
		{"CreateVolume/pool", func(ctx context.Context, d *Driver) error {
			return ignore(d.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: "new", VolumeCapabilities: caps, Parameters: map[string]string{ParamPool: "gamma"}}))
		}, codes.InvalidArgument, []string{"parameters.pool", "gamma"}},
		{"CreateVolume/capability fs_type", func(ctx context.Context, d *Driver) error {
			return ignore(d.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: "new", VolumeCapabilities: []*csi.VolumeCapability{mountCap("ntfs", rwo)}}))
		}, codes.InvalidArgument, []string{"volume_capabilities[0].mount.fs_type", "ntfs"}},
		{"GetCapacity/unknown", func(ctx context.Context, d *Driver) error {
			return ignore(d.GetCapacity(ctx, &csi.GetCapacityRequest{Parameters: map[string]string{"thinness": "very"}}))
		}, codes.InvalidArgument, []string{"parameters.thinness"}},
		{"GetCapacity/pool", func(ctx context.Context, d *Driver) error {
			return ignore(d.GetCapacity(ctx, &csi.GetCapacityRequest{Parameters: map[string]string{ParamPool: "gamma"}}))
		}, codes.InvalidArgument, []string{"parameters.pool"}},
		{"CreateSnapshot/unknown", func(ctx context.Context, d *Driver) error {
			return ignore(d.CreateSnapshot(ctx, &csi.CreateSnapshotRequest{Name: "snap", SourceVolumeId: vol, Parameters: map[string]string{"retain": "yes"}}))
		}, codes.InvalidArgument, []string{"parameters.retain"}},
	})

	// The provisioner's extra metadata is accepted and ignored, and the
	// pool and fsType parameters are honoured.
	resp, err := e.d.CreateVolume(t.Context(), &csi.CreateVolumeRequest{
		Name: "in-beta", VolumeCapabilities: caps, CapacityRange: &csi.CapacityRange{RequiredBytes: testVolBytes},
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
	for name, req := range map[string]*csi.ValidateVolumeCapabilitiesRequest{
		"parameter":  {VolumeId: vol, VolumeCapabilities: caps, Parameters: map[string]string{"thinness": "very"}},
		"multi-node": {VolumeId: vol, VolumeCapabilities: []*csi.VolumeCapability{mountCap("", csi.VolumeCapability_AccessMode_MULTI_NODE_MULTI_WRITER)}},
		"fs_type":    {VolumeId: vol, VolumeCapabilities: []*csi.VolumeCapability{mountCap("zfs", rwo)}},
	} {
		resp, err := e.d.ValidateVolumeCapabilities(t.Context(), req)
		if err != nil || resp.GetConfirmed() != nil || resp.GetMessage() == "" {
			t.Errorf("%s: confirmed %v, message %q, err %v", name, resp.GetConfirmed(), resp.GetMessage(), err)
		}
	}
	resp2, err := e.d.ValidateVolumeCapabilities(t.Context(), &csi.ValidateVolumeCapabilitiesRequest{VolumeId: vol, VolumeCapabilities: []*csi.VolumeCapability{fsCap, blockCap(rox)}})
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
				return ignore(d.NodeStageVolume(ctx, &csi.NodeStageVolumeRequest{VolumeId: vol, StagingTargetPath: p, VolumeCapability: fsCap}))
			}, codes.InvalidArgument, []string{"staging_target_path"}},
			badCase{"NodeUnstageVolume/" + what, func(ctx context.Context, d *Driver) error {
				return ignore(d.NodeUnstageVolume(ctx, &csi.NodeUnstageVolumeRequest{VolumeId: vol, StagingTargetPath: p}))
			}, codes.InvalidArgument, []string{"staging_target_path"}},
			badCase{"NodePublishVolume target/" + what, func(ctx context.Context, d *Driver) error {
				return ignore(d.NodePublishVolume(ctx, &csi.NodePublishVolumeRequest{VolumeId: vol, TargetPath: p, StagingTargetPath: good, VolumeCapability: fsCap}))
			}, codes.InvalidArgument, []string{"target_path"}},
			badCase{"NodePublishVolume staging/" + what, func(ctx context.Context, d *Driver) error {
				return ignore(d.NodePublishVolume(ctx, &csi.NodePublishVolumeRequest{VolumeId: vol, TargetPath: good, StagingTargetPath: p, VolumeCapability: fsCap}))
			}, codes.InvalidArgument, []string{"staging_target_path"}},
			badCase{"NodeUnpublishVolume/" + what, func(ctx context.Context, d *Driver) error {
				return ignore(d.NodeUnpublishVolume(ctx, &csi.NodeUnpublishVolumeRequest{VolumeId: vol, TargetPath: p}))
			}, codes.InvalidArgument, []string{"target_path"}},
			// volume_path is only looked at, and a path that cannot hold a
			// volume is the spec's NotFound (csi-sanity sends "some/path").
			badCase{"NodeGetVolumeStats/" + what, func(ctx context.Context, d *Driver) error {
				return ignore(d.NodeGetVolumeStats(ctx, &csi.NodeGetVolumeStatsRequest{VolumeId: vol, VolumePath: p}))
			}, codes.NotFound, []string{"volume_path"}},
			badCase{"NodeExpandVolume/" + what, func(ctx context.Context, d *Driver) error {
				return ignore(d.NodeExpandVolume(ctx, &csi.NodeExpandVolumeRequest{VolumeId: vol, VolumePath: p,
					CapacityRange: &csi.CapacityRange{RequiredBytes: 2 * testVolBytes}}))
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
	for _, m := range []csi.VolumeCapability_AccessMode_Mode{
		csi.VolumeCapability_AccessMode_MULTI_NODE_READER_ONLY,
		csi.VolumeCapability_AccessMode_MULTI_NODE_SINGLE_WRITER,
		csi.VolumeCapability_AccessMode_MULTI_NODE_MULTI_WRITER,
		csi.VolumeCapability_AccessMode_UNKNOWN,
	} {
		for kind, c := range map[string]*csi.VolumeCapability{"mount": mountCap("", m), "block": blockCap(m)} {
			name := m.String() + "/" + kind
			cases = append(cases,
				badCase{"CreateVolume/" + name, func(ctx context.Context, d *Driver) error {
					return ignore(d.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: "new", VolumeCapabilities: []*csi.VolumeCapability{fsCap, c}}))
				}, codes.InvalidArgument, []string{"volume_capabilities[1].access_mode", m.String()}},
				badCase{"NodeStageVolume/" + name, func(ctx context.Context, d *Driver) error {
					return ignore(d.NodeStageVolume(ctx, &csi.NodeStageVolumeRequest{VolumeId: vol, StagingTargetPath: staging, VolumeCapability: c}))
				}, codes.InvalidArgument, []string{"volume_capability.access_mode"}},
				badCase{"NodePublishVolume/" + name, func(ctx context.Context, d *Driver) error {
					return ignore(d.NodePublishVolume(ctx, &csi.NodePublishVolumeRequest{VolumeId: vol, StagingTargetPath: staging, TargetPath: target, VolumeCapability: c}))
				}, codes.InvalidArgument, []string{"volume_capability.access_mode"}},
			)
		}
	}
	runBadCases(t, e, cases)

	// GetCapacity for a capability the driver cannot serve is 0, not an
	// error (the CO asks per StorageClass).
	resp, err := e.d.GetCapacity(t.Context(), &csi.GetCapacityRequest{VolumeCapabilities: []*csi.VolumeCapability{mountCap("", csi.VolumeCapability_AccessMode_MULTI_NODE_MULTI_WRITER)}})
	if err != nil || resp.GetAvailableCapacity() != 0 {
		t.Errorf("GetCapacity for MULTI_NODE: %v, %v", resp, err)
	}
}

func TestCreateVolumeIdempotent(t *testing.T) {
	e := newDriverEnv(t)
	ctx := t.Context()
	req := &csi.CreateVolumeRequest{
		Name: "pvc-1", CapacityRange: &csi.CapacityRange{RequiredBytes: testVolBytes},
		VolumeCapabilities: []*csi.VolumeCapability{fsCap},
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
	fits, err := e.d.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: "pvc-1", VolumeCapabilities: req.VolumeCapabilities,
		CapacityRange: &csi.CapacityRange{RequiredBytes: 1 << 20, LimitBytes: 32 << 20}})
	if err != nil || fits.GetVolume().GetVolumeId() != v.GetVolumeId() {
		t.Errorf("a fitting range: %v, %v", fits, err)
	}
	if n := len(e.pools[testPool].List()); n != 1 {
		t.Errorf("%d devices after repeats, want 1", n)
	}
	src := e.createVolume("other").GetVolumeId()
	runBadCases(t, e, []badCase{
		{"larger", func(ctx context.Context, d *Driver) error {
			return ignore(d.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: "pvc-1", VolumeCapabilities: req.VolumeCapabilities, CapacityRange: &csi.CapacityRange{RequiredBytes: 2 * testVolBytes}}))
		}, codes.AlreadyExists, []string{"pvc-1"}},
		{"under the limit", func(ctx context.Context, d *Driver) error {
			return ignore(d.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: "pvc-1", VolumeCapabilities: req.VolumeCapabilities, CapacityRange: &csi.CapacityRange{LimitBytes: testVolBytes / 2}}))
		}, codes.AlreadyExists, []string{"pvc-1"}},
		{"with a source", func(ctx context.Context, d *Driver) error {
			return ignore(d.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: "pvc-1", VolumeCapabilities: req.VolumeCapabilities, CapacityRange: req.CapacityRange,
				VolumeContentSource: &csi.VolumeContentSource{Type: &csi.VolumeContentSource_Volume{Volume: &csi.VolumeContentSource_VolumeSource{VolumeId: src}}}}))
		}, codes.AlreadyExists, []string{"pvc-1"}},
		{"limit under required", func(ctx context.Context, d *Driver) error {
			return ignore(d.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: "new", VolumeCapabilities: req.VolumeCapabilities, CapacityRange: &csi.CapacityRange{RequiredBytes: 2 << 20, LimitBytes: 1 << 20}}))
		}, codes.OutOfRange, []string{"limit"}},
		{"negative", func(ctx context.Context, d *Driver) error {
			return ignore(d.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: "new", VolumeCapabilities: req.VolumeCapabilities, CapacityRange: &csi.CapacityRange{RequiredBytes: -1}}))
		}, codes.InvalidArgument, []string{"capacity_range"}},
	})

	// Names that are not device names map to one device each, the same
	// one every time.
	long := strings.Repeat("ü", 60) // 120 bytes
	a, err := e.d.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: long, VolumeCapabilities: req.VolumeCapabilities})
	if err != nil {
		t.Fatal(err)
	}
	b, err := e.d.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: long, VolumeCapabilities: req.VolumeCapabilities})
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
	mk := func(name string, size int64) (*csi.CreateVolumeResponse, error) {
		return e.d.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: name, VolumeCapabilities: []*csi.VolumeCapability{fsCap}, CapacityRange: &csi.CapacityRange{RequiredBytes: size}})
	}
	if _, err := mk("fits", 48<<20); err != nil {
		t.Fatal(err)
	}
	runBadCases(t, e, []badCase{
		{"over the ratio", func(ctx context.Context, d *Driver) error { return ignore(mk("too-much", 32<<20)) }, codes.ResourceExhausted, nil},
		{"other node's topology", func(ctx context.Context, d *Driver) error {
			return ignore(d.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: "elsewhere", VolumeCapabilities: []*csi.VolumeCapability{fsCap},
				AccessibilityRequirements: &csi.TopologyRequirement{Requisite: []*csi.Topology{{Segments: map[string]string{TopologyKey: "node-b"}}}}}))
		}, codes.ResourceExhausted, []string{"requisite", testNode}},
	})
	// Requisite topology that includes this node is fine.
	if _, err := e.d.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: "here", VolumeCapabilities: []*csi.VolumeCapability{fsCap},
		CapacityRange: &csi.CapacityRange{RequiredBytes: 4 << 20},
		AccessibilityRequirements: &csi.TopologyRequirement{
			Requisite: []*csi.Topology{{Segments: map[string]string{TopologyKey: "node-b"}}, {Segments: map[string]string{TopologyKey: testNode}}},
			Preferred: []*csi.Topology{{Segments: map[string]string{TopologyKey: "node-b"}}},
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

	fromSnap := &csi.VolumeContentSource{Type: &csi.VolumeContentSource_Snapshot{Snapshot: &csi.VolumeContentSource_SnapshotSource{SnapshotId: snap.GetSnapshotId()}}}
	restored, err := e.d.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: "restored", VolumeCapabilities: []*csi.VolumeCapability{fsCap},
		CapacityRange: &csi.CapacityRange{RequiredBytes: 2 * testVolBytes}, VolumeContentSource: fromSnap})
	if err != nil {
		t.Fatal(err)
	}
	if !proto.Equal(restored.GetVolume().GetContentSource(), fromSnap) || restored.GetVolume().GetCapacityBytes() != 2*testVolBytes {
		t.Errorf("restored volume %v", restored.GetVolume())
	}
	if got := e.read(restored.GetVolume().GetVolumeId(), 1<<20, len(data)); !bytes.Equal(got, data) {
		t.Errorf("restored data differs from the snapshot's")
	}

	fromVol := &csi.VolumeContentSource{Type: &csi.VolumeContentSource_Volume{Volume: &csi.VolumeContentSource_VolumeSource{VolumeId: src}}}
	cloneReq := &csi.CreateVolumeRequest{Name: "clone", VolumeCapabilities: []*csi.VolumeCapability{fsCap},
		CapacityRange: &csi.CapacityRange{RequiredBytes: testVolBytes}, VolumeContentSource: fromVol}
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
			return ignore(d.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: "small", VolumeCapabilities: []*csi.VolumeCapability{fsCap},
				CapacityRange: &csi.CapacityRange{LimitBytes: testVolBytes / 2}, VolumeContentSource: fromSnap}))
		}, codes.OutOfRange, nil},
		{"source in another pool", func(ctx context.Context, d *Driver) error {
			return ignore(d.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: "x", VolumeCapabilities: []*csi.VolumeCapability{fsCap},
				VolumeContentSource: &csi.VolumeContentSource{Type: &csi.VolumeContentSource_Volume{Volume: &csi.VolumeContentSource_VolumeSource{VolumeId: betaVol}}}}))
		}, codes.NotFound, []string{otherPool}},
		{"restore under another name's source", func(ctx context.Context, d *Driver) error {
			return ignore(d.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: "restored", VolumeCapabilities: []*csi.VolumeCapability{fsCap}, VolumeContentSource: fromVol}))
		}, codes.AlreadyExists, nil},
	})
}

func (e *driverEnv) createVolumeIn(pool, name string) string {
	e.t.Helper()
	resp, err := e.d.CreateVolume(e.t.Context(), &csi.CreateVolumeRequest{Name: name, VolumeCapabilities: []*csi.VolumeCapability{fsCap},
		CapacityRange: &csi.CapacityRange{RequiredBytes: testVolBytes}, Parameters: map[string]string{ParamPool: pool}})
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
	if s.GetSnapshotId() != testPool+"/snap-1" || s.GetCreationTime() == nil {
		t.Errorf("snapshot %v", s)
	}
	if topo := s.GetAccessibleTopology(); len(topo) != 1 || topo[0].GetSegments()[TopologyKey] != testNode {
		t.Errorf("snapshot topology %v", topo)
	}
	again := e.createSnapshot("snap-1", a)
	if !proto.Equal(again, s) {
		t.Errorf("repeat gave %v, first %v", again, s)
	}
	got, err := e.d.GetSnapshot(ctx, &csi.GetSnapshotRequest{SnapshotId: s.GetSnapshotId()})
	if err != nil || !proto.Equal(got.GetSnapshot(), s) {
		t.Errorf("GetSnapshot: %v, %v", got, err)
	}
	runBadCases(t, e, []badCase{
		{"other source", func(ctx context.Context, d *Driver) error {
			return ignore(d.CreateSnapshot(ctx, &csi.CreateSnapshotRequest{Name: "snap-1", SourceVolumeId: b}))
		}, codes.AlreadyExists, []string{"snap-1"}},
		{"a volume's name", func(ctx context.Context, d *Driver) error {
			return ignore(d.CreateSnapshot(ctx, &csi.CreateSnapshotRequest{Name: "b", SourceVolumeId: a}))
		}, codes.AlreadyExists, nil},
		{"volume with a snapshot's name", func(ctx context.Context, d *Driver) error {
			return ignore(d.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: "snap-1", VolumeCapabilities: []*csi.VolumeCapability{fsCap}}))
		}, codes.AlreadyExists, nil},
	})
	// Deleting the source leaves the snapshot; deletes are idempotent.
	for range 2 {
		if _, err := e.d.DeleteVolume(ctx, &csi.DeleteVolumeRequest{VolumeId: a}); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := e.d.GetSnapshot(ctx, &csi.GetSnapshotRequest{SnapshotId: s.GetSnapshotId()}); err != nil {
		t.Errorf("snapshot gone with its source: %v", err)
	}
	for range 2 {
		if _, err := e.d.DeleteSnapshot(ctx, &csi.DeleteSnapshotRequest{SnapshotId: s.GetSnapshotId()}); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := e.d.GetSnapshot(ctx, &csi.GetSnapshotRequest{SnapshotId: s.GetSnapshotId()}); status.Code(err) != codes.NotFound {
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
		resp, err := e.d.ListVolumes(ctx, &csi.ListVolumesRequest{MaxEntries: 2, StartingToken: token})
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
	all, err := e.d.ListVolumes(ctx, &csi.ListVolumesRequest{})
	if err != nil || len(all.GetEntries()) != len(vols) || all.GetNextToken() != "" {
		t.Errorf("unpaged ListVolumes: %d entries, token %q, %v", len(all.GetEntries()), all.GetNextToken(), err)
	}

	runBadCases(t, e, []badCase{
		{"ListVolumes/bad token", func(ctx context.Context, d *Driver) error {
			return ignore(d.ListVolumes(ctx, &csi.ListVolumesRequest{StartingToken: "invalid-token"}))
		}, codes.Aborted, []string{"starting_token"}},
		{"ListVolumes/token past the end", func(ctx context.Context, d *Driver) error {
			return ignore(d.ListVolumes(ctx, &csi.ListVolumesRequest{StartingToken: "99"}))
		}, codes.Aborted, nil},
		{"ListVolumes/negative max_entries", func(ctx context.Context, d *Driver) error {
			return ignore(d.ListVolumes(ctx, &csi.ListVolumesRequest{MaxEntries: -1}))
		}, codes.InvalidArgument, []string{"max_entries"}},
		{"ListSnapshots/bad token", func(ctx context.Context, d *Driver) error {
			return ignore(d.ListSnapshots(ctx, &csi.ListSnapshotsRequest{StartingToken: "-1"}))
		}, codes.Aborted, nil},
		{"ControllerListVolumeHealth/bad token", func(ctx context.Context, d *Driver) error {
			return ignore(d.ControllerListVolumeHealth(ctx, &csi.ControllerListVolumeHealthRequest{StartingToken: "x"}))
		}, codes.Aborted, nil},
	})

	listSnaps := func(req *csi.ListSnapshotsRequest) []string {
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
			req = proto.Clone(req).(*csi.ListSnapshotsRequest)
			req.StartingToken = resp.GetNextToken()
		}
	}
	for name, tc := range map[string]struct {
		req  *csi.ListSnapshotsRequest
		want []string
	}{
		"all, paged":         {&csi.ListSnapshotsRequest{MaxEntries: 1}, []string{testPool + "/s0", testPool + "/s1", testPool + "/s2"}},
		"by id":              {&csi.ListSnapshotsRequest{SnapshotId: testPool + "/s1"}, []string{testPool + "/s1"}},
		"by unknown id":      {&csi.ListSnapshotsRequest{SnapshotId: testPool + "/nope"}, nil},
		"by malformed id":    {&csi.ListSnapshotsRequest{SnapshotId: "nope"}, nil},
		"by a volume's id":   {&csi.ListSnapshotsRequest{SnapshotId: vols[0]}, nil},
		"by source":          {&csi.ListSnapshotsRequest{SourceVolumeId: vols[0], MaxEntries: 1}, []string{testPool + "/s0", testPool + "/s1"}},
		"by source and id":   {&csi.ListSnapshotsRequest{SourceVolumeId: vols[1], SnapshotId: testPool + "/s0"}, nil},
		"by unknown source":  {&csi.ListSnapshotsRequest{SourceVolumeId: "gamma/v0"}, nil},
		"by snapless source": {&csi.ListSnapshotsRequest{SourceVolumeId: vols[2]}, nil},
	} {
		if got := listSnaps(tc.req); !slices.Equal(got, tc.want) {
			t.Errorf("ListSnapshots %s = %v, want %v", name, got, tc.want)
		}
	}
}

func TestGetCapacity(t *testing.T) {
	e := newDriverEnv(t, func(c *thinpool.Config) { c.OverprovisionRatio = 1 })
	ctx := t.Context()
	capacity := func(req *csi.GetCapacityRequest) int64 {
		t.Helper()
		resp, err := e.d.GetCapacity(ctx, req)
		if err != nil {
			t.Fatal(err)
		}
		return resp.GetAvailableCapacity()
	}
	here := &csi.Topology{Segments: map[string]string{TopologyKey: testNode}}
	before := capacity(&csi.GetCapacityRequest{AccessibleTopology: here, VolumeCapabilities: []*csi.VolumeCapability{fsCap}})
	if before <= 0 {
		t.Fatalf("capacity of an empty pool: %d", before)
	}
	resp, err := e.d.GetCapacity(ctx, &csi.GetCapacityRequest{})
	if err != nil || resp.GetMinimumVolumeSize().GetValue() != minVolumeBytes || resp.GetMaximumVolumeSize().GetValue() != before {
		t.Errorf("GetCapacity %v, %v", resp, err)
	}
	// At most 1x of 256 MiB may be provisioned: with 64 MiB of volumes,
	// 192 MiB are left, under the free data above the 10% floor.
	for i := range 4 {
		e.createVolume(fmt.Sprintf("v%d", i))
	}
	if after := capacity(&csi.GetCapacityRequest{}); after != testPoolBytes-4*testVolBytes || after >= before {
		t.Errorf("capacity %d after 4 volumes, %d before; want %d", after, before, testPoolBytes-4*testVolBytes)
	}
	if other := capacity(&csi.GetCapacityRequest{Parameters: map[string]string{ParamPool: otherPool}}); other != before {
		t.Errorf("capacity of the untouched pool %s = %d, want %d", otherPool, other, before)
	}
	for name, topo := range map[string]*csi.Topology{
		"other node":  {Segments: map[string]string{TopologyKey: "node-b"}},
		"no node key": {Segments: map[string]string{"zone": "z1"}},
	} {
		if c := capacity(&csi.GetCapacityRequest{AccessibleTopology: topo}); c != 0 {
			t.Errorf("capacity for %s = %d, want 0", name, c)
		}
	}
}

// stage and publish helpers
func (e *driverEnv) stage(vol, staging string, c *csi.VolumeCapability, volCtx map[string]string) error {
	_, err := e.d.NodeStageVolume(e.t.Context(), &csi.NodeStageVolumeRequest{VolumeId: vol, StagingTargetPath: staging, VolumeCapability: c, VolumeContext: volCtx})
	return err
}

func (e *driverEnv) publish(vol, staging, target string, c *csi.VolumeCapability, readonly bool) error {
	_, err := e.d.NodePublishVolume(e.t.Context(), &csi.NodePublishVolumeRequest{VolumeId: vol, StagingTargetPath: staging, TargetPath: target, VolumeCapability: c, Readonly: readonly})
	return err
}

func (e *driverEnv) unpublish(vol, target string) error {
	_, err := e.d.NodeUnpublishVolume(e.t.Context(), &csi.NodeUnpublishVolumeRequest{VolumeId: vol, TargetPath: target})
	return err
}

func (e *driverEnv) unstage(vol, staging string) error {
	_, err := e.d.NodeUnstageVolume(e.t.Context(), &csi.NodeUnstageVolumeRequest{VolumeId: vol, StagingTargetPath: staging})
	return err
}

func mustOK(t *testing.T, what string, err error) {
	t.Helper()
	if err != nil {
		t.Fatalf("%s: %v", what, err)
	}
}

func TestNodeMountLifecycle(t *testing.T) {
	for _, fsType := range []string{"ext4", "xfs"} {
		t.Run(fsType, func(t *testing.T) {
			e := newDriverEnv(t)
			vol := e.createVolume("vol").GetVolumeId()
			staging, target := e.path("plugins", "staging", "vol"), e.path("pods", "p1", "volumes", "vol")
			c := mountCap(fsType, rwo)
			c.GetMount().MountFlags = []string{"noatime"}
			for range 2 {
				mustOK(t, "stage", e.stage(vol, staging, c, nil))
			}
			m := e.fs.mountTable()[staging]
			device := m.Source
			if m.FSType != fsType || !slices.Contains(m.Options, "noatime") || (fsType == "xfs") != slices.Contains(m.Options, "nouuid") {
				t.Errorf("staging mount %+v", m)
			}
			if typ, size, err := e.fs.filesystem(device); typ != fsType || size != testVolBytes || err != nil {
				t.Errorf("filesystem on %s: %q of %d bytes, %v", device, typ, size, err)
			}
			for range 2 {
				mustOK(t, "publish", e.publish(vol, staging, target, c, false))
			}
			if m := e.fs.mountTable()[target]; m.Source != staging || !slices.Contains(m.Options, "bind") || slices.Contains(m.Options, "ro") {
				t.Errorf("target mount %+v", m)
			}
			// A second, read-only publish elsewhere.
			target2 := e.path("pods", "p2", "volumes", "vol")
			mustOK(t, "publish ro", e.publish(vol, staging, target2, c, true))
			if m := e.fs.mountTable()[target2]; !slices.Contains(m.Options, "ro") {
				t.Errorf("read-only target mount %+v", m)
			}

			// Staging onto a path another volume is mounted at is refused.
			other := e.createVolume("other").GetVolumeId()
			before := e.state()
			wantCode(t, e.stage(other, staging, c, nil), codes.AlreadyExists, "staging_target_path")
			if after := e.state(); after != before {
				t.Errorf("refused stage changed the state:\n%s\n%s", before, after)
			}

			// Unstaging while published, or at a path where another volume
			// is mounted, is refused and changes nothing.
			before = e.state()
			wantCode(t, e.unstage(vol, staging), codes.FailedPrecondition, "published", target)
			wantCode(t, e.unstage(other, staging), codes.FailedPrecondition, "staging_target_path")
			if after := e.state(); after != before {
				t.Errorf("refused unstage changed the state:\n%s\n%s", before, after)
			}
			// Elsewhere, the unmounted staging path is removed, and the
			// device stays: the published bind mounts hold its filesystem.
			wantCode(t, e.unstage(vol, e.path("plugins", "staging", "unused")), codes.FailedPrecondition)

			for _, p := range []string{target, target2} {
				for range 2 {
					mustOK(t, "unpublish", e.unpublish(vol, p))
				}
				if _, err := os.Lstat(p); !os.IsNotExist(err) {
					t.Errorf("target %s left behind: %v", p, err)
				}
			}
			for range 2 {
				mustOK(t, "unstage", e.unstage(vol, staging))
			}
			if mp := e.fs.mountPoints(); len(mp) != 0 {
				t.Errorf("mounts left: %v", mp)
			}
			if _, err := os.Lstat(staging); !os.IsNotExist(err) {
				t.Errorf("staging path left behind: %v", err)
			}
			if _, err := e.k.InfoByName("dmthin-" + testPool + "-vol"); err == nil {
				t.Errorf("device still active after unstage")
			}

			// Staged again: the filesystem is found, not remade, and a
			// different type is refused.
			mustOK(t, "restage", e.stage(vol, staging, c, nil))
			mustOK(t, "unstage", e.unstage(vol, staging))
			otherFS := map[string]string{"ext4": "xfs", "xfs": "ext4"}[fsType]
			if err := e.stage(vol, staging, mountCap(otherFS, rwo), nil); err == nil {
				t.Errorf("staged a %s volume as %s", fsType, otherFS)
			}
			if mp := e.fs.mountPoints(); len(mp) != 0 {
				t.Errorf("mounts after a refused stage: %v", mp)
			}
			mustOK(t, "unstage", e.unstage(vol, staging))
			if _, err := e.d.DeleteVolume(t.Context(), &csi.DeleteVolumeRequest{VolumeId: vol}); err != nil {
				t.Fatal(err)
			}
		})
	}
}

func TestNodeFSTypeFromContext(t *testing.T) {
	e := newDriverEnv(t)
	resp, err := e.d.CreateVolume(t.Context(), &csi.CreateVolumeRequest{Name: "x", VolumeCapabilities: []*csi.VolumeCapability{fsCap},
		CapacityRange: &csi.CapacityRange{RequiredBytes: testVolBytes}, Parameters: map[string]string{ParamFSType: "xfs"}})
	if err != nil {
		t.Fatal(err)
	}
	staging := e.path("staging", "x")
	mustOK(t, "stage", e.stage(resp.GetVolume().GetVolumeId(), staging, fsCap, resp.GetVolume().GetVolumeContext()))
	if m := e.fs.mountTable()[staging]; m.FSType != "xfs" {
		t.Errorf("staged as %q, want the StorageClass's xfs", m.FSType)
	}
}

func TestNodeBlockLifecycle(t *testing.T) {
	e := newDriverEnv(t)
	vol := e.createVolume("vol").GetVolumeId()
	staging, target := e.path("plugins", "staging", "vol"), e.path("pods", "p1", "volumeDevices", "vol")
	c := blockCap(rwo)
	for range 2 {
		mustOK(t, "stage", e.stage(vol, staging, c, nil))
	}
	if mp := e.fs.mountPoints(); len(mp) != 0 {
		t.Errorf("block stage mounted %v", mp)
	}
	for range 2 {
		mustOK(t, "publish", e.publish(vol, staging, target, c, false))
	}
	m := e.fs.mountTable()[target]
	if !strings.HasPrefix(m.Source, "/dev/") || !slices.Contains(m.Options, "bind") {
		t.Errorf("block target mount %+v", m)
	}
	if fi, err := os.Stat(target); err != nil || !fi.Mode().IsRegular() {
		t.Errorf("block target is not a file: %v, %v", fi, err)
	}
	if typ, _, _ := e.fs.filesystem(m.Source); typ != "" {
		t.Errorf("a block volume was formatted %s", typ)
	}
	// Data through the published device.
	e.write(vol, 0, []byte("raw"))
	if got := e.read(vol, 0, 3); string(got) != "raw" {
		t.Errorf("read %q", got)
	}
	// Unstaging while published would take the device from under the pod
	// (the bind of a device node holds nothing open): refused.
	before := e.state()
	wantCode(t, e.unstage(vol, staging), codes.FailedPrecondition, "published", target)
	if after := e.state(); after != before {
		t.Errorf("refused unstage changed the state:\n%s\n%s", before, after)
	}
	for range 2 {
		mustOK(t, "unpublish", e.unpublish(vol, target))
	}
	if _, err := os.Lstat(target); !os.IsNotExist(err) {
		t.Errorf("target left behind: %v", err)
	}
	for range 2 {
		mustOK(t, "unstage", e.unstage(vol, staging))
	}
	if _, err := e.k.InfoByName("dmthin-" + testPool + "-vol"); err == nil {
		t.Errorf("device still active after unstage")
	}
	// Unstaged, publishing a mount volume fails; block ones are published
	// from the device, which publish activates.
	wantCode(t, e.publish(vol, staging, e.path("pods", "p9", "v"), fsCap, false), codes.FailedPrecondition, "staged")
}

// A SINGLE_NODE_SINGLE_WRITER volume is published at one target at a
// time; the other single-node modes may be published at several.
func TestSingleWriterPublish(t *testing.T) {
	e := newDriverEnv(t)
	for _, kind := range []string{"mount", "block"} {
		t.Run(kind, func(t *testing.T) {
			capOf := func(m csi.VolumeCapability_AccessMode_Mode) *csi.VolumeCapability {
				if kind == "block" {
					return blockCap(m)
				}
				return mountCap("", m)
			}
			single := capOf(csi.VolumeCapability_AccessMode_SINGLE_NODE_SINGLE_WRITER)
			vol := e.createVolume("single-" + kind).GetVolumeId()
			staging := e.path("staging", kind)
			first, second := e.path("pods", "p1", kind), e.path("pods", "p2", kind)
			mustOK(t, "stage", e.stage(vol, staging, single, nil))
			mustOK(t, "publish", e.publish(vol, staging, first, single, false))
			mustOK(t, "publish again", e.publish(vol, staging, first, single, false))
			before := e.state()
			wantCode(t, e.publish(vol, staging, second, single, false), codes.FailedPrecondition, "SINGLE_NODE_SINGLE_WRITER", first)
			if after := e.state(); after != before {
				t.Errorf("refused publish changed the state:\n%s\n%s", before, after)
			}
			// Once unpublished, it may go elsewhere.
			mustOK(t, "unpublish", e.unpublish(vol, first))
			mustOK(t, "publish elsewhere", e.publish(vol, staging, second, single, false))
			// Other modes share.
			multi := capOf(csi.VolumeCapability_AccessMode_SINGLE_NODE_MULTI_WRITER)
			mustOK(t, "publish multi-writer beside it", e.publish(vol, staging, first, multi, false))
			mustOK(t, "unpublish", e.unpublish(vol, first))
			mustOK(t, "unpublish", e.unpublish(vol, second))
			mustOK(t, "unstage", e.unstage(vol, staging))
		})
	}
}

func TestNodeExpandVolume(t *testing.T) {
	e := newDriverEnv(t)
	ctx := t.Context()
	vol := e.createVolume("vol").GetVolumeId()
	staging, target := e.path("staging", "vol"), e.path("pods", "p", "vol")
	mustOK(t, "stage", e.stage(vol, staging, fsCap, nil))
	mustOK(t, "publish", e.publish(vol, staging, target, fsCap, false))
	device := e.fs.mountTable()[staging].Source

	resp, err := e.d.NodeExpandVolume(ctx, &csi.NodeExpandVolumeRequest{VolumeId: vol, VolumePath: target, StagingTargetPath: staging,
		CapacityRange: &csi.CapacityRange{RequiredBytes: 3 * testVolBytes}, VolumeCapability: fsCap})
	if err != nil {
		t.Fatal(err)
	}
	if resp.GetCapacityBytes() != 3*testVolBytes {
		t.Errorf("capacity %d, want %d", resp.GetCapacityBytes(), 3*testVolBytes)
	}
	if v, _ := e.pools[testPool].Get("vol"); v.SizeBytes != 3*testVolBytes {
		t.Errorf("thin volume is %d bytes", v.SizeBytes)
	}
	if _, size, _ := e.fs.filesystem(device); size != 3*testVolBytes {
		t.Errorf("filesystem is %d bytes, want %d", size, 3*testVolBytes)
	}
	stats, err := e.d.NodeGetVolumeStats(ctx, &csi.NodeGetVolumeStatsRequest{VolumeId: vol, VolumePath: target})
	if err != nil || stats.GetUsage()[0].GetTotal() != 3*testVolBytes {
		t.Errorf("stats after expansion %v, %v", stats, err)
	}
	// Repeating, or asking for less, changes nothing.
	resp, err = e.d.NodeExpandVolume(ctx, &csi.NodeExpandVolumeRequest{VolumeId: vol, VolumePath: target, CapacityRange: &csi.CapacityRange{RequiredBytes: testVolBytes}})
	if err != nil || resp.GetCapacityBytes() != 3*testVolBytes {
		t.Errorf("shrink request: %v, %v", resp, err)
	}
	runBadCases(t, e, []badCase{
		{"over the limit", func(ctx context.Context, d *Driver) error {
			return ignore(d.NodeExpandVolume(ctx, &csi.NodeExpandVolumeRequest{VolumeId: vol, VolumePath: target,
				CapacityRange: &csi.CapacityRange{RequiredBytes: 4 * testVolBytes, LimitBytes: 2 * testVolBytes}}))
		}, codes.OutOfRange, nil},
		{"missing path", func(ctx context.Context, d *Driver) error {
			return ignore(d.NodeExpandVolume(ctx, &csi.NodeExpandVolumeRequest{VolumeId: vol, VolumePath: e.path("pods", "gone"),
				CapacityRange: &csi.CapacityRange{RequiredBytes: 4 * testVolBytes}}))
		}, codes.NotFound, []string{"volume_path"}},
		{"no room", func(ctx context.Context, d *Driver) error {
			return ignore(d.NodeExpandVolume(ctx, &csi.NodeExpandVolumeRequest{VolumeId: vol, VolumePath: target,
				CapacityRange: &csi.CapacityRange{RequiredBytes: 100 * testPoolBytes}}))
		}, codes.ResourceExhausted, nil},
	})

	// Block: the device grows, no filesystem is touched.
	bvol := e.createVolume("blk").GetVolumeId()
	bstaging, btarget := e.path("staging", "blk"), e.path("pods", "p", "blk")
	mustOK(t, "stage block", e.stage(bvol, bstaging, blockCap(rwo), nil))
	mustOK(t, "publish block", e.publish(bvol, bstaging, btarget, blockCap(rwo), false))
	resp, err = e.d.NodeExpandVolume(ctx, &csi.NodeExpandVolumeRequest{VolumeId: bvol, VolumePath: btarget,
		CapacityRange: &csi.CapacityRange{RequiredBytes: 2 * testVolBytes}, VolumeCapability: blockCap(rwo)})
	if err != nil || resp.GetCapacityBytes() != 2*testVolBytes {
		t.Fatalf("block expand: %v, %v", resp, err)
	}
	if _, size, err := e.k.BlockDevice(e.fs.mountTable()[btarget].Source); err != nil || size != 2*testVolBytes {
		t.Errorf("block device is %d bytes (%v), want %d", size, err, 2*testVolBytes)
	}
	stats, err = e.d.NodeGetVolumeStats(ctx, &csi.NodeGetVolumeStatsRequest{VolumeId: bvol, VolumePath: btarget})
	if err != nil || len(stats.GetUsage()) != 1 || stats.GetUsage()[0].GetTotal() != 2*testVolBytes {
		t.Errorf("block stats %v, %v", stats, err)
	}
}

func TestNodeGetVolumeStats(t *testing.T) {
	e := newDriverEnv(t)
	vol := e.createVolume("vol").GetVolumeId()
	staging, target := e.path("staging", "vol"), e.path("pods", "p", "vol")
	mustOK(t, "stage", e.stage(vol, staging, fsCap, nil))
	mustOK(t, "publish", e.publish(vol, staging, target, fsCap, false))
	resp, err := e.d.NodeGetVolumeStats(t.Context(), &csi.NodeGetVolumeStatsRequest{VolumeId: vol, VolumePath: target})
	if err != nil {
		t.Fatal(err)
	}
	var bytesUsage, inodes *csi.VolumeUsage
	for _, u := range resp.GetUsage() {
		switch u.GetUnit() {
		case csi.VolumeUsage_BYTES:
			bytesUsage = u
		case csi.VolumeUsage_INODES:
			inodes = u
		}
	}
	if bytesUsage.GetTotal() != testVolBytes || bytesUsage.GetUsed()+bytesUsage.GetAvailable() != testVolBytes || bytesUsage.GetUsed() == 0 {
		t.Errorf("bytes %v", bytesUsage)
	}
	if inodes.GetTotal() == 0 || inodes.GetUsed()+inodes.GetAvailable() != inodes.GetTotal() {
		t.Errorf("inodes %v", inodes)
	}
	// A directory in the kubelet dir that is not a mount point.
	plain := e.path("pods", "plain")
	if err := os.MkdirAll(plain, 0o750); err != nil {
		t.Fatal(err)
	}
	runBadCases(t, e, []badCase{
		{"missing path", func(ctx context.Context, d *Driver) error {
			return ignore(d.NodeGetVolumeStats(ctx, &csi.NodeGetVolumeStatsRequest{VolumeId: vol, VolumePath: e.path("pods", "gone")}))
		}, codes.NotFound, []string{"volume_path"}},
		{"not mounted", func(ctx context.Context, d *Driver) error {
			return ignore(d.NodeGetVolumeStats(ctx, &csi.NodeGetVolumeStatsRequest{VolumeId: vol, VolumePath: plain}))
		}, codes.NotFound, []string{"volume_path"}},
	})
}

func TestVolumeHealth(t *testing.T) {
	e := newDriverEnv(t)
	ctx := t.Context()
	vol := e.createVolume("vol").GetVolumeId()
	staging, target := e.path("staging", "vol"), e.path("pods", "p", "vol")
	mustOK(t, "stage", e.stage(vol, staging, fsCap, nil))
	mustOK(t, "publish", e.publish(vol, staging, target, fsCap, false))
	betaVol := e.createVolumeIn(otherPool, "b")

	type health struct{ ctrl, list, node, storage []string }
	check := func() health {
		t.Helper()
		var h health
		reasons := func(es []*csi.VolumeHealth_VolumeHealthEntry) []string {
			var out []string
			for _, en := range es {
				out = append(out, en.GetStatus().String()+":"+en.GetReason())
			}
			return out
		}
		c, err := e.d.ControllerGetVolumeHealth(ctx, &csi.ControllerGetVolumeHealthRequest{VolumeId: vol})
		mustOK(t, "ControllerGetVolumeHealth", err)
		h.ctrl = reasons(c.GetVolumeHealth().GetHealthStatuses())
		l, err := e.d.ControllerListVolumeHealth(ctx, &csi.ControllerListVolumeHealthRequest{})
		mustOK(t, "ControllerListVolumeHealth", err)
		for _, en := range l.GetEntries() {
			for _, r := range reasons(en.GetHealthStatuses()) {
				h.list = append(h.list, en.GetVolumeId()+"="+r)
			}
		}
		n, err := e.d.NodeGetVolumeHealth(ctx, &csi.NodeGetVolumeHealthRequest{VolumeId: vol, VolumePublishPath: target, StagingTargetPath: staging})
		mustOK(t, "NodeGetVolumeHealth", err)
		h.node = reasons(n.GetVolumeHealth().GetHealthStatuses())
		s, err := e.d.NodeGetStorageHealth(ctx, &csi.NodeGetStorageHealthRequest{})
		mustOK(t, "NodeGetStorageHealth", err)
		for _, b := range s.GetBackendHealth() {
			h.storage = append(h.storage, b.GetStatus().String()+":"+b.GetReason())
		}
		return h
	}
	if h := check(); h.ctrl != nil || h.list != nil || h.node != nil || h.storage != nil {
		t.Errorf("healthy pool reports %+v", h)
	}
	if _, err := e.d.Probe(ctx, &csi.ProbeRequest{}); err != nil {
		t.Errorf("Probe of a healthy driver: %v", err)
	}

	// A missing published path is the volume's own problem.
	n, err := e.d.NodeGetVolumeHealth(ctx, &csi.NodeGetVolumeHealthRequest{VolumeId: vol, VolumePublishPath: e.path("pods", "gone")})
	if err != nil || len(n.GetVolumeHealth().GetHealthStatuses()) != 1 || n.GetVolumeHealth().GetHealthStatuses()[0].GetReason() != "PathMissing" {
		t.Errorf("missing path health %v, %v", n, err)
	}

	info, err := e.k.InfoByName("dmthin-" + testPool)
	if err != nil {
		t.Fatal(err)
	}
	if err := e.k.SetNeedsCheck(info.Dev); err != nil {
		t.Fatal(err)
	}
	h := check()
	want := "DEGRADED:PoolNeedsCheck"
	if !slices.Equal(h.ctrl, []string{want}) || !slices.Equal(h.node, []string{want}) {
		t.Errorf("volume health after needs_check: %+v", h)
	}
	if !slices.Equal(h.list, []string{vol + "=" + want}) {
		t.Errorf("listed health %v; want only %s degraded, not %s in the healthy pool", h.list, vol, betaVol)
	}
	if !slices.Equal(h.storage, []string{"STORAGE_DEGRADED:PoolNeedsCheck"}) {
		t.Errorf("storage health %v", h.storage)
	}
	_, err = e.d.Probe(ctx, &csi.ProbeRequest{})
	wantCode(t, err, codes.FailedPrecondition, testPool)

	// A needs_check pool refuses changes, as Unavailable.
	_, err = e.d.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: "refused", VolumeCapabilities: []*csi.VolumeCapability{fsCap}})
	wantCode(t, err, codes.Unavailable)
	// The mounts keep working: unpublish and unstage need no pool change.
	mustOK(t, "unpublish", e.unpublish(vol, target))
	mustOK(t, "unstage", e.unstage(vol, staging))

	if err := e.k.FailPool(info.Dev); err != nil {
		t.Fatal(err)
	}
	if h := check(); !slices.Equal(h.ctrl, []string{"INACCESSIBLE:PoolFailed"}) || !slices.Equal(h.storage, []string{"STORAGE_UNREACHABLE:PoolFailed"}) {
		t.Errorf("health of a failed pool: %+v", h)
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
			return ignore(e.d.NodeExpandVolume(ctx, &csi.NodeExpandVolumeRequest{VolumeId: vol, VolumePath: staging}))
		},
		"DeleteVolume": func() error { return ignore(e.d.DeleteVolume(ctx, &csi.DeleteVolumeRequest{VolumeId: vol})) },
		"CreateSnapshot": func() error {
			return ignore(e.d.CreateSnapshot(ctx, &csi.CreateSnapshotRequest{Name: "s", SourceVolumeId: vol}))
		},
		"CreateVolume clone": func() error {
			return ignore(e.d.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: "c", VolumeCapabilities: []*csi.VolumeCapability{fsCap},
				VolumeContentSource: &csi.VolumeContentSource{Type: &csi.VolumeContentSource_Volume{Volume: &csi.VolumeContentSource_VolumeSource{VolumeId: vol}}}}))
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
	req := &csi.CreateVolumeRequest{
		Name:               "pvc-1",
		Parameters:         map[string]string{"pool": "alpha"},
		Secrets:            map[string]string{"password": "hunter2"},
		VolumeCapabilities: []*csi.VolumeCapability{fsCap},
	}
	orig := proto.Clone(req)
	got, ok := stripSecrets(req).(*csi.CreateVolumeRequest)
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
		"NodeStageVolume":   &csi.NodeStageVolumeRequest{VolumeId: "a/b", Secrets: map[string]string{"k": "hunter2"}, VolumeContext: map[string]string{"c": "d"}},
		"NodePublishVolume": &csi.NodePublishVolumeRequest{VolumeId: "a/b", Secrets: map[string]string{"k": "hunter2"}},
		"CreateSnapshot":    &csi.CreateSnapshotRequest{Name: "s", Secrets: map[string]string{"k": "hunter2"}},
		"NodeExpandVolume":  &csi.NodeExpandVolumeRequest{VolumeId: "a/b", Secrets: map[string]string{"k": "hunter2"}},
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

// An xfs volume is made at least as large as mkfs.xfs accepts, and a clone
// without a size takes its source's.
func TestCreateVolumeSizesXFSAndClones(t *testing.T) {
	d := newDriverEnv(t).d
	ctx := context.Background()
	xfsCap := &csi.VolumeCapability{
		AccessType: &csi.VolumeCapability_Mount{Mount: &csi.VolumeCapability_MountVolume{FsType: "xfs"}},
		AccessMode: &csi.VolumeCapability_AccessMode{Mode: csi.VolumeCapability_AccessMode_SINGLE_NODE_WRITER},
	}
	r, err := d.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: "small-xfs", CapacityRange: &csi.CapacityRange{RequiredBytes: 16 << 20}, VolumeCapabilities: []*csi.VolumeCapability{xfsCap}})
	if err != nil {
		t.Fatal(err)
	}
	if got := r.GetVolume().GetCapacityBytes(); got != minXFSBytes {
		t.Errorf("xfs volume of %d bytes, want %d", got, minXFSBytes)
	}
	if _, err := d.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: "capped-xfs", CapacityRange: &csi.CapacityRange{RequiredBytes: 16 << 20, LimitBytes: 32 << 20}, VolumeCapabilities: []*csi.VolumeCapability{xfsCap}}); status.Code(err) != codes.OutOfRange {
		t.Errorf("xfs volume under a 32 MiB limit: %v, want OutOfRange", err)
	}
	src, err := d.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: "src", CapacityRange: &csi.CapacityRange{RequiredBytes: 64 << 20}, VolumeCapabilities: []*csi.VolumeCapability{mountCap("ext4", csi.VolumeCapability_AccessMode_SINGLE_NODE_WRITER)}})
	if err != nil {
		t.Fatal(err)
	}
	c, err := d.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: "clone", VolumeCapabilities: []*csi.VolumeCapability{mountCap("ext4", csi.VolumeCapability_AccessMode_SINGLE_NODE_WRITER)},
		VolumeContentSource: &csi.VolumeContentSource{Type: &csi.VolumeContentSource_Volume{Volume: &csi.VolumeContentSource_VolumeSource{VolumeId: src.GetVolume().GetVolumeId()}}}})
	if err != nil {
		t.Fatal(err)
	}
	if got := c.GetVolume().GetCapacityBytes(); got != 64<<20 {
		t.Errorf("clone without a size has %d bytes, want its source's %d", got, 64<<20)
	}
}
