package main

import (
	"context"
	"os"
	"path/filepath"
	"testing"

	"github.com/csi-dmthin/csi-dmthin/pkg/thinpool"
)

// The admin socket serves what 'pool status' and 'volume list' print, from
// the pools the driver has open, to root only.
func TestAdminSocket(t *testing.T) {
	dir := t.TempDir()
	p, err := thinpool.Open(context.Background(), thinpool.Config{
		Name: "demo", StateDir: filepath.Join(dir, "state"),
		DataFile: filepath.Join(dir, "data"), MetadataFile: filepath.Join(dir, "meta"),
		DataFileBytes: 64 << 20, MetadataFileBytes: 4 << 20,
	}, thinpool.NewFakeKernel())
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	if _, err := p.CreateVolume(context.Background(), "pvc-1", 8<<20); err != nil {
		t.Fatal(err)
	}
	if _, err := p.Snapshot(context.Background(), "snap-1", "pvc-1"); err != nil {
		t.Fatal(err)
	}
	sock := adminSocket(filepath.Join(dir, "state"))
	srv, err := listenAdmin(sock, map[string]adminPool{"demo": p})
	if err != nil {
		t.Fatal(err)
	}
	served := make(chan struct{})
	go func() {
		defer close(served)
		srv.serve()
	}()
	defer func() {
		srv.shutdown()
		<-served
	}()
	fi, err := os.Stat(sock)
	if err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("admin socket %v, %v: want mode 0600", fi, err)
	}

	var pools []poolReport
	if err := adminGet(sock, "/pools", &pools); err != nil {
		t.Fatal(err)
	}
	if len(pools) != 1 || pools[0].Name != "demo" || pools[0].Usage.Volumes != 1 || pools[0].Usage.Snapshots != 1 ||
		pools[0].Usage.DataBytes != 64<<20 || pools[0].Error != "" {
		t.Fatalf("pools %+v", pools)
	}
	var vols []volumeReport
	if err := adminGet(sock, "/volumes", &vols); err != nil {
		t.Fatal(err)
	}
	if len(vols) != 2 || vols[0].Pool != "demo" || vols[0].Name != "pvc-1" || vols[1].Name != "snap-1" || vols[1].Source != "pvc-1" {
		t.Fatalf("volumes %+v", vols)
	}
	// The subcommands print from the same answers.
	if err := poolStatus([]string{"--state-dir", filepath.Join(dir, "state")}); err != nil {
		t.Fatal(err)
	}
	if err := volumeList([]string{"--state-dir", filepath.Join(dir, "state")}); err != nil {
		t.Fatal(err)
	}
	// With no driver running, they say so.
	srv.shutdown()
	if err := poolStatus([]string{"--state-dir", filepath.Join(dir, "state")}); err == nil {
		t.Fatal("pool status without a driver succeeded")
	}
}
