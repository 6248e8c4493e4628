package main

import (
	"context"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"strings"
	"time"

	csipb "github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"k8s.io/klog/v2"

	"github.com/csi-dmthin/csi-dmthin/pkg/csi"
	"github.com/csi-dmthin/csi-dmthin/pkg/thinpool"
)

type demo struct {
	ctx        context.Context
	ctl        csipb.ControllerClient
	node       csipb.NodeClient
	kubeletDir string
	n          int
}

// step runs one step and prints it with its duration.
func (d *demo) step(what string, fn func() (string, error)) error {
	d.n++
	start := time.Now()
	detail, err := fn()
	dur := time.Since(start).Round(10 * time.Microsecond)
	if err != nil {
		fmt.Printf("  %2d FAIL %-44s %9s  %v\n", d.n, what, dur, err)
		return fmt.Errorf("%s: %w", what, err)
	}
	fmt.Printf("  %2d ok   %-44s %9s  %s\n", d.n, what, dur, detail)
	return nil
}

var mountCap = &csipb.VolumeCapability{
	AccessType: &csipb.VolumeCapability_Mount{Mount: &csipb.VolumeCapability_MountVolume{FsType: "ext4"}},
	AccessMode: &csipb.VolumeCapability_AccessMode{Mode: csipb.VolumeCapability_AccessMode_SINGLE_NODE_WRITER},
}

func (d *demo) paths(id string) (staging, target string) {
	safe := strings.ReplaceAll(id, "/", "_")
	return filepath.Join(d.kubeletDir, "plugins/staging", safe), filepath.Join(d.kubeletDir, "pods/demo/volumes", safe)
}

func (d *demo) stagePublish(id string) (string, error) {
	staging, target := d.paths(id)
	if _, err := d.node.NodeStageVolume(d.ctx, &csipb.NodeStageVolumeRequest{VolumeId: id, StagingTargetPath: staging, VolumeCapability: mountCap}); err != nil {
		return "", err
	}
	if _, err := d.node.NodePublishVolume(d.ctx, &csipb.NodePublishVolumeRequest{VolumeId: id, StagingTargetPath: staging, TargetPath: target, VolumeCapability: mountCap}); err != nil {
		return "", err
	}
	return target, nil
}

func (d *demo) unpublishUnstage(id string) error {
	staging, target := d.paths(id)
	if _, err := d.node.NodeUnpublishVolume(d.ctx, &csipb.NodeUnpublishVolumeRequest{VolumeId: id, TargetPath: target}); err != nil {
		return err
	}
	_, err := d.node.NodeUnstageVolume(d.ctx, &csipb.NodeUnstageVolumeRequest{VolumeId: id, StagingTargetPath: staging})
	return err
}

func readFile(dir string) (string, error) {
	b, err := os.ReadFile(filepath.Join(dir, "hello.txt"))
	return string(b), err
}

func writeFile(dir, s string) error {
	f, err := os.Create(filepath.Join(dir, "hello.txt"))
	if err != nil {
		return err
	}
	if _, err := f.WriteString(s); err != nil {
		f.Close()
		return err
	}
	if err := f.Sync(); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}

func walk() error {
	// The driver's own log would interleave with the steps; the demo shows
	// what each call returned instead.
	klog.SetOutput(io.Discard)
	klog.LogToStderr(false)
	ctx := context.Background()
	dir, err := os.MkdirTemp("", "dmthin-demo-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(dir)
	fmt.Printf("\ncsi-dmthin demo: the CSI driver on a thin pool of loop files in %s (loop files are for demos, not production)\n\n", dir)

	k, err := thinpool.NewHostKernel()
	if err != nil {
		return err
	}
	var pool *thinpool.Pool
	var drv *csi.Driver
	d := &demo{ctx: ctx, kubeletDir: filepath.Join(dir, "kubelet")}
	var vol, fast, snap, restored, clone string
	var target string

	steps := []struct {
		what string
		fn   func() (string, error)
	}{
		{"open a 4 GiB thin pool (sparse loop files)", func() (string, error) {
			pool, err = thinpool.Open(ctx, thinpool.Config{
				Name: "demo", StateDir: filepath.Join(dir, "state"),
				DataFile: filepath.Join(dir, "demo.data"), MetadataFile: filepath.Join(dir, "demo.meta"),
				DataFileBytes: 4 << 30,
			}, k)
			return "pool demo", err
		}},
		{"start the driver on a unix socket", func() (string, error) {
			drv, err = csi.New(csi.Options{NodeID: "demo-node", Version: "demo", Pools: map[string]csi.Pool{"demo": pool},
				KubeletDir: d.kubeletDir, FS: csi.NewHostFS()})
			if err != nil {
				return "", err
			}
			sock := filepath.Join(dir, "csi.sock")
			l, err := net.Listen("unix", sock)
			if err != nil {
				return "", err
			}
			go func() { _ = drv.ServeListener(l) }()
			conn, err := grpc.NewClient("unix://"+sock, grpc.WithTransportCredentials(insecure.NewCredentials()))
			if err != nil {
				return "", err
			}
			d.ctl, d.node = csipb.NewControllerClient(conn), csipb.NewNodeClient(conn)
			return sock, nil
		}},
		{"CreateVolume: 1 GiB", func() (string, error) {
			r, err := d.ctl.CreateVolume(ctx, &csipb.CreateVolumeRequest{Name: "pvc-demo", CapacityRange: &csipb.CapacityRange{RequiredBytes: 1 << 30},
				VolumeCapabilities: []*csipb.VolumeCapability{mountCap}})
			if err != nil {
				return "", err
			}
			vol = r.GetVolume().GetVolumeId()
			return vol + " on node " + r.GetVolume().GetAccessibleTopology()[0].GetSegments()[csi.TopologyKey], nil
		}},
		{"NodeStage + NodePublish (mkfs.ext4, mount)", func() (string, error) {
			target, err = d.stagePublish(vol)
			return target, err
		}},
		{"wait for the 1 GiB ext4 template (built in the background)", func() (string, error) {
			for deadline := time.Now().Add(2 * time.Minute); time.Now().Before(deadline); time.Sleep(10 * time.Millisecond) {
				for _, v := range pool.List() {
					if v.Kind == thinpool.KindTemplate && v.Sealed {
						return v.Name, nil
					}
				}
			}
			return "", fmt.Errorf("no template after 2 minutes")
		}},
		{"CreateVolume + NodeStage + NodePublish: another 1 GiB (template clone, no mkfs)", func() (string, error) {
			r, err := d.ctl.CreateVolume(ctx, &csipb.CreateVolumeRequest{Name: "pvc-fast", CapacityRange: &csipb.CapacityRange{RequiredBytes: 1 << 30},
				VolumeCapabilities: []*csipb.VolumeCapability{mountCap}})
			if err != nil {
				return "", err
			}
			fast = r.GetVolume().GetVolumeId()
			return d.stagePublish(fast)
		}},
		{"write a file", func() (string, error) { return `hello.txt = "first"`, writeFile(target, "first") }},
		{"CreateSnapshot while mounted", func() (string, error) {
			r, err := d.ctl.CreateSnapshot(ctx, &csipb.CreateSnapshotRequest{Name: "snapshot-demo", SourceVolumeId: vol})
			if err != nil {
				return "", err
			}
			snap = r.GetSnapshot().GetSnapshotId()
			return snap, nil
		}},
		{"change the file", func() (string, error) { return `hello.txt = "second"`, writeFile(target, "second") }},
		{"CreateVolume from the snapshot (restore)", func() (string, error) {
			r, err := d.ctl.CreateVolume(ctx, &csipb.CreateVolumeRequest{Name: "pvc-restored", VolumeCapabilities: []*csipb.VolumeCapability{mountCap},
				VolumeContentSource: &csipb.VolumeContentSource{Type: &csipb.VolumeContentSource_Snapshot{Snapshot: &csipb.VolumeContentSource_SnapshotSource{SnapshotId: snap}}}})
			if err != nil {
				return "", err
			}
			restored = r.GetVolume().GetVolumeId()
			return restored, nil
		}},
		{"stage, publish and read the restore", func() (string, error) {
			t, err := d.stagePublish(restored)
			if err != nil {
				return "", err
			}
			s, err := readFile(t)
			if err != nil || s != "first" {
				return "", fmt.Errorf("restore holds %q (%v), want \"first\"", s, err)
			}
			return `"first": the data as it was at the snapshot`, nil
		}},
		{"CreateVolume from the volume (clone), 2 GiB", func() (string, error) {
			r, err := d.ctl.CreateVolume(ctx, &csipb.CreateVolumeRequest{Name: "pvc-clone", CapacityRange: &csipb.CapacityRange{RequiredBytes: 2 << 30},
				VolumeCapabilities:  []*csipb.VolumeCapability{mountCap},
				VolumeContentSource: &csipb.VolumeContentSource{Type: &csipb.VolumeContentSource_Volume{Volume: &csipb.VolumeContentSource_VolumeSource{VolumeId: vol}}}})
			if err != nil {
				return "", err
			}
			clone = r.GetVolume().GetVolumeId()
			return clone, nil
		}},
		{"stage, publish and read the clone", func() (string, error) {
			t, err := d.stagePublish(clone)
			if err != nil {
				return "", err
			}
			s, err := readFile(t)
			if err != nil || s != "second" {
				return "", fmt.Errorf("clone holds %q (%v), want \"second\"", s, err)
			}
			return `"second": the volume's current data`, nil
		}},
		{"NodeExpandVolume: the volume to 3 GiB, online", func() (string, error) {
			r, err := d.node.NodeExpandVolume(ctx, &csipb.NodeExpandVolumeRequest{VolumeId: vol, VolumePath: target,
				CapacityRange: &csipb.CapacityRange{RequiredBytes: 3 << 30}, VolumeCapability: mountCap})
			if err != nil {
				return "", err
			}
			st, err := d.node.NodeGetVolumeStats(ctx, &csipb.NodeGetVolumeStatsRequest{VolumeId: vol, VolumePath: target})
			if err != nil {
				return "", err
			}
			return fmt.Sprintf("device %d MiB, filesystem %d MiB", r.GetCapacityBytes()>>20, st.GetUsage()[0].GetTotal()>>20), nil
		}},
		{"read the volume back after the expansion", func() (string, error) {
			s, err := readFile(target)
			if err != nil || s != "second" {
				return "", fmt.Errorf("volume holds %q (%v)", s, err)
			}
			return `"second"`, nil
		}},
		{"pool usage", func() (string, error) {
			u, err := pool.Usage()
			if err != nil {
				return "", err
			}
			return fmt.Sprintf("%d volumes, %d snapshot; data %d MiB used of %d MiB; %d MiB provisioned", u.Volumes, u.Snapshots, u.DataUsedBytes>>20, u.DataBytes>>20, u.ProvisionedBytes>>20), nil
		}},
		{"unpublish, unstage and delete everything", func() (string, error) {
			for _, id := range []string{vol, fast, restored, clone} {
				if err := d.unpublishUnstage(id); err != nil {
					return "", err
				}
				if _, err := d.ctl.DeleteVolume(ctx, &csipb.DeleteVolumeRequest{VolumeId: id}); err != nil {
					return "", err
				}
			}
			if _, err := d.ctl.DeleteSnapshot(ctx, &csipb.DeleteSnapshotRequest{SnapshotId: snap}); err != nil {
				return "", err
			}
			vols, err := d.ctl.ListVolumes(ctx, &csipb.ListVolumesRequest{})
			if err != nil {
				return "", err
			}
			snaps, err := d.ctl.ListSnapshots(ctx, &csipb.ListSnapshotsRequest{})
			if err != nil {
				return "", err
			}
			if n := len(vols.GetEntries()) + len(snaps.GetEntries()); n != 0 {
				return "", fmt.Errorf("%d volumes and snapshots left", n)
			}
			return "no volume or snapshot left", nil
		}},
		{"stop the driver; delete the templates it kept", func() (string, error) {
			drv.Stop() // waits for template builds
			n := 0
			for _, v := range pool.List() {
				if v.Kind == thinpool.KindTemplate {
					if err := pool.Delete(ctx, v.Name); err != nil {
						return "", err
					}
					n++
				}
			}
			if left := len(pool.List()); left != 0 {
				return "", fmt.Errorf("%d thin devices left in the pool", left)
			}
			return fmt.Sprintf("%d template deleted; no thin device left", n), nil
		}},
	}
	for _, s := range steps {
		if err := d.step(s.what, s.fn); err != nil {
			return err
		}
	}
	pool.Close()
	fmt.Println("\nDone: every CSI call worked on a real dm-thin pool; everything the demo made is gone again.")
	return nil
}
