package devmapper

import (
	"encoding/binary"
	"errors"
	"testing"
)

// nameListRecord builds one struct dm_name_list record the way the kernel
// lays it out (list_devices in drivers/md/dm-ioctl.c).
func nameListRecord(dev uint64, name, uuid string, eventNr uint32, last bool) []byte {
	ne := binary.NativeEndian
	extra := (nameListHeaderSize + len(name) + 1 + 7) &^ 7
	size := extra + 8
	if uuid != "" {
		size += len(uuid) + 1
	}
	size = (size + 7) &^ 7
	b := make([]byte, size)
	ne.PutUint64(b, dev)
	if !last {
		ne.PutUint32(b[8:], uint32(size))
	}
	copy(b[nameListHeaderSize:], name)
	ne.PutUint32(b[extra:], eventNr)
	if uuid != "" {
		ne.PutUint32(b[extra+4:], 1) // DM_NAME_LIST_FLAG_HAS_UUID
		copy(b[extra+8:], uuid)
	} else {
		ne.PutUint32(b[extra+4:], 2) // DM_NAME_LIST_FLAG_DOESNT_HAVE_UUID
	}
	return b
}

func TestParseNameList(t *testing.T) {
	var b []byte
	b = append(b, nameListRecord(uint64(MakeDev(254, 0)), "pool", "DMTHIN-pool-1", 3, false)...)
	b = append(b, nameListRecord(uint64(MakeDev(254, 1)), "a-very-long-thin-device-name", "", 0, false)...)
	b = append(b, nameListRecord(uint64(MakeDev(254, 300)), "x", "u", 7, true)...)
	got, err := parseNameList(b)
	if err != nil {
		t.Fatal(err)
	}
	want := []ListEntry{
		{Name: "pool", Dev: MakeDev(254, 0), UUID: "DMTHIN-pool-1", EventNr: 3},
		{Name: "a-very-long-thin-device-name", Dev: MakeDev(254, 1)},
		{Name: "x", Dev: MakeDev(254, 300), UUID: "u", EventNr: 7},
	}
	if len(got) != len(want) {
		t.Fatalf("got %d entries: %+v", len(got), got)
	}
	for i := range want {
		if got[i] != want[i] {
			t.Errorf("entry %d: got %+v, want %+v", i, got[i], want[i])
		}
	}

	// An empty list is one zeroed record, or nothing at all on a system
	// that has never had a dm device; a few stray bytes are not a list.
	if got, err := parseNameList(make([]byte, 16)); err != nil || len(got) != 0 {
		t.Errorf("empty list: %+v, %v", got, err)
	}
	if got, err := parseNameList(nil); err != nil || len(got) != 0 {
		t.Errorf("zero-byte list: %+v, %v", got, err)
	}
	if _, err := parseNameList(make([]byte, 4)); !errors.Is(err, ErrParse) {
		t.Errorf("4-byte list: %v", err)
	}
	// Records from kernels before 4.46 end after the name.
	old := make([]byte, 24)
	binary.NativeEndian.PutUint64(old, uint64(MakeDev(253, 2)))
	copy(old[12:], "legacy")
	if got, err := parseNameList(old); err != nil || len(got) != 1 || got[0].Name != "legacy" || got[0].UUID != "" {
		t.Errorf("old record: %+v, %v", got, err)
	}
	// A next that points outside the buffer is an error, not a panic.
	bad := nameListRecord(5, "n", "", 0, false)
	binary.NativeEndian.PutUint32(bad[8:], 4096)
	if _, err := parseNameList(bad); !errors.Is(err, ErrParse) {
		t.Errorf("bad next: %v", err)
	}
}

func TestMarshalTableAndParseSpecs(t *testing.T) {
	table := []Target{
		{StartSector: 0, LengthSectors: 2048, Type: "linear", Params: "7:0 0"},
		{StartSector: 2048, LengthSectors: 100, Type: "thin", Params: "254:0 12345 7:9"},
	}
	b, err := marshalTable(table)
	if err != nil {
		t.Fatal(err)
	}
	if len(b)%8 != 0 {
		t.Errorf("specs not 8-byte aligned: %d bytes", len(b))
	}
	// When loading, next is relative to each spec; the kernel prints them
	// back relative to the first. Convert to check parseTargetSpecs.
	ne := binary.NativeEndian
	first := ne.Uint32(b[20:])
	if first != uint32(targetSpecSize+len("7:0 0")+1+7)&^7 {
		t.Errorf("first spec's next = %d", first)
	}
	ne.PutUint32(b[first+20:], uint32(len(b)))
	got, err := parseTargetSpecs(b, 2)
	if err != nil {
		t.Fatal(err)
	}
	for i := range table {
		if got[i] != table[i] {
			t.Errorf("spec %d: got %+v, want %+v", i, got[i], table[i])
		}
	}
	if _, err := parseTargetSpecs(b[:30], 1); !errors.Is(err, ErrParse) {
		t.Errorf("truncated: %v", err)
	}

	for name, bad := range map[string][]Target{
		"empty":      nil,
		"gap":        {{StartSector: 1, LengthSectors: 1, Type: "linear", Params: "7:0 0"}},
		"zero":       {{StartSector: 0, LengthSectors: 0, Type: "linear", Params: "7:0 0"}},
		"long type":  {{StartSector: 0, LengthSectors: 1, Type: "a-type-name-over-15", Params: ""}},
		"nul params": {{StartSector: 0, LengthSectors: 1, Type: "linear", Params: "7:0\x00 0"}},
	} {
		if _, err := marshalTable(bad); !errors.Is(err, ErrInvalid) {
			t.Errorf("%s: %v, want ErrInvalid", name, err)
		}
	}
}

func FuzzParseNameList(f *testing.F) {
	f.Add(nameListRecord(1, "pool", "uuid", 1, true))
	f.Add(append(nameListRecord(1, "a", "", 0, false), nameListRecord(2, "b", "u", 0, true)...))
	f.Add(make([]byte, 16))
	f.Fuzz(func(t *testing.T, b []byte) {
		_, _ = parseNameList(b) // must not panic or loop
	})
}

func FuzzParseTargetSpecs(f *testing.F) {
	b, _ := marshalTable([]Target{{StartSector: 0, LengthSectors: 8, Type: "linear", Params: "7:0 0"}})
	f.Add(b, 1)
	f.Add([]byte{}, 3)
	f.Fuzz(func(t *testing.T, b []byte, n int) {
		if n < 0 || n > 1000 {
			return
		}
		_, _ = parseTargetSpecs(b, n)
	})
}
