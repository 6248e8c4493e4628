package thinpool

import (
	"context"
	"errors"
	"fmt"
	"regexp"
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
// overprovisioning limit does not count a template (nothing is promised to
// anyone by it), but the free-space floors refuse one.
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
	if p.closed {
		p.mu.Unlock()
		unlockVol()
		return nil, ErrClosed
	}
	return func() { p.mu.Unlock(); unlockVol() }, nil
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
	if err := p.st.apply(change{put: []*Volume{&c}}); err != nil {
		return err
	}
	*v = c
	return nil
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
	defer p.mu.Unlock()
	if p.closed {
		return nil, ErrClosed
	}
	if err := p.reapLocked(); err != nil {
		return nil, err
	}
	var src *Volume
	if source != "" {
		src = p.vols[source]
		if src == nil || src.Deleting {
			return nil, fmt.Errorf("%w: source %s", ErrNotFound, source)
		}
		if src.Kind == KindTemplate && (!src.Sealed || kind != KindVolume) {
			// An unsealed template is still being written; a snapshot of a
			// template would be a template nobody seals.
			return nil, fmt.Errorf("%w: source %s is a template that is not sealed, or the copy is not a volume", ErrInvalid, source)
		}
		if sizeBytes == 0 {
			sizeBytes = src.SizeBytes
		}
		if sizeBytes < src.SizeBytes {
			return nil, fmt.Errorf("%w: %s of %d bytes cannot hold its source %s of %d bytes", ErrInvalid, name, sizeBytes, source, src.SizeBytes)
		}
	}
	if v := p.vols[name]; v != nil {
		if v.Deleting || v.Kind != kind || v.Source != source || v.SizeBytes != sizeBytes {
			return nil, fmt.Errorf("%w: %s exists as a %s of %d bytes from %q", ErrAlreadyExists, name, v.Kind, v.SizeBytes, v.Source)
		}
		c := *v
		return &c, nil
	}
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	commitBytes := sizeBytes
	if kind == KindTemplate {
		commitBytes = 0
	}
	if err := p.admit(commitBytes); err != nil {
		return nil, fmt.Errorf("volume %s: %w", name, err)
	}
	v := &Volume{Name: name, SizeBytes: sizeBytes, Kind: kind, Source: source, CreatedAt: time.Now().UTC()}
	in := &intent{Op: opCreate, TID: p.tid + 1}
	if src != nil {
		in.Op, in.OriginID = opSnapshot, src.DeviceID
	}
	for attempt := 0; ; attempt++ {
		id, err := p.allocID()
		if err != nil {
			return nil, err
		}
		v.DeviceID = id
		in.Vol = *v
		if err := p.st.apply(change{intent: in, nextID: ptr(p.nextID)}); err != nil {
			return nil, err
		}
		p.step(string(in.Op) + ":intent")
		if src != nil {
			err = p.snapshotMessage(src, id)
		} else {
			err = p.k.Message(p.dev, devmapper.CreateThin{DeviceID: id})
		}
		if errors.Is(err, unix.EEXIST) && attempt < 16 {
			// The id is taken in the pool although no record owns it: not
			// ours to delete now. Remember it and take the next one.
			p.suspects = append(p.suspects, id)
			if err := p.st.apply(change{clearIntent: true, suspects: &p.suspects}); err != nil {
				return nil, err
			}
			continue
		}
		if err != nil {
			// Nothing was created: drop the intent.
			if cerr := p.st.apply(change{clearIntent: true}); cerr != nil {
				return nil, cerr
			}
			return nil, p.poolError(fmt.Sprintf("%s %s", in.Op, name), err)
		}
		break
	}
	p.step(string(in.Op) + ":message")
	if err := p.commit(in); err != nil {
		return nil, err
	}
	c := *p.vols[name]
	return &c, nil
}

// snapshotMessage sends create_snap, suspending an active origin around it.
func (p *Pool) snapshotMessage(src *Volume, id uint32) (err error) {
	info, err := p.k.InfoByName(p.volDMName(src.Name))
	active := err == nil && info.LiveTable
	if active {
		if err := p.k.Suspend(info.Dev, 0); err != nil {
			return err
		}
		p.step("snapshot:suspended")
		defer func() {
			if rerr := p.k.Resume(info.Dev); rerr != nil && err == nil {
				err = rerr
			}
		}()
	}
	return p.k.Message(p.dev, devmapper.CreateSnap{DeviceID: id, OriginID: src.DeviceID})
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

// allocID takes the next device id. Ids grow monotonically and wrap at 2^24,
// skipping ids in use or suspect, so an id whose delete is pending is never
// handed out again.
func (p *Pool) allocID() (uint32, error) {
	used := map[uint32]bool{}
	for _, v := range p.vols {
		used[v.DeviceID] = true
	}
	for _, id := range p.suspects {
		used[id] = true
	}
	id := p.nextID
	for range devmapper.MaxDeviceID + 1 {
		if id > devmapper.MaxDeviceID {
			id = 1
		}
		if !used[id] {
			p.nextID = id + 1
			return id, nil
		}
		id++
	}
	return 0, fmt.Errorf("%w: all %d thin device ids are in use", ErrNoSpace, devmapper.MaxDeviceID)
}

// poolError turns a kernel refusal into what it means for the caller.
func (p *Pool) poolError(what string, err error) error {
	// A read-only, failed or needs_check pool refuses messages with
	// EOPNOTSUPP (pool_message in dm-thin.c); a suspended one with EINVAL.
	if errors.Is(err, unix.EOPNOTSUPP) || errors.Is(err, unix.EINVAL) {
		if ps, serr := p.poolStatus(); serr == nil && (ps.Mode == devmapper.PoolReadOnly || ps.NeedsCheck || ps.Fail) {
			return fmt.Errorf("%s: %w: pool mode %s, needs_check %v: %v", what, ErrPoolUnhealthy, ps.Mode, ps.NeedsCheck, err)
		}
	}
	if errors.Is(err, unix.ENOSPC) {
		return fmt.Errorf("%s: %w: %v", what, ErrNoSpace, err)
	}
	return fmt.Errorf("%s: %w", what, err)
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
		v.Deleting = true
		return p.st.apply(change{put: []*Volume{v}})
	} else if err != nil {
		return err
	}
	return p.deleteLocked(v)
}

// deleteLocked deletes an inactive volume's thin device. The caller holds
// p.mu.
func (p *Pool) deleteLocked(v *Volume) error {
	in := &intent{Op: opDelete, TID: p.tid + 1, Vol: *v}
	if err := p.st.apply(change{intent: in}); err != nil {
		return err
	}
	p.step("delete:intent")
	if err := p.k.Message(p.dev, devmapper.Delete{DeviceID: v.DeviceID}); err != nil && !errors.Is(err, unix.ENODATA) {
		if cerr := p.st.apply(change{clearIntent: true}); cerr != nil {
			return cerr
		}
		if errors.Is(err, unix.EBUSY) {
			// The kernel still holds it open (a removal in progress): keep a
			// tombstone for Reap.
			if !v.Deleting {
				v.Deleting = true
				if cerr := p.st.apply(change{put: []*Volume{v}}); cerr != nil {
					return cerr
				}
			}
			return nil
		}
		return p.poolError("delete "+v.Name, err)
	}
	p.step("delete:message")
	return p.commit(in)
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
// volume should be active, so Open reactivates it after a reboot.
func (p *Pool) Activate(ctx context.Context, name string) (string, error) {
	if err := checkName(name); err != nil {
		return "", err
	}
	defer p.volLocks.Lock(name)()
	v, err := p.get(name)
	if err != nil {
		return "", err
	}
	if err := ctx.Err(); err != nil {
		return "", err
	}
	node, err := p.activateDM(v)
	if err != nil {
		return "", fmt.Errorf("activate %s: %w", name, err)
	}
	p.step("activate:device")
	if !v.Active {
		p.mu.Lock()
		defer p.mu.Unlock()
		if cur := p.vols[name]; cur != nil {
			cur.Active = true
			if err := p.st.apply(change{put: []*Volume{cur}}); err != nil {
				return "", err
			}
		}
	}
	return node, nil
}

// activateDM makes or repairs the dm device of v: created, with a live thin
// table of v's id and size, resumed, no deferred removal pending.
func (p *Pool) activateDM(v *Volume) (string, error) {
	dmName := p.volDMName(v.Name)
	want := devmapper.NewTarget(0, uint64(v.SizeBytes)/devmapper.SectorSize, devmapper.ThinParams{PoolDev: p.dev, DeviceID: v.DeviceID})
	info, err := p.k.InfoByName(dmName)
	switch {
	case errors.Is(err, unix.ENXIO):
		if info, err = p.k.Create(dmName, p.volUUID(v.DeviceID)); err != nil {
			return "", err
		}
	case err != nil:
		return "", err
	default:
		if info.UUID != p.volUUID(v.DeviceID) {
			return "", fmt.Errorf("%w: dm device %s has uuid %q, want %q", ErrMismatch, dmName, info.UUID, p.volUUID(v.DeviceID))
		}
		if info.DeferredRemove {
			if err := p.k.CancelDeferredRemove(info.Dev); err != nil {
				return "", err
			}
		}
	}
	if info.LiveTable {
		tbl, err := p.k.Table(info.Dev)
		if err != nil {
			return "", err
		}
		if len(tbl) == 1 && tbl[0] == want {
			if info.Suspended {
				if err := p.k.Resume(info.Dev); err != nil {
					return "", err
				}
			}
			return p.k.DeviceNode(info.Dev)
		}
	}
	if err := p.k.Load(info.Dev, []devmapper.Target{want}); err != nil {
		return "", err
	}
	if err := p.k.Resume(info.Dev); err != nil {
		return "", err
	}
	return p.k.DeviceNode(info.Dev)
}

// Deactivate removes the volume's block device. ErrBusy while it is open.
// Deactivating an inactive or unknown volume is not an error.
func (p *Pool) Deactivate(ctx context.Context, name string) error {
	if err := checkName(name); err != nil {
		return err
	}
	defer p.volLocks.Lock(name)()
	if err := ctx.Err(); err != nil {
		return err
	}
	if err := p.removeDM(name, false); err != nil {
		return err
	}
	p.step("deactivate:device")
	p.mu.Lock()
	defer p.mu.Unlock()
	if v := p.vols[name]; v != nil && v.Active {
		v.Active = false
		return p.st.apply(change{put: []*Volume{v}})
	}
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
	v := p.vols[name]
	if v == nil || v.Deleting {
		p.mu.Unlock()
		return nil, fmt.Errorf("%w: volume %s", ErrNotFound, name)
	}
	if sizeBytes > v.SizeBytes {
		if err := p.admit(sizeBytes - v.SizeBytes); err != nil {
			p.mu.Unlock()
			return nil, fmt.Errorf("grow %s: %w", name, err)
		}
		// The record first: the pool does not store sizes, so a crash
		// after this leaves a record that the next activation applies.
		v.SizeBytes = sizeBytes
		if err := p.st.apply(change{put: []*Volume{v}}); err != nil {
			p.mu.Unlock()
			return nil, err
		}
		p.step("grow:recorded")
	}
	c := *v
	p.mu.Unlock()
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	if info, err := p.k.InfoByName(p.volDMName(name)); err == nil && info.LiveTable {
		if _, err := p.activateDM(&c); err != nil {
			return nil, fmt.Errorf("grow %s: %w", name, err)
		}
		p.step("grow:reloaded")
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
