package csi

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"slices"
	"sort"
	"strings"
	"sync"

	"github.com/csi-dmthin/csi-dmthin/internal/safepath"
	"github.com/csi-dmthin/csi-dmthin/pkg/thinpool"
	"github.com/csi-dmthin/csi-dmthin/pkg/thinpool/thinpooltest"
)

// fakeFS is an in-memory FS over a thinpooltest.FakeKernel, for tests on hosts
// without mounts or mkfs. It records the resulting state, not calls: the
// mount table, and each filesystem in a superblock it writes into the
// device's own data, where the real one lives too. So a filesystem follows
// its thin device, not the device node's name (which a deactivated and
// reactivated volume may not get back), a snapshot or clone carries its
// source's filesystem, and FSType, Format and Resize read the device as
// blkid, mkfs and resize2fs would.
//
// It refuses what the real FS (hostfs_linux.go, the kernel) refuses, so a
// driver bug fails here as it would on a node:
//   - Paths are reached through their safepath.Path handle, as the real FS
//     reaches them: a symbolic link swapped in since the lookup is refused.
//   - Mount needs an existing directory and a device holding that
//     filesystem; an option the filesystem does not know is ErrMountOption
//     (as fsconfig refuses it). BindMount needs a mounted source and a
//     directory; BindDevice an existing device node and a regular file (the
//     driver makes both targets itself). Mounting over a mount point is
//     refused (the real one would stack mounts, which the driver must
//     never do).
//   - A mounted filesystem holds its device open (FakeKernel.SetOpen), as a
//     superblock does, until its last mount (bind mounts included) is gone:
//     deactivating the device fails with EBUSY meanwhile. A bind mount of a
//     device node holds nothing open, as in the kernel.
//   - Unmount of a path that is not mounted is fine; it removes nothing.
//   - Format refuses a device holding another filesystem type.
//   - Resize needs the filesystem there; XFS grows only when mounted.
//   - Stats of a path that is not a mount point is an error.
//   - MountRefs and DeviceRefs find what the kernel's mountinfo would: the
//     other mounts of a mounted filesystem, or the bind mounts of a device
//     node.
//
// It is safe for concurrent use.
type fakeFS struct {
	k *thinpooltest.FakeKernel

	mu     sync.Mutex
	mounts map[string]fakeMount // by clean target path
	held   map[thinpool.Dev]int
	// mountHook, when set, runs at the start of Mount (outside the lock);
	// its error fails the mount. Tests use it to hold a call in progress.
	mountHook func(target string) error
	// mkfs counts the filesystems Format made, by type.
	mkfs map[string]int
}

// fakeMount is one entry of the mount table.
type fakeMount struct {
	Source  string
	FSType  string // "" for a bind mount
	Options []string
	// device is the block device whose filesystem the mount shows ("" for a
	// bind of a plain directory or of a device node).
	device string
	dev    thinpool.Dev
}

var _ FS = (*fakeFS)(nil)

func newFakeFS(k *thinpooltest.FakeKernel) *fakeFS {
	return &fakeFS{k: k, mounts: map[string]fakeMount{}, held: map[thinpool.Dev]int{}, mkfs: map[string]int{}}
}

// The fake superblock, in the device's first 512 bytes: a magic, the type
// (NUL-padded) and the filesystem's size in bytes.
const (
	fakeSBMagic = "CSIDMTHIN-FAKEFS"
	fakeSBBytes = 512
)

func (f *fakeFS) device(path string) (thinpool.Dev, int64, error) {
	dev, size, err := f.k.BlockDevice(path)
	if err != nil {
		return 0, 0, fmt.Errorf("%s: no such block device: %w", path, err)
	}
	return dev, size, nil
}

// superblock reads the fake filesystem on a device: its type ("" for none)
// and size.
func (f *fakeFS) superblock(device string) (fstype string, sizeBytes int64, err error) {
	dev, _, err := f.device(device)
	if err != nil {
		return "", 0, err
	}
	b := make([]byte, fakeSBBytes)
	if err := f.k.ReadData(dev, 0, b); err != nil {
		return "", 0, err
	}
	if !bytes.HasPrefix(b, []byte(fakeSBMagic)) {
		return "", 0, nil
	}
	typ := b[len(fakeSBMagic) : len(fakeSBMagic)+16]
	return string(bytes.TrimRight(typ, "\x00")), int64(binary.LittleEndian.Uint64(b[len(fakeSBMagic)+16:])), nil
}

func (f *fakeFS) writeSuperblock(device, fstype string, sizeBytes int64) error {
	dev, _, err := f.device(device)
	if err != nil {
		return err
	}
	b := make([]byte, fakeSBBytes)
	copy(b, fakeSBMagic)
	copy(b[len(fakeSBMagic):], fstype)
	binary.LittleEndian.PutUint64(b[len(fakeSBMagic)+16:], uint64(sizeBytes))
	return f.k.WriteData(dev, 0, b)
}

// stat looks at p through its handle, as the real FS does: a link swapped
// in since the lookup is refused (safepath.ErrSymlink), a missing path is
// os.ErrNotExist.
func stat(p *safepath.Path) (os.FileInfo, error) { return p.Stat() }

func (f *fakeFS) IsMountPoint(p *safepath.Path) (bool, error) {
	if _, err := stat(p); errors.Is(err, os.ErrNotExist) {
		return false, nil
	} else if err != nil {
		return false, err
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	_, ok := f.mounts[p.String()]
	return ok, nil
}

func (f *fakeFS) MountedDevice(p *safepath.Path) (string, error) {
	if _, err := stat(p); err != nil && !errors.Is(err, os.ErrNotExist) {
		return "", err
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.mounts[p.String()].Source, nil
}

func (f *fakeFS) Format(ctx context.Context, device, fstype string, opts FormatOptions) (bool, error) {
	if err := ctx.Err(); err != nil {
		return false, err
	}
	if !supportedFS[fstype] {
		return false, fmt.Errorf("no mkfs for %q", fstype)
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	existing, _, err := f.superblock(device)
	if err != nil {
		return false, fmt.Errorf("probe %s: %w", device, err)
	}
	if opts.Fresh && existing != "" {
		return false, fmt.Errorf("%s was said to be fresh but holds %s", device, existing)
	}
	if existing != "" {
		if existing != fstype {
			return false, fmt.Errorf("%s holds a %s filesystem, not %s; refusing to reformat", device, existing, fstype)
		}
		return false, nil
	}
	_, size, err := f.device(device)
	if err != nil {
		return false, err
	}
	f.mkfs[fstype]++
	return true, f.writeSuperblock(device, fstype, size)
}

func (f *fakeFS) FSType(device string) (string, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	t, _, err := f.superblock(device)
	return t, err
}

// fakeMountOptions are the options the fake's filesystems take, besides
// the per-mount and superblock flags every filesystem takes, with the
// values each takes (none: a flag; "*": any). Any other is refused as the
// kernel would (fsconfig's EINVAL, "Unknown parameter").
var fakeMountOptions = map[string]map[string][]string{
	"ext4": {"discard": nil, "nodiscard": nil, "noload": nil, "norecovery": nil, "nodelalloc": nil, "delalloc": nil,
		"barrier": nil, "nobarrier": nil, "commit": {"*"},
		"errors": {"continue", "remount-ro", "panic"}, "data": {"journal", "ordered", "writeback"}},
	"xfs": {"discard": nil, "nodiscard": nil, "norecovery": nil, "nouuid": nil, "inode64": nil, "largeio": nil,
		"logbufs": {"*"}, "logbsize": {"*"}, "allocsize": {"*"}},
}

func checkFakeOptions(fstype string, options []string) error {
	_, params := mountArgs(options)
	for _, o := range params {
		if sbFlags[o] {
			continue
		}
		key, value, hasValue := strings.Cut(o, "=")
		values, known := fakeMountOptions[fstype][key]
		ok := known && (!hasValue && values == nil || hasValue && (slices.Contains(values, "*") || slices.Contains(values, value)))
		if !ok {
			return fmt.Errorf("%w %q: %s: bad or unknown parameter '%s'", ErrMountOption, o, fstype, key)
		}
	}
	return nil
}

func (f *fakeFS) Mount(ctx context.Context, device string, target *safepath.Path, fstype string, options []string) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	if err := f.runHook(target); err != nil {
		return err
	}
	ti, err := stat(target)
	if err != nil {
		return fmt.Errorf("mount %s on %s: %w", device, target, err)
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	if _, ok := f.mounts[target.String()]; ok {
		return fmt.Errorf("mount %s: %s is already a mount point (the fake does not stack mounts)", device, target)
	}
	if !ti.IsDir() {
		return fmt.Errorf("mount %s on %s: not a directory", device, target)
	}
	dev, _, err := f.device(device)
	if err != nil {
		return fmt.Errorf("mount %s: %w", device, err)
	}
	have, _, err := f.superblock(device)
	if err != nil {
		return fmt.Errorf("mount %s: %w", device, err)
	}
	if have == "" || (fstype != "" && have != fstype) {
		return fmt.Errorf("mount -t %s %s %s: wrong fs type, bad option, bad superblock (device holds %q)", fstype, device, target, have)
	}
	if err := checkFakeOptions(have, options); err != nil {
		return err
	}
	return f.addMount(target.String(), fakeMount{Source: device, FSType: have, Options: slices.Clone(options), device: device, dev: dev})
}

func bindOptions(readOnly bool) []string {
	if readOnly {
		return []string{"bind", "ro"}
	}
	return []string{"bind"}
}

func (f *fakeFS) BindMount(ctx context.Context, source, target *safepath.Path, readOnly bool) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	if err := f.runHook(target); err != nil {
		return err
	}
	if _, err := stat(source); err != nil {
		return fmt.Errorf("bind %s: %w", source, err)
	}
	ti, err := stat(target)
	if err != nil {
		return fmt.Errorf("bind %s on %s: %w", source, target, err)
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	if _, ok := f.mounts[target.String()]; ok {
		return fmt.Errorf("bind %s: %s is already a mount point (the fake does not stack mounts)", source, target)
	}
	sm, ok := f.mounts[source.String()]
	if !ok {
		return fmt.Errorf("bind %s: not a mount point", source)
	}
	if !ti.IsDir() {
		return fmt.Errorf("bind %s on %s: not a directory", source, target)
	}
	return f.addMount(target.String(), fakeMount{Source: source.String(), Options: bindOptions(readOnly), device: sm.device, dev: sm.dev})
}

// BindDevice binds a device node (the fake's live only in the kernel) onto
// a file. The bind opens nothing.
func (f *fakeFS) BindDevice(ctx context.Context, device string, target *safepath.Path, readOnly bool) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	if err := f.runHook(target); err != nil {
		return err
	}
	ti, err := stat(target)
	if err != nil {
		return fmt.Errorf("bind %s on %s: %w", device, target, err)
	}
	if _, _, err := f.device(device); err != nil {
		return fmt.Errorf("bind %s: %w", device, err)
	}
	if !ti.Mode().IsRegular() {
		return fmt.Errorf("bind %s on %s: a device node binds onto a file, not a directory", device, target)
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	if _, ok := f.mounts[target.String()]; ok {
		return fmt.Errorf("bind %s: %s is already a mount point (the fake does not stack mounts)", device, target)
	}
	return f.addMount(target.String(), fakeMount{Source: device, Options: bindOptions(readOnly)})
}

func (f *fakeFS) runHook(target *safepath.Path) error {
	f.mu.Lock()
	hook := f.mountHook
	f.mu.Unlock()
	if hook != nil {
		return hook(target.String())
	}
	return nil
}

// addMount records m at target; a mounted filesystem holds its device
// open. Called with f.mu held.
func (f *fakeFS) addMount(target string, m fakeMount) error {
	if m.device != "" {
		if err := f.k.SetOpen(m.dev, f.held[m.dev]+1); err != nil {
			return fmt.Errorf("mount %s: %w", m.Source, err)
		}
		f.held[m.dev]++
	}
	f.mounts[target] = m
	return nil
}

func (f *fakeFS) Unmount(ctx context.Context, p *safepath.Path) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	if _, err := stat(p); errors.Is(err, os.ErrNotExist) {
		return nil
	} else if err != nil {
		return err
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	m, ok := f.mounts[p.String()]
	if !ok {
		return nil
	}
	if m.device != "" {
		f.held[m.dev]--
		// The last close completes a deferred removal; the error is
		// ENXIO only if the device went some other way (a test's
		// Reboot), and an unmount does not care.
		_ = f.k.SetOpen(m.dev, f.held[m.dev])
		if f.held[m.dev] == 0 {
			delete(f.held, m.dev)
		}
	}
	delete(f.mounts, p.String())
	return nil
}

func (f *fakeFS) MountRefs(p *safepath.Path) ([]string, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	m, ok := f.mounts[p.String()]
	if !ok || m.device == "" {
		return nil, nil
	}
	// A mounted filesystem: every other mount of it.
	var refs []string
	for o, om := range f.mounts {
		if o != p.String() && om.device == m.device {
			refs = append(refs, o)
		}
	}
	sort.Strings(refs)
	return refs, nil
}

func (f *fakeFS) ShowsDevice(p *safepath.Path, device string) (bool, error) {
	if _, err := stat(p); errors.Is(err, os.ErrNotExist) {
		return false, nil
	} else if err != nil {
		return false, err
	}
	dev, _, err := f.device(device)
	if err != nil {
		return false, err
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	m, ok := f.mounts[p.String()]
	if !ok {
		return false, nil
	}
	if m.device != "" {
		return m.dev == dev, nil // a filesystem on it
	}
	src, _, err := f.device(m.Source) // a bound device node
	return err == nil && src == dev, nil
}

func (f *fakeFS) DeviceRefs(device string) ([]string, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	var refs []string
	for o, om := range f.mounts {
		if om.Source == device && slices.Contains(om.Options, "bind") {
			refs = append(refs, o)
		}
	}
	sort.Strings(refs)
	return refs, nil
}

func (f *fakeFS) Resize(ctx context.Context, device string, p *safepath.Path, fstype string) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	have, size, err := f.superblock(device)
	if err != nil {
		return err
	}
	if have == "" || have != fstype {
		return fmt.Errorf("resize %s: holds %q, not a %q filesystem", device, have, fstype)
	}
	if fstype == "xfs" {
		if m, ok := f.mounts[p.String()]; !ok || m.device != device {
			return fmt.Errorf("xfs_growfs %s: is not a mounted XFS filesystem", p)
		}
	}
	_, devSize, err := f.device(device)
	if err != nil {
		return err
	}
	if devSize < size {
		return fmt.Errorf("resize %s: the device (%d bytes) is smaller than its filesystem (%d bytes)", device, devSize, size)
	}
	return f.writeSuperblock(device, fstype, devSize)
}

func (f *fakeFS) Stats(p *safepath.Path) (Stats, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	m, ok := f.mounts[p.String()]
	if !ok || m.device == "" {
		return Stats{}, fmt.Errorf("statfs %s: not a mounted filesystem", p)
	}
	_, size, err := f.superblock(m.device)
	if err != nil {
		return Stats{}, err
	}
	// A fresh filesystem: 1/64 of it in its own structures, one inode per
	// 16 KiB, 11 of them reserved (ext4's numbers, roughly).
	inodes := size / (16 << 10)
	return Stats{
		TotalBytes: size, UsedBytes: size / 64, AvailableBytes: size - size/64,
		TotalInodes: inodes, UsedInodes: 11, FreeInodes: inodes - 11,
	}, nil
}

// setMountHook sets (or, with nil, clears) the mount hook.
func (f *fakeFS) setMountHook(h func(target string) error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.mountHook = h
}

// mountTable returns the mount table, by target.
func (f *fakeFS) mountTable() map[string]fakeMount {
	f.mu.Lock()
	defer f.mu.Unlock()
	out := make(map[string]fakeMount, len(f.mounts))
	for p, m := range f.mounts {
		out[p] = m
	}
	return out
}

// mountPoints returns the mounted paths, sorted.
func (f *fakeFS) mountPoints() []string {
	f.mu.Lock()
	defer f.mu.Unlock()
	out := make([]string, 0, len(f.mounts))
	for p := range f.mounts {
		out = append(out, p)
	}
	sort.Strings(out)
	return out
}

// filesystem returns the type and size of the filesystem on device.
func (f *fakeFS) filesystem(device string) (string, int64, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.superblock(device)
}
