package csi

import (
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
