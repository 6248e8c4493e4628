package main

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"

	"github.com/csi-dmthin/csi-dmthin/pkg/thinpool"
	"github.com/csi-dmthin/csi-dmthin/pkg/thinpool/thinpooltest"
)

// The admin socket serves what 'pool status' and 'volume list' print, from
// the pools the driver has open, to root only.
func TestAdminSocket(t *testing.T) {
	dir := t.TempDir()
	p, err := thinpool.Open(context.Background(), thinpool.Config{
		Name: "demo", StateDir: filepath.Join(dir, "state"),
		DataFile: filepath.Join(dir, "data"), MetadataFile: filepath.Join(dir, "meta"),
		DataFileBytes: 64 << 20, MetadataFileBytes: 4 << 20,
	}, thinpooltest.NewFakeKernel())
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
	srv, err := listenAdmin(sock, map[string]adminPool{"demo": p}, nil)
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

// pool grow and pool offline go through the admin socket to the pool the
// driver has open, and tell serve what changed.
func TestAdminGrowAndOffline(t *testing.T) {
	dir := t.TempDir()
	k := thinpooltest.NewFakeKernel()
	p, err := thinpool.Open(context.Background(), thinpool.Config{
		Name: "demo", StateDir: filepath.Join(dir, "state"),
		DataFile: filepath.Join(dir, "data"), MetadataFile: filepath.Join(dir, "meta"),
		DataFileBytes: 64 << 20,
	}, k)
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	type change struct {
		pool string
		grew bool
	}
	var changes []change
	var mu sync.Mutex
	sock := adminSocket(filepath.Join(dir, "state"))
	srv, err := listenAdmin(sock, map[string]adminPool{"demo": p}, func(pool string, grew bool) {
		mu.Lock()
		defer mu.Unlock()
		changes = append(changes, change{pool, grew})
	})
	if err != nil {
		t.Fatal(err)
	}
	go srv.serve()
	defer srv.shutdown()
	stateDir := filepath.Join(dir, "state")

	var g thinpool.Growth
	if err := adminPost(sock, "/pools/demo/grow", growRequest{DataFileSize: "96Mi"}, &g); err != nil {
		t.Fatal(err)
	}
	if g.DataBytesBefore != 64<<20 || g.DataBytes != 96<<20 || !g.Grew() {
		t.Fatalf("growth %+v", g)
	}
	if fi, err := os.Stat(filepath.Join(dir, "data")); err != nil || fi.Size() != 96<<20 {
		t.Fatalf("the data file: %v, %v", fi, err)
	}
	// The subcommand prints from the same answer; nothing left to grow.
	if err := poolGrow([]string{"demo", "--state-dir", stateDir}); err != nil {
		t.Fatal(err)
	}
	if err := poolGrow([]string{"--state-dir", stateDir, "--data-file-size", "128Mi", "demo"}); err != nil {
		t.Fatal(err)
	}
	if u, _ := p.Usage(); u.DataBytes != 128<<20 {
		t.Fatalf("after pool grow --data-file-size=128Mi: %+v", u)
	}
	for _, tc := range []struct {
		path string
		body growRequest
		want string
	}{
		{"/pools/nope/grow", growRequest{}, "404"},
		{"/pools/demo/grow", growRequest{DataFileSize: "1.5"}, "400"},
		{"/pools/demo/grow", growRequest{DataFileSize: "-1Gi"}, "400"},
	} {
		if err := adminPost(sock, tc.path, tc.body, &g); err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("POST %s %+v: %v, want %s", tc.path, tc.body, err, tc.want)
		}
	}

	// Offline is refused while a volume is open, then removes the pool's
	// devices and closes it.
	if _, err := p.CreateVolume(context.Background(), "v", 8<<20); err != nil {
		t.Fatal(err)
	}
	if _, err := p.Activate(context.Background(), "v"); err != nil {
		t.Fatal(err)
	}
	info, err := k.InfoByName("dmthin-demo-v")
	if err != nil {
		t.Fatal(err)
	}
	if err := k.SetOpen(info.Dev, 1); err != nil {
		t.Fatal(err)
	}
	if err := poolOffline([]string{"demo", "--state-dir", stateDir}); err == nil || !strings.Contains(err.Error(), "409") || !strings.Contains(err.Error(), "dmthin-demo-v") {
		t.Fatalf("offline with an open volume: %v", err)
	}
	if err := k.SetOpen(info.Dev, 0); err != nil {
		t.Fatal(err)
	}
	if err := poolOffline([]string{"demo", "--state-dir", stateDir}); err != nil {
		t.Fatal(err)
	}
	for _, d := range k.Devices() {
		t.Errorf("dm device %s left after offline", d.Name)
	}
	if _, err := p.Usage(); !errors.Is(err, thinpool.ErrClosed) {
		t.Errorf("usage of an offline pool: %v", err)
	}
	mu.Lock()
	defer mu.Unlock()
	if want := []change{{"demo", true}, {"demo", true}, {"demo", false}}; !slices.Equal(changes, want) {
		t.Errorf("changes told %v, want %v", changes, want)
	}
}
