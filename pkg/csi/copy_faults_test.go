package csi

// Copies between nodes when things go wrong: most of these were found by
// a review asked to break the copy, and failed before their fixes.

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"path/filepath"
	"sync"
	"testing"
	"time"

	csipb "github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/csi-dmthin/csi-dmthin/pkg/blockcopy"
	"github.com/csi-dmthin/csi-dmthin/pkg/thinpool"
	"github.com/csi-dmthin/csi-dmthin/pkg/thinpool/thinpooltest"
)

// Found by a review: the external-provisioner keeps calling CreateVolume
// for a claim deleted while its provisioning was in progress, for as long
// as the answer is not final. A copy cancelled because its PVC went must
// answer a final code, and a call for a PVC that does not want the copy
// must copy nothing: before, every retry made the volume again and
// started a whole new copy.
func TestCopyForAGoneClaimIsNotStartedAgain(t *testing.T) {
	cp := newCopyPair(t, func(o *CopyOptions) {
		o.RateBytesPerSec = 1 << 20 // 3 MiB and more: seconds, against the claim asked every 10 ms
		o.ClaimCheckEvery = 10 * time.Millisecond
	})
	// The PVC goes once the copy has started.
	cp.events.onStart = func() { cp.events.gone = true }
	_, err := cp.dst.d.CreateVolume(t.Context(), cp.restoreReq("pvc-restored", copySrcBytes))
	wantCode(t, err, codes.FailedPrecondition)
	if n := len(cp.events.with(ReasonCopyStarted)); n != 1 {
		t.Fatalf("%d copies started, want 1", n)
	}
	if w := cp.events.with(ReasonCopyCancelled); len(w) != 1 {
		t.Errorf("%s events: %q, want one", ReasonCopyCancelled, w)
	}
	if _, err := cp.dst.pool.Get("pvc-restored"); !errors.Is(err, thinpool.ErrNotFound) {
		t.Errorf("the cancelled copy's volume: %v, want it deleted", err)
	}
	if left, _ := filepath.Glob(filepath.Join(cp.copyDir, "*", "*")); len(left) != 0 {
		t.Errorf("left after a cancelled copy: %v", left)
	}
	if snap, err := cp.src.pool.Get("snap-1"); err != nil || snap.Active {
		t.Errorf("the source's snapshot: %+v, %v; want it released", snap, err)
	}
	// The provisioner's retry: final again, and nothing copied or made.
	_, err = cp.dst.d.CreateVolume(t.Context(), cp.restoreReq("pvc-restored", copySrcBytes))
	wantCode(t, err, codes.FailedPrecondition)
	if n := len(cp.events.with(ReasonCopyStarted)); n != 1 {
		t.Errorf("%d copies started after the retry, want still 1", n)
	}
	if _, err := cp.dst.pool.Get("pvc-restored"); !errors.Is(err, thinpool.ErrNotFound) {
		t.Errorf("the retry made the volume again: %v", err)
	}
	// What the copy asked: its PVC (no UID in this volume's name), this
	// node, its PV.
	cp.events.mu.Lock()
	defer cp.events.mu.Unlock()
	if len(cp.events.asked) == 0 || cp.events.asked[0] != (ClaimRef{Namespace: "db", Name: "restored", Node: "node-b", Volume: "pvc-restored"}) {
		t.Errorf("ClaimWants asked %+v", cp.events.asked)
	}
}

// The PVC's UID is read from the volume's name only when it is a whole
// one: the provisioner can be told to cut it short.
func TestCopyClaimUID(t *testing.T) {
	for name, want := range map[string]string{
		"pvc-0f8fad5b-d9cb-469f-a165-70867728950e": "0f8fad5b-d9cb-469f-a165-70867728950e",
		"pvc-0f8fad5b": "",
		"restored":     "",
	} {
		r := copyRecord{Namespace: "db", Claim: "data", CSIName: name}
		if got := r.claim("node-b"); got.UID != want || got.Volume != name || got.Node != "node-b" {
			t.Errorf("claim of %q = %+v, want UID %q", name, got, want)
		}
	}
}

// Found by a review: a restore of another node's snapshot that does not exist (or
// was deleted before the copy opened it) answers Unavailable, which the
// provisioner retries for ever, and leaves a hidden volume and a copy
// record on the target. A local restore of a missing snapshot answers
// NotFound (final) and makes nothing.
func TestCopyOfAMissingSnapshot(t *testing.T) {
	cp := newCopyPair(t, nil)
	req := cp.restoreReq("pvc-restored", copySrcBytes)
	req.VolumeContentSource.GetSnapshot().SnapshotId = "node-a/" + testPool + "/snap-missing"
	_, err := cp.dst.d.CreateVolume(t.Context(), req)
	if c := status.Code(err); c != codes.NotFound {
		t.Errorf("restore of a missing remote snapshot = %v; want NotFound", err)
	}
	if _, err := cp.dst.pool.Get("pvc-restored"); !errors.Is(err, thinpool.ErrNotFound) {
		t.Errorf("a volume is left on the target for a snapshot that does not exist (err %v)", err)
	}
}

// Found by a review: a restore smaller than its remote source fails every time with
// Unavailable (ErrTargetTooSmall), retried for ever; locally the same
// restore grows to its source's size or answers OutOfRange.
func TestCopyRestoreSmallerThanItsSource(t *testing.T) {
	cp := newCopyPair(t, nil)
	_, err := cp.dst.d.CreateVolume(t.Context(), cp.restoreReq("pvc-small", copySrcBytes/2))
	if c := status.Code(err); c == codes.Unavailable || c == codes.Aborted || c == codes.DeadlineExceeded {
		t.Errorf("restore smaller than its remote source = %v: non-final, retried for ever", err)
	}
}

// two PVCs restore the same snapshot at once.
func TestCopyTwoRestoresOfOneSnapshot(t *testing.T) {
	cp := newCopyPair(t, func(o *CopyOptions) { o.RateBytesPerSec = 4 << 20 })
	var wg sync.WaitGroup
	errs := make([]error, 2)
	for i, name := range []string{"pvc-r1", "pvc-r2"} {
		wg.Add(1)
		go func() {
			defer wg.Done()
			_, errs[i] = cp.dst.d.CreateVolume(t.Context(), cp.restoreReq(name, copySrcBytes))
		}()
	}
	wg.Wait()
	for _, err := range errs {
		if err != nil {
			t.Fatal(err)
		}
	}
	cp.checkData(t, "pvc-r1", copySrcBytes)
	cp.checkData(t, "pvc-r2", copySrcBytes)
	if snap, err := cp.src.pool.Get("snap-1"); err != nil || snap.Active {
		t.Errorf("source snapshot after two copies: %+v %v", snap, err)
	}
}

// DeleteVolume during a copy.
func TestCopyDeleteVolumeDuringCopy(t *testing.T) {
	cp := newCopyPair(t, func(o *CopyOptions) { o.RateBytesPerSec = 1 << 20 })
	errc := cp.createInBackground(t, "pvc-restored")
	cp.waitCheckpoint(t, errc)
	if _, err := cp.dst.d.DeleteVolume(t.Context(), &csipb.DeleteVolumeRequest{VolumeId: testPool + "/pvc-restored"}); err != nil {
		t.Fatal(err)
	}
	t.Logf("CreateVolume during delete: %v", <-errc)
	if _, err := cp.dst.pool.Get("pvc-restored"); !errors.Is(err, thinpool.ErrNotFound) {
		t.Errorf("volume after delete: %v", err)
	}
	if left, _ := filepath.Glob(filepath.Join(cp.copyDir, "*", "*")); len(left) != 0 {
		t.Errorf("left: %v", left)
	}
	if w := cp.events.with(ReasonCopyFailed); len(w) != 0 {
		t.Errorf("a DeleteVolume'd copy reports a Warning %s: %q", ReasonCopyFailed, w)
	}
	time.Sleep(100 * time.Millisecond)
	_ = context.Background()
}

// Found by a review: the snapshot a copy of a volume reads is named after the copy ID
// only. A copy ID opened again for another source volume (the "record of
// an earlier copy under this name whose volume is gone" path in
// startOrJoin starts a new copy under the same copy ID, and nothing
// releases the old one on the source) is served the first volume's
// snapshot.
func TestCopySnapshotOfAnotherSourceIsNotServed(t *testing.T) {
	cp := newCopyPair(t, nil)
	s := cp.src.d.copySrc
	first, err := s.Open(t.Context(), "copy-x", testPool+"/pvc-src")
	if err != nil {
		t.Fatal(err)
	}
	if err := first.Close(); err != nil {
		t.Fatal(err)
	}
	if _, err := cp.src.d.CreateVolume(t.Context(), &csipb.CreateVolumeRequest{
		Name: "pvc-other", CapacityRange: &csipb.CapacityRange{RequiredBytes: copySrcBytes}, VolumeCapabilities: []*csipb.VolumeCapability{blockCap(rwo)},
	}); err != nil {
		t.Fatal(err)
	}
	want := bytes.Repeat([]byte{0x42}, 4096)
	if _, err := cp.src.device("pvc-other").WriteAt(want, 0); err != nil {
		t.Fatal(err)
	}
	if err := cp.src.pool.Deactivate(t.Context(), "pvc-other"); err != nil {
		t.Fatal(err)
	}
	second, err := s.Open(t.Context(), "copy-x", testPool+"/pvc-other")
	if err != nil {
		t.Fatal(err)
	}
	defer second.Close()
	got := make([]byte, 4096)
	if _, err := second.ReadAt(got, 0); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, want) {
		t.Errorf("Open(copy-x, pvc-other) serves other bytes than pvc-other's (first byte %#x, want %#x): the snapshot made for copy-x of pvc-src", got[0], want[0])
	}
}

// Found by a review: a copy whose CreateVolume the provisioner stops calling (the
// PVC's selected node moved away from this node, see the kube review
// test; or the provisioner restarted and forgot a claim deleted and made
// again under the same name, which ClaimExists cannot tell apart) runs on
// to the end in the background and marks itself done. The volume is then
// an ordinary volume no PV names: ListVolumes shows it, and once its PVC
// is gone ReapCopies leaves it, since it only reaps records not done.
func TestCopyAbandonedFinishedCopyIsReaped(t *testing.T) {
	cp := newCopyPair(t, func(o *CopyOptions) { o.RateBytesPerSec = 16 << 20; o.DoneGrace = time.Nanosecond })
	ctx, cancel := context.WithTimeout(t.Context(), 50*time.Millisecond)
	defer cancel()
	_, err := cp.dst.d.CreateVolume(ctx, cp.restoreReq("pvc-restored", copySrcBytes))
	wantCode(t, err, codes.DeadlineExceeded)
	// No call comes again. The job goes on, to its end.
	deadline := time.Now().Add(20 * time.Second)
	for cp.dst.d.copies.busy() && time.Now().Before(deadline) {
		time.Sleep(50 * time.Millisecond)
	}
	cp.events.mu.Lock()
	cp.events.gone = true
	cp.events.mu.Unlock()
	if err := cp.dst.d.ReapCopies(t.Context()); err != nil {
		t.Fatal(err)
	}
	if _, err := cp.dst.pool.Get("pvc-restored"); err == nil {
		lv, _ := cp.dst.d.ListVolumes(t.Context(), &csipb.ListVolumesRequest{})
		t.Errorf("the copy no call waited for finished, its PVC is gone, and its volume stays for ever (ListVolumes: %d entries)", len(lv.GetEntries()))
	}
}

// Found by a review: the target pool runs out of data space in the middle of a copy
// (CreateVolume admits the volume's virtual size; the copy then writes the
// mapped bytes). The answer is Unavailable, every retry, with the partial
// volume kept: never ResourceExhausted, so the provisioner never
// reschedules the PVC to a node with room.
func TestCopyTargetPoolWithoutRoom(t *testing.T) {
	cp := newCopyPair(t, nil)
	// A small target pool, mostly full.
	k := thinpooltest.NewFakeKernel()
	p, err := thinpool.Open(t.Context(), loopPoolConfig(t.TempDir(), testPool, 16<<20), k)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = p.Close() })
	n := &copyNode{t: t, k: k, pool: p, opts: cp.dst.opts}
	n.opts.Pools = map[string]Pool{testPool: p}
	n.opts.FS = newFakeFS(k)
	n.opts.KubeletDir = t.TempDir()
	n.opts.Copy.Dir = t.TempDir()
	n.start()
	n.d.events = cp.events
	if _, err := n.d.CreateVolume(t.Context(), &csipb.CreateVolumeRequest{
		Name: "filler", CapacityRange: &csipb.CapacityRange{RequiredBytes: 16 << 20}, VolumeCapabilities: []*csipb.VolumeCapability{blockCap(rwo)},
	}); err != nil {
		t.Fatal(err)
	}
	dev := n.device("filler")
	chunk := bytes.Repeat([]byte{1}, 1<<20)
	for off := int64(0); off < 13<<20; off += 1 << 20 {
		if _, err := dev.WriteAt(chunk, off); err != nil {
			t.Logf("filler full at %d MiB: %v", off>>20, err)
			break
		}
	}
	_ = p.Deactivate(t.Context(), "filler")
	for i := range 2 {
		_, err = n.d.CreateVolume(t.Context(), cp.restoreReq("pvc-restored", copySrcBytes))
		t.Logf("call %d: %v", i, err)
	}
	if c := status.Code(err); c.String() != "ResourceExhausted" {
		t.Errorf("restore into a pool that fills during the copy = %v; want ResourceExhausted (reschedule)", err)
	}
}

// CreateVolume racing the driver's Shutdown: copier.stop
// waits on the WaitGroup while startOrJoin may still Add to it, and a job
// started after stop runs untracked.
func TestCopyCreateDuringShutdown(t *testing.T) {
	cp := newCopyPair(t, func(o *CopyOptions) { o.RateBytesPerSec = 1 << 20 })
	var wg sync.WaitGroup
	for i := range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
			defer cancel()
			_, _ = cp.dst.d.CreateVolume(ctx, cp.restoreReq(fmt.Sprintf("pvc-r%d", i), copySrcBytes))
		}()
	}
	time.Sleep(time.Millisecond)
	cp.dst.d.Shutdown(context.Background())
	wg.Wait()
	cp.dst.d.copies.mu.Lock()
	n := len(cp.dst.d.copies.jobs)
	cp.dst.d.copies.mu.Unlock()
	if n != 0 {
		t.Errorf("%d copy jobs still running after Shutdown returned", n)
	}
}

// movablePeer is a source whose endpoint changes (its driver restarted on
// another address).
type movablePeer struct {
	mu sync.Mutex
	ep blockcopy.Endpoint
}

func (p *movablePeer) Endpoint(context.Context, string, string) (blockcopy.Endpoint, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.ep, nil
}

// A source driver that stops in the middle of a copy and comes back on
// another address: the copy finds it again and resumes, and the call that
// waits for it succeeds, with no failure reported.
func TestCopyRidesOutASourceRestart(t *testing.T) {
	peer := &movablePeer{}
	cp := newCopyPair(t, func(o *CopyOptions) {
		o.RateBytesPerSec = 1 << 20
		o.Peers = peer
		o.RetryWait = 50 * time.Millisecond
	})
	certDir := t.TempDir()
	start := func() *blockcopy.Server {
		srv, ep := startCopyServer(t, cp.src.d, certDir)
		peer.mu.Lock()
		peer.ep = ep
		peer.mu.Unlock()
		return srv
	}
	first := start()
	errc := cp.createInBackground(t, "pvc-restored")
	cp.waitCheckpoint(t, errc)
	if err := first.Shutdown(context.Background()); err != nil {
		t.Fatal(err)
	}
	start()
	if err := <-errc; err != nil {
		t.Fatalf("CreateVolume across the source's restart: %v", err)
	}
	if w := cp.events.with(ReasonCopyFailed); len(w) != 0 {
		t.Errorf("%s reported for a source that came back: %q", ReasonCopyFailed, w)
	}
	if mapped, moved := cp.events.counts(t); moved >= mapped {
		t.Errorf("the copy moved %d of %d bytes after the restart; want it to resume", moved, mapped)
	}
	cp.checkData(t, "pvc-restored", copySrcBytes)
}

// Found by a second review: a delivered copy (CreateVolume said OK) is the
// CO's; the reap must never remove it, even when its PVC is gone and no
// PV names it (a Retain volume being bound again by hand).
func TestCopyDeliveredIsNeverReaped(t *testing.T) {
	cp := newCopyPair(t, func(o *CopyOptions) { o.DoneGrace = time.Nanosecond })
	if _, err := cp.dst.d.CreateVolume(t.Context(), cp.restoreReq("pvc-restored", copySrcBytes)); err != nil {
		t.Fatal(err)
	}
	cp.events.mu.Lock()
	cp.events.gone = true
	cp.events.mu.Unlock()
	if err := cp.dst.d.ReapCopies(t.Context()); err != nil {
		t.Fatal(err)
	}
	if _, err := cp.dst.pool.Get("pvc-restored"); err != nil {
		t.Fatalf("the reap removed a delivered volume: %v", err)
	}
}

// Found by a second review: a copy's volume gone while its record and a
// done checkpoint stayed (a crash inside a discard) must be copied again
// into the new, empty volume, not answered OK from the old checkpoint.
func TestCopyIntoANewVolumeIgnoresOldCheckpoints(t *testing.T) {
	cp := newCopyPair(t, nil)
	if _, err := cp.dst.d.CreateVolume(t.Context(), cp.restoreReq("pvc-restored", copySrcBytes)); err != nil {
		t.Fatal(err)
	}
	// The volume goes; the record and the done checkpoint stay.
	if err := cp.dst.pool.Delete(t.Context(), "pvc-restored"); err != nil {
		t.Fatal(err)
	}
	if _, err := cp.dst.d.CreateVolume(t.Context(), cp.restoreReq("pvc-restored", copySrcBytes)); err != nil {
		t.Fatal(err)
	}
	if n := len(cp.events.with(ReasonCopyStarted)); n != 2 {
		t.Errorf("%d copies started, want 2: the new volume must be copied into", n)
	}
	cp.checkData(t, "pvc-restored", copySrcBytes)
}
