package main

import (
	"bytes"
	"errors"
	"flag"
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
  wipe: true
- name: demo
  dataFile: /var/lib/csi-dmthin/demo.data
  dataFileSize: 20Gi
- name: decimal
  dataFile: /var/lib/csi-dmthin/decimal.data
  dataFileSize: 20G
  metadataFileSize: 1.5Mi
  lowWaterMark: 12.5%
- name: grows
  dataFile: /var/lib/csi-dmthin/grows.data
  dataFileSize: 1073741824
  autoExtend: {thresholdPercent: 80, maxDataFileSize: 1.5Ti}
`)
	nc, err := loadNodeConfig(p, "/state")
	if err != nil {
		t.Fatal(err)
	}
	pools, def := nc.pools, nc.defaultPool
	if def != "demo" || len(pools) != 4 || strings.Join(nc.order, ",") != "fast,demo,decimal,grows" {
		t.Fatalf("default %q, pools %q", def, nc.order)
	}
	f := pools["fast"]
	if f.DataDevice != "/dev/nvme1n1" || f.OverprovisionRatio != 5 || f.BlockSectors != 256 || f.LowWaterBlocks != 8192 || f.StateDir != "/state" || !f.Wipe {
		t.Errorf("fast: %+v", f)
	}
	d := pools["demo"]
	if d.DataFileBytes != 20<<30 || d.MetadataFile != "/var/lib/csi-dmthin/demo.meta" || d.Wipe {
		t.Errorf("demo: %+v", d)
	}
	// Kubernetes quantities: decimal suffixes, fractions of a binary
	// suffix that make whole bytes, percentages for the low water mark.
	dec := pools["decimal"]
	if dec.DataFileBytes != 20_000_000_000 || dec.MetadataFileBytes != 3<<19 || dec.LowWaterPercent != 12.5 || dec.LowWaterBlocks != 0 {
		t.Errorf("decimal: %+v", dec)
	}
	g := pools["grows"]
	a, ok := nc.autoExtend["grows"]
	if g.DataFileBytes != 1<<30 || !ok || a.thresholdPercent != 80 || a.stepPercent != defaultAutoExtendStep || a.maxDataBytes != 3<<39 {
		t.Errorf("grows: %+v, autoExtend %+v %v", g, a, ok)
	}
	// With autoExtend and no lowWaterMark, the kernel's event comes at
	// the threshold.
	if g.LowWaterPercent != 20 {
		t.Errorf("grows: low water %v%%, want 20%%", g.LowWaterPercent)
	}
	if _, ok := nc.autoExtend["demo"]; ok {
		t.Error("demo has an autoExtend it was not given")
	}
	// loadConfig, the older entry point, gives the same.
	pools2, def2, err := loadConfig(p, "/state")
	if err != nil || def2 != def || len(pools2) != 4 {
		t.Errorf("loadConfig: %d pools, %q, %v", len(pools2), def2, err)
	}
}

func TestLoadConfigErrors(t *testing.T) {
	for name, tc := range map[string]struct{ yaml, want string }{
		"unknown field":      {"pools:\n- name: a\n  dataDevise: /dev/x\n", "dataDevise"},
		"no pools":           {"pools: []\n", "no pools"},
		"duplicate":          {"pools:\n- name: a\n  dataDevice: /x\n  metadataDevice: /y\n- name: a\n  dataDevice: /y\n  metadataDevice: /z\n", "pools[1].name: pool \"a\" is listed twice"},
		"bad size":           {"pools:\n- name: a\n  dataFile: /x\n  dataFileSize: 10GB\n", "pools[0].dataFileSize"},
		"fractional bytes":   {"pools:\n- name: a\n  dataFile: /x\n  dataFileSize: \"1.5\"\n", "whole number of bytes"},
		"negative size":      {"pools:\n- name: a\n  dataFile: /x\n  dataFileSize: -1Gi\n", "negative"},
		"odd block":          {"pools:\n- name: a\n  dataDevice: /x\n  metadataDevice: /y\n  blockSize: \"1000\"\n", "pools[0].blockSize"},
		"small block":        {"pools:\n- name: a\n  dataDevice: /x\n  metadataDevice: /y\n  blockSize: 4Ki\n", "pools[0].blockSize"},
		"bad default":        {"defaultPool: b\npools:\n- name: a\n  dataFile: /x\n", "defaultPool"},
		"bad name":           {"pools:\n- name: Fast\n  dataFile: /x\n", "pools[0].name"},
		"relative path":      {"pools:\n- name: a\n  dataFile: x.data\n", "pools[0].dataFile"},
		"one device":         {"pools:\n- name: a\n  dataDevice: /dev/x\n", "pools[0].metadataDevice"},
		"devices and files":  {"pools:\n- name: a\n  dataDevice: /dev/x\n  metadataDevice: /dev/y\n  dataFile: /f\n", "pools[0].dataDevice"},
		"same device":        {"pools:\n- name: a\n  dataDevice: /dev/x\n  metadataDevice: /dev/x\n", "pools[0].metadataDevice"},
		"shared device":      {"pools:\n- name: a\n  dataDevice: /dev/x\n  metadataDevice: /dev/y\n- name: b\n  dataDevice: /dev/z\n  metadataDevice: /dev/x\n", "pools[1].metadataDevice: /dev/x is used by pools[0].dataDevice"},
		"floor":              {"pools:\n- name: a\n  dataFile: /x\n  minFreeDataPercent: 100\n", "pools[0].minFreeDataPercent"},
		"bad percent":        {"pools:\n- name: a\n  dataFile: /x\n  lowWaterMark: 150%\n", "pools[0].lowWaterMark"},
		"file size, devices": {"pools:\n- name: a\n  dataDevice: /dev/x\n  metadataDevice: /dev/y\n  dataFileSize: 1Gi\n", "pools[0].dataFileSize"},
		"autoExtend, device": {"pools:\n- name: a\n  dataDevice: /dev/x\n  metadataDevice: /dev/y\n  autoExtend: {thresholdPercent: 80, maxDataFileSize: 1Ti}\n", "pools[0].autoExtend"},
		"autoExtend, no max": {"pools:\n- name: a\n  dataFile: /x\n  autoExtend: {thresholdPercent: 80}\n", "pools[0].autoExtend.maxDataFileSize"},
		"autoExtend, small":  {"pools:\n- name: a\n  dataFile: /x\n  dataFileSize: 2Gi\n  autoExtend: {thresholdPercent: 80, maxDataFileSize: 1Gi}\n", "smaller than dataFileSize"},
		"autoExtend, 100%":   {"pools:\n- name: a\n  dataFile: /x\n  autoExtend: {thresholdPercent: 100, maxDataFileSize: 1Gi}\n", "pools[0].autoExtend.thresholdPercent"},
	} {
		t.Run(name, func(t *testing.T) {
			_, err := loadNodeConfig(writeConfig(t, tc.yaml), "/state")
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("err %v, want it to mention %q", err, tc.want)
			}
		})
	}
	if _, err := loadNodeConfig("/nonexistent/pools.yaml", "/s"); err == nil {
		t.Error("a missing file loaded")
	}
}

// Every problem of a pools file is reported at once, each naming its
// pool's index and field, not the first alone.
func TestLoadConfigReportsEveryProblem(t *testing.T) {
	_, err := loadNodeConfig(writeConfig(t, `
defaultPool: nope
pools:
- name: a
  dataFile: /var/lib/a.data
  dataFileSize: 20GB
  blockSize: 4Ki
- name: B
  dataDevice: /dev/sdb
- name: c
  dataFile: /var/lib/a.data
  minFreeMetadataPercent: -1
`), "/state")
	var ce *configError
	if !errors.As(err, &ce) {
		t.Fatalf("err %v, want a *configError", err)
	}
	for _, want := range []string{
		"pools[0].dataFileSize", "pools[0].blockSize",
		"pools[1].name", "pools[1].metadataDevice",
		"pools[2].dataFile: /var/lib/a.data is used by pools[0].dataFile",
		"pools[2].metadataFile: /var/lib/a.meta is used by pools[0].metadataFile", "pools[2].minFreeMetadataPercent",
		"defaultPool",
	} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("the report lacks %q:\n%v", want, err)
		}
	}
	if len(ce.problems) != 8 {
		t.Errorf("%d problems, want 8:\n%v", len(ce.problems), err)
	}
	if strings.Contains(err.Error(), "invalid argument") {
		t.Errorf("the report says \"invalid argument\" instead of what is wrong:\n%v", err)
	}
}

// The subcommands' exit status: -h succeeds, a usage mistake is 2, a
// failure 1; config check prints what it found.
func TestMainStatus(t *testing.T) {
	good := writeConfig(t, "defaultPool: a\npools:\n- name: a\n  dataFile: /var/lib/a.data\n  dataFileSize: 20Gi\n")
	bad := writeConfig(t, "pools:\n- name: a\n  dataFile: /x\n  dataFileSize: 20GB\n- name: b\n  dataDevice: /dev/sdb\n")
	for _, tc := range []struct {
		args       []string
		want       int
		wantOut    string
		wantErrOut string
	}{
		{[]string{"-h"}, 0, "commands:", ""},
		{[]string{"serve", "-h"}, 0, "", "-node-id"},
		{[]string{"config", "check", "-h"}, 0, "", "-config"},
		{[]string{"pool", "grow", "-h"}, 0, "", "-data-file-size"},
		{[]string{"pool", "status", "-h"}, 0, "", "-state-dir"},
		{[]string{}, 2, "", "commands:"},
		{[]string{"frobnicate"}, 2, "", "unknown command"},
		{[]string{"serve", "--no-such-flag"}, 1, "", "no-such-flag"},
		{[]string{"pool", "grow"}, 2, "", "want one pool name"},
		{[]string{"pool", "grow", "Bad_Name"}, 2, "", "not a pool name"},
		{[]string{"pool", "grow", "fast", "--data-file-size", "10GB"}, 2, "", "not a size"},
		{[]string{"config", "check", "--config", good}, 0, "1 pools (a), default pool a", ""},
		{[]string{"config", "check", "--config", bad}, 1, "", "pools[1].metadataDevice"},
		{[]string{"selftest", "frob"}, 2, "", "selftest write|verify"},
	} {
		var out, errOut bytes.Buffer
		// config check and the admin commands print to os.Stdout; what
		// is compared here is what mainStatus writes itself, and the
		// status.
		got := mainStatus(tc.args, &out, &errOut)
		if got != tc.want {
			t.Errorf("%q: status %d, want %d (stderr %q)", tc.args, got, tc.want, errOut.String())
		}
		if tc.wantErrOut != "" && !strings.Contains(errOut.String(), tc.wantErrOut) && !strings.Contains(captured(t, tc.args), tc.wantErrOut) {
			t.Errorf("%q: stderr %q lacks %q", tc.args, errOut.String(), tc.wantErrOut)
		}
		if tc.wantOut != "" && !strings.Contains(out.String(), tc.wantOut) && !strings.Contains(captured(t, tc.args), tc.wantOut) {
			t.Errorf("%q: stdout %q lacks %q", tc.args, out.String(), tc.wantOut)
		}
	}
}

// captured runs the command again with the process's stdout and stderr
// sent to a file, for what flag sets and config check print there.
func captured(t *testing.T, args []string) string {
	t.Helper()
	f, err := os.CreateTemp(t.TempDir(), "out")
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	oldOut, oldErr := os.Stdout, os.Stderr
	os.Stdout, os.Stderr = f, f
	flag.CommandLine.SetOutput(f)
	mainStatus(args, f, f)
	os.Stdout, os.Stderr = oldOut, oldErr
	b, _ := os.ReadFile(f.Name())
	return string(b)
}

func TestSelftest(t *testing.T) {
	dir := t.TempDir()
	if err := selftest([]string{"verify", dir}); err == nil {
		t.Fatal("verified a file that is not there")
	}
	if err := selftest([]string{"write", dir}); err != nil {
		t.Fatal(err)
	}
	if err := selftest([]string{"verify", dir}); err != nil {
		t.Fatal(err)
	}
	p := filepath.Join(dir, selftestFile)
	b, _ := os.ReadFile(p)
	b[len(b)/2] ^= 1
	if err := os.WriteFile(p, b, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := selftest([]string{"verify", dir}); err == nil {
		t.Fatal("a changed byte verified")
	}
}

// A pool's low water mark defaults to where the Node's nearly-full warning
// is; one the pools file gives, or autoExtend sets, stays.
func TestDefaultLowWater(t *testing.T) {
	nc, err := loadNodeConfig(writeConfig(t, `pools:
- name: plain
  dataFile: /p.data
- name: given
  dataFile: /g.data
  lowWaterMark: 1Gi
- name: auto
  dataFile: /a.data
  autoExtend: {thresholdPercent: 70, maxDataFileSize: 1Ti}
`), "/state")
	if err != nil {
		t.Fatal(err)
	}
	defaultLowWater(nc, 85)
	if p := nc.pools["plain"]; p.LowWaterPercent != 15 {
		t.Errorf("plain: %v%%, want 15%%", p.LowWaterPercent)
	}
	if g := nc.pools["given"]; g.LowWaterPercent != 0 || g.LowWaterBlocks != 16384 {
		t.Errorf("given: %+v", g)
	}
	if a := nc.pools["auto"]; a.LowWaterPercent != 30 {
		t.Errorf("auto: %v%%, want 30%%", a.LowWaterPercent)
	}
}
