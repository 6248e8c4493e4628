//go:build vmtest

package csi

import (
	"crypto/sha256"
	"math/rand/v2"
	"path/filepath"
	"testing"
	"time"

	csipb "github.com/container-storage-interface/spec/lib/go/csi"
	"golang.org/x/sys/unix"

	"github.com/csi-dmthin/csi-dmthin/pkg/thinpool"
)

// upLoopback brings the guest's lo up: the copy server listens on TCP.
func upLoopback(t *testing.T) {
	t.Helper()
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(fd)
	ifr, err := unix.NewIfreq("lo")
	if err != nil {
		t.Fatal(err)
	}
	if err := unix.IoctlIfreq(fd, unix.SIOCGIFFLAGS, ifr); err != nil {
		t.Fatal(err)
	}
	ifr.SetUint16(ifr.Uint16() | unix.IFF_UP)
	if err := unix.IoctlIfreq(fd, unix.SIOCSIFFLAGS, ifr); err != nil {
		t.Fatal(err)
	}
}

// kernelCopyNode is a driver over one pool on the real kernel; the two
// nodes' pools have their own names, as their dm devices share a kernel.
func kernelCopyNode(t *testing.T, node, pool string, copy *CopyOptions) (*Driver, *thinpool.Pool) {
	t.Helper()
	k := hostKernel(t)
	p := openKernelPool(t, k, loopPoolConfig(t.TempDir(), pool, 2<<30))
	d, err := New(Options{NodeID: node, Pools: map[string]Pool{pool: p}, KubeletDir: t.TempDir(), FS: NewHostFS(), Templates: -1, Copy: copy})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { d.Shutdown(t.Context()) })
	return d, p
}

// hashRange hashes n bytes at off of a device, read past the page cache.
func hashRange(t *testing.T, path string, off, n int64) [32]byte {
	t.Helper()
	return sha256.Sum256(readAt(t, path, off, int(n)))
}

// A restore and a clone copied between two drivers on the real kernel:
// 32 MiB written to a 1 GiB volume, the mapped blocks read from the
// pool's metadata, the bytes through real thin devices, TLS on loopback.
// The log gives the time each copy took (under TCG, in one VM: both ends
// share its processors).
func TestCopyKernel(t *testing.T) {
	upLoopback(t)
	const size, data = 1 << 30, 32 << 20
	src, srcPool := kernelCopyNode(t, "node-a", "srcpool", nil)
	ctx := t.Context()
	vol, err := src.CreateVolume(ctx, &csipb.CreateVolumeRequest{Name: "pvc-src", CapacityRange: &csipb.CapacityRange{RequiredBytes: size}, VolumeCapabilities: []*csipb.VolumeCapability{blockCap(rwo)}})
	if err != nil {
		t.Fatal(err)
	}
	path, err := srcPool.Activate(ctx, "pvc-src")
	if err != nil {
		t.Fatal(err)
	}
	// 32 MiB at 300 MiB, and 4 KiB at the start and at the end.
	r := rand.New(rand.NewPCG(3, 4))
	buf := make([]byte, data)
	for i := range buf {
		buf[i] = byte(r.Uint32())
	}
	writeAt(t, path, 300<<20, buf)
	writeAt(t, path, 0, buf[:4096])
	writeAt(t, path, size-4096, buf[4096:8192])
	want := map[string][32]byte{
		"data": sha256.Sum256(buf), "start": sha256.Sum256(buf[:4096]), "end": sha256.Sum256(buf[4096:8192]),
		"hole": sha256.Sum256(make([]byte, 1<<20)),
	}
	snap, err := src.CreateSnapshot(ctx, &csipb.CreateSnapshotRequest{Name: "snap-1", SourceVolumeId: vol.GetVolume().GetVolumeId()})
	if err != nil {
		t.Fatal(err)
	}
	events := &copyEvents{}
	dst, dstPool := kernelCopyNode(t, "node-b", "dstpool", &CopyOptions{
		Peers:  onePeer{node: "node-a", pool: "srcpool", ep: serveCopiesFrom(t, src)},
		Token:  func() (string, error) { return "driver-token", nil },
		Dir:    filepath.Join(t.TempDir(), "copies"),
		Claims: events,
	})
	dst.events = events
	check := func(name string, req *csipb.CreateVolumeRequest) {
		t.Helper()
		start := time.Now()
		if _, err := dst.CreateVolume(ctx, req); err != nil {
			t.Fatal(err)
		}
		took := time.Since(start)
		mapped, moved := events.counts(t)
		t.Logf("%s: %d bytes mapped, %d moved, CreateVolume took %s (%.1f MiB/s of mapped data)", name, mapped, moved, took.Round(time.Millisecond), float64(mapped)/(1<<20)/took.Seconds())
		if mapped < data || mapped > data+8<<20 || moved != mapped {
			t.Errorf("%s: %d bytes mapped, %d moved; want the 32 MiB and two blocks, each once", name, mapped, moved)
		}
		p, err := dstPool.Activate(ctx, name)
		if err != nil {
			t.Fatal(err)
		}
		for what, got := range map[string][32]byte{
			"data": hashRange(t, p, 300<<20, data), "start": hashRange(t, p, 0, 4096), "end": hashRange(t, p, size-4096, 4096),
			"hole": hashRange(t, p, 600<<20, 1<<20),
		} {
			if got != want[what] {
				t.Errorf("%s: the copy's %s differs from the source's", name, what)
			}
		}
		if err := dstPool.Deactivate(ctx, name); err != nil {
			t.Fatal(err)
		}
	}
	restore := &csipb.CreateVolumeRequest{
		Name: "pvc-restored", CapacityRange: &csipb.CapacityRange{RequiredBytes: size}, VolumeCapabilities: []*csipb.VolumeCapability{blockCap(rwo)},
		Parameters:          map[string]string{ParamPVCName: "restored", ParamPVCNamespace: "db"},
		VolumeContentSource: &csipb.VolumeContentSource{Type: &csipb.VolumeContentSource_Snapshot{Snapshot: &csipb.VolumeContentSource_SnapshotSource{SnapshotId: snap.GetSnapshot().GetSnapshotId()}}},
	}
	check("pvc-restored", restore)
	// The clone reads the volume as it is now: the first block changed.
	writeAt(t, path, 0, buf[8192:12288])
	want["start"] = sha256.Sum256(buf[8192:12288])
	clone := &csipb.CreateVolumeRequest{
		Name: "pvc-clone", CapacityRange: &csipb.CapacityRange{RequiredBytes: size}, VolumeCapabilities: []*csipb.VolumeCapability{blockCap(rwo)},
		Parameters:          map[string]string{ParamPVCName: "clone", ParamPVCNamespace: "db"},
		VolumeContentSource: &csipb.VolumeContentSource{Type: &csipb.VolumeContentSource_Volume{Volume: &csipb.VolumeContentSource_VolumeSource{VolumeId: vol.GetVolume().GetVolumeId()}}},
	}
	check("pvc-clone", clone)
	// Nothing stays open or made for the copies on the source.
	for _, v := range srcPool.List() {
		if isCopySnapshotName(v.Name) || (v.Kind == thinpool.KindSnapshot && v.Active) {
			t.Errorf("left on the source: %+v", v)
		}
	}
	if hashRange(t, path, 600<<20, 1<<20) != want["hole"] {
		t.Error("the source's hole reads other than zeros")
	}
}
