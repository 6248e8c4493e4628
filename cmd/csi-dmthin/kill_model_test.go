//go:build vmtest

package main

import (
	"context"
	"fmt"
	"math/rand"
	"os"
	"path/filepath"
	"strings"
	"sync"

	csipb "github.com/container-storage-interface/spec/lib/go/csi"
	"golang.org/x/sys/unix"

	"github.com/csi-dmthin/csi-dmthin/pkg/csi"
)

// The SIGKILL test's model of what the driver has said: every object a call
// created or was asked to create, and the calls in flight. An object is
// busy while a call on it (or using it as a source) is in flight or was
// interrupted and waits for its retry, so no two calls touch one ID and
// every answer is the driver's to give, not a race's.

type objState int

const (
	creating objState = iota // the create call has not answered OK yet
	live                     // created, not deleted
	deleted                  // the delete answered OK
)

type kObj struct {
	name, id, pool string
	snap           bool
	fsType         string // volumes (and, for restores, snapshots)
	size           int64  // what the driver said
	source         string // a snapshot's source volume; a volume's content source, if any
	staging        string // volumes: where it is staged when staged
	staged         bool
	grownBytes     int64
	state          objState
	busy           bool
	history        []string // the calls on it and their outcomes, for a failure's report
}

// kOp is one call: call makes one attempt and, on OK, checks the answer and
// records it in the model.
type kOp struct {
	what string
	objs []*kObj
	call func(ctx context.Context, c killClient) error
}

type killClient struct {
	csipb.IdentityClient
	csipb.ControllerClient
	csipb.NodeClient
}

type model struct {
	kubeletDir string
	pools      []string

	mu      sync.Mutex
	rng     *rand.Rand
	objs    []*kObj
	next    int
	pending []*kOp
	// creates counts every create call made (retries too): each takes at
	// most one thin id, and a filesystem volume's may start a template.
	creates int
}

const (
	maxVolumesPerPool   = 8
	maxSnapshotsPerPool = 6
	expandStepBytes     = 8 << 20
	maxGrowBytes        = 32 << 20
)

var (
	ext4Sizes = []int64{16 << 20, 24 << 20, 32 << 20}
	xfsSizes  = []int64{300 << 20, 316 << 20} // mkfs.xfs makes nothing under 300 MiB
)

func mountCap(fsType string) *csipb.VolumeCapability {
	return &csipb.VolumeCapability{
		AccessType: &csipb.VolumeCapability_Mount{Mount: &csipb.VolumeCapability_MountVolume{FsType: fsType}},
		AccessMode: &csipb.VolumeCapability_AccessMode{Mode: csipb.VolumeCapability_AccessMode_SINGLE_NODE_WRITER},
	}
}

// count counts a pool's objects of a kind that exist or may.
func (m *model) count(pool string, snap bool) int {
	n := 0
	for _, o := range m.objs {
		if o.pool == pool && o.snap == snap && o.state != deleted {
			n++
		}
	}
	return n
}

// idle returns the live, idle objects for which ok holds.
func (m *model) idle(ok func(*kObj) bool) []*kObj {
	var out []*kObj
	for _, o := range m.objs {
		if o.state == live && !o.busy && ok(o) {
			out = append(out, o)
		}
	}
	return out
}

func (m *model) newObj(pool string, snap bool, fsType string) *kObj {
	m.next++
	prefix := "vol"
	if snap {
		prefix = "snap"
	}
	o := &kObj{name: fmt.Sprintf("%s-%d", prefix, m.next), pool: pool, snap: snap, fsType: fsType, state: creating}
	o.id = pool + "/" + o.name
	if snap {
		o.id = killNode + "/" + o.id // a snapshot ID carries its node
	}
	if !snap {
		o.staging = filepath.Join(m.kubeletDir, "plugins", "staging", o.name)
	}
	m.objs = append(m.objs, o)
	return o
}

// pick chooses a call the model allows now and marks what it uses busy;
// nil when there is none.
func (m *model) pick() *kOp {
	m.mu.Lock()
	defer m.mu.Unlock()
	r := m.rng
	pool := m.pools[r.Intn(len(m.pools))]
	inPool := func(o *kObj) bool { return o.pool == pool }
	vols := m.idle(func(o *kObj) bool { return inPool(o) && !o.snap })
	snaps := m.idle(func(o *kObj) bool { return inPool(o) && o.snap })
	roomVol := m.count(pool, false) < maxVolumesPerPool
	roomSnap := m.count(pool, true) < maxSnapshotsPerPool
	filter := func(in []*kObj, ok func(*kObj) bool) []*kObj {
		var out []*kObj
		for _, o := range in {
			if ok(o) {
				out = append(out, o)
			}
		}
		return out
	}
	staged := filter(vols, func(o *kObj) bool { return o.staged })
	unstaged := filter(vols, func(o *kObj) bool { return !o.staged })
	growable := filter(staged, func(o *kObj) bool { return o.grownBytes < maxGrowBytes })
	any := func(l []*kObj) *kObj { return l[r.Intn(len(l))] }

	type choice struct {
		weight int
		op     func() *kOp
	}
	var choices []choice
	add := func(weight int, ok bool, op func() *kOp) {
		if ok {
			choices = append(choices, choice{weight, op})
		}
	}
	add(3, roomVol, func() *kOp {
		fsType, sizes := "ext4", ext4Sizes
		if r.Intn(3) == 0 {
			fsType, sizes = "xfs", xfsSizes
		}
		return m.createVolume(pool, fsType, sizes[r.Intn(len(sizes))], nil)
	})
	add(2, roomSnap && len(vols) > 0, func() *kOp { return m.createSnapshot(pool, any(vols)) })
	add(2, roomVol && len(snaps) > 0, func() *kOp {
		s := any(snaps)
		return m.createVolume(pool, s.fsType, s.size+int64(r.Intn(2))*expandStepBytes, s)
	})
	add(1, roomVol && len(vols) > 0, func() *kOp {
		v := any(vols)
		return m.createVolume(pool, v.fsType, v.size+int64(r.Intn(2))*expandStepBytes, v)
	})
	add(3, len(unstaged) > 0, func() *kOp { return m.stage(any(unstaged)) })
	add(2, len(growable) > 0, func() *kOp { return m.expand(any(growable)) })
	add(2, len(staged) > 0, func() *kOp { return m.unstage(any(staged)) })
	add(2, len(unstaged) > 0 && !roomVol || len(unstaged) > 3, func() *kOp { return m.deleteObj(any(unstaged)) })
	add(2, len(snaps) > 0, func() *kOp { return m.deleteObj(any(snaps)) })
	total := 0
	for _, c := range choices {
		total += c.weight
	}
	if total == 0 {
		return nil
	}
	n := r.Intn(total)
	for _, c := range choices {
		if n < c.weight {
			op := c.op()
			for _, o := range op.objs {
				o.busy = true
			}
			return op
		}
		n -= c.weight
	}
	panic("unreachable")
}

// note adds a call's outcome to the history of the objects it was on.
func (m *model) note(op *kOp, start int, outcome string) {
	m.mu.Lock()
	defer m.mu.Unlock()
	for _, o := range op.objs {
		o.history = append(o.history, fmt.Sprintf("start %d: %s: %s", start, op.what, outcome))
	}
}

// history returns the calls on the objects of op.
func (m *model) history(op *kOp) string {
	m.mu.Lock()
	defer m.mu.Unlock()
	var b strings.Builder
	for _, o := range op.objs {
		fmt.Fprintf(&b, "\n\tcalls on %s:", o.id)
		for _, h := range o.history {
			b.WriteString("\n\t\t" + h)
		}
	}
	return b.String()
}

// done records that op answered (OK, or not to be retried).
func (m *model) done(op *kOp) {
	m.mu.Lock()
	defer m.mu.Unlock()
	for _, o := range op.objs {
		o.busy = false
	}
}

// interrupted records that op's answer was lost with the server.
func (m *model) interrupted(op *kOp) {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.pending = append(m.pending, op)
}

// takePending returns the interrupted calls, oldest first, for their retry.
func (m *model) takePending() []*kOp {
	m.mu.Lock()
	defer m.mu.Unlock()
	p := m.pending
	m.pending = nil
	return p
}

func (m *model) createVolume(pool, fsType string, size int64, src *kObj) *kOp {
	o := m.newObj(pool, false, fsType)
	req := &csipb.CreateVolumeRequest{
		Name: o.name, Parameters: map[string]string{csi.ParamPool: pool},
		CapacityRange:      &csipb.CapacityRange{RequiredBytes: size},
		VolumeCapabilities: []*csipb.VolumeCapability{mountCap(fsType)},
	}
	what, objs := "CreateVolume "+o.id, []*kObj{o}
	if src != nil {
		o.source = src.id
		objs = append(objs, src)
		if src.snap {
			what += " from snapshot " + src.id
			req.VolumeContentSource = &csipb.VolumeContentSource{Type: &csipb.VolumeContentSource_Snapshot{Snapshot: &csipb.VolumeContentSource_SnapshotSource{SnapshotId: src.id}}}
		} else {
			what += " from volume " + src.id
			req.VolumeContentSource = &csipb.VolumeContentSource{Type: &csipb.VolumeContentSource_Volume{Volume: &csipb.VolumeContentSource_VolumeSource{VolumeId: src.id}}}
		}
	}
	return &kOp{what: what, objs: objs, call: func(ctx context.Context, c killClient) error {
		m.mu.Lock()
		m.creates++
		m.mu.Unlock()
		resp, err := c.CreateVolume(ctx, req)
		if err != nil {
			return err
		}
		if v := resp.GetVolume(); v.GetVolumeId() != o.id || v.GetCapacityBytes() != size {
			return fmt.Errorf("answered volume %s of %d bytes, want %s of %d", v.GetVolumeId(), v.GetCapacityBytes(), o.id, size)
		}
		m.mu.Lock()
		o.size, o.state = size, live
		m.mu.Unlock()
		return nil
	}}
}

func (m *model) createSnapshot(pool string, src *kObj) *kOp {
	o := m.newObj(pool, true, src.fsType)
	o.source = src.id
	req := &csipb.CreateSnapshotRequest{Name: o.name, SourceVolumeId: src.id}
	size := src.size // src is busy: it cannot grow meanwhile
	return &kOp{what: "CreateSnapshot " + o.id + " of " + src.id, objs: []*kObj{o, src}, call: func(ctx context.Context, c killClient) error {
		m.mu.Lock()
		m.creates++
		m.mu.Unlock()
		resp, err := c.CreateSnapshot(ctx, req)
		if err != nil {
			return err
		}
		if s := resp.GetSnapshot(); s.GetSnapshotId() != o.id || s.GetSizeBytes() != size || s.GetSourceVolumeId() != src.id || !s.GetReadyToUse() {
			return fmt.Errorf("answered %v, want snapshot %s of %s, %d bytes, ready", s, o.id, src.id, size)
		}
		m.mu.Lock()
		o.size, o.state = size, live
		m.mu.Unlock()
		return nil
	}}
}

// markerFile is what the test writes in a staged volume, and reads back
// after every restart.
func markerFile(o *kObj) string { return filepath.Join(o.staging, "marker") }

func (m *model) stage(o *kObj) *kOp {
	req := &csipb.NodeStageVolumeRequest{
		VolumeId: o.id, StagingTargetPath: o.staging, VolumeCapability: mountCap(o.fsType),
		VolumeContext: map[string]string{csi.ParamPool: o.pool, csi.ParamFSType: o.fsType},
	}
	return &kOp{what: "NodeStageVolume " + o.id + " (" + o.fsType + ")", objs: []*kObj{o}, call: func(ctx context.Context, c killClient) error {
		if _, err := c.NodeStageVolume(ctx, req); err != nil {
			return err
		}
		if err := writeSynced(markerFile(o), []byte(o.id+"\n")); err != nil {
			return fmt.Errorf("write to the staged volume: %w", err)
		}
		m.mu.Lock()
		o.staged = true
		m.mu.Unlock()
		return nil
	}}
}

func (m *model) expand(o *kObj) *kOp {
	want := o.size + expandStepBytes
	req := &csipb.NodeExpandVolumeRequest{
		VolumeId: o.id, VolumePath: o.staging, VolumeCapability: mountCap(o.fsType),
		CapacityRange: &csipb.CapacityRange{RequiredBytes: want},
	}
	before, err := fsBytes(o.staging)
	return &kOp{what: fmt.Sprintf("NodeExpandVolume %s (%s) to %d bytes", o.id, o.fsType, want), objs: []*kObj{o}, call: func(ctx context.Context, c killClient) error {
		if err != nil {
			return fmt.Errorf("statfs before: %w", err)
		}
		resp, err := c.NodeExpandVolume(ctx, req)
		if err != nil {
			return err
		}
		if resp.GetCapacityBytes() != want {
			return fmt.Errorf("answered %d bytes, want %d", resp.GetCapacityBytes(), want)
		}
		after, err := fsBytes(o.staging)
		if err != nil {
			return fmt.Errorf("statfs after: %w", err)
		}
		// ext4 takes any growth; XFS adds no allocation group under
		// 16 MiB, so its size may stay.
		if after < before || (o.fsType == "ext4" && after == before) {
			return fmt.Errorf("the filesystem has %d bytes after the expansion, %d before", after, before)
		}
		m.mu.Lock()
		o.size = want
		o.grownBytes += expandStepBytes
		m.mu.Unlock()
		return nil
	}}
}

func (m *model) unstage(o *kObj) *kOp {
	req := &csipb.NodeUnstageVolumeRequest{VolumeId: o.id, StagingTargetPath: o.staging}
	return &kOp{what: "NodeUnstageVolume " + o.id, objs: []*kObj{o}, call: func(ctx context.Context, c killClient) error {
		if _, err := c.NodeUnstageVolume(ctx, req); err != nil {
			return err
		}
		m.mu.Lock()
		o.staged = false
		m.mu.Unlock()
		return nil
	}}
}

func (m *model) deleteObj(o *kObj) *kOp {
	return &kOp{what: "Delete " + o.id, objs: []*kObj{o}, call: func(ctx context.Context, c killClient) error {
		var err error
		if o.snap {
			_, err = c.DeleteSnapshot(ctx, &csipb.DeleteSnapshotRequest{SnapshotId: o.id})
		} else {
			_, err = c.DeleteVolume(ctx, &csipb.DeleteVolumeRequest{VolumeId: o.id})
		}
		if err != nil {
			return err
		}
		m.mu.Lock()
		o.state = deleted
		m.mu.Unlock()
		return nil
	}}
}

func writeSynced(path string, b []byte) error {
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o600)
	if err != nil {
		return err
	}
	if _, err := f.Write(b); err != nil {
		f.Close()
		return err
	}
	if err := f.Sync(); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}

// fsBytes is the size of the filesystem mounted at path.
func fsBytes(path string) (int64, error) {
	var st unix.Statfs_t
	if err := unix.Statfs(path, &st); err != nil {
		return 0, err
	}
	return int64(st.Blocks) * st.Bsize, nil
}
