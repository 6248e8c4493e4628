package csi

import (
	"context"
	"errors"

	"github.com/csi-dmthin/csi-dmthin/internal/safepath"
)

// FS is the node's filesystem work: the part of the node service that
// touches mounts and runs mkfs and resize tools. NewHostFS does it for real;
// tests use a fake that records the resulting state.
//
// Paths in the kubelet directory come as *safepath.Path, resolved beneath
// it without symbolic links: an implementation reaches them only through
// what Path opens (a mount onto the opened directory, an unmount of the
// name in its opened parent), never by their string, which a link swapped
// in since would redirect. Device nodes are the pool's and come as
// strings. Making and removing directories is the caller's (safepath).
type FS interface {
	// IsMountPoint reports whether p is the root of a mount; false, nil
	// when p does not exist.
	IsMountPoint(p *safepath.Path) (bool, error)
	// MountedDevice returns the source of the mount whose root p is, ""
	// if none.
	MountedDevice(p *safepath.Path) (string, error)
	// Format makes a filesystem of fstype on device unless it already holds
	// one; formatted reports whether it did. A device holding another
	// filesystem type is an error, never reformatted. A filesystem that was
	// never mounted (a clone of a formatted template) gets a UUID of its
	// own, where that is possible without rewriting its metadata. One whose
	// mkfs never finished (an XFS with sb_inprogress set) is no
	// filesystem, and is made again.
	Format(ctx context.Context, device, fstype string, opts FormatOptions) (formatted bool, err error)
	// Mount mounts the filesystem of fstype on device at target, an
	// existing directory, with mount(8)-style options. An option the
	// filesystem refuses is an error wrapping ErrMountOption.
	Mount(ctx context.Context, device string, target *safepath.Path, fstype string, options []string) error
	// BindMount makes target, an existing directory, show the filesystem
	// mounted at source, read-only if readOnly; the bind keeps source's
	// other per-mount flags (nosuid, noatime, ...).
	BindMount(ctx context.Context, source, target *safepath.Path, readOnly bool) error
	// BindDevice makes target, an existing regular file, show the device
	// node device, read-only if readOnly.
	BindDevice(ctx context.Context, device string, target *safepath.Path, readOnly bool) error
	// Unmount unmounts the mount at p, if there is one. It removes
	// nothing.
	Unmount(ctx context.Context, p *safepath.Path) error
	// MountRefs returns the other mount points that show what the mount at
	// p shows (the bind mounts of its filesystem); p itself is not among
	// them; none when p is not a mount point or does not exist.
	MountRefs(p *safepath.Path) ([]string, error)
	// DeviceRefs returns the mount points that show the device node device
	// (its bind mounts onto files).
	DeviceRefs(device string) ([]string, error)
	// ShowsDevice reports whether the mount at p shows the block device
	// device: a filesystem on it (a staging mount or a bind of one), or the
	// device node itself (a raw block volume's bind); false when p is not
	// a mount point or does not exist.
	ShowsDevice(p *safepath.Path, device string) (bool, error)
	// FSType returns the filesystem type on device, "" if none.
	FSType(device string) (string, error)
	// Resize grows the filesystem on device, mounted at p, to fill it.
	Resize(ctx context.Context, device string, p *safepath.Path, fstype string) error
	// Stats returns the usage of the filesystem mounted at p.
	Stats(p *safepath.Path) (Stats, error)
}

// ErrMountOption: the filesystem refused one of the options a mount was
// given. Which one, and the kernel's words, are in the wrapping error.
var ErrMountOption = errors.New("the filesystem refuses the mount option")

// FormatOptions tell Format what is known of the device.
type FormatOptions struct {
	// Fresh: the device was just created and nothing has written to it,
	// so it reads zeros everywhere and holds nothing to look for.
	Fresh bool
	// Zeroed: a block written in part reads zeros in the rest (the pool
	// zeroes new blocks), so with Fresh mkfs may skip zeroing its tables.
	Zeroed bool
}

// Stats is a filesystem's usage.
type Stats struct {
	TotalBytes, AvailableBytes, UsedBytes int64
	TotalInodes, FreeInodes, UsedInodes   int64
}
