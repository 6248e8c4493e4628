package thinpool

import (
	"encoding/binary"
	"fmt"
)

// The thin-pool metadata superblock (struct thin_disk_superblock in the
// kernel's dm-thin-metadata.c), little-endian, in block 0 of the metadata
// device. Reading it before the pool is loaded tells whether a device holds
// a pool, with which block size and at which transaction id.
const (
	superblockMagic      = 27022010
	sbOffMagic           = 32
	sbOffTransactionID   = 48
	sbOffDataBlockSize   = 336
	sbOffMetaBlockSize   = 340
	sbOffMetadataNrBlock = 344
	superblockReadBytes  = 4096
)

type superblock struct {
	TransactionID    uint64
	DataBlockSectors uint32
	MetaBlockSectors uint32
	MetadataNrBlocks uint64
}

// parseSuperblock returns ok=false for a block that holds no pool (no magic:
// a new, zeroed device, or something else entirely).
func parseSuperblock(b []byte) (sb superblock, ok bool, err error) {
	if len(b) < sbOffMetadataNrBlock+8 {
		return sb, false, fmt.Errorf("superblock: %d bytes", len(b))
	}
	le := binary.LittleEndian
	if le.Uint64(b[sbOffMagic:]) != superblockMagic {
		return sb, false, nil
	}
	sb = superblock{
		TransactionID:    le.Uint64(b[sbOffTransactionID:]),
		DataBlockSectors: le.Uint32(b[sbOffDataBlockSize:]),
		MetaBlockSectors: le.Uint32(b[sbOffMetaBlockSize:]),
		MetadataNrBlocks: le.Uint64(b[sbOffMetadataNrBlock:]),
	}
	return sb, true, nil
}
