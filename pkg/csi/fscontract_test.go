package csi

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/csi-dmthin/csi-dmthin/internal/safepath"
	"github.com/csi-dmthin/csi-dmthin/pkg/thinpool"
	"github.com/csi-dmthin/csi-dmthin/pkg/thinpool/thinpooltest"
)

// The FS contract: what the driver relies on, run against fakeFS on
// FakeKernel here and against the real FS on the real kernel in the VM
// (sanity_kernel_test.go), so the fake cannot drift from what the kernel,
// mkfs and resize2fs do.
func runFSContract(t *testing.T, k thinpool.Kernel, fs FS) {
	ctx := t.Context()
	dir := t.TempDir()
	p, err := thinpool.Open(ctx, loopPoolConfig(filepath.Join(dir, "pool"), "fscontract", 256<<20), k)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = p.Close() })
	kubelet := filepath.Join(dir, "kubelet")
	root, err := safepath.NewRoot(kubelet)
	if err != nil {
		t.Fatal(err)
	}
	lookup := func(elem ...string) *safepath.Path {
		t.Helper()
		sp, err := root.Lookup(filepath.Join(append([]string{kubelet}, elem...)...))
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { sp.Close() })
		return sp
	}
	mounted := map[*safepath.Path]bool{}
	t.Cleanup(func() {
		for m := range mounted {
			_ = fs.Unmount(context.Background(), m)
		}
		for _, v := range p.List() {
			_ = p.Delete(context.Background(), v.Name)
		}
	})
	mkdir := func(elem ...string) *safepath.Path {
		t.Helper()
		if _, err := root.MkdirAll(filepath.Join(append([]string{kubelet}, elem...)...), 0o750); err != nil {
			t.Fatal(err)
		}
		return lookup(elem...)
	}
	mount := func(device string, target *safepath.Path, fstype string, opts ...string) error {
		err := fs.Mount(ctx, device, target, fstype, opts)
		if err == nil {
			mounted[target] = true
		}
		return err
	}
	bind := func(source, target *safepath.Path, ro bool) error {
		err := fs.BindMount(ctx, source, target, ro)
		if err == nil {
			mounted[target] = true
		}
		return err
	}
	unmount := func(sp *safepath.Path) {
		t.Helper()
		if err := fs.Unmount(ctx, sp); err != nil {
			t.Fatalf("unmount %s: %v", sp, err)
		}
		delete(mounted, sp)
	}
	isMount := func(sp *safepath.Path) bool {
		t.Helper()
		m, err := fs.IsMountPoint(sp)
		if err != nil {
			t.Fatalf("IsMountPoint(%s): %v", sp, err)
		}
		return m
	}
	refs := func(sp *safepath.Path) []string {
		t.Helper()
		r, err := fs.MountRefs(sp)
		if err != nil {
			t.Fatalf("MountRefs(%s): %v", sp, err)
		}
		slices.Sort(r)
		return r
	}
	if _, err := p.CreateVolume(ctx, "vol", 64<<20); err != nil {
		t.Fatal(err)
	}
	device, err := p.Activate(ctx, "vol")
	if err != nil {
		t.Fatal(err)
	}

	// A new thin volume reads as zeros: no filesystem.
	if typ, err := fs.FSType(device); typ != "" || err != nil {
		t.Fatalf("FSType of a new volume: %q, %v", typ, err)
	}
	// Mounting what holds no filesystem, or onto a missing target, fails.
	staging := mkdir("staging")
	if err := mount(device, staging, "ext4"); err == nil {
		t.Fatal("mounted a volume without a filesystem")
	}
	if formatted, err := fs.Format(ctx, device, "ext4", FormatOptions{}); !formatted || err != nil {
		t.Fatalf("Format: %v, %v", formatted, err)
	}
	if formatted, err := fs.Format(ctx, device, "ext4", FormatOptions{}); formatted || err != nil {
		t.Fatalf("Format again: %v, %v; want nothing done", formatted, err)
	}
	if _, err := fs.Format(ctx, device, "xfs", FormatOptions{}); err == nil {
		t.Fatal("reformatted an ext4 volume as xfs")
	}
	if typ, err := fs.FSType(device); typ != "ext4" || err != nil {
		t.Fatalf("FSType: %q, %v", typ, err)
	}
	if err := mount(device, lookup("missing"), "ext4"); err == nil {
		t.Fatal("mounted onto a missing target")
	}
	if err := mount(device, staging, "xfs"); err == nil {
		t.Fatal("mounted ext4 as xfs")
	}
	// Options the filesystem refuses, each by name: the caller's mistake.
	for _, opt := range []string{"bind", "rbind", "nouuid", "no-such-option", "foo=bar", "context=system_u:object_r:container_file_t:s0", "errors=never"} {
		if err := mount(device, staging, "ext4", "noatime", opt); !errors.Is(err, ErrMountOption) || !strings.Contains(err.Error(), opt) {
			t.Errorf("mount -o noatime,%s: %v; want ErrMountOption naming it", opt, err)
		}
	}
	if isMount(staging) {
		t.Fatal("a failed mount left a mount point")
	}
	if err := mount(device, staging, "ext4", "noatime", "nodev", "errors=remount-ro"); err != nil {
		t.Fatal(err)
	}
	if !isMount(staging) {
		t.Fatal("not a mount point after Mount")
	}
	if src, err := fs.MountedDevice(staging); err != nil || (src != device && !sameDevice(src, device)) {
		t.Errorf("MountedDevice = %q, %v; want %s", src, err, device)
	}
	st, err := fs.Stats(staging)
	if err != nil || st.TotalBytes <= 0 || st.TotalBytes > 64<<20 || st.AvailableBytes > st.TotalBytes || st.TotalInodes <= 0 {
		t.Errorf("Stats: %+v, %v", st, err)
	}
	// A mounted filesystem holds its device open.
	if err := p.Deactivate(ctx, "vol"); !errors.Is(err, thinpool.ErrBusy) {
		t.Errorf("Deactivate of a mounted volume: %v, want ErrBusy", err)
	}

	// Bind mounts: each is a reference of the other.
	target := mkdir("pods", "a")
	if err := bind(staging, target, false); err != nil {
		t.Fatal(err)
	}
	if r := refs(staging); !slices.Equal(r, []string{target.String()}) {
		t.Errorf("MountRefs(staging) = %v, want [%s]", r, target)
	}
	if r := refs(target); !slices.Equal(r, []string{staging.String()}) {
		t.Errorf("MountRefs(target) = %v, want [%s]", r, staging)
	}
	if r := refs(mkdir("plain")); len(r) != 0 {
		t.Errorf("MountRefs of a directory that is no mount point: %v", r)
	}
	shows := func(sp *safepath.Path, device string) bool {
		t.Helper()
		ok, err := fs.ShowsDevice(sp, device)
		if err != nil {
			t.Fatalf("ShowsDevice(%s, %s): %v", sp, device, err)
		}
		return ok
	}
	if !shows(staging, device) || !shows(target, device) || shows(mkdir("plain"), device) || shows(lookup("missing"), device) {
		t.Error("ShowsDevice: want the staging mount and its bind to show the device, a plain directory and a missing path not")
	}
	if _, err := p.CreateVolume(ctx, "other", 64<<20); err != nil {
		t.Fatal(err)
	}
	otherDev, err := p.Activate(ctx, "other")
	if err != nil {
		t.Fatal(err)
	}
	if shows(staging, otherDev) || shows(target, otherDev) {
		t.Error("ShowsDevice: the mounts show another volume")
	}
	if err := p.Deactivate(ctx, "other"); err != nil {
		t.Fatal(err)
	}
	// A read-only bind beside it.
	roTarget := mkdir("pods", "ro")
	if err := bind(staging, roTarget, true); err != nil {
		t.Fatal(err)
	}
	if r := refs(staging); !slices.Equal(r, []string{target.String(), roTarget.String()}) {
		t.Errorf("MountRefs(staging) = %v, want both binds", r)
	}
	unmount(roTarget)
	// Binding what is not mounted fails.
	if err := bind(mkdir("plain"), mkdir("pods", "b"), false); err == nil {
		t.Error("bound a directory that is no mount point")
	}
	// Online growth.
	if _, err := p.Grow(ctx, "vol", 128<<20); err != nil {
		t.Fatal(err)
	}
	if err := fs.Resize(ctx, device, target, "ext4"); err != nil {
		t.Fatal(err)
	}
	if grown, err := fs.Stats(target); err != nil || grown.TotalBytes <= st.TotalBytes {
		t.Errorf("Stats after Resize: %+v, %v; before %+v", grown, err, st)
	}
	// The bind mount keeps the filesystem, and its device, open after the
	// staging mount is gone. Unmount removes nothing.
	unmount(staging)
	if isMount(staging) {
		t.Error("still a mount point after Unmount")
	}
	if fi, err := staging.Stat(); err != nil || !fi.IsDir() {
		t.Errorf("Unmount removed the directory: %v", err)
	}
	if err := p.Deactivate(ctx, "vol"); !errors.Is(err, thinpool.ErrBusy) {
		t.Errorf("Deactivate under a bind mount: %v, want ErrBusy", err)
	}
	unmount(target)
	// Unmounting what is not mounted, or missing, is fine.
	unmount(mkdir("plain"))
	unmount(lookup("missing"))
	if err := p.Deactivate(ctx, "vol"); err != nil {
		t.Fatalf("Deactivate after the last unmount: %v", err)
	}

	// The filesystem lives on the thin device: back after reactivation
	// (under whatever node), and in a snapshot.
	if device, err = p.Activate(ctx, "vol"); err != nil {
		t.Fatal(err)
	}
	if typ, err := fs.FSType(device); typ != "ext4" || err != nil {
		t.Errorf("FSType after reactivation: %q, %v", typ, err)
	}
	if _, err := p.Snapshot(ctx, "snap", "vol"); err != nil {
		t.Fatal(err)
	}
	snapDev, err := p.Activate(ctx, "snap")
	if err != nil {
		t.Fatal(err)
	}
	if typ, err := fs.FSType(snapDev); typ != "ext4" || err != nil {
		t.Errorf("FSType of a snapshot: %q, %v", typ, err)
	}
	if err := p.Deactivate(ctx, "snap"); err != nil {
		t.Fatal(err)
	}

	// A raw block volume: its device node bound onto a file. The bind holds
	// nothing open.
	mkdir("pods", "blk")
	file := lookup("pods", "blk", "dev")
	if _, err := file.CreateFile(0o640); err != nil {
		t.Fatal(err)
	}
	if err := fs.BindDevice(ctx, device, mkdir("pods", "blkdir"), false); err == nil {
		t.Error("bound a device node onto a directory")
	}
	if err := fs.BindDevice(ctx, device, file, false); err != nil {
		t.Fatal(err)
	}
	mounted[file] = true
	if !isMount(file) {
		t.Error("a bound file is not a mount point")
	}
	if r, err := fs.DeviceRefs(device); err != nil || !slices.Equal(r, []string{file.String()}) {
		t.Errorf("DeviceRefs(device) = %v, %v; want [%s]", r, err, file)
	}
	if !shows(file, device) {
		t.Error("ShowsDevice: the bound file does not show its device")
	}
	if err := p.Deactivate(ctx, "vol"); err != nil {
		t.Errorf("Deactivate under a bind of the device node: %v", err)
	}
	unmount(file)
	if isMount(file) {
		t.Error("still a mount point after Unmount")
	}

	// A link swapped in after the lookup: refused, nothing mounted through
	// it.
	swapped := mkdir("swapped")
	if err := os.Remove(swapped.String()); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink(mkdir("plain").String(), swapped.String()); err != nil {
		t.Fatal(err)
	}
	if _, err := p.Activate(ctx, "vol"); err != nil {
		t.Fatal(err)
	}
	if err := mount(device, swapped, "ext4"); !errors.Is(err, safepath.ErrSymlink) {
		t.Errorf("mount onto a swapped-in link: %v, want ErrSymlink", err)
	}
	if _, err := fs.IsMountPoint(swapped); !errors.Is(err, safepath.ErrSymlink) {
		t.Errorf("IsMountPoint of a swapped-in link: %v, want ErrSymlink", err)
	}
	if isMount(mkdir("plain")) {
		t.Error("mounted through a swapped-in link")
	}
}

func TestFSContractFake(t *testing.T) {
	k := thinpooltest.NewFakeKernel()
	runFSContract(t, k, newFakeFS(k))
}

// The fake is stricter than the real FS where the driver must not go.
func TestFakeFSStrict(t *testing.T) {
	k := thinpooltest.NewFakeKernel()
	fs := newFakeFS(k)
	ctx := t.Context()
	dir := t.TempDir()
	p, err := thinpool.Open(ctx, loopPoolConfig(filepath.Join(dir, "pool"), "strict", 64<<20), k)
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	if _, err := p.CreateVolume(ctx, "v", 16<<20); err != nil {
		t.Fatal(err)
	}
	device, err := p.Activate(ctx, "v")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := fs.Format(ctx, device, "ext4", FormatOptions{}); err != nil {
		t.Fatal(err)
	}
	root, err := safepath.NewRoot(dir)
	if err != nil {
		t.Fatal(err)
	}
	var a, b *safepath.Path
	for i, name := range []string{"a", "b"} {
		if err := os.Mkdir(filepath.Join(dir, name), 0o750); err != nil {
			t.Fatal(err)
		}
		sp, err := root.Lookup(filepath.Join(dir, name))
		if err != nil {
			t.Fatal(err)
		}
		defer sp.Close()
		if i == 0 {
			a = sp
		} else {
			b = sp
		}
	}
	// statfs of a plain directory would report the filesystem under it.
	if _, err := fs.Stats(a); err == nil {
		t.Error("Stats of a directory that is not a mount point")
	}
	if err := fs.Mount(ctx, device, a, "ext4", nil); err != nil {
		t.Fatal(err)
	}
	// The kernel would stack a second mount; the driver must check first.
	if err := fs.Mount(ctx, device, a, "ext4", nil); err == nil {
		t.Error("stacked a mount")
	}
	if _, err := fs.Format(ctx, "/dev/fake/nothing", "ext4", FormatOptions{}); err == nil {
		t.Error("formatted a missing device")
	}
	if err := fs.Resize(ctx, device, b, "xfs"); err == nil {
		t.Error("resized ext4 as xfs")
	}
	if got := fs.mountTable()[a.String()]; got.FSType != "ext4" || got.Source != device {
		t.Errorf("mount table entry %+v", got)
	}
	if err := fs.Unmount(ctx, a); err != nil {
		t.Fatal(err)
	}
}

// sameDevice compares two device paths by what they point at.
func sameDevice(a, b string) bool {
	ra, err1 := filepath.EvalSymlinks(a)
	rb, err2 := filepath.EvalSymlinks(b)
	return err1 == nil && err2 == nil && ra == rb
}
