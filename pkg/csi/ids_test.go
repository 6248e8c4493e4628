package csi

import (
	"strings"
	"testing"

	csipb "github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc/codes"
)

// snapID is the ID the test driver gives snapshot name of the test pool.
func snapID(name string) string { return testNode + "/" + testPool + "/" + name }

func TestParseID(t *testing.T) {
	for s, want := range map[string]objectID{
		"alpha/vol":               {pool: "alpha", name: "vol"},
		"node-a/alpha/snap":       {node: "node-a", pool: "alpha", name: "snap"},
		"n1.example.com/alpha/s":  {node: "n1.example.com", pool: "alpha", name: "s"},
		"Node-A/alpha/snap":       {}, // not a node name
		"-node/alpha/snap":        {},
		"node-a/alpha/snap/extra": {},
		"node-a//snap":            {},
		"/alpha/snap":             {},
		"alpha":                   {},
	} {
		got, ok := parseID(s)
		if ok != (want != objectID{}) || got != want {
			t.Errorf("parseID(%q) = %+v, %v; want %+v", s, got, ok, want)
		}
	}
}

func TestSnapshotIDCarriesNode(t *testing.T) {
	if got := snapshotID("node-a", "alpha", "s"); got != "node-a/alpha/s" {
		t.Errorf("snapshotID = %q", got)
	}
	// Too long for CSI's 128 bytes with the node: the form without it.
	long := strings.Repeat("n", 100)
	if got := snapshotID(long, "alpha", strings.Repeat("s", 30)); got != "alpha/"+strings.Repeat("s", 30) {
		t.Errorf("snapshotID with a long node = %q", got)
	}
	if got := snapshotID(long, "alpha", "s"); got != long+"/alpha/s" || len(got) > maxIDBytes {
		t.Errorf("snapshotID with a node that fits = %q", got)
	}
	// A node ID that is not a node name (the csi-sanity tests use any).
	if got := snapshotID("Node_A", "alpha", "s"); got != "alpha/s" {
		t.Errorf("snapshotID with a node ID that is not a node name = %q", got)
	}
	node, pool, ok := SnapshotNode("node-a/alpha/s")
	if node != "node-a" || pool != "alpha" || !ok {
		t.Errorf("SnapshotNode = %q, %q, %v", node, pool, ok)
	}
	if node, pool, ok := SnapshotNode("alpha/s"); node != "" || pool != "alpha" || !ok {
		t.Errorf("SnapshotNode of the form without node = %q, %q, %v", node, pool, ok)
	}
}

// A snapshot made before IDs carried their node is reached by its old ID
// too: the same snapshot, not a second one.
func TestSnapshotIDWithoutNode(t *testing.T) {
	e := newDriverEnv(t)
	vol := e.createVolume("vol").GetVolumeId()
	snap := e.createSnapshot("snap", vol).GetSnapshotId()
	if snap != snapID("snap") {
		t.Fatalf("snapshot ID %q, want %q", snap, snapID("snap"))
	}
	old := testPool + "/snap"
	ctx := t.Context()
	got, err := e.d.GetSnapshot(ctx, &csipb.GetSnapshotRequest{SnapshotId: old})
	if err != nil || got.GetSnapshot().GetSnapshotId() != snap {
		t.Fatalf("GetSnapshot(%q) = %v, %v; want %s", old, got, err, snap)
	}
	restored, err := e.d.CreateVolume(ctx, &csipb.CreateVolumeRequest{Name: "restored", VolumeCapabilities: []*csipb.VolumeCapability{fsCap},
		VolumeContentSource: &csipb.VolumeContentSource{Type: &csipb.VolumeContentSource_Snapshot{Snapshot: &csipb.VolumeContentSource_SnapshotSource{SnapshotId: old}}}})
	if err != nil {
		t.Fatalf("CreateVolume from %q: %v", old, err)
	}
	if src := restored.GetVolume().GetContentSource().GetSnapshot().GetSnapshotId(); src != old {
		t.Errorf("content source %q, want the ID asked for, %q", src, old)
	}
	// The volume ID never takes a node.
	_, err = e.d.ControllerGetVolume(ctx, &csipb.ControllerGetVolumeRequest{VolumeId: testNode + "/" + vol})
	wantCode(t, err, codes.NotFound, "volume ID")
	if _, err := e.d.DeleteSnapshot(ctx, &csipb.DeleteSnapshotRequest{SnapshotId: old}); err != nil {
		t.Fatalf("DeleteSnapshot(%q): %v", old, err)
	}
	_, err = e.d.GetSnapshot(ctx, &csipb.GetSnapshotRequest{SnapshotId: snap})
	wantCode(t, err, codes.NotFound)
}
