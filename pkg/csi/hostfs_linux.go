package csi

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"

	"golang.org/x/sys/unix"
	mount "k8s.io/mount-utils"
	utilexec "k8s.io/utils/exec"

	"github.com/csi-dmthin/csi-dmthin/internal/fsprobe"
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
	cmd := exec.CommandContext(ctx, name, args...)
	cmd.Env = append(os.Environ(), "LC_ALL=C")
	out, err := cmd.CombinedOutput()
	if err != nil {
		return fmt.Errorf("%s %s: %w: %s", name, strings.Join(args, " "), err, strings.TrimSpace(string(out)))
	}
	return nil
}

func (h *hostFS) IsMountPoint(path string) (bool, error) {
	mp, err := h.mounter.IsMountPoint(path)
	if errors.Is(err, os.ErrNotExist) {
		return false, nil
	}
	return mp, err
}

func (h *hostFS) MountedDevice(path string) (string, error) {
	mps, err := h.mounter.List()
	if err != nil {
		return "", err
	}
	clean := filepath.Clean(path)
	for _, mp := range mps {
		if mp.Path == clean {
			return mp.Device, nil
		}
	}
	return "", nil
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

// prepare returns the filesystem type on device ("" for none). It reads
// ext* and XFS superblocks itself and asks blkid only about anything else,
// which keeps the exec off the path of a volume cloned from a template. A
// never-mounted ext4 (such a clone) gets its own UUID here, before its first
// mount: clones must not all share their template's.
func (h *hostFS) prepare(device string) (string, error) {
	f, err := os.OpenFile(device, os.O_RDWR|unix.O_EXCL, 0)
	if err != nil {
		return "", fmt.Errorf("open %s: %w", device, err)
	}
	defer f.Close()
	info, err := fsprobe.Probe(f)
	if err != nil {
		return "", fmt.Errorf("probe %s: %w", device, err)
	}
	switch {
	case info.Type == "":
		existing, err := h.mounter.GetDiskFormat(device)
		if err != nil {
			return "", fmt.Errorf("probe %s: %w", device, err)
		}
		return existing, nil
	case info.NeverMounted && info.UUIDChangeable:
		if _, err := fsprobe.NewExtUUID(f); err != nil {
			return "", fmt.Errorf("new filesystem UUID on %s: %w", device, err)
		}
	}
	return info.Type, nil
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
	if err != nil || info.Type != "" {
		return info.Type, err
	}
	return h.mounter.GetDiskFormat(device)
}

func (h *hostFS) Mount(ctx context.Context, source, target, fstype string, options []string) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	return sysMount(source, target, fstype, options)
}

func (h *hostFS) Unmount(ctx context.Context, path string) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	return mount.CleanupMountPoint(path, h.mounter, true)
}

func (h *hostFS) MountRefs(path string) ([]string, error) { return h.mounter.GetMountRefs(path) }

func (h *hostFS) Resize(ctx context.Context, device, path, fstype string) error {
	if full, err := fills(device); err == nil && full {
		return nil // nothing to grow: spare the exec
	}
	switch fstype {
	case "ext4", "ext3", "ext2":
		return run(ctx, "resize2fs", device)
	case "xfs":
		return run(ctx, "xfs_growfs", path)
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

func (h *hostFS) Stats(path string) (Stats, error) {
	var s unix.Statfs_t
	if err := unix.Statfs(path, &s); err != nil {
		return Stats{}, err
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
