package devmapper

import (
	"errors"
	"testing"
)

func TestParseThinPoolStatus(t *testing.T) {
	tests := []struct {
		name string
		line string
		want ThinPoolStatus
		// canonical is what String() prints; "" means the line itself.
		canonical string
	}{
		{
			name: "fresh pool, captured on Debian 6.1",
			line: "0 421/4096 80/16384 - rw discard_passdown queue_if_no_space - 1024",
			want: ThinPoolStatus{UsedMetadataBlocks: 421, TotalMetadataBlocks: 4096, UsedDataBlocks: 80, TotalDataBlocks: 16384,
				Mode: PoolReadWrite, Discard: DiscardPassdown, MetadataLowWatermark: 1024},
		},
		{
			name: "kernel's trailing space",
			line: "7 15/512 0/256 - rw no_discard_passdown error_if_no_space - 128 ",
			want: ThinPoolStatus{TransactionID: 7, UsedMetadataBlocks: 15, TotalMetadataBlocks: 512, TotalDataBlocks: 256,
				Mode: PoolReadWrite, Discard: NoDiscardPassdown, ErrorIfNoSpace: true, MetadataLowWatermark: 128},
			canonical: "7 15/512 0/256 - rw no_discard_passdown error_if_no_space - 128",
		},
		{
			name: "full, held root, needs check",
			line: "18446744073709551615 4096/4096 256/256 33 out_of_data_space ignore_discard error_if_no_space needs_check 0",
			want: ThinPoolStatus{TransactionID: 1<<64 - 1, UsedMetadataBlocks: 4096, TotalMetadataBlocks: 4096, UsedDataBlocks: 256, TotalDataBlocks: 256,
				HeldMetadataRoot: 33, Mode: PoolOutOfDataSpace, Discard: IgnoreDiscard, ErrorIfNoSpace: true, NeedsCheck: true},
		},
		{
			name: "read-only",
			line: "3 10/512 5/256 - ro discard_passdown queue_if_no_space needs_check 128",
			want: ThinPoolStatus{TransactionID: 3, UsedMetadataBlocks: 10, TotalMetadataBlocks: 512, UsedDataBlocks: 5, TotalDataBlocks: 256,
				Mode: PoolReadOnly, Discard: DiscardPassdown, NeedsCheck: true, MetadataLowWatermark: 128},
		},
		{
			name: "kernel without the metadata watermark",
			line: "3 10/512 5/256 - rw discard_passdown queue_if_no_space -",
			want: ThinPoolStatus{TransactionID: 3, UsedMetadataBlocks: 10, TotalMetadataBlocks: 512, UsedDataBlocks: 5, TotalDataBlocks: 256,
				Mode: PoolReadWrite, Discard: DiscardPassdown},
			canonical: "3 10/512 5/256 - rw discard_passdown queue_if_no_space - 0",
		},
		{
			name:      "kernel without needs_check either",
			line:      "3 10/512 5/256 - rw discard_passdown queue_if_no_space",
			want:      ThinPoolStatus{TransactionID: 3, UsedMetadataBlocks: 10, TotalMetadataBlocks: 512, UsedDataBlocks: 5, TotalDataBlocks: 256, Mode: PoolReadWrite, Discard: DiscardPassdown},
			canonical: "3 10/512 5/256 - rw discard_passdown queue_if_no_space - 0",
		},
		{
			name: "captured in the VM: 30 blocks written, metadata snapshot held",
			line: "0 420/4096 30/1024 25 rw no_discard_passdown error_if_no_space - 1024 ",
			want: ThinPoolStatus{UsedMetadataBlocks: 420, TotalMetadataBlocks: 4096, UsedDataBlocks: 30, TotalDataBlocks: 1024,
				HeldMetadataRoot: 25, Mode: PoolReadWrite, Discard: NoDiscardPassdown, ErrorIfNoSpace: true, MetadataLowWatermark: 1024},
			canonical: "0 420/4096 30/1024 25 rw no_discard_passdown error_if_no_space - 1024",
		},
		{
			name: "captured in the VM: data device full",
			line: "0 419/4096 32/32 - out_of_data_space discard_passdown error_if_no_space - 1024 ",
			want: ThinPoolStatus{UsedMetadataBlocks: 419, TotalMetadataBlocks: 4096, UsedDataBlocks: 32, TotalDataBlocks: 32,
				Mode: PoolOutOfDataSpace, Discard: DiscardPassdown, ErrorIfNoSpace: true, MetadataLowWatermark: 1024},
			canonical: "0 419/4096 32/32 - out_of_data_space discard_passdown error_if_no_space - 1024",
		},
		{name: "failed pool", line: "Fail", want: ThinPoolStatus{Fail: true}},
		{name: "metadata unreadable", line: "Error", want: ThinPoolStatus{Error: true}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			got, err := ParseThinPoolStatus(tc.line)
			if err != nil {
				t.Fatal(err)
			}
			if got != tc.want {
				t.Fatalf("got  %+v\nwant %+v", got, tc.want)
			}
			want := tc.canonical
			if want == "" {
				want = tc.line
			}
			if got.String() != want {
				t.Errorf("String() = %q, want %q", got.String(), want)
			}
		})
	}
}

func TestParseThinPoolStatusMalformed(t *testing.T) {
	for _, line := range []string{
		"", "fail", "0", "0 1/2 3/4 - rw discard_passdown",
		"0 1/2 3/4 - rw discard_passdown queue_if_no_space - 5 6",
		"x 1/2 3/4 - rw discard_passdown queue_if_no_space - 5",
		"0 12 3/4 - rw discard_passdown queue_if_no_space - 5",
		"0 3/2 3/4 - rw discard_passdown queue_if_no_space - 5",
		"0 1/2 3/x - rw discard_passdown queue_if_no_space - 5",
		"0 1/2 3/4 0 rw discard_passdown queue_if_no_space - 5",
		"0 1/2 3/4 x rw discard_passdown queue_if_no_space - 5",
		"0 1/2 3/4 - wr discard_passdown queue_if_no_space - 5",
		"0 1/2 3/4 - rw discard queue_if_no_space - 5",
		"0 1/2 3/4 - rw discard_passdown hang - 5",
		"0 1/2 3/4 - rw discard_passdown queue_if_no_space check 5",
		"0 1/2 3/4 - rw discard_passdown queue_if_no_space - -5",
	} {
		if st, err := ParseThinPoolStatus(line); !errors.Is(err, ErrParse) {
			t.Errorf("ParseThinPoolStatus(%q) = %+v, %v; want ErrParse", line, st, err)
		}
	}
}

func TestParseThinStatus(t *testing.T) {
	tests := []struct {
		line string
		want ThinStatus
	}{
		{"0 -", ThinStatus{}},
		{"2048 4095", ThinStatus{MappedSectors: 2048, HighestMappedSector: 4095, HasMapping: true}},
		{"384 2431", ThinStatus{MappedSectors: 384, HighestMappedSector: 2431, HasMapping: true}}, // captured in the VM
		{"Fail", ThinStatus{Fail: true}},
		{"Error", ThinStatus{Error: true}},
		{"-", ThinStatus{Missing: true}},
	}
	for _, tc := range tests {
		got, err := ParseThinStatus(tc.line)
		if err != nil || got != tc.want {
			t.Errorf("ParseThinStatus(%q) = %+v, %v; want %+v", tc.line, got, err, tc.want)
			continue
		}
		if got.String() != tc.line {
			t.Errorf("String() = %q, want %q", got.String(), tc.line)
		}
	}
	for _, line := range []string{"", "1", "- -", "x 1", "1 y", "1 2 3", "fail"} {
		if _, err := ParseThinStatus(line); !errors.Is(err, ErrParse) {
			t.Errorf("ParseThinStatus(%q) = %v, want ErrParse", line, err)
		}
	}
}
