//go:build vmtest

package csi

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
	"time"

	csipb "github.com/container-storage-interface/spec/lib/go/csi"
	"golang.org/x/sys/unix"

	"github.com/csi-dmthin/csi-dmthin/internal/fsprobe"
)

// Formatted templates on the real kernel with real mkfs: clones of one
// template mounted side by side, each with its own UUID, each filesystem
// clean by e2fsck after use, and no mkfs at their stage.
func TestTemplatesKernel(t *testing.T) {
	k := hostKernel(t)
	dir := t.TempDir()
	p := openKernelPool(t, k, loopPoolConfig(dir, "tmpl", 512<<20))
	kubeletDir := filepath.Join(dir, "kubelet")
	d, err := New(Options{NodeID: testNode, Pools: map[string]Pool{"tmpl": p}, KubeletDir: kubeletDir, FS: NewHostFS()})
	if err != nil {
		t.Fatal(err)
	}
	c := dialDriver(t, serveDriver(t, d))
	const size = 64 << 20
	create := func(name string) string {
		t.Helper()
		resp, err := c.CreateVolume(t.Context(), &csipb.CreateVolumeRequest{
			Name: name, CapacityRange: &csipb.CapacityRange{RequiredBytes: size},
			VolumeCapabilities: []*csipb.VolumeCapability{fsCap},
		})
		if err != nil {
			t.Fatal(err)
		}
		return resp.GetVolume().GetVolumeId()
	}
	create("first")
	tmpl := templateName("ext4", size)
	deadline := time.Now().Add(60 * time.Second)
	for {
		if v, err := p.Get(tmpl); err == nil && v.Sealed {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the template was not built")
		}
		time.Sleep(20 * time.Millisecond)
	}
	var uuids [][16]byte
	for i, name := range []string{"clone-a", "clone-b"} {
		id := create(name)
		if v, err := p.Get(name); err != nil || v.Source != tmpl {
			t.Fatalf("%s: %+v, %v", name, v, err)
		}
		staging := filepath.Join(kubeletDir, "staging", name)
		if _, err := c.NodeStageVolume(t.Context(), &csipb.NodeStageVolumeRequest{VolumeId: id, StagingTargetPath: staging, VolumeCapability: fsCap}); err != nil {
			t.Fatal(err)
		}
		data := bytes.Repeat([]byte{byte(i + 1)}, 1<<20)
		if err := os.WriteFile(filepath.Join(staging, "data"), data, 0o644); err != nil {
			t.Fatal(err)
		}
		dev, err := p.DevicePath(name)
		if err != nil {
			t.Fatal(err)
		}
		f, err := os.Open(dev)
		if err != nil {
			t.Fatal(err)
		}
		info, err := fsprobe.Probe(f)
		f.Close()
		if err != nil || info.Type != "ext4" || info.SizeBytes != size || info.NeverMounted {
			t.Fatalf("%s after stage: %+v, %v", name, info, err)
		}
		uuids = append(uuids, info.UUID)
	}
	// Published with mount(2): a read-only bind is read-only, a
	// read-write one writes through to the staged filesystem.
	for _, ro := range []bool{true, false} {
		target := filepath.Join(kubeletDir, "pods", fmt.Sprint(ro), "mount")
		if _, err := c.NodePublishVolume(t.Context(), &csipb.NodePublishVolumeRequest{
			VolumeId: "tmpl/clone-a", StagingTargetPath: filepath.Join(kubeletDir, "staging", "clone-a"),
			TargetPath: target, VolumeCapability: fsCap, Readonly: ro,
		}); err != nil {
			t.Fatal(err)
		}
		err := os.WriteFile(filepath.Join(target, "via-"+fmt.Sprint(ro)), []byte("x"), 0o644)
		if ro && !errors.Is(err, unix.EROFS) {
			t.Errorf("write through a read-only publish: %v, want EROFS", err)
		}
		if !ro && err != nil {
			t.Errorf("write through a read-write publish: %v", err)
		}
		if _, err := c.NodeUnpublishVolume(t.Context(), &csipb.NodeUnpublishVolumeRequest{VolumeId: "tmpl/clone-a", TargetPath: target}); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := os.Stat(filepath.Join(kubeletDir, "staging", "clone-a", "via-false")); err != nil {
		t.Errorf("the read-write publish did not reach the staged filesystem: %v", err)
	}
	if uuids[0] == uuids[1] {
		t.Fatalf("two clones of one template share UUID %x", uuids[0])
	}
	for _, name := range []string{"clone-a", "clone-b"} {
		id := "tmpl/" + name
		staging := filepath.Join(kubeletDir, "staging", name)
		if got, err := os.ReadFile(filepath.Join(staging, "data")); err != nil || len(got) != 1<<20 {
			t.Fatalf("%s: read back %d bytes, %v", name, len(got), err)
		}
		if _, err := c.NodeUnstageVolume(t.Context(), &csipb.NodeUnstageVolumeRequest{VolumeId: id, StagingTargetPath: staging}); err != nil {
			t.Fatal(err)
		}
		dev, err := p.Activate(t.Context(), name)
		if err != nil {
			t.Fatal(err)
		}
		if out, err := exec.Command("e2fsck", "-f", "-n", dev).CombinedOutput(); err != nil {
			t.Errorf("e2fsck %s: %v\n%s", name, err, out)
		}
		if err := p.Deactivate(t.Context(), name); err != nil {
			t.Fatal(err)
		}
	}
	for _, name := range []string{"first", "clone-a", "clone-b"} {
		if _, err := c.DeleteVolume(t.Context(), &csipb.DeleteVolumeRequest{VolumeId: "tmpl/" + name}); err != nil {
			t.Fatal(err)
		}
	}
	if left := leftovers(d, p); len(left) != 0 {
		t.Errorf("left: %v", left)
	}
	if u, err := p.Usage(); err != nil || u.Templates != 1 {
		t.Errorf("usage %+v, %v", u, err)
	}
}
