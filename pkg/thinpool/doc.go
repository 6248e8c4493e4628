// Package thinpool manages one node's dm-thin pool: its lifecycle (create,
// reopen after a restart or a reboot, verify it is the same pool), the thin
// volumes and snapshots in it (create, snapshot, clone, delete, activate,
// deactivate, grow), a crash-safe record of what exists, and capacity
// accounting with admission control.
//
// It is the one authority on admission (admission.go): whether a pool
// takes a new device of a size, which its own operations apply, which
// Usage.AvailableBytes reports as capacity and which Pool.Admit answers for
// callers that ask before they act. Nothing above it repeats the rule.
// Usage and Mode describe a pool without its callers needing pkg/devmapper.
//
// It owns the pool's bookkeeping and nothing above it: it knows no CSI, no
// gRPC and no mounts. It reaches the kernel only through the Kernel
// interface, which HostKernel (pkg/devmapper plus loop devices) implements
// for real and thinpooltest.FakeKernel implements in memory, with the
// kernel's semantics, for tests on hosts without device-mapper. The fake is
// test support in a package of its own: nothing here imports it outside
// tests.
//
// # The kernel contract
//
// What the pool relies on from its Kernel is one suite of test functions
// (kernelcontract_test.go) that runs against the fake on the host and
// against HostKernel in the VM: dm device life cycles, every thin-pool
// message and its errno, the data path of thin devices and snapshots,
// status lines and events. The pool's own scenarios, crash points and fault
// sweeps run on both kernels the same way (scenario_test.go, env_*_test.go).
// An expectation the fake cannot meet (it does not wait) runs on the fake
// alone and says why.
//
// # Crash safety
//
// The pool's transaction id, which only set_transaction_id changes and which
// the kernel commits with the metadata, is the commit point of every change
// to the pool's thin devices. An operation writes an intent to the record
// database (bbolt, outside the pool), sends its message to the pool, advances
// the transaction id from T to T+1, and then records the result and clears
// the intent in one database transaction. On open, an intent with the pool
// still at T is rolled back (a created device is deleted) or, for a delete,
// rolled forward; with the pool at T+1 it is finished. Any other difference
// between the recorded and the kernel's transaction id means something else
// changed the pool, and Open refuses to guess.
//
// Activation state is not transactional: Open reconciles it with the kernel
// (resumes devices left suspended, removes our devices without a table or
// without a record, reactivates volumes that should be active).
//
// # Operating a pool
//
// GrowPool (grow.go) grows the pool online onto larger data and metadata
// devices, extending a loop-file pool's files first; the larger sizes are
// recorded before the table is reloaded, and a pool whose devices are
// larger than its table is grown by the next GrowPool, so nothing a crash
// interrupts needs undoing. WaitEvent (events.go) waits for the kernel's
// events on the pool (its low water mark, its metadata threshold, a change
// of mode) without holding the pool's lock. Offline (offline.go) removes
// the pool's devices and closes its records for thin_check and thin_repair.
// MappedExtents (extents.go) tells which byte ranges of a volume its thin
// device maps, read from a held metadata snapshot with pkg/devmapper's
// btree reader, one snapshot at a time and outside the pool's lock; it
// changes nothing, so its failures do not fence the pool, and it releases
// a snapshot a crash left held.
package thinpool
