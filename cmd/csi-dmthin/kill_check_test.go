//go:build vmtest

package main

import (
	"context"
	"errors"
	"os"
	"strings"
	"time"

	csipb "github.com/container-storage-interface/spec/lib/go/csi"
	"golang.org/x/sys/unix"

	"github.com/csi-dmthin/csi-dmthin/pkg/devmapper"
	"github.com/csi-dmthin/csi-dmthin/pkg/thinpool"
)

// What the SIGKILL test checks: after every restart, against the driver's
// answers and the kernel's mounts and devices; at the end, against the
// kernel's pools alone.

// check compares what s reports, and the mounts, with what answered OK. No
// call is in flight; an object an interrupted call was on (busy) may be
// either way until the retry.
func (r *killRun) check(s *killServer, when string) {
	t := r.t
	t.Helper()
	r.checks++
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	vresp, err := s.c.ListVolumes(ctx, &csipb.ListVolumesRequest{})
	if err != nil {
		t.Errorf("%s: ListVolumes: %v", when, err)
		return
	}
	sresp, err := s.c.ListSnapshots(ctx, &csipb.ListSnapshotsRequest{})
	if err != nil {
		t.Errorf("%s: ListSnapshots: %v", when, err)
		return
	}
	vols := map[string]*csipb.Volume{}
	for _, e := range vresp.GetEntries() {
		vols[e.GetVolume().GetVolumeId()] = e.GetVolume()
	}
	snaps := map[string]*csipb.Snapshot{}
	for _, e := range sresp.GetEntries() {
		snaps[e.GetSnapshot().GetSnapshotId()] = e.GetSnapshot()
	}
	mounts := mountinfo()

	r.m.mu.Lock()
	defer r.m.mu.Unlock()
	known := map[string]*kObj{}
	for _, o := range r.m.objs {
		known[o.id] = o
		if o.busy || o.state == creating {
			continue // an interrupted call's object, or a failed create's
		}
		if o.snap {
			got, ok := snaps[o.id]
			switch {
			case o.state == deleted && ok:
				t.Errorf("%s: snapshot %s is back after its delete answered OK", when, o.id)
			case o.state == live && !ok:
				t.Errorf("%s: snapshot %s, created with OK, is gone", when, o.id)
			case o.state == live && (got.GetSizeBytes() != o.size || got.GetSourceVolumeId() != o.source):
				t.Errorf("%s: snapshot %s is %d bytes of %s, want %d of %s", when, o.id, got.GetSizeBytes(), got.GetSourceVolumeId(), o.size, o.source)
			}
			continue
		}
		got, ok := vols[o.id]
		switch {
		case o.state == deleted && ok:
			t.Errorf("%s: volume %s is back after its delete answered OK", when, o.id)
		case o.state == live && !ok:
			t.Errorf("%s: volume %s, created with OK, is gone", when, o.id)
		case o.state == live && got.GetCapacityBytes() != o.size:
			t.Errorf("%s: volume %s has %d bytes, want %d", when, o.id, got.GetCapacityBytes(), o.size)
		}
		if o.state != live {
			continue
		}
		if g, err := s.c.ControllerGetVolume(ctx, &csipb.ControllerGetVolumeRequest{VolumeId: o.id}); err != nil || g.GetVolume().GetCapacityBytes() != o.size {
			t.Errorf("%s: ControllerGetVolume %s: %v bytes, %v; want %d", when, o.id, g.GetVolume().GetCapacityBytes(), err, o.size)
		}
		r.checkMount(when, o, mounts)
	}
	for id := range vols {
		if known[id] == nil {
			t.Errorf("%s: volume %s exists, but nothing asked for it", when, id)
		}
	}
	for id := range snaps {
		if known[id] == nil {
			t.Errorf("%s: snapshot %s exists, but nothing asked for it", when, id)
		}
	}
}

// checkMount: a staged volume is mounted from its own device and holds what
// was written; an unstaged one is neither mounted nor active.
func (r *killRun) checkMount(when string, o *kObj, mounts map[string]string) {
	t := r.t
	dev, mounted := mounts[o.staging]
	info, err := r.k.InfoByName("dmthin-" + o.pool + "-" + o.name)
	active := err == nil
	if err != nil && !errors.Is(err, unix.ENXIO) {
		t.Errorf("%s: dm info of %s: %v", when, o.id, err)
		return
	}
	if !o.staged {
		if mounted {
			t.Errorf("%s: volume %s is mounted at %s after its unstage answered OK", when, o.id, o.staging)
		}
		if active {
			t.Errorf("%s: volume %s is active (%s) but not staged", when, o.id, info.Name)
		}
		return
	}
	switch {
	case !mounted:
		t.Errorf("%s: staged volume %s is not mounted at %s", when, o.id, o.staging)
	case !active:
		t.Errorf("%s: staged volume %s has no dm device", when, o.id)
	case dev != info.Dev.String():
		t.Errorf("%s: %s has device %s mounted, but volume %s is %s", when, o.staging, dev, o.id, info.Dev)
	default:
		if b, err := os.ReadFile(markerFile(o)); err != nil || string(b) != o.id+"\n" {
			t.Errorf("%s: what was written in %s reads %q, %v", when, o.id, b, err)
		}
	}
}

// poolStatus reads a pool's status from the kernel, committing its
// metadata first, so the counts are the committed ones.
func (r *killRun) poolStatus(pool string) (devmapper.ThinPoolStatus, devmapper.Dev, error) {
	info, err := r.k.InfoByName("dmthin-" + pool)
	if err != nil {
		return devmapper.ThinPoolStatus{}, 0, err
	}
	st, err := r.k.Status(info.Dev, false)
	if err != nil {
		return devmapper.ThinPoolStatus{}, 0, err
	}
	if len(st) != 1 {
		return devmapper.ThinPoolStatus{}, 0, errors.New("the pool's table has more than one target")
	}
	ps, err := devmapper.ParseThinPoolStatus(st[0].Params)
	return ps, info.Dev, err
}

// recordEmpty notes the new, empty pools' use of space.
func (r *killRun) recordEmpty() {
	for _, p := range r.pools {
		ps, _, err := r.poolStatus(p)
		if err != nil {
			r.t.Fatalf("pool %s: %v", p, err)
		}
		r.empty[p] = ps
	}
}

// checkKernelEmpty, with the driver stopped: the templates, which the
// driver keeps on purpose, are deleted through the pool; then the kernel
// must show no thin device and the pools' space back at the empty level.
func (r *killRun) checkKernelEmpty() {
	t := r.t
	cfgs, _, err := loadConfig(r.config, r.stateDir)
	if err != nil {
		t.Fatal(err)
	}
	for _, name := range r.pools {
		p, err := thinpool.Open(context.Background(), cfgs[name], r.k)
		if err != nil {
			t.Fatalf("pool %s after the driver stopped: %v", name, err)
		}
		templates := 0
		for _, v := range p.List() {
			if v.Kind != thinpool.KindTemplate {
				t.Errorf("pool %s still records %s %s after everything was deleted", name, v.Kind, v.Name)
			}
			templates++
			if err := p.Delete(context.Background(), v.Name); err != nil {
				t.Errorf("pool %s: delete %s: %v", name, v.Name, err)
			}
		}
		if err := p.Close(); err != nil {
			t.Error(err)
		}
		t.Logf("pool %s: %d formatted templates deleted", name, templates)
	}

	list, err := r.k.List()
	if err != nil {
		t.Fatal(err)
	}
	r.m.mu.Lock()
	maxID := uint32(2*r.m.creates + 64) // a create takes one id; a filesystem volume's may start a template
	r.m.mu.Unlock()
	for _, name := range r.pools {
		for _, d := range list {
			if strings.HasPrefix(d.Name, "dmthin-"+name+"-") {
				t.Errorf("dm device %s left", d.Name)
			}
		}
		ps, dev, err := r.poolStatus(name)
		if err != nil {
			t.Errorf("pool %s: %v", name, err)
			continue
		}
		// A delete of an id no thin device has is ENODATA and changes
		// nothing; anything else is a thin device nobody deleted.
		leaked := 0
		for id := uint32(1); id <= maxID; id++ {
			if err := r.k.Message(dev, devmapper.Delete{DeviceID: id}); !errors.Is(err, unix.ENODATA) {
				t.Errorf("pool %s: thin id %d was left (delete said %v)", name, id, err)
				leaked++
			}
		}
		empty := r.empty[name]
		if ps.UsedDataBlocks != empty.UsedDataBlocks || ps.UsedMetadataBlocks != empty.UsedMetadataBlocks {
			// Before the probes deleted what was left, if anything was.
			t.Errorf("pool %s uses %d data and %d metadata blocks; empty, it used %d and %d", name,
				ps.UsedDataBlocks, ps.UsedMetadataBlocks, empty.UsedDataBlocks, empty.UsedMetadataBlocks)
		}
		t.Logf("pool %s: thin ids 1-%d probed, %d left; %d data and %d metadata blocks used (empty: %d, %d)", name, maxID, leaked,
			ps.UsedDataBlocks, ps.UsedMetadataBlocks, empty.UsedDataBlocks, empty.UsedMetadataBlocks)
	}
}
