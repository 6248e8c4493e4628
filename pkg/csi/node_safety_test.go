package csi

import (
	"context"
	"errors"
	"math"
	"os"
	"path/filepath"
	"strings"
	"testing"

	csipb "github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc/codes"

	"github.com/csi-dmthin/csi-dmthin/internal/safepath"
)

// treeListing lists everything under dir, links as links.
func treeListing(t *testing.T, dir string) string {
	t.Helper()
	var b strings.Builder
	err := filepath.WalkDir(dir, func(p string, d os.DirEntry, err error) error {
		if err != nil {
			return err
		}
		b.WriteString(p + " " + d.Type().String() + "\n")
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return b.String()
}

// Paths through symbolic links inside the kubelet directory are refused
// by every node call, whatever the link points at (outside, /, a mount
// elsewhere, or back inside), and nothing inside or outside changes.
func TestNodePathsThroughLinks(t *testing.T) {
	e := newDriverEnv(t)
	ctx := t.Context()
	vol, staging, target := e.mounted("vol")
	blk := e.createVolume("blk").GetVolumeId()

	// Outside: a sentinel tree, and a "mount elsewhere" (the fake's mount
	// table, on a volume of its own).
	outside := t.TempDir()
	if err := os.MkdirAll(filepath.Join(outside, "dir", "sub"), 0o750); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(outside, "dir", "file"), []byte("keep"), 0o640); err != nil {
		t.Fatal(err)
	}
	elsewhereRoot, err := safepath.NewRoot(outside)
	if err != nil {
		t.Fatal(err)
	}
	elsewhere := filepath.Join(outside, "mnt")
	if _, err := elsewhereRoot.MkdirAll(elsewhere, 0o750); err != nil {
		t.Fatal(err)
	}
	ep, err := elsewhereRoot.Lookup(elsewhere)
	if err != nil {
		t.Fatal(err)
	}
	defer ep.Close()
	other := e.createVolume("other").GetVolumeId()
	otherDev, err := e.pools[testPool].Activate(ctx, "other")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := e.fs.Format(ctx, otherDev, "ext4", FormatOptions{}); err != nil {
		t.Fatal(err)
	}
	if err := e.fs.Mount(ctx, otherDev, ep, "ext4", nil); err != nil {
		t.Fatal(err)
	}

	links := map[string]string{
		"out":       outside,
		"out-dir":   filepath.Join(outside, "dir"),
		"root":      "/",
		"mount":     elsewhere,
		"rel-out":   "../../" + filepath.Base(outside),
		"inside":    e.path("pods"),
		"staged":    staging, // a link to this volume's own staging mount
		"published": target,
	}
	if err := os.MkdirAll(e.path("links"), 0o750); err != nil {
		t.Fatal(err)
	}
	for name, to := range links {
		if err := os.Symlink(to, e.path("links", name)); err != nil {
			t.Fatal(err)
		}
	}
	// Paths: the link last, and in the middle.
	var paths []string
	for name := range links {
		paths = append(paths, e.path("links", name), e.path("links", name, "x"), e.path("links", name, "x", "y"))
	}
	outsideBefore := treeListing(t, outside)
	var cases []badCase
	for _, p := range paths {
		what := strings.TrimPrefix(p, e.kubeletDir)
		cases = append(cases,
			badCase{"NodeStageVolume" + what, func(ctx context.Context, d *Driver) error {
				return ignore(d.NodeStageVolume(ctx, &csipb.NodeStageVolumeRequest{VolumeId: other, StagingTargetPath: p, VolumeCapability: fsCap}))
			}, codes.InvalidArgument, []string{"staging_target_path"}},
			badCase{"NodeUnstageVolume" + what, func(ctx context.Context, d *Driver) error {
				return ignore(d.NodeUnstageVolume(ctx, &csipb.NodeUnstageVolumeRequest{VolumeId: other, StagingTargetPath: p}))
			}, codes.InvalidArgument, []string{"staging_target_path"}},
			badCase{"NodePublishVolume target" + what, func(ctx context.Context, d *Driver) error {
				return ignore(d.NodePublishVolume(ctx, &csipb.NodePublishVolumeRequest{VolumeId: vol, TargetPath: p, StagingTargetPath: staging, VolumeCapability: fsCap}))
			}, codes.InvalidArgument, []string{"target_path"}},
			badCase{"NodePublishVolume block target" + what, func(ctx context.Context, d *Driver) error {
				return ignore(d.NodePublishVolume(ctx, &csipb.NodePublishVolumeRequest{VolumeId: blk, TargetPath: p, StagingTargetPath: staging, VolumeCapability: blockCap(rwo)}))
			}, codes.InvalidArgument, []string{"target_path"}},
			badCase{"NodePublishVolume staging" + what, func(ctx context.Context, d *Driver) error {
				return ignore(d.NodePublishVolume(ctx, &csipb.NodePublishVolumeRequest{VolumeId: vol, TargetPath: e.path("pods", "q", "v"), StagingTargetPath: p, VolumeCapability: fsCap}))
			}, codes.InvalidArgument, []string{"staging_target_path"}},
			badCase{"NodeUnpublishVolume" + what, func(ctx context.Context, d *Driver) error {
				return ignore(d.NodeUnpublishVolume(ctx, &csipb.NodeUnpublishVolumeRequest{VolumeId: vol, TargetPath: p}))
			}, codes.InvalidArgument, []string{"target_path"}},
			badCase{"NodeGetVolumeStats" + what, func(ctx context.Context, d *Driver) error {
				return ignore(d.NodeGetVolumeStats(ctx, &csipb.NodeGetVolumeStatsRequest{VolumeId: vol, VolumePath: p}))
			}, codes.InvalidArgument, []string{"volume_path"}},
			badCase{"NodeExpandVolume" + what, func(ctx context.Context, d *Driver) error {
				return ignore(d.NodeExpandVolume(ctx, &csipb.NodeExpandVolumeRequest{VolumeId: vol, VolumePath: p,
					CapacityRange: &csipb.CapacityRange{RequiredBytes: 2 * testVolBytes}}))
			}, codes.InvalidArgument, []string{"volume_path"}},
			badCase{"NodeGetVolumeHealth" + what, func(ctx context.Context, d *Driver) error {
				return ignore(d.NodeGetVolumeHealth(ctx, &csipb.NodeGetVolumeHealthRequest{VolumeId: vol, VolumePublishPath: p}))
			}, codes.InvalidArgument, []string{"volume_publish_path"}},
		)
	}
	runBadCases(t, e, cases)
	if after := treeListing(t, outside); after != outsideBefore {
		t.Errorf("outside changed:\n%s\n%s", outsideBefore, after)
	}
	if m, ok := e.fs.mountTable()[elsewhere]; !ok || m.Source != otherDev {
		t.Errorf("the mount elsewhere is gone: %+v", m)
	}
	for _, p := range []string{"/x", "/y"} {
		if _, err := os.Lstat(p); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("%s was made: %v", p, err)
		}
	}
	// The links themselves are gone through no call, and the volume's own
	// mounts are as they were.
	for _, p := range []string{staging, target} {
		if _, ok := e.fs.mountTable()[p]; !ok {
			t.Errorf("%s is no longer mounted", p)
		}
	}
	if err := e.fs.Unmount(ctx, ep); err != nil {
		t.Fatal(err)
	}
}

// A failed NodeStageVolume leaves the volume as it found it: the device it
// activated is deactivated (and not recorded active, which would bring it
// back at every start), the directories it made are gone; a device that
// was active before stays active.
func TestStageFailureUndoes(t *testing.T) {
	e := newDriverEnv(t)
	active := func(name string) bool {
		t.Helper()
		v, err := e.pools[testPool].Get(name)
		if err != nil {
			t.Fatal(err)
		}
		_, devErr := e.pools[testPool].DevicePath(name)
		if v.Active != (devErr == nil) {
			t.Fatalf("%s: recorded active %v, device active %v", name, v.Active, devErr == nil)
		}
		return v.Active
	}
	staging := e.path("plugins", "new", "deeper", "staging")
	failMount := errors.New("mount failed (injected)")
	for _, tc := range []struct {
		name     string
		prepare  func(vol string) // before the stage
		c        *csipb.VolumeCapability
		hook     func(cancel context.CancelFunc) error
		wantCode codes.Code
	}{
		{"mount fails", nil, fsCap, func(context.CancelFunc) error { return failMount }, codes.Internal},
		{"mount cancelled", nil, fsCap, func(cancel context.CancelFunc) error { cancel(); return context.Canceled }, codes.Canceled},
		{"format refuses", func(vol string) {
			mustOK(t, "stage as ext4", e.stage(vol, e.path("s", "first"), fsCap, nil))
			mustOK(t, "unstage", e.unstage(vol, e.path("s", "first")))
		}, mountCap("xfs", rwo), nil, codes.Internal},
		{"option refused", nil, func() *csipb.VolumeCapability {
			c := mountCap("ext4", rwo)
			c.GetMount().MountFlags = []string{"noatime", "nouuid"}
			return c
		}(), nil, codes.InvalidArgument},
	} {
		t.Run(tc.name, func(t *testing.T) {
			name := strings.ReplaceAll(tc.name, " ", "-")
			vol := e.createVolume(name).GetVolumeId()
			if tc.prepare != nil {
				tc.prepare(vol)
			}
			ctx, cancel := context.WithCancel(t.Context())
			defer cancel()
			if tc.hook != nil {
				e.fs.setMountHook(func(string) error { return tc.hook(cancel) })
				defer e.fs.setMountHook(nil)
			}
			before := e.state()
			_, err := e.d.NodeStageVolume(ctx, &csipb.NodeStageVolumeRequest{VolumeId: vol, StagingTargetPath: staging, VolumeCapability: tc.c})
			wantCode(t, err, tc.wantCode)
			if active(name) {
				t.Error("the failed stage left the device active")
			}
			if after := e.state(); after != before {
				t.Errorf("the failed stage changed the state:\nbefore:\n%s\nafter:\n%s", before, after)
			}
			if _, err := os.Lstat(e.path("plugins")); !errors.Is(err, os.ErrNotExist) {
				t.Errorf("the directories the stage made are left: %v", err)
			}
		})
	}

	// Active before (a raw block volume published elsewhere): stays so.
	vol := e.createVolume("published").GetVolumeId()
	mustOK(t, "stage block", e.stage(vol, e.path("blk", "staging"), blockCap(rwo), nil))
	mustOK(t, "publish block", e.publish(vol, e.path("blk", "staging"), e.path("pods", "blk", "dev"), blockCap(rwo), false))
	e.fs.setMountHook(func(string) error { return failMount })
	before := e.state()
	wantCode(t, e.stage(vol, staging, fsCap, nil), codes.Internal)
	e.fs.setMountHook(nil)
	if !active("published") {
		t.Error("the failed stage deactivated a device published elsewhere")
	}
	if after := e.state(); after != before {
		t.Errorf("the failed stage changed the state:\nbefore:\n%s\nafter:\n%s", before, after)
	}
}

// A failed NodePublishVolume undoes too: the target and the directories
// it made, and a raw block volume's device it activated.
func TestPublishFailureUndoes(t *testing.T) {
	e := newDriverEnv(t)
	vol, staging, _ := e.mounted("vol")
	blk := e.createVolume("blk").GetVolumeId()
	e.fs.setMountHook(func(string) error { return errors.New("bind failed (injected)") })
	before := e.state()
	wantCode(t, e.publish(vol, staging, e.path("pods", "new", "mount"), fsCap, false), codes.Internal)
	wantCode(t, e.publish(blk, e.path("unused"), e.path("pods", "new2", "dev"), blockCap(rwo), false), codes.Internal)
	e.fs.setMountHook(nil)
	if after := e.state(); after != before {
		t.Errorf("failed publishes changed the state:\nbefore:\n%s\nafter:\n%s", before, after)
	}
	if v, _ := e.pools[testPool].Get("blk"); v.Active {
		t.Error("a failed block publish left the device recorded active")
	}
}

// Mount flags that cannot be one filesystem option are refused before
// anything is done; those the filesystem refuses are refused at the mount
// and undone. Both are InvalidArgument naming the field.
func TestMountFlagsInvalid(t *testing.T) {
	e := newDriverEnv(t)
	vol := e.createVolume("vol").GetVolumeId()
	staging, target := e.path("staging", "vol"), e.path("pods", "p", "vol")
	withFlags := func(flags ...string) *csipb.VolumeCapability {
		c := mountCap("ext4", rwo)
		c.GetMount().MountFlags = flags
		return c
	}
	var cases []badCase
	for _, flags := range [][]string{
		{"noatime,nodev"}, {"bind"}, {"rbind"}, {"remount"}, {"rshared"}, {""}, {"noatime", "a\nb"},
		{strings.Repeat("o", 5000)}, {`context="a,b",nodev`},
		// The filesystem's refusals, at the mount.
		{"context=system_u:object_r:container_file_t:s0"}, {"no-such-option"}, {"errors=never"}, {"nouuid"},
	} {
		c := withFlags(flags...)
		name := strings.Join(flags, "+")
		if len(name) > 40 {
			name = name[:40]
		}
		cases = append(cases,
			badCase{"NodeStageVolume/" + name, func(ctx context.Context, d *Driver) error {
				return ignore(d.NodeStageVolume(ctx, &csipb.NodeStageVolumeRequest{VolumeId: vol, StagingTargetPath: staging, VolumeCapability: c}))
			}, codes.InvalidArgument, []string{"volume_capability.mount.mount_flags"}})
		if _, params := mountArgs(flags); checkMountFlags("f", flags) != nil || len(params) == 0 {
			// Refused in validation: by every call taking a capability.
			cases = append(cases,
				badCase{"NodePublishVolume/" + name, func(ctx context.Context, d *Driver) error {
					return ignore(d.NodePublishVolume(ctx, &csipb.NodePublishVolumeRequest{VolumeId: vol, StagingTargetPath: staging, TargetPath: target, VolumeCapability: c}))
				}, codes.InvalidArgument, []string{"volume_capability.mount.mount_flags"}},
				badCase{"CreateVolume/" + name, func(ctx context.Context, d *Driver) error {
					return ignore(d.CreateVolume(ctx, &csipb.CreateVolumeRequest{Name: "new", VolumeCapabilities: []*csipb.VolumeCapability{c}}))
				}, codes.InvalidArgument, []string{"volume_capabilities[0].mount.mount_flags"}})
		}
	}
	runBadCases(t, e, cases)
	// A quoted comma is a value, not a list.
	if err := checkMountFlags("f", []string{`context="system_u:object_r:container_file_t:s0:c1,c2"`}); err != nil {
		t.Errorf("a quoted SELinux context: %v", err)
	}
	mustOK(t, "stage with good flags", e.stage(vol, staging, withFlags("noatime", "nodev", "errors=remount-ro", "_netdev"), nil))
}

// Sizes are bounded before any arithmetic: near MaxInt64 the round-up to
// 4 KiB overflowed, and NodeExpandVolume answered OK without growing.
func TestSizesBounded(t *testing.T) {
	e := newDriverEnv(t)
	vol, _, target := e.mounted("vol")
	var cases []badCase
	for _, n := range []int64{math.MaxInt64, math.MaxInt64 - 4095, 1<<60 + 1, 1 << 62} {
		cases = append(cases,
			badCase{"CreateVolume/" + strings.TrimSpace(fmtBytes(n)), func(ctx context.Context, d *Driver) error {
				return ignore(d.CreateVolume(ctx, &csipb.CreateVolumeRequest{Name: "huge", VolumeCapabilities: []*csipb.VolumeCapability{fsCap},
					CapacityRange: &csipb.CapacityRange{RequiredBytes: n}}))
			}, codes.OutOfRange, []string{"capacity_range.required_bytes"}},
			badCase{"NodeExpandVolume/" + fmtBytes(n), func(ctx context.Context, d *Driver) error {
				return ignore(d.NodeExpandVolume(ctx, &csipb.NodeExpandVolumeRequest{VolumeId: vol, VolumePath: target,
					CapacityRange: &csipb.CapacityRange{RequiredBytes: n}}))
			}, codes.OutOfRange, []string{"capacity_range.required_bytes"}},
		)
	}
	for _, r := range []*csipb.CapacityRange{{RequiredBytes: -1}, {LimitBytes: -1}, {RequiredBytes: math.MinInt64}} {
		cases = append(cases,
			badCase{"CreateVolume/negative", func(ctx context.Context, d *Driver) error {
				return ignore(d.CreateVolume(ctx, &csipb.CreateVolumeRequest{Name: "neg", VolumeCapabilities: []*csipb.VolumeCapability{fsCap}, CapacityRange: r}))
			}, codes.InvalidArgument, []string{"capacity_range"}},
			badCase{"NodeExpandVolume/negative", func(ctx context.Context, d *Driver) error {
				return ignore(d.NodeExpandVolume(ctx, &csipb.NodeExpandVolumeRequest{VolumeId: vol, VolumePath: target, CapacityRange: r}))
			}, codes.InvalidArgument, []string{"capacity_range"}},
		)
	}
	runBadCases(t, e, cases)
	// A limit beyond 2^60 is no limit.
	resp, err := e.d.CreateVolume(t.Context(), &csipb.CreateVolumeRequest{Name: "limited", VolumeCapabilities: []*csipb.VolumeCapability{fsCap},
		CapacityRange: &csipb.CapacityRange{RequiredBytes: testVolBytes, LimitBytes: math.MaxInt64}})
	if err != nil || resp.GetVolume().GetCapacityBytes() != testVolBytes {
		t.Errorf("a huge limit: %v, %v", resp, err)
	}
	if v, _ := e.pools[testPool].Get("vol"); v.SizeBytes != testVolBytes {
		t.Errorf("the volume changed size: %d", v.SizeBytes)
	}
}

// A target where another volume (or anything else) is mounted is neither
// taken for this volume's publish nor unmounted by this volume's
// unpublish.
func TestTargetsOfOtherVolumes(t *testing.T) {
	e := newDriverEnv(t)
	a, aStaging, aTarget := e.mounted("a")
	b, bStaging, bTarget := e.mounted("b")
	blk := e.createVolume("blk").GetVolumeId()
	blkTarget := e.path("pods", "p", "blk")
	mustOK(t, "stage block", e.stage(blk, e.path("staging", "blk"), blockCap(rwo), nil))
	mustOK(t, "publish block", e.publish(blk, e.path("staging", "blk"), blkTarget, blockCap(rwo), false))
	idle := e.createVolume("idle").GetVolumeId()
	runBadCases(t, e, []badCase{
		{"publish a onto b's target", func(ctx context.Context, d *Driver) error {
			return e.publish(a, aStaging, bTarget, fsCap, false)
		}, codes.AlreadyExists, []string{"target_path", "not volume " + a}},
		{"publish a onto the block target", func(ctx context.Context, d *Driver) error {
			return e.publish(a, aStaging, blkTarget, fsCap, false)
		}, codes.AlreadyExists, []string{"target_path"}},
		{"publish block onto a's target", func(ctx context.Context, d *Driver) error {
			return e.publish(blk, e.path("staging", "blk"), aTarget, blockCap(rwo), false)
		}, codes.AlreadyExists, []string{"target_path"}},
		{"publish an inactive volume onto a's target", func(ctx context.Context, d *Driver) error {
			return e.publish(idle, e.path("staging", "idle"), aTarget, blockCap(rwo), false)
		}, codes.AlreadyExists, []string{"not active"}},
		{"unpublish a at b's target", func(ctx context.Context, d *Driver) error {
			return e.unpublish(a, bTarget)
		}, codes.FailedPrecondition, []string{"target_path", "not volume " + a}},
		{"unpublish a at b's staging", func(ctx context.Context, d *Driver) error {
			return e.unpublish(a, bStaging)
		}, codes.FailedPrecondition, []string{"target_path"}},
		{"unpublish a at the block target", func(ctx context.Context, d *Driver) error {
			return e.unpublish(a, blkTarget)
		}, codes.FailedPrecondition, []string{"target_path"}},
		{"unpublish the block volume at a's target", func(ctx context.Context, d *Driver) error {
			return e.unpublish(blk, aTarget)
		}, codes.FailedPrecondition, []string{"target_path"}},
		{"unpublish an inactive volume at a's target", func(ctx context.Context, d *Driver) error {
			return e.unpublish(idle, aTarget)
		}, codes.FailedPrecondition, []string{"not active"}},
	})
	// Their own are fine, and repeated.
	for range 2 {
		mustOK(t, "publish a again", e.publish(a, aStaging, aTarget, fsCap, false))
		mustOK(t, "publish block again", e.publish(blk, e.path("staging", "blk"), blkTarget, blockCap(rwo), false))
	}
	mustOK(t, "unpublish b", e.unpublish(b, bTarget))
	mustOK(t, "unpublish block", e.unpublish(blk, blkTarget))
}
