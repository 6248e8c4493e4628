package blockcopy

import (
	"context"
	"errors"
	"net"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"
)

func newCheckpoints(t *testing.T) *CheckpointDir {
	t.Helper()
	cps, err := DirCheckpoints(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	return cps
}

// Only the mapped extents travel, the target's holes and its tail past
// the source stay zero, and a second call finds the copy done.
func TestCopySparseIntoLargerTarget(t *testing.T) {
	img := testImage()
	opener := newFakeOpener(map[string]*image{"src": img})
	m := NewMetrics("test")
	ts := startServer(t, opener, newFakeAuth(), func(o *ServerOptions) { o.Metrics = m })
	file := newFileTarget(t, img.size+3*mib)
	target := &hookTarget{Target: file}
	cps := newCheckpoints(t)
	req := baseRequest(ts, target, cps)
	req.Metrics = m
	var last Progress
	req.Progress = func(p Progress) { last = p }

	res, err := Copy(context.Background(), req)
	if err != nil {
		t.Fatal(err)
	}
	if res.Bytes != img.mapped() || res.Total != img.mapped() || res.Resumed != 0 {
		t.Errorf("Result = %+v, want Bytes = Total = %d, Resumed 0", res, img.mapped())
	}
	if got := target.written.Load(); got != img.mapped() {
		t.Errorf("target got %d bytes written, want the %d mapped", got, img.mapped())
	}
	// The server read every mapped byte twice: once to send, once for
	// the digest, and nothing of the holes.
	if got := opener.readBytes.Load(); got != 2*img.mapped() {
		t.Errorf("source read %d bytes, want %d", got, 2*img.mapped())
	}
	if last.DoneBytes != img.mapped() || last.TotalBytes != img.mapped() || last.MovedBytes != img.mapped() {
		t.Errorf("last progress = %+v", last)
	}
	checkTarget(t, file, img)
	if got := testutil.ToFloat64(m.sentBytes); got != float64(img.mapped()) {
		t.Errorf("sent bytes metric = %v", got)
	}
	if got := testutil.ToFloat64(m.receivedBytes); got != float64(img.mapped()) {
		t.Errorf("received bytes metric = %v", got)
	}
	if got := testutil.ToFloat64(m.finished.WithLabelValues(resultDone)); got != 1 {
		t.Errorf("done copies = %v", got)
	}
	if got := testutil.ToFloat64(m.inProgress.WithLabelValues(roleTarget)); got != 0 {
		t.Errorf("target copies in progress = %v after Copy", got)
	}
	if got := testutil.ToFloat64(m.inProgress.WithLabelValues(roleSource)); got != 1 {
		t.Errorf("source copies in progress = %v, want the one still open", got)
	}
	cp, ok, err := cps.Load("copy-1")
	if err != nil || !ok || !cp.Done || cp.SHA256 != res.Digest {
		t.Fatalf("checkpoint = %+v, %v, %v; want done with digest %s", cp, ok, err, res.Digest)
	}

	again, err := Copy(context.Background(), req)
	if err != nil {
		t.Fatal(err)
	}
	if again.Bytes != 0 || again.Digest != res.Digest {
		t.Errorf("second Copy = %+v, want nothing moved and the same digest", again)
	}
}

func TestCopyTargetTooSmall(t *testing.T) {
	img := testImage()
	ts := startServer(t, newFakeOpener(map[string]*image{"src": img}), newFakeAuth(), nil)
	target := &hookTarget{Target: newFileTarget(t, img.size-64*kib)}
	_, err := Copy(context.Background(), baseRequest(ts, target, nil))
	if !errors.Is(err, ErrTargetTooSmall) {
		t.Fatalf("Copy = %v, want ErrTargetTooSmall", err)
	}
	if target.written.Load() != 0 {
		t.Errorf("wrote %d bytes into a too small target", target.written.Load())
	}
}

// A cancelled Copy returns ctx's error and leaves a checkpoint; the next
// call resumes from it, moves only what is left and verifies.
func TestCopyResumeAfterCancel(t *testing.T) {
	img := testImage()
	ts := startServer(t, newFakeOpener(map[string]*image{"src": img}), newFakeAuth(), nil)
	file := newFileTarget(t, img.size)
	cps := newCheckpoints(t)
	m := NewMetrics("test")

	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	target := &hookTarget{Target: file, afterWrite: func(_ int64, _ int, total int64) {
		if total >= 1536*kib {
			cancel()
		}
	}}
	req := baseRequest(ts, target, cps)
	req.CheckpointEvery = 256 * kib
	req.Metrics = m
	if _, err := Copy(ctx, req); !errors.Is(err, context.Canceled) {
		t.Fatalf("cancelled Copy = %v, want context.Canceled", err)
	}
	if got := testutil.ToFloat64(m.finished.WithLabelValues(resultCancelled)); got != 1 {
		t.Errorf("cancelled copies = %v", got)
	}
	// Between frames: the copy stopped at the frame that cancelled it.
	if got := target.written.Load(); got > 1536*kib+maxFramePayload {
		t.Errorf("wrote %d bytes after the cancel", got)
	}
	cp, ok, err := cps.Load("copy-1")
	if err != nil || !ok || cp.Done || cp.Next <= 0 {
		t.Fatalf("checkpoint after cancel = %+v, %v, %v; want one part way", cp, ok, err)
	}

	req.Target = file
	res, err := Copy(context.Background(), req)
	if err != nil {
		t.Fatal(err)
	}
	left := mappedBytes(img.extents, cp.Next)
	if res.Resumed != cp.Next || res.Bytes != left || res.Bytes >= img.mapped() {
		t.Errorf("resumed Copy = %+v, want Resumed %d and Bytes %d", res, cp.Next, left)
	}
	checkTarget(t, file, img)
}

// A checkpoint of other extents (the source changed) is not resumed.
func TestCopyStaleCheckpointStartsOver(t *testing.T) {
	img := testImage()
	ts := startServer(t, newFakeOpener(map[string]*image{"src": img}), newFakeAuth(), nil)
	file := newFileTarget(t, img.size)
	cps := newCheckpoints(t)
	if err := cps.Save(Checkpoint{CopyID: "copy-1", SourceID: "src", ExtentsSHA256: "other", Next: 7 * mib}); err != nil {
		t.Fatal(err)
	}
	res, err := Copy(context.Background(), baseRequest(ts, file, cps))
	if err != nil {
		t.Fatal(err)
	}
	if res.Resumed != 0 || res.Bytes != img.mapped() {
		t.Errorf("Copy = %+v, want a full copy", res)
	}
	checkTarget(t, file, img)
}

// The server restarts (new Server, same cert dir, same Opener) while the
// copy runs: the client reconnects, the new server opens the source
// again, and the copy goes on from the last written offset.
//
// So that the first server cannot have sent everything into the socket
// buffers before it stops, its source blocks reads of the last extent
// until the restart has closed the stream.
func TestCopyResumeAfterServerRestart(t *testing.T) {
	img := testImage()
	opener := newFakeOpener(map[string]*image{"src": img})
	opener.gateAt, opener.gate = img.extents[3].Offset, make(chan struct{})
	auth := newFakeAuth()
	ts := startServer(t, opener, auth, nil)
	p := startProxy(t, ts.addr, 0)
	file := newFileTarget(t, img.size)

	restarted := false
	target := &hookTarget{Target: file, afterWrite: func(_ int64, _ int, total int64) {
		if restarted || total < 1536*kib {
			return
		}
		restarted = true
		shutdown := make(chan error)
		go func() {
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			shutdown <- ts.Shutdown(ctx)
		}()
		for stopping := false; !stopping; time.Sleep(time.Millisecond) {
			ts.mu.Lock()
			stopping = ts.stopping // set as the streams are closed
			ts.mu.Unlock()
		}
		close(opener.gate)
		if err := <-shutdown; err != nil {
			t.Errorf("Shutdown: %v", err)
		}
		cert, pin, err := LoadOrCreateCert(ts.certDir)
		if err != nil || pin != ts.pin {
			t.Errorf("LoadOrCreateCert after restart = %s, %v; want the pin %s", pin, err, ts.pin)
		}
		opts := ts.opts
		opts.Cert = cert
		_, addr := serve(t, opts)
		p.setBackend(addr)
	}}
	req := baseRequest(ts, target, newCheckpoints(t))
	req.Endpoint.Address = p.addr()
	res, err := Copy(context.Background(), req)
	if err != nil {
		t.Fatal(err)
	}
	if !restarted {
		t.Fatal("the server was never restarted")
	}
	if opens, _ := opener.counts("copy-1"); opens != 2 {
		t.Errorf("source opened %d times, want 2 (once per server)", opens)
	}
	if !opener.sources[0].closed.Load() {
		t.Error("Shutdown left the first server's source open")
	}
	if _, releases := opener.counts("copy-1"); releases != 0 {
		t.Errorf("Shutdown released the copy (%d times): a restart must keep it", releases)
	}
	if res.Bytes != img.mapped() || target.written.Load() != img.mapped() {
		t.Errorf("moved %d, wrote %d; want each mapped byte once (%d)", res.Bytes, target.written.Load(), img.mapped())
	}
	checkTarget(t, file, img)
}

// The connection breaks mid-frame with no checkpoint saved: the client
// reconnects from the last offset it wrote, not from 0.
func TestCopyReconnectsMidFrame(t *testing.T) {
	img := testImage()
	ts := startServer(t, newFakeOpener(map[string]*image{"src": img}), newFakeAuth(), nil)
	p := startProxy(t, ts.addr, 1500*kib+123)
	file := newFileTarget(t, img.size)
	target := &hookTarget{Target: file}
	cps := newCheckpoints(t)
	req := baseRequest(ts, target, cps)
	req.Endpoint.Address = p.addr()
	res, err := Copy(context.Background(), req)
	if err != nil {
		t.Fatal(err)
	}
	if p.connCount() < 2 {
		t.Errorf("%d connections, want a reconnect", p.connCount())
	}
	if res.Bytes != img.mapped() || target.written.Load() != img.mapped() {
		t.Errorf("moved %d, wrote %d; want each mapped byte once (%d)", res.Bytes, target.written.Load(), img.mapped())
	}
	checkTarget(t, file, img)
}

// A source read error ends the copy with ErrSource: not retried, not
// taken for the end of the data.
func TestCopySourceReadError(t *testing.T) {
	img := testImage()
	opener := newFakeOpener(map[string]*image{"src": img})
	opener.failAt = 6*mib + 100*kib
	ts := startServer(t, opener, newFakeAuth(), nil)
	file := newFileTarget(t, img.size)
	target := &hookTarget{Target: file}
	cps := newCheckpoints(t)
	m := NewMetrics("test")
	req := baseRequest(ts, target, cps)
	req.Metrics = m
	_, err := Copy(context.Background(), req)
	if !errors.Is(err, ErrSource) {
		t.Fatalf("Copy = %v, want ErrSource", err)
	}
	if got := target.written.Load(); got >= img.mapped() {
		t.Errorf("wrote %d of %d bytes", got, img.mapped())
	}
	if opens, _ := opener.counts("copy-1"); opens != 1 {
		t.Errorf("opened %d times; a source error is not retried", opens)
	}
	if cp, ok, _ := cps.Load("copy-1"); ok && cp.Done {
		t.Error("a failed copy is marked done")
	}
	if got := testutil.ToFloat64(m.finished.WithLabelValues(resultFailed)); got != 1 {
		t.Errorf("failed copies = %v", got)
	}
}

// corruptTarget flips one byte of the first write, after it was written.
type corruptTarget struct {
	Target
	done bool
}

func (c *corruptTarget) WriteAt(p []byte, off int64) (int, error) {
	n, err := c.Target.WriteAt(p, off)
	if !c.done && err == nil {
		c.done = true
		if _, err := c.Target.WriteAt([]byte{p[10] ^ 0xff}, off+10); err != nil {
			return n, err
		}
	}
	return n, err
}

func TestCopyVerifyCatchesCorruption(t *testing.T) {
	img := testImage()
	ts := startServer(t, newFakeOpener(map[string]*image{"src": img}), newFakeAuth(), nil)
	cps := newCheckpoints(t)
	m := NewMetrics("test")
	req := baseRequest(ts, &corruptTarget{Target: newFileTarget(t, img.size)}, cps)
	req.Metrics = m
	_, err := Copy(context.Background(), req)
	if !errors.Is(err, ErrVerify) {
		t.Fatalf("Copy = %v, want ErrVerify", err)
	}
	if _, ok, _ := cps.Load("copy-1"); ok {
		t.Error("the checkpoint of a copy that failed verification is kept")
	}
	if got := testutil.ToFloat64(m.finished.WithLabelValues(resultVerifyFailed)); got != 1 {
		t.Errorf("verify_failed copies = %v", got)
	}
}

// The server's and the client's limiters account for every mapped byte.
func TestRateLimitAccounting(t *testing.T) {
	img := testImage()
	ts := startServer(t, newFakeOpener(map[string]*image{"src": img}), newFakeAuth(), func(o *ServerOptions) {
		o.RateBytesPerSec = 1 << 40 // accounted, never waited for
	})
	req := baseRequest(ts, newFileTarget(t, img.size), nil)
	req.limiter = newLimiter(1<<40, nil)
	if _, err := Copy(context.Background(), req); err != nil {
		t.Fatal(err)
	}
	if got := ts.limiter.takenBytes(); got != img.mapped() {
		t.Errorf("server limiter took %d bytes, want %d", got, img.mapped())
	}
	if got := req.limiter.takenBytes(); got != img.mapped() {
		t.Errorf("client limiter took %d bytes, want %d", got, img.mapped())
	}
}

// A copy no request used for IdleRelease is released; a busy one is not;
// Release is idempotent.
func TestIdleReleaseAndRelease(t *testing.T) {
	img := testImage()
	opener := newFakeOpener(map[string]*image{"src": img})
	ts := startServer(t, opener, newFakeAuth(), func(o *ServerOptions) { o.IdleRelease = time.Hour })
	var clock atomic.Int64 // the fake time, in seconds
	ts.mu.Lock()
	ts.now = func() time.Time { return time.Unix(clock.Load(), 0) }
	ts.mu.Unlock()

	if _, err := Copy(context.Background(), baseRequest(ts, newFileTarget(t, img.size), nil)); err != nil {
		t.Fatal(err)
	}
	ts.waitUnused(t)
	ts.reapIdle()
	if _, releases := opener.counts("copy-1"); releases != 0 {
		t.Fatalf("released at once")
	}
	// Every request ended at fake time 0.
	clock.Store(59 * 60)
	ts.reapIdle()
	if _, releases := opener.counts("copy-1"); releases != 0 {
		t.Fatalf("released after 59 minutes idle of 60")
	}
	clock.Store(61 * 60)
	ts.reapIdle()
	if _, releases := opener.counts("copy-1"); releases != 1 {
		t.Fatalf("released %d times after 61 minutes idle, want 1", releases)
	}
	if !opener.sources[0].closed.Load() {
		t.Error("the idle source is not closed")
	}
	for i := range 2 {
		if err := Release(context.Background(), ts.endpoint(), goodToken, "copy-1"); err != nil {
			t.Fatalf("Release #%d: %v", i+1, err)
		}
	}
	if _, releases := opener.counts("copy-1"); releases != 3 {
		t.Errorf("Opener.Release called %d times, want 3", releases)
	}
}

// Release closes the open source and calls Opener.Release.
func TestReleaseClosesSource(t *testing.T) {
	img := testImage()
	opener := newFakeOpener(map[string]*image{"src": img})
	m := NewMetrics("test")
	ts := startServer(t, opener, newFakeAuth(), func(o *ServerOptions) { o.Metrics = m })
	if _, err := Copy(context.Background(), baseRequest(ts, newFileTarget(t, img.size), nil)); err != nil {
		t.Fatal(err)
	}
	ts.waitUnused(t)
	if err := Release(context.Background(), ts.endpoint(), goodToken, "copy-1"); err != nil {
		t.Fatal(err)
	}
	if _, releases := opener.counts("copy-1"); releases != 1 || !opener.sources[0].closed.Load() {
		t.Errorf("releases = %d, closed = %v", releases, opener.sources[0].closed.Load())
	}
	if got := testutil.ToFloat64(m.inProgress.WithLabelValues(roleSource)); got != 0 {
		t.Errorf("source copies in progress = %v after Release", got)
	}
}

func BenchmarkCopy(b *testing.B) {
	const size = 96 * mib
	var extents []Extent
	for off := int64(0); off < size; off += 3 * mib {
		extents = append(extents, Extent{Offset: off, Length: 2 * mib})
	}
	img := newImage(size, extents, 2)
	opener := newFakeOpener(map[string]*image{"src": img})
	cert, pin, err := LoadOrCreateCert(b.TempDir())
	if err != nil {
		b.Fatal(err)
	}
	s, err := NewServer(ServerOptions{Opener: opener, Auth: newFakeAuth(), Allowed: allowCopier, Cert: cert})
	if err != nil {
		b.Fatal(err)
	}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	go func() { _ = s.Serve(l) }()
	defer s.Shutdown(context.Background()) //nolint:errcheck
	ep := Endpoint{Address: l.Addr().String(), CertSHA256: pin}
	f, err := newBenchTarget(b.TempDir(), size)
	if err != nil {
		b.Fatal(err)
	}
	defer f.Close()
	b.SetBytes(img.mapped())
	for i := 0; b.Loop(); i++ {
		_, err := Copy(context.Background(), CopyRequest{
			Endpoint: ep, Token: tokenFunc(goodToken), CopyID: "bench-" + itoa(i), SourceID: "src", Target: f,
		})
		if err != nil {
			b.Fatal(err)
		}
	}
}

// syncTarget records whether anything was written since the last Sync.
type syncTarget struct {
	Target
	dirty bool
}

func (s *syncTarget) WriteAt(p []byte, off int64) (int, error) {
	s.dirty = true
	return s.Target.WriteAt(p, off)
}

func (s *syncTarget) Sync() error {
	s.dirty = false
	return s.Target.Sync()
}

// orderCheckpoints refuses to record a checkpoint over unsynced writes.
type orderCheckpoints struct {
	Checkpoints
	target  *syncTarget
	t       *testing.T
	saves   int
	lastCkp Checkpoint
}

func (o *orderCheckpoints) Save(cp Checkpoint) error {
	if o.target.dirty {
		o.t.Errorf("checkpoint at %d saved before the target was synced", cp.Next)
	}
	o.saves++
	o.lastCkp = cp
	return o.Checkpoints.Save(cp)
}

// Every checkpoint is saved after a Sync: it never claims data the target
// could lose.
func TestCheckpointOnlyAfterSync(t *testing.T) {
	img := testImage()
	ts := startServer(t, newFakeOpener(map[string]*image{"src": img}), newFakeAuth(), nil)
	target := &syncTarget{Target: newFileTarget(t, img.size)}
	cps := &orderCheckpoints{Checkpoints: newCheckpoints(t), target: target, t: t}
	req := baseRequest(ts, target, cps)
	req.CheckpointEvery = 200 * kib
	if _, err := Copy(context.Background(), req); err != nil {
		t.Fatal(err)
	}
	// 3.75 MiB in frames of at most 1 MiB within extents: a checkpoint
	// per frame (each is at least 64 KiB, most over 200 KiB), the final
	// one and the done one.
	if cps.saves < 6 || !cps.lastCkp.Done {
		t.Errorf("%d saves, the last %+v; want several and done", cps.saves, cps.lastCkp)
	}
}

// A copy ID open for one source refuses another; an unknown source is
// not retried.
func TestCopyConflictAndNotFound(t *testing.T) {
	img := testImage()
	opener := newFakeOpener(map[string]*image{"src": img, "src2": img})
	ts := startServer(t, opener, newFakeAuth(), nil)
	if _, err := Copy(context.Background(), baseRequest(ts, newFileTarget(t, img.size), nil)); err != nil {
		t.Fatal(err)
	}
	req := baseRequest(ts, newFileTarget(t, img.size), nil)
	req.SourceID = "src2"
	if _, err := Copy(context.Background(), req); !errors.Is(err, ErrConflict) {
		t.Errorf("Copy of copy-1 from another source = %v, want ErrConflict", err)
	}
	req.CopyID, req.SourceID = "copy-2", "nothing"
	if _, err := Copy(context.Background(), req); !errors.Is(err, ErrSourceNotFound) {
		t.Errorf("Copy of an unknown source = %v, want ErrSourceNotFound", err)
	}
	if opens, _ := opener.counts("copy-2"); opens != 1 {
		t.Errorf("an unknown source was opened %d times, want 1 (no retries)", opens)
	}
}

// A stream that brings nothing for StallTimeout is dropped and resumed:
// the source holds back its last extent until the client reconnects.
func TestCopyReconnectsStalledStream(t *testing.T) {
	img := testImage()
	opener := newFakeOpener(map[string]*image{"src": img})
	opener.gateAt, opener.gate = img.extents[3].Offset, make(chan struct{})
	ts := startServer(t, opener, newFakeAuth(), nil)
	p := startProxy(t, ts.addr, 0)
	var once sync.Once
	p.mu.Lock()
	p.onConn = func(n int) {
		if n > 0 {
			once.Do(func() { close(opener.gate) })
		}
	}
	p.mu.Unlock()
	file := newFileTarget(t, img.size)
	target := &hookTarget{Target: file}
	req := baseRequest(ts, target, nil)
	req.Endpoint.Address = p.addr()
	req.StallTimeout = 100 * time.Millisecond
	// Without stall detection Copy would wait on the gate for ever; this
	// bound turns that into a failure, it measures nothing.
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	res, err := Copy(ctx, req)
	if err != nil {
		t.Fatal(err)
	}
	if p.connCount() < 2 {
		t.Errorf("%d connections, want a reconnect", p.connCount())
	}
	if res.Bytes != img.mapped() || target.written.Load() != img.mapped() {
		t.Errorf("moved %d, wrote %d; want each mapped byte once (%d)", res.Bytes, target.written.Load(), img.mapped())
	}
	checkTarget(t, file, img)
}

func TestFrameBytesUnderRateLimit(t *testing.T) {
	for rate, want := range map[int64]int64{0: maxFramePayload, 1 << 30: maxFramePayload, 1 << 20: 256 * kib, 10000: 4 * kib, 100 << 10: 24 * kib} {
		s := &Server{opts: ServerOptions{RateBytesPerSec: rate}}
		if got := s.frameBytes(); got != want {
			t.Errorf("rate %d: frames of %d bytes, want %d", rate, got, want)
		}
	}
}
