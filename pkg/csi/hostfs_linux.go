package csi

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"

	"golang.org/x/sys/unix"
	mount "k8s.io/mount-utils"
	utilexec "k8s.io/utils/exec"
)

// hostFS is the real FS. External programs (mkfs, resize2fs, xfs_growfs,
// blkid) run with argument arrays, LC_ALL=C and the caller's context: a
// cancelled request kills them.
type hostFS struct {
	mounter *mount.SafeFormatAndMount
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
// discarding a large one is slow) and lazy-initialise ext4's tables.
var mkfsArgs = map[string][]string{
	"ext4": {"-F", "-q", "-m", "0", "-E", "nodiscard,lazy_itable_init=1,lazy_journal_init=1"},
	"xfs":  {"-f", "-q", "-K"},
}

func (h *hostFS) Format(ctx context.Context, device, fstype string) (bool, error) {
	existing, err := h.mounter.GetDiskFormat(device)
	if err != nil {
		return false, fmt.Errorf("probe %s: %w", device, err)
	}
	if existing != "" {
		if existing != fstype {
			return false, fmt.Errorf("%s holds a %s filesystem, not %s; refusing to reformat", device, existing, fstype)
		}
		return false, nil
	}
	args, ok := mkfsArgs[fstype]
	if !ok {
		return false, fmt.Errorf("no mkfs for %q", fstype)
	}
	return true, run(ctx, "mkfs."+fstype, append(append([]string(nil), args...), device)...)
}

func (h *hostFS) FSType(device string) (string, error) { return h.mounter.GetDiskFormat(device) }

func (h *hostFS) Mount(ctx context.Context, source, target, fstype string, options []string) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	return h.mounter.Mount(source, target, fstype, options)
}

func (h *hostFS) Unmount(ctx context.Context, path string) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	return mount.CleanupMountPoint(path, h.mounter, true)
}

func (h *hostFS) MountRefs(path string) ([]string, error) { return h.mounter.GetMountRefs(path) }

func (h *hostFS) Resize(ctx context.Context, device, path, fstype string) error {
	switch fstype {
	case "ext4", "ext3", "ext2":
		return run(ctx, "resize2fs", device)
	case "xfs":
		return run(ctx, "xfs_growfs", path)
	}
	return fmt.Errorf("cannot resize a %q filesystem", fstype)
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
