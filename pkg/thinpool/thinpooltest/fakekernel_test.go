package thinpooltest

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/csi-dmthin/csi-dmthin/pkg/devmapper"
)

// What only the fake has, or what it does where it cannot follow the
// kernel: reboots, failing a pool and needs_check on demand, loop files and
// disks, its helpers, I/O to suspended devices. What it shares with the
// kernel is the kernel contract (pkg/thinpool, kernelcontract_test.go),
// which runs on both.

const fkBlockSectors = 128 // 64 KiB pool blocks
const fkBlockBytes = fkBlockSectors * devmapper.SectorSize

var fkSeq atomic.Int64

func fkName(prefix string) string { return fmt.Sprintf("%s-%d", prefix, fkSeq.Add(1)) }

func fkBytes(seed byte, n int) []byte {
	b := make([]byte, n)
	for i := range b {
		b[i] = seed + byte(i%251)
	}
	return b
}

type fkPool struct {
	k          *FakeKernel
	info       devmapper.DeviceInfo
	params     devmapper.ThinPoolParams
	sectors    uint64
	meta, data devmapper.Dev
	dataPath   string
}

// newFkPool builds a pool on two disks: 16 MiB of metadata, dataBytes of
// data, the pool as long as the data disk.
func newFkPool(t *testing.T, k *FakeKernel, dataBytes int64, lowWater uint64, feats devmapper.ThinPoolFeatures) *fkPool {
	t.Helper()
	meta := k.AddBlockDevice(fkName("/dev/meta"), 16<<20)
	dataPath := fkName("/dev/data")
	data := k.AddBlockDevice(dataPath, dataBytes)
	name := fkName("pool")
	info, err := k.Create(name, devmapper.UUIDPrefix+name)
	if err != nil {
		t.Fatal(err)
	}
	p := &fkPool{k: k, info: info, meta: meta, data: data, dataPath: dataPath, sectors: uint64(dataBytes) / devmapper.SectorSize, params: devmapper.ThinPoolParams{
		MetadataDev: meta, DataDev: data, BlockSectors: fkBlockSectors, LowWaterBlocks: lowWater, Features: feats,
	}}
	if err := k.Load(info.Dev, []devmapper.Target{devmapper.NewTarget(0, p.sectors, p.params)}); err != nil {
		t.Fatal(err)
	}
	if err := k.Resume(info.Dev); err != nil {
		t.Fatal(err)
	}
	return p
}

func (p *fkPool) status(t *testing.T) devmapper.ThinPoolStatus {
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

func (p *fkPool) message(t *testing.T, m devmapper.Message) {
	t.Helper()
	if err := p.k.Message(p.info.Dev, m); err != nil {
		t.Fatal(err)
	}
}

// activate makes a dm device for thin id.
func (p *fkPool) activate(t *testing.T, id uint32, sectors uint64) devmapper.DeviceInfo {
	t.Helper()
	name := fkName(fmt.Sprintf("thin%d", id))
	info, err := p.k.Create(name, devmapper.UUIDPrefix+name)
	if err != nil {
		t.Fatal(err)
	}
	if err := p.k.Load(info.Dev, []devmapper.Target{devmapper.NewTarget(0, sectors, devmapper.ThinParams{PoolDev: p.info.Dev, DeviceID: id})}); err != nil {
		t.Fatal(err)
	}
	if err := p.k.Resume(info.Dev); err != nil {
		t.Fatal(err)
	}
	return info
}

func fkThinStatus(t *testing.T, k *FakeKernel, dev devmapper.Dev) devmapper.ThinStatus {
	t.Helper()
	st, err := k.Status(dev, true)
	if err != nil {
		t.Fatal(err)
	}
	ts, err := devmapper.ParseThinStatus(st[0].Params)
	if err != nil {
		t.Fatal(err)
	}
	return ts
}

func fkRead(t *testing.T, k *FakeKernel, dev devmapper.Dev, off int64, n int) []byte {
	t.Helper()
	b := make([]byte, n)
	if err := k.ReadData(dev, off, b); err != nil {
		t.Fatal(err)
	}
	return b
}

func fkWrite(t *testing.T, k *FakeKernel, dev devmapper.Dev, off int64, b []byte) {
	t.Helper()
	if err := k.WriteData(dev, off, b); err != nil {
		t.Fatal(err)
	}
}

func TestFakeCreateInfoErrors(t *testing.T) {
	k := NewFakeKernel()
	taken, err := k.Create("taken", devmapper.UUIDPrefix+"taken")
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name, dmName, uuid string
		wantErr            error
	}{
		{"no uuid prefix", "x", "not-ours", devmapper.ErrInvalid},
		{"bare prefix", "x", devmapper.UUIDPrefix, devmapper.ErrInvalid},
		{"empty name", "", devmapper.UUIDPrefix + "x", devmapper.ErrInvalid},
		{"slash", "a/b", devmapper.UUIDPrefix + "x", devmapper.ErrInvalid},
		{"newline", "a\nb", devmapper.UUIDPrefix + "x", devmapper.ErrInvalid},
		{"long name", string(bytes.Repeat([]byte("n"), 128)), devmapper.UUIDPrefix + "x", devmapper.ErrInvalid},
		{"taken name", "taken", devmapper.UUIDPrefix + "other", unix.EBUSY},
		{"taken uuid", "other", devmapper.UUIDPrefix + "taken", unix.EBUSY},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if _, err := k.Create(tc.dmName, tc.uuid); !errors.Is(err, tc.wantErr) {
				t.Fatalf("create %q %q: %v, want %v", tc.dmName, tc.uuid, err, tc.wantErr)
			}
		})
	}
	if _, err := k.Info(devmapper.MakeDev(fakeDMMajor, 1<<19)); !errors.Is(err, unix.ENXIO) {
		t.Errorf("info of a missing device: %v", err)
	}
	if _, err := k.InfoByName("no-such-device"); !errors.Is(err, unix.ENXIO) {
		t.Errorf("info by a missing name: %v", err)
	}
	if err := k.Load(taken.Dev, nil); !errors.Is(err, devmapper.ErrInvalid) {
		t.Errorf("empty table: %v", err)
	}
	gap := []devmapper.Target{{StartSector: 0, LengthSectors: 8, Type: "error"}, {StartSector: 16, LengthSectors: 8, Type: "error"}}
	if err := k.Load(taken.Dev, gap); !errors.Is(err, devmapper.ErrInvalid) {
		t.Errorf("table with a gap: %v", err)
	}
	if err := k.Resume(taken.Dev); err != nil {
		t.Errorf("resume of a device with nothing to do: %v", err)
	}
	// Minors are reused, lowest first, as the kernel does.
	if err := k.Remove(taken.Dev, false); err != nil {
		t.Fatal(err)
	}
	again, err := k.Create("again", devmapper.UUIDPrefix+"again")
	if err != nil || again.Dev != taken.Dev || again.Dev.Major() != fakeDMMajor {
		t.Errorf("new device %+v, %v; want the freed number %s", again, err, taken.Dev)
	}
}

// I/O to a suspended device fails with EAGAIN, where the kernel would hold
// it until the resume: a fake has no one to wait for it.
func TestFakeSuspendedIO(t *testing.T) {
	k := NewFakeKernel()
	p := newFkPool(t, k, 64<<20, 0, devmapper.ThinPoolFeatures{})
	p.message(t, devmapper.CreateThin{DeviceID: 1})
	thin := p.activate(t, 1, 2048)
	fkWrite(t, k, thin.Dev, 0, []byte("before"))
	if err := k.Suspend(thin.Dev, 0); err != nil {
		t.Fatal(err)
	}
	if err := k.WriteData(thin.Dev, 0, []byte("during")); !errors.Is(err, unix.EAGAIN) {
		t.Errorf("write to a suspended device: %v, want EAGAIN", err)
	}
	if err := k.Resume(thin.Dev); err != nil {
		t.Fatal(err)
	}
	// A suspended pool suspends its thins with it.
	if err := k.Suspend(p.info.Dev, devmapper.NoFlush); err != nil {
		t.Fatal(err)
	}
	if err := k.ReadData(thin.Dev, 0, make([]byte, 6)); !errors.Is(err, unix.EAGAIN) {
		t.Errorf("read from a thin of a suspended pool: %v, want EAGAIN", err)
	}
	if err := k.Resume(p.info.Dev); err != nil {
		t.Fatal(err)
	}
	if got := fkRead(t, k, thin.Dev, 0, 6); string(got) != "before" {
		t.Errorf("read %q after the resumes, want what was written before", got)
	}
}

// Devices, the fake's view of every dm device, is in name order.
func TestFakeDevices(t *testing.T) {
	k := NewFakeKernel()
	for _, name := range []string{"b", "c", "a"} {
		if _, err := k.Create(name, devmapper.UUIDPrefix+name); err != nil {
			t.Fatal(err)
		}
	}
	d := k.Devices()
	if len(d) != 3 || d[0].Name != "a" || d[1].Name != "b" || d[2].Name != "c" {
		t.Errorf("Devices: %+v", d)
	}
}

func TestFakeRemovePoolHeldByThin(t *testing.T) {
	k := NewFakeKernel()
	p := newFkPool(t, k, 64<<20, 0, devmapper.ThinPoolFeatures{})
	p.message(t, devmapper.CreateThin{DeviceID: 1})
	thin := p.activate(t, 1, 2048)
	if i, _ := k.Info(p.info.Dev); i.OpenCount != 1 {
		t.Errorf("pool open count %d with one thin on it, want 1", i.OpenCount)
	}
	if err := k.Remove(p.info.Dev, false); !errors.Is(err, unix.EBUSY) {
		t.Fatalf("remove of a pool with a thin on it: %v, want EBUSY", err)
	}
	// Deferred: the pool goes when its last thin does.
	if err := k.Remove(p.info.Dev, true); err != nil {
		t.Fatal(err)
	}
	if err := k.Remove(thin.Dev, false); err != nil {
		t.Fatal(err)
	}
	if _, err := k.Info(p.info.Dev); !errors.Is(err, unix.ENXIO) {
		t.Fatalf("pool still there after its last thin went: %v", err)
	}
	if ids := k.ThinIDs(p.meta); len(ids) != 1 || ids[0] != 1 {
		t.Errorf("metadata device holds thin ids %v, want [1]", ids)
	}
}

func TestFakeGrowPool(t *testing.T) {
	k := NewFakeKernel()
	p := newFkPool(t, k, 2<<20, 0, devmapper.ThinPoolFeatures{ErrorIfNoSpace: true})
	p.message(t, devmapper.CreateThin{DeviceID: 0})
	thin := p.activate(t, 0, 8<<20/devmapper.SectorSize)
	if err := k.Write(thin.Dev, 0, 4<<20); !errors.Is(err, unix.ENOSPC) {
		t.Fatalf("filling the pool: %v", err)
	}
	reload := func(sectors uint64) error {
		if err := k.Load(p.info.Dev, []devmapper.Target{devmapper.NewTarget(0, sectors, p.params)}); err != nil {
			return err
		}
		return k.Resume(p.info.Dev)
	}
	// Longer than its data device: refused, the table dropped, the pool
	// left suspended (and its thins with it).
	if err := reload(4 << 20 / devmapper.SectorSize); !errors.Is(err, unix.EINVAL) {
		t.Fatalf("pool table past its data device: %v", err)
	}
	if i, _ := k.Info(p.info.Dev); !i.Suspended || i.InactiveTable {
		t.Errorf("after a refused table: %+v", i)
	}
	if i, _ := k.Info(thin.Dev); !i.InternalSuspend {
		t.Errorf("thin of a suspended pool: %+v", i)
	}
	// The disk grows; the pool grows onto it and leaves out_of_data_space.
	if k.AddBlockDevice(p.dataPath, 4<<20) != p.data {
		t.Fatal("growing a disk changed its number")
	}
	if err := reload(4 << 20 / devmapper.SectorSize); err != nil {
		t.Fatal(err)
	}
	if st := p.status(t); st.TotalDataBlocks != 64 || st.Mode != devmapper.PoolReadWrite {
		t.Errorf("grown pool %+v", st)
	}
	if err := k.Write(thin.Dev, 2<<20, fkBlockBytes); err != nil {
		t.Errorf("write after growing: %v", err)
	}
	// A pool never shrinks: the shorter table goes live, the resume fails
	// and the device stays suspended.
	if err := reload(2 << 20 / devmapper.SectorSize); !errors.Is(err, unix.EINVAL) {
		t.Fatalf("shrinking the pool: %v", err)
	}
	if i, _ := k.Info(p.info.Dev); !i.Suspended {
		t.Errorf("after a refused shrink: %+v", i)
	}
	if err := reload(4 << 20 / devmapper.SectorSize); err != nil {
		t.Fatal(err)
	}
}

func TestFakeLoadErrors(t *testing.T) {
	k := NewFakeKernel()
	p := newFkPool(t, k, 64<<20, 0, devmapper.ThinPoolFeatures{})
	p.message(t, devmapper.CreateThin{DeviceID: 1})
	spareMeta := k.AddBlockDevice("/dev/spare-meta", 16<<20)
	spareData := k.AddBlockDevice("/dev/spare-data", 64<<20)
	plain, _ := k.Create("plain", devmapper.UUIDPrefix+"plain")
	missing := devmapper.MakeDev(fakeDMMajor, 999)
	pool := func(meta, data devmapper.Dev, blockSectors uint32) devmapper.Target {
		return devmapper.NewTarget(0, 2048, devmapper.ThinPoolParams{MetadataDev: meta, DataDev: data, BlockSectors: blockSectors})
	}
	thin := func(poolDev devmapper.Dev, id uint32) devmapper.Target {
		return devmapper.NewTarget(0, 2048, devmapper.ThinParams{PoolDev: poolDev, DeviceID: id})
	}
	for _, tc := range []struct {
		name    string
		onPool  bool // load into the pool's device rather than a new one
		table   []devmapper.Target
		wantErr error
	}{
		{"unknown target type", false, []devmapper.Target{{LengthSectors: 8, Type: "zero"}}, unix.EINVAL},
		{"thin on no device", false, []devmapper.Target{thin(missing, 1)}, unix.ENXIO},
		{"thin on a disk", false, []devmapper.Target{thin(spareData, 1)}, unix.EINVAL},
		{"thin on a device with no pool", false, []devmapper.Target{thin(plain.Dev, 1)}, unix.EINVAL},
		{"thin with a missing id", false, []devmapper.Target{thin(p.info.Dev, 77)}, unix.ENODATA},
		{"thin id over 24 bits", false, []devmapper.Target{thin(p.info.Dev, devmapper.MaxDeviceID+1)}, unix.EINVAL},
		{"pool on no metadata device", false, []devmapper.Target{pool(missing, spareData, 128)}, unix.ENXIO},
		{"pool on a dm device", false, []devmapper.Target{pool(spareMeta, plain.Dev, 128)}, unix.ENXIO},
		{"pool block size", false, []devmapper.Target{pool(spareMeta, spareData, 100)}, unix.EINVAL},
		{"pool on one device twice", false, []devmapper.Target{pool(spareData, spareData, 128)}, unix.EINVAL},
		{"metadata in use by another pool", false, []devmapper.Target{pool(p.meta, p.data, 128)}, unix.EBUSY},
		{"pool not alone", false, []devmapper.Target{pool(spareMeta, spareData, 128), {StartSector: 2048, LengthSectors: 8, Type: "error"}}, unix.EINVAL},
		{"linear on no device", false, []devmapper.Target{devmapper.NewTarget(0, 8, devmapper.LinearParams{Dev: missing})}, unix.ENXIO},
		{"another pool on a pool device", true, []devmapper.Target{pool(spareMeta, spareData, 128)}, unix.EINVAL},
		{"another type on a pool device", true, []devmapper.Target{{LengthSectors: 8, Type: "error"}}, unix.EINVAL},
		{"load on no device", false, nil, unix.ENXIO},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dev := p.info.Dev
			if !tc.onPool {
				info, err := k.Create(fkName("load"), devmapper.UUIDPrefix+fkName("load"))
				if err != nil {
					t.Fatal(err)
				}
				dev = info.Dev
			}
			table := tc.table
			if table == nil {
				dev, table = missing, []devmapper.Target{{LengthSectors: 8, Type: "error"}}
			}
			err := k.Load(dev, table)
			if !errors.Is(err, tc.wantErr) {
				t.Fatalf("load %v: %v, want %v", table, err, tc.wantErr)
			}
			var dmErr *devmapper.Error
			if !errors.As(err, &dmErr) || dmErr.Op != "load" || dmErr.Device != dev.String() {
				t.Errorf("error does not name the operation and device: %#v", err)
			}
		})
	}
	// A failed pool load left no pool object behind: the spare devices
	// still make a pool.
	fresh, _ := k.Create("fresh", devmapper.UUIDPrefix+"fresh")
	if err := k.Load(fresh.Dev, []devmapper.Target{pool(spareMeta, spareData, 128)}); err != nil {
		t.Fatal(err)
	}
	// A thin cannot be loaded on a suspended pool.
	thinDev, _ := k.Create("t", devmapper.UUIDPrefix+"t")
	if err := k.Suspend(p.info.Dev, devmapper.NoFlush); err != nil {
		t.Fatal(err)
	}
	if err := k.Load(thinDev.Dev, []devmapper.Target{thin(p.info.Dev, 1)}); !errors.Is(err, unix.EINVAL) {
		t.Errorf("thin on a suspended pool: %v", err)
	}
	if err := k.Resume(p.info.Dev); err != nil {
		t.Fatal(err)
	}
	if err := k.Load(thinDev.Dev, []devmapper.Target{thin(p.info.Dev, 1)}); err != nil {
		t.Fatal(err)
	}
	// An inactive thin table holds the thin open and the pool too.
	if err := k.Message(p.info.Dev, devmapper.Delete{DeviceID: 1}); !errors.Is(err, unix.EBUSY) {
		t.Errorf("delete of a thin with an inactive table: %v", err)
	}
	if err := k.Remove(p.info.Dev, false); !errors.Is(err, unix.EBUSY) {
		t.Errorf("remove of a pool an inactive thin table holds: %v", err)
	}
	// The error target takes no parameters: it ignores any and prints none.
	errDev, _ := k.Create("err", devmapper.UUIDPrefix+"err")
	if err := k.Load(errDev.Dev, []devmapper.Target{{LengthSectors: 8, Type: "error", Params: "ignored"}}); err != nil {
		t.Fatal(err)
	}
	if err := k.Resume(errDev.Dev); err != nil {
		t.Fatal(err)
	}
	if tbl, _ := k.Table(errDev.Dev); len(tbl) != 1 || tbl[0].Params != "" {
		t.Errorf("error table %+v", tbl)
	}
}

func TestFakeNeedsCheckAndFail(t *testing.T) {
	k := NewFakeKernel()
	p := newFkPool(t, k, 64<<20, 0, devmapper.ThinPoolFeatures{ErrorIfNoSpace: true})
	p.message(t, devmapper.CreateThin{DeviceID: 1})
	thin := p.activate(t, 1, 2048)
	fkWrite(t, k, thin.Dev, 0, []byte("mapped"))
	if err := k.SetNeedsCheck(p.info.Dev); err != nil {
		t.Fatal(err)
	}
	if st := p.status(t); st.Mode != devmapper.PoolReadOnly || !st.NeedsCheck {
		t.Fatalf("status after needs_check: %+v", st)
	}
	for _, m := range []devmapper.Message{devmapper.CreateThin{DeviceID: 2}, devmapper.Delete{DeviceID: 1}, devmapper.SetTransactionID{Current: 0, New: 1}} {
		// dm-thin.c's pool_message refuses with EOPNOTSUPP, not EINVAL.
		if err := k.Message(p.info.Dev, m); !errors.Is(err, unix.EOPNOTSUPP) {
			t.Errorf("%v on a read-only pool: %v, want EOPNOTSUPP", m, err)
		}
	}
	if err := k.WriteData(thin.Dev, 0, []byte("MAPPED")); err != nil {
		t.Errorf("write to a mapped block of a read-only pool: %v", err)
	}
	if err := k.Write(thin.Dev, fkBlockBytes, 512); !errors.Is(err, unix.EIO) {
		t.Errorf("write needing a new block on a read-only pool: %v, want EIO", err)
	}
	// needs_check is in the metadata: the pool comes back read-only.
	k.Reboot()
	info, _ := k.Create("pool-again", devmapper.UUIDPrefix+"pool-again")
	p.info = info
	if err := k.Load(info.Dev, []devmapper.Target{devmapper.NewTarget(0, p.sectors, p.params)}); err != nil {
		t.Fatal(err)
	}
	if err := k.Resume(info.Dev); err != nil {
		t.Fatal(err)
	}
	if st := p.status(t); st.Mode != devmapper.PoolReadOnly || !st.NeedsCheck {
		t.Fatalf("status after a reboot with needs_check: %+v", st)
	}

	// Fail mode is the pool's, not the metadata's.
	q := newFkPool(t, k, 64<<20, 0, devmapper.ThinPoolFeatures{})
	q.message(t, devmapper.CreateThin{DeviceID: 1})
	qthin := q.activate(t, 1, 2048)
	if err := k.FailPool(q.info.Dev); err != nil {
		t.Fatal(err)
	}
	if st := q.status(t); !st.Fail {
		t.Errorf("failed pool status %+v", st)
	}
	if ts := fkThinStatus(t, k, qthin.Dev); !ts.Fail {
		t.Errorf("thin of a failed pool: %+v", ts)
	}
	if err := k.Message(q.info.Dev, devmapper.CreateThin{DeviceID: 2}); !errors.Is(err, unix.EOPNOTSUPP) {
		t.Errorf("message to a failed pool: %v", err)
	}
	if err := k.ReadData(qthin.Dev, 0, make([]byte, 512)); !errors.Is(err, unix.EIO) {
		t.Errorf("read from a failed pool: %v", err)
	}
	other, _ := k.Create("other", devmapper.UUIDPrefix+"other")
	if err := k.Load(other.Dev, []devmapper.Target{devmapper.NewTarget(0, 2048, devmapper.ThinParams{PoolDev: q.info.Dev, DeviceID: 1})}); !errors.Is(err, unix.EINVAL) {
		t.Errorf("thin table on a failed pool: %v", err)
	}
	if err := k.FailPool(devmapper.MakeDev(fakeDMMajor, 999)); !errors.Is(err, unix.ENXIO) {
		t.Errorf("FailPool of no device: %v", err)
	}
	if err := k.FailPool(qthin.Dev); !errors.Is(err, unix.EINVAL) {
		t.Errorf("FailPool of a thin: %v", err)
	}
}

func TestFakeSuperblock(t *testing.T) {
	k := NewFakeKernel()
	p := newFkPool(t, k, 64<<20, 0, devmapper.ThinPoolFeatures{})
	p.message(t, devmapper.SetTransactionID{Current: 0, New: 5})
	buf := make([]byte, devmapper.SuperblockBytes)
	if err := k.ReadBlock(p.meta, 0, buf); err != nil {
		t.Fatal(err)
	}
	sb, ok, err := devmapper.ParseSuperblock(buf)
	if err != nil || !ok || sb.TransactionID != 5 || sb.DataBlockSectors != fkBlockSectors || sb.MetadataBlockSectors != 8 || sb.MetadataNrBlocks != 4096 {
		t.Fatalf("superblock %+v %v %v", sb, ok, err)
	}
	le := binary.LittleEndian
	if got, want := le.Uint32(buf), ^crc32.Checksum(buf[4:], crc32.MakeTable(crc32.Castagnoli))^160774; got != want {
		t.Errorf("checksum %#x, want %#x", got, want)
	}
	if le.Uint64(buf[64:]) != 1024 {
		t.Errorf("data space map of %d blocks, want 1024", le.Uint64(buf[64:]))
	}

	for _, tc := range []struct {
		name    string
		image   []byte
		feats   devmapper.ThinPoolFeatures
		block   uint32
		wantErr error
	}{
		{"block size change", nil, devmapper.ThinPoolFeatures{}, 256, unix.EINVAL},
		{"not a pool", []byte("something else"), devmapper.ThinPoolFeatures{}, 128, unix.EILSEQ},
		{"read-only on a zeroed device", make([]byte, 4096), devmapper.ThinPoolFeatures{ReadOnly: true}, 128, unix.EPERM},
		{"same block size", nil, devmapper.ThinPoolFeatures{}, 128, nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			meta := p.meta
			if tc.image != nil {
				meta = k.AddBlockDevice(fkName("/dev/m"), 16<<20)
				fkWrite(t, k, meta, 0, tc.image)
			} else if err := k.Remove(p.info.Dev, false); err != nil && !errors.Is(err, unix.ENXIO) {
				t.Fatal(err)
			}
			info, _ := k.Create(fkName("sb"), devmapper.UUIDPrefix+fkName("sb"))
			params := devmapper.ThinPoolParams{MetadataDev: meta, DataDev: p.data, BlockSectors: tc.block, Features: tc.feats}
			err := k.Load(info.Dev, []devmapper.Target{devmapper.NewTarget(0, p.sectors, params)})
			if !errors.Is(err, tc.wantErr) || (err == nil) != (tc.wantErr == nil) {
				t.Fatalf("load: %v, want %v", err, tc.wantErr)
			}
			if err == nil {
				if err := k.Resume(info.Dev); err != nil {
					t.Fatal(err)
				}
				if st, _ := k.Status(info.Dev, false); st[0].Params[:2] != "5 " {
					t.Errorf("reopened pool status %q, want transaction id 5", st[0].Params)
				}
			}
		})
	}
	// Zeroing the metadata device starts a new pool.
	k.Reboot()
	if err := k.ZeroBlock(p.meta, 4096); err != nil {
		t.Fatal(err)
	}
	q := newFkPoolOn(t, k, p.meta, p.data, p.sectors)
	if st := q.status(t); st.TransactionID != 0 || len(k.ThinIDs(q.info.Dev)) != 0 {
		t.Errorf("pool on a zeroed metadata device: %+v", st)
	}
}

// newFkPoolOn builds a pool device on existing devices.
func newFkPoolOn(t *testing.T, k *FakeKernel, meta, data devmapper.Dev, sectors uint64) *fkPool {
	t.Helper()
	name := fkName("pool")
	info, err := k.Create(name, devmapper.UUIDPrefix+name)
	if err != nil {
		t.Fatal(err)
	}
	p := &fkPool{k: k, info: info, meta: meta, data: data, sectors: sectors,
		params: devmapper.ThinPoolParams{MetadataDev: meta, DataDev: data, BlockSectors: fkBlockSectors, Features: devmapper.ThinPoolFeatures{ErrorIfNoSpace: true}}}
	if err := k.Load(info.Dev, []devmapper.Target{devmapper.NewTarget(0, sectors, p.params)}); err != nil {
		t.Fatal(err)
	}
	if err := k.Resume(info.Dev); err != nil {
		t.Fatal(err)
	}
	return p
}

func fkSparseFile(t *testing.T, path string, size int64) {
	t.Helper()
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := f.Truncate(size); err != nil {
		t.Fatal(err)
	}
}

func TestFakeRebootKeepsPool(t *testing.T) {
	k := NewFakeKernel()
	dir := t.TempDir()
	metaFile, dataFile := filepath.Join(dir, "meta"), filepath.Join(dir, "data")
	fkSparseFile(t, metaFile, 16<<20)
	fkSparseFile(t, dataFile, 64<<20)
	attach := func() (meta, data devmapper.Dev, release func()) {
		meta, relMeta, err := k.AttachFile(metaFile)
		if err != nil {
			t.Fatal(err)
		}
		data, relData, err := k.AttachFile(dataFile)
		if err != nil {
			t.Fatal(err)
		}
		return meta, data, func() { relMeta(); relData() }
	}
	meta, data, release := attach()
	if err := k.ZeroBlock(meta, 4096); err != nil {
		t.Fatal(err)
	}
	p := newFkPoolOn(t, k, meta, data, 64<<20/devmapper.SectorSize)
	release()
	p.message(t, devmapper.CreateThin{DeviceID: 1})
	thin := p.activate(t, 1, 8<<20/devmapper.SectorSize)
	a := fkBytes(3, 3*fkBlockBytes+100)
	fkWrite(t, k, thin.Dev, 4096, a)
	if err := k.Suspend(thin.Dev, 0); err != nil {
		t.Fatal(err)
	}
	p.message(t, devmapper.CreateSnap{DeviceID: 2, OriginID: 1})
	if err := k.Resume(thin.Dev); err != nil {
		t.Fatal(err)
	}
	fkWrite(t, k, thin.Dev, 4096, fkBytes(9, len(a)))
	p.message(t, devmapper.SetTransactionID{Current: 0, New: 7})
	before := p.status(t)
	if err := k.SetOpen(thin.Dev, 1); err != nil {
		t.Fatal(err)
	}

	k.Reboot()
	if d := k.Devices(); len(d) != 0 {
		t.Fatalf("devices after a reboot: %+v", d)
	}
	if _, err := k.DeviceNode(meta); !errors.Is(err, unix.ENXIO) {
		t.Errorf("loop device survived the reboot: %v", err)
	}
	meta, data, release = attach()
	defer release()
	buf := make([]byte, devmapper.SuperblockBytes)
	if err := k.ReadBlock(meta, 0, buf); err != nil {
		t.Fatal(err)
	}
	if sb, ok, err := devmapper.ParseSuperblock(buf); err != nil || !ok || sb.TransactionID != 7 || sb.DataBlockSectors != fkBlockSectors {
		t.Fatalf("superblock after the reboot: %+v %v %v", sb, ok, err)
	}
	if ids := k.ThinIDs(meta); len(ids) != 2 || ids[0] != 1 || ids[1] != 2 {
		t.Fatalf("thin ids on the metadata device after the reboot: %v", ids)
	}
	p = newFkPoolOn(t, k, meta, data, 64<<20/devmapper.SectorSize)
	after := p.status(t)
	if after != before {
		t.Errorf("pool status %+v after the reboot, %+v before", after, before)
	}
	snap := p.activate(t, 2, 8<<20/devmapper.SectorSize)
	if got := fkRead(t, k, snap.Dev, 4096, len(a)); !bytes.Equal(got, a) {
		t.Fatal("snapshot data lost over the reboot")
	}
	origin := p.activate(t, 1, 8<<20/devmapper.SectorSize)
	if got := fkRead(t, k, origin.Dev, 4096, len(a)); !bytes.Equal(got, fkBytes(9, len(a))) {
		t.Fatal("origin data lost over the reboot")
	}
}

func TestFakeLoopAndBlockDevices(t *testing.T) {
	k := NewFakeKernel()
	dir := t.TempDir()
	file := filepath.Join(dir, "f")
	fkSparseFile(t, file, 1<<20)
	if _, _, err := k.AttachFile(filepath.Join(dir, "missing")); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("attach of a missing file: %v", err)
	}
	if _, _, err := k.AttachFile(dir); err == nil {
		t.Error("attached a directory")
	}
	dev, release, err := k.AttachFile(file)
	if err != nil || dev.Major() != fakeLoopMajor {
		t.Fatalf("attach: %s, %v", dev, err)
	}
	again, noop, err := k.AttachFile(file)
	if err != nil || again != dev {
		t.Fatalf("second attach of the same file: %s, %v", again, err)
	}
	noop()
	node, err := k.DeviceNode(dev)
	if err != nil {
		t.Fatal(err)
	}
	if d, size, err := k.BlockDevice(node); err != nil || d != dev || size != 1<<20 {
		t.Errorf("BlockDevice(%s): %s %d %v", node, d, size, err)
	}
	if _, _, err := k.BlockDevice(file); !errors.Is(err, unix.ENOTBLK) {
		t.Errorf("BlockDevice of a loop file: %v, want ENOTBLK", err)
	}
	fkWrite(t, k, dev, 8192, []byte("kept"))
	fkSparseFile(t, file, 2<<20)
	if err := k.RefreshSize(dev); err != nil {
		t.Fatal(err)
	}
	if _, size, _ := k.BlockDevice(node); size != 2<<20 {
		t.Errorf("size after RefreshSize: %d", size)
	}
	// Released and held by nothing, an auto-clearing device detaches.
	release()
	release()
	if _, err := k.DeviceNode(dev); !errors.Is(err, unix.ENXIO) {
		t.Errorf("released loop device still attached: %v", err)
	}
	if _, _, err := k.BlockDevice(node); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("node of a detached device: %v", err)
	}
	// Its content is the file's, and stays.
	dev, release, err = k.AttachFile(file)
	if err != nil {
		t.Fatal(err)
	}
	if got := fkRead(t, k, dev, 8192, 4); string(got) != "kept" {
		t.Errorf("loop file content %q after re-attaching", got)
	}
	// A table holds it: released, it stays until the table goes.
	lin, _ := k.Create("lin", devmapper.UUIDPrefix+"lin")
	if err := k.Load(lin.Dev, []devmapper.Target{devmapper.NewTarget(0, 8, devmapper.LinearParams{Dev: dev})}); err != nil {
		t.Fatal(err)
	}
	release()
	if _, err := k.DeviceNode(dev); err != nil {
		t.Errorf("loop device held by a table detached: %v", err)
	}
	if err := k.Remove(lin.Dev, false); err != nil {
		t.Fatal(err)
	}
	if _, err := k.DeviceNode(dev); !errors.Is(err, unix.ENXIO) {
		t.Errorf("loop device not detached after its table went: %v", err)
	}

	disk := k.AddBlockDevice("/dev/sdz", 1<<30)
	if d, size, err := k.BlockDevice("/dev/sdz"); err != nil || d != disk || size != 1<<30 || disk.Major() != fakeDiskMajor {
		t.Errorf("disk: %s %d %v", d, size, err)
	}
	if n, err := k.DeviceNode(disk); err != nil || n != "/dev/sdz" {
		t.Errorf("disk node %q, %v", n, err)
	}
	if _, _, err := k.BlockDevice("/dev/nope"); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("missing disk: %v", err)
	}
	if _, err := k.DeviceNode(devmapper.MakeDev(fakeDMMajor, 77)); !errors.Is(err, unix.ENXIO) {
		t.Errorf("node of no device: %v", err)
	}
	info, _ := k.Create("dm", devmapper.UUIDPrefix+"dm")
	if n, err := k.DeviceNode(info.Dev); err != nil || n != fmt.Sprintf("/dev/fake/dm-%d", info.Dev.Minor()) {
		t.Errorf("dm node %q, %v", n, err)
	}
	if err := k.ReadBlock(disk, 1<<30-10, make([]byte, 20)); err == nil {
		t.Error("read past the end of a disk")
	}
}

func TestFakeBlockZeroing(t *testing.T) {
	for _, skip := range []bool{false, true} {
		t.Run(fmt.Sprintf("skipBlockZeroing=%v", skip), func(t *testing.T) {
			k := NewFakeKernel()
			p := newFkPool(t, k, 16*fkBlockBytes, 0, devmapper.ThinPoolFeatures{SkipBlockZeroing: skip})
			p.message(t, devmapper.CreateThin{DeviceID: 1})
			a := p.activate(t, 1, 16*fkBlockSectors)
			old := fkBytes(5, 16*fkBlockBytes)
			fkWrite(t, k, a.Dev, 0, old)
			if err := k.Remove(a.Dev, false); err != nil {
				t.Fatal(err)
			}
			p.message(t, devmapper.Delete{DeviceID: 1})
			p.message(t, devmapper.CreateThin{DeviceID: 2})
			b := p.activate(t, 2, 16*fkBlockSectors)
			fkWrite(t, k, b.Dev, 0, []byte("new"))
			got := fkRead(t, k, b.Dev, 0, fkBlockBytes)
			want := make([]byte, fkBlockBytes)
			if skip {
				// The block a deleted device left shows through.
				copy(want, old)
			}
			copy(want, "new")
			if !bytes.Equal(got, want) {
				t.Errorf("new block read %q..., want %q...", got[:8], want[:8])
			}
		})
	}
}

func TestFakeConcurrent(t *testing.T) {
	k := NewFakeKernel()
	p := newFkPool(t, k, 256<<20, 0, devmapper.ThinPoolFeatures{ErrorIfNoSpace: true})
	var wg sync.WaitGroup
	var tidMu sync.Mutex
	tid := uint64(0)
	for w := range 8 {
		wg.Go(func() {
			for i := range 10 {
				id := uint32(w*100 + i + 1)
				if err := k.Message(p.info.Dev, devmapper.CreateThin{DeviceID: id}); err != nil {
					t.Error(err)
					return
				}
				name := fmt.Sprintf("c-%d", id)
				info, err := k.Create(name, devmapper.UUIDPrefix+name)
				if err != nil {
					t.Error(err)
					return
				}
				if err := k.Load(info.Dev, []devmapper.Target{devmapper.NewTarget(0, 4096, devmapper.ThinParams{PoolDev: p.info.Dev, DeviceID: id})}); err != nil {
					t.Error(err)
					return
				}
				if err := k.Resume(info.Dev); err != nil {
					t.Error(err)
					return
				}
				data := fkBytes(byte(id), 8192)
				if err := k.WriteData(info.Dev, int64(i)*4096, data); err != nil {
					t.Error(err)
				}
				got := make([]byte, len(data))
				if err := k.ReadData(info.Dev, int64(i)*4096, got); err != nil || !bytes.Equal(got, data) {
					t.Errorf("thin %d read back differs: %v", id, err)
				}
				if err := k.Message(p.info.Dev, devmapper.CreateSnap{DeviceID: id + 50, OriginID: id}); err != nil {
					t.Error(err)
				}
				if _, err := k.Status(p.info.Dev, i%2 == 0); err != nil {
					t.Error(err)
				}
				tidMu.Lock()
				if err := k.Message(p.info.Dev, devmapper.SetTransactionID{Current: tid, New: tid + 1}); err != nil {
					t.Error(err)
				}
				tid++
				tidMu.Unlock()
				if _, err := k.List(); err != nil {
					t.Error(err)
				}
				if err := k.Remove(info.Dev, i%2 == 0); err != nil {
					t.Error(err)
				}
				if err := k.Message(p.info.Dev, devmapper.Delete{DeviceID: id}); err != nil {
					t.Error(err)
				}
			}
		})
	}
	wg.Wait()
	st := p.status(t)
	if st.TransactionID != 80 || len(k.ThinIDs(p.info.Dev)) != 80 {
		t.Errorf("after the workers: %+v, %d thin ids", st, len(k.ThinIDs(p.info.Dev)))
	}
	// Only the snapshots hold blocks now: one or two each.
	if st.UsedDataBlocks < 80 || st.UsedDataBlocks > 160 {
		t.Errorf("used data blocks %d", st.UsedDataBlocks)
	}
}
