package vmtest

import (
	"bytes"
	"fmt"
	"io"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
)

// cpioRecord is one entry as readNewc decodes it.
type cpioRecord struct {
	name         string
	mode         uint32
	nlink        uint32
	mtime        uint32
	rdevMajor    uint32
	rdevMinor    uint32
	data         string
	headerOffset int
}

// readNewc is an independent decoder of newc archives, written from the
// format description rather than from cpioWriter, for round-trip tests.
func readNewc(t *testing.T, b []byte) []cpioRecord {
	t.Helper()
	var out []cpioRecord
	off := 0
	align := func(n int) int { return (n + 3) &^ 3 }
	for {
		if off+110 > len(b) {
			t.Fatalf("truncated header at %d", off)
		}
		h := b[off : off+110]
		if string(h[:6]) != "070701" {
			t.Fatalf("bad magic %q at %d", h[:6], off)
		}
		field := func(i int) uint32 {
			v, err := strconv.ParseUint(string(h[6+8*i:6+8*i+8]), 16, 32)
			if err != nil {
				t.Fatalf("field %d at %d: %v", i, off, err)
			}
			return uint32(v)
		}
		r := cpioRecord{mode: field(1), nlink: field(4), mtime: field(5), rdevMajor: field(9), rdevMinor: field(10), headerOffset: off}
		size, nameSize := int(field(6)), int(field(11))
		nameStart := off + 110
		r.name = string(b[nameStart : nameStart+nameSize-1])
		if b[nameStart+nameSize-1] != 0 {
			t.Fatalf("%s: name not NUL-terminated", r.name)
		}
		dataStart := align(nameStart + nameSize)
		r.data = string(b[dataStart : dataStart+size])
		off = align(dataStart + size)
		if r.name == "TRAILER!!!" {
			if rest := b[off:]; len(bytes.Trim(rest, "\x00")) != 0 {
				t.Fatalf("non-zero bytes after trailer")
			}
			return out
		}
		out = append(out, r)
	}
}

func TestCPIOWriterRoundTrip(t *testing.T) {
	var buf bytes.Buffer
	cw := newCPIOWriter(&buf, 1234)
	steps := []func() error{
		func() error { return cw.Dir("/tmp", 0o777|fs.ModeSticky) },
		func() error { return cw.Bytes("/usr/bin/hello", 0o755, []byte("#!/bin/sh\necho hi\n")) },
		func() error { return cw.Bytes("/usr/bin/odd", 0o644|fs.ModeSetuid, []byte("x")) }, // 1 byte: needs padding
		func() error { return cw.Symlink("/usr/sbin/lvcreate", "lvm") },
		func() error { return cw.CharDev("/dev/console", 0o600, 5, 1) },
		func() error { return cw.Bytes("empty", 0o600, nil) },
		func() error { return cw.File("/big", 0o644, 3, strings.NewReader("abcdef")) }, // reads only 3
		cw.Close,
	}
	for i, s := range steps {
		if err := s(); err != nil {
			t.Fatalf("step %d: %v", i, err)
		}
	}
	if buf.Len()%512 != 0 {
		t.Errorf("archive length %d is not a multiple of 512", buf.Len())
	}
	got := readNewc(t, buf.Bytes())
	want := []struct {
		name string
		mode uint32
		data string
	}{
		{"tmp", 0o041777, ""},
		{"usr", 0o040755, ""},
		{"usr/bin", 0o040755, ""},
		{"usr/bin/hello", 0o100755, "#!/bin/sh\necho hi\n"},
		{"usr/bin/odd", 0o104644, "x"},
		{"usr/sbin", 0o040755, ""},
		{"usr/sbin/lvcreate", 0o120777, "lvm"},
		{"dev", 0o040755, ""},
		{"dev/console", 0o020600, ""},
		{"empty", 0o100600, ""},
		{"big", 0o100644, "abc"},
	}
	if len(got) != len(want) {
		t.Fatalf("got %d entries, want %d: %+v", len(got), len(want), got)
	}
	inodes := map[uint32]bool{}
	for i, w := range want {
		g := got[i]
		if g.name != w.name || g.mode != w.mode || g.data != w.data {
			t.Errorf("entry %d = {%q %o %q}, want {%q %o %q}", i, g.name, g.mode, g.data, w.name, w.mode, w.data)
		}
		if g.mtime != 1234 {
			t.Errorf("%s: mtime %d, want 1234", g.name, g.mtime)
		}
		if g.headerOffset%4 != 0 {
			t.Errorf("%s: header at %d, not 4-byte aligned", g.name, g.headerOffset)
		}
		if inodes[uint32(g.headerOffset)] {
			t.Errorf("duplicate header offset")
		}
		inodes[uint32(g.headerOffset)] = true
	}
	if c := got[8]; c.rdevMajor != 5 || c.rdevMinor != 1 {
		t.Errorf("dev/console rdev = %d:%d, want 5:1", c.rdevMajor, c.rdevMinor)
	}
}

func TestCPIOWriterErrors(t *testing.T) {
	cw := newCPIOWriter(io.Discard, 0)
	if err := cw.File("/short", 0o644, 10, strings.NewReader("abc")); err == nil {
		t.Error("File with a short reader succeeded")
	}
	if err := cw.Bytes("/", 0o644, nil); err == nil {
		t.Error("entry named / accepted")
	}
	if err := cw.Symlink("/l", ""); err == nil {
		t.Error("empty symlink target accepted")
	}
	if err := cw.Close(); err != nil {
		t.Fatal(err)
	}
	if err := cw.Bytes("/late", 0o644, nil); err == nil {
		t.Error("write after Close accepted")
	}
}

// TestCPIOWriterAgainstCPIOTool lists an archive with the host's cpio(1),
// when installed, as a check independent of readNewc.
func TestCPIOWriterAgainstCPIOTool(t *testing.T) {
	cpio, err := exec.LookPath("cpio")
	if err != nil {
		t.Skip("no cpio(1) on this host")
	}
	var buf bytes.Buffer
	cw := newCPIOWriter(&buf, 0)
	for i := range 5 {
		if err := cw.Bytes(fmt.Sprintf("/d%d/f", i), 0o644, bytes.Repeat([]byte{'x'}, i*333)); err != nil {
			t.Fatal(err)
		}
	}
	if err := cw.Symlink("/link", "d0/f"); err != nil {
		t.Fatal(err)
	}
	if err := cw.Close(); err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	cmd := exec.Command(cpio, "-i", "-d", "--quiet")
	cmd.Dir = dir
	cmd.Stdin = &buf
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("cpio -i: %v\n%s", err, out)
	}
	b, err := os.ReadFile(filepath.Join(dir, "d3", "f"))
	if err != nil || len(b) != 999 {
		t.Errorf("d3/f: %d bytes, %v; want 999", len(b), err)
	}
	if l, err := os.Readlink(filepath.Join(dir, "link")); err != nil || l != "d0/f" {
		t.Errorf("link -> %q, %v; want d0/f", l, err)
	}
}
