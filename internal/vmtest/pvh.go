package vmtest

import (
	"bytes"
	"compress/gzip"
	"context"
	"debug/elf"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
)

// Booting the compressed bzImage under TCG costs about 4.5 s before the
// kernel prints its first line: SeaBIOS, the real-mode setup code and, most
// of all, the xz decompressor running on an emulated CPU. Debian builds the
// kernel with CONFIG_PVH, so its uncompressed ELF image carries a PVH entry
// point (a Xen ELF note, XEN_ELFNOTE_PHYS32_ENTRY) that qemu jumps to
// directly. The same kernel then reaches /init in about 3 s instead of
// 7.5 s. The image is decompressed once, on the host, and cached beside the
// unpacked package.

// pvhImageName is the cached uncompressed kernel inside a kernel directory;
// noPVHName records that a kernel cannot be booted that way.
const (
	pvhImageName = "vmlinux-pvh"
	noPVHName    = "no-pvh"
)

// errNoPVH means the kernel image cannot be booted through PVH.
var errNoPVH = errors.New("kernel has no PVH entry point")

// xenElfnotePhys32Entry is XEN_ELFNOTE_PHYS32_ENTRY from xen/interface/elfnote.h.
const xenElfnotePhys32Entry = 18

// ensurePVH sets k.PVH to the cached uncompressed image, extracting it under
// the kernel lock if it is not there yet. On any failure k.PVH stays empty
// and Run boots the bzImage, which is slower but equivalent.
func ensurePVH(ctx context.Context, kernelsDir string, k *Kernel) {
	root := filepath.Join(kernelsDir, k.Version)
	img := filepath.Join(root, pvhImageName)
	if _, err := os.Stat(img); err == nil {
		k.PVH = img
		return
	}
	if _, err := os.Stat(filepath.Join(root, noPVHName)); err == nil {
		return
	}
	unlock, err := lockFile(ctx, filepath.Join(kernelsDir, ".lock"), nil)
	if err != nil {
		return
	}
	defer unlock()
	if _, err := os.Stat(img); err == nil {
		k.PVH = img
		return
	}
	err = writeFileAtomic(img, func(f *os.File) error {
		data, err := extractVmlinux(ctx, k.Vmlinuz)
		if err != nil {
			return err
		}
		if err := checkPVHNote(data); err != nil {
			return err
		}
		_, err = f.Write(data)
		return err
	})
	switch {
	case err == nil:
		k.PVH = img
	case errors.Is(err, errNoPVH):
		_ = os.WriteFile(filepath.Join(root, noPVHName), []byte(err.Error()+"\n"), 0o644)
	}
}

// extractVmlinux returns the kernel ELF image inside a bzImage. The setup
// header (Documentation/arch/x86/boot.rst) gives the compressed payload's
// offset from the protected-mode code, which starts after setup_sects+1
// sectors, and its length; the build appends the uncompressed size as a
// little-endian u32 to the compressed stream.
func extractVmlinux(ctx context.Context, bzImage string) ([]byte, error) {
	d, err := os.ReadFile(bzImage)
	if err != nil {
		return nil, err
	}
	if len(d) < 0x250 || string(d[0x202:0x206]) != "HdrS" || binary.LittleEndian.Uint16(d[0x206:]) < 0x208 {
		return nil, fmt.Errorf("%w: %s is not a bzImage with boot protocol 2.08+", errNoPVH, bzImage)
	}
	setupSects := int(d[0x1f1])
	if setupSects == 0 {
		setupSects = 4
	}
	start := (setupSects+1)*512 + int(binary.LittleEndian.Uint32(d[0x248:]))
	end := start + int(binary.LittleEndian.Uint32(d[0x24c:]))
	if start < 0 || end > len(d) || end-start < 8 {
		return nil, fmt.Errorf("%w: %s: payload out of range", errNoPVH, bzImage)
	}
	payload, sizeField := d[start:end-4], d[end-4:end]
	var out []byte
	switch {
	case bytes.HasPrefix(payload, []byte{0x1f, 0x8b}):
		zr, err := gzip.NewReader(bytes.NewReader(payload))
		if err != nil {
			return nil, err
		}
		zr.Multistream(false)
		out, err = io.ReadAll(zr)
		if err != nil {
			return nil, err
		}
	case bytes.HasPrefix(payload, []byte("\xfd7zXZ\x00")):
		out, err = runCmdStdin(ctx, payload, "xz", "-d", "-c")
	case bytes.HasPrefix(payload, []byte{0x28, 0xb5, 0x2f, 0xfd}):
		out, err = runCmdStdin(ctx, payload, "zstd", "-d", "-c")
	default:
		return nil, fmt.Errorf("%w: %s: unsupported compression", errNoPVH, bzImage)
	}
	if err != nil {
		return nil, fmt.Errorf("decompress %s: %w", bzImage, err)
	}
	if want := binary.LittleEndian.Uint32(sizeField); uint32(len(out)) != want {
		return nil, fmt.Errorf("decompress %s: got %d bytes, header says %d", bzImage, len(out), want)
	}
	return out, nil
}

// checkPVHNote reports errNoPVH unless the ELF image has a PVH entry note.
func checkPVHNote(data []byte) error {
	f, err := elf.NewFile(bytes.NewReader(data))
	if err != nil {
		return fmt.Errorf("%w: decompressed kernel: %v", errNoPVH, err)
	}
	defer func() { _ = f.Close() }()
	for _, p := range f.Progs {
		if p.Type != elf.PT_NOTE {
			continue
		}
		notes, err := io.ReadAll(p.Open())
		if err != nil {
			return err
		}
		if hasNote(notes, "Xen", xenElfnotePhys32Entry) {
			return nil
		}
	}
	return errNoPVH
}

// hasNote walks ELF notes: namesz, descsz, type (u32 each), then the name
// and the descriptor, each padded to 4 bytes.
func hasNote(b []byte, name string, typ uint32) bool {
	pad := func(n uint32) int { return int((n + 3) &^ 3) }
	for len(b) >= 12 {
		namesz, descsz, t := binary.LittleEndian.Uint32(b), binary.LittleEndian.Uint32(b[4:]), binary.LittleEndian.Uint32(b[8:])
		b = b[12:]
		if pad(namesz)+pad(descsz) > len(b) {
			return false
		}
		n := string(bytes.TrimRight(b[:namesz], "\x00"))
		if n == name && t == typ {
			return true
		}
		b = b[pad(namesz)+pad(descsz):]
	}
	return false
}
