package devmapper

import (
	"encoding/binary"
	"errors"
	"fmt"
	"maps"
	"reflect"
	"slices"
	"strings"
	"testing"
)

// testMeta is a metadata device of the tests: written blocks by number.
type testMeta map[uint64][]byte

func (m testMeta) read(block uint64, buf []byte) error {
	b, ok := m[block]
	if !ok {
		return fmt.Errorf("block %d was never written", block)
	}
	copy(buf, b)
	return nil
}

// treeWriter is the tests' writer of btrees: nodes with room for fanout
// entries (few, to make deep trees of few keys), at blocks from 1 up.
type treeWriter struct {
	meta   testMeta
	next   uint64
	fanout int
}

func newTreeWriter(fanout int) *treeWriter {
	return &treeWriter{meta: testMeta{}, next: 1, fanout: fanout}
}

func (w *treeWriter) put(n BtreeNode) uint64 {
	n.BlockNr, n.MaxEntries = w.next, uint32(w.fanout)
	w.next++
	b := make([]byte, MetadataBlockBytes)
	n.Put(b)
	w.meta[n.BlockNr] = b
	return n.BlockNr
}

// tree writes a btree of keys (ascending) and values and returns its root:
// leaves of fanout entries, then levels of internal nodes over them.
func (w *treeWriter) tree(keys, values []uint64) uint64 {
	if len(keys) == 0 {
		return w.put(BtreeNode{Leaf: true})
	}
	leaf := true
	for {
		var upKeys, upBlocks []uint64
		for i := 0; i < len(keys); i += w.fanout {
			j := min(i+w.fanout, len(keys))
			upKeys = append(upKeys, keys[i])
			upBlocks = append(upBlocks, w.put(BtreeNode{Leaf: leaf, Keys: keys[i:j], Values: values[i:j]}))
		}
		if len(upBlocks) == 1 {
			return upBlocks[0]
		}
		keys, values, leaf = upKeys, upBlocks, false
	}
}

// mappingTree writes the two-level tree of devs: thin id -> virtual block
// -> data block (time = the virtual block's low bits, to check the
// unpacking).
func (w *treeWriter) mappingTree(devs map[uint32]map[uint64]uint64) uint64 {
	var ids, roots []uint64
	for _, id := range slices.Sorted(maps.Keys(devs)) {
		m := devs[id]
		vbs := slices.Sorted(maps.Keys(m))
		vals := make([]uint64, len(vbs))
		for i, vb := range vbs {
			vals[i] = m[vb]<<thinTimeBits | vb&0xff
		}
		ids = append(ids, uint64(id))
		roots = append(roots, w.tree(vbs, vals))
	}
	return w.tree(ids, roots)
}

func blocksOf(vbs ...uint64) map[uint64]uint64 {
	m := map[uint64]uint64{}
	for i, vb := range vbs {
		m[vb] = uint64(1000 + i)
	}
	return m
}

func span(from, n uint64) []uint64 {
	var out []uint64
	for i := range n {
		out = append(out, from+i)
	}
	return out
}

func TestThinMappings(t *testing.T) {
	many := span(0, 1000)
	for _, fanout := range []int{3, 16, BtreeMaxEntries} {
		t.Run(fmt.Sprint("fanout", fanout), func(t *testing.T) {
			devs := map[uint32]map[uint64]uint64{
				0:           blocksOf(),
				1:           blocksOf(0, 1, 2, 7, 9, 10, 1<<40, 1<<40+1),
				2:           blocksOf(many...),
				7:           blocksOf(slices.Concat(span(5, 10), span(100, 1), span(200, 300))...),
				MaxDeviceID: blocksOf(3),
			}
			for id := uint32(10); id < 60; id++ { // a top level of many devices
				devs[id] = blocksOf(uint64(id))
			}
			w := newTreeWriter(fanout)
			root := w.mappingTree(devs)
			for _, c := range []struct {
				id   uint32
				want []BlockRange
			}{
				{0, nil},
				{1, []BlockRange{{0, 3}, {7, 1}, {9, 2}, {1 << 40, 2}}},
				{2, []BlockRange{{0, 1000}}},
				{7, []BlockRange{{5, 10}, {100, 1}, {200, 300}}},
				{MaxDeviceID, []BlockRange{{3, 1}}},
				{33, []BlockRange{{33, 1}}},
			} {
				got, err := ThinMappings(w.meta.read, root, c.id)
				if err != nil || !reflect.DeepEqual(got, c.want) {
					t.Errorf("device %d: %v, %v; want %v", c.id, got, err, c.want)
				}
			}
			for _, id := range []uint32{3, 8, 9, 60, 1000} {
				if got, err := ThinMappings(w.meta.read, root, id); !errors.Is(err, ErrNoThinDevice) {
					t.Errorf("device %d, not in the tree: %v, %v", id, got, err)
				}
			}
			var got []ThinMapping
			err := WalkThinMappings(w.meta.read, root, 1, func(m ThinMapping) error { got = append(got, m); return nil })
			want := ThinMapping{Virtual: 1 << 40, Data: 1006, Time: 0}
			if err != nil || len(got) != 8 || got[6] != want || got[1] != (ThinMapping{Virtual: 1, Data: 1001, Time: 1}) {
				t.Errorf("walk of device 1: %+v, %v", got, err)
			}
		})
	}
}

func TestWalkThinMappingsStops(t *testing.T) {
	w := newTreeWriter(4)
	root := w.mappingTree(map[uint32]map[uint64]uint64{1: blocksOf(span(0, 50)...)})
	stop := errors.New("stop")
	n := 0
	err := WalkThinMappings(w.meta.read, root, 1, func(ThinMapping) error {
		if n++; n == 10 {
			return stop
		}
		return nil
	})
	if !errors.Is(err, stop) || n != 10 {
		t.Errorf("after %d mappings: %v", n, err)
	}
}

func TestBtreeMaxEntries(t *testing.T) {
	// (4096 - 32) / 16 = 254 pairs of __le64, rounded down to 252.
	if BtreeMaxEntries != 252 {
		t.Errorf("BtreeMaxEntries %d, want 252", BtreeMaxEntries)
	}
}

func TestBtreeChecksumKnown(t *testing.T) {
	// dm_bm_checksum of a block that is all zeros after the checksum
	// field, worked out bit by bit (as TestSuperblockChecksumKnown), xor
	// BTREE_CSUM_XOR: a node with these bytes fails on everything but its
	// checksum.
	b := make([]byte, MetadataBlockBytes)
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
	binary.LittleEndian.PutUint32(b, crc^121107)
	if _, err := ParseBtreeNode(b, 0); err == nil || !errors.Is(err, ErrCorruptMetadata) || strings.Contains(err.Error(), "checksum") {
		t.Errorf("a zero block with its checksum: %v, want an error about its flags", err)
	}
}

func TestBtreeNodeRoundTrip(t *testing.T) {
	n := BtreeNode{BlockNr: 77, Leaf: true, MaxEntries: 9, Keys: []uint64{1, 5, 1 << 50}, Values: []uint64{10, 50, 1<<63 + 1}}
	b := make([]byte, MetadataBlockBytes)
	for i := range b {
		b[i] = 0xee // Put zeroes what the node does not use
	}
	n.Put(b)
	got, err := ParseBtreeNode(b, 77)
	if err != nil || !reflect.DeepEqual(got, n) {
		t.Fatalf("parsed %+v, %v; want %+v", got, err, n)
	}
	if b[len(b)-1] != 0 {
		t.Error("Put left bytes past the node's arrays")
	}
}

// corruptTree returns a tree of one device whose root is an internal node
// over two leaves, with the first leaf changed by f (and its checksum fixed
// unless keepSum).
func corruptTree(t *testing.T, f func(b []byte, w *treeWriter), keepSum bool) (testMeta, uint64) {
	t.Helper()
	w := newTreeWriter(4)
	root := w.mappingTree(map[uint32]map[uint64]uint64{1: blocksOf(span(0, 8)...)})
	// Blocks: 1 and 2 the device's leaves, 3 its root, 4 the top level.
	f(w.meta[1], w)
	if !keepSum {
		binary.LittleEndian.PutUint32(w.meta[1], btreeChecksum(w.meta[1]))
	}
	return w.meta, root
}

func TestThinMappingsCorrupt(t *testing.T) {
	le := binary.LittleEndian
	values := func(b []byte) int { return btHeaderBytes + 8*int(le.Uint32(b[btOffMaxEntries:])) }
	for _, c := range []struct {
		name    string
		f       func(b []byte, w *treeWriter)
		keepSum bool
		want    string
	}{
		{"checksum", func(b []byte, _ *treeWriter) { b[100]++ }, true, "checksum"},
		{"block number", func(b []byte, _ *treeWriter) { le.PutUint64(b[btOffBlockNr:], 2) }, false, "written for block 2"},
		{"flags none", func(b []byte, _ *treeWriter) { le.PutUint32(b[btOffFlags:], 0) }, false, "flags"},
		{"flags both", func(b []byte, _ *treeWriter) { le.PutUint32(b[btOffFlags:], 3) }, false, "flags"},
		{"entries over room", func(b []byte, _ *treeWriter) { le.PutUint32(b[btOffNrEntries:], BtreeMaxEntries+1) }, false, "entries"},
		{"room over block", func(b []byte, _ *treeWriter) { le.PutUint32(b[btOffMaxEntries:], 255) }, false, "does not fit"},
		{"value size", func(b []byte, _ *treeWriter) { le.PutUint32(b[btOffValueSize:], 24) }, false, "values of 24 bytes"},
		{"keys out of order", func(b []byte, _ *treeWriter) { le.PutUint64(b[btHeaderBytes+8:], 0) }, false, "not above"},
		// The first leaf's last key moved past the second leaf's first.
		{"keys out of order across nodes", func(b []byte, _ *treeWriter) { le.PutUint64(b[btHeaderBytes+8*3:], 4) }, false, "after"},
		{"loop", func(b []byte, _ *treeWriter) {
			// The leaf becomes an internal node pointing at the root.
			le.PutUint32(b[btOffFlags:], btreeInternal)
			le.PutUint64(b[values(b):], 3)
		}, false, "reached twice"},
		{"depth", func(b []byte, w *treeWriter) {
			// The leaf becomes the top of a chain of internal nodes,
			// each a different block, deeper than a btree can be.
			next := w.next
			for i := range btreeMaxDepth {
				w.put(BtreeNode{Keys: []uint64{0}, Values: []uint64{next + uint64(i) + 1}})
			}
			le.PutUint32(b[btOffFlags:], btreeInternal)
			le.PutUint32(b[btOffNrEntries:], 1)
			le.PutUint64(b[values(b):], next)
		}, false, "deeper than"},
		{"internal node without entries", func(b []byte, _ *treeWriter) {
			le.PutUint32(b[btOffFlags:], btreeInternal)
			le.PutUint32(b[btOffNrEntries:], 0)
		}, false, "no entries"},
		{"unwritten child", func(b []byte, _ *treeWriter) {
			le.PutUint32(b[btOffFlags:], btreeInternal)
			le.PutUint64(b[values(b):], 999)
		}, false, "never written"},
	} {
		t.Run(c.name, func(t *testing.T) {
			meta, root := corruptTree(t, c.f, c.keepSum)
			got, err := ThinMappings(meta.read, root, 1)
			if err == nil || !strings.Contains(err.Error(), c.want) {
				t.Fatalf("%v, %v; want an error about %q", got, err, c.want)
			}
			if c.name != "unwritten child" && !errors.Is(err, ErrCorruptMetadata) {
				t.Errorf("%v does not wrap ErrCorruptMetadata", err)
			}
			t.Log(err)
		})
	}
}

func TestThinMappingsCorruptTopLevel(t *testing.T) {
	w := newTreeWriter(4)
	root := w.mappingTree(map[uint32]map[uint64]uint64{1: blocksOf(1)})
	w.meta[root][200]++
	if _, err := ThinMappings(w.meta.read, root, 1); !errors.Is(err, ErrCorruptMetadata) {
		t.Errorf("a top level with a bad checksum: %v", err)
	}
	// A top-level value naming the top level itself.
	w = newTreeWriter(4)
	root = w.mappingTree(map[uint32]map[uint64]uint64{1: blocksOf(1)})
	w.put(BtreeNode{Leaf: true, Keys: []uint64{1}, Values: []uint64{w.next}})
	if _, err := ThinMappings(w.meta.read, w.next-1, 1); !errors.Is(err, ErrCorruptMetadata) {
		t.Errorf("a device tree that is the top level: %v", err)
	}
}
