package csi

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"net"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	csipb "github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc/codes"

	"github.com/csi-dmthin/csi-dmthin/pkg/blockcopy"
	"github.com/csi-dmthin/csi-dmthin/pkg/thinpool"
	"github.com/csi-dmthin/csi-dmthin/pkg/thinpool/thinpooltest"
)

// Copies between nodes on the host: two drivers, each on its own fake
// kernel, the source's snapshots served by a real blockcopy server on
// loopback, the target's restores made through CreateVolume.

const copySrcBytes = 64 << 20

// copyNode is one node: a driver over one pool on its own fake kernel.
type copyNode struct {
	t    *testing.T
	k    *thinpooltest.FakeKernel
	pool *thinpool.Pool
	opts Options
	d    *Driver
}

func newCopyNode(t *testing.T, node string, copy *CopyOptions) *copyNode {
	t.Helper()
	k := thinpooltest.NewFakeKernel()
	p, err := thinpool.Open(t.Context(), loopPoolConfig(t.TempDir(), testPool, testPoolBytes), k)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = p.Close() })
	n := &copyNode{t: t, k: k, pool: p, opts: Options{
		NodeID: node, Version: "test", Pools: map[string]Pool{testPool: p}, KubeletDir: t.TempDir(),
		FS: newFakeFS(k), Templates: -1, Copy: copy,
	}}
	n.start()
	return n
}

// start makes the node's driver (again, after a restart).
func (n *copyNode) start() {
	n.t.Helper()
	d, err := New(n.opts)
	if err != nil {
		n.t.Fatal(err)
	}
	d.openDev = func(path string, write bool) (deviceFile, error) {
		dev, size, err := n.k.BlockDevice(path)
		if err != nil {
			return nil, err
		}
		return &fakeDeviceFile{k: n.k, dev: dev, size: size}, nil
	}
	n.t.Cleanup(func() { d.Shutdown(context.Background()) })
	n.d = d
}

// fakeDeviceFile is a device of the fake kernel, opened.
type fakeDeviceFile struct {
	k    *thinpooltest.FakeKernel
	dev  thinpool.Dev
	size int64
}

func (f *fakeDeviceFile) ReadAt(p []byte, off int64) (int, error) {
	if err := f.k.ReadData(f.dev, off, p); err != nil {
		return 0, err
	}
	return len(p), nil
}

func (f *fakeDeviceFile) WriteAt(p []byte, off int64) (int, error) {
	if err := f.k.WriteData(f.dev, off, p); err != nil {
		return 0, err
	}
	return len(p), nil
}

func (f *fakeDeviceFile) Sync() error  { return nil }
func (f *fakeDeviceFile) Close() error { return nil }

// device reads or writes a volume of the node through its thin device.
func (n *copyNode) device(name string) *fakeDeviceFile {
	n.t.Helper()
	path, err := n.pool.Activate(n.t.Context(), name)
	if err != nil {
		n.t.Fatal(err)
	}
	dev, size, err := n.k.BlockDevice(path)
	if err != nil {
		n.t.Fatal(err)
	}
	return &fakeDeviceFile{k: n.k, dev: dev, size: size}
}

// tokenAuth takes two tokens: the driver's, and another account's.
type tokenAuth struct{}

func (tokenAuth) Authenticate(_ context.Context, token string) (string, error) {
	switch token {
	case "driver-token":
		return "system:serviceaccount:csi:driver", nil
	case "other-token":
		return "system:serviceaccount:default:other", nil
	}
	return "", errors.New("token not valid")
}

// serveCopies serves node's snapshots on loopback.
func serveCopies(t *testing.T, n *copyNode) blockcopy.Endpoint {
	t.Helper()
	return serveCopiesFrom(t, n.d)
}

// serveCopiesFrom serves d's snapshots and volumes on loopback.
func serveCopiesFrom(t *testing.T, d *Driver) blockcopy.Endpoint {
	t.Helper()
	_, ep := startCopyServer(t, d, t.TempDir())
	return ep
}

// startCopyServer serves d's copies on loopback with the certificate kept
// in certDir (the same on a restart), until the test's end or Shutdown.
func startCopyServer(t *testing.T, d *Driver, certDir string) (*blockcopy.Server, blockcopy.Endpoint) {
	t.Helper()
	cert, sum, err := blockcopy.LoadOrCreateCert(certDir)
	if err != nil {
		t.Fatal(err)
	}
	srv, err := blockcopy.NewServer(blockcopy.ServerOptions{
		Opener: d.CopySource(), Auth: tokenAuth{}, Cert: cert,
		Allowed: func(user string) bool { return user == "system:serviceaccount:csi:driver" },
	})
	if err != nil {
		t.Fatal(err)
	}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go func() { _ = srv.Serve(l) }()
	t.Cleanup(func() { _ = srv.Shutdown(context.Background()) })
	return srv, blockcopy.Endpoint{Address: l.Addr().String(), CertSHA256: sum}
}

type onePeer struct {
	node, pool string
	ep         blockcopy.Endpoint
}

func (p onePeer) Endpoint(_ context.Context, node, pool string) (blockcopy.Endpoint, error) {
	if node != p.node || pool != p.pool {
		return blockcopy.Endpoint{}, fmt.Errorf("no copy endpoint for node %s, pool %s", node, pool)
	}
	return p.ep, nil
}

// copyEvents records the copies' Events and answers whether a claim
// exists.
type copyEvents struct {
	recordingSink
	mu     sync.Mutex
	events []string   // "<reason>: <message>"
	gone   bool       // the claim does not want its copy
	asked  []ClaimRef // what ClaimWants was asked
	// onStart runs, under mu, when a copy starts.
	onStart func()
}

func (e *copyEvents) CopyEvent(ns, name string, warning bool, reason, msg string) {
	e.mu.Lock()
	defer e.mu.Unlock()
	e.events = append(e.events, reason+": "+msg)
	if reason == ReasonCopyStarted && e.onStart != nil {
		e.onStart()
	}
}

func (e *copyEvents) ClaimWants(_ context.Context, c ClaimRef) (bool, error) {
	e.mu.Lock()
	defer e.mu.Unlock()
	e.asked = append(e.asked, c)
	return !e.gone, nil
}

// CopySourceNode: the controller named node-a as the clones' source.
func (e *copyEvents) CopySourceNode(context.Context, string, string) (string, error) {
	return "node-a", nil
}

func (e *copyEvents) with(reason string) []string {
	e.mu.Lock()
	defer e.mu.Unlock()
	var out []string
	for _, ev := range e.events {
		if strings.HasPrefix(ev, reason+":") {
			out = append(out, ev)
		}
	}
	return out
}

var countsRE = regexp.MustCompile(`(\d+) bytes mapped, (\d+) moved by this run`)

// counts reads the mapped and moved bytes of the last CopyCompleted.
func (e *copyEvents) counts(t *testing.T) (mapped, moved int64) {
	t.Helper()
	done := e.with(ReasonCopyCompleted)
	if len(done) == 0 {
		t.Fatalf("no %s event", ReasonCopyCompleted)
	}
	m := countsRE.FindStringSubmatch(done[len(done)-1])
	if m == nil {
		t.Fatalf("no counts in %q", done[len(done)-1])
	}
	mapped, _ = strconv.ParseInt(m[1], 10, 64)
	moved, _ = strconv.ParseInt(m[2], 10, 64)
	return mapped, moved
}

// copyPair is a source node with a snapshot of written data and a target
// node that restores it.
type copyPair struct {
	src, dst *copyNode
	events   *copyEvents
	snapID   string
	want     []byte // the snapshot's bytes
	token    string
	tokenMu  sync.Mutex
	copyDir  string
}

// newCopyPair writes 3 MiB and a few small pieces to a 64 MiB volume on
// node-a and snapshots it; node-b copies with the driver's token.
func newCopyPair(t *testing.T, tweak func(*CopyOptions)) *copyPair {
	t.Helper()
	src := newCopyNode(t, "node-a", nil)
	cp := &copyPair{src: src, events: &copyEvents{}, token: "driver-token", copyDir: t.TempDir()}
	vol := "pvc-src"
	if _, err := src.d.CreateVolume(t.Context(), &csipb.CreateVolumeRequest{
		Name: vol, CapacityRange: &csipb.CapacityRange{RequiredBytes: copySrcBytes}, VolumeCapabilities: []*csipb.VolumeCapability{blockCap(rwo)},
	}); err != nil {
		t.Fatal(err)
	}
	cp.want = make([]byte, copySrcBytes)
	r := rand.New(rand.NewPCG(1, 2))
	for _, w := range []struct{ off, n int64 }{{0, 4096}, {1<<20 + 100, 10}, {40 << 20, 3 << 20}, {copySrcBytes - 512, 512}} {
		for i := w.off; i < w.off+w.n; i++ {
			cp.want[i] = byte(r.IntN(255) + 1)
		}
		if _, err := src.device(vol).WriteAt(cp.want[w.off:w.off+w.n], w.off); err != nil {
			t.Fatal(err)
		}
	}
	if err := src.pool.Deactivate(t.Context(), vol); err != nil {
		t.Fatal(err)
	}
	resp, err := src.d.CreateSnapshot(t.Context(), &csipb.CreateSnapshotRequest{Name: "snap-1", SourceVolumeId: testPool + "/" + vol})
	if err != nil {
		t.Fatal(err)
	}
	cp.snapID = resp.GetSnapshot().GetSnapshotId()
	if !strings.HasPrefix(cp.snapID, "node-a/") {
		t.Fatalf("snapshot ID %q does not name its node", cp.snapID)
	}
	// The origin changes after the snapshot: the copy must not see it.
	if _, err := src.device(vol).WriteAt(bytes.Repeat([]byte{0xee}, 8192), 0); err != nil {
		t.Fatal(err)
	}
	opts := &CopyOptions{
		Peers: onePeer{node: "node-a", pool: testPool, ep: serveCopies(t, src)},
		Token: func() (string, error) {
			cp.tokenMu.Lock()
			defer cp.tokenMu.Unlock()
			return cp.token, nil
		},
		Dir: cp.copyDir, Claims: cp.events, CheckpointBytes: 256 << 10,
	}
	if tweak != nil {
		tweak(opts)
	}
	cp.dst = newCopyNode(t, "node-b", opts)
	cp.dst.d.events = cp.events
	return cp
}

func (cp *copyPair) restoreReq(name string, size int64) *csipb.CreateVolumeRequest {
	return &csipb.CreateVolumeRequest{
		Name: name, CapacityRange: &csipb.CapacityRange{RequiredBytes: size},
		VolumeCapabilities:  []*csipb.VolumeCapability{blockCap(rwo)},
		Parameters:          map[string]string{ParamPVCName: "restored", ParamPVCNamespace: "db"},
		VolumeContentSource: &csipb.VolumeContentSource{Type: &csipb.VolumeContentSource_Snapshot{Snapshot: &csipb.VolumeContentSource_SnapshotSource{SnapshotId: cp.snapID}}},
	}
}

// createInBackground calls CreateVolume for a restore of the pair's
// snapshot on its own goroutine; the channel gets its answer.
func (cp *copyPair) createInBackground(t *testing.T, name string) <-chan error {
	errc := make(chan error, 1)
	go func() {
		_, err := cp.dst.d.CreateVolume(t.Context(), cp.restoreReq(name, copySrcBytes))
		errc <- err
	}()
	return errc
}

// waitCheckpoint waits for the first copy's checkpoint past its start;
// errc is its CreateVolume's answer, which must not come first.
func (cp *copyPair) waitCheckpoint(t *testing.T, errc <-chan error) {
	t.Helper()
	ckpts := filepath.Join(cp.copyDir, "checkpoints")
	for {
		if ents, _ := os.ReadDir(ckpts); len(ents) > 0 {
			b, _ := os.ReadFile(filepath.Join(ckpts, ents[0].Name()))
			if strings.Contains(string(b), `"next":`) && !strings.Contains(string(b), `"next":0`) {
				return
			}
		}
		select {
		case err := <-errc:
			t.Fatalf("CreateVolume returned before a checkpoint: %v", err)
		case <-time.After(20 * time.Millisecond):
		}
	}
}

// checkData reads the restored volume on the target: the snapshot's bytes,
// then zeros up to its size.
func (cp *copyPair) checkData(t *testing.T, name string, size int64) {
	t.Helper()
	got := make([]byte, size)
	if _, err := cp.dst.device(name).ReadAt(got, 0); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got[:copySrcBytes], cp.want) {
		t.Errorf("the restored volume's first %d bytes differ from the snapshot's", copySrcBytes)
	}
	if bytes.ContainsFunc(got[copySrcBytes:], func(r rune) bool { return r != 0 }) {
		t.Errorf("the restored volume has data past the snapshot's size")
	}
	if err := cp.dst.pool.Deactivate(t.Context(), name); err != nil {
		t.Fatal(err)
	}
}

// The restore of another node's snapshot is made here, bigger than its
// source, moving only the blocks the snapshot maps; the source's snapshot
// is left inactive; a repeated call finds it; DeleteVolume forgets it.
func TestRestoreCopiedFromAnotherNode(t *testing.T) {
	cp := newCopyPair(t, nil)
	resp, err := cp.dst.d.CreateVolume(t.Context(), cp.restoreReq("pvc-restored", 2*copySrcBytes))
	if err != nil {
		t.Fatal(err)
	}
	v := resp.GetVolume()
	if v.GetVolumeId() != testPool+"/pvc-restored" || v.GetCapacityBytes() != 2*copySrcBytes || v.GetContentSource().GetSnapshot().GetSnapshotId() != cp.snapID ||
		v.GetAccessibleTopology()[0].GetSegments()[TopologyKey] != "node-b" {
		t.Errorf("CreateVolume = %v", v)
	}
	cp.checkData(t, "pvc-restored", 2*copySrcBytes)
	exts, err := cp.src.pool.MappedExtents(t.Context(), "snap-1")
	if err != nil {
		t.Fatal(err)
	}
	var mappedWant int64
	for _, e := range exts {
		mappedWant += e.Length
	}
	mapped, moved := cp.events.counts(t)
	if mapped != mappedWant || moved != mapped || mapped > copySrcBytes/8 {
		t.Errorf("copy: %d bytes mapped, %d moved; the snapshot maps %d of its %d bytes", mapped, moved, mappedWant, copySrcBytes)
	}
	if snap, err := cp.src.pool.Get("snap-1"); err != nil || snap.Active {
		t.Errorf("the source's snapshot after the copy: %+v, %v; want it there and inactive", snap, err)
	}
	// A repeated call answers from what exists.
	again, err := cp.dst.d.CreateVolume(t.Context(), cp.restoreReq("pvc-restored", 2*copySrcBytes))
	if err != nil || again.GetVolume().GetVolumeId() != v.GetVolumeId() {
		t.Fatalf("repeated CreateVolume = %v, %v", again, err)
	}
	if n := len(cp.events.with(ReasonCopyStarted)); n != 1 {
		t.Errorf("%d copies started, want 1", n)
	}
	// The same name from another source is another volume.
	other := cp.restoreReq("pvc-restored", 2*copySrcBytes)
	other.VolumeContentSource.GetSnapshot().SnapshotId = "node-a/" + testPool + "/snap-2"
	_, err = cp.dst.d.CreateVolume(t.Context(), other)
	wantCode(t, err, codes.AlreadyExists)
	lv, err := cp.dst.d.ListVolumes(t.Context(), &csipb.ListVolumesRequest{})
	if err != nil || len(lv.GetEntries()) != 1 {
		t.Errorf("ListVolumes = %v, %v; want the restored volume", lv, err)
	}
	if _, err := cp.dst.d.DeleteVolume(t.Context(), &csipb.DeleteVolumeRequest{VolumeId: v.GetVolumeId()}); err != nil {
		t.Fatal(err)
	}
	if left, _ := filepath.Glob(filepath.Join(cp.copyDir, "*", "*")); len(left) != 0 {
		t.Errorf("copy records and checkpoints left after DeleteVolume: %v", left)
	}
}

// A token the source refuses fails the call (the provisioner retries),
// and the half-made volume is hidden from ListVolumes; with the right
// token the next call finishes it.
func TestCopyRefusedThenRetried(t *testing.T) {
	cp := newCopyPair(t, nil)
	cp.token = "other-token"
	_, err := cp.dst.d.CreateVolume(t.Context(), cp.restoreReq("pvc-restored", copySrcBytes))
	wantCode(t, err, codes.Unavailable)
	if !strings.Contains(err.Error(), "not allowed") && !strings.Contains(err.Error(), "refused") {
		t.Errorf("error %v does not say the token was refused", err)
	}
	if w := cp.events.with(ReasonCopyFailed); len(w) != 1 {
		t.Errorf("%s events: %q, want one", ReasonCopyFailed, w)
	}
	lv, err := cp.dst.d.ListVolumes(t.Context(), &csipb.ListVolumesRequest{})
	if err != nil || len(lv.GetEntries()) != 0 {
		t.Errorf("ListVolumes during an unfinished copy = %v, %v; want nothing", lv, err)
	}
	cp.tokenMu.Lock()
	cp.token = "driver-token"
	cp.tokenMu.Unlock()
	if _, err := cp.dst.d.CreateVolume(t.Context(), cp.restoreReq("pvc-restored", copySrcBytes)); err != nil {
		t.Fatal(err)
	}
	cp.checkData(t, "pvc-restored", copySrcBytes)
}

// A target driver stopped in the middle of a copy resumes it from its
// checkpoint once it is back and the provisioner calls again.
func TestCopyResumesAfterTargetRestart(t *testing.T) {
	cp := newCopyPair(t, func(o *CopyOptions) { o.RateBytesPerSec = 1 << 20 })
	errc := cp.createInBackground(t, "pvc-restored")
	// Wait for a checkpoint past the start, then stop the driver.
	cp.waitCheckpoint(t, errc)
	cp.dst.d.Shutdown(context.Background())
	wantCode(t, <-errc, codes.Unavailable)
	if lv, _ := cp.dst.d.ListVolumes(t.Context(), &csipb.ListVolumesRequest{}); len(lv.GetEntries()) != 0 {
		t.Errorf("ListVolumes lists the unfinished copy: %v", lv)
	}
	cp.dst.start()
	cp.dst.d.events = cp.events
	// What an operator sees (csi-dmthin copy list): the copy, not done,
	// not running, part of it durable.
	if st, err := cp.dst.d.Copies(); err != nil || len(st) != 1 || st[0].Done || st[0].Running || st[0].Next <= 0 ||
		st[0].Volume != testPool+"/pvc-restored" || st[0].Source != cp.snapID || st[0].SourceNode != "node-a" || st[0].Claim != "db/restored" {
		t.Errorf("Copies after the restart = %+v, %v", st, err)
	}
	if _, err := cp.dst.d.CreateVolume(t.Context(), cp.restoreReq("pvc-restored", copySrcBytes)); err != nil {
		t.Fatal(err)
	}
	if st, err := cp.dst.d.Copies(); err != nil || len(st) != 1 || !st[0].Done {
		t.Errorf("Copies after the copy = %+v, %v", st, err)
	}
	mapped, moved := cp.events.counts(t)
	if moved >= mapped || moved == 0 {
		t.Errorf("after the restart the copy moved %d of %d mapped bytes; want it to resume", moved, mapped)
	}
	cp.checkData(t, "pvc-restored", copySrcBytes)
}

// Without copies, or without a size, a restore of another node's snapshot
// is refused with what is missing.
func TestRemoteRestoreRefusals(t *testing.T) {
	cp := newCopyPair(t, nil)
	req := cp.restoreReq("pvc-restored", copySrcBytes)
	req.CapacityRange = nil
	_, err := cp.dst.d.CreateVolume(t.Context(), req)
	wantCode(t, err, codes.InvalidArgument)
	if !strings.Contains(err.Error(), "capacity_range.required_bytes") {
		t.Errorf("error %v does not name the field", err)
	}
	off := newCopyNode(t, "node-c", nil)
	_, err = off.d.CreateVolume(t.Context(), cp.restoreReq("pvc-restored", copySrcBytes))
	wantCode(t, err, codes.NotFound)
	if !strings.Contains(err.Error(), "copies between nodes are turned off") {
		t.Errorf("error %v does not say copies are off", err)
	}
}

// A clone of another node's volume reads a snapshot the source node makes
// for the copy (the volume changes meanwhile), hidden from ListSnapshots,
// deleted once the copy is done.
func TestCloneCopiedFromAnotherNode(t *testing.T) {
	cp := newCopyPair(t, nil)
	// What the volume holds now: the snapshot's bytes but the first
	// 8 KiB, which newCopyPair overwrote.
	want := bytes.Clone(cp.want)
	copy(want, bytes.Repeat([]byte{0xee}, 8192))
	cp.want = want
	req := cp.restoreReq("pvc-clone", copySrcBytes)
	req.VolumeContentSource = &csipb.VolumeContentSource{Type: &csipb.VolumeContentSource_Volume{Volume: &csipb.VolumeContentSource_VolumeSource{VolumeId: testPool + "/pvc-src"}}}
	resp, err := cp.dst.d.CreateVolume(t.Context(), req)
	if err != nil {
		t.Fatal(err)
	}
	if resp.GetVolume().GetContentSource().GetVolume().GetVolumeId() != testPool+"/pvc-src" {
		t.Errorf("CreateVolume = %v", resp.GetVolume())
	}
	cp.checkData(t, "pvc-clone", copySrcBytes)
	for _, v := range cp.src.pool.List() {
		if isCopySnapshotName(v.Name) {
			t.Errorf("the copy's snapshot %s is left on the source", v.Name)
		}
	}
	// While a copy holds its snapshot, ListSnapshots does not show it.
	src, err := cp.src.d.copySrc.Open(t.Context(), "copy-x", testPool+"/pvc-src")
	if err != nil {
		t.Fatal(err)
	}
	ls, err := cp.src.d.ListSnapshots(t.Context(), &csipb.ListSnapshotsRequest{})
	if err != nil || len(ls.GetEntries()) != 1 || ls.GetEntries()[0].GetSnapshot().GetSnapshotId() != cp.snapID {
		t.Errorf("ListSnapshots with a copy's snapshot = %v, %v; want only %s", ls, err, cp.snapID)
	}
	// A copy's snapshot that is old enough is reaped, but not while a
	// copy has it open.
	held := func() bool {
		_, err := cp.src.pool.Get(copySnapshotName("copy-x"))
		return err == nil
	}
	later := time.Now().Add(2 * copySnapshotTTL)
	if err := cp.src.d.copySrc.reap(t.Context(), later); err != nil || !held() {
		t.Errorf("reap with the copy open: %v, snapshot kept %v; want it kept", err, held())
	}
	if err := src.Close(); err != nil {
		t.Fatal(err)
	}
	if err := cp.src.d.copySrc.reap(t.Context(), time.Now().Add(-time.Minute)); err != nil || !held() {
		t.Errorf("reap of a young snapshot: %v, kept %v; want it kept", err, held())
	}
	if err := cp.src.d.copySrc.reap(t.Context(), later); err != nil || held() {
		t.Errorf("reap after the copy closed: %v, kept %v; want it deleted", err, held())
	}
}

// busy reports whether a copy job runs.
func (c *copier) busy() bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return len(c.jobs) > 0
}
