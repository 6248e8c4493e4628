package thinpool

import (
	"bytes"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/csi-dmthin/csi-dmthin/pkg/devmapper"
	"github.com/csi-dmthin/csi-dmthin/pkg/thinpool/thinpooltest"
)

// runIdentityScenarios: a pool never opens on another pool's devices, and
// is never made over anything.
func runIdentityScenarios(t *testing.T, newEnv func(t *testing.T) env) {
	t.Run("SwappedDataFiles", func(t *testing.T) {
		e := newEnv(t)
		// Two pools of the same shape; each volume holds its pool's data.
		cfgA, cfgB := testConfig(t, faultPoolName(), 64<<20), testConfig(t, faultPoolName(), 64<<20)
		dataA, dataB := pattern(1, 64<<10), pattern(2, 64<<10)
		for _, c := range []struct {
			cfg  Config
			data []byte
		}{{cfgA, dataA}, {cfgB, dataB}} {
			p := openPool(t, e, c.cfg)
			if _, err := p.CreateVolume(ctx, "v", 8<<20); err != nil {
				t.Fatal(err)
			}
			if err := e.write(t, p, "v", 0, c.data); err != nil {
				t.Fatal(err)
			}
			p.Close()
			e.reboot(t, p)
		}
		// After a reboot the data files have each other's names.
		e.swapFiles(t, cfgA.DataFile, cfgB.DataFile)
		for _, c := range []struct {
			cfg   Config
			other string
		}{{cfgA, cfgB.Name}, {cfgB, cfgA.Name}} {
			_, err := Open(ctx, c.cfg, e.kernel())
			if !errors.Is(err, ErrMismatch) || !strings.Contains(err.Error(), "marker of pool "+c.other) {
				t.Fatalf("open of pool %s on pool %s's data: %v", c.cfg.Name, c.other, err)
			}
			// Refused, and unloaded before anything could write to it.
			if _, err := e.kernel().InfoByName("dmthin-" + c.cfg.Name); !errors.Is(err, unix.ENXIO) {
				t.Fatalf("pool %s is still loaded after it was refused: %v", c.cfg.Name, err)
			}
		}
		// Named right again, both open with their data.
		e.swapFiles(t, cfgA.DataFile, cfgB.DataFile)
		for _, c := range []struct {
			cfg  Config
			data []byte
		}{{cfgA, dataA}, {cfgB, dataB}} {
			p := openPool(t, e, c.cfg)
			if got := e.read(t, p, "v", 0, len(c.data)); !bytes.Equal(got, c.data) {
				t.Fatalf("pool %s: data differs", c.cfg.Name)
			}
			checkInvariants(t, e, p)
			teardown(t, e, p)
		}
	})

	t.Run("ZeroedDataFile", func(t *testing.T) {
		// A data device that holds no marker at all (an empty disk now
		// has the data device's name) is refused as well.
		e := newEnv(t)
		cfg := testConfig(t, faultPoolName(), 64<<20)
		p := openPool(t, e, cfg)
		p.Close()
		e.reboot(t, p)
		e.writeFile(t, cfg.DataFile, 0, make([]byte, 1<<20))
		if _, err := Open(ctx, cfg, e.kernel()); !errors.Is(err, ErrMismatch) || !strings.Contains(err.Error(), "does not hold this pool's marker") {
			t.Fatalf("open on a data device without the marker: %v", err)
		}
	})

	t.Run("Signatures", func(t *testing.T) {
		e := newEnv(t)
		for _, sig := range []struct {
			name string
			file func(Config) string
			off  int64
			b    []byte
			want string
		}{
			{"ext4", func(c Config) string { return c.DataFile }, 1024 + 0x38, []byte{0x53, 0xEF}, "ext2/3/4"},
			{"xfs", func(c Config) string { return c.DataFile }, 0, []byte("XFSB"), "XFS"},
			{"lvm", func(c Config) string { return c.DataFile }, 512, []byte("LABELONE\x01\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00LVM2 001"), "LVM"},
			{"gpt", func(c Config) string { return c.DataFile }, 512, []byte("EFI PART"), "GPT"},
			{"data", func(c Config) string { return c.DataFile }, 70000, []byte("x"), "unrecognised data"},
			{"pool-metadata", func(c Config) string { return c.MetadataFile }, 32, []byte{0xBA, 0x52, 0x9C, 0x01, 0, 0, 0, 0}, "thin pool's metadata"},
		} {
			t.Run(sig.name, func(t *testing.T) {
				cfg := testConfig(t, faultPoolName(), 64<<20)
				for f, size := range map[string]int64{cfg.DataFile: 64 << 20, cfg.MetadataFile: 16 << 20} {
					if err := os.WriteFile(f, nil, 0o600); err != nil {
						t.Fatal(err)
					}
					if err := os.Truncate(f, size); err != nil {
						t.Fatal(err)
					}
				}
				e.writeFile(t, sig.file(cfg), sig.off, sig.b)
				_, err := Open(ctx, cfg, e.kernel())
				if !errors.Is(err, ErrMismatch) || !strings.Contains(err.Error(), sig.want) || !strings.Contains(err.Error(), "wipe: true") {
					t.Fatalf("a new pool over %s: %v", sig.name, err)
				}
				if _, err := e.kernel().InfoByName("dmthin-" + cfg.Name); !errors.Is(err, unix.ENXIO) {
					t.Fatalf("a refused pool was loaded: %v", err)
				}
				// Nothing was written: the signature is still there.
				cfg.Wipe = true
				p := openPool(t, e, cfg)
				defer teardown(t, e, p)
				if _, err := p.CreateVolume(ctx, "v", 4<<20); err != nil {
					t.Fatalf("the wiped pool does not work: %v", err)
				}
				checkInvariants(t, e, p)
			})
		}
	})

	t.Run("MarkerForOldPools", func(t *testing.T) {
		// A pool made before markers existed gets one when it is opened,
		// and is checked with it from then on.
		e := newEnv(t)
		cfg := testConfig(t, faultPoolName(), 64<<20)
		p := openPool(t, e, cfg)
		if _, err := p.CreateVolume(ctx, "v", 4<<20); err != nil {
			t.Fatal(err)
		}
		stripMarker(t, e, p)
		p.Close()
		p = openPool(t, e, cfg)
		if !p.rec.Marker {
			t.Fatal("no marker recorded after the reopen")
		}
		if err := e.kernel().Message(p.dev, devmapper.CreateThin{DeviceID: markerDeviceID}); !errors.Is(err, unix.EEXIST) {
			t.Fatalf("the marker's thin device is missing: %v", err)
		}
		checkInvariants(t, e, p)
		p.Close()
		e.reboot(t, p)
		p = openPool(t, e, cfg) // loaded again: the marker is checked
		teardown(t, e, p)
	})
}

// stripMarker makes p look like a pool made before markers: no thin device
// 0, no marker in the records.
func stripMarker(t *testing.T, e env, p *Pool) {
	t.Helper()
	p.mu.Lock()
	defer p.mu.Unlock()
	if err := e.kernel().Message(p.dev, devmapper.Delete{DeviceID: markerDeviceID}); err != nil {
		t.Fatal(err)
	}
	rec := p.rec
	rec.Marker, rec.DataSerial, rec.MetadataSerial = false, "", ""
	if err := p.st.apply(change{pool: &rec}); err != nil {
		t.Fatal(err)
	}
	p.rec = rec
}

// Disks swapped: the pools are on disks with serials (the fake's), and two
// data disks trade names.
func TestSwappedDisksFake(t *testing.T) {
	k := thinpooltest.NewFakeKernel()
	dir := t.TempDir()
	cfg := func(name, data, meta string) Config {
		return Config{Name: name, StateDir: filepath.Join(dir, "state"), DataDevice: data, MetadataDevice: meta}
	}
	for _, d := range []string{"/dev/sda", "/dev/sdb"} {
		k.AddBlockDevice(d, 64<<20)
	}
	for _, d := range []string{"/dev/sdc", "/dev/sdd"} {
		k.AddBlockDevice(d, 16<<20)
	}
	a, b := cfg("a", "/dev/sda", "/dev/sdc"), cfg("b", "/dev/sdb", "/dev/sdd")
	for _, c := range []Config{a, b} {
		p, err := Open(ctx, c, k)
		if err != nil {
			t.Fatal(err)
		}
		p.Close()
	}
	k.Reboot()
	k.SwapPaths("/dev/sda", "/dev/sdb")
	_, err := Open(ctx, a, k)
	if !errors.Is(err, ErrMismatch) || !strings.Contains(err.Error(), `serial "FAKE-DISK-2"`) || !strings.Contains(err.Error(), `serial "FAKE-DISK-1"`) {
		t.Fatalf("open on a renamed disk: %v", err)
	}
	k.SwapPaths("/dev/sda", "/dev/sdb")
	if p, err := Open(ctx, a, k); err != nil {
		t.Fatalf("open on the right disk: %v", err)
	} else {
		p.Close()
	}
}

// sysfsSerial on a sysfs tree laid out like the kernel's.
func TestSysfsSerial(t *testing.T) {
	root := t.TempDir()
	mk := func(rel, content string) {
		p := filepath.Join(root, rel)
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(p, []byte(content+"\n"), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	link := func(dev, target string) {
		p := filepath.Join(root, "dev/block", dev)
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.Symlink(filepath.Join(root, target), p); err != nil {
			t.Fatal(err)
		}
	}
	mk("devices/nvme0n1/wwid", "eui.0025388b91d3c4a1")
	mk("devices/nvme0n1/dev", "259:0")
	mk("devices/nvme0n1/nvme0n1p2/partition", "2")
	mk("devices/nvme0n1/nvme0n1p2/dev", "259:2")
	mk("devices/vda/serial", "disk-data-1")
	mk("devices/vdb/dev", "254:16")
	mk("devices/dm-3/dm/uuid", "LVM-abcdef")
	link("259:0", "devices/nvme0n1")
	link("259:2", "devices/nvme0n1/nvme0n1p2")
	link("254:0", "devices/vda")
	link("254:16", "devices/vdb")
	link("253:3", "devices/dm-3")
	for _, c := range []struct {
		dev  devmapper.Dev
		want string
	}{
		{devmapper.MakeDev(259, 0), "eui.0025388b91d3c4a1"},
		{devmapper.MakeDev(259, 2), "eui.0025388b91d3c4a1-part2"},
		{devmapper.MakeDev(254, 0), "disk-data-1"},
		{devmapper.MakeDev(254, 16), ""},
		{devmapper.MakeDev(253, 3), "dm:LVM-abcdef"},
	} {
		got, err := sysfsSerial(root, c.dev)
		if err != nil || got != c.want {
			t.Errorf("%s: %q, %v; want %q", c.dev, got, err, c.want)
		}
	}
	if _, err := sysfsSerial(root, devmapper.MakeDev(8, 0)); !errors.Is(err, unix.ENXIO) {
		t.Errorf("a missing device: %v", err)
	}
}

// The signatures recognised, and zeros recognised as empty.
func TestSignatures(t *testing.T) {
	if s := signatures(make([]byte, signatureBytes)); len(s) != 0 {
		t.Fatalf("zeros: %v", s)
	}
	p := &Pool{cfg: Config{Name: "x"}, rec: poolRecord{Name: "x", Identity: "0123456789abcdef"}}
	m := append(p.encodeMarker(), make([]byte, signatureBytes-4096)...)
	if s := signatures(m); len(s) != 1 || s[0] != "a csi-dmthin pool's marker" {
		t.Fatalf("a marker: %v", s)
	}
	if got, ok := decodeMarker(m); !ok || got.Identity != "0123456789abcdef" || got.Pool != "x" {
		t.Fatalf("decode the marker: %+v, %v", got, ok)
	}
}
