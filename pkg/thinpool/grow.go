package thinpool

import (
	"context"
	"fmt"
	"os"

	"github.com/csi-dmthin/csi-dmthin/pkg/devmapper"
)

// Growing a pool online. The kernel grows a thin pool when its table is
// reloaded: on resume, pool_preresume extends the data space map to the
// table's length (maybe_resize_data_dev) and the metadata space map to the
// metadata device's size (maybe_resize_metadata_dev), commits, and a pool
// that was out of data or metadata space goes back to read-write. The thin
// volumes are suspended internally for the moment of the swap and keep
// their mounts and their I/O: queued writes go on once the pool has space.
//
// Nothing a crash interrupts needs undoing: the larger sizes are recorded
// first, and a pool whose devices are larger than its table is grown again
// by the next GrowPool (serve runs one at start-up). The kernel never
// shrinks a pool, so a table it refuses leaves the pool as it was.

// maxMetadataBlocks is the most of a metadata device the kernel uses
// (DM_SM_METADATA_MAX_BLOCKS, about 15.9 GiB); a larger device grows
// nothing past it.
const maxMetadataBlocks = 255 * ((1 << 14) - 64)

// metadataBlockBytes is the metadata block size (THIN_METADATA_BLOCK_SIZE).
const metadataBlockBytes = devmapper.MetadataBlockSectors * devmapper.SectorSize

// GrowRequest says how far to grow a pool. The zero request grows the pool
// onto whatever its devices hold now: after the operator grew the data or
// metadata device (lvextend, a larger LUN), or after a loop file was
// extended.
type GrowRequest struct {
	// DataFileBytes and MetadataFileBytes, for a loop-file pool, extend
	// its files to at least these sizes first; 0 leaves a file as it is,
	// except that a metadata file sized by MetadataBytesFor (the pool's
	// configured MetadataFileBytes is 0) follows a data file that grows.
	// Files never shrink. For a pool on block devices both must be 0.
	DataFileBytes, MetadataFileBytes int64
}

// Growth is what GrowPool found and did.
type Growth struct {
	DataBytesBefore, DataBytes         int64
	MetadataBytesBefore, MetadataBytes int64
	// Deferred, when set, says why part of the growth the devices allow
	// was not made (a read-only pool grows its metadata only).
	Deferred string
	Usage    Usage
}

// Grew reports whether the pool is larger than before.
func (g Growth) Grew() bool {
	return g.DataBytes > g.DataBytesBefore || g.MetadataBytes > g.MetadataBytesBefore
}

// GrowData grows the data device of a loop-file pool to dataFileBytes (0:
// as the file is) or takes up a grown data device; see GrowPool.
func (p *Pool) GrowData(ctx context.Context, dataFileBytes int64) (Usage, error) {
	g, err := p.GrowPool(ctx, GrowRequest{DataFileBytes: dataFileBytes})
	return g.Usage, err
}

// ConfiguredGrowth is the GrowRequest that brings a loop-file pool's files
// to the configured sizes (a pools file edited to larger ones); the zero
// request for a pool on devices.
func (p *Pool) ConfiguredGrowth() GrowRequest {
	if p.cfg.DataFile == "" {
		return GrowRequest{}
	}
	return GrowRequest{DataFileBytes: p.cfg.DataFileBytes, MetadataFileBytes: p.cfg.MetadataFileBytes}
}

// GrowPool grows the pool online onto larger data and metadata devices:
// for a loop-file pool it first extends the files as req says, then it
// reloads the pool's table with the data device's length and resumes it,
// which also takes up a larger metadata device. Volumes stay active,
// mounted and writable throughout, and a pool that was out of space takes
// writes and new volumes again once it has space above the floors.
// Growing to the current size or less does nothing and is not an error.
// A pool that needs a check or has failed is refused (ErrPoolUnhealthy):
// the kernel does not grow one until it is repaired.
func (p *Pool) GrowPool(ctx context.Context, req GrowRequest) (Growth, error) {
	if req.DataFileBytes < 0 || req.MetadataFileBytes < 0 {
		return Growth{}, fmt.Errorf("%w: grow pool %s: negative size", ErrInvalid, p.cfg.Name)
	}
	if p.cfg.DataFile == "" && (req.DataFileBytes != 0 || req.MetadataFileBytes != 0) {
		return Growth{}, fmt.Errorf("%w: pool %s is on block devices: grow the devices (lvextend, a larger disk), then the pool", ErrInvalid, p.cfg.Name)
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	if err := p.usable(); err != nil {
		return Growth{}, err
	}
	if err := ctx.Err(); err != nil {
		return Growth{}, err
	}
	ps, err := p.poolStatus()
	if err != nil {
		return Growth{}, err
	}
	if ps.Fail || ps.Error || ps.NeedsCheck {
		return Growth{}, fmt.Errorf("%w: pool %s (failed %v, needs_check %v): the kernel grows no pool until it is repaired", ErrPoolUnhealthy, p.cfg.Name, ps.Fail || ps.Error, ps.NeedsCheck)
	}
	tbl, err := p.k.Table(p.dev)
	if err != nil {
		return Growth{}, err
	}
	if len(tbl) != 1 {
		return Growth{}, fmt.Errorf("pool %s: the pool's table has %d targets", p.cfg.Name, len(tbl))
	}
	params, err := devmapper.ParseThinPoolParams(tbl[0].Params)
	if err != nil {
		return Growth{}, err
	}
	block := uint64(p.rec.BlockSectors)
	g := Growth{
		DataBytesBefore:     int64(tbl[0].LengthSectors * devmapper.SectorSize),
		MetadataBytesBefore: int64(ps.TotalMetadataBlocks * metadataBlockBytes),
	}
	g.DataBytes, g.MetadataBytes = g.DataBytesBefore, g.MetadataBytesBefore

	if p.cfg.DataFile != "" {
		if err := p.extendFiles(req); err != nil {
			return g, err
		}
	}
	dataBytes, metaBytes, err := p.deviceSizes(params)
	if err != nil {
		return g, err
	}
	sectors := uint64(dataBytes) / devmapper.SectorSize / block * block
	metaBlocks := min(uint64(metaBytes)/metadataBlockBytes, maxMetadataBlocks)
	growData := sectors > tbl[0].LengthSectors
	growMeta := metaBlocks > ps.TotalMetadataBlocks
	if growData && ps.Mode == devmapper.PoolReadOnly {
		// Out of metadata space reads "ro" too. The kernel resizes the
		// data space map before the metadata one, and in read-only mode
		// that fails and fails the pool; the metadata grows alone, and
		// the data with the next call once the pool is read-write.
		g.Deferred = "the pool is read-only: only its metadata grows now; grow again once it is read-write to take up the data device"
		growData = false
	}
	if !growData && !growMeta {
		g.Usage, err = p.usage()
		return g, err
	}
	if growData {
		g.DataBytes = int64(sectors * devmapper.SectorSize)
		params.LowWaterBlocks = p.cfg.lowWaterBlocks(sectors / block)
	} else {
		sectors = tbl[0].LengthSectors
	}
	if growMeta {
		g.MetadataBytes = int64(metaBlocks * metadataBlockBytes)
	}

	// Persist first: a crash from here on leaves records that say the
	// larger sizes and devices that hold them; the next GrowPool (or,
	// after a reboot, the new table Open loads) finishes the growth.
	rec := p.rec
	rec.DataBytes, rec.MetadataBytes = max(rec.DataBytes, g.DataBytes), max(rec.MetadataBytes, metaBytes)
	if rec != p.rec {
		if err := p.st.apply(change{pool: &rec}); err != nil {
			return g, p.failed(p.recordsFailed(err))
		}
		p.rec = rec
	}
	p.step("grow-pool:recorded")
	if err := p.k.Load(p.dev, []devmapper.Target{devmapper.NewTarget(0, sectors, params)}); err != nil {
		// Refused before anything changed: the old table stays live.
		return g, fmt.Errorf("pool %s: load the grown table: %w", p.cfg.Name, err)
	}
	p.step("grow-pool:loaded")
	if err := p.k.Resume(p.dev); err != nil {
		// Suspended with its old table or with the new one: either way
		// the volumes' I/O waits until the recovery resumes the pool.
		return g, p.failed(fmt.Errorf("pool %s: resume the grown pool: %w", p.cfg.Name, err))
	}
	p.step("grow-pool:resumed")
	g.Usage, err = p.usage()
	if err == nil {
		g.DataBytes, g.MetadataBytes = g.Usage.DataBytes, g.Usage.MetadataBytes
	}
	return g, err
}

// extendFiles extends a loop-file pool's files to what req asks (a
// metadata file sized by MetadataBytesFor follows its data file) and makes
// their loop devices take up the new sizes. The caller holds p.mu.
func (p *Pool) extendFiles(req GrowRequest) error {
	metaWant := req.MetadataFileBytes
	if metaWant == 0 && p.cfg.MetadataFileBytes == 0 && req.DataFileBytes > 0 {
		metaWant = MetadataBytesFor(req.DataFileBytes, p.rec.BlockSectors)
	}
	for _, f := range []struct {
		what, path string
		bytes      int64
	}{{"data", p.cfg.DataFile, req.DataFileBytes}, {"metadata", p.cfg.MetadataFile, metaWant}} {
		if f.bytes == 0 {
			continue
		}
		fi, err := os.Stat(f.path)
		if err != nil {
			return fmt.Errorf("pool %s: %s file: %w", p.cfg.Name, f.what, err)
		}
		if f.bytes > fi.Size() {
			if err := os.Truncate(f.path, f.bytes); err != nil {
				return fmt.Errorf("pool %s: extend the %s file: %w", p.cfg.Name, f.what, err)
			}
		}
	}
	return nil
}

// deviceSizes makes the loop devices of a loop-file pool take up their
// files' sizes and returns the sizes of the pool's data and metadata
// devices. The caller holds p.mu.
func (p *Pool) deviceSizes(params devmapper.ThinPoolParams) (data, meta int64, err error) {
	for _, d := range []devmapper.Dev{params.DataDev, params.MetadataDev} {
		if err := p.k.RefreshSize(d); err != nil {
			return 0, 0, fmt.Errorf("pool %s: %w", p.cfg.Name, err)
		}
	}
	if p.cfg.DataFile != "" {
		// A loop device's size is its file's, which RefreshSize made it
		// take up.
		for _, f := range []struct {
			path string
			into *int64
		}{{p.cfg.DataFile, &data}, {p.cfg.MetadataFile, &meta}} {
			fi, err := os.Stat(f.path)
			if err != nil {
				return 0, 0, fmt.Errorf("pool %s: %w", p.cfg.Name, err)
			}
			*f.into = fi.Size()
		}
		return data, meta, nil
	}
	if _, data, err = blockDevice(p.k, p.cfg.DataDevice); err != nil {
		return 0, 0, fmt.Errorf("pool %s: data device: %w", p.cfg.Name, err)
	}
	if _, meta, err = blockDevice(p.k, p.cfg.MetadataDevice); err != nil {
		return 0, 0, fmt.Errorf("pool %s: metadata device: %w", p.cfg.Name, err)
	}
	return data, meta, nil
}
