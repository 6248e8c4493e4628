// Package fsprobe reads the superblocks of the filesystems csi-dmthin makes
// (ext2/3/4 and XFS) straight from a device, and gives a never-mounted ext4
// filesystem a new UUID. It saves the node service an exec of blkid,
// resize2fs or tune2fs on its hot paths; anything it does not recognise is
// left to blkid.
//
// Layouts: the kernel's fs/ext4/ext4.h (struct ext4_super_block) and
// fs/xfs/libxfs/xfs_format.h (struct xfs_dsb).
package fsprobe

import (
	"crypto/rand"
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
	"os"
)

// Info is what a superblock says.
type Info struct {
	Type      string // "ext4", "ext3", "ext2", "xfs"; "" when not recognised
	SizeBytes int64  // the filesystem's size
	BlockSize int64
	UUID      [16]byte
	// NeverMounted: ext* only; the kernel has never mounted it (a mount
	// records its time in the superblock).
	NeverMounted bool
	// UUIDChangeable: ext* only; the UUID can be changed by rewriting the
	// superblock alone, because the metadata checksums do not derive from
	// it (metadata_csum_seed) or there are none.
	UUIDChangeable bool
	// Unfinished: XFS only, with Type "": the superblock says its mkfs
	// never finished (sb_inprogress, which mkfs.xfs clears last). The
	// kernel refuses to mount it, blkid still calls it xfs; it is no
	// filesystem, and mkfs may make one over it.
	Unfinished bool
}

const (
	extSBOffset = 1024
	extSBSize   = 1024
	extMagic    = 0xEF53

	// ext4_super_block offsets.
	extBlocksCountLo = 0x04
	extLogBlockSize  = 0x18
	extMtime         = 0x2C
	extMagicOff      = 0x38
	extCompat        = 0x5C
	extIncompat      = 0x60
	extROCompat      = 0x64
	extUUID          = 0x68
	extBlocksCountHi = 0x150
	extMtimeHi       = 0x275
	extChecksum      = 0x3FC

	extCompatHasJournal = 0x4

	extIncompatJournalDev = 0x8
	extIncompatExtents    = 0x40
	extIncompat64Bit      = 0x80
	extIncompatFlexBG     = 0x200
	extIncompatCsumSeed   = 0x2000
	// Any incompat feature ext3 does not have (everything past
	// META_BG, with JOURNAL_DEV and RECOVER excluded).
	extIncompatExt4Only = ^uint32(0x1 | 0x2 | 0x4 | 0x8 | 0x10)

	extROCompatGdtCsum      = 0x10
	extROCompatMetadataCsum = 0x400
	// Any ro_compat feature ext3 does not have.
	extROCompatExt4Only = ^uint32(0x1 | 0x2 | 0x4)

	xfsMagic = "XFSB"
	// struct xfs_dsb offsets (big-endian): sb_blocksize, sb_dblocks,
	// sb_uuid, and sb_inprogress, a byte after the log2 sizes that start
	// at 120 (sb_blocklog, sb_sectlog, sb_inodelog, sb_inopblog,
	// sb_agblklog, sb_rextslog).
	xfsBlockSize  = 4
	xfsDBlocks    = 8
	xfsUUID       = 32
	xfsInProgress = 126
)

// ErrUnsupported: the device holds no filesystem whose UUID this package
// may change.
var ErrUnsupported = errors.New("fsprobe: unsupported")

// Probe reads the superblock at the start of r. A device that holds none
// of the known filesystems gives Info{} and no error.
func Probe(r io.ReaderAt) (Info, error) {
	buf := make([]byte, extSBOffset+extSBSize)
	if _, err := r.ReadAt(buf, 0); err != nil && !errors.Is(err, io.EOF) {
		return Info{}, fmt.Errorf("read superblock: %w", err)
	}
	if string(buf[:4]) == xfsMagic {
		return probeXFS(buf), nil
	}
	sb := buf[extSBOffset:]
	if binary.LittleEndian.Uint16(sb[extMagicOff:]) == extMagic {
		return probeExt(sb), nil
	}
	return Info{}, nil
}

func probeXFS(b []byte) Info {
	if b[xfsInProgress] != 0 {
		// A mkfs.xfs killed half way (a cancelled stage or template
		// build): made again, not mounted in vain forever.
		return Info{Unfinished: true}
	}
	bs := int64(binary.BigEndian.Uint32(b[xfsBlockSize:]))
	info := Info{Type: "xfs", BlockSize: bs, SizeBytes: int64(binary.BigEndian.Uint64(b[xfsDBlocks:])) * bs}
	copy(info.UUID[:], b[xfsUUID:xfsUUID+16])
	return info
}

func probeExt(sb []byte) Info {
	le := binary.LittleEndian
	compat, incompat, ro := le.Uint32(sb[extCompat:]), le.Uint32(sb[extIncompat:]), le.Uint32(sb[extROCompat:])
	info := Info{BlockSize: 1024 << le.Uint32(sb[extLogBlockSize:])}
	blocks := int64(le.Uint32(sb[extBlocksCountLo:]))
	if incompat&extIncompat64Bit != 0 {
		blocks |= int64(le.Uint32(sb[extBlocksCountHi:])) << 32
	}
	info.SizeBytes = blocks * info.BlockSize
	copy(info.UUID[:], sb[extUUID:extUUID+16])
	switch {
	case incompat&extIncompatJournalDev != 0:
		return Info{} // an external journal, not a filesystem: blkid's job
	case incompat&extIncompatExt4Only != 0 || ro&extROCompatExt4Only != 0:
		info.Type = "ext4"
	case compat&extCompatHasJournal != 0:
		info.Type = "ext3"
	default:
		info.Type = "ext2"
	}
	info.NeverMounted = le.Uint32(sb[extMtime:]) == 0 && sb[extMtimeHi] == 0
	switch {
	case ro&extROCompatMetadataCsum != 0:
		info.UUIDChangeable = incompat&extIncompatCsumSeed != 0
	default:
		// Group descriptor checksums (crc16) cover the UUID.
		info.UUIDChangeable = ro&extROCompatGdtCsum == 0
	}
	return info
}

// NewExtUUID gives the never-mounted ext2/3/4 filesystem on f a new random
// UUID, rewriting only the primary superblock (and its checksum), and
// returns it. Changing the UUID of a filesystem that was mounted would
// confuse whatever recorded it, so that is refused, as is a filesystem
// whose metadata checksums derive from its UUID: both are ErrUnsupported.
// The backup superblocks keep the template's UUID; e2fsck takes the
// primary's, and nothing reads a backup while the primary is sound.
func NewExtUUID(f *os.File) ([16]byte, error) {
	var id [16]byte
	sb := make([]byte, extSBSize)
	if _, err := f.ReadAt(sb, extSBOffset); err != nil {
		return id, fmt.Errorf("read superblock: %w", err)
	}
	if binary.LittleEndian.Uint16(sb[extMagicOff:]) != extMagic {
		return id, fmt.Errorf("%w: no ext superblock", ErrUnsupported)
	}
	info := probeExt(sb)
	if info.Type == "" || !info.NeverMounted || !info.UUIDChangeable {
		return id, fmt.Errorf("%w: %s, never mounted %v, UUID changeable %v", ErrUnsupported, info.Type, info.NeverMounted, info.UUIDChangeable)
	}
	if _, err := rand.Read(id[:]); err != nil {
		return id, err
	}
	id[6] = id[6]&0x0f | 0x40 // version 4
	id[8] = id[8]&0x3f | 0x80 // RFC 4122 variant
	copy(sb[extUUID:], id[:])
	if binary.LittleEndian.Uint32(sb[extROCompat:])&extROCompatMetadataCsum != 0 {
		binary.LittleEndian.PutUint32(sb[extChecksum:], extChecksumOf(sb))
	}
	if _, err := f.WriteAt(sb, extSBOffset); err != nil {
		return id, fmt.Errorf("write superblock: %w", err)
	}
	if err := f.Sync(); err != nil {
		return id, fmt.Errorf("sync superblock: %w", err)
	}
	return id, nil
}

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

// extChecksumOf is ext4_superblock_csum: the kernel's crc32c (no final
// inversion) seeded with ~0, over the superblock up to s_checksum.
func extChecksumOf(sb []byte) uint32 {
	return ^crc32.Update(0, castagnoli, sb[:extChecksum])
}
