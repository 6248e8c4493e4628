package thinpooltest

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sync"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/csi-dmthin/csi-dmthin/pkg/devmapper"
)

// The fake's block devices, data and reboots: loop files and disks, block
// zeroing, what a reboot keeps, concurrent use.

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
