package thinpooltest

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
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
