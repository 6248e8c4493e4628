//go:build vmtest

package loop

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/csi-dmthin/csi-dmthin/internal/vmtest"
)

// A loop device attached through a path that is later gone (the mount the
// attaching container saw) is still found through any other path to the
// same file: a restarted driver must find its pool's loop devices.
func TestFindAfterThePathIsGone(t *testing.T) {
	vmtest.RequireGuest(t)
	dir := t.TempDir()
	real, view := filepath.Join(dir, "real"), filepath.Join(dir, "view")
	for _, d := range []string{real, view} {
		if err := os.Mkdir(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	file := filepath.Join(real, "data")
	other := filepath.Join(real, "other")
	for _, f := range []string{file, other} {
		if err := os.WriteFile(f, nil, 0o644); err != nil {
			t.Fatal(err)
		}
		if err := os.Truncate(f, 16<<20); err != nil {
			t.Fatal(err)
		}
	}
	if err := unix.Mount(real, view, "", unix.MS_BIND, ""); err != nil {
		t.Fatal(err)
	}
	d, err := Attach(filepath.Join(view, "data"), Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer func() {
		d.Close()
		if err := Detach(d.Path); err != nil {
			t.Error(err)
		}
	}()
	if err := unix.Unmount(view, unix.MNT_DETACH); err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile(filepath.Join("/sys/block", filepath.Base(d.Path), "loop", "backing_file"))
	if err != nil {
		t.Fatal(err)
	}
	if got := strings.TrimSpace(string(b)); got == file {
		t.Fatalf("sysfs names the backing file %s: the test does not reproduce a stale path", got)
	}
	found, err := Find(file)
	if err != nil {
		t.Fatal(err)
	}
	if len(found) != 1 || found[0].Number != d.Number || found[0].Rdev != d.Rdev {
		t.Fatalf("Find(%s) = %+v, want %s", file, found, d.Path)
	}
	if found, err := Find(other); err != nil || len(found) != 0 {
		t.Fatalf("Find of an unattached file: %+v, %v", found, err)
	}
}
