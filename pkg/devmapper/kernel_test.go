//go:build vmtest

// Tests against the real kernel. They are built with -tags vmtest and run
// inside the VM by TestVM (vm_test.go); on the host they are not compiled.
//
// What a Kernel must do (create, load, suspend and resume, remove and
// deferred remove, list, status, every thin-pool message and its errno, the
// thin data path, events) is the kernel contract in pkg/thinpool
// (kernelcontract_test.go): it runs through thinpool.HostKernel, whose dm
// calls are this package's Client's, and the same test functions run
// against the fake kernel on the host. What is left here is what only the
// Client has: the interface and target versions, ClearTable, suspend flags.

package devmapper

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/csi-dmthin/csi-dmthin/internal/loop"
)

const blockSectors = 128 // 64 KiB pool blocks

func client(t *testing.T) *Client {
	t.Helper()
	c, err := Open()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// sparseLoop makes a sparse file of size bytes, zeroes its first 4 KiB (a new
// pool's metadata device must start zeroed) and attaches it to a loop device
// that detaches itself once nothing holds it.
func sparseLoop(t *testing.T, name string, size int64) loop.Device {
	t.Helper()
	path := filepath.Join(t.TempDir(), name)
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	if err := f.Truncate(size); err != nil {
		t.Fatal(err)
	}
	if _, err := f.WriteAt(make([]byte, 4096), 0); err != nil {
		t.Fatal(err)
	}
	f.Close()
	d, err := loop.Attach(path, loop.Options{AutoClear: true})
	if err != nil {
		t.Fatal(err)
	}
	// Held open for the test; the pool's table holds it too, and the kernel
	// detaches it once both let go.
	t.Cleanup(func() { _ = d.Close() })
	return d
}

type testPool struct {
	c       *Client
	info    DeviceInfo
	params  ThinPoolParams
	sectors uint64
}

var seq int

func uniq(prefix string) string {
	seq++
	return fmt.Sprintf("%s-%d-%d", prefix, os.Getpid(), seq)
}

// newPool builds a thin-pool on two loop files.
func newPool(t *testing.T, c *Client, dataBytes int64, lowWater uint64, feats ThinPoolFeatures) *testPool {
	t.Helper()
	meta := sparseLoop(t, "meta", 16<<20)
	data := sparseLoop(t, "data", dataBytes)
	name := uniq("pool")
	info, err := c.Create(name, UUIDPrefix+name)
	if err != nil {
		t.Fatal(err)
	}
	p := &testPool{c: c, info: info, sectors: uint64(dataBytes) / SectorSize, params: ThinPoolParams{
		MetadataDev: Dev(meta.Rdev), DataDev: Dev(data.Rdev), BlockSectors: blockSectors,
		LowWaterBlocks: lowWater, Features: feats,
	}}
	t.Cleanup(func() { removeRetry(t, c, info.Dev) })
	if err := c.Load(info.Dev, []Target{NewTarget(0, p.sectors, p.params)}); err != nil {
		t.Fatal(err)
	}
	if err := c.Resume(info.Dev); err != nil {
		t.Fatal(err)
	}
	return p
}

// removeRetry removes a device, tolerating its absence; used in cleanups,
// which run in reverse order (thins before their pool).
func removeRetry(t *testing.T, c *Client, dev Dev) {
	for i := 0; ; i++ {
		err := c.Remove(dev, false)
		if err == nil || errors.Is(err, unix.ENXIO) {
			return
		}
		if i == 50 {
			t.Errorf("cleanup: %v", err)
			return
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// activate makes a dm device for thin id and returns its info and node.
func (p *testPool) activate(t *testing.T, id uint32, sectors uint64) (DeviceInfo, string) {
	t.Helper()
	name := uniq(fmt.Sprintf("thin%d", id))
	info, err := p.c.Create(name, UUIDPrefix+name)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { removeRetry(t, p.c, info.Dev) })
	if err := p.c.Load(info.Dev, []Target{NewTarget(0, sectors, ThinParams{PoolDev: p.info.Dev, DeviceID: id})}); err != nil {
		t.Fatal(err)
	}
	if err := p.c.Resume(info.Dev); err != nil {
		t.Fatal(err)
	}
	return info, node(t, info.Dev)
}

// node returns /dev/dm-N as devtmpfs made it, checking it is the right device.
func node(t *testing.T, dev Dev) string {
	t.Helper()
	path := "/dev/dm-" + strconv.FormatUint(uint64(dev.Minor()), 10)
	var st unix.Stat_t
	if err := unix.Stat(path, &st); err != nil {
		t.Fatalf("device node for %s: %v", dev, err)
	}
	if Dev(st.Rdev) != dev {
		t.Fatalf("%s is %s, want %s", path, Dev(st.Rdev), dev)
	}
	return path
}

func pattern(seed byte, n int) []byte {
	b := make([]byte, n)
	for i := range b {
		b[i] = seed + byte(i%251)
	}
	return b
}

func writeAt(t *testing.T, path string, off int64, b []byte) {
	t.Helper()
	f, err := os.OpenFile(path, os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if _, err := f.WriteAt(b, off); err != nil {
		t.Fatal(err)
	}
	if err := f.Sync(); err != nil {
		t.Fatal(err)
	}
}

func readAt(t *testing.T, path string, off int64, n int) []byte {
	t.Helper()
	f, err := os.OpenFile(path, os.O_RDONLY|unix.O_DIRECT, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	// O_DIRECT wants an aligned buffer: an mmap'd one is page-aligned.
	buf, err := unix.Mmap(-1, 0, (n+4095)&^4095, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_ANON|unix.MAP_PRIVATE)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Munmap(buf)
	if _, err := f.ReadAt(buf, off); err != nil {
		t.Fatal(err)
	}
	return append([]byte(nil), buf[:n]...)
}

func TestKernelVersionAndTargets(t *testing.T) {
	c := client(t)
	v := c.Version()
	if v[0] != 4 || !c.SupportsDeferredRemove() {
		t.Fatalf("dm interface %v", v)
	}
	t.Logf("dm ioctl interface %d.%d.%d", v[0], v[1], v[2])
	// The thin targets are listed once dm-thin-pool is loaded.
	newPool(t, c, 64<<20, 0, ThinPoolFeatures{})
	vs, err := c.TargetVersions()
	if err != nil {
		t.Fatal(err)
	}
	found := map[string]bool{}
	for _, tv := range vs {
		found[tv.Name] = true
		if tv.Name == "thin-pool" {
			t.Logf("thin-pool target %v", tv.Version)
			if tv.Version[0] != 1 {
				t.Errorf("thin-pool version %v", tv.Version)
			}
		}
	}
	for _, want := range []string{"thin-pool", "thin", "linear"} {
		if !found[want] {
			t.Errorf("target %q not listed in %+v", want, vs)
		}
	}
}

func TestKernelClearTableAndSuspendFlags(t *testing.T) {
	c := client(t)
	p := newPool(t, c, 64<<20, 0, ThinPoolFeatures{})
	if err := c.Message(p.info.Dev, CreateThin{3}); err != nil {
		t.Fatal(err)
	}
	info, path := p.activate(t, 3, 2048)
	data := pattern(8, 4096)
	writeAt(t, path, 0, data)

	// A loaded but not resumed table is inactive; ClearTable drops it and
	// the live one stays.
	if err := c.Load(info.Dev, []Target{NewTarget(0, 4096, ThinParams{PoolDev: p.info.Dev, DeviceID: 3})}); err != nil {
		t.Fatal(err)
	}
	if i, _ := c.Info(info.Dev); !i.InactiveTable || !i.LiveTable {
		t.Fatalf("after load: %+v", i)
	}
	if err := c.ClearTable(info.Dev); err != nil {
		t.Fatal(err)
	}
	if i, _ := c.Info(info.Dev); i.InactiveTable || !i.LiveTable {
		t.Fatalf("after clear: %+v", i)
	}
	if tbl, _ := c.Table(info.Dev); tbl[0].LengthSectors != 2048 {
		t.Fatalf("live table changed: %+v", tbl)
	}

	// Suspend without flushing or freezing, then resume: data intact.
	if err := c.Suspend(info.Dev, NoFlush|NoLockFS); err != nil {
		t.Fatal(err)
	}
	if i, _ := c.Info(info.Dev); !i.Suspended {
		t.Fatal("not suspended")
	}
	if err := c.Resume(info.Dev); err != nil {
		t.Fatal(err)
	}
	if got := readAt(t, path, 0, len(data)); !bytes.Equal(got, data) {
		t.Fatal("data changed across a no-flush suspend")
	}
	// A new table takes effect at resume: the device grows.
	if err := c.Load(info.Dev, []Target{NewTarget(0, 4096, ThinParams{PoolDev: p.info.Dev, DeviceID: 3})}); err != nil {
		t.Fatal(err)
	}
	if err := c.Resume(info.Dev); err != nil {
		t.Fatal(err)
	}
	if tbl, _ := c.Table(info.Dev); tbl[0].LengthSectors != 4096 {
		t.Fatalf("table after reload: %+v", tbl)
	}
}
