//go:build !vmtest

package thinpool

import (
	"os"
	"testing"

	"github.com/csi-dmthin/csi-dmthin/internal/vmtest"
)

// TestVM runs the scenarios, crash tests and fault sweeps (the kernel's in
// env_kernel_test.go, build tag vmtest) on the real kernel in a qemu VM.
// CSI_DMTHIN_FAULTS=full (make test-faults) makes the kernel's sweeps long.
func TestVM(t *testing.T) {
	vmtest.RunPackageTests(t, vmtest.WithMemoryMiB(3072), vmtest.WithEnv("CSI_DMTHIN_FAULTS="+os.Getenv("CSI_DMTHIN_FAULTS")))
}
