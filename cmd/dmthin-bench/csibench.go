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

	var create, ready, readyFirst, readyMkfs, snap, restore, lvCreate, lvReadyMount, lvTmpl sample
	// readyToMount times CreateVolume and CreateVolume + NodeStageVolume.
	readyToMount := func(d *csi.Driver, name string) (string, time.Duration, time.Duration, error) {
		t0 := time.Now()
		r, err := d.CreateVolume(ctx, &csipb.CreateVolumeRequest{Name: name, CapacityRange: gib, VolumeCapabilities: caps})
		if err != nil {
			return "", 0, 0, err
		}
		t1 := time.Now()
		staging := filepath.Join(kubelet, "staging", name)
		if _, err := d.NodeStageVolume(ctx, &csipb.NodeStageVolumeRequest{VolumeId: r.GetVolume().GetVolumeId(), StagingTargetPath: staging, VolumeCapability: capMount}); err != nil {
			return "", 0, 0, err
		}
		return r.GetVolume().GetVolumeId(), t1.Sub(t0), time.Since(t0), nil
	}
	// The first volume of a size: no template yet, so mkfs runs at stage,
	// and the template for the next ones is built in the background.
	snapSrc, _, first, err := readyToMount(d, "pvc-first")
	if err != nil {
		return err
	}
	readyFirst = append(readyFirst, first)
	if err := waitTemplate(pool); err != nil {
		return err
	}
	for i := 1; i <= n; i++ {
		_, c, r, err := readyToMount(d, fmt.Sprintf("pvc-%d", i))
		if err != nil {
			return err
		}
		create, ready = append(create, c), append(ready, r)
	}
	// The same with templates turned off: mkfs at every stage.
	noTmpl, err := csi.New(csi.Options{NodeID: "bench", Pools: map[string]csi.Pool{"csibench": pool}, KubeletDir: kubelet, FS: csi.NewHostFS(), Templates: -1})
	if err != nil {
		return err
	}
	for i := 0; i <= n; i++ {
		_, _, r, err := readyToMount(noTmpl, fmt.Sprintf("pvc-mkfs-%d", i))
		if err != nil {
			return err
		}
		if i > 0 {
			readyMkfs = append(readyMkfs, r)
		}
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
	// lvm2's side uses the dm table's VG on tmpfs; with -only csi there is
	// none yet.
	if _, err := timed(lvm("vgs", "vg")); err != nil {
		if _, err := setupLVM("/tmp", "vg"); err != nil {
			return err
		}
	}
	mkfs := append([]string{"mkfs.ext4"}, "-F", "-q", "-m", "0", "-E", "nodiscard,lazy_itable_init=1,lazy_journal_init=1")
	for i := 0; i <= n; i++ {
		name := fmt.Sprintf("csi%d", i)
		mnt := filepath.Join(dir, "lvmnt", name)
		if err := os.MkdirAll(mnt, 0o755); err != nil {
			return err
		}
		lvc, err := timed(lvm("lvcreate", "--thin", "-V", "1G", "-n", name, "vg/pool"))
		if err != nil {
			return err
		}
		node := nodeOfLV(name)
		rest, err := timed(append(append([]string(nil), mkfs...), node), []string{"mount", "-t", "ext4", node, mnt})
		if err != nil {
			return err
		}
		_ = unix.Unmount(mnt, 0)
		if i > 0 {
			lvCreate, lvReadyMount = append(lvCreate, lvc), append(lvReadyMount, lvc+rest)
		}
	}
	// lvm2 given the same trick: a formatted thin LV made once (untimed,
	// with the driver's template mkfs options), then per volume a thin
	// snapshot of it, activated, a new filesystem UUID (as the driver gives
	// each clone) and the mount.
	tmplMkfs := []string{"mkfs.ext4", "-F", "-q", "-m", "0", "-O", "metadata_csum_seed", "-E", "nodiscard,assume_storage_prezeroed=1"}
	if _, err := timed(lvm("lvcreate", "--thin", "-V", "1G", "-n", "tmpl", "vg/pool")); err != nil {
		return err
	}
	if _, err := timed(append(tmplMkfs, nodeOfLV("tmpl"))); err != nil {
		return err
	}
	if _, err := timed(lvm("lvchange", "-an", "vg/tmpl")); err != nil {
		return err
	}
	for i := 0; i <= n; i++ {
		name := fmt.Sprintf("clone%d", i)
		mnt := filepath.Join(dir, "lvmnt", name)
		if err := os.MkdirAll(mnt, 0o755); err != nil {
			return err
		}
		t0 := time.Now()
		if _, err := timed(lvm("lvcreate", "-s", "-kn", "-ay", "-n", name, "vg/tmpl")); err != nil {
			return err
		}
		node := nodeOfLV(name)
		if _, err := timed([]string{"tune2fs", "-U", "random", node}, []string{"mount", "-t", "ext4", node, mnt}); err != nil {
			return err
		}
		d := time.Since(t0)
		_ = unix.Unmount(mnt, 0)
		if i > 0 {
			lvTmpl = append(lvTmpl, d)
		}
	}
	if err := emitSamples("csi", "ready to mount", map[string]sample{"csi-dmthin templates": ready, "csi-dmthin no templates": readyMkfs, "lvm2 lvcreate+mkfs+mount": lvReadyMount, "lvm2 template clone+mount": lvTmpl}); err != nil {
		return err
	}
	fmt.Printf("\n## CSI calls (pkg/csi, in-process) against lvm2\n\n")
	fmt.Println("| operation | csi-dmthin | lvm2 | lvm2 ÷ csi-dmthin |")
	fmt.Println("|---|---:|---:|---:|")
	fmt.Printf("| CreateVolume 1 GiB / lvcreate --thin -V1G | %s | %s | %s |\n", cell(create), cell(lvCreate), ratio(lvCreate, create))
	fmt.Printf("| CreateSnapshot / lvcreate -s | %s | %s | %s |\n", cell(snap), "see above", "–")
	fmt.Printf("| CreateVolume from a snapshot | %s | – | – |\n", cell(restore))
	fmt.Printf("| ready to mount, templates: CreateVolume + NodeStageVolume (a clone of a formatted template, new UUID, mount) / lvcreate + mkfs.ext4 + mount | %s | %s | %s |\n", cell(ready), cell(lvReadyMount), ratio(lvReadyMount, ready))
	fmt.Printf("| ready to mount, templates on both sides / lvm2's template flow: lvcreate -s -kn -ay of a formatted thin LV, tune2fs -U random, mount | %s | %s | %s |\n", cell(ready), cell(lvTmpl), ratio(lvTmpl, ready))
	fmt.Printf("| ready to mount, templates off (mkfs + mount at every stage) / lvcreate + mkfs.ext4 + mount | %s | %s | %s |\n", cell(readyMkfs), cell(lvReadyMount), ratio(lvReadyMount, readyMkfs))
	fmt.Printf("| ready to mount, first volume of its size (no template yet: mkfs at stage; one sample) / lvcreate + mkfs.ext4 + mount | %s | %s | %s |\n", cell(readyFirst), cell(lvReadyMount), ratio(lvReadyMount, readyFirst))
	fmt.Println("\nlvm2's mkfs.ext4: -m 0 -E nodiscard,lazy_itable_init=1,lazy_journal_init=1, as the driver's at stage.")
	fmt.Println("A template's (the driver's, and the formatted thin LV of lvm2's template flow): -m 0 -O metadata_csum_seed -E nodiscard,assume_storage_prezeroed=1, once per size.")
	return nil
}

// waitTemplate waits for the pool's first sealed template, which the
// driver builds in the background after the first volume of a size.
func waitTemplate(pool *thinpool.Pool) error {
	deadline := time.Now().Add(2 * time.Minute)
	for time.Now().Before(deadline) {
		for _, v := range pool.List() {
			if v.Kind == thinpool.KindTemplate && v.Sealed {
				return nil
			}
		}
		time.Sleep(10 * time.Millisecond)
	}
	return fmt.Errorf("no formatted template after 2 minutes")
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
