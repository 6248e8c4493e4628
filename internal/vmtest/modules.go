package vmtest

import (
	"bufio"
	"bytes"
	"context"
	"debug/elf"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
)

// DefaultModules are loaded when Spec.Modules is nil: what dm-thin volumes
// with ext4 or xfs on them need, and loop devices to back a pool with.
var DefaultModules = []string{"loop", "dm-thin-pool", "ext4", "xfs"}

// module is one kernel module file chosen for the initramfs.
type module struct {
	name string // normalized: "dm_thin_pool"
	path string // host path of the .ko, .ko.xz or .ko.zst
}

// modInfo is what the initramfs builder needs from a module's .modinfo.
type modInfo struct {
	depends []string // hard dependencies (depends=), must load first
	softPre []string // soft pre-dependencies (softdep=pre: ...), loaded first when found
}

// modSource answers questions about one kernel's modules. The real one reads
// a module tree; tests use a fake.
type modSource interface {
	// lookup returns the module file of a normalized name, if there is one.
	lookup(name string) (path string, ok bool)
	// builtin reports whether a normalized name is built into the kernel.
	builtin(name string) bool
	// info reads the module's dependencies.
	info(ctx context.Context, path string) (modInfo, error)
}

// normalizeModName maps "dm-thin-pool", "dm_thin_pool.ko" and
// ".../dm-thin-pool.ko.xz" to the kernel's spelling of the name,
// "dm_thin_pool" (KBUILD_MODNAME turns dashes into underscores).
func normalizeModName(s string) string {
	s = filepath.Base(s)
	for _, ext := range []string{".xz", ".zst", ".gz"} {
		s = strings.TrimSuffix(s, ext)
	}
	s = strings.TrimSuffix(s, ".ko")
	return strings.ReplaceAll(s, "-", "_")
}

// resolveModules returns the modules to insmod, in an order where every
// module comes after its dependencies. Hard dependencies that cannot be
// found are errors; soft pre-dependencies are loaded first when found and
// skipped otherwise (they are soft). A soft dependency names a module or an
// alias: "crc32c" and "crypto-crc32c" both resolve to crc32c_generic, the
// implementation that needs no CPU feature (libcrc32c fails with "unknown
// symbol" unless one is loaded before it). Built-in modules are skipped.
func resolveModules(ctx context.Context, src modSource, requested []string) ([]module, error) {
	var (
		order []module
		state = map[string]int{} // 0 unvisited, 1 in progress, 2 done
	)
	var visit func(name, neededBy string, soft bool) error
	visit = func(name, neededBy string, soft bool) error {
		switch state[name] {
		case 1:
			return fmt.Errorf("vmtest: module dependency cycle through %s", name)
		case 2:
			return nil
		}
		if src.builtin(name) {
			state[name] = 2
			return nil
		}
		p, ok := src.lookup(name)
		if !ok {
			if soft {
				return nil
			}
			if neededBy != "" {
				return fmt.Errorf("vmtest: module %s (needed by %s) not found", name, neededBy)
			}
			return fmt.Errorf("vmtest: module %s not found", name)
		}
		state[name] = 1
		mi, err := src.info(ctx, p)
		if err != nil {
			return err
		}
		for _, s := range mi.softPre {
			if r, ok := resolveSoftDep(src, s); ok {
				if err := visit(r, name, true); err != nil {
					return err
				}
			}
		}
		for _, d := range mi.depends {
			if err := visit(normalizeModName(d), name, false); err != nil {
				return err
			}
		}
		state[name] = 2
		order = append(order, module{name: name, path: p})
		return nil
	}
	for _, r := range requested {
		if err := visit(normalizeModName(r), "", false); err != nil {
			return nil, err
		}
	}
	return order, nil
}

// resolveSoftDep maps a soft dependency to a module name: the name itself,
// the name without a "crypto-" alias prefix, or its "_generic" variant.
// Aliases are not searched further: that would read every module's
// .modinfo on every run, and an unresolved soft dependency shows up as an
// insmod failure on the console.
func resolveSoftDep(src modSource, dep string) (string, bool) {
	base := normalizeModName(strings.TrimPrefix(dep, "crypto-"))
	for _, n := range []string{normalizeModName(dep), base, base + "_generic"} {
		if src.builtin(n) {
			return "", false // satisfied by the kernel itself
		}
		if _, ok := src.lookup(n); ok {
			return n, true
		}
	}
	return "", false
}

// parseModinfo reads a .modinfo section: NUL-separated "key=value" strings.
func parseModinfo(data []byte) modInfo {
	var mi modInfo
	for _, kv := range bytes.Split(data, []byte{0}) {
		k, v, ok := strings.Cut(string(kv), "=")
		if !ok {
			continue
		}
		switch k {
		case "depends":
			for _, d := range strings.Split(v, ",") {
				if d = strings.TrimSpace(d); d != "" {
					mi.depends = append(mi.depends, d)
				}
			}
		case "softdep":
			// "pre: a b post: c": names after "pre:" until another section.
			pre := false
			for _, f := range strings.Fields(v) {
				switch {
				case f == "pre:":
					pre = true
				case strings.HasSuffix(f, ":"):
					pre = false
				case pre:
					mi.softPre = append(mi.softPre, f)
				}
			}
		}
	}
	return mi
}

// moduleTree is the modSource of an unpacked kernel's lib/modules/<version>.
type moduleTree struct {
	dir      string
	files    map[string]string // normalized name -> host path
	builtins map[string]bool
}

// loadModuleTree indexes every module file under dir/kernel and reads
// dir/modules.builtin.
func loadModuleTree(dir string) (*moduleTree, error) {
	t := &moduleTree{dir: dir, files: map[string]string{}, builtins: map[string]bool{}}
	err := filepath.WalkDir(filepath.Join(dir, "kernel"), func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if !d.IsDir() && isModuleFile(p) {
			t.files[normalizeModName(p)] = p
		}
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("vmtest: index modules: %w", err)
	}
	if f, err := os.Open(filepath.Join(dir, "modules.builtin")); err == nil {
		sc := bufio.NewScanner(f)
		for sc.Scan() {
			t.builtins[normalizeModName(sc.Text())] = true
		}
		_ = f.Close()
	}
	return t, nil
}

func isModuleFile(p string) bool {
	for _, ext := range []string{".ko", ".ko.xz", ".ko.zst"} {
		if strings.HasSuffix(p, ext) {
			return true
		}
	}
	return false
}

func (t *moduleTree) lookup(name string) (string, bool) {
	p, ok := t.files[name]
	return p, ok
}

func (t *moduleTree) builtin(name string) bool { return t.builtins[name] }

func (t *moduleTree) info(ctx context.Context, path string) (modInfo, error) {
	data, err := readModule(ctx, path)
	if err != nil {
		return modInfo{}, err
	}
	f, err := elf.NewFile(bytes.NewReader(data))
	if err != nil {
		return modInfo{}, fmt.Errorf("vmtest: module %s: %w", path, err)
	}
	defer func() { _ = f.Close() }()
	sec := f.Section(".modinfo")
	if sec == nil {
		return modInfo{}, fmt.Errorf("vmtest: module %s has no .modinfo section", path)
	}
	raw, err := sec.Data()
	if err != nil {
		return modInfo{}, fmt.Errorf("vmtest: module %s: .modinfo: %w", path, err)
	}
	return parseModinfo(raw), nil
}

// readModule returns a module's ELF bytes, decompressing .ko.xz and .ko.zst
// with the host's xz or zstd (busybox insmod in the guest loads plain .ko).
func readModule(ctx context.Context, path string) ([]byte, error) {
	var tool string
	switch {
	case strings.HasSuffix(path, ".ko"):
		return os.ReadFile(path)
	case strings.HasSuffix(path, ".ko.xz"):
		tool = "xz"
	case strings.HasSuffix(path, ".ko.zst"):
		tool = "zstd"
	default:
		return nil, fmt.Errorf("vmtest: %s: not a kernel module file", path)
	}
	out, err := runCmd(ctx, "", tool, "-d", "-c", path)
	if err != nil {
		if errors.Is(err, exec.ErrNotFound) {
			return nil, fmt.Errorf("vmtest: module %s is compressed and %s is not installed: %w", path, tool, err)
		}
		return nil, fmt.Errorf("vmtest: decompress module: %w", err)
	}
	return out, nil
}
