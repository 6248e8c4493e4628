//go:build !vmtest

package main

import (
	"flag"
	"os"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/csi-dmthin/csi-dmthin/internal/vmtest"
)

// TestVM runs the kernel tests of kill_kernel_test.go (build tag vmtest)
// in a qemu VM: the real `csi-dmthin serve`, SIGKILLed and restarted over
// pools on loop files, with the host's mount, mkfs and resize tools.
// CSI_DMTHIN_KILLS (default 30) and CSI_DMTHIN_KILL_SEED pass through;
// with more kills, give go test a -timeout to match (about 4 s a kill).
//
// Unless the outer -run picks guest tests itself (-run 'TestVM/Kill'), only
// the kernel tests run there: the host runs the others already.
func TestVM(t *testing.T) {
	opts := []vmtest.Option{
		vmtest.WithTools("mount", "umount", "blkid", "mkfs.ext4", "mkfs.xfs", "resize2fs", "xfs_growfs", "e2fsck", "fsck"),
		vmtest.WithMemoryMiB(4096),
	}
	for _, name := range []string{killsEnv, killSeedEnv} {
		if v, ok := os.LookupEnv(name); ok {
			opts = append(opts, vmtest.WithEnv(name+"="+v))
		}
	}
	if n, err := strconv.Atoi(os.Getenv(killsEnv)); err == nil && n > 0 {
		// More kills than the guest's usual time cap allows: about 3 s a
		// kill under TCG, within the outer -timeout (which then needs
		// raising too).
		limit := time.Duration(n)*4*time.Second + 5*time.Minute
		if d, ok := t.Deadline(); ok {
			limit = min(limit, time.Until(d)-time.Minute)
		}
		opts = append(opts, vmtest.WithArgs("-test.timeout="+limit.Round(time.Second).String()))
	}
	if f := flag.Lookup("test.run"); f == nil || !strings.Contains(f.Value.String(), "/") {
		opts = append(opts, vmtest.WithArgs("-test.run=Kernel$"))
	}
	vmtest.RunPackageTests(t, opts...)
}
