package main

import (
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"

	"github.com/csi-dmthin/csi-dmthin/pkg/thinpool"
)

// A bad pools file stops serve before it touches the host: no lock, no
// /dev/mapper/control, no pool; every problem is in the one error.
func TestServeChecksConfigFirst(t *testing.T) {
	s := newServeSetup(t)
	cfg := filepath.Join(s.dir, "bad.yaml")
	if err := os.WriteFile(cfg, []byte(`pools:
- name: a
  dataFile: /x
  dataFileSize: 10GB
- name: b
  dataDevice: /dev/sdb
`), 0o600); err != nil {
		t.Fatal(err)
	}
	fs, f := newServeFlags()
	if err := fs.Parse([]string{"--node-id=n", "--config=" + cfg, "--state-dir=" + s.stateDir, "--metrics-address="}); err != nil {
		t.Fatal(err)
	}
	var kernelOpened atomic.Bool
	env := s.env()
	env.kernel = func() (thinpool.Kernel, error) { kernelOpened.Store(true); return s.k, nil }
	err := run(t.Context(), f, env)
	if err == nil {
		t.Fatal("serve started with a bad pools file")
	}
	for _, w := range []string{"pools[0].dataFileSize", "pools[1].metadataDevice"} {
		if !strings.Contains(err.Error(), w) {
			t.Errorf("error %q does not name %s", err, w)
		}
	}
	if kernelOpened.Load() {
		t.Error("device-mapper was opened before the pools file was checked")
	}
	if _, err := os.Stat(filepath.Join(s.stateDir, lockFileName)); err == nil {
		t.Error("the state directory was locked before the pools file was checked")
	}
}

// A loop-file pool whose pools file now says a larger dataFileSize grows
// when serve starts, the kernel's table kept over the restart or not; and
// pool status shows the new size.
func TestServeGrowsPoolsAtStart(t *testing.T) {
	s := newServeSetup(t)
	r := s.start(s.flags([]string{"fast"}), s.env())
	if err := r.wait(t); err != nil {
		t.Fatal(err)
	}
	// The same pool, 96 MiB now, in a pools file of its own.
	cfg := filepath.Join(s.dir, "grown.yaml")
	if err := os.WriteFile(cfg, []byte("pools:\n- name: fast\n  dataFile: "+filepath.Join(s.dir, "fast.data")+"\n  dataFileSize: 96Mi\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	fs, f := newServeFlags()
	if err := fs.Parse([]string{
		"--node-id=node-a", "--config=" + cfg, "--state-dir=" + s.stateDir, "--kubelet-dir=" + s.kubeletDir,
		"--endpoint=unix://" + s.csiSock, "--metrics-address=", "--registration-dir=" + s.regDir, "--templates-per-pool=0",
	}); err != nil {
		t.Fatal(err)
	}
	_ = s.start(f, s.env())
	var pools []poolReport
	if err := adminGet(adminSocket(s.stateDir), "/pools", &pools); err != nil {
		t.Fatal(err)
	}
	if len(pools) != 1 || pools[0].Usage.DataBytes != 96<<20 {
		t.Fatalf("after a restart with a larger dataFileSize: %+v", pools)
	}
	if fi, err := os.Stat(filepath.Join(s.dir, "fast.data")); err != nil || fi.Size() != 96<<20 {
		t.Fatalf("the data file: %v, %v", fi, err)
	}
}
