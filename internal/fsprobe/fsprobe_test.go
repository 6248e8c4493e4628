package fsprobe

import (
	"bytes"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

// image makes a sparse file of sizeBytes and runs mkfs on it.
func image(t *testing.T, sizeBytes int64, mkfs string, args ...string) *os.File {
	t.Helper()
	path, err := exec.LookPath(mkfs)
	if err != nil {
		if os.Getenv("CI") != "" {
			t.Fatalf("%s is missing (make deps installs it): %v", mkfs, err)
		}
		t.Skipf("%s is missing; make deps installs it", mkfs)
	}
	name := filepath.Join(t.TempDir(), "fs.img")
	f, err := os.Create(name)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	if err := f.Truncate(sizeBytes); err != nil {
		t.Fatal(err)
	}
	run(t, path, append(args, name)...)
	return f
}

func run(t *testing.T, name string, args ...string) string {
	t.Helper()
	cmd := exec.Command(name, args...)
	cmd.Env = append(os.Environ(), "LC_ALL=C")
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
	return string(out)
}

func TestProbe(t *testing.T) {
	for _, tc := range []struct {
		name       string
		mkfs       string
		args       []string
		wantType   string
		changeable bool
	}{
		{"ext4 with csum seed", "mkfs.ext4", []string{"-F", "-q", "-O", "metadata_csum_seed"}, "ext4", true},
		{"ext4 default", "mkfs.ext4", []string{"-F", "-q"}, "ext4", false},
		{"ext4 without checksums", "mkfs.ext4", []string{"-F", "-q", "-O", "^metadata_csum,^uninit_bg"}, "ext4", true},
		{"ext3", "mkfs.ext3", []string{"-F", "-q"}, "ext3", true},
		{"ext2", "mkfs.ext2", []string{"-F", "-q"}, "ext2", true},
		{"xfs", "mkfs.xfs", []string{"-f", "-q"}, "xfs", false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			const size = 320 << 20
			f := image(t, size, tc.mkfs, tc.args...)
			info, err := Probe(f)
			if err != nil {
				t.Fatal(err)
			}
			if info.Type != tc.wantType {
				t.Fatalf("type %q, want %q", info.Type, tc.wantType)
			}
			if info.SizeBytes != size {
				t.Errorf("size %d, want %d", info.SizeBytes, size)
			}
			if info.UUID == [16]byte{} {
				t.Error("no UUID read")
			}
			if tc.wantType != "xfs" {
				if !info.NeverMounted {
					t.Error("a new filesystem reads as mounted before")
				}
				if info.UUIDChangeable != tc.changeable {
					t.Errorf("UUID changeable %v, want %v", info.UUIDChangeable, tc.changeable)
				}
			}
		})
	}
}

func TestProbeNothing(t *testing.T) {
	for name, b := range map[string][]byte{
		"zeros":  make([]byte, 1<<20),
		"short":  []byte("XFS"),
		"random": bytes.Repeat([]byte{0xA5, 0x5A}, 4096),
	} {
		info, err := Probe(bytes.NewReader(b))
		if err != nil || info != (Info{}) {
			t.Errorf("%s: %+v, %v", name, info, err)
		}
	}
}

func TestNewExtUUID(t *testing.T) {
	f := image(t, 256<<20, "mkfs.ext4", "-F", "-q", "-O", "metadata_csum_seed")
	before, err := Probe(f)
	if err != nil {
		t.Fatal(err)
	}
	id, err := NewExtUUID(f)
	if err != nil {
		t.Fatal(err)
	}
	after, err := Probe(f)
	if err != nil {
		t.Fatal(err)
	}
	if after.UUID != id || after.UUID == before.UUID {
		t.Fatalf("UUID %x after, %x before, %x returned", after.UUID, before.UUID, id)
	}
	if id[6]>>4 != 4 || id[8]>>6 != 2 {
		t.Errorf("%x is not a version 4 UUID", id)
	}
	// e2fsck checks the superblock checksum and every metadata checksum
	// (whose seed must not have moved with the UUID).
	run(t, "e2fsck", "-f", "-n", f.Name())
	if out := run(t, "dumpe2fs", "-h", f.Name()); !strings.Contains(out, formatUUID(id)) {
		t.Errorf("dumpe2fs does not show %s:\n%s", formatUUID(id), out)
	}
}

func TestNewExtUUIDRefuses(t *testing.T) {
	t.Run("checksums from the UUID", func(t *testing.T) {
		f := image(t, 64<<20, "mkfs.ext4", "-F", "-q")
		if _, err := NewExtUUID(f); !errors.Is(err, ErrUnsupported) {
			t.Fatalf("got %v", err)
		}
	})
	t.Run("mounted before", func(t *testing.T) {
		f := image(t, 64<<20, "mkfs.ext4", "-F", "-q", "-O", "metadata_csum_seed")
		run(t, "debugfs", "-w", "-R", "ssv mtime 20240101", f.Name())
		if info, _ := Probe(f); info.NeverMounted {
			t.Fatal("a mount time does not count as mounted")
		}
		if _, err := NewExtUUID(f); !errors.Is(err, ErrUnsupported) {
			t.Fatalf("got %v", err)
		}
	})
	t.Run("xfs", func(t *testing.T) {
		f := image(t, 320<<20, "mkfs.xfs", "-f", "-q")
		if _, err := NewExtUUID(f); !errors.Is(err, ErrUnsupported) {
			t.Fatalf("got %v", err)
		}
	})
}

func formatUUID(id [16]byte) string {
	const hex = "0123456789abcdef"
	var b strings.Builder
	for i, c := range id {
		if i == 4 || i == 6 || i == 8 || i == 10 {
			b.WriteByte('-')
		}
		b.WriteByte(hex[c>>4])
		b.WriteByte(hex[c&15])
	}
	return b.String()
}
