package vmtest

import (
	"bufio"
	"bytes"
	"context"
	"debug/elf"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
)

// maxSymlinkHops bounds how many links a tool's path may go through.
const maxSymlinkHops = 16

// toolEntries returns the archive entries that put the named host
// executables into the guest at their host paths: each symbolic link on the
// way (lvcreate -> lvm stays a link), the program itself, and every shared
// library that ldd lists for it, dynamic loader included. A name without a
// slash is looked up in PATH.
func toolEntries(ctx context.Context, names []string) ([]entry, error) {
	var out []entry
	for _, name := range names {
		p := name
		if !filepath.IsAbs(name) {
			lp, err := exec.LookPath(name)
			if err != nil {
				return nil, fmt.Errorf("vmtest: tool %q: %w", name, err)
			}
			if p, err = filepath.Abs(lp); err != nil {
				return nil, fmt.Errorf("vmtest: tool %q: %w", name, err)
			}
		}
		es, err := executableEntries(ctx, filepath.Clean(p))
		if err != nil {
			return nil, fmt.Errorf("vmtest: tool %q: %w", name, err)
		}
		out = append(out, es...)
	}
	return out, nil
}

// executableEntries follows p through its symbolic links, then adds the file
// and, when it is a dynamically linked ELF program, its libraries.
func executableEntries(ctx context.Context, p string) ([]entry, error) {
	var out []entry
	for hop := 0; ; hop++ {
		if hop > maxSymlinkHops {
			return nil, fmt.Errorf("%s: too many levels of symbolic links", p)
		}
		fi, err := os.Lstat(p)
		if err != nil {
			return nil, err
		}
		if fi.Mode()&os.ModeSymlink == 0 {
			if !fi.Mode().IsRegular() {
				return nil, fmt.Errorf("%s is not a regular file", p)
			}
			out = append(out, entry{kind: kindFile, guest: p, host: p, mode: permBits(fi.Mode())})
			break
		}
		target, err := os.Readlink(p)
		if err != nil {
			return nil, err
		}
		out = append(out, entry{kind: kindSymlink, guest: p, target: target})
		if !filepath.IsAbs(target) {
			target = filepath.Join(filepath.Dir(p), target)
		}
		p = filepath.Clean(target)
	}
	libs, err := sharedLibraries(ctx, p)
	if err != nil {
		return nil, err
	}
	for _, l := range libs {
		// Libraries go in as plain files at the path ldd printed, following
		// the host's links (/lib64 -> usr/lib64 on a merged-/usr host);
		// the dynamic loader looks for them by exactly those paths.
		fi, err := os.Stat(l)
		if err != nil {
			return nil, fmt.Errorf("library of %s: %w", p, err)
		}
		out = append(out, entry{kind: kindFile, guest: l, host: l, mode: permBits(fi.Mode())})
	}
	return out, nil
}

// elfInterpreter returns the PT_INTERP of an ELF file ("" for a static
// program), and isELF=false for anything else (a script, say).
func elfInterpreter(p string) (interp string, isELF bool, err error) {
	r, err := os.Open(p)
	if err != nil {
		return "", false, err
	}
	defer func() { _ = r.Close() }()
	magic := make([]byte, len(elf.ELFMAG))
	if _, err := io.ReadFull(r, magic); err != nil || string(magic) != elf.ELFMAG {
		return "", false, nil // too short for a header, or not ELF
	}
	f, err := elf.NewFile(r)
	if err != nil {
		return "", true, fmt.Errorf("%s: %w", p, err)
	}
	defer func() { _ = f.Close() }()
	for _, prog := range f.Progs {
		if prog.Type != elf.PT_INTERP {
			continue
		}
		b := make([]byte, prog.Filesz)
		if _, err := prog.ReadAt(b, 0); err != nil {
			return "", true, fmt.Errorf("%s: read PT_INTERP: %w", p, err)
		}
		return string(bytes.TrimRight(b, "\x00")), true, nil
	}
	return "", true, nil
}

// sharedLibraries returns what `ldd p` lists for a dynamically linked ELF
// program, and nothing for a static program or a script.
func sharedLibraries(ctx context.Context, p string) ([]string, error) {
	interp, isELF, err := elfInterpreter(p)
	if err != nil || !isELF || interp == "" {
		return nil, err
	}
	out, err := runCmd(ctx, "", "ldd", p)
	if err != nil {
		return nil, err
	}
	libs, missing := parseLdd(out)
	if len(missing) > 0 {
		return nil, fmt.Errorf("ldd %s: libraries not found: %s", p, strings.Join(missing, ", "))
	}
	return libs, nil
}

// parseLdd reads ldd's output. Lines look like
//
//	linux-vdso.so.1 (0x00007ffc...)                        kernel-provided: skipped
//	libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)   a library
//	/lib64/ld-linux-x86-64.so.2 (0x...)                    the dynamic loader
//	libfoo.so.1 => not found                               missing
//	statically linked                                      nothing
//
// It returns the absolute paths, in order and without duplicates, and the
// names of the libraries ldd could not find.
func parseLdd(out []byte) (libs, missing []string) {
	seen := map[string]bool{}
	sc := bufio.NewScanner(bytes.NewReader(out))
	for sc.Scan() {
		line := strings.TrimSpace(sc.Text())
		name, where, arrow := strings.Cut(line, "=>")
		if !arrow {
			where = name
		}
		name, where = strings.TrimSpace(name), strings.TrimSpace(where)
		if where == "not found" {
			missing = append(missing, name)
			continue
		}
		if i := strings.Index(where, " (0x"); i >= 0 {
			where = where[:i]
		}
		if !strings.HasPrefix(where, "/") || seen[where] {
			continue
		}
		seen[where] = true
		libs = append(libs, where)
	}
	return libs, missing
}
