//go:build !vmtest

package devmapper

import (
	"testing"

	"github.com/csi-dmthin/csi-dmthin/internal/vmtest"
)

// TestVM runs this package's kernel tests (kernel_test.go, build tag vmtest)
// inside a qemu VM on Debian's kernel, which has dm-thin; the host's has not.
func TestVM(t *testing.T) { vmtest.RunPackageTests(t) }
