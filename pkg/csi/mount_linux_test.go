package csi

import (
	"errors"
	"os"
	"path/filepath"
	"testing"

	"golang.org/x/sys/unix"
)

func TestMountArgs(t *testing.T) {
	for _, tc := range []struct {
		opts      []string
		wantFlags uintptr
		wantData  string
	}{
		{nil, 0, ""},
		{[]string{"defaults"}, 0, ""},
		{[]string{"ro", "noatime", "nouuid"}, unix.MS_RDONLY | unix.MS_NOATIME, "nouuid"},
		{[]string{"bind", "ro"}, unix.MS_BIND | unix.MS_RDONLY, ""},
		{[]string{"rbind"}, unix.MS_BIND | unix.MS_REC, ""},
		{[]string{"ro", "rw"}, 0, ""},                                    // the last one wins, as in mount(8)
		{[]string{"nosuid", "suid", "nodev"}, unix.MS_NODEV, ""},         // cleared again
		{[]string{"discard", "data=ordered"}, 0, "discard,data=ordered"}, // the filesystem's own
		{[]string{`context="system_u:object_r:container_file_t:s0"`}, 0, `context="system_u:object_r:container_file_t:s0"`},
		{[]string{"_netdev", "nofail", "x-systemd.device-timeout=5", "comment=x", "noauto"}, 0, ""},
		{[]string{"sync", "dirsync", "lazytime"}, unix.MS_SYNCHRONOUS | unix.MS_DIRSYNC | unix.MS_LAZYTIME, ""},
	} {
		flags, data := mountArgs(tc.opts)
		if flags != tc.wantFlags || data != tc.wantData {
			t.Errorf("mountArgs(%q) = %#x, %q; want %#x, %q", tc.opts, flags, data, tc.wantFlags, tc.wantData)
		}
	}
}

// A read-only bind of a mount keeps the source's per-mount flags: the
// remount that makes it read-only sets every flag at once, and a naive one
// would drop noatime, nosuid, nodev and noexec. Uses tmpfs, which every
// Linux host can mount as root.
func TestSysMountBindKeepsSourceFlags(t *testing.T) {
	if os.Geteuid() != 0 {
		if os.Getenv("CI") == "true" {
			t.Fatal("needs root to mount")
		}
		t.Skip("needs root to mount")
	}
	src, dst := t.TempDir(), t.TempDir()
	if err := sysMount("tmpfs", src, "tmpfs", []string{"noatime", "nosuid", "nodev", "noexec", "size=1m"}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = unix.Unmount(src, unix.MNT_DETACH) })
	if err := sysMount(src, dst, "", []string{"bind", "ro"}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = unix.Unmount(dst, unix.MNT_DETACH) })
	var st unix.Statfs_t
	if err := unix.Statfs(dst, &st); err != nil {
		t.Fatal(err)
	}
	want := int64(unix.ST_RDONLY | unix.ST_NOATIME | unix.ST_NOSUID | unix.ST_NODEV | unix.ST_NOEXEC)
	if st.Flags&want != want {
		t.Errorf("read-only bind has statfs flags %#x, want %#x among them", st.Flags, want)
	}
	if err := os.WriteFile(filepath.Join(dst, "x"), nil, 0o644); !errors.Is(err, unix.EROFS) {
		t.Errorf("write through the read-only bind: %v, want EROFS", err)
	}
	// The source itself stays writable.
	if err := os.WriteFile(filepath.Join(src, "x"), nil, 0o644); err != nil {
		t.Errorf("write to the source: %v", err)
	}
}
