package thinpool

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/csi-dmthin/csi-dmthin/pkg/devmapper"
)

// The kernel contract's dm devices, messages and data path (see
// kernelcontract_test.go).

func kcThinWriteRead(t *testing.T, e env) {
	p := newKCPool(t, e, 256<<20, 0, devmapper.ThinPoolFeatures{ErrorIfNoSpace: true})
	p.message(t, devmapper.CreateThin{DeviceID: 0})
	thin := p.activate(t, 0, 64<<20/devmapper.SectorSize)
	data := pattern(1, 3*kcBlockBytes)
	kcWrite(t, e, thin.Dev, 1<<20, data)
	if got := e.readDev(t, thin.Dev, 1<<20, len(data)); !bytes.Equal(got, data) {
		t.Fatal("read back differs from what was written")
	}
	// An unwritten region of a fresh thin device reads as zeros.
	if got := e.readDev(t, thin.Dev, 8<<20, 4096); !bytes.Equal(got, make([]byte, 4096)) {
		t.Fatal("unwritten region is not zero")
	}
	ts := p.thinStatus(t, thin.Dev)
	if ts.MappedSectors != 3*kcBlockSectors || !ts.HasMapping || ts.HighestMappedSector != (1<<20+3*kcBlockBytes)/devmapper.SectorSize-1 {
		t.Errorf("thin status %+v", ts)
	}
	tbl, err := p.k.Table(thin.Dev)
	if err != nil {
		t.Fatal(err)
	}
	tp, err := devmapper.ParseThinParams(tbl[0].Params)
	if err != nil || tp != (devmapper.ThinParams{PoolDev: p.info.Dev, DeviceID: 0}) || tbl[0].LengthSectors != 64<<20/devmapper.SectorSize {
		t.Errorf("thin table %+v: %+v %v", tbl, tp, err)
	}
	if u := p.status(t).UsedDataBlocks; u != 3 {
		t.Errorf("used data blocks %d, want 3", u)
	}
	// Past the end: ENOSPC, as pwrite on any block device.
	if err := e.writeDev(t, thin.Dev, 64<<20-4096, make([]byte, 8192)); !errors.Is(err, unix.ENOSPC) {
		t.Errorf("write past the end: %v, want ENOSPC", err)
	}
}

func kcSnapshotOfActiveOrigin(t *testing.T, e env) {
	p := newKCPool(t, e, 256<<20, 0, devmapper.ThinPoolFeatures{ErrorIfNoSpace: true})
	const size = 32 << 20
	p.message(t, devmapper.CreateThin{DeviceID: 10})
	origin := p.activate(t, 10, size/devmapper.SectorSize)
	a := pattern(7, 2*kcBlockBytes)
	kcWrite(t, e, origin.Dev, 0, a)

	// The snapshot protocol: suspend the active origin (flushing and
	// freezing it), create the snapshot, resume.
	if err := p.k.Suspend(origin.Dev, 0); err != nil {
		t.Fatal(err)
	}
	if i, _ := p.k.Info(origin.Dev); !i.Suspended {
		t.Error("origin not reported suspended")
	}
	p.message(t, devmapper.CreateSnap{DeviceID: 11, OriginID: 10})
	if err := p.k.Resume(origin.Dev); err != nil {
		t.Fatal(err)
	}
	snap := p.activate(t, 11, size/devmapper.SectorSize)
	if got := e.readDev(t, snap.Dev, 0, len(a)); !bytes.Equal(got, a) {
		t.Fatal("snapshot does not show the origin's data")
	}
	if u := p.status(t).UsedDataBlocks; u != 2 {
		t.Errorf("a snapshot copied blocks: %d used, want 2", u)
	}
	// A partial write to a shared block copies the rest of the block.
	page := pattern(55, 4096)
	kcWrite(t, e, snap.Dev, 4096, page)
	want := append([]byte(nil), a...)
	copy(want[4096:], page)
	if got := e.readDev(t, snap.Dev, 0, len(a)); !bytes.Equal(got, want) {
		t.Fatal("a partial write to a shared block lost the block's other data")
	}
	if got := e.readDev(t, origin.Dev, 0, len(a)); !bytes.Equal(got, a) {
		t.Fatal("snapshot write leaked into the origin")
	}
	if u := p.status(t).UsedDataBlocks; u != 3 {
		t.Errorf("used data blocks %d after breaking one shared block, want 3", u)
	}
	// Later writes to the origin do not leak into the snapshot, and writes
	// to the snapshot do not leak into the origin.
	b := pattern(99, len(a))
	kcWrite(t, e, origin.Dev, 0, b)
	if got := e.readDev(t, snap.Dev, 0, len(a)); !bytes.Equal(got, want) {
		t.Fatal("origin write leaked into the snapshot")
	}
	s := pattern(42, kcBlockBytes)
	kcWrite(t, e, snap.Dev, 1<<20, s)
	if got := e.readDev(t, origin.Dev, 1<<20, len(s)); !bytes.Equal(got, make([]byte, len(s))) {
		t.Fatal("snapshot write leaked into the origin")
	}
	if got := e.readDev(t, origin.Dev, 0, len(b)); !bytes.Equal(got, b) {
		t.Fatal("origin lost its own write")
	}
	// The origin's two blocks are its own now (the one the snapshot no
	// longer shared was freed when the origin wrote it), the snapshot has
	// its copy of block 0, the origin's old block 1 and its block at 1 MiB.
	if u := p.status(t).UsedDataBlocks; u != 5 {
		t.Errorf("used data blocks %d, want 5", u)
	}
	// Deleting the origin frees only what it does not share.
	if err := p.k.Remove(origin.Dev, false); err != nil {
		t.Fatal(err)
	}
	p.message(t, devmapper.Delete{DeviceID: 10})
	if u := p.status(t).UsedDataBlocks; u != 3 {
		t.Errorf("used data blocks %d after deleting the origin, want 3", u)
	}
	if got := e.readDev(t, snap.Dev, 0, len(a)); !bytes.Equal(got, want) {
		t.Fatal("snapshot lost data when its origin was deleted")
	}
}

func kcMessageErrors(t *testing.T, e env) {
	p := newKCPool(t, e, 64<<20, 0, devmapper.ThinPoolFeatures{})
	k := p.k
	p.message(t, devmapper.CreateThin{DeviceID: 5})
	active := p.activate(t, 5, 2048)
	p.message(t, devmapper.CreateThin{DeviceID: 6})
	noTable := kcCreate(t, k, "notable")
	for _, tc := range []struct {
		name    string
		dev     Dev
		m       devmapper.Message
		wantErr error
	}{
		{"duplicate id", p.info.Dev, devmapper.CreateThin{DeviceID: 5}, unix.EEXIST},
		{"snapshot onto a taken id", p.info.Dev, devmapper.CreateSnap{DeviceID: 6, OriginID: 5}, unix.EEXIST},
		{"snapshot of a missing origin", p.info.Dev, devmapper.CreateSnap{DeviceID: 7, OriginID: 77}, unix.ENODATA},
		{"delete of a missing id", p.info.Dev, devmapper.Delete{DeviceID: 77}, unix.ENODATA},
		// An open (active) thin device cannot be deleted.
		{"delete of an active device", p.info.Dev, devmapper.Delete{DeviceID: 5}, unix.EBUSY},
		{"id over 24 bits", p.info.Dev, devmapper.CreateThin{DeviceID: devmapper.MaxDeviceID + 1}, unix.EINVAL},
		{"release without a reserve", p.info.Dev, devmapper.ReleaseMetadataSnap{}, unix.EINVAL},
		{"message to a thin", active.Dev, devmapper.CreateThin{DeviceID: 9}, unix.EINVAL},
		{"message to a device with no table", noTable.Dev, devmapper.CreateThin{DeviceID: 9}, unix.EINVAL},
		{"message to no device", devmapper.MakeDev(p.info.Dev.Major(), 1<<19), devmapper.CreateThin{DeviceID: 9}, unix.ENXIO},
		{"delete of an inactive device", p.info.Dev, devmapper.Delete{DeviceID: 6}, nil},
		{"second delete", p.info.Dev, devmapper.Delete{DeviceID: 6}, unix.ENODATA},
	} {
		t.Run(tc.name, func(t *testing.T) {
			err := k.Message(tc.dev, tc.m)
			if !errors.Is(err, tc.wantErr) || (err == nil) != (tc.wantErr == nil) {
				t.Fatalf("%v: %v, want %v", tc.m, err, tc.wantErr)
			}
			var dmErr *devmapper.Error
			if err != nil && (!errors.As(err, &dmErr) || dmErr.Device != tc.dev.String() || dmErr.Op != "message \""+tc.m.String()+"\"") {
				t.Errorf("error does not name the operation and device: %#v", err)
			}
			t.Logf("%v: %v", tc.m, err)
		})
	}
	// Deactivated, the device can go.
	if err := k.Remove(active.Dev, false); err != nil {
		t.Fatal(err)
	}
	p.message(t, devmapper.Delete{DeviceID: 5})
	if err := k.Message(p.info.Dev, devmapper.Delete{DeviceID: 5}); !errors.Is(err, unix.ENODATA) {
		t.Errorf("second delete: %v, want ENODATA", err)
	}
	// Operations on a device that does not exist.
	if _, err := k.Info(devmapper.MakeDev(p.info.Dev.Major(), 1<<19)); !errors.Is(err, unix.ENXIO) {
		t.Errorf("info of a missing device: %v, want ENXIO", err)
	}
	if _, err := k.InfoByName("no-such-device"); !errors.Is(err, unix.ENXIO) {
		t.Errorf("info by a missing name: %v, want ENXIO", err)
	}
	// Bad input never reaches the kernel.
	if _, err := k.Create("x", "not-ours"); !errors.Is(err, devmapper.ErrInvalid) {
		t.Errorf("create without the uuid prefix: %v", err)
	}
	if err := k.Load(p.info.Dev, nil); !errors.Is(err, devmapper.ErrInvalid) {
		t.Errorf("empty table: %v", err)
	}
	if _, err := k.Create(p.info.Name, devmapper.UUIDPrefix+kcName("other")); !errors.Is(err, unix.EBUSY) {
		t.Errorf("create with a taken name: %v, want EBUSY", err)
	}
	if _, err := k.Create(kcName("other"), p.info.UUID); !errors.Is(err, unix.EBUSY) {
		t.Errorf("create with a taken uuid: %v, want EBUSY", err)
	}
}

// kcSetTransactionID checks set_transaction_id's compare-and-swap, and
// that the id a message sets is in the superblock once it returns (the
// pool commits after every message).
func kcSetTransactionID(t *testing.T, e env) {
	p := newKCPool(t, e, 64<<20, 0, devmapper.ThinPoolFeatures{})
	if tid := p.status(t).TransactionID; tid != 0 {
		t.Fatalf("new pool transaction id %d", tid)
	}
	for i, tc := range []struct {
		cur, next uint64
		wantErr   error
		wantTID   uint64
	}{
		{0, 1, nil, 1},
		{0, 2, unix.EINVAL, 1}, // a stale compare
		{1, 2, nil, 2},
		{2, 2, nil, 2},
		{7, 8, unix.EINVAL, 2},
		{2, 1 << 40, nil, 1 << 40},
	} {
		err := p.k.Message(p.info.Dev, devmapper.SetTransactionID{Current: tc.cur, New: tc.next})
		if !errors.Is(err, tc.wantErr) || (err == nil) != (tc.wantErr == nil) {
			t.Errorf("%d: set_transaction_id %d %d: %v, want %v", i, tc.cur, tc.next, err, tc.wantErr)
		}
		if tid := p.status(t).TransactionID; tid != tc.wantTID {
			t.Errorf("%d: transaction id %d, want %d", i, tid, tc.wantTID)
		}
		if _, sb := p.superblock(t); sb.TransactionID != tc.wantTID {
			t.Errorf("%d: superblock %+v, want transaction id %d", i, sb, tc.wantTID)
		}
	}
}

func kcDeferredRemove(t *testing.T, e env) {
	p := newKCPool(t, e, 64<<20, 0, devmapper.ThinPoolFeatures{})
	k := p.k
	p.message(t, devmapper.CreateThin{DeviceID: 1})
	info := p.activate(t, 1, 2048)
	release := e.holdDev(t, info.Dev)
	if err := k.Remove(info.Dev, false); !errors.Is(err, unix.EBUSY) {
		t.Fatalf("remove of an open device: %v, want EBUSY", err)
	}
	if err := k.Remove(info.Dev, true); err != nil {
		t.Fatalf("deferred remove: %v", err)
	}
	i, err := k.Info(info.Dev)
	if err != nil || !i.DeferredRemove || i.OpenCount != 1 {
		t.Fatalf("after deferred remove: %+v, %v", i, err)
	}
	// Cancel, and the device survives its last close.
	if err := k.CancelDeferredRemove(info.Dev); err != nil {
		t.Fatal(err)
	}
	if i, _ := k.Info(info.Dev); i.DeferredRemove {
		t.Fatal("deferred remove still pending after cancel")
	}
	if err := k.CancelDeferredRemove(info.Dev); err != nil {
		t.Errorf("cancel with nothing pending: %v", err)
	}
	if err := k.Remove(info.Dev, true); err != nil {
		t.Fatal(err)
	}
	release()
	kcGone(t, k, info.Dev)
	// A deferred remove of a closed device is immediate.
	info2 := p.activate(t, 1, 2048)
	if err := k.Remove(info2.Dev, true); err != nil {
		t.Fatal(err)
	}
	if _, err := k.Info(info2.Dev); !errors.Is(err, unix.ENXIO) {
		t.Errorf("closed device not removed at once: %v", err)
	}
	if err := k.CancelDeferredRemove(info2.Dev); !errors.Is(err, unix.ENXIO) {
		t.Errorf("cancel on a removed device: %v, want ENXIO", err)
	}
}

// kcList500 lists more devices than the first buffer holds (16 KiB), made
// in reverse order: the list is in name order.
func kcList500(t *testing.T, e env) {
	k := e.kernel()
	const n = 500
	prefix := kcName("list")
	want := map[string]Dev{}
	for i := range n {
		name := fmt.Sprintf("%s-%03d", prefix, n-1-i)
		info, err := k.Create(name, devmapper.UUIDPrefix+name)
		if err != nil {
			t.Fatal(err)
		}
		want[name] = info.Dev
		t.Cleanup(func() { kcRemove(t, k, info.Dev) })
	}
	list, err := k.List()
	if err != nil {
		t.Fatal(err)
	}
	var ours []devmapper.ListEntry
	for _, le := range list {
		if _, ok := want[le.Name]; ok {
			ours = append(ours, le)
		}
	}
	if len(ours) != n {
		t.Fatalf("listed %d of our %d devices (%d in all)", len(ours), n, len(list))
	}
	for i, le := range ours {
		if le.Name != fmt.Sprintf("%s-%03d", prefix, i) || le.Dev != want[le.Name] || le.UUID != devmapper.UUIDPrefix+le.Name {
			t.Fatalf("entry %d: %+v", i, le)
		}
	}
}

func kcPoolStatusFields(t *testing.T, e env) {
	const dataBytes = 64 << 20 // 1024 blocks of 64 KiB
	feats := devmapper.ThinPoolFeatures{NoDiscardPassdown: true, ErrorIfNoSpace: true}
	p := newKCPool(t, e, dataBytes, 1000, feats)
	k := p.k
	w, ok := k.(EventWaiter)
	if !ok {
		t.Fatalf("%T cannot wait for events", k)
	}

	// The table reads back as loaded.
	tbl, err := k.Table(p.info.Dev)
	if err != nil {
		t.Fatal(err)
	}
	back, err := devmapper.ParseThinPoolParams(tbl[0].Params)
	if err != nil || back != p.params || tbl[0].LengthSectors != p.sectors {
		t.Fatalf("table %+v parsed %+v, %v; want %+v", tbl, back, err, p.params)
	}

	// calc_metadata_threshold: a quarter of the metadata device's blocks,
	// at most 1024.
	st := p.status(t)
	if st.Fail || st.Error || st.TransactionID != 0 || st.UsedDataBlocks != 0 || st.TotalDataBlocks != dataBytes/kcBlockBytes ||
		st.TotalMetadataBlocks != kcMetaBytes/4096 || st.UsedMetadataBlocks == 0 || st.UsedMetadataBlocks >= st.TotalMetadataBlocks ||
		st.HeldMetadataRoot != 0 || st.Mode != devmapper.PoolReadWrite || st.Discard != devmapper.NoDiscardPassdown || !st.ErrorIfNoSpace ||
		st.NeedsCheck || st.MetadataLowWatermark != 1024 {
		t.Fatalf("fresh pool status %+v", st)
	}

	// Writing 30 blocks uses 30 blocks, and passing the low water mark
	// (1000 free of 1024) raises one event, which WaitEvent sees.
	p.message(t, devmapper.CreateThin{DeviceID: 0})
	before, err := k.Info(p.info.Dev)
	if err != nil {
		t.Fatal(err)
	}
	thin := p.activate(t, 0, dataBytes/devmapper.SectorSize)
	kcWrite(t, e, thin.Dev, 0, pattern(3, 30*kcBlockBytes))
	wctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	after, err := w.WaitEvent(wctx, p.info.Dev, before.EventNr)
	if err != nil {
		t.Fatalf("no low-water event: %v", err)
	}
	if after.EventNr != before.EventNr+1 {
		t.Errorf("event nr %d -> %d, want one low-water event", before.EventNr, after.EventNr)
	}
	if u := p.status(t).UsedDataBlocks; u != 30 {
		t.Errorf("used data blocks %d, want 30", u)
	}
	// The mark raises its event once until the pool is resumed.
	kcWrite(t, e, thin.Dev, 30*kcBlockBytes, pattern(4, kcBlockBytes))
	if again, _ := k.Info(p.info.Dev); again.EventNr != after.EventNr {
		t.Errorf("a second low-water event before a resume: event nr %d -> %d", after.EventNr, again.EventNr)
	}
	// A WaitEvent with nothing happening honours its context.
	short, cancel2 := context.WithTimeout(context.Background(), 300*time.Millisecond)
	defer cancel2()
	if _, err := w.WaitEvent(short, p.info.Dev, after.EventNr); !errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("idle wait: %v, want deadline exceeded", err)
	}

	// A held metadata snapshot shows its root; only one may be held.
	p.message(t, devmapper.ReserveMetadataSnap{})
	if st := p.status(t); st.HeldMetadataRoot == 0 {
		t.Errorf("no held root after reserve_metadata_snap: %+v", st)
	}
	if err := k.Message(p.info.Dev, devmapper.ReserveMetadataSnap{}); !errors.Is(err, unix.EBUSY) {
		t.Errorf("second reserve: %v, want EBUSY", err)
	}
	p.message(t, devmapper.ReleaseMetadataSnap{})
	if st := p.status(t); st.HeldMetadataRoot != 0 {
		t.Errorf("held root after release: %+v", st)
	}

	// Linear and error targets report empty status lines; a linear table
	// prints its device as major:minor.
	lin := kcCreate(t, k, "lin")
	if err := k.Load(lin.Dev, []devmapper.Target{
		devmapper.NewTarget(0, 8, devmapper.LinearParams{Dev: p.params.DataDev, OffsetSectors: 8}),
		{StartSector: 8, LengthSectors: 8, Type: "error"},
	}); err != nil {
		t.Fatal(err)
	}
	if err := k.Resume(lin.Dev); err != nil {
		t.Fatal(err)
	}
	ls, err := k.Status(lin.Dev, false)
	if err != nil || len(ls) != 2 || ls[0].Params != "" || ls[1].Type != "error" || ls[1].Params != "" {
		t.Errorf("linear status %+v, %v", ls, err)
	}
	lt, err := k.Table(lin.Dev)
	if err != nil || len(lt) != 2 || lt[0].Params != p.params.DataDev.String()+" 8" || lt[1].Params != "" {
		t.Errorf("linear table %+v, %v", lt, err)
	}
}

// kcOutOfDataSpace fills an overprovisioned pool. With errorIfNoSpace
// (the contract) the write that finds no free block fails with ENOSPC. A
// queue_if_no_space pool would make the kernel hold that write for
// no_space_timeout (60 s) before failing it; the fake fails it at once, and
// runs that variant alone (TestOutOfDataSpaceQueueFake).
func kcOutOfDataSpace(errorIfNoSpace bool) func(t *testing.T, e env) {
	return func(t *testing.T, e env) {
		const dataBytes = 2 << 20 // 32 blocks
		p := newKCPool(t, e, dataBytes, 0, devmapper.ThinPoolFeatures{ErrorIfNoSpace: errorIfNoSpace})
		p.message(t, devmapper.CreateThin{DeviceID: 0})
		thin := p.activate(t, 0, 16<<20/devmapper.SectorSize) // overprovisioned 8x
		block := pattern(5, kcBlockBytes)
		var werr error
		written := 0
		for off := int64(0); off < 16<<20; off += kcBlockBytes {
			if werr = e.writeDev(t, thin.Dev, off, block); werr != nil {
				break
			}
			written++
		}
		if !errors.Is(werr, unix.ENOSPC) || written != 32 {
			t.Fatalf("wrote %d blocks, then %v; want 32, then ENOSPC", written, werr)
		}
		st := p.status(t)
		if st.Mode != devmapper.PoolOutOfDataSpace || st.UsedDataBlocks != st.TotalDataBlocks || st.ErrorIfNoSpace != errorIfNoSpace {
			t.Errorf("full pool status %+v", st)
		}
		// Writes to blocks the thin owns still work.
		kcWrite(t, e, thin.Dev, 0, pattern(6, 4096))
		// Messages still work: a full pool can still delete to free
		// space, and its next commit takes it back to write mode.
		p.message(t, devmapper.CreateThin{DeviceID: 1})
		if err := p.k.Remove(thin.Dev, false); err != nil {
			t.Fatal(err)
		}
		p.message(t, devmapper.Delete{DeviceID: 0})
		if st := p.status(t); st.Mode != devmapper.PoolReadWrite || st.UsedDataBlocks != 0 {
			t.Errorf("after freeing every block: %+v", st)
		}
	}
}
