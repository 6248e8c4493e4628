package csi

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"time"

	csipb "github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"k8s.io/klog/v2"

	"github.com/csi-dmthin/csi-dmthin/pkg/blockcopy"
	"github.com/csi-dmthin/csi-dmthin/pkg/thinpool"
)

// A restore whose snapshot is on another node is made by copying: this
// node's pool gets an empty thin volume, and the snapshot's mapped blocks
// are streamed into it from the source node's driver (pkg/blockcopy). The
// copy runs in the background, so that it outlives the provisioner's call
// timeout: CreateVolume starts it or finds it running, waits for it as long
// as its call lasts, and answers OK only once the copy is complete,
// verified against the source's digest and on stable storage. Until then a
// retried call waits again (DeadlineExceeded, which the provisioner
// retries).
//
// What makes it survive a restart is a copy record, written (fsync'd)
// before the target volume is made and marked done only after the copy is
// verified: a volume with a record that is not done is a copy in progress,
// never a volume that exists for the CO. blockcopy's checkpoints say how
// far it got, so a restarted driver resumes from there when the provisioner
// calls again.

// CopyPeers finds where another node's driver serves copies of its pool.
type CopyPeers interface {
	Endpoint(ctx context.Context, node, pool string) (blockcopy.Endpoint, error)
}

// ClaimRef names the PVC a copy is for, as the provisioner gave it: its
// namespace and name (--extra-create-metadata), its UID (the volume's
// name, "pvc-<uid>"), this node, and the volume's CSI name (the PV's).
type ClaimRef struct {
	Namespace, Name, UID, Node, Volume string
}

// ClaimChecker answers whether a copy is still wanted: a copy for a PVC
// that is gone, was made again (another UID), is bound to another volume
// or now waits for another node is abandoned, cancelled and its target
// deleted.
type ClaimChecker interface {
	ClaimWants(ctx context.Context, c ClaimRef) (bool, error)
}

// CloneSourceFinder, when CopyOptions.Claims has it, says which node holds
// the source of a clone that the cluster's controller left to be copied
// (the PVC's annotation): a volume ID does not name its node.
type CloneSourceFinder interface {
	CopySourceNode(ctx context.Context, namespace, name string) (string, error)
}

// CopyEventSink, when the driver's EventSink has it, hears of a copy's
// start, progress and end, for Events on its PVC. Like EventSink's, its
// methods must not wait on the API server.
type CopyEventSink interface {
	CopyEvent(namespace, name string, warning bool, reason, message string)
}

// Reasons of the Events a copy puts on its PVC.
const (
	ReasonCopyStarted   = "CopyStarted"
	ReasonCopyProgress  = "CopyProgress"
	ReasonCopyCompleted = "CopyCompleted"
	ReasonCopyFailed    = "CopyFailed"
	ReasonCopyCancelled = "CopyCancelled"
)

// CopyOptions turn on restores from another node's snapshots.
type CopyOptions struct {
	Peers CopyPeers
	// Token returns the bearer token this node presents to the source.
	Token func() (string, error)
	// Dir holds the copy records and checkpoints (in the state directory,
	// not on a pool).
	Dir             string
	RateBytesPerSec int64
	Metrics         *blockcopy.Metrics
	// Claims, when set, cancels copies whose PVC is gone.
	Claims ClaimChecker
	// CheckpointBytes is how much is copied between checkpoints (default
	// 8 MiB): each syncs the target and writes the checkpoint.
	CheckpointBytes int64
	// ClaimCheckEvery is how often a running copy asks whether its PVC
	// still exists (default 10 s).
	ClaimCheckEvery time.Duration
	// Tries is how often a copy interrupted for want of its source is
	// tried, RetryWait apart, before the call fails (default 6, 10 s).
	Tries     int
	RetryWait time.Duration
	// DoneGrace is how long a finished copy's volume waits for its PV
	// before the reap may remove it as nobody's (default 10 min): between
	// CreateVolume's OK and the PV, the provisioner needs a moment.
	DoneGrace time.Duration
}

// copyRecord is the durable state of one copy on its target node.
type copyRecord struct {
	CopyID     string `json:"copyID"`
	Pool       string `json:"pool"`
	Name       string `json:"name"` // the target's device name
	SourceID   string `json:"sourceID"`
	SourceNode string `json:"sourceNode"`
	SourcePool string `json:"sourcePool"`
	SizeBytes  int64  `json:"sizeBytes"`
	Namespace  string `json:"namespace,omitempty"` // the PVC, when the provisioner named it
	Claim      string `json:"claim,omitempty"`
	CSIName    string `json:"csiName"` // CreateVolume's name: the PV's
	// ExtentsSHA256 is the hash of the source's extents the target's
	// writes are of, set (durably) before the first write: a copy of other
	// extents needs a fresh target.
	ExtentsSHA256 string    `json:"extentsSHA256,omitempty"`
	Done          bool      `json:"done,omitempty"`
	DoneAt        time.Time `json:"doneAt,omitempty"`
	// Delivered: CreateVolume answered OK with the volume, which is the
	// CO's from then on (DeleteVolume forgets the record); the reap never
	// touches it.
	Delivered bool      `json:"delivered,omitempty"`
	CreatedAt time.Time `json:"createdAt"`
}

// claim is the PVC the record's copy is for; "" Name for none.
func (r copyRecord) claim(node string) ClaimRef {
	// The provisioner names a volume pvc-<the PVC's UID>, unless told to
	// cut the UID short (--volume-name-uuid-length): only a whole one is
	// compared.
	uid, _ := strings.CutPrefix(r.CSIName, "pvc-")
	if uid == r.CSIName || len(uid) != 36 {
		uid = ""
	}
	return ClaimRef{Namespace: r.Namespace, Name: r.Claim, UID: uid, Node: node, Volume: r.CSIName}
}

// wanted asks whether the record's copy is still wanted; true when there
// is no PVC to ask about, or nobody to ask.
func (c *copier) wanted(ctx context.Context, rec copyRecord) (bool, error) {
	if c.o.Claims == nil || rec.Claim == "" || rec.Namespace == "" {
		return true, nil
	}
	return c.o.Claims.ClaimWants(ctx, rec.claim(c.d.nodeID))
}

// copier runs a node's copies.
type copier struct {
	o           CopyOptions
	d           *Driver
	checkpoints blockcopy.Checkpoints
	recDir      string

	ctx    context.Context // the driver's life
	cancel context.CancelFunc

	mu   sync.Mutex
	jobs map[string]*copyJob // by copy ID
	// unfinished holds pool/name of every volume whose copy record is not
	// done: they exist in the pool but not for the CO (ListVolumes).
	unfinished map[string]bool
	stopping   bool
	wg         sync.WaitGroup
}

type copyJob struct {
	rec    copyRecord
	cancel context.CancelCauseFunc
	done   chan struct{}
	err    error // set before done closes
}

// Causes of a copy's cancellation.
var (
	errClaimGone     = errors.New("its PVC was deleted, made again, bound elsewhere or moved to another node")
	errVolumeDeleted = errors.New("the volume is being deleted")
	// errFreshTarget: the target holds an earlier attempt's writes of
	// other extents; it is made again before this copy writes.
	errFreshTarget = errors.New("the target holds writes of other extents")
)

func newCopier(d *Driver, o CopyOptions) (*copier, error) {
	if o.Peers == nil || o.Token == nil || o.Dir == "" {
		return nil, errors.New("csi: copies need peers, a token and a directory")
	}
	if o.CheckpointBytes <= 0 {
		o.CheckpointBytes = 8 << 20
	}
	if o.ClaimCheckEvery <= 0 {
		o.ClaimCheckEvery = 10 * time.Second
	}
	if o.Tries <= 0 {
		o.Tries = 6
	}
	if o.RetryWait <= 0 {
		o.RetryWait = 10 * time.Second
	}
	if o.DoneGrace <= 0 {
		o.DoneGrace = 10 * time.Minute
	}
	c := &copier{o: o, d: d, recDir: filepath.Join(o.Dir, "records"), jobs: map[string]*copyJob{}, unfinished: map[string]bool{}}
	if err := os.MkdirAll(c.recDir, 0o700); err != nil {
		return nil, fmt.Errorf("csi: copy records: %w", err)
	}
	ents, err := os.ReadDir(c.recDir)
	if err != nil {
		return nil, fmt.Errorf("csi: copy records: %w", err)
	}
	for _, e := range ents {
		if copyID, ok := strings.CutSuffix(e.Name(), ".json"); ok {
			r, ok, err := c.loadRecord(copyID)
			if err != nil {
				// Left for an operator; the driver serves all else.
				klog.ErrorS(err, "Unreadable copy record; its copy is not resumed, and its volume, if any, is listed")
				continue
			}
			if ok && !r.Done {
				c.unfinished[objectID{pool: r.Pool, name: r.Name}.String()] = true
			}
		}
	}
	cp, err := blockcopy.DirCheckpoints(filepath.Join(o.Dir, "checkpoints"))
	if err != nil {
		return nil, fmt.Errorf("csi: copy checkpoints: %w", err)
	}
	c.checkpoints = cp
	c.ctx, c.cancel = context.WithCancel(context.Background())
	return c, nil
}

// copyID names the copy that makes volume name in pool on this node: the
// same for every retry, and different on every node.
func (d *Driver) copyID(pool, name string) string {
	sum := sha256.Sum256([]byte(d.nodeID + "/" + pool + "/" + name))
	return "c" + hex.EncodeToString(sum[:20])
}

func (c *copier) recPath(copyID string) string { return filepath.Join(c.recDir, copyID+".json") }

// loadRecord returns the copy record of copyID; ok is false for none.
func (c *copier) loadRecord(copyID string) (copyRecord, bool, error) {
	b, err := os.ReadFile(c.recPath(copyID))
	if errors.Is(err, os.ErrNotExist) {
		return copyRecord{}, false, nil
	}
	if err != nil {
		return copyRecord{}, false, err
	}
	var r copyRecord
	if err := json.Unmarshal(b, &r); err != nil {
		return copyRecord{}, false, fmt.Errorf("copy record %s: %w", c.recPath(copyID), err)
	}
	return r, true, nil
}

// saveRecord writes r durably: a temporary file, fsync, rename, fsync of
// the directory.
func (c *copier) saveRecord(r copyRecord) error {
	b, err := json.Marshal(r)
	if err != nil {
		return err
	}
	key := objectID{pool: r.Pool, name: r.Name}.String()
	if !r.Done {
		c.setUnfinished(key, true) // before: hidden while in doubt
	}
	if err := writeFileSync(c.recPath(r.CopyID), b); err != nil {
		return err
	}
	if r.Done {
		c.setUnfinished(key, false)
	}
	return nil
}

func (c *copier) deleteRecord(r copyRecord) error {
	if err := os.Remove(c.recPath(r.CopyID)); err != nil && !errors.Is(err, os.ErrNotExist) {
		return err
	}
	if err := syncDir(c.recDir); err != nil {
		return err
	}
	c.setUnfinished(objectID{pool: r.Pool, name: r.Name}.String(), false)
	return nil
}

func (c *copier) setUnfinished(key string, on bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if on {
		c.unfinished[key] = true
	} else {
		delete(c.unfinished, key)
	}
}

// pending reports whether volume name in pool is a copy not yet done.
func (c *copier) pending(pool, name string) bool {
	if c == nil {
		return false
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.unfinished[objectID{pool: pool, name: name}.String()]
}

func writeFileSync(path string, b []byte) error {
	tmp := path + ".tmp"
	f, err := os.OpenFile(tmp, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o600)
	if err != nil {
		return err
	}
	_, werr := f.Write(b)
	serr := f.Sync()
	cerr := f.Close()
	if err := errors.Join(werr, serr, cerr); err != nil {
		os.Remove(tmp)
		return err
	}
	if err := os.Rename(tmp, path); err != nil {
		return err
	}
	return syncDir(filepath.Dir(path))
}

func syncDir(dir string) error {
	f, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer f.Close()
	return f.Sync()
}

// createFromRemote makes volume name in pool as a copy of snapshot src on
// another node. The caller has checked the request's fields.
func (d *Driver) createFromRemote(ctx context.Context, req *csipb.CreateVolumeRequest, pool Pool, name string, params createParams, src objectID, contentSource *csipb.VolumeContentSource) (*csipb.CreateVolumeResponse, error) {
	field, sourceID := "volume_content_source.snapshot.snapshot_id", contentSource.GetSnapshot().GetSnapshotId()
	if contentSource.GetVolume() != nil {
		field, sourceID = "volume_content_source.volume.volume_id", contentSource.GetVolume().GetVolumeId()
	}
	c := d.copies
	if c == nil {
		return nil, notFound("%s %q is on node %s, not on this node %s, and copies between nodes are turned off", field, sourceID, src.node, d.nodeID)
	}
	if req.GetCapacityRange().GetRequiredBytes() == 0 {
		// The source's size is known only to its node; the provisioner
		// always sends the claim's request.
		return nil, invalid("capacity_range.required_bytes is required to restore %s from node %s", sourceID, src.node)
	}
	minBytes := int64(0)
	if usesFS(req.GetVolumeCapabilities(), params.fsType, "xfs") {
		minBytes = minXFSBytes
	}
	size, err := volumeSize(req.GetCapacityRange(), minBytes)
	if err != nil {
		return nil, err
	}
	id := objectID{pool: pool.Name(), name: name}
	unlock, err := d.locks.lock(id.String())
	if err != nil {
		return nil, err
	}
	job, resp, err := c.startOrJoin(ctx, req, pool, name, params, src, sourceID, size, contentSource)
	unlock()
	if err != nil {
		return nil, err
	}
	if resp != nil {
		return resp, nil
	}
	select {
	case <-job.done:
	case <-ctx.Done():
		return nil, status.Errorf(codes.DeadlineExceeded, "volume %q: the copy of %s from node %s is still running", req.GetName(), sourceID, src.node)
	}
	if job.err != nil {
		return nil, job.err
	}
	v, err := pool.Get(name)
	if err != nil {
		return nil, toStatus(err, "create volume %q", req.GetName())
	}
	if err := c.deliver(job.rec.CopyID); err != nil {
		return nil, status.Errorf(codes.Internal, "volume %q: %v", req.GetName(), err)
	}
	return &csipb.CreateVolumeResponse{Volume: d.volumeFor(pool, v, params.fsType, contentSource)}, nil
}

// deliver marks a finished copy's record delivered, durably, before
// CreateVolume answers OK with its volume.
func (c *copier) deliver(copyID string) error {
	rec, ok, err := c.loadRecord(copyID)
	if err != nil || !ok || rec.Delivered {
		return err
	}
	rec.Delivered = true
	return c.saveRecord(rec)
}

// cloneSourceNode returns the node the controller named on the clone's
// PVC as its source's holder: "" when there is none, or no PVC to ask.
func (c *copier) cloneSourceNode(ctx context.Context, req *csipb.CreateVolumeRequest) string {
	f, ok := c.o.Claims.(CloneSourceFinder)
	name, ns := req.GetParameters()[ParamPVCName], req.GetParameters()[ParamPVCNamespace]
	if !ok || name == "" || ns == "" {
		return ""
	}
	node, err := f.CopySourceNode(ctx, ns, name)
	if err != nil {
		klog.FromContext(ctx).V(2).Info("Reading the clone's source node from its PVC failed", "pvc", ns+"/"+name, "err", err)
		return ""
	}
	return node
}

// startOrJoin finds the copy for the volume or starts it; resp is set when
// the volume is already complete. The volume's lock is held.
func (c *copier) startOrJoin(ctx context.Context, req *csipb.CreateVolumeRequest, pool Pool, name string, params createParams, src objectID, sourceID string, size int64, cs *csipb.VolumeContentSource) (*copyJob, *csipb.CreateVolumeResponse, error) {
	d := c.d
	copyID := d.copyID(pool.Name(), name)
	c.mu.Lock()
	job := c.jobs[copyID]
	c.mu.Unlock()
	if job != nil {
		if job.rec.SourceID != sourceID || !fits(job.rec.SizeBytes, req.GetCapacityRange()) {
			return nil, nil, status.Errorf(codes.AlreadyExists, "volume %q is being copied from %s, %s", req.GetName(), job.rec.SourceID, fmtBytes(job.rec.SizeBytes))
		}
		return job, nil, nil
	}
	rec, haveRec, err := c.loadRecord(copyID)
	if err != nil {
		return nil, nil, status.Errorf(codes.Internal, "volume %q: %v", req.GetName(), err)
	}
	v, err := pool.Get(name)
	switch {
	case err == nil && !haveRec:
		return nil, nil, status.Errorf(codes.AlreadyExists, "volume %q exists and was not copied from %s", req.GetName(), sourceID)
	case err == nil && (rec.SourceID != sourceID || v.Kind != thinpool.KindVolume || !fits(v.SizeBytes, req.GetCapacityRange())):
		return nil, nil, status.Errorf(codes.AlreadyExists, "volume %q exists, copied from %s, %s", req.GetName(), rec.SourceID, fmtBytes(v.SizeBytes))
	case err == nil && rec.Done:
		if err := c.deliver(copyID); err != nil {
			return nil, nil, status.Errorf(codes.Internal, "volume %q: %v", req.GetName(), err)
		}
		return nil, &csipb.CreateVolumeResponse{Volume: d.volumeFor(pool, v, params.fsType, cs)}, nil
	case err != nil && !errors.Is(err, thinpool.ErrNotFound):
		return nil, nil, toStatus(err, "create volume %q", req.GetName())
	}
	if !haveRec || !rec.Done || err != nil {
		// A new copy, or a copy started again: only for a PVC that still
		// wants it here. The provisioner retries a claim deleted during
		// provisioning: copying again for it would loop.
		probe := copyRecord{Namespace: req.GetParameters()[ParamPVCNamespace], Claim: req.GetParameters()[ParamPVCName], CSIName: req.GetName()}
		if ok, err := c.wanted(ctx, probe); err == nil && !ok {
			if haveRec {
				if derr := c.discard(ctx, pool, rec); derr != nil {
					klog.FromContext(ctx).Error(derr, "Removing an abandoned copy")
				}
			}
			return nil, nil, status.Errorf(codes.FailedPrecondition, "volume %q: %v: nothing is copied for it", req.GetName(), errClaimGone)
		}
	}
	if err != nil { // not made yet
		if haveRec && rec.SourceID != sourceID {
			// A record of an earlier copy under this name whose volume is
			// gone: a cancelled copy's leftover.
			haveRec = false
		}
		if !haveRec {
			rec = copyRecord{
				CopyID: copyID, Pool: pool.Name(), Name: name, SourceID: sourceID,
				SourceNode: src.node, SourcePool: src.pool, SizeBytes: size,
				Namespace: req.GetParameters()[ParamPVCNamespace], Claim: req.GetParameters()[ParamPVCName],
				CSIName: req.GetName(), CreatedAt: time.Now().UTC(),
			}
		}
		// The volume is made here and now, empty: whatever an earlier
		// attempt left (a record done, a checkpoint, the extents its
		// writes were of, from a discard a crash interrupted) describes
		// another device. The record first: a crash after the volume is
		// made must find it a copy in progress, never a volume.
		rec.Done, rec.DoneAt, rec.Delivered, rec.ExtentsSHA256 = false, time.Time{}, false, ""
		if err := c.saveRecord(rec); err != nil {
			return nil, nil, status.Errorf(codes.Internal, "volume %q: copy record: %v", req.GetName(), err)
		}
		if err := c.checkpoints.Delete(copyID); err != nil {
			return nil, nil, status.Errorf(codes.Internal, "volume %q: copy checkpoint: %v", req.GetName(), err)
		}
		if _, err := pool.CreateVolume(ctx, name, rec.SizeBytes); err != nil {
			// Nothing was made: the record goes too. A crash before this
			// leaves one for the reap.
			if derr := errors.Join(c.checkpoints.Delete(copyID), c.deleteRecord(rec)); derr != nil {
				klog.FromContext(ctx).Error(derr, "Removing the record of a copy whose volume was not made")
			}
			return nil, nil, d.reportNoSpace(req, pool.Name(), toStatus(err, "create volume %q", req.GetName()))
		}
	}
	jctx, cancel := context.WithCancelCause(c.ctx)
	job = &copyJob{rec: rec, cancel: cancel, done: make(chan struct{})}
	c.mu.Lock()
	if c.stopping {
		c.mu.Unlock()
		cancel(nil)
		return nil, nil, status.Errorf(codes.Unavailable, "volume %q: the driver is stopping; the copy starts at the next call", req.GetName())
	}
	c.jobs[copyID] = job
	c.wg.Add(1)
	c.mu.Unlock()
	go func() {
		defer c.wg.Done()
		job.err = c.run(jctx, pool, job)
		cancel(nil)
		c.mu.Lock()
		delete(c.jobs, copyID)
		c.mu.Unlock()
		close(job.done)
	}()
	return job, nil, nil
}

// run copies one volume; its error is what CreateVolume returns.
func (c *copier) run(ctx context.Context, pool Pool, job *copyJob) error {
	rec := job.rec
	logger := klog.FromContext(c.ctx).WithValues("volume", objectID{pool: rec.Pool, name: rec.Name}, "source", rec.SourceID, "copy", rec.CopyID)
	ctx = klog.NewContext(ctx, logger)
	if rec.Claim != "" && c.o.Claims != nil {
		go c.watchClaim(ctx, job)
	}
	c.event(rec, false, ReasonCopyStarted, fmt.Sprintf("copying %s from node %s to node %s (only the blocks it maps)", rec.SourceID, rec.SourceNode, c.d.nodeID))
	err := c.copyOnce(ctx, pool, rec, logger)
	for try := 1; err != nil && try < c.o.Tries && interrupted(err); try++ {
		// The source went away (its driver restarting, with a new address
		// once it is back): look its endpoint up again and resume, rather
		// than fail the call and wait for the provisioner's next one.
		logger.Info("Copy interrupted; resuming", "try", try, "err", err)
		select {
		case <-ctx.Done():
		case <-time.After(c.o.RetryWait):
		}
		if ctx.Err() != nil {
			break
		}
		err = c.copyOnce(ctx, pool, rec, logger)
	}
	if err == nil {
		return nil
	}
	switch cause := context.Cause(ctx); {
	case errors.Is(cause, errClaimGone):
		logger.Info("The copy is not wanted any more; removing the partial volume", "why", cause)
		if cerr := c.discard(context.WithoutCancel(ctx), pool, rec); cerr != nil {
			logger.Error(cerr, "Removing a cancelled copy")
		}
		c.event(rec, false, ReasonCopyCancelled, fmt.Sprintf("the copy of %s from node %s was cancelled: %v", rec.SourceID, rec.SourceNode, errClaimGone))
		// Final: the provisioner stops retrying; there is nothing to make.
		return status.Errorf(codes.FailedPrecondition, "volume %q: the copy was cancelled: %v", rec.CSIName, errClaimGone)
	case errors.Is(cause, errVolumeDeleted):
		logger.Info("The volume was deleted during its copy")
		c.releaseSource(context.WithoutCancel(ctx), rec)
		return status.Errorf(codes.Aborted, "volume %q: %v during its copy", rec.CSIName, errVolumeDeleted)
	case c.ctx.Err() != nil:
		return status.Errorf(codes.Unavailable, "volume %q: the driver is stopping; the copy resumes at the next call", rec.CSIName)
	}
	// What no retry mends: nothing is kept, and the answer is final.
	var final codes.Code
	switch {
	case errors.Is(err, blockcopy.ErrSourceNotFound):
		final = codes.NotFound
	case errors.Is(err, blockcopy.ErrTargetTooSmall):
		final = codes.OutOfRange
	case errors.Is(err, thinpool.ErrNoSpace) || errors.Is(err, syscall.ENOSPC):
		// The provisioner clears the node and the scheduler picks again.
		final = codes.ResourceExhausted
	}
	if final != codes.OK {
		if cerr := c.discard(context.WithoutCancel(ctx), pool, rec); cerr != nil {
			logger.Error(cerr, "Removing a copy that cannot be made")
		}
		c.event(rec, true, ReasonCopyFailed, fmt.Sprintf("copying %s from node %s to node %s: %v (nothing kept)", rec.SourceID, rec.SourceNode, c.d.nodeID, err))
		return status.Errorf(final, "volume %q: copy of %s from node %s: %v", rec.CSIName, rec.SourceID, rec.SourceNode, err)
	}
	logger.Error(err, "Copy failed; it resumes at the next call")
	c.event(rec, true, ReasonCopyFailed, fmt.Sprintf("copying %s from node %s: %v (it resumes when the provisioner retries)", rec.SourceID, rec.SourceNode, err))
	code := codes.Unavailable
	if errors.Is(err, blockcopy.ErrVerify) {
		code = codes.Internal
	}
	return status.Errorf(code, "volume %q: copy of %s from node %s: %v", rec.CSIName, rec.SourceID, rec.SourceNode, err)
}

// interrupted reports whether a copy failed for want of its source (the
// connection, the server), which a later try may find again; not the
// target, the data, a refusal or what no try mends.
func interrupted(err error) bool {
	for _, final := range []error{
		blockcopy.ErrTarget, blockcopy.ErrVerify, blockcopy.ErrSourceNotFound, blockcopy.ErrTargetTooSmall,
		blockcopy.ErrRefused, blockcopy.ErrConflict, blockcopy.ErrProtocol, blockcopy.ErrInvalidID,
		thinpool.ErrNoSpace, syscall.ENOSPC, errFreshTarget, context.Canceled, context.DeadlineExceeded,
	} {
		if errors.Is(err, final) {
			return false
		}
	}
	return true
}

func (c *copier) copyOnce(ctx context.Context, pool Pool, rec copyRecord, logger klog.Logger) error {
	// The record on disk is the truth: an earlier try may have set what
	// the target holds.
	if r, ok, err := c.loadRecord(rec.CopyID); err == nil && ok {
		rec = r
	}
	ep, err := c.o.Peers.Endpoint(ctx, rec.SourceNode, rec.SourcePool)
	if err != nil {
		return fmt.Errorf("finding node %s's copy endpoint: %w", rec.SourceNode, err)
	}
	err = c.copyInto(ctx, pool, ep, &rec, logger)
	if errors.Is(err, errFreshTarget) {
		// The source's extents changed (a volume's snapshot made again):
		// the target is made again, empty, before this copy writes.
		logger.Info("The source's extents changed since the last attempt; making the target again")
		if err := pool.Delete(ctx, rec.Name); err != nil && !errors.Is(err, thinpool.ErrNotFound) {
			return fmt.Errorf("making the target again: %w", err)
		}
		if _, err := pool.CreateVolume(ctx, rec.Name, rec.SizeBytes); err != nil {
			return fmt.Errorf("making the target again: %w", err)
		}
		rec.ExtentsSHA256 = ""
		if err := c.saveRecord(rec); err != nil {
			return err
		}
		err = c.copyInto(ctx, pool, ep, &rec, logger)
	}
	return err
}

// copyInto runs one blockcopy.Copy into the target.
func (c *copier) copyInto(ctx context.Context, pool Pool, ep blockcopy.Endpoint, rec *copyRecord, logger klog.Logger) error {
	path, err := pool.Activate(ctx, rec.Name)
	if err != nil {
		return fmt.Errorf("activating the target: %w", err)
	}
	f, err := c.d.openDev(path, true)
	if err != nil {
		return errors.Join(fmt.Errorf("opening the target: %w", err), pool.Deactivate(context.WithoutCancel(ctx), rec.Name))
	}
	t := &copyTarget{deviceFile: f, size: rec.SizeBytes}
	lastEvent := time.Now()
	res, err := blockcopy.Copy(ctx, blockcopy.CopyRequest{
		Endpoint: ep, Token: c.o.Token, CopyID: rec.CopyID, SourceID: rec.SourceID,
		Target: t, Checkpoints: c.checkpoints, RateBytesPerSec: c.o.RateBytesPerSec,
		CheckpointEvery: c.o.CheckpointBytes, Metrics: c.o.Metrics,
		Opened: func(i blockcopy.OpenInfo) error {
			if !i.Resuming && rec.ExtentsSHA256 != "" && rec.ExtentsSHA256 != i.ExtentsSHA256 {
				return errFreshTarget
			}
			if !i.Resuming && rec.ExtentsSHA256 == "" {
				// A first write onto an empty target: the pool admitted
				// the volume's size, not these bytes written at once; with
				// overprovisioning they may not fit. (A target holding
				// part of these extents needs less; it is not asked.)
				if err := pool.AdmitData(i.MappedBytes); err != nil {
					return err
				}
			}
			if rec.ExtentsSHA256 != i.ExtentsSHA256 {
				rec.ExtentsSHA256 = i.ExtentsSHA256
				return c.saveRecord(*rec) // before the first write
			}
			return nil
		},
		Progress: func(p blockcopy.Progress) {
			if time.Since(lastEvent) < 30*time.Second {
				return
			}
			lastEvent = time.Now()
			c.event(*rec, false, ReasonCopyProgress, fmt.Sprintf("copied %s of the %s that %s maps", fmtBytes(p.DoneBytes), fmtBytes(p.TotalBytes), rec.SourceID))
		},
	})
	cerr := t.Close()
	// The target stays inactive until it is staged, like any new volume.
	derr := pool.Deactivate(context.WithoutCancel(ctx), rec.Name)
	if err != nil {
		return err
	}
	if err := errors.Join(cerr, derr); err != nil {
		return fmt.Errorf("closing the target: %w", err)
	}
	rec.Done, rec.DoneAt = true, time.Now().UTC()
	if err := c.saveRecord(*rec); err != nil {
		return fmt.Errorf("marking the copy done: %w", err)
	}
	logger.Info("Copied volume", "bytes", res.Bytes, "mapped", res.Total, "resumedAt", res.Resumed, "took", res.Duration)
	c.event(*rec, false, ReasonCopyCompleted, fmt.Sprintf("copied %s from node %s, verified: %d bytes mapped, %d moved by this run (which began at byte %d), in %s", rec.SourceID, rec.SourceNode, res.Total, res.Bytes, res.Resumed, res.Duration.Round(time.Millisecond)))
	// The source no longer needs to keep anything for this copy.
	c.releaseAt(ctx, ep, rec.CopyID)
	return nil
}

// releaseAt tells the source at ep that the copy is over; a failure is
// left to the source's idle release.
func (c *copier) releaseAt(ctx context.Context, ep blockcopy.Endpoint, copyID string) {
	tok, err := c.o.Token()
	if err == nil {
		err = blockcopy.Release(ctx, ep, tok, copyID)
	}
	if err != nil {
		klog.FromContext(ctx).V(2).Info("Releasing the copy on its source failed; the source releases it when idle", "copy", copyID, "err", err)
	}
}

// releaseSource is releaseAt for the record's source.
func (c *copier) releaseSource(ctx context.Context, rec copyRecord) {
	// Bounded: a source that is down releases idle copies itself, and the
	// callers (a cancelled copy, DeleteVolume) must not wait on it.
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	if ep, err := c.o.Peers.Endpoint(ctx, rec.SourceNode, rec.SourcePool); err == nil {
		c.releaseAt(ctx, ep, rec.CopyID)
	}
}

// discard removes a copy that will never finish: its checkpoint, volume
// and record, in that order, so that a crash on the way leaves a record
// that the next reap or call finds.
func (c *copier) discard(ctx context.Context, pool Pool, rec copyRecord) error {
	// The checkpoint before the volume: one must never outlive the device
	// it describes.
	if err := c.checkpoints.Delete(rec.CopyID); err != nil {
		return err
	}
	if err := pool.Delete(ctx, rec.Name); err != nil && !errors.Is(err, thinpool.ErrNotFound) {
		return err
	}
	c.releaseSource(ctx, rec)
	return c.deleteRecord(rec)
}

func (c *copier) watchClaim(ctx context.Context, job *copyJob) {
	t := time.NewTicker(c.o.ClaimCheckEvery)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		ok, err := c.wanted(ctx, job.rec)
		if err == nil && !ok {
			job.cancel(errClaimGone)
			return
		}
	}
}

func (c *copier) event(rec copyRecord, warning bool, reason, msg string) {
	if rec.Claim == "" {
		return
	}
	if s, ok := c.d.events.(CopyEventSink); ok {
		s.CopyEvent(rec.Namespace, rec.Claim, warning, reason, msg)
	}
}

// cancelJob stops the copy of volume name in pool, if one runs, and
// waits for it.
func (c *copier) cancelJob(pool, name string) {
	if c == nil {
		return
	}
	c.mu.Lock()
	job := c.jobs[c.d.copyID(pool, name)]
	c.mu.Unlock()
	if job != nil {
		job.cancel(errVolumeDeleted)
		<-job.done
	}
}

// forget drops the copy record of a deleted volume.
func (c *copier) forget(pool, name string) error {
	if c == nil {
		return nil
	}
	copyID := c.d.copyID(pool, name)
	c.cancelJob(pool, name)
	return errors.Join(c.checkpoints.Delete(copyID), c.deleteRecord(copyRecord{CopyID: copyID, Pool: pool, Name: name}))
}

// ReapCopies removes copies that never finished and whose PVC is gone
// (deleted while this driver was down, or while no call was running it).
func (d *Driver) ReapCopies(ctx context.Context) error {
	c := d.copies
	if c == nil {
		return nil
	}
	err := d.copySrc.reap(ctx, time.Now().Add(-copySnapshotTTL))
	if c.o.Claims == nil {
		return err
	}
	return errors.Join(err, c.reapTargets(ctx))
}

// reapTargets removes the copies on this node that nobody will use: one
// whose PVC no longer wants it (gone, made again, bound elsewhere, moved
// to another node), unfinished, or finished but never delivered by a
// CreateVolume OK (the provisioner gave up on it first). A delivered one is
// the CO's: only DeleteVolume removes it.
func (c *copier) reapTargets(ctx context.Context) error {
	d := c.d
	ents, err := os.ReadDir(c.recDir)
	if err != nil {
		return err
	}
	var errs []error
	for _, e := range ents {
		copyID, ok := strings.CutSuffix(e.Name(), ".json")
		if !ok {
			continue
		}
		rec, ok, err := c.loadRecord(copyID)
		if err != nil || !ok || rec.Claim == "" || rec.Delivered || (rec.Done && time.Since(rec.DoneAt) < c.o.DoneGrace) {
			errs = append(errs, err)
			continue
		}
		c.mu.Lock()
		running := c.jobs[copyID] != nil
		c.mu.Unlock()
		if running {
			continue
		}
		wanted, err := c.wanted(ctx, rec)
		if err != nil || wanted {
			errs = append(errs, err)
			continue
		}
		pool, err := d.pool(rec.Pool)
		if err != nil {
			continue // an unconfigured pool: left for when it is back
		}
		unlock, err := d.locks.lock(objectID{pool: rec.Pool, name: rec.Name}.String())
		if err != nil {
			continue // a call is on it
		}
		// Looked at again under the lock: a call may have started a copy,
		// or delivered it, since.
		c.mu.Lock()
		running = c.jobs[copyID] != nil
		c.mu.Unlock()
		if cur, ok, _ := c.loadRecord(copyID); running || !ok || cur.Delivered {
			unlock()
			continue
		}
		err = c.discard(ctx, pool, rec)
		unlock()
		if err == nil {
			klog.FromContext(ctx).Info("Removed a copy nobody will use", "volume", objectID{pool: rec.Pool, name: rec.Name}, "claim", rec.Namespace+"/"+rec.Claim, "done", rec.Done)
		}
		errs = append(errs, err)
	}
	return errors.Join(errs...)
}

// stop cancels the running copies (they resume at the next call after a
// restart) and waits for them.
func (c *copier) stop() {
	if c == nil {
		return
	}
	c.mu.Lock()
	c.stopping = true // no job starts after this
	c.mu.Unlock()
	c.cancel()
	c.wg.Wait()
}

// deviceFile is an open block device; tests of hosts without one give
// the Driver another openDev.
type deviceFile interface {
	io.ReaderAt
	io.WriterAt
	Sync() error
	Close() error
}

// openDeviceFile opens a device node, for writing if write.
func openDeviceFile(path string, write bool) (deviceFile, error) {
	flag := os.O_RDONLY
	if write {
		flag = os.O_RDWR
	}
	return os.OpenFile(path, flag, 0)
}

// copyTarget is the target device, opened for the copy.
type copyTarget struct {
	deviceFile
	size int64
}

func (t *copyTarget) Size() int64 { return t.size }

// CopyStatus is one copy made on this node, for operators (`csi-dmthin
// copy list`): what it copies, for which PVC, and how far it got.
type CopyStatus struct {
	CopyID     string    `json:"copyID"`
	Volume     string    `json:"volume"` // the target's volume ID
	Source     string    `json:"source"`
	SourceNode string    `json:"sourceNode"`
	Claim      string    `json:"claim,omitempty"` // namespace/name
	SizeBytes  int64     `json:"sizeBytes"`
	Done       bool      `json:"done"`
	Running    bool      `json:"running"`
	Next       int64     `json:"next"` // the byte offset durable on the target
	CreatedAt  time.Time `json:"createdAt"`
}

// Copies lists the copies this node made or is making (their records).
func (d *Driver) Copies() ([]CopyStatus, error) {
	c := d.copies
	if c == nil {
		return nil, nil
	}
	ents, err := os.ReadDir(c.recDir)
	if err != nil {
		return nil, err
	}
	var out []CopyStatus
	for _, e := range ents {
		copyID, ok := strings.CutSuffix(e.Name(), ".json")
		if !ok {
			continue
		}
		r, ok, err := c.loadRecord(copyID)
		if err != nil || !ok {
			continue // being replaced or removed
		}
		st := CopyStatus{
			CopyID: r.CopyID, Volume: objectID{pool: r.Pool, name: r.Name}.String(), Source: r.SourceID,
			SourceNode: r.SourceNode, SizeBytes: r.SizeBytes, Done: r.Done, CreatedAt: r.CreatedAt,
		}
		if r.Claim != "" {
			st.Claim = r.Namespace + "/" + r.Claim
		}
		if cp, ok, err := c.checkpoints.Load(copyID); err == nil && ok {
			st.Next = cp.Next
		}
		c.mu.Lock()
		st.Running = c.jobs[copyID] != nil
		c.mu.Unlock()
		out = append(out, st)
	}
	return out, nil
}
