package thinpooltest

import (
	"reflect"
	"testing"

	"github.com/csi-dmthin/csi-dmthin/pkg/devmapper"
)

// fkHeldMappings reads thin id's mappings from the pool's held metadata
// snapshot, as Pool.MappedExtents does.
func fkHeldMappings(t *testing.T, p *fkPool, id uint32) []devmapper.BlockRange {
	t.Helper()
	read := func(block uint64, buf []byte) error {
		return p.k.ReadBlock(p.meta, int64(block)*devmapper.MetadataBlockBytes, buf)
	}
	buf := make([]byte, devmapper.SuperblockBytes)
	if err := read(0, buf); err != nil {
		t.Fatal(err)
	}
	sb, _, _ := devmapper.ParseSuperblock(buf)
	if sb.HeldRoot == 0 {
		t.Fatal("no held root")
	}
	if err := read(sb.HeldRoot, buf); err != nil {
		t.Fatal(err)
	}
	held, ok, err := devmapper.ParseSuperblock(buf)
	if !ok || err != nil || !devmapper.SuperblockChecksumValid(buf) || held.BlockNr != sb.HeldRoot || held.HeldRoot != 0 {
		t.Fatalf("held superblock copy %+v, ok %v, %v", held, ok, err)
	}
	if held.TransactionID != sb.TransactionID || held.DataBlockSectors != sb.DataBlockSectors {
		t.Errorf("held copy %+v of superblock %+v", held, sb)
	}
	got, err := devmapper.ThinMappings(read, held.DataMappingRoot, id)
	if err != nil {
		t.Fatal(err)
	}
	return got
}

// A held snapshot's trees hold every device's mappings as they were at the
// reserve, through trees of more than one level (more devices, and more
// blocks of one device, than a node holds).
func TestFakeMetadataSnapTrees(t *testing.T) {
	k := NewFakeKernel()
	p := newFkPool(t, k, 64<<20, 0, devmapper.ThinPoolFeatures{})
	const devs = devmapper.BtreeMaxEntries + 50
	for id := range uint32(devs) {
		p.message(t, devmapper.CreateThin{DeviceID: id})
	}
	thin := p.activate(t, 7, 64<<20/devmapper.SectorSize)
	const first = 600 // blocks 0 to 599, then 700, 701
	if err := k.Write(thin.Dev, 0, first*fkBlockBytes); err != nil {
		t.Fatal(err)
	}
	if err := k.Write(thin.Dev, 700*fkBlockBytes+5, 2*fkBlockBytes-10); err != nil {
		t.Fatal(err)
	}
	p.message(t, devmapper.CreateSnap{DeviceID: devs, OriginID: 7})
	p.message(t, devmapper.ReserveMetadataSnap{})
	// After the reserve: not in the held snapshot.
	if err := k.Write(thin.Dev, 900*fkBlockBytes, 1); err != nil {
		t.Fatal(err)
	}
	want := []devmapper.BlockRange{{Start: 0, Count: first}, {Start: 700, Count: 2}}
	for _, id := range []uint32{7, devs} {
		if got := fkHeldMappings(t, p, id); !reflect.DeepEqual(got, want) {
			t.Errorf("device %d: %v, want %v", id, got, want)
		}
	}
	if got := fkHeldMappings(t, p, devs-1); got != nil {
		t.Errorf("an empty device maps %v", got)
	}
	p.message(t, devmapper.ReleaseMetadataSnap{})
	p.message(t, devmapper.ReserveMetadataSnap{})
	want = append(want, devmapper.BlockRange{Start: 900, Count: 1})
	if got := fkHeldMappings(t, p, 7); !reflect.DeepEqual(got, want) {
		t.Errorf("device 7 in the second snapshot: %v, want %v", got, want)
	}
}
