//go:build !vmtest

package loop

import (
	"testing"

	"github.com/csi-dmthin/csi-dmthin/internal/vmtest"
)

// TestVM runs this package's kernel tests (kernel_test.go, build tag
// vmtest) in the qemu VM, where loop devices can be attached.
func TestVM(t *testing.T) { vmtest.RunPackageTests(t) }
