package csi

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"slices"
	"strings"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
	mount "k8s.io/mount-utils"
	utilexec "k8s.io/utils/exec"

	"github.com/csi-dmthin/csi-dmthin/internal/fsprobe"
	"github.com/csi-dmthin/csi-dmthin/internal/safepath"
)

// hostFS is the real FS. External programs (mkfs, resize2fs, xfs_growfs,
// blkid) run with argument arrays, LC_ALL=C and the caller's context: a
// cancelled request kills them.
type hostFS struct {
	mounter *mount.SafeFormatAndMount

	prezeroedOnce sync.Once
	prezeroed     bool
}

// NewHostFS returns the FS of this machine.
func NewHostFS() FS {
	return &hostFS{mounter: &mount.SafeFormatAndMount{Interface: mount.New(""), Exec: utilexec.New()}}
}

func run(ctx context.Context, name string, args ...string) error {
	return runFiles(ctx, nil, name, args...)
}

// runFiles is run with files open in the program as descriptors 3, 4, ...
func runFiles(ctx context.Context, files []*os.File, name string, args ...string) error {
	cmd := exec.CommandContext(ctx, name, args...)
	cmd.Env = append(os.Environ(), "LC_ALL=C")
	cmd.ExtraFiles = files
	out, err := cmd.CombinedOutput()
	if err != nil {
		return fmt.Errorf("%s %s: %w: %s", name, strings.Join(args, " "), err, strings.TrimSpace(string(out)))
	}
	return nil
}

// mountEntry returns the mountinfo entry of the mount whose root p is;
// ok is false when p is not a mount point or does not exist.
func mountEntry(p *safepath.Path) (e mount.MountInfo, ok bool, err error) {
	f, err := p.Open()
	if errors.Is(err, os.ErrNotExist) {
		return e, false, nil
	}
	if err != nil {
		return e, false, err
	}
	defer f.Close()
	root, id, err := mountRoot(f)
	if err != nil || !root {
		return e, false, err
	}
	mis, err := mount.ParseMountInfo("/proc/self/mountinfo")
	if err != nil {
		return e, false, err
	}
	for _, mi := range mis {
		if uint64(mi.ID) == id {
			return mi, true, nil
		}
	}
	return e, false, fmt.Errorf("%s: mount %d is not in /proc/self/mountinfo", p, id)
}

func (h *hostFS) IsMountPoint(p *safepath.Path) (bool, error) {
	f, err := p.Open()
	if errors.Is(err, os.ErrNotExist) {
		return false, nil
	}
	if err != nil {
		return false, err
	}
	defer f.Close()
	root, _, err := mountRoot(f)
	return root, err
}

func (h *hostFS) MountedDevice(p *safepath.Path) (string, error) {
	e, _, err := mountEntry(p)
	return e.Source, err
}

// mkfsArgs skip discarding (a new thin device has nothing to discard, and
// discarding a large one is slow) and lazy-initialise ext4's tables. ext4
// gets metadata_csum_seed, so that its UUID can change without rewriting
// every checksum (fsprobe.NewExtUUID).
var mkfsArgs = map[string][]string{
	"ext4": {"-F", "-q", "-m", "0", "-O", "metadata_csum_seed", "-E", "nodiscard,lazy_itable_init=1,lazy_journal_init=1"},
	"xfs":  {"-f", "-q", "-K"},
}

// mkfsArgsZeroed replace mkfsArgs for a fresh device in a pool that zeroes
// new blocks: e2fsprogs 1.47's assume_storage_prezeroed skips zeroing the
// inode tables and marks them zeroed, so no clone's first mount starts the
// kernel's lazy zeroing of its own copy.
var mkfsArgsZeroed = map[string][]string{
	"ext4": {"-F", "-q", "-m", "0", "-O", "metadata_csum_seed", "-E", "nodiscard,assume_storage_prezeroed=1"},
}

func (h *hostFS) Format(ctx context.Context, device, fstype string, opts FormatOptions) (bool, error) {
	args, ok := mkfsArgs[fstype]
	if !ok {
		return false, fmt.Errorf("no mkfs for %q", fstype)
	}
	if !opts.Fresh {
		existing, err := h.prepare(device)
		if err != nil {
			return false, err
		}
		if existing != "" {
			if existing != fstype {
				return false, fmt.Errorf("%s holds a %s filesystem, not %s; refusing to reformat", device, existing, fstype)
			}
			return false, nil
		}
	}
	if z, ok := mkfsArgsZeroed[fstype]; ok && opts.Fresh && opts.Zeroed && h.prezeroedOK() {
		args = z
	}
	return true, run(ctx, "mkfs."+fstype, append(slices.Clone(args), device)...)
}

// prepare returns the filesystem type on device ("" for none, or for an
// XFS whose mkfs never finished). It reads ext* and XFS superblocks itself
// and asks blkid only about anything else, which keeps the exec off the
// path of a volume cloned from a template. A never-mounted ext4 (such a
// clone) gets its own UUID here, before its first mount: clones must not
// all share their template's.
func (h *hostFS) prepare(device string) (string, error) {
	info, err := probeExclusive(device)
	if err != nil {
		return "", err
	}
	switch {
	case info.Unfinished:
		// blkid would call it xfs, and the kernel refuses to mount it.
		return "", nil
	case info.Type == "":
		existing, err := h.mounter.GetDiskFormat(device)
		if err != nil {
			return "", fmt.Errorf("probe %s: %w", device, err)
		}
		return existing, nil
	}
	return info.Type, nil
}

// probeExclusive reads device's superblock with the device open for
// exclusive use (so nothing that has it mounted or open is touched), and
// gives a never-mounted ext4 its own UUID. No process is forked while the
// device is open: a child forked by another call would hold a copy of the
// exclusive open until it execs, and the mount that follows the probe
// would fail with EBUSY (the SIGKILL test of serve met it).
func probeExclusive(device string) (fsprobe.Info, error) {
	syscall.ForkLock.RLock()
	defer syscall.ForkLock.RUnlock()
	f, err := os.OpenFile(device, os.O_RDWR|unix.O_EXCL|unix.O_CLOEXEC, 0)
	if err != nil {
		return fsprobe.Info{}, fmt.Errorf("open %s: %w", device, err)
	}
	defer f.Close()
	info, err := fsprobe.Probe(f)
	if err != nil {
		return fsprobe.Info{}, fmt.Errorf("probe %s: %w", device, err)
	}
	if !info.Unfinished && info.NeverMounted && info.UUIDChangeable {
		if _, err := fsprobe.NewExtUUID(f); err != nil {
			return fsprobe.Info{}, fmt.Errorf("new filesystem UUID on %s: %w", device, err)
		}
	}
	return info, nil
}

// prezeroedOK reports whether this mkfs.ext4 knows assume_storage_prezeroed
// (e2fsprogs 1.47 and later); asked once.
func (h *hostFS) prezeroedOK() bool {
	h.prezeroedOnce.Do(func() {
		out, _ := exec.Command("mkfs.ext4", "-V").CombinedOutput()
		var major, minor int
		if i := strings.Index(string(out), "mke2fs "); i >= 0 {
			fmt.Sscanf(string(out[i+len("mke2fs "):]), "%d.%d", &major, &minor)
		}
		h.prezeroed = major > 1 || (major == 1 && minor >= 47)
	})
	return h.prezeroed
}

func (h *hostFS) FSType(device string) (string, error) {
	f, err := os.Open(device)
	if err != nil {
		return "", err
	}
	info, err := fsprobe.Probe(f)
	f.Close()
	if err != nil || info.Type != "" || info.Unfinished {
		return info.Type, err
	}
	return h.mounter.GetDiskFormat(device)
}

func (h *hostFS) Mount(ctx context.Context, device string, target *safepath.Path, fstype string, options []string) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	f, err := target.Open()
	if err != nil {
		return err
	}
	defer f.Close()
	return sysMount(device, f, fstype, options)
}

func (h *hostFS) BindMount(ctx context.Context, source, target *safepath.Path, readOnly bool) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	src, err := source.Open()
	if err != nil {
		return err
	}
	defer src.Close()
	if root, _, err := mountRoot(src); err != nil || !root {
		return fmt.Errorf("bind %s: not a mount point (%v)", source, err)
	}
	dst, err := target.Open()
	if err != nil {
		return err
	}
	defer dst.Close()
	return sysBind(src, "", dst, readOnly)
}

func (h *hostFS) BindDevice(ctx context.Context, device string, target *safepath.Path, readOnly bool) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	dst, err := target.Open()
	if err != nil {
		return err
	}
	defer dst.Close()
	return sysBind(nil, device, dst, readOnly)
}

// Unmount unmounts the name in its opened parent directory, not following
// a link there (UMOUNT_NOFOLLOW), and not lazily: a mount still in use
// stays and is an error (EBUSY). A descriptor of the mount itself would
// hold it busy, so none is open at the umount2.
func (h *hostFS) Unmount(ctx context.Context, p *safepath.Path) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	mounted, err := h.IsMountPoint(p)
	if err != nil || !mounted {
		return err
	}
	// A child another call forked while this process held a descriptor of
	// the mount (mounting it, say) holds a copy until it execs, and the
	// kernel calls the mount busy meanwhile: a short wait tells that from
	// a mount in use.
	deadline := time.Now().Add(unmountBusyWait)
	for {
		err := unix.Unmount(p.InParent(), unix.UMOUNT_NOFOLLOW)
		switch {
		case err == nil, errors.Is(err, unix.EINVAL):
			return nil
		case errors.Is(err, unix.EBUSY) && time.Now().Before(deadline):
			select {
			case <-ctx.Done():
				return ctx.Err()
			case <-time.After(20 * time.Millisecond):
			}
			continue
		}
		return fmt.Errorf("umount %s: %w", p, err)
	}
}

// unmountBusyWait is how long Unmount retries a mount the kernel calls
// busy before it says so.
const unmountBusyWait = time.Second

func (h *hostFS) MountRefs(p *safepath.Path) ([]string, error) {
	e, ok, err := mountEntry(p)
	if err != nil || !ok {
		return nil, err
	}
	mis, err := mount.ParseMountInfo("/proc/self/mountinfo")
	if err != nil {
		return nil, err
	}
	var refs []string
	for _, mi := range mis {
		if mi.ID != e.ID && mi.Major == e.Major && mi.Minor == e.Minor && mi.Root == e.Root {
			refs = append(refs, mi.MountPoint)
		}
	}
	return refs, nil
}

func (h *hostFS) DeviceRefs(device string) ([]string, error) { return h.mounter.GetMountRefs(device) }

// ShowsDevice compares device numbers: a filesystem's files carry its
// block device's number as st_dev, a bound device node its own as
// st_rdev. No path string is compared, so a kubelet directory reached
// through a link reads the same.
func (h *hostFS) ShowsDevice(p *safepath.Path, device string) (bool, error) {
	var dst unix.Stat_t
	if err := unix.Stat(device, &dst); err != nil {
		return false, fmt.Errorf("stat %s: %w", device, err)
	}
	if dst.Mode&unix.S_IFMT != unix.S_IFBLK {
		return false, fmt.Errorf("%s is not a block device", device)
	}
	f, err := p.Open()
	if errors.Is(err, os.ErrNotExist) {
		return false, nil
	}
	if err != nil {
		return false, err
	}
	defer f.Close()
	if root, _, err := mountRoot(f); err != nil || !root {
		return false, err
	}
	var st unix.Stat_t
	if err := unix.Fstat(int(f.Fd()), &st); err != nil {
		return false, fmt.Errorf("stat %s: %w", p, err)
	}
	if st.Mode&unix.S_IFMT == unix.S_IFBLK {
		return st.Rdev == dst.Rdev, nil
	}
	return st.Dev == dst.Rdev, nil
}

func (h *hostFS) Resize(ctx context.Context, device string, p *safepath.Path, fstype string) error {
	if full, err := fills(device); err == nil && full {
		return nil // nothing to grow: spare the exec
	}
	switch fstype {
	case "ext4", "ext3", "ext2":
		return run(ctx, "resize2fs", device)
	case "xfs":
		// xfs_growfs takes the mount point's path; it gets the directory
		// opened beneath the kubelet directory, as its descriptor 3.
		f, err := p.Open()
		if err != nil {
			return err
		}
		defer f.Close()
		return runFiles(ctx, []*os.File{f}, "xfs_growfs", "/proc/self/fd/3")
	}
	return fmt.Errorf("cannot resize a %q filesystem", fstype)
}

// fills reports whether the filesystem on device already spans it, less
// than one of its blocks short.
func fills(device string) (bool, error) {
	f, err := os.Open(device)
	if err != nil {
		return false, err
	}
	defer f.Close()
	info, err := fsprobe.Probe(f)
	if err != nil || info.Type == "" {
		return false, err
	}
	devBytes, err := unix.IoctlGetUint64(int(f.Fd()), unix.BLKGETSIZE64)
	if err != nil {
		return false, err
	}
	return int64(devBytes)-info.SizeBytes < info.BlockSize, nil
}

func (h *hostFS) Stats(p *safepath.Path) (Stats, error) {
	f, err := p.Open()
	if err != nil {
		return Stats{}, err
	}
	defer f.Close()
	var s unix.Statfs_t
	if err := unix.Fstatfs(int(f.Fd()), &s); err != nil {
		return Stats{}, fmt.Errorf("statfs %s: %w", p, err)
	}
	bs := int64(s.Bsize)
	st := Stats{
		TotalBytes: int64(s.Blocks) * bs, AvailableBytes: int64(s.Bavail) * bs,
		TotalInodes: int64(s.Files), FreeInodes: int64(s.Ffree),
	}
	st.UsedBytes = (int64(s.Blocks) - int64(s.Bfree)) * bs
	st.UsedInodes = st.TotalInodes - st.FreeInodes
	return st, nil
}
