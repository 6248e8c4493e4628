//go:build !vmtest

package vmtest

import "testing"

// TestVM runs this package's guest tests (guest_test.go, build tag vmtest)
// in the VM through RunPackageTests: the same path every package with
// kernel tests takes.
func TestVM(t *testing.T) { RunPackageTests(t) }
