package thinpool

import (
	"context"
	"errors"
	"fmt"
	"regexp"
	"slices"
	"sort"
	"time"

	"golang.org/x/sys/unix"

	"github.com/csi-dmthin/csi-dmthin/pkg/devmapper"
)

var volNameRE = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9_.-]{0,79}$`)

func checkName(name string) error {
	if !volNameRE.MatchString(name) {
		return fmt.Errorf("%w: volume name %q: want 1 to 80 of [A-Za-z0-9_.-], not starting with a punctuation mark", ErrInvalid, name)
	}
	return nil
}

// roundSize rounds a size up to whole 4 KiB pages, so that filesystems and
// block I/O see whole pages.
func roundSize(b int64) int64 { return (b + 4095) &^ 4095 }

// maxVolumeBytes keeps sector counts far from overflow.
const maxVolumeBytes = 1 << 60

// CreateVolume makes a new, empty thin volume of at least sizeBytes. Making
// a volume that exists with the same size returns it (idempotent); with
// another size or kind it is ErrAlreadyExists.
func (p *Pool) CreateVolume(ctx context.Context, name string, sizeBytes int64) (*Volume, error) {
	return p.newDevice(ctx, name, "", sizeBytes, KindVolume)
}

// Snapshot makes a snapshot of source. An active source is suspended for the
// moment of the snapshot, which flushes it and freezes its filesystem, so
// the snapshot is consistent with a clean unmount.
func (p *Pool) Snapshot(ctx context.Context, name, source string) (*Volume, error) {
	return p.newDevice(ctx, name, source, 0, KindSnapshot)
}

// Clone makes a new volume with source's content (a volume or a snapshot),
// of sizeBytes, which may not be smaller than the source; 0 means the
// source's size.
func (p *Pool) Clone(ctx context.Context, name, source string, sizeBytes int64) (*Volume, error) {
	if source == "" {
		return nil, fmt.Errorf("%w: clone %s: empty source", ErrInvalid, name)
	}
	return p.newDevice(ctx, name, source, sizeBytes, KindVolume)
}

// CreateTemplate makes a new, empty template device of sizeBytes: the
// caller activates it, writes its content, deactivates it and seals it with
// SealTemplate; until then it cannot be cloned, and Open deletes it. The
// overprovisioning limit counts it like a volume, and it must fit in the
// free data above the floor (see admit).
func (p *Pool) CreateTemplate(ctx context.Context, name string, sizeBytes int64) (*Volume, error) {
	return p.newDevice(ctx, name, "", sizeBytes, KindTemplate)
}

// lockName checks a name and takes its lock and then p.mu, for an
// operation on one device; ErrClosed once the pool is closed.
func (p *Pool) lockName(name string) (unlock func(), err error) {
	if err := checkName(name); err != nil {
		return nil, err
	}
	unlockVol := p.volLocks.Lock(name)
	p.mu.Lock()
	if err := p.usable(); err != nil {
		p.mu.Unlock()
		unlockVol()
		return nil, err
	}
	return func() { p.mu.Unlock(); unlockVol() }, nil
}

// usable refuses a change to a closed pool, and to a fenced one that still
// cannot recover. The caller holds p.mu.
func (p *Pool) usable() error {
	if p.closed {
		return ErrClosed
	}
	return p.unfence()
}

// SealTemplate marks a template's content complete, so that Clone takes it
// as a source. The template must be inactive, so that everything written to
// it has reached the pool. Sealing a sealed template is not an error.
func (p *Pool) SealTemplate(ctx context.Context, name string) error {
	unlock, err := p.lockName(name)
	if err != nil {
		return err
	}
	defer unlock()
	v := p.vols[name]
	if v == nil || v.Deleting || v.Kind != KindTemplate {
		return fmt.Errorf("%w: template %s", ErrNotFound, name)
	}
	if v.Sealed {
		return nil
	}
	if err := ctx.Err(); err != nil {
		return err
	}
	if info, err := p.k.InfoByName(p.volDMName(name)); err == nil && info.LiveTable {
		return fmt.Errorf("%w: template %s is still active", ErrBusy, name)
	}
	c := *v
	c.Sealed, c.Active = true, false
	p.step("seal:checked")
	if err := p.st.apply(change{put: []*Volume{&c}}); err != nil {
		return p.failed(p.recordsFailed(err))
	}
	p.putVol(&c)
	p.step("seal:recorded")
	return nil
}

// failed reports a change's failure after recovering from it (fail): the
// pool's fencing error when it could not recover, else err.
func (p *Pool) failed(err error) error {
	if ferr := p.fail(err); ferr != nil {
		return ferr
	}
	return err
}

func (p *Pool) newDevice(ctx context.Context, name, source string, sizeBytes int64, kind Kind) (*Volume, error) {
	if err := checkName(name); err != nil {
		return nil, err
	}
	if sizeBytes < 0 || sizeBytes > maxVolumeBytes || (source == "" && sizeBytes == 0) {
		return nil, fmt.Errorf("%w: volume %s: size %d bytes", ErrInvalid, name, sizeBytes)
	}
	if source != "" {
		if err := checkName(source); err != nil {
			return nil, err
		}
		if source == name {
			return nil, fmt.Errorf("%w: %s cannot be its own source", ErrInvalid, name)
		}
	}
	sizeBytes = roundSize(sizeBytes)
	// Lock the volume and its source in name order, so that two operations
	// on the same pair cannot deadlock.
	keys := []string{name}
	if source != "" {
		keys = append(keys, source)
	}
	sort.Strings(keys)
	for _, k := range keys {
		defer p.volLocks.Lock(k)()
	}
	p.mu.Lock()
	src, sizeBytes, existing, err := p.checkNew(ctx, name, source, sizeBytes, kind)
	if err != nil || existing != nil {
		p.mu.Unlock()
		return existing, err
	}
	if src == nil {
		defer p.mu.Unlock()
		return p.createLocked(ctx, name, source, src, sizeBytes, kind)
	}
	// A snapshot: an active origin is suspended (its writes flushed and its
	// filesystem frozen, which can take long) holding only the two
	// volumes' locks, so that reading the pool's usage, metrics, capacity
	// and changes of other volumes go on meanwhile; the pool's lock is
	// taken again for the intent, the message and the commit.
	origin, active, err := p.activeDevice(src.Name)
	if err != nil || !active {
		defer p.mu.Unlock()
		if err != nil {
			return nil, err
		}
		return p.createLocked(ctx, name, source, src, sizeBytes, kind)
	}
	resume, err := p.suspendOrigins([]devmapper.Dev{origin}, "the origin "+source)
	defer func() { _ = resume() }()
	if err != nil {
		return nil, fmt.Errorf("snapshot %s: %w", name, err)
	}
	p.step("snapshot:suspended")
	v, err := func() (*Volume, error) {
		p.mu.Lock()
		defer p.mu.Unlock()
		// Only the two names were locked meanwhile: look again.
		src, sizeBytes, existing, err := p.checkNew(ctx, name, source, sizeBytes, kind)
		if err != nil || existing != nil {
			return existing, err
		}
		return p.createLocked(ctx, name, source, src, sizeBytes, kind)
	}()
	if rerr := resume(); rerr != nil {
		return nil, rerr
	}
	return v, err
}

// suspendOrigins suspends the active origins of a snapshot or a group,
// named by what, without the pool's lock: the caller holds p.mu, which is
// released here, and takes it again for its intent, messages and commit.
// The origins are marked so that a recovery meanwhile leaves them
// suspended. resume resumes them (the ones a failed suspend reached too),
// unmarks them under p.mu, and fences the pool if a resume failed (the
// recovery resumes them; its error, if it fails, is returned); it returns
// with p.mu released, and a second call does nothing.
func (p *Pool) suspendOrigins(origins []devmapper.Dev, what string) (resume func() error, err error) {
	for _, d := range origins {
		p.suspending[d] = true
	}
	p.mu.Unlock()
	suspended, done := 0, false
	resume = func() error {
		if done {
			return nil
		}
		done = true
		var errs []error
		for _, d := range slices.Backward(origins[:suspended]) {
			if err := p.k.Resume(d); err != nil {
				errs = append(errs, err)
			}
		}
		p.mu.Lock()
		defer p.mu.Unlock()
		for _, d := range origins {
			delete(p.suspending, d)
		}
		if err := errors.Join(errs...); err != nil {
			return p.fail(fmt.Errorf("resume %s: %w", what, err))
		}
		return nil
	}
	for _, d := range origins {
		// Counted before the call: a suspend that failed may have
		// suspended, and the resume is harmless if not.
		suspended++
		if err := p.k.Suspend(d, 0); err != nil {
			return resume, fmt.Errorf("suspend %s: %w", what, err)
		}
	}
	return resume, nil
}

// activeDevice returns the dm device of an active volume.
func (p *Pool) activeDevice(name string) (devmapper.Dev, bool, error) {
	info, err := p.k.InfoByName(p.volDMName(name))
	switch {
	case errors.Is(err, unix.ENXIO):
		return 0, false, nil
	case err != nil:
		return 0, false, fmt.Errorf("look up %s: %w", name, err)
	}
	return info.Dev, info.LiveTable, nil
}

// checkNew checks a new device's request against the pool as it is: the
// source, the size, a device of the name made already (returned as
// existing, for a repeated request), admission. The caller holds p.mu.
func (p *Pool) checkNew(ctx context.Context, name, source string, sizeBytes int64, kind Kind) (src *Volume, size int64, existing *Volume, err error) {
	if err := p.usable(); err != nil {
		return nil, 0, nil, err
	}
	if err := p.reapLocked(); err != nil {
		return nil, 0, nil, err
	}
	if source != "" {
		src = p.vols[source]
		if src == nil || src.Deleting {
			return nil, 0, nil, fmt.Errorf("%w: source %s", ErrNotFound, source)
		}
		if src.Kind == KindTemplate && (!src.Sealed || kind != KindVolume) {
			// An unsealed template is still being written; a snapshot of a
			// template would be a template nobody seals.
			return nil, 0, nil, fmt.Errorf("%w: source %s is a template that is not sealed, or the copy is not a volume", ErrInvalid, source)
		}
		if sizeBytes == 0 {
			sizeBytes = src.SizeBytes
		}
		if sizeBytes < src.SizeBytes {
			return nil, 0, nil, fmt.Errorf("%w: %s of %d bytes cannot hold its source %s of %d bytes", ErrInvalid, name, sizeBytes, source, src.SizeBytes)
		}
	}
	if v := p.vols[name]; v != nil {
		if v.Deleting || v.Kind != kind || v.Source != source || v.SizeBytes != sizeBytes {
			return nil, 0, nil, fmt.Errorf("%w: %s exists as a %s of %d bytes from %q", ErrAlreadyExists, name, v.Kind, v.SizeBytes, v.Source)
		}
		c := *v
		return src, sizeBytes, &c, nil
	}
	if err := ctx.Err(); err != nil {
		return nil, 0, nil, err
	}
	if err := p.admit(sizeBytes, kind); err != nil {
		return nil, 0, nil, fmt.Errorf("volume %s: %w", name, err)
	}
	return src, sizeBytes, nil, nil
}

// createLocked makes the device: intent, message, commit; an active
// source was suspended by the caller (newDevice).
// says the caller suspended an active source already. The caller holds
// p.mu.
func (p *Pool) createLocked(ctx context.Context, name, source string, src *Volume, sizeBytes int64, kind Kind) (*Volume, error) {
	v := &Volume{Name: name, SizeBytes: sizeBytes, Kind: kind, Source: source, CreatedAt: time.Now().UTC()}
	in := &intent{Op: opCreate, TID: p.tid + 1}
	if src != nil {
		in.Op, in.OriginID = opSnapshot, src.DeviceID
	}
	// made tells whether the change went forward after a failure that the
	// pool recovered from: the records then hold the new device.
	made := func() (*Volume, bool) {
		if cur := p.vols[name]; cur != nil && cur.DeviceID == v.DeviceID && !cur.Deleting {
			c := *cur
			return &c, true
		}
		return nil, false
	}
	for attempt := 0; ; attempt++ {
		id, next, err := p.allocID()
		if err != nil {
			return nil, err
		}
		v.DeviceID = id
		in.Vol = *v
		if err := p.st.apply(change{intent: in, nextID: &next}); err != nil {
			return nil, p.failed(p.recordsFailed(err))
		}
		p.nextID = next
		p.step(string(in.Op) + ":intent")
		if src != nil {
			err = p.k.Message(p.dev, devmapper.CreateSnap{DeviceID: id, OriginID: src.DeviceID})
		} else {
			err = p.k.Message(p.dev, devmapper.CreateThin{DeviceID: id})
		}
		if errors.Is(err, unix.EEXIST) && attempt < 16 {
			// The id is taken in the pool although no record owns it: not
			// ours to delete now. Remember it and take the next one.
			suspects := append(slices.Clone(p.suspects), id)
			if err := p.st.apply(change{clearIntent: true, suspects: &suspects}); err != nil {
				return nil, p.failed(p.recordsFailed(err))
			}
			p.suspects = suspects
			p.step(string(in.Op) + ":suspect")
			continue
		}
		if err != nil {
			err = p.poolError(fmt.Sprintf("%s %s", in.Op, name), err)
			if errors.Is(err, ErrPoolUnhealthy) {
				return nil, p.dropIntent(err)
			}
			// The kernel refused, and should have made nothing; the
			// recovery rolls the intent back whatever it did.
			if ferr := p.fail(err); ferr != nil {
				return nil, ferr
			}
			if got, ok := made(); ok {
				return got, nil
			}
			return nil, err
		}
		break
	}
	p.step(string(in.Op) + ":message")
	if err := p.commit(in); err != nil {
		if ferr := p.fail(err); ferr != nil {
			return nil, ferr
		}
		if got, ok := made(); ok {
			return got, nil // the commit had gone through
		}
		return nil, err
	}
	got, _ := made()
	return got, nil
}

// commit advances the transaction id (the commit point) and records the
// result. The caller holds p.mu.
func (p *Pool) commit(in *intent) error {
	if err := p.k.Message(p.dev, devmapper.SetTransactionID{Current: p.tid, New: in.TID}); err != nil {
		return p.poolError("commit", err)
	}
	p.step(string(in.Op) + ":committed")
	if err := p.finish(in); err != nil {
		return err
	}
	p.step(string(in.Op) + ":recorded")
	return nil
}

// allocID picks the next device id, and the allocator's next value once it
// is taken. Ids grow monotonically and wrap at 2^24, skipping ids in use or
// suspect, so an id whose delete is pending is never handed out again.
func (p *Pool) allocID() (id, next uint32, err error) { return p.allocFrom(p.nextID) }

// allocFrom is allocID starting at start, and skipping exclude too.
//
// The first candidate is almost always free (ids only grow), so each is
// looked for among the records first, which allocates nothing; only after
// allocProbe taken candidates, as after a wrap into a dense range, is the
// set of ids in use built, once. A create with 10,000 volumes in the pool
// built that set every time, most of its CPU.
func (p *Pool) allocFrom(start uint32, exclude ...uint32) (id, next uint32, err error) {
	inUse := func(id uint32) bool {
		if slices.Contains(exclude, id) || slices.Contains(p.suspects, id) {
			return true
		}
		for _, v := range p.vols {
			if v.DeviceID == id {
				return true
			}
		}
		return false
	}
	id = start
	for probe := 0; probe <= devmapper.MaxDeviceID; probe++ {
		if id > devmapper.MaxDeviceID || id == 0 {
			id = 1
		}
		if probe == allocProbe {
			used := map[uint32]bool{}
			for _, v := range p.vols {
				used[v.DeviceID] = true
			}
			for _, u := range append(slices.Clone(p.suspects), exclude...) {
				used[u] = true
			}
			inUse = func(id uint32) bool { return used[id] }
		}
		if !inUse(id) {
			return id, id + 1, nil
		}
		id++
	}
	return 0, 0, fmt.Errorf("%w: all %d thin device ids are in use", ErrNoSpace, devmapper.MaxDeviceID)
}

// allocProbe is how many candidates allocFrom checks one by one before it
// builds the set of ids in use.
const allocProbe = 8

// poolError turns a kernel refusal into what it means for the caller. A
// read-only, failed or needs_check pool refuses every message before it acts
// on it (pool_message in dm-thin.c answers EOPNOTSUPP; a commit that fails
// aborts the transaction and turns the pool read-only), so ErrPoolUnhealthy
// also means the message changed nothing.
func (p *Pool) poolError(what string, err error) error {
	if ps, serr := p.poolStatus(); serr == nil && (ps.Mode == devmapper.PoolReadOnly || ps.NeedsCheck || ps.Fail || ps.Error) {
		return fmt.Errorf("%s: %w: pool mode %s, needs_check %v: %v", what, ErrPoolUnhealthy, ps.Mode, ps.NeedsCheck, err)
	}
	if errors.Is(err, unix.ENOSPC) {
		return fmt.Errorf("%s: %w: %v", what, ErrNoSpace, err)
	}
	return fmt.Errorf("%s: %w", what, err)
}

// dropIntent clears the pending intent of a change the kernel refused
// without acting on it, and returns err.
func (p *Pool) dropIntent(err error) error {
	if cerr := p.st.apply(change{clearIntent: true}); cerr != nil {
		return p.failed(p.recordsFailed(cerr))
	}
	return err
}

// Delete deletes a volume or snapshot. Deleting what does not exist is not
// an error. A device still open (mounted) is removed by the kernel when its
// last opener closes it, and the thin device deleted after that (by the next
// operation or Open); Get reports it as Deleting until then.
func (p *Pool) Delete(ctx context.Context, name string) error {
	unlock, err := p.lockName(name)
	if err != nil {
		return err
	}
	defer unlock()
	v := p.vols[name]
	if v == nil {
		return nil
	}
	if err := ctx.Err(); err != nil {
		return err
	}
	if err := p.removeDM(name, false); errors.Is(err, ErrBusy) {
		if err := p.removeDM(name, true); err != nil {
			return err
		}
		p.step("delete:deferred")
		return p.tombstone(v)
	} else if err != nil {
		return err
	}
	return p.deleteLocked(v)
}

// tombstone records that v's delete waits for its device's last opener.
func (p *Pool) tombstone(v *Volume) error {
	if v.Deleting {
		return nil
	}
	c := *v
	c.Deleting = true
	if err := p.st.apply(change{put: []*Volume{&c}}); err != nil {
		return p.failed(p.recordsFailed(err))
	}
	p.putVol(&c)
	p.step("delete:tombstone")
	return nil
}

// deleteLocked deletes an inactive volume's thin device. The caller holds
// p.mu.
func (p *Pool) deleteLocked(v *Volume) error {
	in := &intent{Op: opDelete, TID: p.tid + 1, Vol: *v}
	if err := p.st.apply(change{intent: in}); err != nil {
		return p.failed(p.recordsFailed(err))
	}
	p.step("delete:intent")
	err := p.k.Message(p.dev, devmapper.Delete{DeviceID: v.DeviceID})
	if errors.Is(err, unix.EBUSY) {
		// The kernel still holds it open (a removal in progress): keep a
		// tombstone for Reap.
		c := *v
		c.Deleting = true
		if err := p.st.apply(change{clearIntent: true, put: []*Volume{&c}}); err != nil {
			return p.failed(p.recordsFailed(err))
		}
		p.putVol(&c)
		p.step("delete:tombstone")
		return nil
	}
	if err == nil || errors.Is(err, unix.ENODATA) {
		p.step("delete:message")
		err = p.commit(in)
	} else if err = p.poolError("delete "+v.Name, err); errors.Is(err, ErrPoolUnhealthy) {
		return p.dropIntent(err)
	}
	if err != nil {
		// The recovery rolls the delete forward.
		if ferr := p.fail(err); ferr != nil {
			return ferr
		}
		if p.vols[v.Name] == nil {
			return nil
		}
		return err
	}
	return nil
}

// removeDM removes a volume's dm device; ErrBusy while it is open, unless
// deferred.
func (p *Pool) removeDM(name string, deferred bool) error {
	info, err := p.k.InfoByName(p.volDMName(name))
	if errors.Is(err, unix.ENXIO) {
		return nil
	}
	if err != nil {
		return err
	}
	if info.Suspended {
		if err := p.k.Resume(info.Dev); err != nil {
			return err
		}
	}
	err = p.k.Remove(info.Dev, deferred)
	switch {
	case err == nil, errors.Is(err, unix.ENXIO):
		return nil
	case errors.Is(err, unix.EBUSY):
		return fmt.Errorf("%w: %s is open (open count %d)", ErrBusy, name, info.OpenCount)
	}
	return err
}

// Activate makes the volume's block device and returns its node. It is
// idempotent, cancels a pending deferred removal, and records that the
// volume should be active, so Open reactivates it after a reboot. A failure
// leaves the device as it was.
func (p *Pool) Activate(ctx context.Context, name string) (string, error) {
	if err := checkName(name); err != nil {
		return "", err
	}
	defer p.volLocks.Lock(name)()
	v, err := p.getForChange(name)
	if err != nil {
		return "", err
	}
	if err := ctx.Err(); err != nil {
		return "", err
	}
	node, made, err := p.activateDM(v)
	if err != nil {
		return "", fmt.Errorf("activate %s: %w", name, err)
	}
	p.step("activate:device")
	if v.Active {
		return node, nil
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	cur := p.vols[name]
	if cur == nil || cur.Active {
		return node, nil
	}
	c := *cur
	c.Active = true
	if err := p.st.apply(change{put: []*Volume{&c}}); err != nil {
		if made {
			_ = p.removeDM(name, false)
		}
		return "", p.failed(p.recordsFailed(err))
	}
	p.putVol(&c)
	p.step("activate:recorded")
	return node, nil
}

// getForChange returns a copy of a volume's record for a change to it;
// ErrNotFound if there is none, ErrClosed or ErrFenced when the pool takes
// no changes.
func (p *Pool) getForChange(name string) (*Volume, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if err := p.usable(); err != nil {
		return nil, err
	}
	v := p.vols[name]
	if v == nil || v.Deleting {
		return nil, fmt.Errorf("%w: volume %s", ErrNotFound, name)
	}
	c := *v
	return &c, nil
}

// activateDM makes or repairs the dm device of v: created, with a live thin
// table of v's id and size, resumed, no deferred removal pending. made
// reports that the device did not exist before; when activateDM fails, a
// device it made is removed again.
func (p *Pool) activateDM(v *Volume) (node string, made bool, err error) {
	dmName := p.volDMName(v.Name)
	want := devmapper.NewTarget(0, uint64(v.SizeBytes)/devmapper.SectorSize, devmapper.ThinParams{PoolDev: p.dev, DeviceID: v.DeviceID})
	info, err := p.k.InfoByName(dmName)
	switch {
	case errors.Is(err, unix.ENXIO):
		if info, err = p.k.Create(dmName, p.volUUID(v.DeviceID)); err != nil {
			return "", false, err
		}
		made = true
		p.step("activate:created")
		defer func() {
			if err != nil {
				_ = p.k.Remove(info.Dev, false)
			}
		}()
	case err != nil:
		return "", false, err
	default:
		if info.UUID != p.volUUID(v.DeviceID) {
			return "", false, fmt.Errorf("%w: dm device %s has uuid %q, want %q", ErrMismatch, dmName, info.UUID, p.volUUID(v.DeviceID))
		}
		if info.DeferredRemove {
			if err := p.k.CancelDeferredRemove(info.Dev); err != nil {
				return "", false, err
			}
		}
	}
	if info.LiveTable {
		tbl, err := p.k.Table(info.Dev)
		if err != nil {
			return "", made, err
		}
		if len(tbl) == 1 && tbl[0] == want {
			if info.Suspended {
				if err := p.k.Resume(info.Dev); err != nil {
					return "", made, err
				}
			}
			node, err := p.k.DeviceNode(info.Dev)
			return node, made, err
		}
	}
	if err := p.k.Load(info.Dev, []devmapper.Target{want}); err != nil {
		return "", made, err
	}
	if err := p.k.Resume(info.Dev); err != nil {
		// A resume that failed may leave the device suspended, and its
		// users' I/O waiting: try once more before reporting it.
		if i, ierr := p.k.Info(info.Dev); ierr == nil && i.Suspended {
			_ = p.k.Resume(info.Dev)
		}
		return "", made, err
	}
	node, err = p.k.DeviceNode(info.Dev)
	return node, made, err
}

// Deactivate removes the volume's block device. ErrBusy while it is open.
// Deactivating an inactive or unknown volume is not an error.
func (p *Pool) Deactivate(ctx context.Context, name string) error {
	if err := checkName(name); err != nil {
		return err
	}
	defer p.volLocks.Lock(name)()
	p.mu.Lock()
	err := p.usable()
	p.mu.Unlock()
	if err != nil {
		return err
	}
	if err := ctx.Err(); err != nil {
		return err
	}
	if err := p.removeDM(name, false); err != nil {
		return err
	}
	p.step("deactivate:device")
	p.mu.Lock()
	defer p.mu.Unlock()
	v := p.vols[name]
	if v == nil || !v.Active {
		return nil
	}
	c := *v
	c.Active = false
	if err := p.st.apply(change{put: []*Volume{&c}}); err != nil {
		return p.failed(p.recordsFailed(err))
	}
	p.putVol(&c)
	p.step("deactivate:recorded")
	return nil
}

// Grow grows a volume to at least sizeBytes; an active one is grown in place
// (its table reloaded). Growing to the current size or less than it is not
// an error and changes nothing; shrinking is not supported.
func (p *Pool) Grow(ctx context.Context, name string, sizeBytes int64) (*Volume, error) {
	if err := checkName(name); err != nil {
		return nil, err
	}
	if sizeBytes <= 0 || sizeBytes > maxVolumeBytes {
		return nil, fmt.Errorf("%w: grow %s to %d bytes", ErrInvalid, name, sizeBytes)
	}
	sizeBytes = roundSize(sizeBytes)
	defer p.volLocks.Lock(name)()
	p.mu.Lock()
	if err := p.usable(); err != nil {
		p.mu.Unlock()
		return nil, err
	}
	v := p.vols[name]
	if v == nil || v.Deleting {
		p.mu.Unlock()
		return nil, fmt.Errorf("%w: volume %s", ErrNotFound, name)
	}
	c := *v
	if sizeBytes > v.SizeBytes {
		if err := p.admit(sizeBytes-v.SizeBytes, v.Kind); err != nil {
			p.mu.Unlock()
			return nil, fmt.Errorf("grow %s: %w", name, err)
		}
		// The record first: the pool does not store sizes, so a crash
		// after this leaves a record that the next activation applies.
		c.SizeBytes = sizeBytes
		if err := p.st.apply(change{put: []*Volume{&c}}); err != nil {
			err = p.failed(p.recordsFailed(err))
			p.mu.Unlock()
			return nil, err
		}
		p.putVol(&c)
		p.step("grow:recorded")
	}
	p.mu.Unlock()
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	if info, err := p.k.InfoByName(p.volDMName(name)); err == nil && info.LiveTable {
		if _, _, err := p.activateDM(&c); err != nil {
			return nil, fmt.Errorf("grow %s: %w", name, err)
		}
		p.step("grow:reloaded")
	} else if err != nil && !errors.Is(err, unix.ENXIO) {
		return nil, fmt.Errorf("grow %s: %w", name, err)
	}
	return &c, nil
}

func (p *Pool) get(name string) (*Volume, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.closed {
		return nil, ErrClosed
	}
	v := p.vols[name]
	if v == nil || v.Deleting {
		return nil, fmt.Errorf("%w: volume %s", ErrNotFound, name)
	}
	c := *v
	return &c, nil
}

// Get returns a volume's record; ErrNotFound if there is none (or only a
// pending delete).
func (p *Pool) Get(name string) (*Volume, error) { return p.get(name) }

// List returns every volume and snapshot, by name.
func (p *Pool) List() []Volume {
	p.mu.Lock()
	defer p.mu.Unlock()
	out := make([]Volume, 0, len(p.vols))
	for _, v := range p.vols {
		if !v.Deleting {
			out = append(out, *v)
		}
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Name < out[j].Name })
	return out
}

// DevicePath returns the node of an active volume; ErrNotFound when the
// volume is not active.
func (p *Pool) DevicePath(name string) (string, error) {
	info, err := p.k.InfoByName(p.volDMName(name))
	if err != nil || !info.LiveTable {
		return "", fmt.Errorf("%w: volume %s is not active", ErrNotFound, name)
	}
	return p.k.DeviceNode(info.Dev)
}
