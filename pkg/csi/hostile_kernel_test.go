//go:build vmtest

package csi

import (
	"context"
	"fmt"
	"math"
	"os"
	"path/filepath"
	"regexp"
	"sort"
	"strings"
	"testing"
	"time"

	csipb "github.com/container-storage-interface/spec/lib/go/csi"
	"golang.org/x/sys/unix"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"

	"github.com/csi-dmthin/csi-dmthin/pkg/thinpool"
)

// The real server on the real kernel, sent hostile requests over its
// socket: names and IDs with "..", "/", NUL or 10 KiB; unknown pools; fsType
// injection; bad sizes; paths outside the kubelet directory, relative,
// with "..", through links inside it to / and to a mount elsewhere, a
// target that is itself a link to a mount elsewhere; mount flags the
// filesystem refuses; bad capabilities; IDs of other kinds. Each must get
// its code, leave the server answering (a Probe after each), and change
// nothing: the kubelet directory's tree, a sentinel tree and a mount
// outside it, the mount table, the dm devices and the pool's records are
// compared before and after every request.

type hostileClient struct {
	csipb.IdentityClient
	csipb.ControllerClient
	csipb.NodeClient
}

// hostileReq is one request. call returns the RPC's error; for the few a
// hostile caller may have accepted (a volume named "../x" is a CSI name
// like any other, deleting what is not ours succeeds), call also checks
// what was done and undoes it, so that the state compares equal.
type hostileReq struct {
	rpc, what string
	want      codes.Code
	call      func(ctx context.Context) error
}

const hostilePool = "hostile"

func TestHostileKernel(t *testing.T) {
	k := hostKernel(t)
	ctx := t.Context()
	dir := t.TempDir()
	p := openKernelPool(t, k, loopPoolConfig(filepath.Join(dir, "pool"), hostilePool, 512<<20))
	kubelet := filepath.Join(dir, "kubelet")
	sentinel := filepath.Join(dir, "sentinel")
	elsewhere := filepath.Join(dir, "elsewhere") // a mount outside the kubelet directory

	for _, d := range []string{filepath.Join(sentinel, "dir"), elsewhere, filepath.Join(kubelet, "links"), filepath.Join(kubelet, "pods", "p2")} {
		if err := os.MkdirAll(d, 0o750); err != nil {
			t.Fatal(err)
		}
	}
	for _, f := range []string{filepath.Join(sentinel, "keep"), filepath.Join(sentinel, "dir", "file")} {
		if err := os.WriteFile(f, []byte("sentinel"), 0o640); err != nil {
			t.Fatal(err)
		}
	}
	if err := unix.Mount("tmpfs", elsewhere, "tmpfs", 0, "size=1m"); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = unix.Unmount(elsewhere, unix.MNT_DETACH) })
	if err := os.WriteFile(filepath.Join(elsewhere, "data"), []byte("elsewhere"), 0o640); err != nil {
		t.Fatal(err)
	}

	d, err := New(Options{NodeID: testNode, Pools: map[string]Pool{hostilePool: p}, KubeletDir: kubelet, FS: NewHostFS()})
	if err != nil {
		t.Fatal(err)
	}
	conn, err := grpc.NewClient(serveDriver(t, d), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = conn.Close() })
	c := hostileClient{csipb.NewIdentityClient(conn), csipb.NewControllerClient(conn), csipb.NewNodeClient(conn)}

	// What there is to attack: a filesystem volume staged and published, a
	// raw block one staged and published, one never staged, a snapshot, a
	// template.
	const size = 64 << 20
	kpath := func(elem ...string) string { return filepath.Join(append([]string{kubelet}, elem...)...) }
	create := func(name string, cp *csipb.VolumeCapability) string {
		t.Helper()
		resp, err := c.CreateVolume(ctx, &csipb.CreateVolumeRequest{Name: name, CapacityRange: &csipb.CapacityRange{RequiredBytes: size},
			VolumeCapabilities: []*csipb.VolumeCapability{cp}})
		if err != nil {
			t.Fatal(err)
		}
		return resp.GetVolume().GetVolumeId()
	}
	vol, blk, idle := create("vol", fsCap), create("blk", blockCap(rwo)), create("idle", fsCap)
	volStaging, volTarget := kpath("plugins", "staging", "vol"), kpath("pods", "p1", "volumes", "vol")
	blkStaging, blkTarget := kpath("plugins", "staging", "blk"), kpath("pods", "p1", "volumeDevices", "blk")
	idleStaging := kpath("plugins", "staging", "idle")
	for _, s := range []struct {
		id, staging, target string
		cp                  *csipb.VolumeCapability
	}{{vol, volStaging, volTarget, fsCap}, {blk, blkStaging, blkTarget, blockCap(rwo)}} {
		if _, err := c.NodeStageVolume(ctx, &csipb.NodeStageVolumeRequest{VolumeId: s.id, StagingTargetPath: s.staging, VolumeCapability: s.cp}); err != nil {
			t.Fatal(err)
		}
		if _, err := c.NodePublishVolume(ctx, &csipb.NodePublishVolumeRequest{VolumeId: s.id, StagingTargetPath: s.staging, TargetPath: s.target, VolumeCapability: s.cp}); err != nil {
			t.Fatal(err)
		}
	}
	snapResp, err := c.CreateSnapshot(ctx, &csipb.CreateSnapshotRequest{Name: "snap", SourceVolumeId: vol})
	if err != nil {
		t.Fatal(err)
	}
	snap := snapResp.GetSnapshot().GetSnapshotId()
	tmpl := hostilePool + "/" + templateName("ext4", size)
	waitBuilds(t, d)
	if v, err := p.Get(templateName("ext4", size)); err != nil || !v.Sealed {
		t.Fatalf("the template was not built: %+v, %v", v, err)
	}
	links := map[string]string{
		"root": "/", "out": sentinel, "mount": elsewhere, "in": kpath("pods"), "staged": volStaging,
	}
	for name, to := range links {
		if err := os.Symlink(to, kpath("links", name)); err != nil {
			t.Fatal(err)
		}
	}
	// A target that is itself a link: to a mount elsewhere, and to the
	// volume's own published mount.
	if err := os.Symlink(elsewhere, kpath("pods", "p2", "target-link")); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink(volTarget, kpath("pods", "p2", "vol-link")); err != nil {
		t.Fatal(err)
	}

	reqs := hostileRequests(c, hostileEnv{
		kubelet: kubelet, sentinel: sentinel, elsewhere: elsewhere, kpath: kpath,
		vol: vol, blk: blk, idle: idle, snap: snap, tmpl: tmpl,
		volStaging: volStaging, volTarget: volTarget, blkStaging: blkStaging, blkTarget: blkTarget, idleStaging: idleStaging,
		mounted: func(path string) string { return mountFSType(t, path) },
	})

	state := func() string { return hostileState(t, k, p, kubelet, sentinel, elsewhere) }
	counts := map[string]map[codes.Code]int{}
	perCode := map[codes.Code]int{}
	var wronglyAccepted []string
	for _, r := range reqs {
		before := state()
		rctx, cancel := context.WithTimeout(ctx, 2*time.Minute)
		err := r.call(rctx)
		cancel()
		got := status.Code(err)
		if counts[r.rpc] == nil {
			counts[r.rpc] = map[codes.Code]int{}
		}
		counts[r.rpc][got]++
		perCode[got]++
		if got != r.want {
			if got == codes.OK {
				wronglyAccepted = append(wronglyAccepted, r.rpc+" "+r.what)
			}
			t.Errorf("%s %s: %v (%v), want %v", r.rpc, r.what, got, err, r.want)
		}
		if _, err := c.Probe(ctx, &csipb.ProbeRequest{}); err != nil {
			t.Fatalf("after %s %s the server does not answer Probe: %v", r.rpc, r.what, err)
		}
		waitBuilds(t, d)
		if after := state(); after != before {
			t.Errorf("%s %s changed the state:\n%s", r.rpc, r.what, diffLines(before, after))
		}
	}

	// The table.
	rpcs := make([]string, 0, len(counts))
	for r := range counts {
		rpcs = append(rpcs, r)
	}
	sort.Strings(rpcs)
	var allCodes []codes.Code
	for code := range perCode {
		allCodes = append(allCodes, code)
	}
	sort.Slice(allCodes, func(i, j int) bool { return allCodes[i] < allCodes[j] })
	var b strings.Builder
	fmt.Fprintf(&b, "%d hostile requests\n%-28s", len(reqs), "rpc")
	for _, code := range allCodes {
		fmt.Fprintf(&b, " %18s", code)
	}
	fmt.Fprintf(&b, " %6s\n", "total")
	for _, r := range rpcs {
		fmt.Fprintf(&b, "%-28s", r)
		n := 0
		for _, code := range allCodes {
			fmt.Fprintf(&b, " %18d", counts[r][code])
			n += counts[r][code]
		}
		fmt.Fprintf(&b, " %6d\n", n)
	}
	fmt.Fprintf(&b, "%-28s", "all")
	for _, code := range allCodes {
		fmt.Fprintf(&b, " %18d", perCode[code])
	}
	fmt.Fprintf(&b, " %6d\n", len(reqs))
	fmt.Fprintf(&b, "wrongly accepted: %d %v", len(wronglyAccepted), wronglyAccepted)
	t.Log(b.String())
	if len(reqs) < 100 {
		t.Errorf("%d hostile requests, want at least 100", len(reqs))
	}

	// Still whole afterwards: the published volume's data, unpublished
	// and unstaged normally.
	for _, s := range []struct{ id, staging, target string }{{vol, volStaging, volTarget}, {blk, blkStaging, blkTarget}} {
		if _, err := c.NodeUnpublishVolume(ctx, &csipb.NodeUnpublishVolumeRequest{VolumeId: s.id, TargetPath: s.target}); err != nil {
			t.Errorf("unpublish %s: %v", s.id, err)
		}
		if _, err := c.NodeUnstageVolume(ctx, &csipb.NodeUnstageVolumeRequest{VolumeId: s.id, StagingTargetPath: s.staging}); err != nil {
			t.Errorf("unstage %s: %v", s.id, err)
		}
	}
	if m := mountsUnder(t, kubelet); len(m) != 0 {
		t.Errorf("mounts left: %v", m)
	}
}

// hostileEnv is what the requests aim at.
type hostileEnv struct {
	kubelet, sentinel, elsewhere                 string
	kpath                                        func(...string) string
	vol, blk, idle, snap, tmpl                   string
	volStaging, volTarget, blkStaging, blkTarget string
	idleStaging                                  string
	mounted                                      func(path string) string // the fs type mounted there, "" if none
}

// hashedID is a volume or snapshot ID whose device name is a hash: a
// CSI name that is no device name never reaches a path or a dm name as is.
var hashedID = regexp.MustCompile(`^` + hostilePool + `/h_[0-9a-f]{40}$`)

func hostileRequests(c hostileClient, e hostileEnv) []hostileReq {
	var reqs []hostileReq
	add := func(rpc, what string, want codes.Code, call func(ctx context.Context) error) {
		reqs = append(reqs, hostileReq{rpc: rpc, what: what, want: want, call: call})
	}
	const size = 64 << 20
	caps := []*csipb.VolumeCapability{fsCap}
	mountFlags := func(fsType string, flags ...string) *csipb.VolumeCapability {
		cp := mountCap(fsType, rwo)
		cp.GetMount().MountFlags = flags
		return cp
	}
	long := strings.Repeat("n", 10<<10)
	notOurs := []string{"../" + hostilePool + "/vol", hostilePool + "/../vol", hostilePool + "/a/b", hostilePool + "/x\x00y", "gamma/vol", "/etc/passwd", long}
	multiNode := mountCap("", csipb.VolumeCapability_AccessMode_MULTI_NODE_MULTI_WRITER)

	// Paths. lexical: refused on the string (volume_path: NotFound, the
	// spec's "no volume there"); otherwise through a link (InvalidArgument
	// everywhere).
	type badPath struct {
		what, path string
		lexical    bool
	}
	paths := []badPath{
		{"relative", "pods/p1/x", true},
		{"/", "/", true},
		{"the kubelet directory", e.kubelet, true},
		{"dot-dot out", e.kubelet + "/pods/../../sentinel/x", true},
		{"outside", filepath.Join(e.sentinel, "x"), true},
		{"a mount outside", e.elsewhere, true},
		{"10 KiB", e.kubelet + "/" + strings.Repeat("a/", 5<<10), true},
		{"NUL", e.kubelet + "/pods/a\x00b", true},
		{"link to /", e.kpath("links", "root"), false},
		{"through a link to /", e.kpath("links", "root", "tmp", "x"), false},
		{"through a link out", e.kpath("links", "out", "x"), false},
		{"link to a mount outside", e.kpath("links", "mount"), false},
		{"through a link to a mount outside", e.kpath("links", "mount", "x"), false},
		{"through a link inside", e.kpath("links", "in", "p1", "x"), false},
		{"target that is a link to a mount outside", e.kpath("pods", "p2", "target-link"), false},
		{"link to the volume's own published mount", e.kpath("pods", "p2", "vol-link"), false},
	}
	for _, bp := range paths {
		look := codes.InvalidArgument
		if bp.lexical {
			look = codes.NotFound
		}
		add("NodeStageVolume", "staging_target_path "+bp.what, codes.InvalidArgument, func(ctx context.Context) error {
			return ignore(c.NodeStageVolume(ctx, &csipb.NodeStageVolumeRequest{VolumeId: e.idle, StagingTargetPath: bp.path, VolumeCapability: fsCap}))
		})
		add("NodeUnstageVolume", "staging_target_path "+bp.what, codes.InvalidArgument, func(ctx context.Context) error {
			return ignore(c.NodeUnstageVolume(ctx, &csipb.NodeUnstageVolumeRequest{VolumeId: e.vol, StagingTargetPath: bp.path}))
		})
		add("NodePublishVolume", "target_path "+bp.what, codes.InvalidArgument, func(ctx context.Context) error {
			return ignore(c.NodePublishVolume(ctx, &csipb.NodePublishVolumeRequest{VolumeId: e.vol, StagingTargetPath: e.volStaging, TargetPath: bp.path, VolumeCapability: fsCap}))
		})
		add("NodePublishVolume", "staging_target_path "+bp.what, codes.InvalidArgument, func(ctx context.Context) error {
			return ignore(c.NodePublishVolume(ctx, &csipb.NodePublishVolumeRequest{VolumeId: e.vol, StagingTargetPath: bp.path, TargetPath: e.kpath("pods", "p3", "new"), VolumeCapability: fsCap}))
		})
		add("NodeUnpublishVolume", "target_path "+bp.what, codes.InvalidArgument, func(ctx context.Context) error {
			return ignore(c.NodeUnpublishVolume(ctx, &csipb.NodeUnpublishVolumeRequest{VolumeId: e.vol, TargetPath: bp.path}))
		})
		add("NodeGetVolumeStats", "volume_path "+bp.what, look, func(ctx context.Context) error {
			return ignore(c.NodeGetVolumeStats(ctx, &csipb.NodeGetVolumeStatsRequest{VolumeId: e.vol, VolumePath: bp.path}))
		})
		add("NodeExpandVolume", "volume_path "+bp.what, look, func(ctx context.Context) error {
			return ignore(c.NodeExpandVolume(ctx, &csipb.NodeExpandVolumeRequest{VolumeId: e.vol, VolumePath: bp.path, CapacityRange: &csipb.CapacityRange{RequiredBytes: 2 * size}}))
		})
		add("NodeGetVolumeHealth", "volume_publish_path "+bp.what, codes.InvalidArgument, func(ctx context.Context) error {
			return ignore(c.NodeGetVolumeHealth(ctx, &csipb.NodeGetVolumeHealthRequest{VolumeId: e.vol, VolumePublishPath: bp.path}))
		})
	}

	// CreateVolume.
	createReq := func(mod func(*csipb.CreateVolumeRequest)) func(ctx context.Context) error {
		return func(ctx context.Context) error {
			r := &csipb.CreateVolumeRequest{Name: "new", CapacityRange: &csipb.CapacityRange{RequiredBytes: size}, VolumeCapabilities: caps}
			mod(r)
			return ignore(c.CreateVolume(ctx, r))
		}
	}
	add("CreateVolume", "name 10 KiB", codes.InvalidArgument, createReq(func(r *csipb.CreateVolumeRequest) { r.Name = long }))
	add("CreateVolume", "no name", codes.InvalidArgument, createReq(func(r *csipb.CreateVolumeRequest) { r.Name = "" }))
	for _, pool := range []string{"../" + hostilePool, "gamma", hostilePool + "/../x", "HOSTILE"} {
		add("CreateVolume", "parameters.pool "+pool, codes.InvalidArgument, createReq(func(r *csipb.CreateVolumeRequest) {
			r.Parameters = map[string]string{ParamPool: pool}
		}))
	}
	for _, fsType := range []string{"ext4 -O ^has_journal", "xfs;reboot", "../../sbin/mkfs.ext4", "btrfs", "ext4\x00"} {
		add("CreateVolume", "parameters.fsType "+fsType, codes.InvalidArgument, createReq(func(r *csipb.CreateVolumeRequest) {
			r.Parameters = map[string]string{ParamFSType: fsType}
		}))
		add("CreateVolume", "fs_type "+fsType, codes.InvalidArgument, createReq(func(r *csipb.CreateVolumeRequest) {
			r.VolumeCapabilities = []*csipb.VolumeCapability{mountCap(fsType, rwo)}
		}))
	}
	add("CreateVolume", "unknown parameter", codes.InvalidArgument, createReq(func(r *csipb.CreateVolumeRequest) {
		r.Parameters = map[string]string{"mkfsOptions": "-E root_owner=0:0"}
	}))
	for _, cr := range []struct {
		what string
		r    *csipb.CapacityRange
		want codes.Code
	}{
		{"required -1", &csipb.CapacityRange{RequiredBytes: -1}, codes.InvalidArgument},
		{"limit -1", &csipb.CapacityRange{LimitBytes: -1}, codes.InvalidArgument},
		{"required MinInt64", &csipb.CapacityRange{RequiredBytes: math.MinInt64}, codes.InvalidArgument},
		{"required MaxInt64", &csipb.CapacityRange{RequiredBytes: math.MaxInt64}, codes.OutOfRange},
		{"required MaxInt64-4095", &csipb.CapacityRange{RequiredBytes: math.MaxInt64 - 4095}, codes.OutOfRange},
		{"required 2^60+1", &csipb.CapacityRange{RequiredBytes: 1<<60 + 1}, codes.OutOfRange},
		{"required over limit", &csipb.CapacityRange{RequiredBytes: 1 << 30, LimitBytes: 1 << 20}, codes.OutOfRange},
		{"limit under the smallest volume", &csipb.CapacityRange{LimitBytes: 4096}, codes.OutOfRange},
		{"1 PiB", &csipb.CapacityRange{RequiredBytes: 1 << 50}, codes.ResourceExhausted},
		{"2^60", &csipb.CapacityRange{RequiredBytes: 1 << 60}, codes.ResourceExhausted},
	} {
		add("CreateVolume", "capacity_range "+cr.what, cr.want, createReq(func(r *csipb.CreateVolumeRequest) { r.CapacityRange = cr.r }))
	}
	add("CreateVolume", "xfs of 1 PiB", codes.ResourceExhausted, createReq(func(r *csipb.CreateVolumeRequest) {
		r.CapacityRange = &csipb.CapacityRange{RequiredBytes: 1 << 50}
		r.VolumeCapabilities = []*csipb.VolumeCapability{mountCap("xfs", rwo)}
	}))
	add("CreateVolume", "no capabilities", codes.InvalidArgument, createReq(func(r *csipb.CreateVolumeRequest) { r.VolumeCapabilities = nil }))
	add("CreateVolume", "multi-node", codes.InvalidArgument, createReq(func(r *csipb.CreateVolumeRequest) {
		r.VolumeCapabilities = []*csipb.VolumeCapability{multiNode}
	}))
	add("CreateVolume", "no access type", codes.InvalidArgument, createReq(func(r *csipb.CreateVolumeRequest) {
		r.VolumeCapabilities = []*csipb.VolumeCapability{{AccessMode: &csipb.VolumeCapability_AccessMode{Mode: rwo}}}
	}))
	for _, flag := range []string{"noatime,nodev", "bind", "rbind"} {
		add("CreateVolume", "mount flag "+flag, codes.InvalidArgument, createReq(func(r *csipb.CreateVolumeRequest) {
			r.VolumeCapabilities = []*csipb.VolumeCapability{mountFlags("", flag)}
		}))
	}
	snapSource := func(id string) *csipb.VolumeContentSource {
		return &csipb.VolumeContentSource{Type: &csipb.VolumeContentSource_Snapshot{Snapshot: &csipb.VolumeContentSource_SnapshotSource{SnapshotId: id}}}
	}
	volSource := func(id string) *csipb.VolumeContentSource {
		return &csipb.VolumeContentSource{Type: &csipb.VolumeContentSource_Volume{Volume: &csipb.VolumeContentSource_VolumeSource{VolumeId: id}}}
	}
	for _, s := range []struct {
		what string
		src  *csipb.VolumeContentSource
		want codes.Code
	}{
		{"a volume as the snapshot source", snapSource(e.vol), codes.NotFound},
		{"a snapshot as the volume source", volSource(e.snap), codes.NotFound},
		{"a template as the volume source", volSource(e.tmpl), codes.NotFound},
		{"a template as the snapshot source", snapSource(e.tmpl), codes.NotFound},
		{"snapshot ../", snapSource(hostilePool + "/../snap"), codes.NotFound},
		{"snapshot in an unknown pool", snapSource("gamma/snap"), codes.NotFound},
		{"empty snapshot ID", snapSource(""), codes.InvalidArgument},
	} {
		add("CreateVolume", "volume_content_source "+s.what, s.want, createReq(func(r *csipb.CreateVolumeRequest) { r.VolumeContentSource = s.src }))
	}
	add("CreateVolume", "requisite topology of another node", codes.ResourceExhausted, createReq(func(r *csipb.CreateVolumeRequest) {
		r.AccessibilityRequirements = &csipb.TopologyRequirement{Requisite: []*csipb.Topology{{Segments: map[string]string{TopologyKey: "other-node"}}}}
	}))
	// A CSI name is any string: one with "..", "/" or NUL makes a volume
	// whose device name is a hash of it, and nothing else.
	for _, name := range []string{"../../etc/passwd", "a/b/../c", "x\x00y", "/"} {
		add("CreateVolume", fmt.Sprintf("name %q (accepted, hashed, deleted)", name), codes.OK, func(ctx context.Context) error {
			resp, err := c.CreateVolume(ctx, &csipb.CreateVolumeRequest{Name: name, CapacityRange: &csipb.CapacityRange{RequiredBytes: size}, VolumeCapabilities: caps})
			if err != nil {
				return err
			}
			id := resp.GetVolume().GetVolumeId()
			if !hashedID.MatchString(id) {
				return status.Errorf(codes.Internal, "name %q made volume %q, not a hashed one", name, id)
			}
			_, err = c.DeleteVolume(ctx, &csipb.DeleteVolumeRequest{VolumeId: id})
			return err
		})
	}

	// DeleteVolume and the other controller calls.
	add("DeleteVolume", "no ID", codes.InvalidArgument, func(ctx context.Context) error {
		return ignore(c.DeleteVolume(ctx, &csipb.DeleteVolumeRequest{}))
	})
	add("DeleteVolume", "a snapshot", codes.NotFound, func(ctx context.Context) error {
		return ignore(c.DeleteVolume(ctx, &csipb.DeleteVolumeRequest{VolumeId: e.snap}))
	})
	add("DeleteVolume", "a template", codes.NotFound, func(ctx context.Context) error {
		return ignore(c.DeleteVolume(ctx, &csipb.DeleteVolumeRequest{VolumeId: e.tmpl}))
	})
	for _, id := range notOurs {
		// Deleting what is not there succeeds.
		add("DeleteVolume", fmt.Sprintf("not ours %.40q (accepted)", id), codes.OK, func(ctx context.Context) error {
			return ignore(c.DeleteVolume(ctx, &csipb.DeleteVolumeRequest{VolumeId: id}))
		})
		add("ControllerGetVolume", fmt.Sprintf("not ours %.40q", id), codes.NotFound, func(ctx context.Context) error {
			return ignore(c.ControllerGetVolume(ctx, &csipb.ControllerGetVolumeRequest{VolumeId: id}))
		})
		add("NodeStageVolume", fmt.Sprintf("volume_id not ours %.40q", id), codes.NotFound, func(ctx context.Context) error {
			return ignore(c.NodeStageVolume(ctx, &csipb.NodeStageVolumeRequest{VolumeId: id, StagingTargetPath: e.idleStaging, VolumeCapability: fsCap}))
		})
		add("GetSnapshot", fmt.Sprintf("not ours %.40q", id), codes.NotFound, func(ctx context.Context) error {
			return ignore(c.GetSnapshot(ctx, &csipb.GetSnapshotRequest{SnapshotId: id}))
		})
	}
	for _, id := range []string{e.snap, e.tmpl} {
		add("ControllerGetVolume", "not a volume "+id, codes.NotFound, func(ctx context.Context) error {
			return ignore(c.ControllerGetVolume(ctx, &csipb.ControllerGetVolumeRequest{VolumeId: id}))
		})
		add("ValidateVolumeCapabilities", "not a volume "+id, codes.NotFound, func(ctx context.Context) error {
			return ignore(c.ValidateVolumeCapabilities(ctx, &csipb.ValidateVolumeCapabilitiesRequest{VolumeId: id, VolumeCapabilities: caps}))
		})
		add("ControllerGetVolumeHealth", "not a volume "+id, codes.NotFound, func(ctx context.Context) error {
			return ignore(c.ControllerGetVolumeHealth(ctx, &csipb.ControllerGetVolumeHealthRequest{VolumeId: id}))
		})
		add("NodeStageVolume", "not a volume "+id, codes.NotFound, func(ctx context.Context) error {
			return ignore(c.NodeStageVolume(ctx, &csipb.NodeStageVolumeRequest{VolumeId: id, StagingTargetPath: e.idleStaging, VolumeCapability: fsCap}))
		})
		add("NodePublishVolume", "not a volume "+id, codes.NotFound, func(ctx context.Context) error {
			return ignore(c.NodePublishVolume(ctx, &csipb.NodePublishVolumeRequest{VolumeId: id, StagingTargetPath: e.volStaging, TargetPath: e.kpath("pods", "p3", "new"), VolumeCapability: fsCap}))
		})
		add("NodeGetVolumeStats", "not a volume "+id, codes.NotFound, func(ctx context.Context) error {
			return ignore(c.NodeGetVolumeStats(ctx, &csipb.NodeGetVolumeStatsRequest{VolumeId: id, VolumePath: e.volTarget}))
		})
		add("NodeExpandVolume", "not a volume "+id, codes.NotFound, func(ctx context.Context) error {
			return ignore(c.NodeExpandVolume(ctx, &csipb.NodeExpandVolumeRequest{VolumeId: id, VolumePath: e.volTarget, CapacityRange: &csipb.CapacityRange{RequiredBytes: 2 * size}}))
		})
		add("CreateSnapshot", "source not a volume "+id, codes.NotFound, func(ctx context.Context) error {
			return ignore(c.CreateSnapshot(ctx, &csipb.CreateSnapshotRequest{Name: "snap2", SourceVolumeId: id}))
		})
	}
	add("ValidateVolumeCapabilities", "no ID", codes.InvalidArgument, func(ctx context.Context) error {
		return ignore(c.ValidateVolumeCapabilities(ctx, &csipb.ValidateVolumeCapabilitiesRequest{VolumeCapabilities: caps}))
	})
	add("ValidateVolumeCapabilities", "no capabilities", codes.InvalidArgument, func(ctx context.Context) error {
		return ignore(c.ValidateVolumeCapabilities(ctx, &csipb.ValidateVolumeCapabilitiesRequest{VolumeId: e.vol}))
	})
	add("ValidateVolumeCapabilities", "multi-node (answered, not confirmed)", codes.OK, func(ctx context.Context) error {
		resp, err := c.ValidateVolumeCapabilities(ctx, &csipb.ValidateVolumeCapabilitiesRequest{VolumeId: e.vol, VolumeCapabilities: []*csipb.VolumeCapability{multiNode}})
		if err == nil && (resp.GetConfirmed() != nil || resp.GetMessage() == "") {
			return status.Errorf(codes.Internal, "confirmed a multi-node capability: %v", resp)
		}
		return err
	})
	for _, token := range []string{"abc", "-1", "99999999999999999999", "1e3"} {
		add("ListVolumes", "starting_token "+token, codes.Aborted, func(ctx context.Context) error {
			return ignore(c.ListVolumes(ctx, &csipb.ListVolumesRequest{StartingToken: token}))
		})
		add("ListSnapshots", "starting_token "+token, codes.Aborted, func(ctx context.Context) error {
			return ignore(c.ListSnapshots(ctx, &csipb.ListSnapshotsRequest{StartingToken: token}))
		})
	}
	add("ListVolumes", "max_entries -1", codes.InvalidArgument, func(ctx context.Context) error {
		return ignore(c.ListVolumes(ctx, &csipb.ListVolumesRequest{MaxEntries: -1}))
	})
	add("ListSnapshots", "max_entries -1", codes.InvalidArgument, func(ctx context.Context) error {
		return ignore(c.ListSnapshots(ctx, &csipb.ListSnapshotsRequest{MaxEntries: -1}))
	})
	add("ControllerListVolumeHealth", "starting_token abc", codes.Aborted, func(ctx context.Context) error {
		return ignore(c.ControllerListVolumeHealth(ctx, &csipb.ControllerListVolumeHealthRequest{StartingToken: "abc"}))
	})
	for _, params := range []map[string]string{{ParamPool: "../x"}, {ParamFSType: "ext4 -F"}, {"mkfsOptions": "x"}} {
		add("GetCapacity", fmt.Sprintf("parameters %v", params), codes.InvalidArgument, func(ctx context.Context) error {
			return ignore(c.GetCapacity(ctx, &csipb.GetCapacityRequest{Parameters: params}))
		})
	}
	add("CreateSnapshot", "no name", codes.InvalidArgument, func(ctx context.Context) error {
		return ignore(c.CreateSnapshot(ctx, &csipb.CreateSnapshotRequest{SourceVolumeId: e.vol}))
	})
	add("CreateSnapshot", "name 10 KiB", codes.InvalidArgument, func(ctx context.Context) error {
		return ignore(c.CreateSnapshot(ctx, &csipb.CreateSnapshotRequest{Name: long, SourceVolumeId: e.vol}))
	})
	add("CreateSnapshot", "no source", codes.InvalidArgument, func(ctx context.Context) error {
		return ignore(c.CreateSnapshot(ctx, &csipb.CreateSnapshotRequest{Name: "snap2"}))
	})
	add("CreateSnapshot", "parameters", codes.InvalidArgument, func(ctx context.Context) error {
		return ignore(c.CreateSnapshot(ctx, &csipb.CreateSnapshotRequest{Name: "snap2", SourceVolumeId: e.vol, Parameters: map[string]string{"pool": "../x"}}))
	})
	for _, src := range []string{hostilePool + "/../vol", "gamma/vol", "../" + e.vol} {
		add("CreateSnapshot", "source "+src, codes.NotFound, func(ctx context.Context) error {
			return ignore(c.CreateSnapshot(ctx, &csipb.CreateSnapshotRequest{Name: "snap2", SourceVolumeId: src}))
		})
	}
	add("CreateSnapshot", `name "../snap" (accepted, hashed, deleted)`, codes.OK, func(ctx context.Context) error {
		resp, err := c.CreateSnapshot(ctx, &csipb.CreateSnapshotRequest{Name: "../snap", SourceVolumeId: e.vol})
		if err != nil {
			return err
		}
		if id := resp.GetSnapshot().GetSnapshotId(); !hashedID.MatchString(strings.TrimPrefix(id, testNode+"/")) {
			return status.Errorf(codes.Internal, "snapshot %q, not a hashed one", id)
		}
		_, err = c.DeleteSnapshot(ctx, &csipb.DeleteSnapshotRequest{SnapshotId: resp.GetSnapshot().GetSnapshotId()})
		return err
	})
	add("DeleteSnapshot", "no ID", codes.InvalidArgument, func(ctx context.Context) error {
		return ignore(c.DeleteSnapshot(ctx, &csipb.DeleteSnapshotRequest{}))
	})
	add("DeleteSnapshot", "a volume", codes.NotFound, func(ctx context.Context) error {
		return ignore(c.DeleteSnapshot(ctx, &csipb.DeleteSnapshotRequest{SnapshotId: e.vol}))
	})
	add("DeleteSnapshot", "a template", codes.NotFound, func(ctx context.Context) error {
		return ignore(c.DeleteSnapshot(ctx, &csipb.DeleteSnapshotRequest{SnapshotId: e.tmpl}))
	})
	add("DeleteSnapshot", "../../x (accepted)", codes.OK, func(ctx context.Context) error {
		return ignore(c.DeleteSnapshot(ctx, &csipb.DeleteSnapshotRequest{SnapshotId: "../../x"}))
	})
	add("GetSnapshot", "a volume", codes.NotFound, func(ctx context.Context) error {
		return ignore(c.GetSnapshot(ctx, &csipb.GetSnapshotRequest{SnapshotId: e.vol}))
	})
	add("ControllerPublishVolume", "not offered", codes.Unimplemented, func(ctx context.Context) error {
		return ignore(c.ControllerPublishVolume(ctx, &csipb.ControllerPublishVolumeRequest{VolumeId: e.vol, NodeId: "other-node", VolumeCapability: fsCap}))
	})
	add("ControllerUnpublishVolume", "not offered", codes.Unimplemented, func(ctx context.Context) error {
		return ignore(c.ControllerUnpublishVolume(ctx, &csipb.ControllerUnpublishVolumeRequest{VolumeId: e.vol, NodeId: "other-node"}))
	})
	add("ControllerModifyVolume", "not offered, parameters", codes.Unimplemented, func(ctx context.Context) error {
		return ignore(c.ControllerModifyVolume(ctx, &csipb.ControllerModifyVolumeRequest{VolumeId: e.vol, MutableParameters: map[string]string{ParamPool: "../x"}}))
	})
	add("ControllerExpandVolume", "not offered, MaxInt64", codes.Unimplemented, func(ctx context.Context) error {
		return ignore(c.ControllerExpandVolume(ctx, &csipb.ControllerExpandVolumeRequest{VolumeId: e.vol, CapacityRange: &csipb.CapacityRange{RequiredBytes: math.MaxInt64}}))
	})

	// NodeStageVolume: capabilities and mount flags. The flags validation
	// refuses come back before anything is done; the kernel's refusals
	// after idle was activated and formatted, which the call undoes.
	stageIdle := func(cp *csipb.VolumeCapability) func(ctx context.Context) error {
		return func(ctx context.Context) error {
			return ignore(c.NodeStageVolume(ctx, &csipb.NodeStageVolumeRequest{VolumeId: e.idle, StagingTargetPath: e.idleStaging, VolumeCapability: cp}))
		}
	}
	add("NodeStageVolume", "no volume_id", codes.InvalidArgument, func(ctx context.Context) error {
		return ignore(c.NodeStageVolume(ctx, &csipb.NodeStageVolumeRequest{StagingTargetPath: e.idleStaging, VolumeCapability: fsCap}))
	})
	add("NodeStageVolume", "no capability", codes.InvalidArgument, stageIdle(nil))
	add("NodeStageVolume", "multi-node", codes.InvalidArgument, stageIdle(multiNode))
	add("NodeStageVolume", "fs_type btrfs", codes.InvalidArgument, stageIdle(mountCap("btrfs", rwo)))
	add("NodeStageVolume", "fs_type injection", codes.InvalidArgument, stageIdle(mountCap("ext4 -E root_owner", rwo)))
	for _, flags := range [][]string{
		{"noatime,nodev"}, {"bind"}, {"rbind"}, {"remount"}, {"make-shared"}, {""}, {"a\nb"},
		// Refused by the kernel, by name or together.
		{"context=system_u:object_r:container_file_t:s0"}, {"nouuid"}, {"errors=never"}, {"no-such-option"}, {"data=journal", "delalloc"},
	} {
		add("NodeStageVolume", fmt.Sprintf("mount_flags %q", flags), codes.InvalidArgument, stageIdle(mountFlags("ext4", flags...)))
	}
	add("NodeStageVolume", "an xfs option on ext4", codes.InvalidArgument, func(ctx context.Context) error {
		return ignore(c.NodeStageVolume(ctx, &csipb.NodeStageVolumeRequest{VolumeId: e.idle, StagingTargetPath: e.idleStaging,
			VolumeCapability: mountFlags("ext4", "logbufs=999")}))
	})
	add("NodeStageVolume", "onto another volume's staging mount", codes.AlreadyExists, func(ctx context.Context) error {
		return ignore(c.NodeStageVolume(ctx, &csipb.NodeStageVolumeRequest{VolumeId: e.idle, StagingTargetPath: e.volStaging, VolumeCapability: fsCap}))
	})
	add("NodeStageVolume", "volume_context fsType injection (ignored, staged ext4, unstaged)", codes.OK, func(ctx context.Context) error {
		_, err := c.NodeStageVolume(ctx, &csipb.NodeStageVolumeRequest{VolumeId: e.idle, StagingTargetPath: e.idleStaging, VolumeCapability: fsCap,
			VolumeContext: map[string]string{ParamFSType: "xfs -f; reboot"}})
		if err != nil {
			return err
		}
		if got := e.mounted(e.idleStaging); got != "ext4" {
			return status.Errorf(codes.Internal, "staged as %q", got)
		}
		_, err = c.NodeUnstageVolume(ctx, &csipb.NodeUnstageVolumeRequest{VolumeId: e.idle, StagingTargetPath: e.idleStaging})
		return err
	})
	add("NodeUnstageVolume", "while published", codes.FailedPrecondition, func(ctx context.Context) error {
		return ignore(c.NodeUnstageVolume(ctx, &csipb.NodeUnstageVolumeRequest{VolumeId: e.vol, StagingTargetPath: e.volStaging}))
	})
	add("NodeUnstageVolume", "block while published", codes.FailedPrecondition, func(ctx context.Context) error {
		return ignore(c.NodeUnstageVolume(ctx, &csipb.NodeUnstageVolumeRequest{VolumeId: e.blk, StagingTargetPath: e.blkStaging}))
	})
	add("NodeUnstageVolume", "another volume's staging mount", codes.FailedPrecondition, func(ctx context.Context) error {
		return ignore(c.NodeUnstageVolume(ctx, &csipb.NodeUnstageVolumeRequest{VolumeId: e.idle, StagingTargetPath: e.volStaging}))
	})
	add("NodeUnstageVolume", "volume_id ../x", codes.NotFound, func(ctx context.Context) error {
		return ignore(c.NodeUnstageVolume(ctx, &csipb.NodeUnstageVolumeRequest{VolumeId: "../x", StagingTargetPath: e.volStaging}))
	})

	// NodePublishVolume and NodeUnpublishVolume across volumes.
	publish := func(id, staging, target string, cp *csipb.VolumeCapability) func(ctx context.Context) error {
		return func(ctx context.Context) error {
			return ignore(c.NodePublishVolume(ctx, &csipb.NodePublishVolumeRequest{VolumeId: id, StagingTargetPath: staging, TargetPath: target, VolumeCapability: cp}))
		}
	}
	unpublish := func(id, target string) func(ctx context.Context) error {
		return func(ctx context.Context) error {
			return ignore(c.NodeUnpublishVolume(ctx, &csipb.NodeUnpublishVolumeRequest{VolumeId: id, TargetPath: target}))
		}
	}
	add("NodePublishVolume", "not staged", codes.FailedPrecondition, publish(e.idle, e.idleStaging, e.kpath("pods", "p3", "idle"), fsCap))
	add("NodePublishVolume", "onto another volume's target", codes.AlreadyExists, publish(e.idle, e.idleStaging, e.volTarget, fsCap))
	add("NodePublishVolume", "block onto a filesystem's target", codes.AlreadyExists, publish(e.blk, e.blkStaging, e.volTarget, blockCap(rwo)))
	add("NodePublishVolume", "filesystem onto a block target", codes.AlreadyExists, publish(e.vol, e.volStaging, e.blkTarget, fsCap))
	add("NodePublishVolume", "onto another volume's staging mount", codes.AlreadyExists, publish(e.idle, e.idleStaging, e.volStaging, fsCap))
	add("NodePublishVolume", "multi-node", codes.InvalidArgument, publish(e.vol, e.volStaging, e.kpath("pods", "p3", "new"), multiNode))
	add("NodePublishVolume", "mount flag bind", codes.InvalidArgument, publish(e.vol, e.volStaging, e.kpath("pods", "p3", "new"), mountFlags("", "bind")))
	add("NodeUnpublishVolume", "another volume's target", codes.FailedPrecondition, unpublish(e.idle, e.volTarget))
	add("NodeUnpublishVolume", "a block target for a filesystem volume", codes.FailedPrecondition, unpublish(e.vol, e.blkTarget))
	add("NodeUnpublishVolume", "a filesystem target for a block volume", codes.FailedPrecondition, unpublish(e.blk, e.volTarget))
	add("NodeUnpublishVolume", "another volume's staging mount", codes.FailedPrecondition, unpublish(e.idle, e.volStaging))
	add("NodeUnpublishVolume", "no volume_id", codes.InvalidArgument, unpublish("", e.volTarget))

	// NodeGetVolumeStats and NodeExpandVolume: IDs and sizes.
	add("NodeGetVolumeStats", "no volume_path", codes.InvalidArgument, func(ctx context.Context) error {
		return ignore(c.NodeGetVolumeStats(ctx, &csipb.NodeGetVolumeStatsRequest{VolumeId: e.vol}))
	})
	add("NodeGetVolumeStats", "volume in an unknown pool", codes.NotFound, func(ctx context.Context) error {
		return ignore(c.NodeGetVolumeStats(ctx, &csipb.NodeGetVolumeStatsRequest{VolumeId: "gamma/vol", VolumePath: e.volTarget}))
	})
	for _, cr := range []struct {
		what string
		r    *csipb.CapacityRange
		want codes.Code
	}{
		{"required MaxInt64", &csipb.CapacityRange{RequiredBytes: math.MaxInt64}, codes.OutOfRange},
		{"required MaxInt64-4095", &csipb.CapacityRange{RequiredBytes: math.MaxInt64 - 4095}, codes.OutOfRange},
		{"required 2^60+1", &csipb.CapacityRange{RequiredBytes: 1<<60 + 1}, codes.OutOfRange},
		{"required -1", &csipb.CapacityRange{RequiredBytes: -1}, codes.InvalidArgument},
		{"limit -1", &csipb.CapacityRange{RequiredBytes: 2 * size, LimitBytes: -1}, codes.InvalidArgument},
		{"required over limit", &csipb.CapacityRange{RequiredBytes: 4 * size, LimitBytes: 2 * size}, codes.OutOfRange},
		{"1 PiB", &csipb.CapacityRange{RequiredBytes: 1 << 50}, codes.ResourceExhausted},
	} {
		for _, target := range []string{e.volTarget, e.blkTarget} {
			add("NodeExpandVolume", cr.what+" at "+filepath.Base(target), cr.want, func(ctx context.Context) error {
				id := e.vol
				if target == e.blkTarget {
					id = e.blk
				}
				return ignore(c.NodeExpandVolume(ctx, &csipb.NodeExpandVolumeRequest{VolumeId: id, VolumePath: target, CapacityRange: cr.r}))
			})
		}
	}
	add("NodeExpandVolume", "multi-node", codes.InvalidArgument, func(ctx context.Context) error {
		return ignore(c.NodeExpandVolume(ctx, &csipb.NodeExpandVolumeRequest{VolumeId: e.vol, VolumePath: e.volTarget, VolumeCapability: multiNode, CapacityRange: &csipb.CapacityRange{RequiredBytes: 2 * size}}))
	})
	add("NodeGetVolumeHealth", "staging_target_path outside", codes.InvalidArgument, func(ctx context.Context) error {
		return ignore(c.NodeGetVolumeHealth(ctx, &csipb.NodeGetVolumeHealthRequest{VolumeId: e.vol, StagingTargetPath: e.sentinel}))
	})
	add("NodeGetVolumeHealth", "volume_id ../x", codes.NotFound, func(ctx context.Context) error {
		return ignore(c.NodeGetVolumeHealth(ctx, &csipb.NodeGetVolumeHealthRequest{VolumeId: "../x"}))
	})
	return reqs
}

// waitBuilds waits (bounded) until no template is being built: a build
// changes the pool in the background.
func waitBuilds(t *testing.T, d *Driver) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Minute)
	for {
		d.templates.mu.Lock()
		n := len(d.templates.building)
		d.templates.mu.Unlock()
		if n == 0 {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%d template builds still running", n)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// hostileState is everything a request could change: the trees under the
// kubelet directory, the sentinel directory and the mount outside (names,
// types, sizes), the mount table, the dm devices and the pool's records.
func hostileState(t *testing.T, k *thinpool.HostKernel, p *thinpool.Pool, trees ...string) string {
	t.Helper()
	var b strings.Builder
	for _, tree := range trees {
		err := filepath.WalkDir(tree, func(path string, d os.DirEntry, err error) error {
			if err != nil {
				return err
			}
			size := int64(-1)
			if d.Type().IsRegular() {
				if fi, err := d.Info(); err == nil {
					size = fi.Size()
				}
			}
			fmt.Fprintf(&b, "file %s %v %d\n", path, d.Type(), size)
			return nil
		})
		if err != nil {
			t.Fatal(err)
		}
	}
	mi, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		t.Fatal(err)
	}
	for _, l := range strings.Split(strings.TrimSpace(string(mi)), "\n") {
		b.WriteString("mount " + l + "\n")
	}
	list, err := k.List()
	if err != nil {
		t.Fatal(err)
	}
	sort.Slice(list, func(i, j int) bool { return list[i].Name < list[j].Name })
	for _, d := range list {
		fmt.Fprintf(&b, "dm %s %s\n", d.Name, d.Dev)
	}
	for _, v := range p.List() {
		fmt.Fprintf(&b, "record %s %s %d active=%v deleting=%v sealed=%v source=%s\n", v.Name, v.Kind, v.SizeBytes, v.Active, v.Deleting, v.Sealed, v.Source)
	}
	return b.String()
}

// diffLines shows the lines only one side has.
func diffLines(before, after string) string {
	count := func(s string) map[string]int {
		m := map[string]int{}
		for _, l := range strings.Split(s, "\n") {
			m[l]++
		}
		return m
	}
	b, a := count(before), count(after)
	var out []string
	for l, n := range b {
		if a[l] < n {
			out = append(out, "- "+l)
		}
	}
	for l, n := range a {
		if b[l] < n {
			out = append(out, "+ "+l)
		}
	}
	sort.Strings(out)
	return strings.Join(out, "\n")
}

// mountFSType returns the type of the filesystem mounted at path, "" if
// none, from the kernel's table.
func mountFSType(t *testing.T, path string) string {
	t.Helper()
	mi, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		t.Fatal(err)
	}
	for _, l := range strings.Split(string(mi), "\n") {
		f := strings.Fields(l)
		if len(f) < 10 || f[4] != path {
			continue
		}
		for i, x := range f {
			if x == "-" && i+1 < len(f) {
				return f[i+1]
			}
		}
	}
	return ""
}
