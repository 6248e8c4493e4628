package thinpool

import (
	"errors"
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
		theirs, listed := dumped[v.DeviceID]
		if !listed || !reflect.DeepEqual(ours, theirs) {
			t.Errorf("%s (thin id %d): devmapper reads %v, thin_dump %v (listed %v)", name, v.DeviceID, ours, theirs, listed)
			continue
		}
		t.Logf("%s (thin id %d): thin_dump reads the same %d mappings (virtual, data block, time)", name, v.DeviceID, len(ours))
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

// kcHeldMappingTrees checks the reader on trees of more than one level,
// which the kernel grows past a node's 252 entries: more thin devices
// than that in the top level, more mapped blocks of one device than that
// in its tree.
func kcHeldMappingTrees(t *testing.T, e env) {
	p := newKCPool(t, e, 64<<20, 0, devmapper.ThinPoolFeatures{})
	const devs = devmapper.BtreeMaxEntries + 48
	for id := range uint32(devs) {
		p.message(t, devmapper.CreateThin{DeviceID: id})
	}
	big := p.activate(t, 7, 64<<20/devmapper.SectorSize)
	const first = devmapper.BtreeMaxEntries*2 + 100
	kcWrite(t, e, big.Dev, 0, pattern(7, first*kcBlockBytes))
	kcWrite(t, e, big.Dev, 900*kcBlockBytes, pattern(8, 4096))
	last := p.activate(t, devs-1, 8<<20/devmapper.SectorSize)
	kcWrite(t, e, last.Dev, 3*kcBlockBytes, pattern(9, 4096))
	p.message(t, devmapper.ReserveMetadataSnap{})
	defer p.message(t, devmapper.ReleaseMetadataSnap{})

	read := func(block uint64, b []byte) error {
		return p.k.ReadBlock(p.params.MetadataDev, int64(block)*devmapper.MetadataBlockBytes, b)
	}
	_, sb := p.superblock(t)
	buf := make([]byte, devmapper.MetadataBlockBytes)
	if err := read(sb.HeldRoot, buf); err != nil {
		t.Fatal(err)
	}
	held, ok, err := devmapper.ParseSuperblock(buf)
	if !ok || err != nil || !devmapper.SuperblockChecksumValid(buf) || held.BlockNr != sb.HeldRoot {
		t.Fatalf("the held superblock at %d: %+v, ok %v, %v", sb.HeldRoot, held, ok, err)
	}
	for _, c := range []struct {
		id   uint32
		want []devmapper.BlockRange
	}{
		{7, []devmapper.BlockRange{{Start: 0, Count: first}, {Start: 900, Count: 1}}},
		{devs - 1, []devmapper.BlockRange{{Start: 3, Count: 1}}},
		{devs / 2, nil},
	} {
		got, err := devmapper.ThinMappings(read, held.DataMappingRoot, c.id)
		if err != nil || !reflect.DeepEqual(got, c.want) {
			t.Errorf("thin id %d: %v, %v; want %v", c.id, got, err, c.want)
		}
	}
	if _, err := devmapper.ThinMappings(read, held.DataMappingRoot, devs); !errors.Is(err, devmapper.ErrNoThinDevice) {
		t.Errorf("a thin id the pool has not got: %v", err)
	}

	d, ok := e.(metadataDumper)
	if !ok {
		return
	}
	dumped, ok := d.heldMappings(t, p.params.MetadataDev)
	if !ok {
		return
	}
	if len(dumped) != devs {
		t.Errorf("thin_dump lists %d devices, want %d", len(dumped), devs)
	}
	for id, theirs := range dumped {
		ours := heldThinMappings(t, p.k, p.params.MetadataDev, id)
		if !reflect.DeepEqual(ours, theirs) {
			t.Errorf("thin id %d: devmapper reads %d mappings, thin_dump %d: %v, %v", id, len(ours), len(theirs), ours, theirs)
		}
	}
	t.Logf("thin_dump reads the same mappings of all %d devices (%d of thin id 7)", len(dumped), len(dumped[7]))
}
