// Package loop attaches regular files to loop block devices, in pure Go
// (LOOP_CTL_GET_FREE, LOOP_CONFIGURE, with LOOP_SET_FD and LOOP_SET_STATUS64
// for kernels before 5.8). It exists for loop-file pools (demos, tests) and
// knows nothing about what is put on the device.
package loop

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
)

// Device is an attached loop device.
type Device struct {
	Path   string // /dev/loopN
	Number int
	Rdev   uint64 // device number, as in stat's st_rdev
	// holder is the open device Attach returns, nil from Find. With
	// AutoClear the kernel detaches the device as soon as its last opener
	// closes it, so the caller must keep it open until something else (a
	// dm table) holds the device, and then Close it.
	holder *os.File
}

// Close releases the descriptor Attach kept open. With AutoClear, a device
// nothing else holds is detached by the kernel at that moment.
func (d *Device) Close() error {
	if d.holder == nil {
		return nil
	}
	err := d.holder.Close()
	d.holder = nil
	return err
}

// Options for Attach.
type Options struct {
	ReadOnly bool
	// AutoClear detaches the device by itself once its last opener closes
	// it, so a crash leaks nothing once the holder (a dm table) is gone.
	AutoClear bool
	// DirectIO bypasses the page cache of the backing file.
	DirectIO bool
}

const loopConfigure = 0x4C0A // LOOP_CONFIGURE, Linux 5.8

// loopConfig mirrors struct loop_config.
type loopConfig struct {
	fd        uint32
	blockSize uint32
	info      unix.LoopInfo64
	reserved  [8]uint64
}

// Attach attaches file to a free loop device and returns it, open: Close it
// once the device is held by its user (see Device). The device node is made
// if devtmpfs has not made it (as in a container's /dev).
func Attach(file string, o Options) (Device, error) {
	mode := os.O_RDWR
	if o.ReadOnly {
		mode = os.O_RDONLY
	}
	backing, err := os.OpenFile(file, mode|unix.O_CLOEXEC, 0)
	if err != nil {
		return Device{}, fmt.Errorf("loop attach: %w", err)
	}
	defer backing.Close()
	abs, err := filepath.Abs(file)
	if err != nil {
		return Device{}, err
	}
	ctl, err := os.OpenFile("/dev/loop-control", os.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		return Device{}, fmt.Errorf("loop attach %s: %w", file, err)
	}
	defer ctl.Close()
	// Another process may take the free device between GET_FREE and
	// CONFIGURE (EBUSY): ask again.
	for attempt := 0; ; attempt++ {
		n, err := unix.IoctlRetInt(int(ctl.Fd()), unix.LOOP_CTL_GET_FREE)
		if err != nil {
			return Device{}, fmt.Errorf("loop attach %s: get free device: %w", file, err)
		}
		d, err := configure(n, backing, abs, o)
		if errors.Is(err, unix.EBUSY) && attempt < 20 {
			time.Sleep(time.Millisecond)
			continue
		}
		return d, err
	}
}

func configure(n int, backing *os.File, name string, o Options) (Device, error) {
	path := "/dev/loop" + strconv.Itoa(n)
	// Loop's major is 7; the minor is n only without partitions (max_part=0,
	// the default), so an existing node's own number wins.
	rdev := unix.Mkdev(7, uint32(n))
	if err := ensureNode(path, rdev); err != nil {
		return Device{}, err
	}
	var st unix.Stat_t
	if err := unix.Stat(path, &st); err != nil {
		return Device{}, fmt.Errorf("loop attach: %w", err)
	}
	rdev = st.Rdev
	mode := os.O_RDWR
	if o.ReadOnly {
		mode = os.O_RDONLY
	}
	dev, err := os.OpenFile(path, mode|unix.O_CLOEXEC, 0)
	if err != nil {
		return Device{}, fmt.Errorf("loop attach: open %s: %w", path, err)
	}
	attached := false
	defer func() {
		if !attached {
			dev.Close()
		}
	}()
	var info unix.LoopInfo64
	copy(info.File_name[:unix.LO_NAME_SIZE-1], name)
	if o.ReadOnly {
		info.Flags |= unix.LO_FLAGS_READ_ONLY
	}
	if o.AutoClear {
		info.Flags |= unix.LO_FLAGS_AUTOCLEAR
	}
	if o.DirectIO {
		info.Flags |= unix.LO_FLAGS_DIRECT_IO
	}
	cfg := loopConfig{fd: uint32(backing.Fd()), info: info}
	_, _, errno := unix.Syscall(unix.SYS_IOCTL, dev.Fd(), loopConfigure, uintptr(unsafe.Pointer(&cfg)))
	switch {
	case errno == 0:
	case errno == unix.EINVAL || errno == unix.ENOTTY:
		// Before 5.8: set the file, then the flags.
		if err := unix.IoctlSetInt(int(dev.Fd()), unix.LOOP_SET_FD, int(backing.Fd())); err != nil {
			return Device{}, fmt.Errorf("loop attach %s to %s: %w", name, path, err)
		}
		if err := unix.IoctlLoopSetStatus64(int(dev.Fd()), &info); err != nil {
			_ = unix.IoctlSetInt(int(dev.Fd()), unix.LOOP_CLR_FD, 0)
			return Device{}, fmt.Errorf("loop attach %s to %s: set status: %w", name, path, err)
		}
	default:
		return Device{}, fmt.Errorf("loop attach %s to %s: %w", name, path, errno)
	}
	attached = true
	return Device{Path: path, Number: n, Rdev: rdev, holder: dev}, nil
}

func ensureNode(path string, rdev uint64) error {
	if _, err := os.Stat(path); err == nil {
		return nil
	}
	err := unix.Mknod(path, unix.S_IFBLK|0o600, int(rdev))
	if err != nil && !errors.Is(err, unix.EEXIST) {
		return fmt.Errorf("mknod %s: %w", path, err)
	}
	return nil
}

// Detach detaches the loop device at path. It is not an error when nothing
// is attached (ENXIO). A device still held open is detached by the kernel
// when its last opener closes it.
func Detach(path string) error {
	f, err := os.OpenFile(path, os.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("loop detach: %w", err)
	}
	defer f.Close()
	if err := unix.IoctlSetInt(int(f.Fd()), unix.LOOP_CLR_FD, 0); err != nil && !errors.Is(err, unix.ENXIO) {
		return fmt.Errorf("loop detach %s: %w", path, err)
	}
	return nil
}

// Find returns the loop devices whose backing file is file. They are found
// by the file's device and inode (LOOP_GET_STATUS64), not by the path in
// sysfs: that path is the one the attaching process saw, and a process in
// another mount namespace (a restarted driver's new container) may see the
// same file under another path, or the old path may be gone.
func Find(file string) ([]Device, error) {
	var fst unix.Stat_t
	if err := unix.Stat(file, &fst); err != nil {
		return nil, fmt.Errorf("loop find: %w", err)
	}
	dirs, err := filepath.Glob("/sys/block/loop*")
	if err != nil {
		return nil, err
	}
	var out []Device
	for _, d := range dirs {
		if _, err := os.Stat(filepath.Join(d, "loop", "backing_file")); err != nil {
			continue // not attached
		}
		n, err := strconv.Atoi(strings.TrimPrefix(filepath.Base(d), "loop"))
		if err != nil {
			continue
		}
		dev, ok, err := backedBy(n, fst)
		if err != nil {
			return nil, err
		}
		if ok {
			out = append(out, dev)
		}
	}
	return out, nil
}

// backedBy reports whether loop device n's backing file is the file fst
// describes. Opening the device to ask cannot detach it: an autoclear
// device is detached at its last close only once something has held it,
// and if nothing else holds it, that is what autoclear is for.
func backedBy(n int, fst unix.Stat_t) (Device, bool, error) {
	path := "/dev/loop" + strconv.Itoa(n)
	if err := ensureNode(path, unix.Mkdev(7, uint32(n))); err != nil {
		return Device{}, false, err
	}
	f, err := os.OpenFile(path, os.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		return Device{}, false, fmt.Errorf("loop find: %w", err)
	}
	defer f.Close()
	info, err := unix.IoctlLoopGetStatus64(int(f.Fd()))
	if errors.Is(err, unix.ENXIO) {
		return Device{}, false, nil // detached meanwhile
	}
	if err != nil {
		return Device{}, false, fmt.Errorf("loop find: %s: %w", path, err)
	}
	// lo_device is the kernel's encoding of the backing file's st_dev,
	// the same one stat(2) returns.
	if info.Device != fst.Dev || info.Inode != fst.Ino {
		return Device{}, false, nil
	}
	var st unix.Stat_t
	if err := unix.Fstat(int(f.Fd()), &st); err != nil {
		return Device{}, false, err
	}
	return Device{Path: path, Number: n, Rdev: st.Rdev}, true, nil
}

// SetCapacity makes the loop device at path take up its backing file's
// current size (after the file grew).
func SetCapacity(path string) error {
	f, err := os.OpenFile(path, os.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("loop set capacity: %w", err)
	}
	defer f.Close()
	if err := unix.IoctlSetInt(int(f.Fd()), unix.LOOP_SET_CAPACITY, 0); err != nil {
		return fmt.Errorf("loop set capacity %s: %w", path, err)
	}
	return nil
}
