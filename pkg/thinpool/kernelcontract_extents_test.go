package thinpool

import (
	"reflect"
	"testing"

	"github.com/csi-dmthin/csi-dmthin/pkg/devmapper"
)

// The kernel contract's held metadata snapshot: the mapping btrees it holds
// are the ones pkg/devmapper reads, with every write that completed before
// the reserve in them. Through a Pool's MappedExtents, which is what the
// copy of issue 16 reads, on the fake (whose reserve writes the btrees)
// and on the kernel, where thin_dump, when the VM has it, reads the same
// snapshot as a second opinion (see metadataDumper).

// metadataDumper is an env that can list a held metadata snapshot's
// mappings with a tool of its own: the kernel's (thin_dump -m). ok is
// false when it cannot (the tool is missing).
type metadataDumper interface {
	heldMappings(t *testing.T, metaDev Dev) (devs map[uint32][]devmapper.ThinMapping, ok bool)
}

func kcMappedExtents(t *testing.T, e env) {
	p := openPool(t, e, testConfig(t, kcName("extents"), 64<<20))
	defer teardown(t, e, p)
	bs := int64(p.rec.BlockSectors) * devmapper.SectorSize
	const page = 4096
	// 21 blocks, the last one 8 KiB long.
	size := 20*bs + 2*page
	if _, err := p.CreateVolume(ctx, "vol", size); err != nil {
		t.Fatal(err)
	}
	if _, err := p.CreateVolume(ctx, "empty", size); err != nil {
		t.Fatal(err)
	}
	write := func(off, n int64) {
		t.Helper()
		if err := e.write(t, p, "vol", off, pattern(byte(off/page), int(n))); err != nil {
			t.Fatalf("write %d bytes at %d: %v", n, off, err)
		}
	}
	write(0, page)            // the first block
	write(6*bs-page, 2*page)  // blocks 5 and 6, one write across them
	write(10*bs+2*page, page) // a middle block
	write(14*bs+bs/2, page)   // a page inside a block
	write(20*bs+page, page)   // the last block, which is partial
	want := []Extent{{0, bs}, {5 * bs, 2 * bs}, {10 * bs, bs}, {14 * bs, bs}, {20 * bs, 2 * page}}
	check := func(name string, want []Extent) {
		t.Helper()
		got, err := p.MappedExtents(ctx, name)
		if err != nil || !reflect.DeepEqual(got, want) {
			t.Errorf("%s: mapped %v, %v; want %v", name, got, err, want)
		}
	}
	check("vol", want)
	check("empty", nil)
	if _, err := p.Snapshot(ctx, "snap", "vol"); err != nil {
		t.Fatal(err)
	}
	check("snap", want)
	write(7*bs, page) // joins blocks 5 and 6
	write(0, page)    // a shared block, copied: still mapped once
	write(17*bs+bs-page, page)
	check("vol", []Extent{{0, bs}, {5 * bs, 3 * bs}, {10 * bs, bs}, {14 * bs, bs}, {17 * bs, bs}, {20 * bs, 2 * page}})
	check("snap", want)
	if st, err := p.poolStatus(); err != nil || st.HeldMetadataRoot != 0 {
		t.Errorf("after MappedExtents the pool holds a metadata snapshot: %+v, %v", st, err)
	}

	// A second opinion on the same snapshot, with data blocks.
	d, ok := e.(metadataDumper)
	if !ok {
		return
	}
	tbl, err := p.k.Table(p.dev)
	if err != nil {
		t.Fatal(err)
	}
	params, err := devmapper.ParseThinPoolParams(tbl[0].Params)
	if err != nil {
		t.Fatal(err)
	}
	if err := p.k.Message(p.dev, devmapper.ReserveMetadataSnap{}); err != nil {
		t.Fatal(err)
	}
	defer func() {
		if err := p.k.Message(p.dev, devmapper.ReleaseMetadataSnap{}); err != nil {
			t.Error(err)
		}
	}()
	dumped, ok := d.heldMappings(t, params.MetadataDev)
	if !ok {
		return
	}
	for _, name := range []string{"vol", "snap", "empty"} {
		v, err := p.Get(name)
		if err != nil {
			t.Fatal(err)
		}
		ours := heldThinMappings(t, p.k, params.MetadataDev, v.DeviceID)
		if theirs := dumped[v.DeviceID]; !reflect.DeepEqual(ours, theirs) && len(ours)+len(theirs) > 0 {
			t.Errorf("%s (thin id %d): devmapper reads %v, thin_dump %v", name, v.DeviceID, ours, theirs)
		}
	}
}

// heldThinMappings reads thin id's mappings, data blocks and times too,
// from the held metadata snapshot on metaDev.
func heldThinMappings(t *testing.T, k Kernel, metaDev Dev, id uint32) []devmapper.ThinMapping {
	t.Helper()
	buf := make([]byte, devmapper.MetadataBlockBytes)
	read := func(block uint64, b []byte) error {
		return k.ReadBlock(metaDev, int64(block)*devmapper.MetadataBlockBytes, b)
	}
	if err := read(0, buf); err != nil {
		t.Fatal(err)
	}
	sb, _, _ := devmapper.ParseSuperblock(buf)
	if err := read(sb.HeldRoot, buf); err != nil {
		t.Fatal(err)
	}
	held, _, _ := devmapper.ParseSuperblock(buf)
	var out []devmapper.ThinMapping
	err := devmapper.WalkThinMappings(read, held.DataMappingRoot, id, func(m devmapper.ThinMapping) error {
		out = append(out, m)
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return out
}
