package csi

import "context"

// FS is the node's filesystem work: the part of the node service that
// touches mounts and runs mkfs and resize tools. NewHostFS does it for real
// with k8s.io/mount-utils; tests use a fake that records the resulting state.
type FS interface {
	// IsMountPoint reports whether path is a mount point; false, nil for a
	// path that does not exist.
	IsMountPoint(path string) (bool, error)
	// MountedDevice returns the source of the mount at path, "" if none.
	MountedDevice(path string) (string, error)
	// Format makes a filesystem of fstype on device unless it already holds
	// one; formatted reports whether it did. A device holding another
	// filesystem type is an error, never reformatted. A filesystem that was
	// never mounted (a clone of a formatted template) gets a UUID of its
	// own, where that is possible without rewriting its metadata.
	Format(ctx context.Context, device, fstype string, opts FormatOptions) (formatted bool, err error)
	// Mount mounts source at target, which must exist: a directory, or a
	// file for a bind mount of a device node. The caller makes it.
	Mount(ctx context.Context, source, target, fstype string, options []string) error
	// Unmount unmounts path if it is mounted and removes it.
	Unmount(ctx context.Context, path string) error
	// MountRefs returns the other mount points that show what path shows:
	// for a mount point, the bind mounts of its filesystem; for a file or
	// a directory (a device node, say), the bind mounts of it. path itself
	// is not among them; none for a path that does not exist.
	MountRefs(path string) ([]string, error)
	// FSType returns the filesystem type on device, "" if none.
	FSType(device string) (string, error)
	// Resize grows the filesystem on device, mounted at path, to fill it.
	Resize(ctx context.Context, device, path, fstype string) error
	// Stats returns the usage of the filesystem mounted at path.
	Stats(path string) (Stats, error)
}

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
