package devmapper

import (
	"encoding/binary"
	"fmt"
	"reflect"
	"testing"
)

// Every text parser must never panic, and what it accepts must print back to
// a string that parses to the same value (the canonical form is a fixed
// point). The seeds are real kernel lines and the edge cases of the unit tests.

func FuzzParseThinPoolStatus(f *testing.F) {
	for _, s := range []string{
		"0 421/4096 80/16384 - rw discard_passdown queue_if_no_space - 1024",
		"7 15/512 0/256 - rw no_discard_passdown error_if_no_space - 128 ",
		"1 4096/4096 256/256 33 out_of_data_space ignore_discard error_if_no_space needs_check 0",
		"3 10/512 5/256 - ro discard_passdown queue_if_no_space",
		"Fail", "Error", "", "0 1/0 0/0 - rw",
	} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		st, err := ParseThinPoolStatus(s)
		if err != nil {
			return
		}
		again, err := ParseThinPoolStatus(st.String())
		if err != nil {
			t.Fatalf("%q parsed, but its String() %q does not: %v", s, st.String(), err)
		}
		if again != st {
			t.Fatalf("round trip of %q: %+v became %+v", s, st, again)
		}
	})
}

func FuzzParseThinStatus(f *testing.F) {
	for _, s := range []string{"0 -", "2048 4095", "Fail", "Error", "-", "", "1 2 3"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		st, err := ParseThinStatus(s)
		if err != nil {
			return
		}
		again, err := ParseThinStatus(st.String())
		if err != nil || again != st {
			t.Fatalf("round trip of %q: %+v -> %q -> %+v, %v", s, st, st.String(), again, err)
		}
	})
}

func FuzzParseThinPoolParams(f *testing.F) {
	for _, s := range []string{
		"7:0 7:1 128 32768 1 skip_block_zeroing",
		"7:0 7:1 128 1024 0 ",
		"8:16 8:32 2097152 0 5 error_if_no_space read_only no_discard_passdown ignore_discard skip_block_zeroing",
		"7:0 7:1 128", "7:0 7:1 128 0 2 read_only read_only",
	} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		p, err := ParseThinPoolParams(s)
		if err != nil {
			return
		}
		again, err := ParseThinPoolParams(p.String())
		if err != nil || again != p {
			t.Fatalf("round trip of %q: %+v -> %q -> %+v, %v", s, p, p.String(), again, err)
		}
	})
}

func FuzzParseThinParams(f *testing.F) {
	for _, s := range []string{"254:0 7", "254:0 16777215 7:5", "254:0 1 0:0", "x"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		p, err := ParseThinParams(s)
		if err != nil {
			return
		}
		again, err := ParseThinParams(p.String())
		if err != nil || again != p {
			t.Fatalf("round trip of %q: %+v -> %q -> %+v, %v", s, p, p.String(), again, err)
		}
	})
}

func FuzzParseLinearParams(f *testing.F) {
	for _, s := range []string{"7:2 2048", "7:2", "1:1 18446744073709551615"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		p, err := ParseLinearParams(s)
		if err != nil {
			return
		}
		again, err := ParseLinearParams(p.String())
		if err != nil || again != p {
			t.Fatalf("round trip of %q: %+v -> %q -> %+v, %v", s, p, p.String(), again, err)
		}
	})
}

func FuzzParseTarget(f *testing.F) {
	for _, s := range []string{"0 2097152 thin 254:0 7", "0 1 linear", "0 2048 thin-pool 7:0 7:1 128 0 0 "} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		tg, err := ParseTarget(s)
		if err != nil {
			return
		}
		again, err := ParseTarget(tg.String())
		if err != nil || again != tg {
			t.Fatalf("round trip of %q: %+v -> %q -> %+v, %v", s, tg, tg.String(), again, err)
		}
	})
}

func FuzzParseMessage(f *testing.F) {
	for _, s := range []string{"create_thin 0", "create_snap 5 3", "delete 9", "set_transaction_id 0 1",
		"reserve_metadata_snap", "release_metadata_snap", "create_thin 16777216", ""} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		m, err := ParseMessage(s)
		if err != nil {
			return
		}
		again, err := ParseMessage(m.String())
		if err != nil || !reflect.DeepEqual(again, m) {
			t.Fatalf("round trip of %q: %#v -> %q -> %#v, %v", s, m, m.String(), again, err)
		}
	})
}

// The mapping tree's reader must never panic, loop or recurse without
// bound on any metadata, and what it returns must be sorted ranges that
// neither overlap nor touch (adjacent ones are merged). The fuzzer's bytes
// are the start of the metadata device's blocks, fuzzChunk bytes of each
// (the rest reads as zeros: the seeds' nodes have room for 8 entries, 160
// bytes, so the fuzzer's inputs stay small); fixSums rewrites each block's
// btree checksum first, so that mutations reach past the checksum check.
// The seeds are trees of the unit tests' writer.
func FuzzThinMappings(f *testing.F) {
	const fuzzChunk, maxBlocks = 256, 16
	seed := func(devs map[uint32]map[uint64]uint64, fanout int, id uint32) {
		w := newTreeWriter(fanout)
		root := w.mappingTree(devs)
		img := make([]byte, w.next*fuzzChunk)
		for b, data := range w.meta {
			copy(img[b*fuzzChunk:(b+1)*fuzzChunk], data)
		}
		f.Add(img, root, id, false)
		f.Add(img, root, id, true)
	}
	seed(map[uint32]map[uint64]uint64{1: blocksOf(0, 1, 5, 9, 10, 11)}, 3, 1)
	seed(map[uint32]map[uint64]uint64{0: blocksOf(), 4: blocksOf(span(0, 20)...), 5: blocksOf(7)}, 4, 4)
	seed(map[uint32]map[uint64]uint64{2: blocksOf(1 << 40), 3: blocksOf(span(100, 30)...)}, 8, 3)
	f.Fuzz(func(t *testing.T, img []byte, root uint64, id uint32, fixSums bool) {
		n := min((len(img)+fuzzChunk-1)/fuzzChunk, maxBlocks)
		blocks := make([][]byte, n)
		for i := range blocks {
			blocks[i] = make([]byte, MetadataBlockBytes)
			copy(blocks[i], img[i*fuzzChunk:min(len(img), (i+1)*fuzzChunk)])
			if fixSums {
				binary.LittleEndian.PutUint32(blocks[i], btreeChecksum(blocks[i]))
			}
		}
		read := func(b uint64, buf []byte) error {
			if b >= uint64(n) {
				return fmt.Errorf("block %d past the end", b)
			}
			copy(buf, blocks[b])
			return nil
		}
		ranges, err := ThinMappings(read, root, id)
		if err != nil {
			return
		}
		for i, r := range ranges {
			if r.Count == 0 || r.Start+r.Count < r.Start {
				t.Fatalf("range %d: %+v", i, r)
			}
			if i > 0 && ranges[i-1].Start+ranges[i-1].Count >= r.Start {
				t.Fatalf("ranges %d and %d overlap or touch: %+v", i-1, i, ranges)
			}
		}
	})
}
