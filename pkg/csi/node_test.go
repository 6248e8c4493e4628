package csi

import (
	"context"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	csipb "github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc/codes"
)

// The driver over real thinpool.Pools on a FakeKernel and the fake FS, on
// the host under -race. Handlers are called directly; sanity_test.go goes
// through gRPC.

// stage and publish helpers
func (e *driverEnv) stage(vol, staging string, c *csipb.VolumeCapability, volCtx map[string]string) error {
	_, err := e.d.NodeStageVolume(e.t.Context(), &csipb.NodeStageVolumeRequest{VolumeId: vol, StagingTargetPath: staging, VolumeCapability: c, VolumeContext: volCtx})
	return err
}

func (e *driverEnv) publish(vol, staging, target string, c *csipb.VolumeCapability, readonly bool) error {
	_, err := e.d.NodePublishVolume(e.t.Context(), &csipb.NodePublishVolumeRequest{VolumeId: vol, StagingTargetPath: staging, TargetPath: target, VolumeCapability: c, Readonly: readonly})
	return err
}

func (e *driverEnv) unpublish(vol, target string) error {
	_, err := e.d.NodeUnpublishVolume(e.t.Context(), &csipb.NodeUnpublishVolumeRequest{VolumeId: vol, TargetPath: target})
	return err
}

func (e *driverEnv) unstage(vol, staging string) error {
	_, err := e.d.NodeUnstageVolume(e.t.Context(), &csipb.NodeUnstageVolumeRequest{VolumeId: vol, StagingTargetPath: staging})
	return err
}

// mounted creates a filesystem volume, stages it and publishes it.
func (e *driverEnv) mounted(name string) (vol, staging, target string) {
	e.t.Helper()
	vol = e.createVolume(name).GetVolumeId()
	staging, target = e.path("staging", name), e.path("pods", "p", name)
	mustOK(e.t, "stage", e.stage(vol, staging, fsCap, nil))
	mustOK(e.t, "publish", e.publish(vol, staging, target, fsCap, false))
	return vol, staging, target
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
			if _, err := e.d.DeleteVolume(t.Context(), &csipb.DeleteVolumeRequest{VolumeId: vol}); err != nil {
				t.Fatal(err)
			}
		})
	}
}

func TestNodeFSTypeFromContext(t *testing.T) {
	e := newDriverEnv(t)
	resp, err := e.d.CreateVolume(t.Context(), &csipb.CreateVolumeRequest{Name: "x", VolumeCapabilities: []*csipb.VolumeCapability{fsCap},
		CapacityRange: &csipb.CapacityRange{RequiredBytes: testVolBytes}, Parameters: map[string]string{ParamFSType: "xfs"}})
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
			capOf := func(m csipb.VolumeCapability_AccessMode_Mode) *csipb.VolumeCapability {
				if kind == "block" {
					return blockCap(m)
				}
				return mountCap("", m)
			}
			single := capOf(csipb.VolumeCapability_AccessMode_SINGLE_NODE_SINGLE_WRITER)
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
			multi := capOf(csipb.VolumeCapability_AccessMode_SINGLE_NODE_MULTI_WRITER)
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
	vol, staging, target := e.mounted("vol")
	device := e.fs.mountTable()[staging].Source

	resp, err := e.d.NodeExpandVolume(ctx, &csipb.NodeExpandVolumeRequest{VolumeId: vol, VolumePath: target, StagingTargetPath: staging,
		CapacityRange: &csipb.CapacityRange{RequiredBytes: 3 * testVolBytes}, VolumeCapability: fsCap})
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
	stats, err := e.d.NodeGetVolumeStats(ctx, &csipb.NodeGetVolumeStatsRequest{VolumeId: vol, VolumePath: target})
	if err != nil || stats.GetUsage()[0].GetTotal() != 3*testVolBytes {
		t.Errorf("stats after expansion %v, %v", stats, err)
	}
	// Repeating, or asking for less, changes nothing.
	resp, err = e.d.NodeExpandVolume(ctx, &csipb.NodeExpandVolumeRequest{VolumeId: vol, VolumePath: target, CapacityRange: &csipb.CapacityRange{RequiredBytes: testVolBytes}})
	if err != nil || resp.GetCapacityBytes() != 3*testVolBytes {
		t.Errorf("shrink request: %v, %v", resp, err)
	}
	runBadCases(t, e, []badCase{
		{"over the limit", func(ctx context.Context, d *Driver) error {
			return ignore(d.NodeExpandVolume(ctx, &csipb.NodeExpandVolumeRequest{VolumeId: vol, VolumePath: target,
				CapacityRange: &csipb.CapacityRange{RequiredBytes: 4 * testVolBytes, LimitBytes: 2 * testVolBytes}}))
		}, codes.OutOfRange, nil},
		{"missing path", func(ctx context.Context, d *Driver) error {
			return ignore(d.NodeExpandVolume(ctx, &csipb.NodeExpandVolumeRequest{VolumeId: vol, VolumePath: e.path("pods", "gone"),
				CapacityRange: &csipb.CapacityRange{RequiredBytes: 4 * testVolBytes}}))
		}, codes.NotFound, []string{"volume_path"}},
		{"no room", func(ctx context.Context, d *Driver) error {
			return ignore(d.NodeExpandVolume(ctx, &csipb.NodeExpandVolumeRequest{VolumeId: vol, VolumePath: target,
				CapacityRange: &csipb.CapacityRange{RequiredBytes: 100 * testPoolBytes}}))
		}, codes.ResourceExhausted, nil},
	})

	// Block: the device grows, no filesystem is touched.
	bvol := e.createVolume("blk").GetVolumeId()
	bstaging, btarget := e.path("staging", "blk"), e.path("pods", "p", "blk")
	mustOK(t, "stage block", e.stage(bvol, bstaging, blockCap(rwo), nil))
	mustOK(t, "publish block", e.publish(bvol, bstaging, btarget, blockCap(rwo), false))
	resp, err = e.d.NodeExpandVolume(ctx, &csipb.NodeExpandVolumeRequest{VolumeId: bvol, VolumePath: btarget,
		CapacityRange: &csipb.CapacityRange{RequiredBytes: 2 * testVolBytes}, VolumeCapability: blockCap(rwo)})
	if err != nil || resp.GetCapacityBytes() != 2*testVolBytes {
		t.Fatalf("block expand: %v, %v", resp, err)
	}
	if _, size, err := e.k.BlockDevice(e.fs.mountTable()[btarget].Source); err != nil || size != 2*testVolBytes {
		t.Errorf("block device is %d bytes (%v), want %d", size, err, 2*testVolBytes)
	}
	stats, err = e.d.NodeGetVolumeStats(ctx, &csipb.NodeGetVolumeStatsRequest{VolumeId: bvol, VolumePath: btarget})
	if err != nil || len(stats.GetUsage()) != 1 || stats.GetUsage()[0].GetTotal() != 2*testVolBytes {
		t.Errorf("block stats %v, %v", stats, err)
	}
}

func TestNodeGetVolumeStats(t *testing.T) {
	e := newDriverEnv(t)
	vol, _, target := e.mounted("vol")
	resp, err := e.d.NodeGetVolumeStats(t.Context(), &csipb.NodeGetVolumeStatsRequest{VolumeId: vol, VolumePath: target})
	if err != nil {
		t.Fatal(err)
	}
	var bytesUsage, inodes *csipb.VolumeUsage
	for _, u := range resp.GetUsage() {
		switch u.GetUnit() {
		case csipb.VolumeUsage_BYTES:
			bytesUsage = u
		case csipb.VolumeUsage_INODES:
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
			return ignore(d.NodeGetVolumeStats(ctx, &csipb.NodeGetVolumeStatsRequest{VolumeId: vol, VolumePath: e.path("pods", "gone")}))
		}, codes.NotFound, []string{"volume_path"}},
		{"not mounted", func(ctx context.Context, d *Driver) error {
			return ignore(d.NodeGetVolumeStats(ctx, &csipb.NodeGetVolumeStatsRequest{VolumeId: vol, VolumePath: plain}))
		}, codes.NotFound, []string{"volume_path"}},
	})
}

func TestVolumeHealth(t *testing.T) {
	e := newDriverEnv(t)
	ctx := t.Context()
	vol, staging, target := e.mounted("vol")
	betaVol := e.createVolumeIn(otherPool, "b")

	type health struct{ ctrl, list, node, storage []string }
	check := func() health {
		t.Helper()
		var h health
		reasons := func(es []*csipb.VolumeHealth_VolumeHealthEntry) []string {
			var out []string
			for _, en := range es {
				out = append(out, en.GetStatus().String()+":"+en.GetReason())
			}
			return out
		}
		c, err := e.d.ControllerGetVolumeHealth(ctx, &csipb.ControllerGetVolumeHealthRequest{VolumeId: vol})
		mustOK(t, "ControllerGetVolumeHealth", err)
		h.ctrl = reasons(c.GetVolumeHealth().GetHealthStatuses())
		l, err := e.d.ControllerListVolumeHealth(ctx, &csipb.ControllerListVolumeHealthRequest{})
		mustOK(t, "ControllerListVolumeHealth", err)
		for _, en := range l.GetEntries() {
			for _, r := range reasons(en.GetHealthStatuses()) {
				h.list = append(h.list, en.GetVolumeId()+"="+r)
			}
		}
		n, err := e.d.NodeGetVolumeHealth(ctx, &csipb.NodeGetVolumeHealthRequest{VolumeId: vol, VolumePublishPath: target, StagingTargetPath: staging})
		mustOK(t, "NodeGetVolumeHealth", err)
		h.node = reasons(n.GetVolumeHealth().GetHealthStatuses())
		s, err := e.d.NodeGetStorageHealth(ctx, &csipb.NodeGetStorageHealthRequest{})
		mustOK(t, "NodeGetStorageHealth", err)
		for _, b := range s.GetBackendHealth() {
			h.storage = append(h.storage, b.GetStatus().String()+":"+b.GetReason())
		}
		return h
	}
	if h := check(); h.ctrl != nil || h.list != nil || h.node != nil || h.storage != nil {
		t.Errorf("healthy pool reports %+v", h)
	}
	if _, err := e.d.Probe(ctx, &csipb.ProbeRequest{}); err != nil {
		t.Errorf("Probe of a healthy driver: %v", err)
	}

	// A missing published path is the volume's own problem.
	n, err := e.d.NodeGetVolumeHealth(ctx, &csipb.NodeGetVolumeHealthRequest{VolumeId: vol, VolumePublishPath: e.path("pods", "gone")})
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
	_, err = e.d.Probe(ctx, &csipb.ProbeRequest{})
	wantCode(t, err, codes.FailedPrecondition, testPool)

	// A needs_check pool refuses changes, as Unavailable.
	_, err = e.d.CreateVolume(ctx, &csipb.CreateVolumeRequest{Name: "refused", VolumeCapabilities: []*csipb.VolumeCapability{fsCap}})
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

// A request missing a field the spec requires is InvalidArgument naming
// the field, and changes nothing.
func TestNodeRequiredFields(t *testing.T) {
	e := newDriverEnv(t)
	vol := e.createVolume("vol").GetVolumeId()
	staging, target := e.path("staging", "vol"), e.path("pods", "p1", "vol")
	noMode := &csipb.VolumeCapability{AccessType: &csipb.VolumeCapability_Mount{Mount: &csipb.VolumeCapability_MountVolume{}}}
	type R = badCase
	cases := []badCase{
		// A missing field is InvalidArgument even when the ID is not ours.
		R{"NodeStageVolume/staging_target_path, bad ID", func(ctx context.Context, d *Driver) error {
			return ignore(d.NodeStageVolume(ctx, &csipb.NodeStageVolumeRequest{VolumeId: "not-an-id", VolumeCapability: fsCap}))
		}, codes.InvalidArgument, []string{"staging_target_path"}},
		R{"NodePublishVolume/volume_capability, bad ID", func(ctx context.Context, d *Driver) error {
			return ignore(d.NodePublishVolume(ctx, &csipb.NodePublishVolumeRequest{VolumeId: "not-an-id", TargetPath: target, StagingTargetPath: staging}))
		}, codes.InvalidArgument, []string{"volume_capability"}},
		R{"NodeGetVolumeStats/volume_path, bad ID", func(ctx context.Context, d *Driver) error {
			return ignore(d.NodeGetVolumeStats(ctx, &csipb.NodeGetVolumeStatsRequest{VolumeId: "not-an-id"}))
		}, codes.InvalidArgument, []string{"volume_path"}},
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

func TestNodeUnknownIDs(t *testing.T) {
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
		)
	}
	// A snapshot is not a volume, nor the other way round.
	cases = append(cases,
		badCase{"NodeStageVolume/a snapshot", func(ctx context.Context, d *Driver) error {
			return ignore(d.NodeStageVolume(ctx, &csipb.NodeStageVolumeRequest{VolumeId: snap, StagingTargetPath: staging, VolumeCapability: fsCap}))
		}, codes.NotFound, []string{"snapshot"}},
	)
	runBadCases(t, e, cases)
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

func TestNodeMultiNodeAccessModes(t *testing.T) {
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
}
