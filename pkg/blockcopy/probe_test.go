package blockcopy

import (
	"context"
	"errors"
	"testing"
)

// Probe says what a copy would move, moves nothing, and releases what it
// opened; a refused token is refused before the source is opened.
func TestProbe(t *testing.T) {
	opener := newFakeOpener(map[string]*image{"node-a/default/snap-1": testImage()})
	ts := startServer(t, opener, newFakeAuth(), nil)
	info, err := Probe(context.Background(), ts.endpoint(), goodToken, "probe-1", "node-a/default/snap-1")
	if err != nil {
		t.Fatal(err)
	}
	if want := int64((192 + 1536 + 64 + 2048) * kib); info.MappedBytes() != want || info.SizeBytes != 8*mib || len(info.Extents) != 4 {
		t.Errorf("probe = %d bytes mapped of %d in %d extents, want %d of %d in 4", info.MappedBytes(), info.SizeBytes, len(info.Extents), want, 8*mib)
	}
	if opens, releases := opener.counts("probe-1"); opens != 1 || releases != 1 {
		t.Errorf("probe opened %d and released %d times, want once each", opens, releases)
	}
	for _, token := range []string{"token-of-mallory", "no-such-token"} {
		if _, err := Probe(context.Background(), ts.endpoint(), token, "probe-2", "node-a/default/snap-1"); !errors.Is(err, ErrRefused) {
			t.Errorf("probe with %s = %v, want ErrRefused", token, err)
		}
	}
	if opens, _ := opener.counts("probe-2"); opens != 0 {
		t.Errorf("refused probes opened the source %d times", opens)
	}
	if _, err := Probe(context.Background(), ts.endpoint(), goodToken, "probe-3", "node-a/default/nothing"); !errors.Is(err, ErrSourceNotFound) {
		t.Errorf("probe of an unknown source = %v, want ErrSourceNotFound", err)
	}
}
