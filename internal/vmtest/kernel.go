package vmtest

import (
	"bufio"
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
)

// Kernel is an unpacked Debian kernel image package in the cache.
type Kernel struct {
	Version    string // kernel release, e.g. "6.1.0-56-amd64"
	Vmlinuz    string // host path of the bootable image
	ModulesDir string // host path of .../lib/modules/<Version>
	// PVH is the uncompressed image that qemu boots directly through its
	// PVH entry point, skipping the firmware and the decompressor (see
	// pvh.go); empty if the kernel has none, and then Vmlinuz is booted.
	PVH string
}

// kernelMetaPackage is the Debian package whose dependency names the current
// kernel image package for amd64.
const kernelMetaPackage = "linux-image-amd64"

// FetchKernel returns the kernel that `apt-cache depends linux-image-amd64`
// names (e.g. linux-image-6.1.0-56-amd64), downloading it with
// `apt-get download` and unpacking it with `dpkg-deb -x` into
// <cache>/kernel/<version>/ unless that is already there.
//
// When the version cannot be resolved or downloaded (no apt lists, offline)
// but some kernel is cached, the newest cached one is used. It is safe to call
// from several processes at once: downloads are serialized by a lock file in
// the cache, and a kernel directory appears only once completely unpacked.
func FetchKernel(ctx context.Context) (*Kernel, error) {
	dir, err := CacheDir()
	if err != nil {
		return nil, err
	}
	return fetchKernel(ctx, filepath.Join(dir, "kernel"))
}

func fetchKernel(ctx context.Context, kernelsDir string) (*Kernel, error) {
	k, err := fetchKernelPackage(ctx, kernelsDir)
	if err != nil {
		return nil, err
	}
	ensurePVH(ctx, kernelsDir, k)
	return k, nil
}

func fetchKernelPackage(ctx context.Context, kernelsDir string) (*Kernel, error) {
	version, resolveErr := resolveKernelVersionCached(ctx, kernelsDir)
	if resolveErr == nil {
		if k, err := cachedKernel(kernelsDir, version); err == nil {
			return k, nil
		}
		k, err := downloadKernel(ctx, kernelsDir, version)
		if err == nil {
			return k, nil
		}
		resolveErr = err
	}
	if ctx.Err() != nil {
		return nil, resolveErr
	}
	if k, err := newestCachedKernel(kernelsDir); err == nil {
		return k, nil
	}
	return nil, fmt.Errorf("vmtest: no kernel: %w (and none cached in %s)", resolveErr, kernelsDir)
}

// aptListsDir is where apt keeps the package lists apt-cache reads.
const aptListsDir = "/var/lib/apt/lists"

// resolveKernelVersionCached remembers apt-cache's answer (it takes about a
// second to load its cache) until the package lists change, which is when
// its answer can change.
func resolveKernelVersionCached(ctx context.Context, kernelsDir string) (string, error) {
	sig, sigErr := aptListsSignature()
	memo := filepath.Join(kernelsDir, "resolved")
	if sigErr == nil {
		if b, err := os.ReadFile(memo); err == nil {
			if s, v, ok := strings.Cut(strings.TrimSpace(string(b)), " "); ok && s == sig && v != "" {
				return v, nil
			}
		}
	}
	v, err := resolveKernelVersion(ctx)
	if err != nil || sigErr != nil {
		return v, err
	}
	if err := os.MkdirAll(kernelsDir, 0o755); err == nil {
		_ = writeFileAtomic(memo, func(f *os.File) error {
			_, err := fmt.Fprintf(f, "%s %s\n", sig, v)
			return err
		})
	}
	return v, nil
}

// aptListsSignature hashes the names, sizes and times of apt's list files.
func aptListsSignature() (string, error) {
	entries, err := os.ReadDir(aptListsDir)
	if err != nil {
		return "", err
	}
	h := sha256.New()
	n := 0
	for _, e := range entries {
		fi, err := e.Info()
		if err != nil || !fi.Mode().IsRegular() || e.Name() == "lock" {
			continue
		}
		fmt.Fprintf(h, "%s %d %d\n", e.Name(), fi.Size(), fi.ModTime().UnixNano())
		n++
	}
	if n == 0 {
		return "", errors.New("no apt lists")
	}
	return hex.EncodeToString(h.Sum(nil))[:32], nil
}

// resolveKernelVersion asks apt which image package the meta package depends
// on and returns its kernel release ("6.1.0-56-amd64").
func resolveKernelVersion(ctx context.Context) (string, error) {
	out, err := runCmd(ctx, "", "apt-cache", "depends", kernelMetaPackage)
	if err != nil {
		return "", err
	}
	v, err := parseAptDepends(out)
	if err != nil {
		return "", fmt.Errorf("apt-cache depends %s: %w (run apt-get update)", kernelMetaPackage, err)
	}
	return v, nil
}

// parseAptDepends finds the first "Depends: linux-image-<version>" line of
// `apt-cache depends` output and returns <version>.
func parseAptDepends(out []byte) (string, error) {
	sc := bufio.NewScanner(bytes.NewReader(out))
	for sc.Scan() {
		line := strings.TrimLeft(strings.TrimSpace(sc.Text()), "|")
		dep, ok := strings.CutPrefix(line, "Depends:")
		if !ok {
			continue
		}
		dep = strings.TrimSpace(dep)
		if v, ok := strings.CutPrefix(dep, "linux-image-"); ok && v != "" && !strings.ContainsAny(v, "<>/ ") {
			return v, nil
		}
	}
	return "", errors.New("no linux-image-* dependency listed")
}

// cachedKernel returns the kernel unpacked at kernelsDir/version.
func cachedKernel(kernelsDir, version string) (*Kernel, error) {
	root := filepath.Join(kernelsDir, version)
	k := &Kernel{Version: version, Vmlinuz: filepath.Join(root, "boot", "vmlinuz-"+version)}
	if _, err := os.Stat(k.Vmlinuz); err != nil {
		return nil, err
	}
	// Debian 12 ships modules under lib/, later releases under usr/lib/.
	for _, m := range []string{filepath.Join(root, "lib", "modules", version), filepath.Join(root, "usr", "lib", "modules", version)} {
		if fi, err := os.Stat(m); err == nil && fi.IsDir() {
			k.ModulesDir = m
			return k, nil
		}
	}
	return nil, fmt.Errorf("vmtest: kernel %s in %s has no modules directory", version, root)
}

// newestCachedKernel returns the cached kernel with the highest version.
func newestCachedKernel(kernelsDir string) (*Kernel, error) {
	entries, err := os.ReadDir(kernelsDir)
	if err != nil {
		return nil, err
	}
	var best *Kernel
	for _, e := range entries {
		if !e.IsDir() || strings.HasPrefix(e.Name(), ".") {
			continue
		}
		k, err := cachedKernel(kernelsDir, e.Name())
		if err != nil {
			continue
		}
		if best == nil || compareVersions(k.Version, best.Version) > 0 {
			best = k
		}
	}
	if best == nil {
		return nil, errors.New("no cached kernel")
	}
	return best, nil
}

// compareVersions orders kernel releases such as "6.1.0-56-amd64" by
// comparing runs of digits numerically and everything else as text.
func compareVersions(a, b string) int {
	for a != "" && b != "" {
		ra, restA := versionRun(a)
		rb, restB := versionRun(b)
		na, errA := strconv.ParseUint(ra, 10, 64)
		nb, errB := strconv.ParseUint(rb, 10, 64)
		switch {
		case errA == nil && errB == nil && na != nb:
			if na < nb {
				return -1
			}
			return 1
		case (errA != nil || errB != nil) && ra != rb:
			return strings.Compare(ra, rb)
		}
		a, b = restA, restB
	}
	return strings.Compare(a, b)
}

// versionRun splits off the leading run of digits or of non-digits.
func versionRun(s string) (run, rest string) {
	digit := s[0] >= '0' && s[0] <= '9'
	i := 1
	for i < len(s) && (s[i] >= '0' && s[i] <= '9') == digit {
		i++
	}
	return s[:i], s[i:]
}

// downloadKernel fetches and unpacks linux-image-<version> under the kernel
// lock. It unpacks into a temporary directory and renames it into place, so
// a crash never leaves a half-unpacked kernel that looks complete.
func downloadKernel(ctx context.Context, kernelsDir, version string) (*Kernel, error) {
	unlock, err := lockFile(ctx, filepath.Join(kernelsDir, ".lock"), nil)
	if err != nil {
		return nil, err
	}
	defer unlock()
	if k, err := cachedKernel(kernelsDir, version); err == nil {
		return k, nil // another process fetched it while we waited
	}
	// Holding the lock, no other fetch is under way: what earlier fetches
	// left (a killed process) is garbage of some 400 MB each.
	stale, _ := filepath.Glob(filepath.Join(kernelsDir, ".fetch-*"))
	for _, d := range stale {
		_ = os.RemoveAll(d)
	}
	tmp, err := os.MkdirTemp(kernelsDir, ".fetch-"+version+"-")
	if err != nil {
		return nil, fmt.Errorf("vmtest: %w", err)
	}
	defer func() { _ = os.RemoveAll(tmp) }()

	pkg := "linux-image-" + version
	if _, err := runCmd(ctx, tmp, "apt-get", "download", pkg); err != nil {
		return nil, fmt.Errorf("vmtest: download kernel: %w", err)
	}
	debs, _ := filepath.Glob(filepath.Join(tmp, pkg+"_*.deb"))
	if len(debs) != 1 {
		return nil, fmt.Errorf("vmtest: apt-get download %s left %d .deb files in %s, want 1", pkg, len(debs), tmp)
	}
	root := filepath.Join(tmp, "root")
	if _, err := runCmd(ctx, "", "dpkg-deb", "-x", debs[0], root); err != nil {
		return nil, fmt.Errorf("vmtest: unpack kernel: %w", err)
	}
	final := filepath.Join(kernelsDir, version)
	if err := os.Rename(root, final); err != nil {
		return nil, fmt.Errorf("vmtest: %w", err)
	}
	k, err := cachedKernel(kernelsDir, version)
	if err != nil {
		_ = os.RemoveAll(final) // not a usable kernel: do not let it look cached
		return nil, fmt.Errorf("vmtest: unpacked %s: %w", filepath.Base(debs[0]), err)
	}
	return k, nil
}
