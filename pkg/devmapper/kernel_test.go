//go:build vmtest

// Tests against the real kernel. They are built with -tags vmtest and run
// inside the VM by TestVM (vm_test.go); on the host they are not compiled.

package devmapper

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/csi-dmthin/csi-dmthin/internal/loop"
)

const blockSectors = 128 // 64 KiB pool blocks

func client(t *testing.T) *Client {
	t.Helper()
	c, err := Open()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// sparseLoop makes a sparse file of size bytes, zeroes its first 4 KiB (a new
// pool's metadata device must start zeroed) and attaches it to a loop device
// that detaches itself once nothing holds it.
func sparseLoop(t *testing.T, name string, size int64) loop.Device {
	t.Helper()
	path := filepath.Join(t.TempDir(), name)
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	if err := f.Truncate(size); err != nil {
		t.Fatal(err)
	}
	if _, err := f.WriteAt(make([]byte, 4096), 0); err != nil {
		t.Fatal(err)
	}
	f.Close()
	d, err := loop.Attach(path, loop.Options{AutoClear: true})
	if err != nil {
		t.Fatal(err)
	}
	// Held open for the test; the pool's table holds it too, and the kernel
	// detaches it once both let go.
	t.Cleanup(func() { _ = d.Close() })
	return d
}

type testPool struct {
	c       *Client
	info    DeviceInfo
	params  ThinPoolParams
	sectors uint64
}

var seq int

func uniq(prefix string) string {
	seq++
	return fmt.Sprintf("%s-%d-%d", prefix, os.Getpid(), seq)
}

// newPool builds a thin-pool on two loop files.
func newPool(t *testing.T, c *Client, dataBytes int64, lowWater uint64, feats ThinPoolFeatures) *testPool {
	t.Helper()
	meta := sparseLoop(t, "meta", 16<<20)
	data := sparseLoop(t, "data", dataBytes)
	name := uniq("pool")
	info, err := c.Create(name, UUIDPrefix+name)
	if err != nil {
		t.Fatal(err)
	}
	p := &testPool{c: c, info: info, sectors: uint64(dataBytes) / SectorSize, params: ThinPoolParams{
		MetadataDev: Dev(meta.Rdev), DataDev: Dev(data.Rdev), BlockSectors: blockSectors,
		LowWaterBlocks: lowWater, Features: feats,
	}}
	t.Cleanup(func() { removeRetry(t, c, info.Dev) })
	if err := c.Load(info.Dev, []Target{NewTarget(0, p.sectors, p.params)}); err != nil {
		t.Fatal(err)
	}
	if err := c.Resume(info.Dev); err != nil {
		t.Fatal(err)
	}
	return p
}

// removeRetry removes a device, tolerating its absence; used in cleanups,
// which run in reverse order (thins before their pool).
func removeRetry(t *testing.T, c *Client, dev Dev) {
	for i := 0; ; i++ {
		err := c.Remove(dev, false)
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

func (p *testPool) status(t *testing.T) ThinPoolStatus {
	t.Helper()
	st, err := p.c.Status(p.info.Dev, true)
	if err != nil {
		t.Fatal(err)
	}
	if len(st) != 1 || st[0].Type != "thin-pool" {
		t.Fatalf("pool status: %+v", st)
	}
	t.Logf("pool status line: %q", st[0].Params)
	s, err := ParseThinPoolStatus(st[0].Params)
	if err != nil {
		t.Fatal(err)
	}
	return s
}

// activate makes a dm device for thin id and returns its info and node.
func (p *testPool) activate(t *testing.T, id uint32, sectors uint64) (DeviceInfo, string) {
	t.Helper()
	name := uniq(fmt.Sprintf("thin%d", id))
	info, err := p.c.Create(name, UUIDPrefix+name)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { removeRetry(t, p.c, info.Dev) })
	if err := p.c.Load(info.Dev, []Target{NewTarget(0, sectors, ThinParams{PoolDev: p.info.Dev, DeviceID: id})}); err != nil {
		t.Fatal(err)
	}
	if err := p.c.Resume(info.Dev); err != nil {
		t.Fatal(err)
	}
	return info, node(t, info.Dev)
}

// node returns /dev/dm-N as devtmpfs made it, checking it is the right device.
func node(t *testing.T, dev Dev) string {
	t.Helper()
	path := "/dev/dm-" + strconv.FormatUint(uint64(dev.Minor()), 10)
	var st unix.Stat_t
	if err := unix.Stat(path, &st); err != nil {
		t.Fatalf("device node for %s: %v", dev, err)
	}
	if Dev(st.Rdev) != dev {
		t.Fatalf("%s is %s, want %s", path, Dev(st.Rdev), dev)
	}
	return path
}

func pattern(seed byte, n int) []byte {
	b := make([]byte, n)
	for i := range b {
		b[i] = seed + byte(i%251)
	}
	return b
}

func writeAt(t *testing.T, path string, off int64, b []byte) {
	t.Helper()
	f, err := os.OpenFile(path, os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if _, err := f.WriteAt(b, off); err != nil {
		t.Fatal(err)
	}
	if err := f.Sync(); err != nil {
		t.Fatal(err)
	}
}

func readAt(t *testing.T, path string, off int64, n int) []byte {
	t.Helper()
	f, err := os.OpenFile(path, os.O_RDONLY|unix.O_DIRECT, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	// O_DIRECT wants an aligned buffer: an mmap'd one is page-aligned.
	buf, err := unix.Mmap(-1, 0, (n+4095)&^4095, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_ANON|unix.MAP_PRIVATE)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Munmap(buf)
	if _, err := f.ReadAt(buf, off); err != nil {
		t.Fatal(err)
	}
	return append([]byte(nil), buf[:n]...)
}

func TestKernelVersionAndTargets(t *testing.T) {
	c := client(t)
	v := c.Version()
	if v[0] != 4 || !c.SupportsDeferredRemove() {
		t.Fatalf("dm interface %v", v)
	}
	t.Logf("dm ioctl interface %d.%d.%d", v[0], v[1], v[2])
	// The thin targets are listed once dm-thin-pool is loaded.
	newPool(t, c, 64<<20, 0, ThinPoolFeatures{})
	vs, err := c.TargetVersions()
	if err != nil {
		t.Fatal(err)
	}
	found := map[string]bool{}
	for _, tv := range vs {
		found[tv.Name] = true
		if tv.Name == "thin-pool" {
			t.Logf("thin-pool target %v", tv.Version)
			if tv.Version[0] != 1 {
				t.Errorf("thin-pool version %v", tv.Version)
			}
		}
	}
	for _, want := range []string{"thin-pool", "thin", "linear"} {
		if !found[want] {
			t.Errorf("target %q not listed in %+v", want, vs)
		}
	}
}

func TestKernelThinWriteRead(t *testing.T) {
	c := client(t)
	p := newPool(t, c, 256<<20, 0, ThinPoolFeatures{ErrorIfNoSpace: true})
	if err := c.Message(p.info.Dev, CreateThin{0}); err != nil {
		t.Fatal(err)
	}
	info, path := p.activate(t, 0, 64<<20/SectorSize)
	data := pattern(1, 3*64<<10) // three pool blocks
	writeAt(t, path, 1<<20, data)
	if got := readAt(t, path, 1<<20, len(data)); !bytes.Equal(got, data) {
		t.Fatal("read back differs from what was written")
	}
	// An unwritten region of a fresh thin device reads as zeroes.
	if got := readAt(t, path, 8<<20, 4096); !bytes.Equal(got, make([]byte, 4096)) {
		t.Fatal("unwritten region is not zero")
	}
	st, err := c.Status(info.Dev, true)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("thin status line: %q", st[0].Params)
	ts, err := ParseThinStatus(st[0].Params)
	if err != nil {
		t.Fatal(err)
	}
	if ts.MappedSectors != 3*blockSectors || !ts.HasMapping || ts.HighestMappedSector != (1<<20+3*64<<10)/SectorSize-1 {
		t.Errorf("thin status %+v", ts)
	}
	tbl, err := c.Table(info.Dev)
	if err != nil {
		t.Fatal(err)
	}
	tp, err := ParseThinParams(tbl[0].Params)
	if err != nil || tp != (ThinParams{PoolDev: p.info.Dev, DeviceID: 0}) || tbl[0].LengthSectors != 64<<20/SectorSize {
		t.Errorf("thin table %+v: %+v %v", tbl, tp, err)
	}
}

func TestKernelSnapshotOfActiveOrigin(t *testing.T) {
	c := client(t)
	p := newPool(t, c, 256<<20, 0, ThinPoolFeatures{ErrorIfNoSpace: true})
	const size = 32 << 20
	if err := c.Message(p.info.Dev, CreateThin{10}); err != nil {
		t.Fatal(err)
	}
	origin, opath := p.activate(t, 10, size/SectorSize)
	a := pattern(7, 128<<10)
	writeAt(t, opath, 0, a)

	// The snapshot protocol: suspend the active origin (flushing and freezing
	// it), create the snapshot, resume.
	if err := c.Suspend(origin.Dev, 0); err != nil {
		t.Fatal(err)
	}
	if i, _ := c.Info(origin.Dev); !i.Suspended {
		t.Error("origin not reported suspended")
	}
	if err := c.Message(p.info.Dev, CreateSnap{DeviceID: 11, OriginID: 10}); err != nil {
		t.Fatal(err)
	}
	if err := c.Resume(origin.Dev); err != nil {
		t.Fatal(err)
	}
	_, spath := p.activate(t, 11, size/SectorSize)
	if got := readAt(t, spath, 0, len(a)); !bytes.Equal(got, a) {
		t.Fatal("snapshot does not show the origin's data")
	}
	// Later writes to the origin do not leak into the snapshot, and writes to
	// the snapshot do not leak into the origin.
	b := pattern(99, 128<<10)
	writeAt(t, opath, 0, b)
	if got := readAt(t, spath, 0, len(a)); !bytes.Equal(got, a) {
		t.Fatal("origin write leaked into the snapshot")
	}
	s := pattern(42, 64<<10)
	writeAt(t, spath, 1<<20, s)
	if got := readAt(t, opath, 1<<20, len(s)); !bytes.Equal(got, make([]byte, len(s))) {
		t.Fatal("snapshot write leaked into the origin")
	}
	if got := readAt(t, opath, 0, len(b)); !bytes.Equal(got, b) {
		t.Fatal("origin lost its own write")
	}
}

func TestKernelMessageErrors(t *testing.T) {
	c := client(t)
	p := newPool(t, c, 64<<20, 0, ThinPoolFeatures{})
	if err := c.Message(p.info.Dev, CreateThin{5}); err != nil {
		t.Fatal(err)
	}
	err := c.Message(p.info.Dev, CreateThin{5})
	if !errors.Is(err, unix.EEXIST) {
		t.Fatalf("duplicate id: %v, want EEXIST", err)
	}
	var dmErr *Error
	if !errors.As(err, &dmErr) || dmErr.Device != p.info.Dev.String() || dmErr.Op != `message "create_thin 5"` {
		t.Errorf("error does not name the operation and device: %#v", err)
	}
	t.Logf("duplicate id error reads: %v", err)
	if err := c.Message(p.info.Dev, CreateSnap{DeviceID: 6, OriginID: 77}); !errors.Is(err, unix.ENODATA) {
		t.Errorf("snapshot of a missing origin: %v, want ENODATA", err)
	}
	if err := c.Message(p.info.Dev, Delete{77}); !errors.Is(err, unix.ENODATA) {
		t.Errorf("delete of a missing id: %v, want ENODATA", err)
	}

	// An open (active) thin device cannot be deleted.
	info, _ := p.activate(t, 5, 2048)
	if err := c.Message(p.info.Dev, Delete{5}); !errors.Is(err, unix.EBUSY) {
		t.Fatalf("delete of an active device: %v, want EBUSY", err)
	}
	if err := c.Remove(info.Dev, false); err != nil {
		t.Fatal(err)
	}
	if err := c.Message(p.info.Dev, Delete{5}); err != nil {
		t.Fatalf("delete after deactivation: %v", err)
	}
	if err := c.Message(p.info.Dev, Delete{5}); !errors.Is(err, unix.ENODATA) {
		t.Errorf("second delete: %v, want ENODATA", err)
	}
	// Operations on a device that does not exist.
	if _, err := c.Info(MakeDev(p.info.Dev.Major(), 1<<19)); !errors.Is(err, unix.ENXIO) {
		t.Errorf("info of a missing device: %v, want ENXIO", err)
	}
	if _, err := c.InfoByName("no-such-device"); !errors.Is(err, unix.ENXIO) {
		t.Errorf("info by a missing name: %v, want ENXIO", err)
	}
	// Bad input never reaches the kernel.
	if _, err := c.Create("x", "not-ours"); !errors.Is(err, ErrInvalid) {
		t.Errorf("create without the uuid prefix: %v", err)
	}
	if err := c.Load(p.info.Dev, nil); !errors.Is(err, ErrInvalid) {
		t.Errorf("empty table: %v", err)
	}
	if _, err := c.Create(p.info.Name, UUIDPrefix+"other"); !errors.Is(err, unix.EBUSY) {
		t.Errorf("create with a taken name: %v, want EBUSY", err)
	}
}

func TestKernelSetTransactionID(t *testing.T) {
	c := client(t)
	p := newPool(t, c, 64<<20, 0, ThinPoolFeatures{})
	if tid := p.status(t).TransactionID; tid != 0 {
		t.Fatalf("new pool transaction id %d", tid)
	}
	if err := c.Message(p.info.Dev, SetTransactionID{0, 1}); err != nil {
		t.Fatal(err)
	}
	if err := c.Message(p.info.Dev, SetTransactionID{0, 2}); !errors.Is(err, unix.EINVAL) {
		t.Fatalf("stale compare: %v, want EINVAL", err)
	}
	if tid := p.status(t).TransactionID; tid != 1 {
		t.Fatalf("transaction id %d after a failed swap, want 1", tid)
	}
	if err := c.Message(p.info.Dev, SetTransactionID{1, 2}); err != nil {
		t.Fatal(err)
	}
	if tid := p.status(t).TransactionID; tid != 2 {
		t.Fatalf("transaction id %d, want 2", tid)
	}
}

func TestKernelDeferredRemove(t *testing.T) {
	c := client(t)
	p := newPool(t, c, 64<<20, 0, ThinPoolFeatures{})
	if err := c.Message(p.info.Dev, CreateThin{1}); err != nil {
		t.Fatal(err)
	}
	info, path := p.activate(t, 1, 2048)
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	if err := c.Remove(info.Dev, false); !errors.Is(err, unix.EBUSY) {
		t.Fatalf("remove of an open device: %v, want EBUSY", err)
	}
	if err := c.Remove(info.Dev, true); err != nil {
		t.Fatalf("deferred remove: %v", err)
	}
	i, err := c.Info(info.Dev)
	if err != nil || !i.DeferredRemove || i.OpenCount != 1 {
		t.Fatalf("after deferred remove: %+v, %v", i, err)
	}
	// Cancel, and the device survives its last close.
	if err := c.CancelDeferredRemove(info.Dev); err != nil {
		t.Fatal(err)
	}
	if i, _ := c.Info(info.Dev); i.DeferredRemove {
		t.Fatal("deferred remove still pending after cancel")
	}
	if err := c.CancelDeferredRemove(info.Dev); err != nil {
		t.Errorf("cancel with nothing pending: %v", err)
	}
	if err := c.Remove(info.Dev, true); err != nil {
		t.Fatal(err)
	}
	f.Close()
	// The kernel removes it from a work queue after the last close.
	deadline := time.Now().Add(10 * time.Second)
	for {
		_, err := c.Info(info.Dev)
		if errors.Is(err, unix.ENXIO) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("device still there after its last close: %v", err)
		}
		time.Sleep(10 * time.Millisecond)
	}
	// A deferred remove of a closed device is immediate.
	info2, _ := p.activate(t, 1, 2048)
	if err := c.Remove(info2.Dev, true); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Info(info2.Dev); !errors.Is(err, unix.ENXIO) {
		t.Errorf("closed device not removed at once: %v", err)
	}
}

func TestKernelList500(t *testing.T) {
	c := client(t)
	const n = 500
	prefix := uniq("list")
	want := map[string]Dev{}
	for i := 0; i < n; i++ {
		name := fmt.Sprintf("%s-%03d", prefix, i)
		info, err := c.Create(name, UUIDPrefix+name)
		if err != nil {
			t.Fatal(err)
		}
		want[name] = info.Dev
		t.Cleanup(func() { removeRetry(t, c, info.Dev) })
	}
	list, err := c.List() // starts with a 16 KiB buffer: 500 entries need more
	if err != nil {
		t.Fatal(err)
	}
	got := 0
	for _, e := range list {
		dev, ok := want[e.Name]
		if !ok {
			continue
		}
		got++
		if e.Dev != dev || e.UUID != UUIDPrefix+e.Name {
			t.Errorf("entry %+v, want dev %s uuid %s", e, dev, UUIDPrefix+e.Name)
		}
	}
	if got != n {
		t.Fatalf("listed %d of our %d devices (%d in all)", got, n, len(list))
	}
}

func TestKernelPoolStatusFields(t *testing.T) {
	c := client(t)
	const dataBytes = 64 << 20 // 1024 blocks of 64 KiB
	feats := ThinPoolFeatures{NoDiscardPassdown: true, ErrorIfNoSpace: true}
	p := newPool(t, c, dataBytes, 1000, feats)

	// The table reads back as loaded.
	tbl, err := c.Table(p.info.Dev)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("pool table line: %q", tbl[0].Params)
	back, err := ParseThinPoolParams(tbl[0].Params)
	if err != nil || back != p.params || tbl[0].LengthSectors != p.sectors {
		t.Fatalf("table %+v parsed %+v, %v; want %+v", tbl, back, err, p.params)
	}

	st := p.status(t)
	if st.Fail || st.Error || st.TransactionID != 0 || st.UsedDataBlocks != 0 || st.TotalDataBlocks != dataBytes/(blockSectors*SectorSize) ||
		st.TotalMetadataBlocks != (16<<20)/4096 || st.UsedMetadataBlocks == 0 || st.UsedMetadataBlocks >= st.TotalMetadataBlocks ||
		st.HeldMetadataRoot != 0 || st.Mode != PoolReadWrite || st.Discard != NoDiscardPassdown || !st.ErrorIfNoSpace ||
		st.NeedsCheck || st.MetadataLowWatermark == 0 {
		t.Fatalf("fresh pool status %+v", st)
	}

	// Writing five blocks uses five blocks, and passing the low water mark
	// (1000 free of 1024) raises an event that WaitEvent sees.
	if err := c.Message(p.info.Dev, CreateThin{0}); err != nil {
		t.Fatal(err)
	}
	before, err := c.Info(p.info.Dev)
	if err != nil {
		t.Fatal(err)
	}
	_, path := p.activate(t, 0, dataBytes/SectorSize)
	done := make(chan error, 1)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	go func() {
		_, err := c.WaitEvent(ctx, p.info.Dev, before.EventNr)
		done <- err
	}()
	writeAt(t, path, 0, pattern(3, 30*64<<10))
	if err := <-done; err != nil {
		t.Fatalf("no low-water event: %v", err)
	}
	st = p.status(t)
	if st.UsedDataBlocks != 30 {
		t.Errorf("used data blocks %d, want 30", st.UsedDataBlocks)
	}
	// A WaitEvent with nothing happening honours its context.
	after, _ := c.Info(p.info.Dev)
	short, cancel2 := context.WithTimeout(context.Background(), 300*time.Millisecond)
	defer cancel2()
	if _, err := c.WaitEvent(short, p.info.Dev, after.EventNr); !errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("idle wait: %v, want deadline exceeded", err)
	}

	// A held metadata snapshot shows its root.
	if err := c.Message(p.info.Dev, ReserveMetadataSnap{}); err != nil {
		t.Fatal(err)
	}
	if st := p.status(t); st.HeldMetadataRoot == 0 {
		t.Errorf("no held root after reserve_metadata_snap: %+v", st)
	}
	if err := c.Message(p.info.Dev, ReserveMetadataSnap{}); !errors.Is(err, unix.EBUSY) {
		t.Errorf("second reserve: %v, want EBUSY", err)
	}
	if err := c.Message(p.info.Dev, ReleaseMetadataSnap{}); err != nil {
		t.Fatal(err)
	}
	if st := p.status(t); st.HeldMetadataRoot != 0 {
		t.Errorf("held root after release: %+v", st)
	}
}

func TestKernelOutOfDataSpace(t *testing.T) {
	c := client(t)
	const dataBytes = 2 << 20 // 32 blocks
	p := newPool(t, c, dataBytes, 0, ThinPoolFeatures{ErrorIfNoSpace: true})
	if err := c.Message(p.info.Dev, CreateThin{0}); err != nil {
		t.Fatal(err)
	}
	_, path := p.activate(t, 0, 16<<20/SectorSize) // overprovisioned 8x
	f, err := os.OpenFile(path, os.O_WRONLY|unix.O_DIRECT, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	buf, err := unix.Mmap(-1, 0, 64<<10, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_ANON|unix.MAP_PRIVATE)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Munmap(buf)
	copy(buf, pattern(5, len(buf)))
	start := time.Now()
	var werr error
	written := 0
	for off := int64(0); off < 16<<20; off += int64(len(buf)) {
		if _, werr = f.WriteAt(buf, off); werr != nil {
			break
		}
		written++
	}
	if werr == nil {
		t.Fatal("writing 16 MiB into a 2 MiB pool succeeded")
	}
	t.Logf("write failed after %d blocks in %v: %v", written, time.Since(start), werr)
	if written != 32 {
		t.Errorf("wrote %d blocks before the pool filled, want 32", written)
	}
	st := p.status(t)
	if st.Mode != PoolOutOfDataSpace || st.UsedDataBlocks != st.TotalDataBlocks {
		t.Errorf("full pool status %+v", st)
	}
	// Messages still work: a full pool can still delete to free space.
	if err := c.Message(p.info.Dev, CreateThin{1}); err != nil {
		t.Errorf("create_thin on a full pool: %v", err)
	}
}

func TestKernelClearTableAndSuspendFlags(t *testing.T) {
	c := client(t)
	p := newPool(t, c, 64<<20, 0, ThinPoolFeatures{})
	if err := c.Message(p.info.Dev, CreateThin{3}); err != nil {
		t.Fatal(err)
	}
	info, path := p.activate(t, 3, 2048)
	data := pattern(8, 4096)
	writeAt(t, path, 0, data)

	// A loaded but not resumed table is inactive; ClearTable drops it and
	// the live one stays.
	if err := c.Load(info.Dev, []Target{NewTarget(0, 4096, ThinParams{PoolDev: p.info.Dev, DeviceID: 3})}); err != nil {
		t.Fatal(err)
	}
	if i, _ := c.Info(info.Dev); !i.InactiveTable || !i.LiveTable {
		t.Fatalf("after load: %+v", i)
	}
	if err := c.ClearTable(info.Dev); err != nil {
		t.Fatal(err)
	}
	if i, _ := c.Info(info.Dev); i.InactiveTable || !i.LiveTable {
		t.Fatalf("after clear: %+v", i)
	}
	if tbl, _ := c.Table(info.Dev); tbl[0].LengthSectors != 2048 {
		t.Fatalf("live table changed: %+v", tbl)
	}

	// Suspend without flushing or freezing, then resume: data intact.
	if err := c.Suspend(info.Dev, NoFlush|NoLockFS); err != nil {
		t.Fatal(err)
	}
	if i, _ := c.Info(info.Dev); !i.Suspended {
		t.Fatal("not suspended")
	}
	if err := c.Resume(info.Dev); err != nil {
		t.Fatal(err)
	}
	if got := readAt(t, path, 0, len(data)); !bytes.Equal(got, data) {
		t.Fatal("data changed across a no-flush suspend")
	}
	// A new table takes effect at resume: the device grows.
	if err := c.Load(info.Dev, []Target{NewTarget(0, 4096, ThinParams{PoolDev: p.info.Dev, DeviceID: 3})}); err != nil {
		t.Fatal(err)
	}
	if err := c.Resume(info.Dev); err != nil {
		t.Fatal(err)
	}
	if tbl, _ := c.Table(info.Dev); tbl[0].LengthSectors != 4096 {
		t.Fatalf("table after reload: %+v", tbl)
	}
}
