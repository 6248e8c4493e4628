package main

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func writeConfig(t *testing.T, s string) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "pools.yaml")
	if err := os.WriteFile(p, []byte(s), 0o644); err != nil {
		t.Fatal(err)
	}
	return p
}

func TestLoadConfig(t *testing.T) {
	p := writeConfig(t, `
defaultPool: demo
pools:
- name: fast
  dataDevice: /dev/nvme1n1
  metadataDevice: /dev/nvme2n1
  overprovisionRatio: 5
  blockSize: 128Ki
  lowWaterMark: 1Gi
- name: demo
  dataFile: /var/lib/csi-dmthin/demo.data
  dataFileSize: 20Gi
`)
	pools, def, err := loadConfig(p, "/state")
	if err != nil {
		t.Fatal(err)
	}
	if def != "demo" || len(pools) != 2 {
		t.Fatalf("default %q, %d pools", def, len(pools))
	}
	f := pools["fast"]
	if f.DataDevice != "/dev/nvme1n1" || f.OverprovisionRatio != 5 || f.BlockSectors != 256 || f.LowWaterBlocks != 8192 || f.StateDir != "/state" {
		t.Errorf("fast: %+v", f)
	}
	d := pools["demo"]
	if d.DataFileBytes != 20<<30 || d.MetadataFile != "/var/lib/csi-dmthin/demo.meta" {
		t.Errorf("demo: %+v", d)
	}
}

func TestLoadConfigErrors(t *testing.T) {
	for name, tc := range map[string]struct{ yaml, want string }{
		"unknown field": {"pools:\n- name: a\n  dataDevise: /dev/x\n", "dataDevise"},
		"no pools":      {"pools: []\n", "no pools"},
		"duplicate":     {"pools:\n- name: a\n  dataDevice: /x\n- name: a\n  dataDevice: /y\n", "listed twice"},
		"bad size":      {"pools:\n- name: a\n  dataFile: /x\n  dataFileSize: 10GB\n", "pools[0].dataFileSize"},
		"odd block":     {"pools:\n- name: a\n  dataDevice: /x\n  blockSize: \"1000\"\n", "pools[0].blockSize"},
		"bad default":   {"defaultPool: b\npools:\n- name: a\n  dataDevice: /x\n", "defaultPool"},
	} {
		t.Run(name, func(t *testing.T) {
			_, _, err := loadConfig(writeConfig(t, tc.yaml), "/state")
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("err %v, want it to mention %q", err, tc.want)
			}
		})
	}
	if _, _, err := loadConfig("/nonexistent/pools.yaml", "/s"); err == nil {
		t.Error("a missing file loaded")
	}
}
