package main

import (
	"context"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"time"

	csipb "github.com/container-storage-interface/spec/lib/go/csi"
	"golang.org/x/sys/unix"
	"k8s.io/klog/v2"

	"github.com/csi-dmthin/csi-dmthin/pkg/csi"
	"github.com/csi-dmthin/csi-dmthin/pkg/thinpool"
)

// csiBench measures the driver's CSI calls (called in-process, without the
// gRPC hop) beside lvm2: CreateVolume against lvcreate, and a volume ready
// to mount (CreateVolume + NodeStageVolume: activation, mkfs, mount)
// against lvcreate + mkfs.ext4 (+ mount), with the same mkfs options.
func csiBench(n int) error {
	// The driver's log lines would interleave with the tables.
	klog.SetOutput(io.Discard)
	klog.LogToStderr(false)
	ctx := context.Background()
	k, err := thinpool.NewHostKernel()
	if err != nil {
		return err
	}
	dir, err := os.MkdirTemp("", "csibench-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(dir)
	pool, err := thinpool.Open(ctx, thinpool.Config{
		Name: "csibench", StateDir: filepath.Join(dir, "state"),
		DataFile: filepath.Join(dir, "data"), MetadataFile: filepath.Join(dir, "meta"),
		DataFileBytes: poolDataBytes, OverprovisionRatio: -1,
	}, k)
	if err != nil {
		return err
	}
	defer pool.Close()
	kubelet := filepath.Join(dir, "kubelet")
	d, err := csi.New(csi.Options{NodeID: "bench", Pools: map[string]csi.Pool{"csibench": pool}, KubeletDir: kubelet, FS: csi.NewHostFS()})
	if err != nil {
		return err
	}
	capMount := &csipb.VolumeCapability{
		AccessType: &csipb.VolumeCapability_Mount{Mount: &csipb.VolumeCapability_MountVolume{FsType: "ext4"}},
		AccessMode: &csipb.VolumeCapability_AccessMode{Mode: csipb.VolumeCapability_AccessMode_SINGLE_NODE_WRITER},
	}
	caps := []*csipb.VolumeCapability{capMount}
	gib := &csipb.CapacityRange{RequiredBytes: volumeBytes}

	var create, ready, snap, restore, lvCreate, lvReady, lvReadyMount sample
	var snapSrc string
	for i := 0; i <= n; i++ {
		t0 := time.Now()
		r, err := d.CreateVolume(ctx, &csipb.CreateVolumeRequest{Name: fmt.Sprintf("pvc-%d", i), CapacityRange: gib, VolumeCapabilities: caps})
		if err != nil {
			return err
		}
		t1 := time.Now()
		staging := filepath.Join(kubelet, "staging", fmt.Sprint(i))
		if _, err := d.NodeStageVolume(ctx, &csipb.NodeStageVolumeRequest{VolumeId: r.GetVolume().GetVolumeId(), StagingTargetPath: staging, VolumeCapability: capMount}); err != nil {
			return err
		}
		t2 := time.Now()
		if i == 0 {
			snapSrc = r.GetVolume().GetVolumeId()
			continue
		}
		create, ready = append(create, t1.Sub(t0)), append(ready, t2.Sub(t0))
	}
	for i := 0; i <= n; i++ {
		t0 := time.Now()
		s, err := d.CreateSnapshot(ctx, &csipb.CreateSnapshotRequest{Name: fmt.Sprintf("snap-%d", i), SourceVolumeId: snapSrc})
		if err != nil {
			return err
		}
		t1 := time.Now()
		_, err = d.CreateVolume(ctx, &csipb.CreateVolumeRequest{Name: fmt.Sprintf("restore-%d", i), VolumeCapabilities: caps,
			VolumeContentSource: &csipb.VolumeContentSource{Type: &csipb.VolumeContentSource_Snapshot{Snapshot: &csipb.VolumeContentSource_SnapshotSource{SnapshotId: s.GetSnapshot().GetSnapshotId()}}}})
		if err != nil {
			return err
		}
		t2 := time.Now()
		if i > 0 {
			snap, restore = append(snap, t1.Sub(t0)), append(restore, t2.Sub(t1))
		}
	}
	mkfs := append([]string{"mkfs.ext4"}, "-F", "-q", "-m", "0", "-E", "nodiscard,lazy_itable_init=1,lazy_journal_init=1")
	for i := 0; i <= n; i++ {
		name := fmt.Sprintf("csi%d", i)
		t0 := time.Now()
		if _, err := timed(lvm("lvcreate", "--thin", "-V", "1G", "-n", name, "vg/pool")); err != nil {
			return err
		}
		t1 := time.Now()
		node := nodeOfLV(name)
		if _, err := timed(append(append([]string(nil), mkfs...), node)); err != nil {
			return err
		}
		t2 := time.Now()
		mnt := filepath.Join(dir, "lvmnt", name)
		if err := os.MkdirAll(mnt, 0o755); err != nil {
			return err
		}
		if _, err := timed([]string{"mount", "-t", "ext4", node, mnt}); err != nil {
			return err
		}
		t3 := time.Now()
		_ = unix.Unmount(mnt, 0)
		if i > 0 {
			lvCreate, lvReady, lvReadyMount = append(lvCreate, t1.Sub(t0)), append(lvReady, t2.Sub(t0)), append(lvReadyMount, t3.Sub(t0))
		}
	}
	fmt.Printf("\n## CSI calls (pkg/csi, in-process) against lvm2\n\n")
	fmt.Println("| operation | csi-dmthin | lvm2 | lvm2 ÷ csi-dmthin |")
	fmt.Println("|---|---:|---:|---:|")
	fmt.Printf("| CreateVolume 1 GiB / lvcreate --thin -V1G | %s | %s | %s |\n", cell(create), cell(lvCreate), ratio(lvCreate, create))
	fmt.Printf("| CreateSnapshot / lvcreate -s | %s | %s | %s |\n", cell(snap), "see above", "–")
	fmt.Printf("| CreateVolume from a snapshot | %s | – | – |\n", cell(restore))
	fmt.Printf("| ready to mount: CreateVolume + NodeStageVolume (mkfs.ext4, mount) / lvcreate + mkfs.ext4 | %s | %s | %s |\n", cell(ready), cell(lvReady), ratio(lvReady, ready))
	fmt.Printf("| ... with lvm2's mount too | %s | %s | %s |\n", cell(ready), cell(lvReadyMount), ratio(lvReadyMount, ready))
	fmt.Println("\nmkfs.ext4 options on both sides: -m 0 -E nodiscard,lazy_itable_init=1,lazy_journal_init=1.")
	return nil
}

// nodeOfLV returns the device node of vg/<lv>, which lvm2 (with udev off)
// names /dev/mapper/vg-<lv> and devtmpfs /dev/dm-N.
func nodeOfLV(lv string) string {
	c, err := thinpool.NewHostKernel()
	if err != nil {
		return "/nonexistent"
	}
	defer c.Close()
	return nodeOf(c.Client, "vg-"+lv)
}
