// Package thinpooltest is test support for the layers above the kernel: a
// fake kernel, FakeKernel, that implements thinpool.Kernel (and
// thinpool.EventWaiter) in memory with the kernel's semantics, for tests on
// hosts without device-mapper: pkg/thinpool's own, pkg/csi's and cmd's.
//
// It owns the fake and the tests of what only the fake has (reboots,
// injected faults, loop files, its own bookkeeping). What the fake shares
// with the kernel is held to the kernel by the kernel contract
// (pkg/thinpool, kernelcontract_test.go): the same test functions run
// against FakeKernel on the host and against the real kernel in the VM.
//
// It imports pkg/devmapper and nothing of pkg/thinpool, so that
// pkg/thinpool's internal tests can use it without an import cycle; the
// compile-time assertions that it implements thinpool's interfaces are in
// those tests. The on-disk layout it writes (the pool metadata superblock)
// is pkg/devmapper's, the one the pool manager parses; it must not define
// kernel formats of its own. No production binary may import it.
package thinpooltest
