package thinpool

import (
	"bufio"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/csi-dmthin/csi-dmthin/internal/loop"
	"github.com/csi-dmthin/csi-dmthin/pkg/devmapper"
)

// HostKernel is the real Kernel: device-mapper through pkg/devmapper, loop
// devices for loop-file pools, and block devices by their node.
type HostKernel struct {
	*devmapper.Client
}

var _ Kernel = (*HostKernel)(nil)

// NewHostKernel opens the device-mapper control device.
func NewHostKernel() (*HostKernel, error) {
	c, err := devmapper.Open()
	if err != nil {
		return nil, err
	}
	return &HostKernel{Client: c}, nil
}

// Message sends a typed message (the embedded client's, named for the
// interface).
func (h *HostKernel) Message(dev devmapper.Dev, m devmapper.Message) error {
	return h.Client.Message(dev, m)
}

// BlockDevice implements Kernel.
func (h *HostKernel) BlockDevice(path string) (devmapper.Dev, int64, error) {
	var st unix.Stat_t
	if err := unix.Stat(path, &st); err != nil {
		return 0, 0, &os.PathError{Op: "stat", Path: path, Err: err}
	}
	if st.Mode&unix.S_IFMT != unix.S_IFBLK {
		return 0, 0, fmt.Errorf("%s: %w", path, unix.ENOTBLK)
	}
	f, err := os.OpenFile(path, os.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		return 0, 0, err
	}
	defer f.Close()
	var size uint64
	if _, _, errno := unix.Syscall(unix.SYS_IOCTL, f.Fd(), unix.BLKGETSIZE64, uintptr(unsafe.Pointer(&size))); errno != 0 {
		return 0, 0, fmt.Errorf("size of %s: %w", path, errno)
	}
	return devmapper.Dev(st.Rdev), int64(size), nil
}

// AttachFile implements Kernel: an existing attachment of the file is
// reused (after a driver restart the pool holds it); otherwise a new
// auto-clearing loop device is attached, which detaches by itself once the
// pool that holds it is removed.
func (h *HostKernel) AttachFile(path string) (devmapper.Dev, func(), error) {
	abs, err := filepath.Abs(path)
	if err != nil {
		return 0, nil, err
	}
	found, err := loop.Find(abs)
	if err != nil {
		return 0, nil, err
	}
	if len(found) > 0 {
		return devmapper.Dev(found[0].Rdev), func() {}, nil
	}
	d, err := loop.Attach(abs, loop.Options{AutoClear: true})
	if err != nil {
		return 0, nil, err
	}
	return devmapper.Dev(d.Rdev), func() { _ = d.Close() }, nil
}

func alignedBuf(n int) ([]byte, func(), error) {
	size := (n + 4095) &^ 4095
	b, err := unix.Mmap(-1, 0, size, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_ANON|unix.MAP_PRIVATE)
	if err != nil {
		return nil, nil, err
	}
	return b, func() { _ = unix.Munmap(b) }, nil
}

// ReadBlock implements Kernel, with O_DIRECT so that what the kernel wrote
// through its own buffers is what is read.
func (h *HostKernel) ReadBlock(dev devmapper.Dev, off int64, buf []byte) error {
	node, err := h.DeviceNode(dev)
	if err != nil {
		return err
	}
	return h.ReadBlockAt(node, off, buf)
}

// ReadBlockAt reads from the block device node with O_DIRECT.
func (h *HostKernel) ReadBlockAt(node string, off int64, buf []byte) error {
	f, err := os.OpenFile(node, os.O_RDONLY|unix.O_DIRECT|unix.O_CLOEXEC, 0)
	if err != nil {
		return err
	}
	defer f.Close()
	a, free, err := alignedBuf(len(buf))
	if err != nil {
		return err
	}
	defer free()
	if _, err := f.ReadAt(a, off); err != nil {
		return fmt.Errorf("read %s: %w", node, err)
	}
	copy(buf, a)
	return nil
}

// ZeroBlock implements Kernel.
func (h *HostKernel) ZeroBlock(dev devmapper.Dev, n int) error {
	return h.WriteBlock(dev, 0, make([]byte, n))
}

// WriteBlock implements Kernel, with O_DIRECT and an fsync.
func (h *HostKernel) WriteBlock(dev devmapper.Dev, off int64, buf []byte) error {
	node, err := h.DeviceNode(dev)
	if err != nil {
		return err
	}
	f, err := os.OpenFile(node, os.O_WRONLY|unix.O_DIRECT|unix.O_CLOEXEC, 0)
	if err != nil {
		return err
	}
	defer f.Close()
	a, free, err := alignedBuf(len(buf))
	if err != nil {
		return err
	}
	defer free()
	copy(a, buf)
	if _, err := f.WriteAt(a[:(len(buf)+511)&^511], off); err != nil {
		return fmt.Errorf("write %s at %d: %w", node, off, err)
	}
	if err := f.Sync(); err != nil {
		return fmt.Errorf("sync %s: %w", node, err)
	}
	return nil
}

// Serial implements Kernel from sysfs.
func (h *HostKernel) Serial(dev devmapper.Dev) (string, error) {
	return sysfsSerial("/sys", dev)
}

// sysfsSerial reads what identifies the disk behind dev under the sysfs
// root: a partition is its disk's identity and its number; a dm device (an
// LV, say) its dm UUID; a disk its WWID, or else its serial number.
func sysfsSerial(root string, dev devmapper.Dev) (string, error) {
	// /sys/dev/block/M:m links to the device's directory, in which a
	// partition's parent is its disk's.
	base, err := filepath.EvalSymlinks(filepath.Join(root, "dev", "block", fmt.Sprintf("%d:%d", dev.Major(), dev.Minor())))
	if err != nil {
		return "", fmt.Errorf("block device %s: %w", dev, unix.ENXIO)
	}
	read := func(rel string) string {
		b, err := os.ReadFile(filepath.Join(base, rel))
		if err != nil {
			return ""
		}
		return strings.TrimSpace(string(b))
	}
	if part := read("partition"); part != "" {
		parentDev, _ := os.ReadFile(filepath.Join(filepath.Dir(base), "dev"))
		var maj, min uint32
		if _, err := fmt.Sscanf(strings.TrimSpace(string(parentDev)), "%d:%d", &maj, &min); err != nil {
			return "", nil
		}
		disk, err := sysfsSerial(root, devmapper.MakeDev(maj, min))
		if err != nil || disk == "" {
			return "", err
		}
		return disk + "-part" + part, nil
	}
	if uuid := read("dm/uuid"); uuid != "" {
		return "dm:" + uuid, nil
	}
	for _, rel := range []string{"wwid", "device/wwid", "serial", "device/serial"} {
		if v := read(rel); v != "" {
			return v, nil
		}
	}
	return "", nil
}

// DeviceNode implements Kernel: /dev/<name> as sysfs names the device,
// made with mknod where devtmpfs has not made it (a container's /dev), and
// checked to be the right device.
func (h *HostKernel) DeviceNode(dev devmapper.Dev) (string, error) {
	name, err := sysfsDevName(dev)
	if err != nil {
		return "", err
	}
	node := "/dev/" + name
	var st unix.Stat_t
	err = unix.Stat(node, &st)
	if errors.Is(err, unix.ENOENT) {
		if err := os.MkdirAll(filepath.Dir(node), 0o755); err != nil {
			return "", err
		}
		if err := unix.Mknod(node, unix.S_IFBLK|0o600, int(dev)); err != nil && !errors.Is(err, unix.EEXIST) {
			return "", fmt.Errorf("mknod %s: %w", node, err)
		}
		err = unix.Stat(node, &st)
	}
	if err != nil {
		return "", fmt.Errorf("device node %s: %w", node, err)
	}
	if devmapper.Dev(st.Rdev) != dev || st.Mode&unix.S_IFMT != unix.S_IFBLK {
		return "", fmt.Errorf("%s is not block device %s", node, dev)
	}
	return node, nil
}

func sysfsDevName(dev devmapper.Dev) (string, error) {
	f, err := os.Open(fmt.Sprintf("/sys/dev/block/%d:%d/uevent", dev.Major(), dev.Minor()))
	if err != nil {
		return "", fmt.Errorf("block device %s: %w", dev, unix.ENXIO)
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if v, ok := strings.CutPrefix(sc.Text(), "DEVNAME="); ok && v != "" && !strings.Contains(v, "..") {
			return v, nil
		}
	}
	return "", fmt.Errorf("block device %s: no DEVNAME in sysfs", dev)
}

// loopMajor is the loop driver's block major.
const loopMajor = 7

// RefreshSize implements Kernel.
func (h *HostKernel) RefreshSize(dev devmapper.Dev) error {
	if dev.Major() != loopMajor {
		return nil
	}
	node, err := h.DeviceNode(dev)
	if err != nil {
		return err
	}
	return loop.SetCapacity(node)
}
