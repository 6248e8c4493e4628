// Package devmapper talks to the kernel's device-mapper through its ioctl
// interface (/dev/mapper/control), in pure Go: no cgo, no libdevmapper and no
// dmsetup at run time.
//
// It owns:
//   - the dm ioctls a thin-provisioning driver needs (version, list, create,
//     load and clear a table, suspend and resume, remove and deferred remove,
//     info, table and status read, target messages, target versions, events);
//   - typed tables (thin-pool, thin, linear) and target messages (create_thin,
//     create_snap, delete, set_transaction_id, metadata snapshots) whose
//     String methods produce exactly what the kernel parses;
//   - parsers for the thin-pool and thin status lines;
//   - the layout of the thin-pool metadata superblock (superblock.go), the
//     one description of it: pkg/thinpool reads it and the fake kernel
//     writes it;
//   - the layout of the metadata's btree nodes and a reader of the
//     two-level mapping tree (btree.go): which virtual blocks a thin
//     device maps, read from a held metadata snapshot; the fake kernel
//     writes its nodes with the same layout.
//
// It must not know about pools, volumes, CSI or any record of csi-dmthin's
// own: it is the kernel's vocabulary and nothing above it. Devices are addressed by their
// device number (major:minor) or the dm name, never by /dev/mapper paths,
// which only exist where udev runs.
//
// Errors returned by the kernel keep their errno: errors.Is(err,
// unix.EBUSY) and friends work on every error this package returns, and the
// *Error wrapper names the operation and the device.
//
// The kernel's reference for the thin targets is
// Documentation/admin-guide/device-mapper/thin-provisioning.rst; the ioctl
// ABI is include/uapi/linux/dm-ioctl.h.
package devmapper
