package thinpool

import (
	"fmt"
	"path/filepath"
	"testing"
	"time"
)

// The records' cost on the host's file system (TMPDIR; go test's default is
// a directory under /tmp): what a create writes, in the two transactions a
// create makes (its intent, then the record with the new transaction id and
// the intent cleared), each one fsync'd by bbolt; and reading 10,000
// records back, as Open does at start-up.

func BenchmarkRecordsCreate(b *testing.B) {
	st, err := openStore(filepath.Join(b.TempDir(), "p.db"))
	if err != nil {
		b.Fatal(err)
	}
	defer st.close()
	if err := st.apply(change{pool: &poolRecord{Version: 1, Name: "p", Identity: "aaaa"}, tid: ptr(uint64(0))}); err != nil {
		b.Fatal(err)
	}
	tid := uint64(0)
	id := uint32(0)
	for b.Loop() {
		tid++
		id++
		v := Volume{Name: fmt.Sprintf("pvc-%08d", id), DeviceID: id, SizeBytes: 1 << 30, Kind: KindVolume, CreatedAt: time.Now()}
		if err := st.apply(change{intent: &intent{Op: opCreate, TID: tid, Vol: v}, nextID: ptr(id + 1)}); err != nil {
			b.Fatal(err)
		}
		if err := st.apply(change{clearIntent: true, tid: ptr(tid), put: []*Volume{&v}}); err != nil {
			b.Fatal(err)
		}
	}
}

func BenchmarkRecordsLoad10000(b *testing.B) {
	st, err := openStore(filepath.Join(b.TempDir(), "p.db"))
	if err != nil {
		b.Fatal(err)
	}
	defer st.close()
	const n = 10000
	vols := make([]*Volume, n)
	for i := range vols {
		vols[i] = &Volume{Name: fmt.Sprintf("pvc-%08d", i), DeviceID: uint32(i + 1), SizeBytes: 1 << 30, Kind: KindVolume, CreatedAt: time.Now(), Active: true}
	}
	if err := st.apply(change{pool: &poolRecord{Version: 1, Name: "p", Identity: "aaaa"}, tid: ptr(uint64(n)), nextID: ptr(uint32(n + 1)), put: vols}); err != nil {
		b.Fatal(err)
	}
	for b.Loop() {
		s, err := st.load()
		if err != nil {
			b.Fatal(err)
		}
		if len(s.volumes) != n {
			b.Fatalf("loaded %d records, want %d", len(s.volumes), n)
		}
	}
}
