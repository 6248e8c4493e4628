//go:build !vmtest

package thinpool

import (
	"os"
	"os/exec"
	"testing"
	"time"

	"github.com/csi-dmthin/csi-dmthin/internal/vmtest"
)

// TestVM runs the scenarios, crash tests and fault sweeps (the kernel's in
// env_kernel_test.go, build tag vmtest) on the real kernel in a qemu VM.
// CSI_DMTHIN_FAULTS=full (make test-faults) makes the kernel's sweeps long,
// longer than the guest's usual time cap.
func TestVM(t *testing.T) {
	faults := os.Getenv("CSI_DMTHIN_FAULTS")
	opts := []vmtest.Option{vmtest.WithMemoryMiB(3072), vmtest.WithEnv("CSI_DMTHIN_FAULTS=" + faults)}
	// thin_dump, when the host has it, reads the kernel's held metadata
	// snapshot beside pkg/devmapper's reader (kernelcontract_extents_test.go).
	if _, err := exec.LookPath("thin_dump"); err == nil {
		opts = append(opts, vmtest.WithTools("thin_dump"))
	}
	if faults == "full" {
		limit := 90 * time.Minute
		if d, ok := t.Deadline(); ok {
			limit = min(limit, time.Until(d)-time.Minute)
		}
		opts = append(opts, vmtest.WithArgs("-test.timeout="+limit.Round(time.Second).String()))
	}
	vmtest.RunPackageTests(t, opts...)
}
