package devmapper

import (
	"errors"
	"reflect"
	"testing"

	"golang.org/x/sys/unix"
)

func TestDevRoundTrip(t *testing.T) {
	for _, tc := range []struct{ major, minor uint32 }{{254, 0}, {7, 3}, {253, 255}, {253, 256}, {259, 1 << 19}, {4095, 1<<20 - 1}} {
		d := MakeDev(tc.major, tc.minor)
		if d.Major() != tc.major || d.Minor() != tc.minor {
			t.Errorf("MakeDev(%d,%d) = %d:%d", tc.major, tc.minor, d.Major(), d.Minor())
		}
		back, err := ParseDev(d.String())
		if err != nil || back != d {
			t.Errorf("ParseDev(%q) = %v, %v", d.String(), back, err)
		}
	}
	// The encoding is the one stat(2) uses, the libc makedev.
	for _, tc := range []struct{ major, minor uint32 }{{254, 0}, {7, 300}, {259, 1 << 19}, {5000, 70000}} {
		if got, want := uint64(MakeDev(tc.major, tc.minor)), unix.Mkdev(tc.major, tc.minor); got != want {
			t.Errorf("MakeDev(%d, %d) = %#x, makedev gives %#x", tc.major, tc.minor, got, want)
		}
	}
	for _, bad := range []string{"", "7", "/dev/loop0", "a:1", "1:b", "1:2:3", "-1:2", "4294967296:0"} {
		if _, err := ParseDev(bad); err == nil {
			t.Errorf("ParseDev(%q) succeeded", bad)
		}
	}
}

func TestThinPoolParams(t *testing.T) {
	tests := []struct {
		name string
		in   string
		want ThinPoolParams
		out  string // canonical String(); "" means same as in
	}{
		{
			name: "as dmsetup and docker write it",
			in:   "7:0 7:1 128 32768 1 skip_block_zeroing",
			want: ThinPoolParams{MetadataDev: MakeDev(7, 0), DataDev: MakeDev(7, 1), BlockSectors: 128, LowWaterBlocks: 32768, Features: ThinPoolFeatures{SkipBlockZeroing: true}},
		},
		{
			name: "as the kernel prints it back (count always, trailing space)",
			in:   "7:0 7:1 128 1024 0 ",
			want: ThinPoolParams{MetadataDev: MakeDev(7, 0), DataDev: MakeDev(7, 1), BlockSectors: 128, LowWaterBlocks: 1024},
			out:  "7:0 7:1 128 1024 0",
		},
		{
			name: "captured in the VM",
			in:   "7:0 7:1 128 1000 2 no_discard_passdown error_if_no_space ",
			want: ThinPoolParams{MetadataDev: MakeDev(7, 0), DataDev: MakeDev(7, 1), BlockSectors: 128, LowWaterBlocks: 1000,
				Features: ThinPoolFeatures{NoDiscardPassdown: true, ErrorIfNoSpace: true}},
			out: "7:0 7:1 128 1000 2 no_discard_passdown error_if_no_space",
		},
		{
			name: "no feature count at all",
			in:   "7:0 7:1 128 1024",
			want: ThinPoolParams{MetadataDev: MakeDev(7, 0), DataDev: MakeDev(7, 1), BlockSectors: 128, LowWaterBlocks: 1024},
			out:  "7:0 7:1 128 1024 0",
		},
		{
			name: "every feature, out of the kernel's order",
			in:   "8:16 8:32 2097152 0 5 error_if_no_space read_only no_discard_passdown ignore_discard skip_block_zeroing",
			want: ThinPoolParams{MetadataDev: MakeDev(8, 16), DataDev: MakeDev(8, 32), BlockSectors: 2097152, Features: ThinPoolFeatures{true, true, true, true, true}},
			out:  "8:16 8:32 2097152 0 5 skip_block_zeroing ignore_discard no_discard_passdown read_only error_if_no_space",
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			got, err := ParseThinPoolParams(tc.in)
			if err != nil {
				t.Fatal(err)
			}
			if got != tc.want {
				t.Fatalf("got %+v, want %+v", got, tc.want)
			}
			want := tc.out
			if want == "" {
				want = tc.in
			}
			if got.String() != want {
				t.Errorf("String() = %q, want %q", got.String(), want)
			}
			if tgt := NewTarget(0, 2048, got); tgt.Type != "thin-pool" || tgt.String() != "0 2048 thin-pool "+want {
				t.Errorf("target = %q", tgt.String())
			}
		})
	}
	for _, bad := range []string{
		"", "7:0 7:1 128", "7:0 /dev/loop1 128 0", "7:0 7:1 x 0", "7:0 7:1 128 -1",
		"7:0 7:1 128 0 2 skip_block_zeroing", "7:0 7:1 128 0 1 turbo", "7:0 7:1 128 0 x",
		"7:0 7:1 128 0 2 read_only read_only",
	} {
		if _, err := ParseThinPoolParams(bad); !errors.Is(err, ErrParse) {
			t.Errorf("ParseThinPoolParams(%q) = %v, want ErrParse", bad, err)
		}
	}
}

func TestThinPoolParamsValidate(t *testing.T) {
	ok := ThinPoolParams{MetadataDev: MakeDev(7, 0), DataDev: MakeDev(7, 1), BlockSectors: 128}
	if err := ok.Validate(); err != nil {
		t.Fatal(err)
	}
	for _, bs := range []uint32{0, 64, 129, 2097152 + 128} {
		p := ok
		p.BlockSectors = bs
		if err := p.Validate(); !errors.Is(err, ErrInvalid) {
			t.Errorf("block %d: %v", bs, err)
		}
	}
	p := ok
	p.DataDev = 0
	if err := p.Validate(); !errors.Is(err, ErrInvalid) {
		t.Errorf("no data dev: %v", err)
	}
}

func TestThinAndLinearParams(t *testing.T) {
	th, err := ParseThinParams("254:0 16777215 7:5")
	if err != nil {
		t.Fatal(err)
	}
	if want := (ThinParams{PoolDev: MakeDev(254, 0), DeviceID: MaxDeviceID, ExternalOrigin: MakeDev(7, 5)}); th != want {
		t.Fatalf("got %+v", th)
	}
	if th.String() != "254:0 16777215 7:5" || th.TargetType() != "thin" {
		t.Errorf("String() = %q", th.String())
	}
	if s := (ThinParams{PoolDev: MakeDev(254, 0), DeviceID: 3}).String(); s != "254:0 3" {
		t.Errorf("no origin: %q", s)
	}
	for _, bad := range []string{"254:0", "254:0 16777216", "254:0 -1", "254:0 1 0:0", "254:0 1 2 3", "pool 1"} {
		if _, err := ParseThinParams(bad); !errors.Is(err, ErrParse) {
			t.Errorf("ParseThinParams(%q) = %v", bad, err)
		}
	}
	l, err := ParseLinearParams("7:2 2048")
	if err != nil || l != (LinearParams{Dev: MakeDev(7, 2), OffsetSectors: 2048}) || l.String() != "7:2 2048" {
		t.Errorf("linear: %+v %v", l, err)
	}
	for _, bad := range []string{"7:2", "7:2 x", "7:2 1 2"} {
		if _, err := ParseLinearParams(bad); !errors.Is(err, ErrParse) {
			t.Errorf("ParseLinearParams(%q) = %v", bad, err)
		}
	}
}

func TestParseTarget(t *testing.T) {
	got, err := ParseTarget("0 2097152 thin 254:0 7")
	want := Target{StartSector: 0, LengthSectors: 2097152, Type: "thin", Params: "254:0 7"}
	if err != nil || got != want {
		t.Fatalf("got %+v, %v", got, err)
	}
	if got.String() != "0 2097152 thin 254:0 7" {
		t.Errorf("String() = %q", got.String())
	}
	for _, bad := range []string{"", "0 1", "x 1 linear", "0 y linear"} {
		if _, err := ParseTarget(bad); !errors.Is(err, ErrParse) {
			t.Errorf("ParseTarget(%q) = %v", bad, err)
		}
	}
}

func TestMessages(t *testing.T) {
	tests := []struct {
		in   string
		want Message
	}{
		{"create_thin 0", CreateThin{0}},
		{"create_thin 16777215", CreateThin{MaxDeviceID}},
		{"create_snap 5 3", CreateSnap{DeviceID: 5, OriginID: 3}},
		{"delete 9", Delete{9}},
		{"set_transaction_id 0 1", SetTransactionID{Current: 0, New: 1}},
		{"set_transaction_id 18446744073709551614 18446744073709551615", SetTransactionID{1<<64 - 2, 1<<64 - 1}},
		{"reserve_metadata_snap", ReserveMetadataSnap{}},
		{"release_metadata_snap", ReleaseMetadataSnap{}},
	}
	for _, tc := range tests {
		got, err := ParseMessage(tc.in)
		if err != nil {
			t.Errorf("ParseMessage(%q): %v", tc.in, err)
			continue
		}
		if !reflect.DeepEqual(got, tc.want) {
			t.Errorf("ParseMessage(%q) = %#v, want %#v", tc.in, got, tc.want)
		}
		if got.String() != tc.in {
			t.Errorf("String() = %q, want %q", got.String(), tc.in)
		}
	}
	for _, bad := range []string{"", "create_thin", "create_thin 16777216", "create_thin -1", "create_snap 1",
		"delete 1 2", "set_transaction_id 1", "set_transaction_id a 1", "reserve_metadata_snap now", "trim 1"} {
		if _, err := ParseMessage(bad); !errors.Is(err, ErrParse) {
			t.Errorf("ParseMessage(%q) = %v, want ErrParse", bad, err)
		}
	}
}
