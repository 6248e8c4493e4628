package csi

import (
	"errors"
	"fmt"
	"os"
	"strings"
	"syscall"

	"golang.org/x/sys/unix"
)

// Mounting with the kernel's mount API (fsopen, fsconfig, fsmount,
// open_tree, mount_setattr, move_mount; Linux 5.12) rather than mount(8)
// or a mount(2) of a path string:
//   - no exec: one costs 30-50 ms under TCG and several on a busy node,
//     and staging a volume cloned from a template has nothing else left to
//     wait for;
//   - the mount lands on the directory the node service opened beneath the
//     kubelet directory (move_mount onto its descriptor), whatever its path
//     names by then;
//   - each option reaches the filesystem on its own (fsconfig), so one it
//     refuses is known by name and is the caller's mistake
//     (ErrMountOption), not an internal error;
//   - a read-only bind is read-only from the start (mount_setattr on the
//     detached copy) and keeps its source's other per-mount flags, with no
//     remount afterwards.

// mountAttr is an option that mount(8) turns into a per-mount flag: for
// fsmount(2) a MOUNT_ATTR_ bit.
type mountAttr struct{ set, clear uint64 }

const atimeMask = unix.MOUNT_ATTR__ATIME

var mountAttrs = map[string]mountAttr{
	"ro":          {set: unix.MOUNT_ATTR_RDONLY},
	"rw":          {clear: unix.MOUNT_ATTR_RDONLY},
	"nosuid":      {set: unix.MOUNT_ATTR_NOSUID},
	"suid":        {clear: unix.MOUNT_ATTR_NOSUID},
	"nodev":       {set: unix.MOUNT_ATTR_NODEV},
	"dev":         {clear: unix.MOUNT_ATTR_NODEV},
	"noexec":      {set: unix.MOUNT_ATTR_NOEXEC},
	"exec":        {clear: unix.MOUNT_ATTR_NOEXEC},
	"nodiratime":  {set: unix.MOUNT_ATTR_NODIRATIME},
	"diratime":    {clear: unix.MOUNT_ATTR_NODIRATIME},
	"noatime":     {clear: atimeMask, set: unix.MOUNT_ATTR_NOATIME},
	"strictatime": {clear: atimeMask, set: unix.MOUNT_ATTR_STRICTATIME},
	"relatime":    {clear: atimeMask, set: unix.MOUNT_ATTR_RELATIME},
	// Without noatime or strictatime the kernel uses relatime.
	"atime":      {clear: atimeMask},
	"norelatime": {clear: atimeMask},
}

// sbFlags are the options that set or clear a superblock flag; fsconfig
// takes them by name, like the filesystem's own ("ro" is both: the
// superblock is read-only, and so is the mount).
var sbFlags = map[string]bool{
	"ro": true, "rw": true, "sync": true, "async": true, "dirsync": true,
	"lazytime": true, "nolazytime": true, "mand": true, "nomand": true,
}

// userOnly reports options that only mount(8) and fstab read; mount(8)
// drops them before calling the kernel, and so do we. "silent" and "loud"
// only quieten the kernel's log of a failing mount, which fsconfig has no
// word for.
func userOnly(o string) bool {
	switch o {
	case "", "defaults", "_netdev", "nofail", "auto", "noauto", "user", "nouser", "users", "owner", "group", "silent", "loud":
		return true
	}
	return strings.HasPrefix(o, "x-") || strings.HasPrefix(o, "comment=")
}

// mountArgs splits mount(8) options into fsmount(2)'s mount attributes
// and the parameters fsconfig(2) gives the filesystem, in order.
func mountArgs(options []string) (attrs uint64, params []string) {
	for _, o := range options {
		if a, ok := mountAttrs[o]; ok {
			attrs = attrs&^a.clear | a.set
		}
		if sbFlags[o] {
			params = append(params, o)
			continue
		}
		if _, ok := mountAttrs[o]; ok || userOnly(o) {
			continue
		}
		params = append(params, o)
	}
	return attrs, params
}

// unquote strips the double quotes around a value (an SELinux context
// with a comma in its categories comes quoted, as mount(8) needs it), which
// fsconfig, unlike mount(2)'s option string, passes on as they are.
func unquote(v string) string {
	if len(v) >= 2 && v[0] == '"' && v[len(v)-1] == '"' {
		return v[1 : len(v)-1]
	}
	return v
}

// fsLog drains the messages the kernel left on a filesystem context ("e
// ext4: Unknown parameter 'bind'").
func fsLog(fd int) string {
	var msgs []string
	buf := make([]byte, 1024)
	for range 16 {
		n, err := unix.Read(fd, buf)
		if err != nil || n <= 0 {
			break
		}
		m := strings.TrimSpace(string(buf[:n]))
		if len(m) > 2 && m[1] == ' ' {
			m = m[2:]
		}
		msgs = append(msgs, m)
	}
	return strings.Join(msgs, "; ")
}

// fsContext opens a filesystem context for fstype on device and gives it
// params one by one; a parameter the filesystem refuses is ErrMountOption.
func fsContext(device, fstype string, params []string) (int, error) {
	fd, err := unix.Fsopen(fstype, unix.FSOPEN_CLOEXEC)
	if err != nil {
		return -1, fmt.Errorf("fsopen %s: %w", fstype, err)
	}
	if err := unix.FsconfigSetString(fd, "source", device); err != nil {
		msg := fsLog(fd)
		unix.Close(fd)
		return -1, fmt.Errorf("%s source %s: %w: %s", fstype, device, err, msg)
	}
	for _, p := range params {
		key, value, hasValue := strings.Cut(p, "=")
		if hasValue {
			err = unix.FsconfigSetString(fd, key, unquote(value))
		} else {
			err = unix.FsconfigSetFlag(fd, key)
		}
		if err != nil {
			msg := fsLog(fd)
			unix.Close(fd)
			if errors.Is(err, unix.EINVAL) || errors.Is(err, unix.EOPNOTSUPP) {
				return -1, fmt.Errorf("%w %q: %s (%v)", ErrMountOption, p, msg, err)
			}
			return -1, fmt.Errorf("%s option %q: %w: %s", fstype, p, err, msg)
		}
	}
	return fd, nil
}

// sysMount mounts the filesystem of fstype on device onto target (an
// O_PATH descriptor of a directory), like mount(8) -t fstype -o options.
func sysMount(device string, target *os.File, fstype string, options []string) error {
	// No fork while the new mount has a descriptor here: a child would
	// hold a copy until it execs, and keep the mount busy meanwhile.
	syscall.ForkLock.RLock()
	defer syscall.ForkLock.RUnlock()
	attrs, params := mountArgs(options)
	fd, err := fsContext(device, fstype, params)
	if err != nil {
		return err
	}
	defer unix.Close(fd)
	if err := unix.FsconfigCreate(fd); err != nil {
		msg := fsLog(fd)
		if errors.Is(err, unix.EINVAL) && len(params) > 0 && mountsPlain(device, fstype) {
			// The filesystem is sound; what it refused is the options
			// together (ext4's data=journal with delalloc, say).
			return fmt.Errorf("%w: %s refuses %q together: %s", ErrMountOption, fstype, strings.Join(params, ","), msg)
		}
		return fmt.Errorf("mount -t %s -o %s %s: %w: %s", fstype, strings.Join(options, ","), device, err, msg)
	}
	mfd, err := unix.Fsmount(fd, unix.FSMOUNT_CLOEXEC, int(attrs))
	if err != nil {
		return fmt.Errorf("fsmount %s: %w: %s", device, err, fsLog(fd))
	}
	defer unix.Close(mfd)
	if err := unix.MoveMount(mfd, "", int(target.Fd()), "", unix.MOVE_MOUNT_F_EMPTY_PATH|unix.MOVE_MOUNT_T_EMPTY_PATH); err != nil {
		return fmt.Errorf("mount %s on %s: %w", device, target.Name(), err)
	}
	return nil
}

// mountsPlain reports whether the filesystem on device can be made ready
// to mount read-only, without journal recovery and with none of the
// caller's options: whether a mount that failed with them failed because
// of them. Nothing is written to the device and nothing is mounted.
func mountsPlain(device, fstype string) bool {
	params := []string{"ro", "norecovery"}
	switch fstype {
	case "xfs":
		params = append(params, "nouuid") // a clone's UUID may be mounted already
	case "ext4", "ext3", "ext2":
	default:
		return false
	}
	fd, err := fsContext(device, fstype, params)
	if err != nil {
		return false
	}
	defer unix.Close(fd)
	return unix.FsconfigCreate(fd) == nil
}

// sysBind makes target (an O_PATH descriptor) show what the mount at
// source shows, or, with source nil, the device node at device; read-only
// if readOnly. The copy is made and set read-only detached, then
// attached, so it is never writable; it keeps the source mount's other
// per-mount flags.
func sysBind(source *os.File, device string, target *os.File, readOnly bool) error {
	syscall.ForkLock.RLock() // as in sysMount
	defer syscall.ForkLock.RUnlock()
	var tree int
	var err error
	name := device
	if source != nil {
		name = source.Name()
		tree, err = unix.OpenTree(int(source.Fd()), "", unix.OPEN_TREE_CLONE|unix.OPEN_TREE_CLOEXEC|unix.AT_EMPTY_PATH)
	} else {
		tree, err = unix.OpenTree(unix.AT_FDCWD, device, unix.OPEN_TREE_CLONE|unix.OPEN_TREE_CLOEXEC)
	}
	if err != nil {
		return fmt.Errorf("bind %s: open_tree: %w", name, err)
	}
	defer unix.Close(tree)
	if readOnly {
		if err := unix.MountSetattr(tree, "", unix.AT_EMPTY_PATH, &unix.MountAttr{Attr_set: unix.MOUNT_ATTR_RDONLY}); err != nil {
			return fmt.Errorf("bind %s read-only: %w", name, err)
		}
	}
	if err := unix.MoveMount(tree, "", int(target.Fd()), "", unix.MOVE_MOUNT_F_EMPTY_PATH|unix.MOVE_MOUNT_T_EMPTY_PATH); err != nil {
		return fmt.Errorf("bind %s on %s: %w", name, target.Name(), err)
	}
	return nil
}

// mountRoot reports whether f is the root of a mount, and that mount's id
// (as in /proc/self/mountinfo).
func mountRoot(f *os.File) (bool, uint64, error) {
	var st unix.Statx_t
	if err := unix.Statx(int(f.Fd()), "", unix.AT_EMPTY_PATH|unix.AT_SYMLINK_NOFOLLOW, unix.STATX_MNT_ID, &st); err != nil {
		return false, 0, fmt.Errorf("statx %s: %w", f.Name(), err)
	}
	if st.Attributes_mask&unix.STATX_ATTR_MOUNT_ROOT == 0 || st.Mask&unix.STATX_MNT_ID == 0 {
		return false, 0, fmt.Errorf("statx %s: the kernel does not say whether it is a mount root (Linux 5.8 or later does)", f.Name())
	}
	return st.Attributes&unix.STATX_ATTR_MOUNT_ROOT != 0, st.Mnt_id, nil
}
