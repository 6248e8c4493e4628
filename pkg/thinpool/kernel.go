package thinpool

import "github.com/csi-dmthin/csi-dmthin/pkg/devmapper"

// Dev is a device number as Kernel speaks it. It is an alias, not a type of
// its own: the number is the kernel's, and a test above this package that
// drives the fake kernel (thinpooltest.FakeKernel) names it without
// importing pkg/devmapper.
type Dev = devmapper.Dev

// Kernel is what a Pool needs from the kernel: the device-mapper calls of
// *devmapper.Client, and access to the block devices under the pool. Errors
// carry the kernel's errno (golang.org/x/sys/unix) for errors.Is.
type Kernel interface {
	Create(name, uuid string) (devmapper.DeviceInfo, error)
	Load(dev devmapper.Dev, table []devmapper.Target) error
	Suspend(dev devmapper.Dev, flags devmapper.SuspendFlags) error
	Resume(dev devmapper.Dev) error
	Remove(dev devmapper.Dev, deferred bool) error
	CancelDeferredRemove(dev devmapper.Dev) error
	Info(dev devmapper.Dev) (devmapper.DeviceInfo, error)
	InfoByName(name string) (devmapper.DeviceInfo, error)
	List() ([]devmapper.ListEntry, error)
	Table(dev devmapper.Dev) ([]devmapper.Target, error)
	Status(dev devmapper.Dev, noFlush bool) ([]devmapper.Target, error)
	Message(dev devmapper.Dev, m devmapper.Message) error

	// BlockDevice returns the device number and size of the block device
	// at path: an error that is os.ErrNotExist when there is nothing at
	// path, ENOTBLK when it is not a block device.
	BlockDevice(path string) (devmapper.Dev, int64, error)
	// AttachFile attaches a regular file to a loop device, or finds the one
	// it is already attached to, and returns its number; release drops the
	// hold that keeps an auto-clearing device attached until the pool holds
	// it.
	AttachFile(path string) (dev devmapper.Dev, release func(), err error)
	// ReadBlock reads len(buf) bytes at off from the block device,
	// bypassing the page cache.
	ReadBlock(dev devmapper.Dev, off int64, buf []byte) error
	// ZeroBlock writes n zero bytes at the start of the block device.
	ZeroBlock(dev devmapper.Dev, n int) error
	// WriteBlock writes buf at off on the block device, bypassing the
	// page cache, and returns once it is on stable storage.
	WriteBlock(dev devmapper.Dev, off int64, buf []byte) error
	// Serial returns what identifies the disk behind a block device
	// whatever its name: its WWID or serial number, an LV's dm UUID, a
	// partition's disk and number; "" when it has none (a loop device).
	Serial(dev devmapper.Dev) (string, error)
	// DeviceNode returns a block device node for dev, making it if needed.
	DeviceNode(dev devmapper.Dev) (string, error)
	// RefreshSize makes a loop device take up its file's new size; for
	// other block devices, whose size the kernel already knows, it does
	// nothing.
	RefreshSize(dev devmapper.Dev) error
}
