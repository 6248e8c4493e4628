//go:build vmtest

package vmtest

import (
	"bytes"
	"os"
	"path/filepath"
	"testing"
)

// These run inside the VM, started by TestVM on the host.

func TestGuestEnvironment(t *testing.T) {
	RequireGuest(t)
	if os.Getpid() == 1 {
		t.Error("the test binary runs as PID 1; /init should")
	}
	wd, err := os.Getwd()
	if err != nil || wd != guestPkgDir {
		t.Errorf("working directory = %q, %v; want %s", wd, err, guestPkgDir)
	}
	// testdata/ comes along, as go test's working directory would have it.
	if _, err := os.Stat(filepath.Join("testdata", "payload", "main.go")); err != nil {
		t.Errorf("testdata not copied: %v", err)
	}
	if h := os.Getenv("HOME"); h != "/tmp" {
		t.Errorf("HOME = %q, want /tmp", h)
	}
	f, err := os.CreateTemp("", "x")
	if err != nil {
		t.Fatalf("temporary files: %v", err)
	}
	_ = f.Close()
}

func TestGuestDeviceMapper(t *testing.T) {
	RequireGuest(t)
	if _, err := os.Stat("/dev/mapper/control"); err != nil {
		t.Errorf("device-mapper control node: %v", err)
	}
	misc, err := os.ReadFile("/proc/misc")
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Contains(misc, []byte(" device-mapper\n")) {
		t.Errorf("/proc/misc lists no device-mapper:\n%s", misc)
	}
	mods, err := os.ReadFile("/proc/modules")
	if err != nil {
		t.Fatal(err)
	}
	for _, m := range []string{"dm_thin_pool", "loop", "ext4", "xfs"} {
		if !bytes.Contains(mods, []byte(m+" ")) {
			t.Errorf("module %s not loaded", m)
		}
	}
}
