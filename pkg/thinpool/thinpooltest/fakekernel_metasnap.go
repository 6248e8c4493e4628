package thinpooltest

import (
	"fmt"
	"maps"
	"slices"

	"golang.org/x/sys/unix"

	"github.com/csi-dmthin/csi-dmthin/pkg/devmapper"
)

// The FakeKernel's held metadata snapshot (reserve_metadata_snap): the
// fake keeps its metadata as maps, not btrees, except here. Reserving a
// snapshot writes what the kernel's would hold into the metadata device,
// in pkg/devmapper's layout: a copy of the superblock at the held root,
// naming a two-level mapping tree (thin id, then virtual block, to data
// block << 24 | time) of real btree nodes. So a reader of the mapping
// tree (devmapper.ThinMappings, through Pool.MappedExtents) runs on the
// fake's metadata as on the kernel's.
//
// What it does not model: the nodes' places (from block 2 up, the copy at
// block 1, overwritten by the next reserve; the kernel's come from its
// space map, which the fake's count of metadata blocks in use does not
// follow), sharing of subtrees between a snapshot and its origin (each
// device gets a tree of its own), the time field (0) and the device
// details tree (its root is 0).

// fakeHeldRoot is where the fake writes the held superblock copy.
const fakeHeldRoot = 1

// fakeWriteMetadataSnap writes the snapshot of m into st and returns its
// held root; ENOSPC when the trees do not fit in the metadata device.
func fakeWriteMetadataSnap(st *fakeStore, m *fakeMeta) (uint64, error) {
	w := fakeTreeWriter{st: st, next: fakeHeldRoot + 1, end: m.metaBlocks}
	ids := slices.Sorted(maps.Keys(m.thins))
	idKeys, roots := make([]uint64, len(ids)), make([]uint64, len(ids))
	for i, id := range ids {
		th := m.thins[id]
		vbs := slices.Sorted(maps.Keys(th.blocks))
		vals := make([]uint64, len(vbs))
		for j, vb := range vbs {
			vals[j] = th.blocks[vb] << 24 // time 0
		}
		idKeys[i], roots[i] = uint64(id), w.tree(vbs, vals)
	}
	root := w.tree(idKeys, roots)
	if w.err != nil {
		return 0, w.err
	}
	sb := fakeSuperblock(m)
	// The copy's space map roots are zeroed (the counts with them), and
	// it holds no snapshot itself.
	sb.BlockNr, sb.HeldRoot, sb.DataMappingRoot = fakeHeldRoot, 0, root
	sb.DataSpaceMap, sb.MetadataSpaceMap = devmapper.SpaceMapCounts{}, devmapper.SpaceMapCounts{}
	b := make([]byte, devmapper.SuperblockBytes)
	sb.Put(b)
	st.write(fakeHeldRoot*devmapper.MetadataBlockBytes, b, 0)
	return fakeHeldRoot, nil
}

// fakeTreeWriter writes btrees into consecutive metadata blocks; err is
// set once one would not fit, and nothing more is written.
type fakeTreeWriter struct {
	st        *fakeStore
	next, end uint64
	err       error
}

func (w *fakeTreeWriter) put(n devmapper.BtreeNode) uint64 {
	if w.err != nil {
		return 0
	}
	if w.next >= w.end {
		w.err = fakeErrno(unix.ENOSPC, fmt.Sprintf("metadata snapshot does not fit in %d metadata blocks", w.end))
		return 0
	}
	n.BlockNr = w.next
	w.next++
	b := make([]byte, devmapper.MetadataBlockBytes)
	n.Put(b)
	w.st.write(int64(n.BlockNr)*devmapper.MetadataBlockBytes, b, 0)
	return n.BlockNr
}

// tree writes a btree of keys (ascending) and values, full leaves then
// full internal nodes over them, as a tree grown by appending would be,
// and returns its root block. An empty tree is an empty leaf, as
// dm_btree_empty makes.
func (w *fakeTreeWriter) tree(keys, values []uint64) uint64 {
	leaf := true
	for {
		var upKeys, upBlocks []uint64
		for i := 0; i < len(keys) || i == 0; i += devmapper.BtreeMaxEntries {
			j := min(i+devmapper.BtreeMaxEntries, len(keys))
			upKeys = append(upKeys, firstOr0(keys[i:j]))
			upBlocks = append(upBlocks, w.put(devmapper.BtreeNode{Leaf: leaf, Keys: keys[i:j], Values: values[i:j]}))
		}
		if len(upBlocks) == 1 {
			return upBlocks[0]
		}
		keys, values, leaf = upKeys, upBlocks, false
	}
}

func firstOr0(s []uint64) uint64 {
	if len(s) == 0 {
		return 0
	}
	return s[0]
}
