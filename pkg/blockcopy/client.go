package blockcopy

import (
	"bufio"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"strconv"
	"sync/atomic"
	"time"

	"k8s.io/klog/v2"
)

// Target is where a copy goes on the target node: the caller's opened
// device, at least as large as the source. Copy writes only the source's
// mapped extents; the rest of the target is left as it is (zeros, on a
// new thin device).
type Target interface {
	io.WriterAt
	io.ReaderAt
	// Sync makes what WriteAt wrote durable.
	Sync() error
	Size() int64
}

// CopyRequest says what Copy copies and how.
type CopyRequest struct {
	Endpoint Endpoint
	// Token returns the bearer token; it is called for every request, so
	// a rotated token is picked up.
	Token    func() (string, error)
	CopyID   string
	SourceID string
	Target   Target
	// Checkpoints keep progress; nil keeps none (no resume).
	Checkpoints Checkpoints
	// RateBytesPerSec caps this copy's data; 0 is no cap.
	RateBytesPerSec int64
	// Progress, when set, is called after every data frame, from Copy's
	// goroutine.
	Progress func(Progress)
	// CheckpointEvery syncs the target and saves a checkpoint after
	// this many bytes; 0 checkpoints only when the stream ends.
	CheckpointEvery int64
	// StallTimeout is how long a data stream may bring nothing before
	// the client drops it and reconnects; 0 is 2 minutes.
	StallTimeout time.Duration
	// Opened, when set, is called once the source is open and before
	// anything is written: with the extents' hash and mapped bytes, and
	// whether the copy resumes from a checkpoint. An error ends the copy
	// before it writes. A caller whose target may hold an earlier
	// attempt's writes of other extents (which the digest, over the
	// extents only, would not see) makes a fresh target there.
	Opened func(OpenInfo) error
	// MaxRetries bounds the reconnects in a row that move no data; 0 is
	// 6. Each waits twice the one before, from 100ms up to 5s.
	MaxRetries int
	Metrics    *Metrics
	// Logger defaults to klog.FromContext(ctx).
	Logger klog.Logger

	limiter *limiter // a test hook; else from RateBytesPerSec
}

// OpenInfo is what a copy knows once its source is open.
type OpenInfo struct {
	ExtentsSHA256 string
	SizeBytes     int64
	MappedBytes   int64
	// Resuming: a checkpoint of these extents is used; the target holds
	// this copy's own writes.
	Resuming bool
}

// Progress is a copy's state after a data frame.
type Progress struct {
	CopyID string
	// MovedBytes is what this Copy call moved.
	MovedBytes int64
	// Next is the device offset the copy has written up to.
	Next int64
	// DoneBytes and TotalBytes are the mapped bytes before Next and in
	// the whole source.
	DoneBytes, TotalBytes int64
}

// Result is what a finished Copy did.
type Result struct {
	// Bytes is what this call moved; Total is every mapped byte.
	Bytes, Total int64
	// Resumed is the device offset this call resumed from (0 when it
	// started over).
	Resumed  int64
	Duration time.Duration
	// Digest is the verified SHA-256 (see DigestSHA256).
	Digest string
}

// Copy copies req.SourceID's mapped extents from req.Endpoint into
// req.Target, resuming from req.Checkpoints, and verifies the target
// against the source's digest. It returns ErrVerify, after dropping the
// checkpoint so that the next call starts over, when they differ; ctx's
// error when ctx ends (checked between frames). It does not release the
// source: the caller calls Release once it has recorded the copy.
func Copy(ctx context.Context, req CopyRequest) (res Result, err error) {
	start := time.Now()
	log := klog.FromContext(ctx)
	if req.Logger.GetSink() != nil {
		log = req.Logger
	}
	log = log.WithValues("copyID", req.CopyID, "sourceID", req.SourceID)
	if err := validateID("copyID", req.CopyID); err != nil {
		return Result{}, err
	}
	if err := validateSourceID(req.SourceID); err != nil {
		return Result{}, err
	}
	if req.Target == nil || req.Token == nil {
		return Result{}, errors.New("blockcopy: CopyRequest needs Target and Token")
	}
	req.Metrics.inProgressAdd(roleTarget, 1)
	defer func() {
		req.Metrics.inProgressAdd(roleTarget, -1)
		switch {
		case err == nil:
			req.Metrics.finish(resultDone)
		case errors.Is(err, ErrVerify):
			req.Metrics.finish(resultVerifyFailed)
		case errors.Is(err, context.Canceled) || errors.Is(err, context.DeadlineExceeded):
			req.Metrics.finish(resultCancelled)
		default:
			req.Metrics.finish(resultFailed)
		}
	}()
	c, err := newClient(req.Endpoint, req.Token)
	if err != nil {
		return Result{}, err
	}
	defer c.hc.CloseIdleConnections()
	r := &copyRun{req: req, c: c, log: log, limiter: req.limiter}
	if r.limiter == nil {
		r.limiter = newLimiter(req.RateBytesPerSec, nil)
	}
	if r.req.MaxRetries <= 0 {
		r.req.MaxRetries = 6
	}
	if r.req.StallTimeout <= 0 {
		r.req.StallTimeout = 2 * time.Minute
	}
	res, err = r.run(ctx)
	res.Duration = time.Since(start)
	return res, err
}

type copyRun struct {
	req     CopyRequest
	c       *client
	log     klog.Logger
	limiter *limiter

	info      openResponse
	total     int64 // mapped bytes
	pos       int64 // every mapped byte before pos is written
	durable   int64 // ... and synced and checkpointed
	moved     int64
	doneBytes int64 // mapped bytes before pos
	sinceSync int64
	ext       int // the first extent ending after pos
}

func (r *copyRun) run(ctx context.Context) (Result, error) {
	err := r.retry(ctx, "open", func() (bool, error) {
		return false, r.c.postJSON(ctx, r.copyPath("open"), openRequest{SourceID: r.req.SourceID}, &r.info)
	})
	if err != nil {
		return Result{}, err
	}
	if err := checkExtents(r.info.SizeBytes, r.info.Extents); err != nil {
		return Result{}, fmt.Errorf("%w: %w", ErrProtocol, err)
	}
	if got := ExtentsSHA256(r.info.SizeBytes, r.info.Extents); got != r.info.ExtentsSHA256 {
		return Result{}, fmt.Errorf("%w: extents hash to %s, the server says %s", ErrProtocol, got, r.info.ExtentsSHA256)
	}
	if size := r.req.Target.Size(); size < r.info.SizeBytes {
		return Result{}, fmt.Errorf("%w: target has %d bytes, source %s %d", ErrTargetTooSmall, size, r.req.SourceID, r.info.SizeBytes)
	}
	r.total = mappedBytes(r.info.Extents, 0)

	if cp, ok, err := r.load(); err != nil {
		return Result{}, err
	} else if ok && cp.Done {
		r.log.V(2).Info("Copy already done and verified")
		return Result{Total: r.total, Resumed: r.info.SizeBytes, Digest: cp.SHA256}, nil
	} else if ok {
		r.pos = min(max(cp.Next, 0), r.info.SizeBytes)
		r.durable = r.pos
		r.log.Info("Resuming copy from its checkpoint", "next", r.pos, "leftBytes", mappedBytes(r.info.Extents, r.pos))
	}
	resumed := r.pos
	r.doneBytes = r.total - mappedBytes(r.info.Extents, r.pos)
	if r.req.Opened != nil {
		if err := r.req.Opened(OpenInfo{ExtentsSHA256: r.info.ExtentsSHA256, SizeBytes: r.info.SizeBytes, MappedBytes: r.total, Resuming: resumed > 0}); err != nil {
			return Result{}, err
		}
	}

	if err := r.stream(ctx); err != nil {
		if r.pos > r.durable {
			// Keep what did arrive for the next call.
			if cerr := r.checkpoint(); cerr != nil {
				r.log.Error(cerr, "Checkpoint after a failed stream failed")
			}
		}
		return Result{}, err
	}
	r.pos = r.info.SizeBytes
	if err := r.checkpoint(); err != nil {
		return Result{}, err
	}

	var digest digestResponse
	err = r.retry(ctx, "digest", func() (bool, error) {
		return false, r.c.getJSON(ctx, r.copyPath("digest"), r.query(), &digest)
	})
	if err != nil {
		return Result{}, err
	}
	local, err := DigestSHA256(r.req.Target, r.info.Extents)
	if err != nil {
		return Result{}, fmt.Errorf("read the target back: %w", err)
	}
	if local != digest.SHA256 {
		if r.req.Checkpoints != nil {
			if err := r.req.Checkpoints.Delete(r.req.CopyID); err != nil {
				r.log.Error(err, "Dropping the checkpoint of a copy that failed verification failed")
			}
		}
		return Result{}, fmt.Errorf("%w: copy %s: target hashes to %s, source %s to %s", ErrVerify, r.req.CopyID, local, r.req.SourceID, digest.SHA256)
	}
	if r.req.Checkpoints != nil {
		cp := r.checkpointValue()
		cp.Done, cp.SHA256 = true, local
		if err := r.req.Checkpoints.Save(cp); err != nil {
			return Result{}, fmt.Errorf("save the done checkpoint: %w", err)
		}
	}
	r.log.V(2).Info("Copy done and verified", "movedBytes", r.moved, "totalBytes", r.total, "resumedFrom", resumed)
	return Result{Bytes: r.moved, Total: r.total, Resumed: resumed, Digest: local}, nil
}

// load returns the checkpoint to resume from: one of this copy, source
// and extents. Any other is stale (the source changed, or was released
// and opened again): it is dropped and the copy starts over.
func (r *copyRun) load() (Checkpoint, bool, error) {
	if r.req.Checkpoints == nil {
		return Checkpoint{}, false, nil
	}
	cp, ok, err := r.req.Checkpoints.Load(r.req.CopyID)
	if err != nil || !ok {
		return Checkpoint{}, false, err
	}
	if cp.SourceID == r.req.SourceID && cp.ExtentsSHA256 == r.info.ExtentsSHA256 {
		return cp, true, nil
	}
	r.log.Info("Starting the copy over: its checkpoint is of other extents", "checkpointSourceID", cp.SourceID, "checkpointExtents", cp.ExtentsSHA256, "extents", r.info.ExtentsSHA256)
	return Checkpoint{}, false, r.req.Checkpoints.Delete(r.req.CopyID)
}

func (r *copyRun) checkpointValue() Checkpoint {
	return Checkpoint{
		CopyID: r.req.CopyID, SourceID: r.req.SourceID, ExtentsSHA256: r.info.ExtentsSHA256,
		Next: r.pos, UpdatedAt: time.Now().UTC(),
	}
}

// checkpoint syncs the target, then saves pos: a checkpoint never
// claims data the target could still lose.
func (r *copyRun) checkpoint() error {
	if err := r.req.Target.Sync(); err != nil {
		return fmt.Errorf("%w: sync: %w", ErrTarget, err)
	}
	r.sinceSync = 0
	if r.req.Checkpoints == nil {
		r.durable = r.pos
		return nil
	}
	if err := r.req.Checkpoints.Save(r.checkpointValue()); err != nil {
		return fmt.Errorf("%w: save checkpoint: %w", ErrTarget, err)
	}
	r.durable = r.pos
	return nil
}

func (r *copyRun) copyPath(op string) string {
	return "/v1/copies/" + url.PathEscape(r.req.CopyID) + "/" + op
}

func (r *copyRun) query() url.Values {
	return url.Values{"sourceID": {r.req.SourceID}, "extentsSHA256": {r.info.ExtentsSHA256}}
}

// retry runs op until it succeeds, fails for good, or has failed
// MaxRetries times in a row without progress, waiting between attempts.
func (r *copyRun) retry(ctx context.Context, what string, op func() (progressed bool, err error)) error {
	failures := 0
	for {
		progressed, err := op()
		if err == nil {
			return nil
		}
		if ctx.Err() != nil {
			return ctx.Err()
		}
		if !retryable(err) {
			return err
		}
		if progressed {
			failures = 0
		}
		failures++
		if failures > r.req.MaxRetries {
			return fmt.Errorf("%s: giving up after %d attempts in a row: %w", what, failures, err)
		}
		wait := min(100*time.Millisecond<<(failures-1), 5*time.Second)
		r.log.Info("Copy request failed; retrying", "op", what, "attempt", failures, "wait", wait, "next", r.pos, "err", err)
		t := time.NewTimer(wait)
		select {
		case <-ctx.Done():
			t.Stop()
			return ctx.Err()
		case <-t.C:
		}
	}
}

// retryable says whether another attempt could succeed: a broken
// connection or a server error, but not a refusal, a conflict, a source
// read error, a target write error or a protocol violation.
func retryable(err error) bool {
	if errors.Is(err, ErrTarget) {
		return false // an errno of the target is a net.Error too
	}
	var se *statusError
	if errors.As(err, &se) {
		return se.retryable()
	}
	var ne net.Error
	var oe *net.OpError
	return errors.As(err, &ne) || errors.As(err, &oe) || errors.Is(err, errBroken) ||
		errors.Is(err, io.ErrUnexpectedEOF) || errors.Is(err, io.EOF)
}

// errBroken is a stream that ended before its end frame.
var errBroken = errors.New("data stream broken")

// stream moves the data, reconnecting from pos when the stream breaks.
func (r *copyRun) stream(ctx context.Context) error {
	buf := make([]byte, maxFramePayload)
	return r.retry(ctx, "data", func() (bool, error) {
		before := r.pos
		err := r.streamOnce(ctx, buf)
		if err != nil && ctx.Err() != nil {
			err = ctx.Err()
		}
		return r.pos > before, err
	})
}

// streamOnce reads one data stream, until its end frame or an error. A
// stream that brings no frame for StallTimeout (counted while waiting on
// the network, not while writing or syncing) is dropped as broken: a
// peer gone without a FIN or RST would otherwise hold the copy until
// TCP gives up, many minutes later.
func (r *copyRun) streamOnce(ctx context.Context, buf []byte) (err error) {
	sctx, cancel := context.WithCancel(ctx)
	defer cancel()
	var stalled atomic.Bool
	stall := time.AfterFunc(r.req.StallTimeout, func() { stalled.Store(true); cancel() })
	defer stall.Stop()
	defer func() {
		if err != nil && stalled.Load() && ctx.Err() == nil {
			err = fmt.Errorf("%w: nothing for %v after offset %d", errBroken, r.req.StallTimeout, r.pos)
		}
	}()

	q := r.query()
	q.Set("offset", strconv.FormatInt(r.pos, 10))
	resp, err := r.c.do(sctx, http.MethodGet, r.copyPath("data"), q, nil)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	br := bufio.NewReaderSize(resp.Body, 256<<10)
	var streamed int64
	var hdr [12]byte
	for {
		if err := ctx.Err(); err != nil {
			return err
		}
		stall.Reset(r.req.StallTimeout)
		kind, err := br.ReadByte()
		if err != nil {
			return fmt.Errorf("%w at offset %d: %w", errBroken, r.pos, err)
		}
		switch kind {
		case frameData:
			if _, err := io.ReadFull(br, hdr[:]); err != nil {
				return fmt.Errorf("%w in a frame header: %w", errBroken, err)
			}
			off := int64(binary.BigEndian.Uint64(hdr[:8]))
			n := int64(binary.BigEndian.Uint32(hdr[8:]))
			if err := r.checkFrame(off, n); err != nil {
				return err
			}
			if _, err := io.ReadFull(br, buf[:n]); err != nil {
				return fmt.Errorf("%w in a frame at offset %d: %w", errBroken, off, err)
			}
			stall.Stop() // what follows is this side's own work
			if err := r.limiter.wait(ctx, n); err != nil {
				return err
			}
			if _, err := r.req.Target.WriteAt(buf[:n], off); err != nil {
				return fmt.Errorf("%w: write %d bytes at offset %d: %w", ErrTarget, n, off, err)
			}
			r.pos = off + n
			r.moved += n
			r.doneBytes += n
			r.sinceSync += n
			streamed += n
			r.req.Metrics.addReceived(n)
			if r.req.CheckpointEvery > 0 && r.sinceSync >= r.req.CheckpointEvery {
				if err := r.checkpoint(); err != nil {
					return err
				}
			}
			if r.req.Progress != nil {
				r.req.Progress(Progress{
					CopyID: r.req.CopyID, MovedBytes: r.moved, Next: r.pos,
					DoneBytes: r.doneBytes, TotalBytes: r.total,
				})
			}
		case frameEnd:
			var b [8]byte
			if _, err := io.ReadFull(br, b[:]); err != nil {
				return fmt.Errorf("%w in the end frame: %w", errBroken, err)
			}
			if sent := int64(binary.BigEndian.Uint64(b[:])); sent != streamed {
				return fmt.Errorf("%w: the server counts %d bytes sent, %d arrived", ErrProtocol, sent, streamed)
			}
			if left := mappedBytes(r.info.Extents[r.ext:], r.pos); left != 0 {
				return fmt.Errorf("%w: the stream ended with %d mapped bytes after offset %d not sent", ErrProtocol, left, r.pos)
			}
			return nil
		case frameError:
			var b [4]byte
			if _, err := io.ReadFull(br, b[:]); err != nil {
				return fmt.Errorf("%w in an error frame: %w", errBroken, err)
			}
			msg := make([]byte, min(binary.BigEndian.Uint32(b[:]), maxErrorMessage))
			if _, err := io.ReadFull(br, msg); err != nil {
				return fmt.Errorf("%w in an error frame: %w", errBroken, err)
			}
			return fmt.Errorf("%w: %s", ErrSource, msg)
		default:
			return fmt.Errorf("%w: unknown frame kind %q", ErrProtocol, kind)
		}
	}
}

// checkFrame accepts a data frame only where the copy expects one: at or
// after pos, inside one extent.
func (r *copyRun) checkFrame(off, n int64) error {
	if n <= 0 || n > maxFramePayload || off < r.pos {
		return fmt.Errorf("%w: frame of %d bytes at offset %d, expected one of 1 to %d bytes at or after %d", ErrProtocol, n, off, maxFramePayload, r.pos)
	}
	exts := r.info.Extents
	for r.ext < len(exts) && exts[r.ext].Offset+exts[r.ext].Length <= off {
		r.ext++
	}
	if r.ext == len(exts) || off < exts[r.ext].Offset || off+n > exts[r.ext].Offset+exts[r.ext].Length {
		return fmt.Errorf("%w: frame of %d bytes at offset %d is not inside a mapped extent", ErrProtocol, n, off)
	}
	return nil
}
