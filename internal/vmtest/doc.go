// Package vmtest runs Go tests and programs inside a qemu VM booted on
// Debian's stock kernel, so that code which needs device-mapper (dm-thin)
// is tested against the real kernel on hosts, CI included, whose own kernel
// has none.
//
// # What it owns
//
//   - The kernel: FetchKernel resolves the image package that
//     linux-image-amd64 depends on, downloads it with apt-get, unpacks it
//     into the cache (kernel.go) and decompresses the image once so qemu
//     can boot it through its PVH entry point, 4 s faster under TCG (pvh.go).
//   - The initramfs: a newc cpio writer (cpio.go); kernel module
//     dependency resolution from each module's .modinfo (modules.go); host
//     tools with their shared libraries (tools.go); the busybox /init and
//     the two-part archive, a cached gzip'd base plus a small per-run part
//     (initramfs.go).
//   - The VM: Run boots qemu under TCG, streams the payload's output from a
//     second serial port, reads its exit status from a marker line, and
//     always kills qemu before returning (qemu.go).
//   - Disks and power cuts: host raw images attached as virtio-blk disks
//     with serials (Spec.Disks, disks.go, where the cache mode and what a
//     cut models are written down); Spec.Cut kills qemu without a shutdown
//     and Run reports the cut; Emit, in the guest, returns once a line has
//     reached the host, so what the host saw is what the guest acknowledged
//     (emit.go).
//   - Go tests: RunPackageTests builds a package's test binary with the
//     vmtest build tag and runs it in the VM on behalf of a host test;
//     PackageTest builds it for a host test that runs the VM itself, boot
//     after boot (gotest.go).
//   - The cache directory and its locks (cache.go): one lock serializes
//     kernel downloads, one initramfs builds, and one VM runs across all
//     processes, since a TCG guest saturates the machine's two cores.
//
// It must not touch the host's devices or kernel state, need network access
// in the guest (qemu gets -nic none), or run anything through a shell on the
// host. It knows nothing about the driver: packages under pkg/ use it only
// from tests.
//
// # Usage
//
// A package with kernel tests has a host-side entry point, vm_test.go:
//
//	//go:build !vmtest
//
//	package devmapper
//
//	func TestVM(t *testing.T) { vmtest.RunPackageTests(t) }
//
// and its kernel tests in files built only for the guest:
//
//	//go:build vmtest
//
//	func TestPool(t *testing.T) {
//		vmtest.RequireGuest(t)
//		...
//	}
//
// `go test ./pkg/devmapper` then runs TestVM on the host, which runs every
// test of the package, the vmtest ones included, in the VM.
//
// # Why not github.com/hugelgupf/vmtest
//
// That library (u-root's harness) boots a kernel with a u-root initramfs
// built from Go sources, shares the test binary, testdata and results with
// the guest over a 9P directory, and reports events over virtio-serial, so
// its guest needs virtio, virtio-PCI and 9P as soon as it starts: it expects
// a kernel with them built in. Debian's kernel has all three as modules
// (CONFIG_VIRTIO=m, CONFIG_VIRTIO_PCI=m, CONFIG_9P_FS=m, CONFIG_NET_9P=m),
// as are dm-thin, loop, ext4 and xfs, so using it here would mean building
// our own kernel (the point is to test on Debian's) or extending its u-root
// init to insmod modules before it mounts the share, with u-root's module
// tree as a test dependency. What this project needs (boot, insmod a dozen
// modules, run one static binary, read its output and status) fits in a
// couple of thousand lines on busybox-static and the 8250 UART that
// Debian's kernel has built in, with no guest networking or file sharing.
package vmtest
