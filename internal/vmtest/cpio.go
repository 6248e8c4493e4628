package vmtest

import (
	"bytes"
	"fmt"
	"io"
	"io/fs"
	"path"
	"strings"
)

// cpioWriter writes an archive in the "newc" format (the SVR4 portable format
// without checksums, magic 070701), the only format the kernel's initramfs
// unpacker reads. See the kernel's Documentation/driver-api/early-userspace/
// buffer-format.rst.
//
// Every entry's parent directories are emitted before it when the archive has
// not yet named them, because the kernel's unpacker creates exactly the
// entries it is given and never a missing parent. Names are written relative
// ("bin/busybox"), as the kernel and cpio(1) expect.
type cpioWriter struct {
	w      io.Writer
	ino    uint32
	mtime  uint32
	dirs   map[string]bool
	offset int64
	closed bool
}

// newCPIOWriter returns a writer whose entries all carry mtime (seconds since
// the epoch); a fixed value keeps archives byte-for-byte reproducible.
func newCPIOWriter(w io.Writer, mtime uint32) *cpioWriter {
	return &cpioWriter{w: w, mtime: mtime, dirs: map[string]bool{".": true}, ino: 1}
}

// File mode type bits as the newc header stores them (from <sys/stat.h>).
const (
	cpioModeDir     = 0o040000
	cpioModeRegular = 0o100000
	cpioModeSymlink = 0o120000
	cpioModeChar    = 0o020000
)

// unixPerm converts Go's permission, setuid, setgid and sticky bits to the
// st_mode bits that newc stores (Go keeps the latter three far from 07000).
func unixPerm(m fs.FileMode) uint32 {
	p := uint32(m.Perm())
	if m&fs.ModeSetuid != 0 {
		p |= 0o4000
	}
	if m&fs.ModeSetgid != 0 {
		p |= 0o2000
	}
	if m&fs.ModeSticky != 0 {
		p |= 0o1000
	}
	return p
}

// permBits keeps the bits of m that unixPerm stores.
func permBits(m fs.FileMode) fs.FileMode {
	return m & (fs.ModePerm | fs.ModeSetuid | fs.ModeSetgid | fs.ModeSticky)
}

// cpioHeader is one entry's header; sizes and numbers are 32-bit in newc.
type cpioHeader struct {
	name                 string
	mode                 uint32 // type bits | permission bits
	nlink                uint32
	size                 int64
	rdevMajor, rdevMinor uint32
}

// cleanName turns "/usr/bin/x" or "usr//bin/./x" into "usr/bin/x".
func cleanName(name string) (string, error) {
	n := strings.TrimLeft(path.Clean("/"+name), "/")
	if n == "" || n == "." {
		return "", fmt.Errorf("cpio: invalid entry name %q", name)
	}
	return n, nil
}

// parents emits directory entries for every ancestor of name not yet written.
func (c *cpioWriter) parents(name string) error {
	dir := path.Dir(name)
	if c.dirs[dir] {
		return nil
	}
	if err := c.parents(dir); err != nil {
		return err
	}
	return c.header(cpioHeader{name: dir, mode: cpioModeDir | 0o755, nlink: 2})
}

// header writes a header, the name and the padding that follows the name.
func (c *cpioWriter) header(h cpioHeader) error {
	if c.closed {
		return fmt.Errorf("cpio: write after close")
	}
	if h.size < 0 || h.size > 0xffffffff {
		return fmt.Errorf("cpio: %s: size %d does not fit the newc format", h.name, h.size)
	}
	if h.mode&0o170000 == cpioModeDir {
		c.dirs[h.name] = true
	}
	c.ino++
	hdr := fmt.Sprintf("070701%08x%08x%08x%08x%08x%08x%08x%08x%08x%08x%08x%08x%08x",
		c.ino, h.mode, 0, 0, h.nlink, c.mtime, uint32(h.size), 0, 0,
		h.rdevMajor, h.rdevMinor, len(h.name)+1, 0)
	if err := c.write([]byte(hdr + h.name + "\x00")); err != nil {
		return err
	}
	return c.pad()
}

func (c *cpioWriter) write(p []byte) error {
	n, err := c.w.Write(p)
	c.offset += int64(n)
	return err
}

// pad aligns the stream to 4 bytes, as newc requires after names and data.
func (c *cpioWriter) pad() error {
	if r := c.offset % 4; r != 0 {
		return c.write(make([]byte, 4-r))
	}
	return nil
}

// Dir adds a directory with the given permission bits.
func (c *cpioWriter) Dir(name string, perm fs.FileMode) error {
	n, err := cleanName(name)
	if err != nil {
		return err
	}
	if err := c.parents(n); err != nil {
		return err
	}
	return c.header(cpioHeader{name: n, mode: cpioModeDir | unixPerm(perm), nlink: 2})
}

// File adds a regular file of exactly size bytes read from r.
func (c *cpioWriter) File(name string, perm fs.FileMode, size int64, r io.Reader) error {
	n, err := cleanName(name)
	if err != nil {
		return err
	}
	if err := c.parents(n); err != nil {
		return err
	}
	if err := c.header(cpioHeader{name: n, mode: cpioModeRegular | unixPerm(perm), nlink: 1, size: size}); err != nil {
		return err
	}
	copied, err := io.CopyN(c.w, r, size)
	c.offset += copied
	if err != nil {
		return fmt.Errorf("cpio: %s: wrote %d of %d bytes: %w", n, copied, size, err)
	}
	return c.pad()
}

// Bytes adds a regular file holding data.
func (c *cpioWriter) Bytes(name string, perm fs.FileMode, data []byte) error {
	return c.File(name, perm, int64(len(data)), bytes.NewReader(data))
}

// Symlink adds a symbolic link; target is stored verbatim as the link's data.
func (c *cpioWriter) Symlink(name, target string) error {
	n, err := cleanName(name)
	if err != nil {
		return err
	}
	if target == "" {
		return fmt.Errorf("cpio: %s: empty symlink target", n)
	}
	if err := c.parents(n); err != nil {
		return err
	}
	if err := c.header(cpioHeader{name: n, mode: cpioModeSymlink | 0o777, nlink: 1, size: int64(len(target))}); err != nil {
		return err
	}
	if err := c.write([]byte(target)); err != nil {
		return err
	}
	return c.pad()
}

// CharDev adds a character device node.
func (c *cpioWriter) CharDev(name string, perm fs.FileMode, major, minor uint32) error {
	n, err := cleanName(name)
	if err != nil {
		return err
	}
	if err := c.parents(n); err != nil {
		return err
	}
	return c.header(cpioHeader{name: n, mode: cpioModeChar | unixPerm(perm), nlink: 1, rdevMajor: major, rdevMinor: minor})
}

// Close writes the trailer entry and pads the archive to a multiple of 512
// bytes (as cpio(1) does). It does not close the underlying writer. The
// padding also keeps a second archive appended after this one 4-byte aligned,
// which the kernel requires of each archive in a concatenated initramfs.
func (c *cpioWriter) Close() error {
	if c.closed {
		return nil
	}
	if err := c.header(cpioHeader{name: "TRAILER!!!", nlink: 1}); err != nil {
		return err
	}
	c.closed = true
	if r := c.offset % 512; r != 0 {
		return c.write(make([]byte, 512-r))
	}
	return nil
}
