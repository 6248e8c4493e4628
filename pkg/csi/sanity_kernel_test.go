//go:build vmtest

package csi

import (
	"bytes"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	csipb "github.com/container-storage-interface/spec/lib/go/csi"
	"golang.org/x/sys/unix"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/csi-dmthin/csi-dmthin/internal/vmtest"
	"github.com/csi-dmthin/csi-dmthin/pkg/thinpool"
)

// The driver on the real kernel, in the VM (vm_test.go starts it): real
// pools on loop files in the guest's tmpfs, the real FS with mkfs, mount
// and resize tools, real mounts.

var (
	hostOnce sync.Once
	hostK    *thinpool.HostKernel
	hostErr  error
)

func hostKernel(t *testing.T) *thinpool.HostKernel {
	t.Helper()
	vmtest.RequireGuest(t)
	hostOnce.Do(func() { hostK, hostErr = thinpool.NewHostKernel() })
	if hostErr != nil {
		t.Fatal(hostErr)
	}
	return hostK
}

// openKernelPool opens a pool on loop files in dir; at the end of the test
// it is closed and its dm device removed, so the next test starts clean on
// the same kernel. The loop devices clear themselves once the pool is gone.
func openKernelPool(t *testing.T, k *thinpool.HostKernel, cfg thinpool.Config) *thinpool.Pool {
	t.Helper()
	p, err := thinpool.Open(t.Context(), cfg, k)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_ = p.Close()
		removePoolDevices(t, k, cfg.Name)
	})
	return p
}

// removePoolDevices removes the pool's dm devices, volumes first (they hold
// the pool).
func removePoolDevices(t *testing.T, k *thinpool.HostKernel, pool string) {
	t.Helper()
	list, err := k.List()
	if err != nil {
		t.Error(err)
		return
	}
	poolName := "dmthin-" + pool
	for _, d := range list {
		if strings.HasPrefix(d.Name, poolName+"-") {
			if err := k.Remove(d.Dev, false); err != nil {
				t.Errorf("remove %s: %v", d.Name, err)
			}
		}
	}
	if info, err := k.InfoByName(poolName); err == nil {
		if err := k.Remove(info.Dev, false); err != nil {
			t.Errorf("remove %s: %v", poolName, err)
		}
	} else if !errors.Is(err, unix.ENXIO) {
		t.Error(err)
	}
}

// mountsUnder lists the mount points under dir, from the kernel's table.
func mountsUnder(t *testing.T, dir string) []string {
	t.Helper()
	b, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, l := range strings.Split(string(b), "\n") {
		f := strings.Fields(l)
		if len(f) > 4 && strings.HasPrefix(f[4], dir+"/") {
			out = append(out, f[4])
		}
	}
	return out
}

// The FS contract (fakefs_test.go) on the real FS and kernel: what the fake
// claims is what mount(8), mkfs.ext4, resize2fs and the kernel do.
func TestFSContractKernel(t *testing.T) {
	k := hostKernel(t)
	t.Cleanup(func() { removePoolDevices(t, k, "fscontract") }) // after the contract's own cleanup
	runFSContract(t, k, NewHostFS())
}

func TestSanityKernel(t *testing.T) {
	k := hostKernel(t)
	skipUnlessSanityCanRun(t)
	dir := t.TempDir()
	p := openKernelPool(t, k, loopPoolConfig(dir, "sanity", sanityPoolBytes))
	kubeletDir := filepath.Join(dir, "kubelet")
	sanityOnPool(t, "sanity", p, kubeletDir, NewHostFS(), func() []string { return mountsUnder(t, kubeletDir) })
}

// kernelClient talks CSI to a driver over its socket, as the kubelet and the
// sidecars do.
type kernelClient struct {
	csipb.ControllerClient
	csipb.NodeClient
}

func dialDriver(t *testing.T, addr string) kernelClient {
	t.Helper()
	conn, err := grpc.NewClient(addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = conn.Close() })
	return kernelClient{csipb.NewControllerClient(conn), csipb.NewNodeClient(conn)}
}

// A driver restart leaves mounted volumes working: stop the driver, close
// the pool, open it again and start a new driver; the mounts still serve
// their data, and the new driver unpublishes, unstages and deletes them.
func TestRestartKernel(t *testing.T) {
	k := hostKernel(t)
	ctx := t.Context()
	dir := t.TempDir()
	cfg := loopPoolConfig(dir, "restart", 512<<20)
	p1, err := thinpool.Open(ctx, cfg, k)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = p1.Close() }) // closed already unless the test failed early
	kubeletDir := filepath.Join(dir, "kubelet")
	start := func(p *thinpool.Pool) (*Driver, kernelClient) {
		t.Helper()
		d, err := New(Options{NodeID: testNode, Pools: map[string]Pool{cfg.Name: p}, KubeletDir: kubeletDir, FS: NewHostFS()})
		if err != nil {
			t.Fatal(err)
		}
		return d, dialDriver(t, serveDriver(t, d))
	}
	d1, c1 := start(p1)

	type vol struct {
		id, staging, target string
		c                   *csipb.VolumeCapability
	}
	vols := map[string]*vol{
		"fs":  {c: mountCap("ext4", rwo)},
		"blk": {c: blockCap(rwo)},
	}
	for name, v := range vols {
		resp, err := c1.CreateVolume(ctx, &csipb.CreateVolumeRequest{Name: "restart-" + name, VolumeCapabilities: []*csipb.VolumeCapability{v.c},
			CapacityRange: &csipb.CapacityRange{RequiredBytes: 64 << 20}})
		if err != nil {
			t.Fatal(err)
		}
		v.id = resp.GetVolume().GetVolumeId()
		v.staging = filepath.Join(kubeletDir, "plugins", "staging", name)
		v.target = filepath.Join(kubeletDir, "pods", "p1", name)
		if _, err := c1.NodeStageVolume(ctx, &csipb.NodeStageVolumeRequest{VolumeId: v.id, StagingTargetPath: v.staging, VolumeCapability: v.c}); err != nil {
			t.Fatalf("stage %s: %v", name, err)
		}
		if _, err := c1.NodePublishVolume(ctx, &csipb.NodePublishVolumeRequest{VolumeId: v.id, StagingTargetPath: v.staging, TargetPath: v.target, VolumeCapability: v.c}); err != nil {
			t.Fatalf("publish %s: %v", name, err)
		}
	}
	fileData := bytes.Repeat([]byte("written before the restart\n"), 1000)
	blockData := bytes.Repeat([]byte("raw block data, 32 bytes long..."), 4096/32*16)
	dataFile := filepath.Join(vols["fs"].target, "data")
	writeFile(t, dataFile, fileData)
	writeAt(t, vols["blk"].target, 1<<20, blockData)

	// Stop: the driver, then the pool's records. Devices and mounts stay.
	d1.Stop()
	if err := p1.Close(); err != nil {
		t.Fatal(err)
	}
	p2 := openKernelPool(t, k, cfg)
	d2, c2 := start(p2)

	if got, err := os.ReadFile(dataFile); err != nil || !bytes.Equal(got, fileData) {
		t.Errorf("file after the restart: %d bytes, %v", len(got), err)
	}
	if got := readAt(t, vols["blk"].target, 1<<20, len(blockData)); !bytes.Equal(got, blockData) {
		t.Errorf("block data after the restart differs")
	}
	// And they still take writes.
	writeFile(t, filepath.Join(vols["fs"].target, "after"), []byte("after"))
	writeAt(t, vols["blk"].target, 0, blockData[:4096])

	for name, v := range vols {
		// The new driver finds the volumes staged and published.
		if _, err := c2.NodeStageVolume(ctx, &csipb.NodeStageVolumeRequest{VolumeId: v.id, StagingTargetPath: v.staging, VolumeCapability: v.c}); err != nil {
			t.Errorf("restage %s: %v", name, err)
		}
		if _, err := c2.NodePublishVolume(ctx, &csipb.NodePublishVolumeRequest{VolumeId: v.id, StagingTargetPath: v.staging, TargetPath: v.target, VolumeCapability: v.c}); err != nil {
			t.Errorf("republish %s: %v", name, err)
		}
		if _, err := c2.NodeGetVolumeStats(ctx, &csipb.NodeGetVolumeStatsRequest{VolumeId: v.id, VolumePath: v.target}); err != nil {
			t.Errorf("stats of %s: %v", name, err)
		}
		if _, err := c2.NodeUnpublishVolume(ctx, &csipb.NodeUnpublishVolumeRequest{VolumeId: v.id, TargetPath: v.target}); err != nil {
			t.Errorf("unpublish %s: %v", name, err)
		}
		if _, err := c2.NodeUnstageVolume(ctx, &csipb.NodeUnstageVolumeRequest{VolumeId: v.id, StagingTargetPath: v.staging}); err != nil {
			t.Errorf("unstage %s: %v", name, err)
		}
		if _, err := c2.DeleteVolume(ctx, &csipb.DeleteVolumeRequest{VolumeId: v.id}); err != nil {
			t.Errorf("delete %s: %v", name, err)
		}
		for _, p := range []string{v.target, v.staging} {
			if _, err := os.Lstat(p); !errors.Is(err, os.ErrNotExist) {
				t.Errorf("%s left behind: %v", p, err)
			}
		}
	}
	if m := mountsUnder(t, kubeletDir); len(m) != 0 {
		t.Errorf("mounts left: %v", m)
	}
	if left := leftovers(d2, p2); len(left) != 0 {
		t.Errorf("volumes left: %v", left)
	}
	list, err := k.List()
	if err != nil {
		t.Fatal(err)
	}
	for _, d := range list {
		if strings.HasPrefix(d.Name, "dmthin-"+cfg.Name+"-") {
			t.Errorf("dm device %s left", d.Name)
		}
	}
}

func writeFile(t *testing.T, path string, b []byte) {
	t.Helper()
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if _, err := f.Write(b); err != nil {
		t.Fatal(err)
	}
	if err := f.Sync(); err != nil {
		t.Fatal(err)
	}
}

// writeAt writes through a published raw block volume (a bind mount of its
// device node) and flushes it to the device.
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

// readAt reads through a published raw block volume, bypassing the page
// cache, so the data comes from the thin device.
func readAt(t *testing.T, path string, off int64, n int) []byte {
	t.Helper()
	f, err := os.OpenFile(path, os.O_RDONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	// Drop what the page cache holds for the device, so the data is read
	// from the thin device, not from memory the write left behind.
	if err := unix.Fadvise(int(f.Fd()), 0, 0, unix.FADV_DONTNEED); err != nil {
		t.Fatal(err)
	}
	b := make([]byte, n)
	if _, err := f.ReadAt(b, off); err != nil {
		t.Fatal(err)
	}
	return b
}
