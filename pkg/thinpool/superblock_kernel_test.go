//go:build vmtest

package thinpool

import (
	"encoding/hex"
	"testing"

	"github.com/csi-dmthin/csi-dmthin/pkg/devmapper"
)

// TestSuperblockFakeMatchesKernel makes the same pool, with the same
// calls, on the real kernel and on the fake, and compares the superblocks
// they leave on the metadata device: the fields pkg/devmapper parses must
// be equal, and every byte the fake writes must be the kernel's byte at
// that place. The fake writes with pkg/devmapper's layout, which the
// parser shares; this is where a wrong offset in it fails, against bytes
// the kernel wrote, not against our own constants.
func TestSuperblockFakeMatchesKernel(t *testing.T) {
	kernelImg := kcSuperblockImage(t, newKernelEnv(t))
	fakeImg := kcSuperblockImage(t, newFakeEnv(t))
	t.Logf("the kernel's superblock:\n%s", hex.Dump(kernelImg[:384]))
	t.Logf("the fake's superblock:\n%s", hex.Dump(fakeImg[:384]))

	// Fields the fake models rather than copies: the checksum (over the
	// btree roots it leaves zero here) and the metadata blocks in use (a
	// formula, see thinpooltest.FakeKernel). Offsets as in struct
	// thin_disk_superblock, written out here rather than taken from
	// pkg/devmapper.
	modelled := func(off int) bool {
		return off < 4 || // csum
			off >= 192+8 && off < 192+16 // metadata_space_map_root's nr_allocated
	}
	for off, b := range fakeImg {
		if b != 0 && !modelled(off) && kernelImg[off] != b {
			t.Errorf("byte %d: the fake writes %#02x, the kernel %#02x", off, b, kernelImg[off])
		}
	}

	parse := func(name string, img []byte) devmapper.Superblock {
		sb, ok, err := devmapper.ParseSuperblock(img)
		if err != nil || !ok {
			t.Fatalf("%s superblock: ok %v, %v", name, ok, err)
		}
		if !devmapper.SuperblockChecksumValid(img) {
			t.Errorf("%s superblock: checksum %#x does not check", name, img[:4])
		}
		sb.MetadataSpaceMap.NrAllocated = 0 // modelled, above
		// The fake writes btrees only into a held metadata snapshot (see
		// thinpooltest), so block 0 names none.
		sb.DataMappingRoot, sb.DeviceDetailsRoot = 0, 0
		return sb
	}
	if r, f := parse("the kernel's", kernelImg), parse("the fake's", fakeImg); r != f {
		t.Errorf("parsed superblocks differ:\nkernel %+v\nfake   %+v", r, f)
	}
}

// kcSuperblockImage returns block 0 of the metadata device of the pool
// kcSuperblockState makes on e.
func kcSuperblockImage(t *testing.T, e env) []byte {
	t.Helper()
	buf, _ := kcSuperblockState(t, e).superblock(t)
	return buf
}
