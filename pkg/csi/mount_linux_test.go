package csi

import (
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/csi-dmthin/csi-dmthin/internal/loop"
	"github.com/csi-dmthin/csi-dmthin/internal/safepath"
)

func TestMountArgs(t *testing.T) {
	for _, tc := range []struct {
		opts       []string
		wantAttrs  uint64
		wantParams []string
	}{
		{nil, 0, nil},
		{[]string{"defaults"}, 0, nil},
		{[]string{"ro", "noatime", "nouuid"}, unix.MOUNT_ATTR_RDONLY | unix.MOUNT_ATTR_NOATIME, []string{"ro", "nouuid"}},
		{[]string{"ro", "rw"}, 0, []string{"ro", "rw"}}, // the last one wins, as in mount(8)
		{[]string{"nosuid", "suid", "nodev"}, unix.MOUNT_ATTR_NODEV, nil},
		{[]string{"noatime", "strictatime"}, unix.MOUNT_ATTR_STRICTATIME, nil},
		{[]string{"noatime", "atime"}, unix.MOUNT_ATTR_RELATIME, nil},
		{[]string{"discard", "data=ordered"}, 0, []string{"discard", "data=ordered"}}, // the filesystem's own
		{[]string{`context="system_u:object_r:container_file_t:s0:c1,c2"`}, 0, []string{`context="system_u:object_r:container_file_t:s0:c1,c2"`}},
		{[]string{"_netdev", "nofail", "x-systemd.device-timeout=5", "comment=x", "noauto", "silent"}, 0, nil},
		{[]string{"sync", "dirsync", "lazytime", "noexec"}, unix.MOUNT_ATTR_NOEXEC, []string{"sync", "dirsync", "lazytime"}},
		// Not options of any filesystem: passed on, for it to refuse.
		{[]string{"bind"}, 0, []string{"bind"}},
	} {
		attrs, params := mountArgs(tc.opts)
		if attrs != tc.wantAttrs || !slices.Equal(params, tc.wantParams) {
			t.Errorf("mountArgs(%q) = %#x, %q; want %#x, %q", tc.opts, attrs, params, tc.wantAttrs, tc.wantParams)
		}
	}
	if got := unquote(`"a,b"`); got != "a,b" {
		t.Errorf("unquote = %q", got)
	}
}

func requireRoot(t *testing.T) {
	t.Helper()
	if os.Geteuid() != 0 {
		if os.Getenv("CI") == "true" {
			t.Fatal("needs root to mount")
		}
		t.Skip("needs root to mount")
	}
}

// hostPaths is a safepath root in a temporary directory, with the lookups
// closed and anything mounted there detached at the end.
type hostPaths struct {
	t    *testing.T
	root safepath.Root
}

func newHostPaths(t *testing.T) *hostPaths {
	t.Helper()
	dir := t.TempDir()
	root, err := safepath.NewRoot(dir)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		// Deepest first, so binds go before what they show.
		b, _ := os.ReadFile("/proc/self/mountinfo")
		lines := strings.Split(string(b), "\n")
		for i := len(lines) - 1; i >= 0; i-- {
			if f := strings.Fields(lines[i]); len(f) > 4 && strings.HasPrefix(f[4], dir+"/") {
				_ = unix.Unmount(f[4], unix.MNT_DETACH)
			}
		}
	})
	return &hostPaths{t: t, root: root}
}

// dir makes a directory and looks it up.
func (h *hostPaths) dir(name string) *safepath.Path {
	h.t.Helper()
	p := filepath.Join(h.root.Dir(), name)
	if _, err := h.root.MkdirAll(p, 0o750); err != nil {
		h.t.Fatal(err)
	}
	return h.lookup(name)
}

func (h *hostPaths) lookup(name string) *safepath.Path {
	h.t.Helper()
	sp, err := h.root.Lookup(filepath.Join(h.root.Dir(), name))
	if err != nil {
		h.t.Fatal(err)
	}
	h.t.Cleanup(func() { sp.Close() })
	return sp
}

// The real FS's mounts, on tmpfs, which every Linux host mounts as root: a
// mount, a read-only bind that keeps the source's per-mount flags (the
// kernel's bind remount would set exactly the flags it is given, dropping
// noatime, nosuid, nodev and noexec), refused options by name, a busy
// unmount refused, and a link swapped in after the lookup refused.
func TestHostFSMounts(t *testing.T) {
	requireRoot(t)
	ctx := t.Context()
	fs := NewHostFS()
	h := newHostPaths(t)
	src, dst := h.dir("src"), h.dir("dst")
	for _, opt := range []string{"bind", "rbind", "size=lots", "no-such-option"} {
		if err := fs.Mount(ctx, "tmpfs", src, "tmpfs", []string{"noatime", opt}); !errors.Is(err, ErrMountOption) || !strings.Contains(err.Error(), opt) {
			t.Errorf("mount -o %s: %v; want ErrMountOption naming it", opt, err)
		}
	}
	if m, err := fs.IsMountPoint(src); m || err != nil {
		t.Fatalf("a refused mount left a mount point: %v, %v", m, err)
	}
	if err := fs.Mount(ctx, "tmpfs", src, "tmpfs", []string{"noatime", "nosuid", "nodev", "noexec", "size=1m"}); err != nil {
		t.Fatal(err)
	}
	if m, err := fs.IsMountPoint(src); !m || err != nil {
		t.Fatalf("IsMountPoint after Mount: %v, %v", m, err)
	}
	if d, err := fs.MountedDevice(src); d != "tmpfs" || err != nil {
		t.Errorf("MountedDevice = %q, %v", d, err)
	}
	if err := fs.BindMount(ctx, src, dst, true); err != nil {
		t.Fatal(err)
	}
	var st unix.Statfs_t
	if err := unix.Statfs(dst.String(), &st); err != nil {
		t.Fatal(err)
	}
	want := int64(unix.ST_RDONLY | unix.ST_NOATIME | unix.ST_NOSUID | unix.ST_NODEV | unix.ST_NOEXEC)
	if st.Flags&want != want {
		t.Errorf("read-only bind has statfs flags %#x, want %#x among them", st.Flags, want)
	}
	if err := os.WriteFile(filepath.Join(dst.String(), "x"), nil, 0o644); !errors.Is(err, unix.EROFS) {
		t.Errorf("write through the read-only bind: %v, want EROFS", err)
	}
	// The source itself stays writable.
	if err := os.WriteFile(filepath.Join(src.String(), "x"), nil, 0o644); err != nil {
		t.Errorf("write to the source: %v", err)
	}
	if refs, err := fs.MountRefs(src); err != nil || !slices.Equal(refs, []string{dst.String()}) {
		t.Errorf("MountRefs(src) = %v, %v", refs, err)
	}
	if s, err := fs.Stats(dst); err != nil || s.TotalBytes != 1<<20 {
		t.Errorf("Stats: %+v, %v", s, err)
	}
	// Busy: refused, still mounted.
	f, err := os.Open(filepath.Join(src.String(), "x"))
	if err != nil {
		t.Fatal(err)
	}
	if err := fs.Unmount(ctx, src); !errors.Is(err, unix.EBUSY) {
		t.Errorf("Unmount of a busy mount: %v, want EBUSY", err)
	}
	f.Close()
	if m, _ := fs.IsMountPoint(src); !m {
		t.Fatal("a refused unmount unmounted")
	}
	for _, p := range []*safepath.Path{dst, src} {
		if err := fs.Unmount(ctx, p); err != nil {
			t.Fatal(err)
		}
		if m, err := fs.IsMountPoint(p); m || err != nil {
			t.Errorf("IsMountPoint after Unmount: %v, %v", m, err)
		}
	}
	if err := fs.Unmount(ctx, src); err != nil {
		t.Errorf("Unmount of what is not mounted: %v", err)
	}

	// Swapped in after the lookup: a link to a mount point elsewhere. It
	// is neither mounted over nor unmounted.
	elsewhere := t.TempDir()
	if err := unix.Mount("tmpfs", elsewhere, "tmpfs", 0, "size=1m"); err != nil {
		t.Fatal(err)
	}
	defer unix.Unmount(elsewhere, unix.MNT_DETACH)
	victim := h.dir("victim")
	if err := os.Remove(victim.String()); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink(elsewhere, victim.String()); err != nil {
		t.Fatal(err)
	}
	if err := fs.Mount(ctx, "tmpfs", victim, "tmpfs", nil); !errors.Is(err, safepath.ErrSymlink) {
		t.Errorf("Mount onto a swapped-in link: %v", err)
	}
	if err := fs.Unmount(ctx, victim); !errors.Is(err, safepath.ErrSymlink) {
		t.Errorf("Unmount through a swapped-in link: %v", err)
	}
	if err := fs.BindMount(ctx, victim, dst, false); !errors.Is(err, safepath.ErrSymlink) {
		t.Errorf("BindMount from a swapped-in link: %v", err)
	}
	var est unix.Stat_t
	var pst unix.Stat_t
	if err := unix.Stat(elsewhere, &est); err != nil {
		t.Fatal(err)
	}
	if err := unix.Stat(filepath.Dir(elsewhere), &pst); err != nil {
		t.Fatal(err)
	}
	if est.Dev == pst.Dev {
		t.Error("the mount elsewhere was unmounted")
	}
	if m, _ := fs.IsMountPoint(dst); m {
		t.Error("bound through a swapped-in link")
	}
}

// loopImage makes a sparse file of sizeBytes, runs mkfs on it (unless
// mkfs is ""), and attaches it to a loop device.
func loopImage(t *testing.T, sizeBytes int64, mkfs string, args ...string) (file, device string) {
	t.Helper()
	requireRoot(t)
	file = filepath.Join(t.TempDir(), "fs.img")
	if err := os.WriteFile(file, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(file, sizeBytes); err != nil {
		t.Fatal(err)
	}
	if mkfs != "" {
		if _, err := exec.LookPath(mkfs); err != nil {
			if os.Getenv("CI") != "" {
				t.Fatalf("%s is missing (make deps installs it)", mkfs)
			}
			t.Skipf("%s is missing", mkfs)
		}
		if out, err := exec.Command(mkfs, append(args, file)...).CombinedOutput(); err != nil {
			t.Fatalf("%s: %v\n%s", mkfs, err, out)
		}
	}
	d, err := loop.Attach(file, loop.Options{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		d.Close()
		_ = loop.Detach(d.Path)
	})
	return file, d.Path
}

// A mount(2) EINVAL caused by the caller's options is theirs: each option
// refused by name, and options refused only together are found out by
// the filesystem mounting without them. A device without the filesystem
// is not the caller's options.
func TestHostFSOptionErrors(t *testing.T) {
	_, device := loopImage(t, 64<<20, "mkfs.ext4", "-q", "-F")
	_, empty := loopImage(t, 64<<20, "")
	ctx := t.Context()
	fs := NewHostFS()
	h := newHostPaths(t)
	target := h.dir("target")
	for _, opts := range [][]string{
		{"nouuid"}, {"bind"}, {"context=system_u:object_r:tmp_t:s0"}, {"errors=never"},
		{"data=journal", "delalloc"}, // each fine, refused together
	} {
		err := fs.Mount(ctx, device, target, "ext4", opts)
		if !errors.Is(err, ErrMountOption) {
			t.Errorf("mount -o %s: %v; want ErrMountOption", strings.Join(opts, ","), err)
		}
	}
	if err := fs.Mount(ctx, empty, target, "ext4", []string{"errors=remount-ro"}); err == nil || errors.Is(err, ErrMountOption) {
		t.Errorf("mount of a device without ext4: %v; want an error that is not the options'", err)
	}
	if err := fs.Mount(ctx, device, target, "ext4", []string{"errors=remount-ro", "noatime"}); err != nil {
		t.Fatal(err)
	}
	if err := fs.Unmount(ctx, target); err != nil {
		t.Fatal(err)
	}
}

// An XFS whose mkfs.xfs did not finish (sb_inprogress set, as a mkfs
// killed by a cancelled stage leaves it): the kernel refuses to mount it,
// blkid still calls it xfs, and Format makes it again instead of taking it
// for a filesystem forever.
func TestFormatRedoesUnfinishedXFS(t *testing.T) {
	if _, err := exec.LookPath("xfs_db"); err != nil {
		if os.Getenv("CI") != "" {
			t.Fatal("xfs_db is missing (xfsprogs has it)")
		}
		t.Skip("xfs_db is missing")
	}
	file, device := loopImage(t, 320<<20, "mkfs.xfs", "-q", "-f")
	if out, err := exec.Command("xfs_db", "-x", "-c", "sb 0", "-c", "write inprogress 1", file).CombinedOutput(); err != nil {
		t.Fatalf("xfs_db: %v\n%s", err, out)
	}
	fs := NewHostFS()
	if out, err := exec.Command("blkid", "-p", "-o", "value", "-s", "TYPE", device).Output(); err != nil || strings.TrimSpace(string(out)) != "xfs" {
		t.Logf("blkid says %q, %v (the probe must not ask it)", out, err)
	}
	if typ, err := fs.FSType(device); typ != "" || err != nil {
		t.Errorf("FSType of an unfinished XFS: %q, %v; want none", typ, err)
	}
	ctx := t.Context()
	h := newHostPaths(t)
	target := h.dir("target")
	if err := fs.Mount(ctx, device, target, "xfs", []string{"nouuid"}); err == nil || errors.Is(err, ErrMountOption) {
		t.Fatalf("mount of an unfinished XFS: %v; want the kernel's refusal", err)
	}
	formatted, err := fs.Format(ctx, device, "xfs", FormatOptions{})
	if err != nil || !formatted {
		t.Fatalf("Format of an unfinished XFS: %v, %v; want it made again", formatted, err)
	}
	if typ, err := fs.FSType(device); typ != "xfs" || err != nil {
		t.Errorf("FSType after Format: %q, %v", typ, err)
	}
	if err := fs.Mount(ctx, device, target, "xfs", []string{"nouuid"}); err != nil {
		t.Fatal(err)
	}
	if err := fs.Unmount(ctx, target); err != nil {
		t.Fatal(err)
	}
}
