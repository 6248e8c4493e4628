package devmapper

import (
	"encoding/binary"
	"errors"
	"testing"
)

// The offsets, derived here a second way: by adding up the sizes of the
// fields of struct thin_disk_superblock in their order, as the C compiler
// lays out the packed struct. The VM test (pkg/thinpool,
// superblock_kernel_test.go) checks them against the kernel's own bytes.
func TestSuperblockOffsets(t *testing.T) {
	fields := []struct {
		name string
		size int
		off  int // the constant, -1 for a field this package does not name
	}{
		{"csum", 4, sbOffChecksum},
		{"flags", 4, sbOffFlags},
		{"blocknr", 8, sbOffBlockNr},
		{"uuid", 16, -1},
		{"magic", 8, sbOffMagic},
		{"version", 4, sbOffVersion},
		{"time", 4, -1},
		{"trans_id", 8, sbOffTransactionID},
		{"held_root", 8, sbOffHeldRoot},
		{"data_space_map_root", 128, sbOffDataSMRoot},
		{"metadata_space_map_root", 128, sbOffMetaSMRoot},
		{"data_mapping_root", 8, sbOffMappingRoot},
		{"device_details_root", 8, sbOffDetailsRoot},
		{"data_block_size", 4, sbOffDataBlockSize},
		{"metadata_block_size", 4, sbOffMetaBlockSize},
		{"metadata_nr_blocks", 8, sbOffMetaNrBlocks},
	}
	off := 0
	for _, f := range fields {
		if f.off >= 0 && f.off != off {
			t.Errorf("%s at %d, the struct puts it at %d", f.name, f.off, off)
		}
		off += f.size
	}
	if off != sbEnd {
		t.Errorf("the fields read end at %d, want %d", sbEnd, off)
	}
}

func TestSuperblockRoundTrip(t *testing.T) {
	sb := Superblock{
		NeedsCheck: true, BlockNr: 99, Version: 2, TransactionID: 1<<40 + 7, HeldRoot: 98,
		DataMappingRoot: 5, DeviceDetailsRoot: 1<<33 + 6,
		DataSpaceMap:     SpaceMapCounts{NrBlocks: 1024, NrAllocated: 30},
		MetadataSpaceMap: SpaceMapCounts{NrBlocks: 4096, NrAllocated: 21},
		DataBlockSectors: 128, MetadataBlockSectors: MetadataBlockSectors, MetadataNrBlocks: 4096,
	}
	b := make([]byte, SuperblockBytes)
	const uuidOff = 16 // the uuid, which Superblock does not name
	b[uuidOff] = 0xAB
	b[sbOffFlags] = 0x80 // another flag
	sb.Put(b)
	got, ok, err := ParseSuperblock(b)
	if err != nil || !ok || got != sb {
		t.Fatalf("parsed %+v %v %v, want %+v", got, ok, err, sb)
	}
	if b[uuidOff] != 0xAB || b[sbOffFlags] != 0x81 {
		t.Errorf("Put changed bytes it does not own: uuid %#x, flags %#x", b[uuidOff], b[sbOffFlags])
	}
	if !SuperblockChecksumValid(b) {
		t.Error("the checksum Put wrote does not check")
	}
	b[uuidOff]++
	if SuperblockChecksumValid(b) {
		t.Error("a changed block still checks")
	}
	sb.NeedsCheck = false
	sb.Put(b)
	if got, _, _ := ParseSuperblock(b); got.NeedsCheck || b[sbOffFlags] != 0x80 {
		t.Errorf("needs_check not cleared: %+v, flags %#x", got, b[sbOffFlags])
	}
}

func TestSuperblockChecksumKnown(t *testing.T) {
	// dm_bm_checksum of a block that is all zeros after the checksum
	// field, worked out from its definition (crc32c, Castagnoli
	// polynomial, seeded with ~0, not inverted at the end) rather than
	// with this package's code.
	b := make([]byte, SuperblockBytes)
	crc := ^uint32(0)
	for _, c := range b[4:] {
		crc ^= uint32(c)
		for range 8 {
			if crc&1 != 0 {
				crc = crc>>1 ^ 0x82F63B78
			} else {
				crc >>= 1
			}
		}
	}
	binary.LittleEndian.PutUint32(b, crc^160774)
	if !SuperblockChecksumValid(b) {
		t.Errorf("checksum %#x of a zero block not accepted", crc^160774)
	}
}

func TestParseSuperblock(t *testing.T) {
	if _, ok, err := ParseSuperblock(make([]byte, SuperblockBytes)); ok || err != nil {
		t.Errorf("a zeroed block: ok %v, %v", ok, err)
	}
	if _, _, err := ParseSuperblock(make([]byte, sbEnd-1)); !errors.Is(err, ErrParse) {
		t.Errorf("a short block: %v", err)
	}
	b := make([]byte, sbEnd)
	binary.LittleEndian.PutUint64(b[32:], 27022010)
	binary.LittleEndian.PutUint64(b[48:], 5)
	if sb, ok, err := ParseSuperblock(b); !ok || err != nil || sb.TransactionID != 5 {
		t.Errorf("a block with the magic: %+v %v %v", sb, ok, err)
	}
}
