package thinpool

import (
	"errors"
	"fmt"
	"os"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/csi-dmthin/csi-dmthin/pkg/devmapper"
)

// The kernel contract: what csi-dmthin relies on from the kernel's
// device-mapper and thin targets, as test functions that run unchanged on
// both Kernels, the real one in the VM (TestKernelContractKernel,
// env_kernel_test.go) and the fake on the host (TestKernelContractFake,
// env_fake_test.go). An expectation belongs here only if it holds on both,
// so the fake cannot drift from the kernel without a test failing in one
// place or the other.
//
// HostKernel's dm calls are pkg/devmapper's Client's, so this is that
// client's test against the kernel too. What only the client has
// (interface and target versions, ClearTable, suspend flags) is tested in
// pkg/devmapper; what only the fake has (reboots, failing a pool, loop
// files, its model of metadata use), in thinpooltest.
var kernelContract = []struct {
	name string
	run  func(t *testing.T, e env)
}{
	{"ThinWriteRead", kcThinWriteRead},
	{"SnapshotOfActiveOrigin", kcSnapshotOfActiveOrigin},
	{"MessageErrors", kcMessageErrors},
	{"SetTransactionID", kcSetTransactionID},
	{"DeferredRemove", kcDeferredRemove},
	{"List500", kcList500},
	{"PoolStatusFields", kcPoolStatusFields},
	{"OutOfDataSpace", kcOutOfDataSpace(true)},
	{"Superblock", kcSuperblock},
	{"SuperblockRewritten", kcSuperblockRewritten},
	{"MappedExtents", kcMappedExtents},
	{"HeldMappingTrees", kcHeldMappingTrees},
}

func runKernelContract(t *testing.T, newEnv func(t *testing.T) env) {
	for _, c := range kernelContract {
		t.Run(c.name, func(t *testing.T) { c.run(t, newEnv(t)) })
	}
}

const (
	kcBlockSectors = 128 // 64 KiB pool blocks
	kcBlockBytes   = kcBlockSectors * devmapper.SectorSize
	kcMetaBytes    = 16 << 20 // 4096 metadata blocks
)

var kcSeq atomic.Int64

// kcName returns a dm name no other test takes: in the VM every test runs
// on the one kernel.
func kcName(what string) string {
	return fmt.Sprintf("kc-%d-%s-%d", os.Getpid(), what, kcSeq.Add(1))
}

// kcCreate makes a dm device with no table, removed when the test ends.
func kcCreate(t *testing.T, k Kernel, what string) devmapper.DeviceInfo {
	t.Helper()
	name := kcName(what)
	info, err := k.Create(name, devmapper.UUIDPrefix+name)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { kcRemove(t, k, info.Dev) })
	return info
}

// kcRemove removes a device at the end of a test, and is content when it
// is gone already. Cleanups run in reverse order, so a thin goes before its
// pool; a device the kernel still holds for a moment after its last close
// is retried for a second.
func kcRemove(t *testing.T, k Kernel, dev Dev) {
	for i := 0; ; i++ {
		err := k.Remove(dev, false)
		if err == nil || errors.Is(err, unix.ENXIO) {
			return
		}
		if i == 50 {
			t.Errorf("cleanup: %v", err)
			return
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// kcGone waits for dev to go. The kernel removes a device whose deferred
// removal its last close completed from a work queue (the fake at once);
// ten seconds bound the wait, they are not what is tested.
func kcGone(t *testing.T, k Kernel, dev Dev) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		_, err := k.Info(dev)
		if errors.Is(err, unix.ENXIO) {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("device %s still there after its last close: %v", dev, err)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// kcPool is a thin-pool made with the Kernel's calls alone, on two new
// disks: kcMetaBytes of metadata, the data disk as long as the pool.
type kcPool struct {
	e       env
	k       Kernel
	info    devmapper.DeviceInfo
	params  devmapper.ThinPoolParams
	sectors uint64
}

func newKCPool(t *testing.T, e env, dataBytes int64, lowWater uint64, feats devmapper.ThinPoolFeatures) *kcPool {
	t.Helper()
	p := &kcPool{e: e, k: e.kernel(), sectors: uint64(dataBytes) / devmapper.SectorSize}
	p.params = devmapper.ThinPoolParams{
		MetadataDev: e.disk(t, kcMetaBytes), DataDev: e.disk(t, dataBytes),
		BlockSectors: kcBlockSectors, LowWaterBlocks: lowWater, Features: feats,
	}
	p.info = kcCreate(t, p.k, "pool")
	p.load(t)
	return p
}

// load loads the pool's table into its device and resumes it.
func (p *kcPool) load(t *testing.T) {
	t.Helper()
	if err := p.k.Load(p.info.Dev, []devmapper.Target{devmapper.NewTarget(0, p.sectors, p.params)}); err != nil {
		t.Fatal(err)
	}
	if err := p.k.Resume(p.info.Dev); err != nil {
		t.Fatal(err)
	}
}

func (p *kcPool) status(t *testing.T) devmapper.ThinPoolStatus {
	t.Helper()
	st, err := p.k.Status(p.info.Dev, true)
	if err != nil {
		t.Fatal(err)
	}
	if len(st) != 1 || st[0].Type != "thin-pool" {
		t.Fatalf("pool status: %+v", st)
	}
	s, err := devmapper.ParseThinPoolStatus(st[0].Params)
	if err != nil {
		t.Fatal(err)
	}
	return s
}

func (p *kcPool) message(t *testing.T, m devmapper.Message) {
	t.Helper()
	if err := p.k.Message(p.info.Dev, m); err != nil {
		t.Fatal(err)
	}
}

// activate makes a dm device for thin id.
func (p *kcPool) activate(t *testing.T, id uint32, sectors uint64) devmapper.DeviceInfo {
	t.Helper()
	info := kcCreate(t, p.k, fmt.Sprintf("thin%d", id))
	if err := p.k.Load(info.Dev, []devmapper.Target{devmapper.NewTarget(0, sectors, devmapper.ThinParams{PoolDev: p.info.Dev, DeviceID: id})}); err != nil {
		t.Fatal(err)
	}
	if err := p.k.Resume(info.Dev); err != nil {
		t.Fatal(err)
	}
	return info
}

func (p *kcPool) thinStatus(t *testing.T, dev Dev) devmapper.ThinStatus {
	t.Helper()
	st, err := p.k.Status(dev, true)
	if err != nil {
		t.Fatal(err)
	}
	ts, err := devmapper.ParseThinStatus(st[0].Params)
	if err != nil {
		t.Fatal(err)
	}
	return ts
}

// superblock reads block 0 of the pool's metadata device, parses it and
// checks its checksum.
func (p *kcPool) superblock(t *testing.T) ([]byte, devmapper.Superblock) {
	t.Helper()
	buf := make([]byte, devmapper.SuperblockBytes)
	if err := p.k.ReadBlock(p.params.MetadataDev, 0, buf); err != nil {
		t.Fatal(err)
	}
	sb, ok, err := devmapper.ParseSuperblock(buf)
	if err != nil || !ok {
		t.Fatalf("metadata device's block 0: %+v, ok %v, %v", sb, ok, err)
	}
	if !devmapper.SuperblockChecksumValid(buf) {
		t.Errorf("superblock checksum %#x does not check", buf[:4])
	}
	return buf, sb
}

func kcWrite(t *testing.T, e env, dev Dev, off int64, b []byte) {
	t.Helper()
	if err := e.writeDev(t, dev, off, b); err != nil {
		t.Fatal(err)
	}
}
