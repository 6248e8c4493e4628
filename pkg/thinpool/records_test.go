package thinpool

import (
	"errors"
	"path/filepath"
	"testing"
)

// The records refuse changes that break their rules, and write nothing of
// a refused change.
func TestRecordsInvariants(t *testing.T) {
	st, err := openStore(filepath.Join(t.TempDir(), "p.db"))
	if err != nil {
		t.Fatal(err)
	}
	defer st.close()
	rec := &poolRecord{Version: 1, Name: "p", Identity: "aaaa"}
	if err := st.apply(change{pool: rec, tid: ptr(uint64(0))}); err != nil {
		t.Fatal(err)
	}
	v := &Volume{Name: "v", DeviceID: 3, Kind: KindVolume, SizeBytes: 1 << 20}
	if err := st.apply(change{tid: ptr(uint64(10)), put: []*Volume{v}}); err != nil {
		t.Fatal(err)
	}
	pending := &intent{Op: opCreate, TID: 11, Vol: Volume{Name: "w", DeviceID: 4}}
	if err := st.apply(change{intent: pending}); err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct {
		name string
		c    change
	}{
		{"an intent over a pending one", change{intent: &intent{Op: opDelete, TID: 11, Vol: *v}, put: []*Volume{{Name: "x", DeviceID: 9, Kind: KindVolume}}}},
		{"the transaction id going back", change{tid: ptr(uint64(9))}},
		{"the transaction id standing still", change{tid: ptr(uint64(10))}},
		{"a record's thin id changing", change{put: []*Volume{{Name: "v", DeviceID: 5, Kind: KindVolume}}}},
		{"a record's kind changing", change{put: []*Volume{{Name: "v", DeviceID: 3, Kind: KindSnapshot}}}},
		{"the pool's identity changing", change{pool: &poolRecord{Version: 1, Name: "p", Identity: "bbbb"}}},
	} {
		if err := st.apply(c.c); !errors.Is(err, errInvariant) {
			t.Errorf("%s: %v, want errInvariant", c.name, err)
		}
	}
	s, err := st.load()
	if err != nil {
		t.Fatal(err)
	}
	if s.tid != 10 || s.intent == nil || s.intent.Vol.Name != "w" || len(s.volumes) != 1 || s.volumes["v"].DeviceID != 3 || s.pool.Identity != "aaaa" {
		t.Fatalf("a refused change was written: %+v", s)
	}
	// Clearing the intent with the change it finishes is allowed.
	if err := st.apply(change{clearIntent: true, tid: ptr(uint64(11)), put: []*Volume{{Name: "w", DeviceID: 4, Kind: KindVolume}}}); err != nil {
		t.Fatalf("finishing the intent: %v", err)
	}
}

// rewrite leaves a database holding exactly the state, usable afterwards.
func TestRecordsRewrite(t *testing.T) {
	path := filepath.Join(t.TempDir(), "p.db")
	st, err := openStore(path)
	if err != nil {
		t.Fatal(err)
	}
	defer func() { st.close() }()
	want := &state{
		pool:     &poolRecord{Version: 1, Name: "p", Identity: "aaaa", Marker: true},
		tid:      42,
		nextID:   7,
		intent:   &intent{Op: opDelete, TID: 43, Vol: Volume{Name: "a", DeviceID: 1}},
		suspects: []uint32{5},
		volumes: map[string]*Volume{
			"a": {Name: "a", DeviceID: 1, Kind: KindVolume, SizeBytes: 4096},
			"b": {Name: "b", DeviceID: 2, Kind: KindSnapshot, Source: "a", SizeBytes: 4096},
		},
	}
	// Something the rewrite must drop.
	if err := st.apply(change{put: []*Volume{{Name: "stale", DeviceID: 9, Kind: KindVolume}}}); err != nil {
		t.Fatal(err)
	}
	if err := st.rewrite(want); err != nil {
		t.Fatal(err)
	}
	got, err := st.load()
	if err != nil {
		t.Fatal(err)
	}
	if got.tid != 42 || got.nextID != 7 || got.intent == nil || got.intent.TID != 43 || len(got.suspects) != 1 || len(got.volumes) != 2 || got.volumes["stale"] != nil || !got.pool.Marker {
		t.Fatalf("after the rewrite: %+v", got)
	}
	if err := st.apply(change{clearIntent: true, tid: ptr(uint64(43)), del: []string{"a"}}); err != nil {
		t.Fatalf("a write after the rewrite: %v", err)
	}
	st.close()
	if st, err = openStore(path); err != nil {
		t.Fatal(err)
	}
	if got, err = st.load(); err != nil || got.tid != 43 || len(got.volumes) != 1 {
		t.Fatalf("after a reopen: %+v, %v", got, err)
	}
}
