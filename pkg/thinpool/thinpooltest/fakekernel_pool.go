package thinpooltest

import (
	"fmt"
	"slices"

	"golang.org/x/sys/unix"

	"github.com/csi-dmthin/csi-dmthin/pkg/devmapper"
)

// The FakeKernel's thin-pool target and pool metadata, after dm-thin.c and
// dm-thin-metadata.c.

// fakePoolMode is the pool's mode, in the kernel's order of degradation.
type fakePoolMode int

const (
	fakeModeWrite              fakePoolMode = iota // metadata may change
	fakeModeOutOfDataSpace                         // metadata may change; no block can be allocated
	fakeModeOutOfMetadataSpace                     // reported as ro
	fakeModeReadOnly                               // metadata may not change
	fakeModeFail                                   // all I/O fails
)

// fakePool is the kernel's pool object: made by the first pool table on a
// pool device, shared by the thins on it, gone with the last table that
// refers to it.
type fakePool struct {
	md               devmapper.Dev // the pool's dm device
	metaDev, dataDev devmapper.Dev
	metaSt, dataSt   *fakeStore
	meta             *fakeMeta
	mode             fakePoolMode
	// suspended: from creation until the first resume, and while the pool
	// device is suspended. Thins cannot be loaded then.
	suspended bool
	// bound is the pool target in control (bound at resume, as
	// bind_control_target does): its features are the pool's.
	bound             *fakeTarget
	discardEnabled    bool
	lowWaterTriggered bool
	metaFreeLast      uint64 // free metadata blocks at the last commit, for the threshold event
}

// fakeMeta is a pool's metadata as its metadata device holds it.
type fakeMeta struct {
	tid          uint64
	blockSectors uint32
	dataBlocks   uint64 // the data space map's size
	metaBlocks   uint64 // metadata_nr_blocks
	needsCheck   bool
	heldRoot     uint64
	thins        map[uint32]*fakeThin
	refs         map[uint64]uint32 // data block -> reference count
	cursor       uint64            // where the next allocation looks first
}

// fakeThin is one thin device: its mapping from virtual to data blocks.
type fakeThin struct {
	blocks map[uint64]uint64
}

func newFakeMeta(blockSectors uint32) *fakeMeta {
	return &fakeMeta{blockSectors: blockSectors, thins: map[uint32]*fakeThin{}, refs: map[uint64]uint32{}}
}

// Metadata use is modelled, not computed from btrees: a fixed overhead, a
// block per thin device, one per 64 data blocks in use and one for a held
// metadata snapshot.
const (
	fakeMetaBaseBlocks       = 16
	fakeMetaMinBlocks        = 2 * fakeMetaBaseBlocks // smaller devices do not format
	fakeMappingsPerMetaBlock = 64
	// fakeMetaMaxBlocks is the most the kernel uses of a metadata device
	// (DM_SM_METADATA_MAX_BLOCKS); the rest is ignored.
	fakeMetaMaxBlocks = 255 * ((1 << 14) - 64)
)

func (m *fakeMeta) usedMetaBlocks(extraThins, extraData uint64) uint64 {
	u := fakeMetaBaseBlocks + uint64(len(m.thins)) + extraThins +
		(uint64(len(m.refs))+extraData+fakeMappingsPerMetaBlock-1)/fakeMappingsPerMetaBlock
	if m.heldRoot != 0 {
		u++
	}
	return u
}

func (m *fakeMeta) freeMetaBlocks() uint64 {
	return m.metaBlocks - min(m.usedMetaBlocks(0, 0), m.metaBlocks)
}

func (m *fakeMeta) freeDataBlocks() uint64 { return m.dataBlocks - uint64(len(m.refs)) }

func (m *fakeMeta) unref(b uint64) {
	if m.refs[b]--; m.refs[b] == 0 {
		delete(m.refs, b)
	}
}

func fakeMetaDevBlocks(sizeBytes int64) uint64 {
	return min(uint64(sizeBytes)/(devmapper.MetadataBlockSectors*devmapper.SectorSize), fakeMetaMaxBlocks)
}

// fakeMetaThreshold is the free-metadata level under which the pool raises an
// event and that its status reports (calc_metadata_threshold).
func fakeMetaThreshold(metaDevBytes int64) uint64 {
	return min(1024, fakeMetaDevBlocks(metaDevBytes)/4)
}

// fakeSBVersion is the metadata format version the kernel writes.
const fakeSBVersion = 2

// fakeWriteSuperblock writes the superblock of m into block 0 of st, as a
// metadata commit does, in the layout pkg/devmapper defines. The btree
// roots stay zero (the fake writes btrees only for a held snapshot, see
// fakekernel_metasnap.go); the used metadata blocks and the held root are
// the fake's model (see FakeKernel), not the kernel's numbers.
func fakeWriteSuperblock(st *fakeStore, m *fakeMeta) {
	b := make([]byte, devmapper.SuperblockBytes)
	fakeSuperblock(m).Put(b)
	st.pages[0] = b
}

// fakeSuperblock is the superblock of m.
func fakeSuperblock(m *fakeMeta) devmapper.Superblock {
	return devmapper.Superblock{
		NeedsCheck:           m.needsCheck,
		Version:              fakeSBVersion,
		TransactionID:        m.tid,
		HeldRoot:             m.heldRoot,
		DataSpaceMap:         devmapper.SpaceMapCounts{NrBlocks: m.dataBlocks, NrAllocated: uint64(len(m.refs))},
		MetadataSpaceMap:     devmapper.SpaceMapCounts{NrBlocks: m.metaBlocks, NrAllocated: m.usedMetaBlocks(0, 0)},
		DataBlockSectors:     m.blockSectors,
		MetadataBlockSectors: devmapper.MetadataBlockSectors,
		MetadataNrBlocks:     m.metaBlocks,
	}
}

// fakeOpenMeta opens the pool metadata on st, formatting a device whose first
// block is all zeros (__open_or_format_metadata). Metadata the fake does not
// hold already (a superblock written by a test) is taken as a pool with no
// thin devices.
func fakeOpenMeta(st *fakeStore, blockSectors uint32, readOnly bool) (*fakeMeta, error) {
	buf := make([]byte, devmapper.SuperblockBytes)
	st.read(0, buf)
	if !slices.ContainsFunc(buf, func(c byte) bool { return c != 0 }) {
		if readOnly {
			return nil, fakeErrno(unix.EPERM, "metadata device is unformatted and the pool is read-only")
		}
		blocks := fakeMetaDevBlocks(st.sizeBytes)
		if blocks < fakeMetaMinBlocks {
			return nil, fakeErrno(unix.ENOSPC, fmt.Sprintf("metadata device of %d blocks is too small", blocks))
		}
		m := newFakeMeta(blockSectors)
		m.metaBlocks = blocks
		st.meta = m
		fakeWriteSuperblock(st, m)
		return m, nil
	}
	sb, ok, err := devmapper.ParseSuperblock(buf)
	if err != nil || !ok {
		return nil, fakeErrno(unix.EILSEQ, "superblock check failed: bad magic")
	}
	if bs := sb.DataBlockSectors; bs != blockSectors {
		return nil, fakeErrno(unix.EINVAL, fmt.Sprintf("changing the data block size (from %d to %d) is not supported", bs, blockSectors))
	}
	m := st.meta
	if m == nil || m.blockSectors != blockSectors {
		m = newFakeMeta(blockSectors)
		st.meta = m
	}
	// The image is the truth for what it holds, so a test can change it.
	m.tid = sb.TransactionID
	m.needsCheck = sb.NeedsCheck
	m.heldRoot = sb.HeldRoot
	m.dataBlocks = max(sb.DataSpaceMap.NrBlocks, m.dataBlocks)
	m.metaBlocks = sb.MetadataNrBlocks
	m.cursor = 0 // the allocator's hint is in-core only
	return m, nil
}

// constructPool is pool_ctr.
func (f *FakeKernel) constructPool(d *fakeDM, t devmapper.Target) (*fakeTarget, error) {
	p, err := devmapper.ParseThinPoolParams(t.Params)
	if err != nil {
		return nil, fakeErrno(unix.EINVAL, err.Error())
	}
	if p.MetadataDev == p.DataDev {
		return nil, fakeErrno(unix.EINVAL, "error setting metadata or data device")
	}
	for _, dev := range []devmapper.Dev{p.MetadataDev, p.DataDev} {
		if f.blocks[dev] == nil {
			why := "no such block device"
			if f.dms[dev] != nil {
				why = "the fake keeps pool metadata and data on disks and loop devices only, not on dm devices"
			}
			return nil, fakeErrno(unix.ENXIO, fmt.Sprintf("opening %s: %s", dev, why))
		}
	}
	if err := p.Validate(); err != nil {
		return nil, fakeErrno(unix.EINVAL, err.Error())
	}
	po, created, err := f.findPool(d.dev, p)
	if err != nil {
		return nil, err
	}
	if !created && !p.Features.IgnoreDiscard != po.discardEnabled {
		return nil, fakeErrno(unix.EINVAL, "discard support cannot be disabled once enabled")
	}
	mode := fakeModeWrite
	if p.Features.ReadOnly {
		mode = fakeModeReadOnly
	}
	return &fakeTarget{Target: devmapper.NewTarget(t.StartSector, t.LengthSectors, p), poolParams: &p, pool: po, mode: mode}, nil
}

// findPool is __pool_find: the pool object already on this metadata device
// or this pool device, or a new one.
func (f *FakeKernel) findPool(md devmapper.Dev, p devmapper.ThinPoolParams) (*fakePool, bool, error) {
	for _, po := range f.pools {
		if po.metaDev == p.MetadataDev {
			switch {
			case po.md != md:
				return nil, false, fakeErrno(unix.EBUSY, "metadata device already in use by a pool")
			case po.dataDev != p.DataDev:
				return nil, false, fakeErrno(unix.EBUSY, "data device already in use by a pool")
			}
			return po, false, nil
		}
	}
	if f.pools[md] != nil {
		return nil, false, fakeErrno(unix.EINVAL, "different pool cannot replace a pool")
	}
	metaB, dataB := f.blocks[p.MetadataDev], f.blocks[p.DataDev]
	m, err := fakeOpenMeta(metaB.st, p.BlockSectors, p.Features.ReadOnly)
	if err != nil {
		return nil, false, err
	}
	po := &fakePool{
		md: md, metaDev: p.MetadataDev, dataDev: p.DataDev, metaSt: metaB.st, dataSt: dataB.st, meta: m,
		mode: fakeModeWrite, suspended: true, discardEnabled: true, metaFreeLast: m.freeMetaBlocks(),
	}
	f.pools[md] = po
	return po, true, nil
}

// constructThin is thin_ctr, with its checks in its order.
func (f *FakeKernel) constructThin(t devmapper.Target) (*fakeTarget, error) {
	p, err := devmapper.ParseThinParams(t.Params)
	if err != nil {
		return nil, fakeErrno(unix.EINVAL, err.Error())
	}
	if p.ExternalOrigin != 0 {
		if p.ExternalOrigin == p.PoolDev {
			return nil, fakeErrno(unix.EINVAL, "error setting origin device")
		}
		if !f.exists(p.ExternalOrigin) {
			return nil, fakeErrno(unix.ENXIO, "error opening origin device")
		}
	}
	if !f.exists(p.PoolDev) {
		return nil, fakeErrno(unix.ENXIO, "error opening pool device")
	}
	if f.dms[p.PoolDev] == nil {
		return nil, fakeErrno(unix.EINVAL, "couldn't get pool mapped device")
	}
	po := f.pools[p.PoolDev]
	switch {
	case po == nil:
		return nil, fakeErrno(unix.EINVAL, "couldn't find pool object")
	case po.mode == fakeModeFail:
		return nil, fakeErrno(unix.EINVAL, "couldn't open thin device, pool is in fail mode")
	case po.meta.thins[p.DeviceID] == nil:
		return nil, fakeErrno(unix.ENODATA, fmt.Sprintf("couldn't open thin internal device %d", p.DeviceID))
	case po.suspended:
		return nil, fakeErrno(unix.EINVAL, "unable to activate thin device while pool is suspended")
	}
	return &fakeTarget{Target: devmapper.NewTarget(t.StartSector, t.LengthSectors, p), thin: &p, pool: po}, nil
}

// poolPreresume is pool_preresume: bind the target, then grow the pool to
// the table's length and to its metadata device's size.
func (f *FakeKernel) poolPreresume(t *fakeTarget) error {
	po, m := t.pool, t.pool.meta
	po.bound = t
	po.discardEnabled = !t.poolParams.Features.IgnoreDiscard
	f.setPoolMode(po, t.mode)

	var err error
	grew := false
	blocks := t.LengthSectors / uint64(m.blockSectors)
	switch {
	case blocks < m.dataBlocks:
		err = fakeErrno(unix.EINVAL, fmt.Sprintf("pool target (%d blocks) too small: expected %d", blocks, m.dataBlocks))
	case blocks > m.dataBlocks && !m.needsCheck:
		m.dataBlocks, grew = blocks, true
	}
	if mb := fakeMetaDevBlocks(po.metaSt.sizeBytes); err == nil {
		switch {
		case mb < m.metaBlocks:
			err = fakeErrno(unix.EINVAL, fmt.Sprintf("metadata device (%d blocks) too small: expected %d", mb, m.metaBlocks))
		case mb > m.metaBlocks && !m.needsCheck:
			if po.mode == fakeModeOutOfMetadataSpace {
				f.setPoolMode(po, fakeModeWrite)
			}
			m.metaBlocks, grew = mb, true
		}
	}
	if grew {
		f.commit(po)
	}
	if err != nil && po.mode == fakeModeFail {
		err = nil // a failed pool resumes anyway, to flush its I/O
	}
	return err
}

// setPoolMode is set_pool_mode: a pool that needs a check never goes back
// to write mode, and a failed pool never leaves fail mode. A change raises
// an event.
func (f *FakeKernel) setPoolMode(po *fakePool, mode fakePoolMode) {
	old := po.mode
	if mode == fakeModeWrite && po.meta.needsCheck {
		if old != mode {
			mode = old
		} else {
			mode = fakeModeReadOnly
		}
	}
	if old == fakeModeFail {
		mode = fakeModeFail
	}
	po.mode = mode
	if po.bound != nil {
		po.bound.mode = mode
	}
	if old != mode {
		f.event(po.md)
	}
}

// commit is the pool's metadata commit: the superblock image is rewritten,
// and the pool's mode follows its free space (check_for_metadata_space,
// check_for_data_space). A read-only pool does not commit.
func (f *FakeKernel) commit(po *fakePool) {
	if po.mode >= fakeModeOutOfMetadataSpace {
		return
	}
	m := po.meta
	free := m.freeMetaBlocks()
	if free == 0 {
		f.setPoolMode(po, fakeModeOutOfMetadataSpace)
	}
	if po.mode == fakeModeOutOfDataSpace && m.freeDataBlocks() > 0 {
		f.setPoolMode(po, fakeModeWrite)
	}
	if thr := fakeMetaThreshold(po.metaSt.sizeBytes); free <= thr && po.metaFreeLast > thr {
		f.event(po.md)
	}
	po.metaFreeLast = free
	fakeWriteSuperblock(po.metaSt, m)
}

// poolMessage is pool_message and the metadata operations behind it.
func (f *FakeKernel) poolMessage(po *fakePool, msg devmapper.Message) error {
	if po.mode >= fakeModeOutOfMetadataSpace {
		// Not EINVAL: dm-thin.c answers EOPNOTSUPP here.
		return fakeErrno(unix.EOPNOTSUPP, "unable to service pool target messages in READ_ONLY or FAIL mode")
	}
	m := po.meta
	badID := func(ids ...uint32) error {
		for _, id := range ids {
			if id > devmapper.MaxDeviceID {
				return fakeErrno(unix.EINVAL, fmt.Sprintf("invalid device id %d", id))
			}
		}
		return nil
	}
	switch msg := msg.(type) {
	case devmapper.CreateThin:
		if err := badID(msg.DeviceID); err != nil {
			return err
		}
		if m.thins[msg.DeviceID] != nil {
			return fakeErrno(unix.EEXIST, fmt.Sprintf("thin device %d exists", msg.DeviceID))
		}
		if m.usedMetaBlocks(1, 0) > m.metaBlocks {
			return fakeErrno(unix.ENOSPC, "out of metadata space")
		}
		m.thins[msg.DeviceID] = &fakeThin{blocks: map[uint64]uint64{}}
	case devmapper.CreateSnap:
		if err := badID(msg.DeviceID, msg.OriginID); err != nil {
			return err
		}
		if m.thins[msg.DeviceID] != nil {
			return fakeErrno(unix.EEXIST, fmt.Sprintf("thin device %d exists", msg.DeviceID))
		}
		origin := m.thins[msg.OriginID]
		if origin == nil {
			return fakeErrno(unix.ENODATA, fmt.Sprintf("no origin thin device %d", msg.OriginID))
		}
		if m.usedMetaBlocks(1, 0) > m.metaBlocks {
			return fakeErrno(unix.ENOSPC, "out of metadata space")
		}
		snap := &fakeThin{blocks: make(map[uint64]uint64, len(origin.blocks))}
		for vb, db := range origin.blocks {
			snap.blocks[vb] = db
			m.refs[db]++
		}
		m.thins[msg.DeviceID] = snap
	case devmapper.Delete:
		if err := badID(msg.DeviceID); err != nil {
			return err
		}
		th := m.thins[msg.DeviceID]
		if th == nil {
			return fakeErrno(unix.ENODATA, fmt.Sprintf("no thin device %d", msg.DeviceID))
		}
		if f.thinOpen(m, msg.DeviceID) {
			return fakeErrno(unix.EBUSY, fmt.Sprintf("thin device %d is open", msg.DeviceID))
		}
		for _, db := range th.blocks {
			m.unref(db)
		}
		delete(m.thins, msg.DeviceID)
	case devmapper.SetTransactionID:
		if msg.Current != m.tid {
			return fakeErrno(unix.EINVAL, fmt.Sprintf("mismatched transaction id: pool has %d", m.tid))
		}
		m.tid = msg.New
	case devmapper.ReserveMetadataSnap:
		f.commit(po)
		if m.heldRoot != 0 {
			return fakeErrno(unix.EBUSY, "pool metadata snapshot already exists")
		}
		root, err := fakeWriteMetadataSnap(po.metaSt, m)
		if err != nil {
			return err
		}
		m.heldRoot = root
	case devmapper.ReleaseMetadataSnap:
		if m.heldRoot == 0 {
			return fakeErrno(unix.EINVAL, "no pool metadata snapshot found")
		}
		m.heldRoot = 0
	default:
		return fakeErrno(unix.EINVAL, "unrecognised thin pool target message")
	}
	f.commit(po)
	return nil
}

// thinOpen reports whether a loaded table (live or not) maps thin id of m:
// the kernel refuses to delete an open thin device.
func (f *FakeKernel) thinOpen(m *fakeMeta, id uint32) bool {
	for _, d := range f.dms {
		for _, t := range slices.Concat(d.live, d.inactive) {
			if t.thin != nil && t.thin.DeviceID == id && t.pool.meta == m {
				return true
			}
		}
	}
	return false
}

// poolStatus is pool_status.
func (f *FakeKernel) poolStatus(t *fakeTarget) devmapper.ThinPoolStatus {
	po, m := t.pool, t.pool.meta
	if po.mode == fakeModeFail {
		return devmapper.ThinPoolStatus{Fail: true}
	}
	feats := t.poolParams.Features
	if po.bound != nil {
		feats = po.bound.poolParams.Features
	}
	st := devmapper.ThinPoolStatus{
		TransactionID:        m.tid,
		UsedMetadataBlocks:   min(m.usedMetaBlocks(0, 0), m.metaBlocks),
		TotalMetadataBlocks:  m.metaBlocks,
		UsedDataBlocks:       uint64(len(m.refs)),
		TotalDataBlocks:      m.dataBlocks,
		HeldMetadataRoot:     m.heldRoot,
		Mode:                 devmapper.PoolReadWrite,
		Discard:              devmapper.DiscardPassdown,
		ErrorIfNoSpace:       feats.ErrorIfNoSpace,
		NeedsCheck:           m.needsCheck,
		MetadataLowWatermark: fakeMetaThreshold(po.metaSt.sizeBytes),
	}
	switch po.mode {
	case fakeModeOutOfDataSpace:
		st.Mode = devmapper.PoolOutOfDataSpace
	case fakeModeOutOfMetadataSpace, fakeModeReadOnly:
		st.Mode = devmapper.PoolReadOnly
	}
	switch {
	case !po.discardEnabled:
		st.Discard = devmapper.IgnoreDiscard
	case feats.NoDiscardPassdown:
		st.Discard = devmapper.NoDiscardPassdown
	}
	return st
}

// thinStatus is thin_status.
func (f *FakeKernel) thinStatus(t *fakeTarget) devmapper.ThinStatus {
	if t.pool.mode == fakeModeFail {
		return devmapper.ThinStatus{Fail: true}
	}
	th := t.pool.meta.thins[t.thin.DeviceID]
	if th == nil {
		return devmapper.ThinStatus{Missing: true}
	}
	bs := uint64(t.pool.meta.blockSectors)
	st := devmapper.ThinStatus{MappedSectors: uint64(len(th.blocks)) * bs}
	for vb := range th.blocks {
		if hi := (vb+1)*bs - 1; !st.HasMapping || hi > st.HighestMappedSector {
			st.HighestMappedSector, st.HasMapping = hi, true
		}
	}
	return st
}

// poolFor finds a pool object by its pool device or its metadata device.
func (f *FakeKernel) poolFor(dev devmapper.Dev) *fakePool {
	if po := f.pools[dev]; po != nil {
		return po
	}
	for _, po := range f.pools {
		if po.metaDev == dev {
			return po
		}
	}
	return nil
}

// FailPool puts the pool on pool device dev in fail mode, as a metadata
// error the kernel cannot roll back does: its status reads "Fail", its thins
// fail all I/O and it refuses messages and new thin tables until it is
// removed (or the kernel rebooted). The metadata is not changed.
func (f *FakeKernel) FailPool(dev devmapper.Dev) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	po := f.poolFor(dev)
	if po == nil {
		return fmt.Errorf("fail pool %s: %w", dev, f.notPool(dev))
	}
	f.setPoolMode(po, fakeModeFail)
	return nil
}

// SetNeedsCheck sets the needs_check flag in a pool's metadata, as the
// kernel does after a metadata error: a running pool goes read-only and
// refuses messages, and a pool loaded later on the same metadata comes up
// read-only, until the flag is cleared offline (thin_check). dev is the pool
// device or the metadata device.
func (f *FakeKernel) SetNeedsCheck(dev devmapper.Dev) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if po := f.poolFor(dev); po != nil {
		po.meta.needsCheck = true
		fakeWriteSuperblock(po.metaSt, po.meta)
		f.setPoolMode(po, fakeModeReadOnly)
		return nil
	}
	if b := f.blocks[dev]; b != nil && b.st.meta != nil {
		b.st.meta.needsCheck = true
		fakeWriteSuperblock(b.st, b.st.meta)
		return nil
	}
	return fmt.Errorf("set needs_check on %s: %w", dev, f.notPool(dev))
}

func (f *FakeKernel) notPool(dev devmapper.Dev) error {
	if f.exists(dev) {
		return fakeErrno(unix.EINVAL, "not a thin-pool")
	}
	return unix.ENXIO
}

// ThinIDs lists the thin device ids in a pool's metadata, in order. dev is
// the pool device or the metadata device (which keeps them over a Reboot);
// nil for anything else.
func (f *FakeKernel) ThinIDs(dev devmapper.Dev) []uint32 {
	f.mu.Lock()
	defer f.mu.Unlock()
	var m *fakeMeta
	if po := f.poolFor(dev); po != nil {
		m = po.meta
	} else if b := f.blocks[dev]; b != nil {
		m = b.st.meta
	}
	if m == nil {
		return nil
	}
	ids := make([]uint32, 0, len(m.thins))
	for id := range m.thins {
		ids = append(ids, id)
	}
	slices.Sort(ids)
	return ids
}
