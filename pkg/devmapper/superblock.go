package devmapper

import (
	"encoding/binary"
	"fmt"
	"hash/crc32"
)

// The thin-pool metadata superblock: struct thin_disk_superblock of the
// kernel's drivers/md/dm-thin-metadata.c, little-endian, at the start of
// block 0 of the metadata device. The kernel rewrites it at every metadata
// commit. Reading it before a pool is loaded tells whether a device holds a
// pool, with which block size and at which transaction id.
//
// This is the one description of its layout: pkg/thinpool reads it, the
// fake kernel (pkg/thinpool/thinpooltest) writes it, and a test in the VM
// (pkg/thinpool, superblock_kernel_test.go) checks both against the bytes
// the kernel writes, so an offset that is wrong here fails there.

// SuperblockBytes is the superblock's block (THIN_METADATA_BLOCK_SIZE), the
// span its checksum covers.
const SuperblockBytes = MetadataBlockSectors * SectorSize

// The fields, by byte offset.
const (
	sbOffChecksum      = 0   // __le32 csum, of the block after this field
	sbOffFlags         = 4   // __le32 flags
	sbOffBlockNr       = 8   // __le64 blocknr, the block the superblock is in
	sbOffMagic         = 32  // __le64 magic (after the block number and a uuid)
	sbOffVersion       = 40  // __le32 version
	sbOffTransactionID = 48  // __le64 trans_id (after the __le32 time)
	sbOffHeldRoot      = 56  // __le64 held_root
	sbOffDataSMRoot    = 64  // data_space_map_root, a struct disk_sm_root
	sbOffMetaSMRoot    = 192 // metadata_space_map_root, the same
	sbOffMappingRoot   = 320 // __le64 data_mapping_root, the two-level mapping btree
	sbOffDetailsRoot   = 328 // __le64 device_details_root
	sbOffDataBlockSize = 336 // __le32 data_block_size, in sectors
	sbOffMetaBlockSize = 340 // __le32 metadata_block_size, in sectors
	sbOffMetaNrBlocks  = 344 // __le64 metadata_nr_blocks
	sbEnd              = 352 // what ParseSuperblock reads

	superblockMagic = 27022010
	// sbNeedsCheck is THIN_METADATA_NEEDS_CHECK_FLAG.
	sbNeedsCheck = 1 << 0
	// sbChecksumXor is SUPERBLOCK_CSUM_XOR.
	sbChecksumXor = 160774
)

// SpaceMapCounts are the counts at the start of a struct disk_sm_root (a
// space map's root, which then names its bitmap and reference-count
// btrees): the blocks it maps and how many of them are in use.
type SpaceMapCounts struct {
	NrBlocks    uint64
	NrAllocated uint64
}

// Superblock holds the superblock's fields that csi-dmthin reads, or that
// the fake kernel writes; the rest (the space maps' btree roots, the uuid,
// the snapshot time) it does not name.
type Superblock struct {
	// BlockNr is the metadata block the superblock was written to: 0 for
	// the pool's superblock, HeldRoot for the copy a metadata snapshot
	// keeps (the kernel writes both through the same validator).
	BlockNr uint64
	// NeedsCheck is the needs_check flag: the kernel met a metadata error,
	// and a pool loaded on the device stays read-only until thin_check
	// clears it.
	NeedsCheck bool
	// Version is the metadata format's version.
	Version       uint32
	TransactionID uint64
	// HeldRoot is the block of a held metadata snapshot
	// (reserve_metadata_snap), 0 when none is held. That block holds a
	// copy of the superblock as it was at the snapshot, whose
	// DataMappingRoot and DeviceDetailsRoot the kernel keeps unchanged
	// until release_metadata_snap; the copy's space map roots are zeroed.
	HeldRoot uint64
	// DataMappingRoot is the root block of the two-level mapping btree
	// (thin device id, then virtual block, to data block and time; see
	// ThinMappings).
	DataMappingRoot uint64
	// DeviceDetailsRoot is the root block of the btree of the thin
	// devices' details.
	DeviceDetailsRoot uint64
	// DataSpaceMap counts the pool's data blocks (as many as the pool
	// table's length when it was last resumed) and those in use.
	DataSpaceMap SpaceMapCounts
	// MetadataSpaceMap counts the metadata device's blocks and those in use.
	MetadataSpaceMap     SpaceMapCounts
	DataBlockSectors     uint32
	MetadataBlockSectors uint32
	// MetadataNrBlocks is the metadata device's size in metadata blocks,
	// as the pool last saw it.
	MetadataNrBlocks uint64
}

// ParseSuperblock reads the superblock at the start of b. ok is false for a
// block that holds no pool (no magic: a new, zeroed device, or something
// else entirely). It does not check the checksum (see
// SuperblockChecksumValid): the pool manager only looks, and the kernel
// refuses to load a pool whose superblock is corrupt.
func ParseSuperblock(b []byte) (sb Superblock, ok bool, err error) {
	if len(b) < sbEnd {
		return sb, false, fmt.Errorf("%w superblock: %d bytes, want at least %d", ErrParse, len(b), sbEnd)
	}
	le := binary.LittleEndian
	if le.Uint64(b[sbOffMagic:]) != superblockMagic {
		return sb, false, nil
	}
	sm := func(off int) SpaceMapCounts {
		return SpaceMapCounts{NrBlocks: le.Uint64(b[off:]), NrAllocated: le.Uint64(b[off+8:])}
	}
	sb = Superblock{
		NeedsCheck:           le.Uint32(b[sbOffFlags:])&sbNeedsCheck != 0,
		BlockNr:              le.Uint64(b[sbOffBlockNr:]),
		Version:              le.Uint32(b[sbOffVersion:]),
		TransactionID:        le.Uint64(b[sbOffTransactionID:]),
		HeldRoot:             le.Uint64(b[sbOffHeldRoot:]),
		DataMappingRoot:      le.Uint64(b[sbOffMappingRoot:]),
		DeviceDetailsRoot:    le.Uint64(b[sbOffDetailsRoot:]),
		DataSpaceMap:         sm(sbOffDataSMRoot),
		MetadataSpaceMap:     sm(sbOffMetaSMRoot),
		DataBlockSectors:     le.Uint32(b[sbOffDataBlockSize:]),
		MetadataBlockSectors: le.Uint32(b[sbOffMetaBlockSize:]),
		MetadataNrBlocks:     le.Uint64(b[sbOffMetaNrBlocks:]),
	}
	return sb, true, nil
}

// Put writes the magic and sb's fields into b, which must hold
// SuperblockBytes, and then its checksum. The bytes of the fields
// Superblock does not name are left as they are.
func (sb Superblock) Put(b []byte) {
	_ = b[SuperblockBytes-1] // a short buffer panics before anything is written
	le := binary.LittleEndian
	flags := le.Uint32(b[sbOffFlags:]) &^ sbNeedsCheck
	if sb.NeedsCheck {
		flags |= sbNeedsCheck
	}
	le.PutUint32(b[sbOffFlags:], flags)
	le.PutUint64(b[sbOffBlockNr:], sb.BlockNr)
	le.PutUint64(b[sbOffMagic:], superblockMagic)
	le.PutUint32(b[sbOffVersion:], sb.Version)
	le.PutUint64(b[sbOffTransactionID:], sb.TransactionID)
	le.PutUint64(b[sbOffHeldRoot:], sb.HeldRoot)
	le.PutUint64(b[sbOffMappingRoot:], sb.DataMappingRoot)
	le.PutUint64(b[sbOffDetailsRoot:], sb.DeviceDetailsRoot)
	putSM := func(off int, sm SpaceMapCounts) {
		le.PutUint64(b[off:], sm.NrBlocks)
		le.PutUint64(b[off+8:], sm.NrAllocated)
	}
	putSM(sbOffDataSMRoot, sb.DataSpaceMap)
	putSM(sbOffMetaSMRoot, sb.MetadataSpaceMap)
	le.PutUint32(b[sbOffDataBlockSize:], sb.DataBlockSectors)
	le.PutUint32(b[sbOffMetaBlockSize:], sb.MetadataBlockSectors)
	le.PutUint64(b[sbOffMetaNrBlocks:], sb.MetadataNrBlocks)
	le.PutUint32(b[sbOffChecksum:], superblockChecksum(b))
}

// SuperblockChecksumValid reports whether the block holds the checksum the
// kernel computes over it (and checks when it opens the pool).
func SuperblockChecksumValid(b []byte) bool {
	return len(b) >= SuperblockBytes && binary.LittleEndian.Uint32(b[sbOffChecksum:]) == superblockChecksum(b)
}

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

// superblockChecksum is dm_bm_checksum over the block after the checksum
// field: crc32c seeded with ~0 and not inverted at the end (the inverse of
// Go's crc32, which inverts at both ends), xor SUPERBLOCK_CSUM_XOR.
func superblockChecksum(b []byte) uint32 {
	return ^crc32.Checksum(b[sbOffChecksum+4:SuperblockBytes], castagnoli) ^ sbChecksumXor
}
