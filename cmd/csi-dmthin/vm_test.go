//go:build !vmtest

package main

import (
	"flag"
	"os"
	"strings"
	"testing"

	"github.com/csi-dmthin/csi-dmthin/internal/vmtest"
)

// TestVM runs the kernel tests of kill_kernel_test.go (build tag vmtest)
// in a qemu VM: the real `csi-dmthin serve`, SIGKILLed and restarted over
// pools on loop files, with the host's mount, mkfs and resize tools.
// CSI_DMTHIN_KILLS (default 100) and CSI_DMTHIN_KILL_SEED pass through.
//
// Unless the outer -run picks guest tests itself (-run 'TestVM/Kill'), only
// the kernel tests run there: the host runs the others already.
func TestVM(t *testing.T) {
	opts := []vmtest.Option{
		vmtest.WithTools("mount", "umount", "blkid", "mkfs.ext4", "mkfs.xfs", "resize2fs", "xfs_growfs", "e2fsck", "fsck"),
		vmtest.WithMemoryMiB(3072),
	}
	for _, name := range []string{killsEnv, killSeedEnv} {
		if v, ok := os.LookupEnv(name); ok {
			opts = append(opts, vmtest.WithEnv(name+"="+v))
		}
	}
	if f := flag.Lookup("test.run"); f == nil || !strings.Contains(f.Value.String(), "/") {
		opts = append(opts, vmtest.WithArgs("-test.run=Kernel$"))
	}
	vmtest.RunPackageTests(t, opts...)
}
