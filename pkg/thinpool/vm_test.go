//go:build !vmtest

package thinpool

import (
	"testing"

	"github.com/csi-dmthin/csi-dmthin/internal/vmtest"
)

// TestVM runs the scenarios and crash tests (env_kernel_test.go, build tag
// vmtest) on the real kernel in a qemu VM.
func TestVM(t *testing.T) { vmtest.RunPackageTests(t, vmtest.WithMemoryMiB(3072)) }
