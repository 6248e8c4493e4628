package thinpool

import (
	"context"
	"errors"
	"fmt"

	"golang.org/x/sys/unix"

	"github.com/csi-dmthin/csi-dmthin/pkg/devmapper"
)

// Extent is a byte range of a volume: Length bytes from Offset.
type Extent struct {
	Offset, Length int64
}

// MappedExtents returns the byte ranges of the volume or snapshot name that
// its thin device maps to pool blocks, ascending, adjacent ones merged:
// what a copy of it must send, every other byte reading as zeros (a thin
// device reads zeros where it maps nothing). The ranges are whole pool
// blocks (a block written in part is mapped whole), offsets and lengths
// multiples of the pool's block size, except that the ranges end at the
// volume's size, which need not be a multiple of it. They are as of the
// call: the kernel commits its metadata before it takes the snapshot read
// here, so every write that completed before the call is in them; a
// volume in use may map more, or fewer after a discard, by the time the
// caller reads it (a snapshot does not change).
//
// Errors: ErrNotFound when there is no such volume (or only a pending
// delete), ErrInvalid for a malformed name, ErrClosed, ErrPoolUnhealthy
// when the pool is read-only or failed (it refuses the snapshot's
// messages), ErrForeignChange when the pool has no thin device of the
// volume's id, and devmapper.ErrCorruptMetadata for metadata that breaks
// its format's rules.
//
// It reads the pool's metadata, not the volume's data: it takes a metadata
// snapshot (reserve_metadata_snap), reads the mapping tree the snapshot
// holds from the metadata device (bypassing the page cache, since the
// kernel writes metadata through buffers of its own), and releases the
// snapshot, on every path. A snapshot found held when reserving (EBUSY) is
// released and the reserve tried once more: only one can be held per pool,
// so one left by a crash of this process (between reserve and release)
// would otherwise block every later call. The pool is csi-dmthin's, so a
// snapshot held by someone else (an administrator's thin_dump -m) is taken
// from them too. Open does not look for one: the next call here finds it.
func (p *Pool) MappedExtents(ctx context.Context, name string) ([]Extent, error) {
	if err := checkName(name); err != nil {
		return nil, err
	}
	// The volume's lock keeps it (and its thin id) from going while its
	// tree is read; the pool's lock is held only to look it up.
	defer p.volLocks.Lock(name)()
	p.mu.Lock()
	if p.closed {
		p.mu.Unlock()
		return nil, ErrClosed
	}
	v := p.vols[name]
	if v == nil || v.Deleting {
		p.mu.Unlock()
		return nil, fmt.Errorf("%w: volume %s", ErrNotFound, name)
	}
	id, sizeBytes, pool := v.DeviceID, v.SizeBytes, p.dev
	blockBytes := int64(p.rec.BlockSectors) * devmapper.SectorSize
	p.mu.Unlock()

	// Not under p.mu: the snapshot is immutable while it is held, and the
	// pool's changes (other volumes' messages and commits) go on beside
	// it. A reserve commits the pool's metadata, which the kernel also
	// does every second on its own, so it cannot commit anything of an
	// operation in flight that recovery does not already expect.
	//
	// A failure here does not fence the pool: the snapshot changes no
	// thin device, no transaction id and no record, so there is nothing
	// for a recovery to roll back or forward, and a snapshot left held is
	// released by the next call.
	p.metaSnapMu.Lock()
	defer p.metaSnapMu.Unlock()
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	ranges, err := p.readMappings(ctx, pool, id)
	if err != nil {
		return nil, fmt.Errorf("mapped extents of %s (thin id %d): %w", name, id, err)
	}
	var out []Extent
	for _, r := range ranges {
		off, n, ok := clipRange(r, blockBytes, sizeBytes)
		if !ok {
			break // ascending: the rest is past the end too
		}
		out = append(out, Extent{Offset: off, Length: n})
	}
	return out, nil
}

// clipRange returns the bytes of r, a range of blocks of blockBytes, that
// fall before sizeBytes; ok is false when none do.
func clipRange(r devmapper.BlockRange, blockBytes, sizeBytes int64) (off, n int64, ok bool) {
	blocks := uint64((sizeBytes + blockBytes - 1) / blockBytes)
	if r.Start >= blocks {
		return 0, 0, false
	}
	end := r.Start + min(r.Count, blocks-r.Start)
	off = int64(r.Start) * blockBytes
	return off, min(int64(end)*blockBytes, sizeBytes) - off, true
}

// readMappings holds a metadata snapshot of the pool on device pool and
// reads thin id's mappings from it. The caller holds p.metaSnapMu.
func (p *Pool) readMappings(ctx context.Context, pool devmapper.Dev, id uint32) (ranges []devmapper.BlockRange, err error) {
	tbl, err := p.k.Table(pool)
	if err != nil {
		return nil, fmt.Errorf("pool table: %w", err)
	}
	if len(tbl) != 1 {
		return nil, fmt.Errorf("pool table has %d targets", len(tbl))
	}
	params, err := devmapper.ParseThinPoolParams(tbl[0].Params)
	if err != nil {
		return nil, err
	}
	if err := p.reserveMetadataSnap(pool); err != nil {
		return nil, err
	}
	defer func() {
		if rerr := p.k.Message(pool, devmapper.ReleaseMetadataSnap{}); rerr != nil {
			err = errors.Join(err, p.poolError("release the metadata snapshot", rerr))
		}
	}()
	return readHeldMappings(ctx, p.k, params.MetadataDev, id)
}

// reserveMetadataSnap takes the pool's metadata snapshot, releasing one
// found held first (see MappedExtents).
func (p *Pool) reserveMetadataSnap(pool devmapper.Dev) error {
	err := p.k.Message(pool, devmapper.ReserveMetadataSnap{})
	if errors.Is(err, unix.EBUSY) {
		if rerr := p.k.Message(pool, devmapper.ReleaseMetadataSnap{}); rerr != nil {
			return p.poolError("release a metadata snapshot left held", rerr)
		}
		err = p.k.Message(pool, devmapper.ReserveMetadataSnap{})
	}
	if err != nil {
		return p.poolError("reserve a metadata snapshot", err)
	}
	return nil
}

// readHeldMappings reads thin id's mappings from the held metadata
// snapshot on the metadata device meta: block 0's held root names a copy
// of the superblock, whose mapping root is the snapshot's tree. ctx stops
// the walk between two blocks.
func readHeldMappings(ctx context.Context, k Kernel, meta devmapper.Dev, id uint32) ([]devmapper.BlockRange, error) {
	buf := make([]byte, devmapper.MetadataBlockBytes)
	superblock := func(block uint64) (devmapper.Superblock, error) {
		if err := k.ReadBlock(meta, int64(block)*devmapper.MetadataBlockBytes, buf); err != nil {
			return devmapper.Superblock{}, fmt.Errorf("read metadata block %d: %w", block, err)
		}
		sb, ok, err := devmapper.ParseSuperblock(buf)
		switch {
		case err != nil:
			return sb, err
		case !ok || !devmapper.SuperblockChecksumValid(buf) || sb.BlockNr != block:
			return sb, fmt.Errorf("%w: metadata block %d is not a superblock written there (magic %v, checksum valid %v, block number %d)",
				devmapper.ErrCorruptMetadata, block, ok, devmapper.SuperblockChecksumValid(buf), sb.BlockNr)
		}
		return sb, nil
	}
	sb, err := superblock(0)
	if err != nil {
		return nil, err
	}
	if sb.HeldRoot == 0 || sb.HeldRoot >= sb.MetadataNrBlocks {
		return nil, fmt.Errorf("%w: the superblock's held root is %d after a reserve, on a metadata device of %d blocks", devmapper.ErrCorruptMetadata, sb.HeldRoot, sb.MetadataNrBlocks)
	}
	held, err := superblock(sb.HeldRoot)
	if err != nil {
		return nil, fmt.Errorf("the held superblock: %w", err)
	}
	nrBlocks := sb.MetadataNrBlocks
	read := func(block uint64, b []byte) error {
		if err := ctx.Err(); err != nil {
			return err
		}
		if block >= nrBlocks {
			return fmt.Errorf("%w: block %d past the metadata device's %d", devmapper.ErrCorruptMetadata, block, nrBlocks)
		}
		return k.ReadBlock(meta, int64(block)*devmapper.MetadataBlockBytes, b)
	}
	ranges, err := devmapper.ThinMappings(read, held.DataMappingRoot, id)
	if errors.Is(err, devmapper.ErrNoThinDevice) {
		// The records own a thin id that the pool has not got.
		return nil, fmt.Errorf("%w: %w", ErrForeignChange, err)
	}
	return ranges, err
}
