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

// An XFS whose mkfs did not finish is no filesystem. mkfs.xfs sets
// sb_inprogress in the primary superblock first and clears it last; here
// xfs_db sets it in a finished image, which also pins the offset to the
// real struct xfs_dsb, and the kernel's refusal to mount it is checked in
// pkg/csi (TestFormatRedoesUnfinishedXFS).
func TestProbeUnfinishedXFS(t *testing.T) {
	f := image(t, 320<<20, "mkfs.xfs", "-f", "-q")
	sb := make([]byte, 512)
	if _, err := f.ReadAt(sb, 0); err != nil {
		t.Fatal(err)
	}
	if sb[xfsInProgress] != 0 {
		t.Fatalf("a finished mkfs.xfs left byte %d at %d", sb[xfsInProgress], xfsInProgress)
	}
	if _, err := exec.LookPath("xfs_db"); err == nil {
		run(t, "xfs_db", "-x", "-c", "sb 0", "-c", "write inprogress 1", f.Name())
		after := make([]byte, 512)
		if _, err := f.ReadAt(after, 0); err != nil {
			t.Fatal(err)
		}
		var changed []int
		for i := range sb {
			if sb[i] != after[i] {
				changed = append(changed, i)
			}
		}
		// The byte, and the superblock's CRC (sb_crc, at 224) with it.
		if len(changed) == 0 || changed[0] != xfsInProgress || after[xfsInProgress] != 1 {
			t.Fatalf("xfs_db's inprogress is not byte %d: bytes %v changed", xfsInProgress, changed)
		}
	} else {
		if os.Getenv("CI") != "" {
			t.Fatalf("xfs_db is missing (xfsprogs has it): %v", err)
		}
		t.Logf("xfs_db is missing; setting byte %d by hand", xfsInProgress)
		if _, err := f.WriteAt([]byte{1}, xfsInProgress); err != nil {
			t.Fatal(err)
		}
	}
	info, err := Probe(f)
	if err != nil {
		t.Fatal(err)
	}
	if info.Type != "" || !info.Unfinished {
		t.Fatalf("an unfinished XFS probes as %+v", info)
	}
	// Cleared again, it is the filesystem it was.
	if _, err := f.WriteAt([]byte{0}, xfsInProgress); err != nil {
		t.Fatal(err)
	}
	if info, err := Probe(f); err != nil || info.Type != "xfs" || info.Unfinished || info.SizeBytes != 320<<20 {
		t.Fatalf("finished again: %+v, %v", info, err)
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
