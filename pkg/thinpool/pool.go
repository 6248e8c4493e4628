package thinpool

import (
	"context"
	"crypto/rand"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"

	"github.com/csi-dmthin/csi-dmthin/pkg/devmapper"
)

// Pool is one open thin pool. Its methods are safe for concurrent use: pool
// messages and commits are serialised by one lock, operations on one volume
// by a per-volume lock, and work on different volumes is otherwise
// concurrent.
type Pool struct {
	cfg Config
	k   Kernel
	rec poolRecord
	dev devmapper.Dev // the pool's dm device

	// mu serialises pool messages and commits and guards the fields below.
	// The fields are a copy of what the records hold: each is changed only
	// after the records say so (persist first, then memory).
	mu       sync.Mutex
	st       records
	tid      uint64
	nextID   uint32
	suspects []uint32
	vols     map[string]*Volume // changed only through putVol, removeVol and setVols
	sums     recSums            // of vols
	closed   bool
	// fenced, when set, is why the pool refuses changes: a step failed
	// after the kernel or the records had taken part of a change, and the
	// in-process recovery that followed did not finish. Every change tries
	// the recovery again first (unfence).
	fenced error
	// recordsSuspect: a records write failed since the last rewrite, so
	// recovery rewrites them whole.
	recordsSuspect bool
	// recovering: unfence is recovering; publish waits for its outcome.
	recovering bool
	// suspending holds the origins that snapshots in progress suspended
	// outside p.mu; a recovery meanwhile resumes every other device.
	suspending map[devmapper.Dev]bool

	volLocks keyedMutex
	// metaSnapMu serialises MappedExtents: a pool holds one metadata
	// snapshot at a time. It is never taken with mu held.
	metaSnapMu sync.Mutex

	// view is what Usage reads without p.mu: the records' sums, the fence
	// and whether the pool is closed, published under p.mu at each change
	// of them (publish).
	view atomic.Pointer[usageView]

	// hook, when set by a test, is called at every step boundary of every
	// operation with the step's name: the crash-injection point.
	hook func(point string)
}

// Option configures Open.
type Option func(*Pool)

// dm names and UUIDs. Every dm UUID of the pool starts with
// devmapper.UUIDPrefix + identity + "-".
func (p *Pool) poolDMName() string        { return "dmthin-" + p.cfg.Name }
func (p *Pool) volDMName(n string) string { return "dmthin-" + p.cfg.Name + "-" + n }
func (p *Pool) uuidPrefix() string        { return devmapper.UUIDPrefix + p.rec.Identity + "-" }
func (p *Pool) volUUID(id uint32) string {
	return p.uuidPrefix() + strconv.FormatUint(uint64(id), 10)
}

func (p *Pool) step(point string) {
	if p.hook != nil {
		p.hook(point)
	}
}

// Open opens the pool that cfg describes, creating it if its records do not
// exist yet, and recovers whatever a crash or a reboot left: see the package
// documentation. It refuses (ErrMismatch) a configuration or a metadata
// device that disagrees with the records, and (ErrForeignChange) a pool that
// another program changed.
func Open(ctx context.Context, cfg Config, k Kernel, opts ...Option) (*Pool, error) {
	if err := cfg.validate(); err != nil {
		return nil, err
	}
	if err := os.MkdirAll(cfg.StateDir, 0o700); err != nil {
		return nil, fmt.Errorf("pool %s: state directory: %w", cfg.Name, err)
	}
	st, err := openStore(filepath.Join(cfg.StateDir, cfg.Name+".db"))
	if err != nil {
		return nil, fmt.Errorf("pool %s: %w", cfg.Name, err)
	}
	p := &Pool{cfg: cfg, k: k, st: st, suspending: map[devmapper.Dev]bool{}}
	for _, o := range opts {
		o(p)
	}
	if err := p.open(ctx); err != nil {
		p.st.close()
		return nil, fmt.Errorf("pool %s: %w", cfg.Name, err)
	}
	p.mu.Lock()
	p.publish() // the pool's record (its block size) came after the volumes'
	p.mu.Unlock()
	return p, nil
}

func (p *Pool) open(ctx context.Context) error {
	s, err := p.st.load()
	if err != nil {
		return err
	}
	p.setVols(s.volumes)
	p.tid, p.nextID, p.suspects = s.tid, s.nextID, s.suspects
	if s.pool == nil || s.tid == 0 {
		// No pool yet, or a creation that did not finish (no volume can
		// exist before the first transaction id is committed).
		return p.create(s.pool)
	}
	p.rec = *s.pool
	if err := p.checkConfig(); err != nil {
		return err
	}
	if err := p.activatePool(s.intent); err != nil {
		return err
	}
	if err := p.recover(s.intent); err != nil {
		return err
	}
	if err := p.reconcile(ctx); err != nil {
		return err
	}
	return p.ensureMarker()
}

// recordSerials fills in rec's device serials where they are missing.
func (p *Pool) recordSerials(rec *poolRecord) error {
	if rec.DataSerial != "" && rec.MetadataSerial != "" {
		return nil
	}
	data, meta, _, _, release, err := p.backing(false)
	if err != nil {
		return err
	}
	defer release()
	if rec.DataSerial == "" {
		if rec.DataSerial, err = p.k.Serial(data); err != nil {
			return err
		}
	}
	if rec.MetadataSerial == "" {
		if rec.MetadataSerial, err = p.k.Serial(meta); err != nil {
			return err
		}
	}
	return nil
}

// checkConfig compares the configuration with the stored shape.
func (p *Pool) checkConfig() error {
	c, r := &p.cfg, &p.rec
	diff := func(field string, want, got any) error {
		return fmt.Errorf("%w: %s is %v in the pool's records but %v in the configuration; a pool's shape cannot change", ErrMismatch, field, want, got)
	}
	switch {
	case c.DataDevice != r.DataDevice:
		return diff("dataDevice", r.DataDevice, c.DataDevice)
	case c.MetadataDevice != r.MetadataDevice:
		return diff("metadataDevice", r.MetadataDevice, c.MetadataDevice)
	case c.DataFile != r.DataFile:
		return diff("dataFile", r.DataFile, c.DataFile)
	case c.MetadataFile != r.MetadataFile:
		return diff("metadataFile", r.MetadataFile, c.MetadataFile)
	case c.BlockSectors != r.BlockSectors:
		return diff("blockSectors", r.BlockSectors, c.BlockSectors)
	case c.SkipBlockZeroing != r.SkipBlockZeroing:
		return diff("skipBlockZeroing", r.SkipBlockZeroing, c.SkipBlockZeroing)
	}
	return nil
}

// backing attaches or finds the data and metadata devices.
func (p *Pool) backing(create bool) (data, meta devmapper.Dev, dataBytes, metaBytes int64, release func(), err error) {
	release = func() {}
	if p.cfg.DataDevice != "" {
		if data, dataBytes, err = blockDevice(p.k, p.cfg.DataDevice); err != nil {
			return 0, 0, 0, 0, release, fmt.Errorf("data device: %w", err)
		}
		if meta, metaBytes, err = blockDevice(p.k, p.cfg.MetadataDevice); err != nil {
			return 0, 0, 0, 0, release, fmt.Errorf("metadata device: %w", err)
		}
		return data, meta, dataBytes, metaBytes, release, nil
	}
	if create {
		if p.cfg.DataFileBytes <= 0 {
			return 0, 0, 0, 0, release, fmt.Errorf("%w: dataFileBytes must be set to create a loop-file pool", ErrInvalid)
		}
		metaSize := p.cfg.MetadataFileBytes
		if metaSize == 0 {
			metaSize = MetadataBytesFor(p.cfg.DataFileBytes, p.cfg.BlockSectors)
		}
		for path, size := range map[string]int64{p.cfg.DataFile: p.cfg.DataFileBytes, p.cfg.MetadataFile: metaSize} {
			if err := sparseFile(path, size); err != nil {
				return 0, 0, 0, 0, release, err
			}
		}
	}
	var relData, relMeta func()
	if data, relData, err = p.k.AttachFile(p.cfg.DataFile); err != nil {
		return 0, 0, 0, 0, release, fmt.Errorf("data file: %w", err)
	}
	if meta, relMeta, err = p.k.AttachFile(p.cfg.MetadataFile); err != nil {
		relData()
		return 0, 0, 0, 0, release, fmt.Errorf("metadata file: %w", err)
	}
	release = func() { relData(); relMeta() }
	if _, dataBytes, err = p.k.BlockDevice(loopPath(p.k, data)); err != nil {
		dataBytes = fileSize(p.cfg.DataFile)
	}
	if _, metaBytes, err = p.k.BlockDevice(loopPath(p.k, meta)); err != nil {
		metaBytes = fileSize(p.cfg.MetadataFile)
	}
	return data, meta, dataBytes, metaBytes, release, nil
}

// blockDevice is k.BlockDevice for a configured path: one that is not a
// block device is the configuration's mistake (ErrInvalid).
func blockDevice(k Kernel, path string) (devmapper.Dev, int64, error) {
	dev, size, err := k.BlockDevice(path)
	if errors.Is(err, unix.ENOTBLK) {
		err = fmt.Errorf("%w: %w", ErrInvalid, err)
	}
	return dev, size, err
}

func loopPath(k Kernel, d devmapper.Dev) string {
	if n, err := k.DeviceNode(d); err == nil {
		return n
	}
	return ""
}

func fileSize(path string) int64 {
	fi, err := os.Stat(path)
	if err != nil {
		return 0
	}
	return fi.Size()
}

// sparseFile makes a sparse file of size bytes unless one exists.
func sparseFile(path string, size int64) error {
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return err
	}
	f, err := os.OpenFile(path, os.O_CREATE|os.O_RDWR, 0o600)
	if err != nil {
		return err
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return err
	}
	if fi.Size() < size {
		if err := f.Truncate(size); err != nil {
			return err
		}
	}
	return f.Sync()
}

func (p *Pool) poolParams(data, meta devmapper.Dev, dataBytes int64) (devmapper.ThinPoolParams, uint64) {
	blocks := uint64(dataBytes) / (uint64(p.rec.BlockSectors) * devmapper.SectorSize)
	low := p.cfg.lowWaterBlocks(blocks)
	return devmapper.ThinPoolParams{
		MetadataDev: meta, DataDev: data, BlockSectors: p.rec.BlockSectors, LowWaterBlocks: low,
		Features: devmapper.ThinPoolFeatures{SkipBlockZeroing: p.rec.SkipBlockZeroing, ErrorIfNoSpace: !p.cfg.QueueIfNoSpace},
	}, blocks * uint64(p.rec.BlockSectors)
}

// create makes a new pool. The record is written first with transaction id
// 0 ("creating"), so a crash before the first commit is redone from scratch.
func (p *Pool) create(existing *poolRecord) error {
	if existing != nil {
		p.rec = *existing
		if err := p.checkConfig(); err != nil {
			return err
		}
	} else {
		id := make([]byte, 8)
		if _, err := rand.Read(id); err != nil {
			return err
		}
		p.rec = poolRecord{
			Version: 1, Name: p.cfg.Name, Identity: hex.EncodeToString(id),
			DataDevice: p.cfg.DataDevice, MetadataDevice: p.cfg.MetadataDevice,
			DataFile: p.cfg.DataFile, MetadataFile: p.cfg.MetadataFile,
			BlockSectors: p.cfg.BlockSectors, SkipBlockZeroing: p.cfg.SkipBlockZeroing,
			CreatedAt: time.Now().UTC(),
		}
	}
	// Leftover dm devices of an unfinished creation go first, before the
	// backing devices are looked up: auto-clearing loop devices that only
	// they held go with them. The marker device holds the pool.
	if err := p.removeMarkerDevice(); err != nil {
		return err
	}
	if info, err := p.k.InfoByName(p.poolDMName()); err == nil {
		if info.UUID != p.uuidPrefix()+"pool" {
			return fmt.Errorf("%w: a dm device %s exists and is not this pool's (uuid %q)", ErrMismatch, p.poolDMName(), info.UUID)
		}
		if err := p.k.Remove(info.Dev, false); err != nil {
			return err
		}
	}
	data, meta, dataBytes, metaBytes, release, err := p.backing(true)
	if err != nil {
		return err
	}
	defer release()
	if dataBytes < int64(p.rec.BlockSectors)*devmapper.SectorSize*16 {
		return fmt.Errorf("%w: data device of %d bytes is too small for a pool", ErrInvalid, dataBytes)
	}
	if existing == nil {
		// Never make a pool over anything: a filesystem, LVM, another
		// pool (records lost, or the wrong device) or data. A creation
		// that a crash interrupted passed this check before it wrote its
		// record, so it is not made again.
		err := p.checkEmpty([]struct {
			field string
			dev   devmapper.Dev
			size  int64
		}{{"the data device " + p.dataPath(), data, dataBytes}, {"the metadata device " + p.metadataPath(), meta, metaBytes}},
			func(string) bool { return false })
		if err != nil {
			return err
		}
		if p.rec.DataSerial, err = p.k.Serial(data); err != nil {
			return fmt.Errorf("data device: %w", err)
		}
		if p.rec.MetadataSerial, err = p.k.Serial(meta); err != nil {
			return fmt.Errorf("metadata device: %w", err)
		}
	}
	p.rec.DataBytes, p.rec.MetadataBytes = dataBytes, metaBytes
	zero := uint64(0)
	if err := p.st.apply(change{pool: &p.rec, tid: &zero, nextID: ptr(uint32(1))}); err != nil {
		return err
	}
	p.step("create-pool:recorded")
	if err := p.k.ZeroBlock(meta, devmapper.SuperblockBytes); err != nil {
		return fmt.Errorf("zero metadata device: %w", err)
	}
	p.step("create-pool:zeroed")
	params, sectors := p.poolParams(data, meta, dataBytes)
	info, err := p.k.Create(p.poolDMName(), p.uuidPrefix()+"pool")
	if err != nil {
		return err
	}
	p.dev = info.Dev
	if err := p.k.Load(p.dev, []devmapper.Target{devmapper.NewTarget(0, sectors, params)}); err != nil {
		return err
	}
	if err := p.k.Resume(p.dev); err != nil {
		return err
	}
	p.step("create-pool:activated")
	if err := p.writeMarker(); err != nil {
		return err
	}
	// The first transaction id is random: a pool's id doubles as a check
	// that the metadata found later is this pool's.
	var b [8]byte
	if _, err := rand.Read(b[:]); err != nil {
		return err
	}
	base := binary.BigEndian.Uint64(b[:])>>24 | 1
	if err := p.k.Message(p.dev, devmapper.SetTransactionID{Current: 0, New: base}); err != nil {
		return err
	}
	p.step("create-pool:committed")
	rec := p.rec
	rec.Marker = true
	if err := p.st.apply(change{pool: &rec, tid: &base}); err != nil {
		return err
	}
	p.rec = rec
	p.tid, p.nextID = base, 1
	p.setVols(map[string]*Volume{})
	return nil
}

// activatePool finds the pool's dm device or loads it, after checking the
// metadata is this pool's.
func (p *Pool) activatePool(in *intent) error {
	data, meta, dataBytes, _, release, err := p.backing(false)
	if err != nil {
		return err
	}
	defer release()
	if err := p.checkSerials(data, meta); err != nil {
		return err
	}
	params, sectors := p.poolParams(data, meta, max(dataBytes, p.rec.DataBytes))
	info, err := p.k.InfoByName(p.poolDMName())
	switch {
	case err == nil:
		if info.UUID != p.uuidPrefix()+"pool" {
			return fmt.Errorf("%w: dm device %s has uuid %q, not this pool's", ErrMismatch, p.poolDMName(), info.UUID)
		}
		p.dev = info.Dev
		if info.LiveTable {
			tbl, err := p.k.Table(p.dev)
			if err != nil {
				return err
			}
			got, err := devmapper.ParseThinPoolParams(tbl[0].Params)
			if err != nil {
				return err
			}
			if got.DataDev != data || got.MetadataDev != meta || got.BlockSectors != p.rec.BlockSectors {
				return fmt.Errorf("%w: the live pool table %q is not on the configured devices (%s data, %s metadata, %d-sector blocks)", ErrMismatch, tbl[0].Params, data, meta, p.rec.BlockSectors)
			}
			if info.Suspended {
				return p.k.Resume(p.dev)
			}
			return nil
		}
	case errors.Is(err, unix.ENXIO):
		if err := p.checkSuperblock(meta, in); err != nil {
			return err
		}
		if info, err = p.k.Create(p.poolDMName(), p.uuidPrefix()+"pool"); err != nil {
			return err
		}
		p.dev = info.Dev
	default:
		return err
	}
	if err := p.k.Load(p.dev, []devmapper.Target{devmapper.NewTarget(0, sectors, params)}); err != nil {
		return err
	}
	if err := p.k.Resume(p.dev); err != nil {
		return err
	}
	if !p.rec.Marker {
		return nil // made before markers: ensureMarker writes one
	}
	if err := p.checkMarker(); err != nil {
		// Unload the pool before anything can write through it.
		if rerr := p.k.Remove(p.dev, false); rerr != nil {
			return fmt.Errorf("%w (and unloading the pool failed: %v)", err, rerr)
		}
		return err
	}
	return nil
}

// ensureMarker gives a pool made before markers existed its marker, and
// records its devices' serials, under an intent like any other change.
func (p *Pool) ensureMarker() error {
	if p.rec.Marker {
		return nil
	}
	in := &intent{Op: opMarker, TID: p.tid + 1, Vol: Volume{Name: "(the marker)", DeviceID: markerDeviceID}}
	if err := p.st.apply(change{intent: in}); err != nil {
		return err
	}
	p.step("marker:intent")
	err := p.k.Message(p.dev, devmapper.CreateThin{DeviceID: markerDeviceID})
	if err != nil && !errors.Is(err, unix.EEXIST) { // EEXIST: an earlier attempt made it
		return fmt.Errorf("create the marker: %w", err)
	}
	if err := p.withMarkerDevice(func(dev devmapper.Dev) error { return p.k.WriteBlock(dev, 0, p.encodeMarker()) }); err != nil {
		return fmt.Errorf("write the marker: %w", err)
	}
	p.step("marker:written")
	if err := p.k.Message(p.dev, devmapper.SetTransactionID{Current: p.tid, New: in.TID}); err != nil {
		return err
	}
	p.step("marker:committed")
	return p.finish(in)
}

// checkSuperblock verifies, before loading the pool, that the metadata
// device holds this pool: same block size, and a transaction id the records
// explain.
func (p *Pool) checkSuperblock(meta devmapper.Dev, in *intent) error {
	buf := make([]byte, devmapper.SuperblockBytes)
	if err := p.k.ReadBlock(meta, 0, buf); err != nil {
		return fmt.Errorf("read metadata device: %w", err)
	}
	sb, ok, err := devmapper.ParseSuperblock(buf)
	if err != nil {
		return err
	}
	if !ok {
		return fmt.Errorf("%w: the metadata device holds no thin pool, but the records say pool %s (transaction id %d) lives there", ErrMismatch, p.rec.Identity, p.tid)
	}
	if sb.DataBlockSectors != p.rec.BlockSectors {
		return fmt.Errorf("%w: the metadata device's pool has %d-sector blocks, the records say %d", ErrMismatch, sb.DataBlockSectors, p.rec.BlockSectors)
	}
	if sb.TransactionID != p.tid && (in == nil || sb.TransactionID != in.TID) {
		return fmt.Errorf("%w: the metadata device's transaction id is %d, the records say %d: not this pool, or it was changed outside csi-dmthin", ErrMismatch, sb.TransactionID, p.tid)
	}
	return nil
}

// poolStatus reads the pool's status without forcing a metadata commit.
func (p *Pool) poolStatus() (devmapper.ThinPoolStatus, error) {
	st, err := p.k.Status(p.dev, true)
	if err != nil {
		return devmapper.ThinPoolStatus{}, err
	}
	if len(st) != 1 {
		return devmapper.ThinPoolStatus{}, fmt.Errorf("pool status has %d targets", len(st))
	}
	return devmapper.ParseThinPoolStatus(st[0].Params)
}

// recover settles an intent left by a crash or by a failed step: with the
// pool at the intent's transaction id the change is finished, with the pool
// still before it a create or snapshot is rolled back and a delete rolled
// forward.
func (p *Pool) recover(in *intent) error {
	ps, err := p.poolStatus()
	if err != nil {
		return err
	}
	if ps.Fail || ps.Error {
		return fmt.Errorf("%w: the pool has failed; repair it with thin_check/thin_repair", ErrPoolUnhealthy)
	}
	if in == nil {
		if ps.TransactionID != p.tid {
			return fmt.Errorf("%w: the pool's transaction id is %d, the records say %d", ErrForeignChange, ps.TransactionID, p.tid)
		}
		return nil
	}
	switch {
	case ps.TransactionID == in.TID:
		// Committed: finish the bookkeeping.
		if err := p.finish(in); err != nil {
			return err
		}
		p.step("recover:finished")
		return nil
	case ps.TransactionID == p.tid && in.TID == p.tid+1:
		// Not committed.
		switch in.Op {
		case opCreate, opSnapshot, opMarker, opGroup:
			for _, id := range in.devices() {
				err := p.k.Message(p.dev, devmapper.Delete{DeviceID: id})
				if err == nil || errors.Is(err, unix.ENODATA) {
					continue
				}
				if !errors.Is(err, unix.EBUSY) || in.Op == opGroup {
					return fmt.Errorf("roll back %s of %s: %w", in.Op, in.what(), err)
				}
				// Activated before the crash: deactivate, then delete.
				remove := func() error { return p.removeDM(in.Vol.Name, false) }
				if in.Op == opMarker {
					remove = p.removeMarkerDevice
				}
				if err := remove(); err != nil {
					return err
				}
				if err := p.k.Message(p.dev, devmapper.Delete{DeviceID: id}); err != nil && !errors.Is(err, unix.ENODATA) {
					return fmt.Errorf("roll back %s of %s: %w", in.Op, in.what(), err)
				}
			}
			p.step("recover:deleted")
			if err := p.st.apply(change{clearIntent: true}); err != nil {
				return p.recordsFailed(err)
			}
			p.step("recover:rolled-back")
			return nil
		case opDelete:
			// A delete goes forward: the caller was told nothing yet, and
			// the volume may already be gone from the pool.
			err := p.k.Message(p.dev, devmapper.Delete{DeviceID: in.Vol.DeviceID})
			if errors.Is(err, unix.EBUSY) {
				// Still open in the kernel (its removal has not finished):
				// leave a tombstone for Reap instead.
				v := in.Vol
				v.Deleting = true
				if err := p.st.apply(change{clearIntent: true, put: []*Volume{&v}}); err != nil {
					return p.recordsFailed(err)
				}
				p.putVol(&v)
				p.step("recover:tombstone")
				return nil
			}
			if err != nil && !errors.Is(err, unix.ENODATA) {
				return fmt.Errorf("roll forward delete of %s: %w", in.Vol.Name, err)
			}
			p.step("recover:deleted")
			if err := p.k.Message(p.dev, devmapper.SetTransactionID{Current: p.tid, New: in.TID}); err != nil {
				return err
			}
			p.step("recover:committed")
			if err := p.finish(in); err != nil {
				return err
			}
			p.step("recover:finished")
			return nil
		}
	}
	return fmt.Errorf("%w: the pool's transaction id is %d; the records say %d with a %s of %s pending at %d", ErrForeignChange, ps.TransactionID, p.tid, in.Op, in.what(), in.TID)
}

// finish records a committed intent's result and clears the intent; memory
// follows once the records have it.
func (p *Pool) finish(in *intent) error {
	c := change{tid: &in.TID, clearIntent: true}
	var v Volume
	rec := p.rec
	switch in.Op {
	case opCreate, opSnapshot:
		v = in.Vol
		c.put = []*Volume{&v}
	case opDelete:
		c.del = []string{in.Vol.Name}
	case opMarker:
		if err := p.recordSerials(&rec); err != nil {
			return err
		}
		rec.Marker = true
		c.pool = &rec
	case opGroup:
		for _, m := range in.Group {
			m := m.Vol
			c.put = append(c.put, &m)
		}
	}
	if err := p.st.apply(c); err != nil {
		return p.recordsFailed(err)
	}
	switch in.Op {
	case opGroup:
		for _, m := range c.put {
			p.putVol(m)
		}
	case opCreate, opSnapshot:
		p.putVol(&v)
	case opDelete:
		p.removeVol(in.Vol.Name)
	case opMarker:
		p.rec = rec
	}
	p.tid = in.TID
	return nil
}

// recordsFailed marks the records as not to be trusted until recovery has
// rewritten them, and returns err.
func (p *Pool) recordsFailed(err error) error {
	p.recordsSuspect = true
	return fmt.Errorf("write the records: %w", err)
}

// fail is called, with p.mu held, when a step of a change failed after the
// change's intent may have been recorded or the kernel may have acted on
// part of it. It fences the pool and recovers at once, exactly as Open
// would (see recoverLocked). It returns nil when the pool is consistent
// again; the caller then looks at the records to tell whether its change
// went forward. Otherwise the pool stays fenced and the error says why.
func (p *Pool) fail(cause error) error {
	p.fenced = cause
	return p.unfence()
}

// unfence retries the recovery of a fenced pool; nil when the pool is not
// (or no longer) fenced. The caller holds p.mu.
func (p *Pool) unfence() error {
	if p.fenced == nil {
		return nil
	}
	// Usage sees the fence only if it outlasts this recovery: a failure
	// that the recovery settles at once is not the pool's state.
	p.recovering = true
	err := p.recoverLocked()
	p.recovering = false
	if err != nil {
		p.publish()
		return fmt.Errorf("%w: %v; recovery: %v", ErrFenced, p.fenced, err)
	}
	p.fenced = nil
	p.publish()
	return nil
}

// recoverLocked makes memory, records and kernel agree again, as Open
// does: it reads the records (rewriting them whole after a failed write),
// settles the pending intent, and resumes any of the pool's devices left
// suspended. The caller holds p.mu.
func (p *Pool) recoverLocked() error {
	s, err := p.st.load()
	if err != nil {
		return fmt.Errorf("read the records: %w", err)
	}
	if p.recordsSuspect {
		if err := p.st.rewrite(s); err != nil {
			return fmt.Errorf("rewrite the records: %w", err)
		}
		p.recordsSuspect = false
	}
	p.setVols(s.volumes)
	p.tid, p.nextID, p.suspects = s.tid, s.nextID, s.suspects
	if err := p.recover(s.intent); err != nil {
		return err
	}
	return p.resumeSuspended()
}

// resumeSuspended resumes the pool and any of its volumes left suspended
// (a snapshot whose origin's resume failed, a pool whose reload failed).
func (p *Pool) resumeSuspended() error {
	list, err := p.k.List()
	if err != nil {
		return err
	}
	for _, e := range list {
		if !strings.HasPrefix(e.UUID, p.uuidPrefix()) {
			continue
		}
		if p.suspending[e.Dev] {
			continue // its snapshot resumes it
		}
		info, err := p.k.Info(e.Dev)
		if err != nil || !info.Suspended {
			continue
		}
		if err := p.k.Resume(e.Dev); err != nil {
			return fmt.Errorf("resume %s: %w", e.Name, err)
		}
	}
	return nil
}

// reconcile brings dm devices in line with the records: it resumes devices
// left suspended, removes ours that have no table or no record, reactivates
// volumes that should be active, finishes pending deletes and collects
// suspect thin ids.
func (p *Pool) reconcile(ctx context.Context) error {
	list, err := p.k.List()
	if err != nil {
		return err
	}
	byID := map[uint32]*Volume{}
	for _, v := range p.vols {
		byID[v.DeviceID] = v
	}
	present := map[string]bool{}
	for _, e := range list {
		if !strings.HasPrefix(e.UUID, p.uuidPrefix()) || e.UUID == p.uuidPrefix()+"pool" {
			continue
		}
		id, err := strconv.ParseUint(strings.TrimPrefix(e.UUID, p.uuidPrefix()), 10, 32)
		v := byID[uint32(id)]
		info, ierr := p.k.Info(e.Dev)
		if ierr != nil {
			continue // gone meanwhile
		}
		if err != nil || v == nil || e.Name != p.volDMName(v.Name) || !info.LiveTable {
			// No record owns it, or its activation never finished.
			if info.Suspended {
				_ = p.k.Resume(e.Dev)
			}
			if err := p.k.Remove(e.Dev, true); err != nil && !errors.Is(err, unix.ENXIO) {
				return fmt.Errorf("remove stray device %s: %w", e.Name, err)
			}
			p.step("reconcile:removed")
			continue
		}
		if info.Suspended {
			if err := p.k.Resume(e.Dev); err != nil {
				return fmt.Errorf("resume %s: %w", e.Name, err)
			}
			p.step("reconcile:resumed")
		}
		present[v.Name] = true
	}
	for _, v := range p.vols {
		if err := ctx.Err(); err != nil {
			return err
		}
		switch {
		case v.Deleting:
			// Finished by reapLocked below.
		case v.Kind == KindTemplate && !v.Sealed:
			// A crash while its content was being written: it is not
			// trustworthy, and whoever wanted it can make it again.
			if err := p.removeDM(v.Name, false); errors.Is(err, ErrBusy) {
				continue // someone holds it open; the next Open retries
			} else if err != nil {
				return fmt.Errorf("remove unsealed template %s: %w", v.Name, err)
			}
			if err := p.deleteLocked(v); err != nil {
				return fmt.Errorf("delete unsealed template %s: %w", v.Name, err)
			}
			p.step("reconcile:template-deleted")
		case v.Active && !present[v.Name]:
			if _, _, err := p.activateDM(v); err != nil {
				return fmt.Errorf("reactivate %s: %w", v.Name, err)
			}
			p.step("reconcile:reactivated")
		case !v.Active && present[v.Name]:
			c := *v
			c.Active = true
			if err := p.st.apply(change{put: []*Volume{&c}}); err != nil {
				return err
			}
			p.putVol(&c)
			p.step("reconcile:marked-active")
		}
	}
	if err := p.reapLocked(); err != nil {
		return err
	}
	return p.collectSuspects()
}

// Reap finishes deletes that waited for their device's last opener. Every
// mutating operation and Open do it too; a caller may also run it
// periodically.
func (p *Pool) Reap(ctx context.Context) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.closed {
		return ErrClosed
	}
	if err := p.unfence(); err != nil {
		return err
	}
	return p.reapLocked()
}

// reapLocked deletes the thin devices of pending deletes whose dm device is
// gone. One still open, or still being torn down by the kernel after its last
// close, stays pending. The caller holds p.mu.
func (p *Pool) reapLocked() error {
	for _, v := range p.vols {
		if !v.Deleting {
			continue
		}
		if _, err := p.k.InfoByName(p.volDMName(v.Name)); err == nil {
			continue // its deferred removal has not happened yet
		}
		if err := p.deleteLocked(v); err != nil && !errors.Is(err, unix.EBUSY) {
			return err
		}
	}
	return nil
}

// collectSuspects deletes thin ids that were found taken although no record
// owned them (an EEXIST on create); an id a record owns is left alone.
func (p *Pool) collectSuspects() error {
	if len(p.suspects) == 0 {
		return nil
	}
	owned := map[uint32]bool{}
	for _, v := range p.vols {
		owned[v.DeviceID] = true
	}
	var keep []uint32
	for _, id := range p.suspects {
		if owned[id] {
			continue
		}
		if err := p.k.Message(p.dev, devmapper.Delete{DeviceID: id}); err != nil && !errors.Is(err, unix.ENODATA) {
			keep = append(keep, id) // busy: someone else's open device
		}
	}
	p.step("reconcile:suspects-deleted")
	if err := p.st.apply(change{suspects: &keep}); err != nil {
		return p.recordsFailed(err)
	}
	p.suspects = keep
	return nil
}

// Close closes the records. Active volumes stay active and mounted ones keep
// working; the next Open takes them over.
func (p *Pool) Close() error {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.closed {
		return nil
	}
	p.closed = true
	p.publish()
	return p.st.close()
}

// Name is the pool's name.
func (p *Pool) Name() string { return p.cfg.Name }

// ZeroesNewBlocks reports whether the pool zeroes a data block when a device
// first writes to it, so that a new device reads zeros wherever it has not
// written, even inside a block it has partly written.
func (p *Pool) ZeroesNewBlocks() bool { return !p.rec.SkipBlockZeroing }

func ptr[T any](v T) *T { return &v }
