//go:build !vmtest

package csi

import (
	"flag"
	"strings"
	"testing"

	"github.com/csi-dmthin/csi-dmthin/internal/vmtest"
)

// TestVM runs csi-sanity and the restart test (sanity_kernel_test.go, build
// tag vmtest) on the real kernel in a qemu VM, with the host's mount, mkfs
// and resize tools. mount-utils runs mount, umount and blkid by name: the
// guest's PATH starts with /usr/sbin and /usr/bin, where the tools land (at
// their host paths), ahead of busybox's applets in /sbin and /bin.
//
// Unless the outer -run picks guest tests itself (-run 'TestVM/Restart'),
// only the kernel tests run there: the others use the fakes, which the host
// runs already (under -race), and some need networking the guest lacks.
func TestVM(t *testing.T) {
	opts := []vmtest.Option{
		vmtest.WithTools("mount", "umount", "blkid", "mkfs.ext4", "mkfs.xfs", "resize2fs", "xfs_growfs", "e2fsck", "fsck"),
		vmtest.WithMemoryMiB(3072),
	}
	if f := flag.Lookup("test.run"); f == nil || !strings.Contains(f.Value.String(), "/") {
		opts = append(opts, vmtest.WithArgs("-test.run=Kernel$"))
	}
	vmtest.RunPackageTests(t, opts...)
}
