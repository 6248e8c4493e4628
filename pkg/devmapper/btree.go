package devmapper

import (
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"slices"
)

// The persistent-data btrees of the thin-pool metadata, after the kernel's
// drivers/md/persistent-data/dm-btree*.c, and the two-level mapping tree
// of dm-thin-metadata.c built from them.
//
// A node fills one metadata block, little-endian:
//
//	byte 0   __le32 csum         crc32c of bytes 4 to the block's end, xor btreeChecksumXor
//	byte 4   __le32 flags        btreeInternal or btreeLeaf
//	byte 8   __le64 blocknr      the block the node was written to
//	byte 16  __le32 nr_entries   entries in use
//	byte 20  __le32 max_entries  room for entries, which sizes the arrays
//	byte 24  __le32 value_size   bytes per value
//	byte 28  __le32 padding
//	byte 32  __le64 keys[max_entries], ascending, the first nr_entries used
//	then     values[max_entries], value_size bytes each
//
// An internal node's value i is the block of the child holding the keys
// from keys[i] up to keys[i+1]. The mapping tree's top level maps a thin
// device id to the root block of that device's tree, whose keys are the
// device's virtual blocks and whose values pack a data block and a time
// (ThinMapping). Every value in these trees is a __le64, so that is the
// only value size this package reads and writes.

// MetadataBlockBytes is the size of a metadata block (THIN_METADATA_BLOCK_SIZE):
// one btree node, or the superblock.
const MetadataBlockBytes = MetadataBlockSectors * SectorSize

const (
	btOffChecksum   = 0
	btOffFlags      = 4
	btOffBlockNr    = 8
	btOffNrEntries  = 16
	btOffMaxEntries = 20
	btOffValueSize  = 24
	btHeaderBytes   = 32

	btreeInternal = 1 // INTERNAL_NODE
	btreeLeaf     = 2 // LEAF_NODE
	// btreeChecksumXor is BTREE_CSUM_XOR.
	btreeChecksumXor = 121107

	btValueBytes = 8 // sizeof(__le64)

	// BtreeMaxEntries is how many __le64 entries the kernel gives a node of
	// a metadata block: as many key and value pairs as fit after the
	// header, rounded down to a multiple of 3 (calc_max_entries in
	// dm-btree.c).
	BtreeMaxEntries = (MetadataBlockBytes - btHeaderBytes) / (8 + btValueBytes) / 3 * 3

	// btreeMaxDepth bounds a descent through one level of the mapping
	// tree. A node other than the root is at least a third full, so a
	// tree of 2^64 keys is 10 nodes deep; a deeper descent is a loop the
	// visited set did not catch or garbage.
	btreeMaxDepth = 16

	// The packing of a mapping's value: data block << 24 | time.
	thinTimeBits = 24
	thinTimeMask = 1<<thinTimeBits - 1
)

// ErrCorruptMetadata is wrapped by every error about metadata that breaks
// its format's rules: a bad checksum, a node at the wrong block, counts
// that do not fit, keys out of order, a loop.
var ErrCorruptMetadata = errors.New("corrupt thin-pool metadata")

// ErrNoThinDevice: the mapping tree has no entry for the thin device id.
var ErrNoThinDevice = errors.New("no such thin device in the metadata")

// BtreeNode is one node of a btree whose values are __le64s.
type BtreeNode struct {
	// BlockNr is the block the node is written to.
	BlockNr uint64
	// Leaf is true for a leaf node, whose values are the tree's; an
	// internal node's values are child blocks.
	Leaf bool
	// MaxEntries is the room the node has; 0 means BtreeMaxEntries.
	MaxEntries uint32
	// Keys, ascending, and Values, as many.
	Keys   []uint64
	Values []uint64
}

// ReadMetadataBlock reads metadata block block into buf, which holds
// MetadataBlockBytes.
type ReadMetadataBlock func(block uint64, buf []byte) error

// Put writes the node into b, which must hold MetadataBlockBytes, with the
// checksum the kernel computes; what the node does not use is zeroed. It
// panics when the node does not fit (a programming error of the writer).
func (n BtreeNode) Put(b []byte) {
	_ = b[MetadataBlockBytes-1]
	maxEntries := n.MaxEntries
	if maxEntries == 0 {
		maxEntries = BtreeMaxEntries
	}
	if len(n.Keys) != len(n.Values) || uint64(len(n.Keys)) > uint64(maxEntries) ||
		btHeaderBytes+(8+btValueBytes)*uint64(maxEntries) > MetadataBlockBytes {
		panic(fmt.Sprintf("btree node of %d keys, %d values and room for %d", len(n.Keys), len(n.Values), maxEntries))
	}
	clear(b[:MetadataBlockBytes])
	le := binary.LittleEndian
	flags := uint32(btreeInternal)
	if n.Leaf {
		flags = btreeLeaf
	}
	le.PutUint32(b[btOffFlags:], flags)
	le.PutUint64(b[btOffBlockNr:], n.BlockNr)
	le.PutUint32(b[btOffNrEntries:], uint32(len(n.Keys)))
	le.PutUint32(b[btOffMaxEntries:], maxEntries)
	le.PutUint32(b[btOffValueSize:], btValueBytes)
	values := btHeaderBytes + 8*int(maxEntries)
	for i, k := range n.Keys {
		le.PutUint64(b[btHeaderBytes+8*i:], k)
		le.PutUint64(b[values+btValueBytes*i:], n.Values[i])
	}
	le.PutUint32(b[btOffChecksum:], btreeChecksum(b))
}

// btreeChecksum is dm_bm_checksum over the node after its checksum field,
// as superblockChecksum, with the btree's xor.
func btreeChecksum(b []byte) uint32 {
	return ^crc32.Checksum(b[btOffChecksum+4:MetadataBlockBytes], castagnoli) ^ btreeChecksumXor
}

// ParseBtreeNode reads the node in b, which was read from block blockNr,
// and checks it as the kernel's node_check does, and more: the checksum,
// the block number, that the arrays fit in the block and the entries in
// the arrays, exactly one of the leaf and internal flags, __le64 values,
// and keys in strictly ascending order. Every error wraps
// ErrCorruptMetadata.
func ParseBtreeNode(b []byte, blockNr uint64) (BtreeNode, error) {
	bad := func(format string, a ...any) (BtreeNode, error) {
		return BtreeNode{}, fmt.Errorf("%w: btree node at block %d: %s", ErrCorruptMetadata, blockNr, fmt.Sprintf(format, a...))
	}
	if len(b) < MetadataBlockBytes {
		return bad("%d bytes, want %d", len(b), MetadataBlockBytes)
	}
	le := binary.LittleEndian
	if got, want := le.Uint32(b[btOffChecksum:]), btreeChecksum(b); got != want {
		return bad("checksum %#x, want %#x", got, want)
	}
	if got := le.Uint64(b[btOffBlockNr:]); got != blockNr {
		return bad("written for block %d", got)
	}
	flags := le.Uint32(b[btOffFlags:])
	if flags != btreeInternal && flags != btreeLeaf {
		return bad("flags %#x, want internal (%d) or leaf (%d)", flags, btreeInternal, btreeLeaf)
	}
	nr, maxEntries, valueSize := le.Uint32(b[btOffNrEntries:]), le.Uint32(b[btOffMaxEntries:]), le.Uint32(b[btOffValueSize:])
	if valueSize != btValueBytes {
		return bad("values of %d bytes, want %d", valueSize, btValueBytes)
	}
	if btHeaderBytes+(8+uint64(valueSize))*uint64(maxEntries) > MetadataBlockBytes {
		return bad("room for %d entries does not fit in a block", maxEntries)
	}
	if nr > maxEntries {
		return bad("%d entries, room for %d", nr, maxEntries)
	}
	n := BtreeNode{BlockNr: blockNr, Leaf: flags == btreeLeaf, MaxEntries: maxEntries,
		Keys: make([]uint64, nr), Values: make([]uint64, nr)}
	values := btHeaderBytes + 8*int(maxEntries)
	for i := range int(nr) {
		n.Keys[i] = le.Uint64(b[btHeaderBytes+8*i:])
		n.Values[i] = le.Uint64(b[values+btValueBytes*i:])
		if i > 0 && n.Keys[i] <= n.Keys[i-1] {
			return bad("key %d (%d) not above key %d (%d)", i, n.Keys[i], i-1, n.Keys[i-1])
		}
	}
	if !n.Leaf && nr == 0 {
		return bad("an internal node with no entries")
	}
	return n, nil
}

// ThinMapping is one entry of a thin device's mapping tree: virtual block
// Virtual of the device is data block Data of the pool, provisioned (or
// last shared) at Time, the pool's snapshot count then.
type ThinMapping struct {
	Virtual uint64
	Data    uint64
	Time    uint32
}

// BlockRange is a run of blocks: Count blocks from Start.
type BlockRange struct {
	Start, Count uint64
}

// ThinMappings returns the virtual blocks that thin device thinID maps in
// the mapping tree rooted at mappingRoot (a superblock's DataMappingRoot),
// ascending, adjacent blocks merged into one range. It reads the tree's
// nodes with read and checks each (ParseBtreeNode), and that no node is
// visited twice or is deeper than a btree can be; an error wraps
// ErrCorruptMetadata, ErrNoThinDevice when the tree has no such device, or
// read's error. The tree must not change while it is read: it should be a
// held metadata snapshot's, or a stopped pool's.
func ThinMappings(read ReadMetadataBlock, mappingRoot uint64, thinID uint32) ([]BlockRange, error) {
	var out []BlockRange
	err := WalkThinMappings(read, mappingRoot, thinID, func(m ThinMapping) error {
		if n := len(out); n > 0 && out[n-1].Start+out[n-1].Count == m.Virtual {
			out[n-1].Count++
		} else {
			out = append(out, BlockRange{Start: m.Virtual, Count: 1})
		}
		return nil
	})
	return out, err
}

// WalkThinMappings calls fn for each mapping of thin device thinID, in
// ascending order of virtual block, as ThinMappings reads them; an error
// from fn stops the walk and is returned.
func WalkThinMappings(read ReadMetadataBlock, mappingRoot uint64, thinID uint32, fn func(ThinMapping) error) error {
	w := &btreeWalker{read: read, buf: make([]byte, MetadataBlockBytes), seen: map[uint64]bool{}}
	root, err := w.lookup(mappingRoot, uint64(thinID))
	if err != nil {
		return fmt.Errorf("thin device %d: %w", thinID, err)
	}
	first := true
	var last uint64
	err = w.walk(root, 0, func(key, value uint64) error {
		// Each node's keys ascend (ParseBtreeNode); this holds the
		// nodes to each other, so the ranges come out sorted.
		if !first && key <= last {
			return fmt.Errorf("%w: virtual block %d after %d", ErrCorruptMetadata, key, last)
		}
		first, last = false, key
		return fn(ThinMapping{Virtual: key, Data: value >> thinTimeBits, Time: uint32(value & thinTimeMask)})
	})
	if err != nil {
		return fmt.Errorf("thin device %d's mappings (tree at block %d): %w", thinID, root, err)
	}
	return nil
}

// btreeWalker reads the nodes of one walk, each at most once.
type btreeWalker struct {
	read ReadMetadataBlock
	buf  []byte
	seen map[uint64]bool
}

func (w *btreeWalker) node(block uint64, depth int) (BtreeNode, error) {
	if depth >= btreeMaxDepth {
		return BtreeNode{}, fmt.Errorf("%w: btree deeper than %d nodes at block %d", ErrCorruptMetadata, btreeMaxDepth, block)
	}
	if w.seen[block] {
		return BtreeNode{}, fmt.Errorf("%w: btree node at block %d reached twice (a loop)", ErrCorruptMetadata, block)
	}
	w.seen[block] = true
	if err := w.read(block, w.buf); err != nil {
		return BtreeNode{}, fmt.Errorf("read metadata block %d: %w", block, err)
	}
	return ParseBtreeNode(w.buf, block)
}

// lookup finds key's value in the tree at root: at each internal node the
// child whose range holds key, at the leaf key itself.
func (w *btreeWalker) lookup(root, key uint64) (uint64, error) {
	block := root
	for depth := 0; ; depth++ {
		n, err := w.node(block, depth)
		if err != nil {
			return 0, err
		}
		i, found := slices.BinarySearch(n.Keys, key)
		if n.Leaf {
			if !found {
				return 0, ErrNoThinDevice
			}
			return n.Values[i], nil
		}
		if !found {
			i-- // the last key below
		}
		if i < 0 {
			return 0, ErrNoThinDevice
		}
		block = n.Values[i]
	}
}

// walk calls fn for each entry of the leaves under block, in order.
func (w *btreeWalker) walk(block uint64, depth int, fn func(key, value uint64) error) error {
	n, err := w.node(block, depth)
	if err != nil {
		return err
	}
	for i, k := range n.Keys {
		if n.Leaf {
			err = fn(k, n.Values[i])
		} else {
			err = w.walk(n.Values[i], depth+1, fn)
		}
		if err != nil {
			return err
		}
	}
	return nil
}
