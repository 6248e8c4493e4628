package thinpool

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"sort"
	"strings"
	"time"

	"golang.org/x/sys/unix"

	"github.com/csi-dmthin/csi-dmthin/pkg/devmapper"
)

// GroupMember asks for one snapshot of a group: Name, of Source.
type GroupMember struct {
	Name, Source string
}

// SnapshotGroup makes one snapshot of each member's source, all of one
// moment, as the group named group: every active source is suspended (its
// filesystem frozen and its writes flushed) before the first snapshot is
// taken and resumed after the last, and the pool commits them all with one
// transaction id, so a crash or a failure at any step leaves all of them or
// none. Making a group that exists with the same members returns it; one
// whose names are taken otherwise, in part or whole, is ErrAlreadyExists.
func (p *Pool) SnapshotGroup(ctx context.Context, group string, members []GroupMember) ([]*Volume, error) {
	if err := checkName(group); err != nil {
		return nil, fmt.Errorf("group: %w", err)
	}
	if len(members) == 0 {
		return nil, fmt.Errorf("%w: group %s has no members", ErrInvalid, group)
	}
	names, sources := map[string]bool{}, map[string]bool{}
	var keys []string
	for _, m := range members {
		for _, n := range []string{m.Name, m.Source} {
			if err := checkName(n); err != nil {
				return nil, err
			}
		}
		switch {
		case names[m.Name] || sources[m.Name] || names[m.Source]:
			return nil, fmt.Errorf("%w: group %s names %s twice, or as both a snapshot and a source", ErrInvalid, group, m.Name)
		case sources[m.Source]:
			return nil, fmt.Errorf("%w: group %s takes two snapshots of %s", ErrInvalid, group, m.Source)
		}
		names[m.Name], sources[m.Source] = true, true
		keys = append(keys, m.Name, m.Source)
	}
	sort.Strings(keys)
	for _, k := range keys {
		defer p.volLocks.Lock(k)()
	}
	p.mu.Lock()
	srcs, sizeBytes, existing, err := p.checkGroup(ctx, group, members)
	if err != nil || existing != nil {
		p.mu.Unlock()
		return existing, err
	}
	// Every active source is suspended (flushed, its filesystem frozen)
	// before the first snapshot and resumed after the last, holding the
	// volumes' locks but not the pool's, as for one snapshot (newDevice).
	var origins []devmapper.Dev
	for _, src := range srcs {
		dev, active, err := p.activeDevice(src.Name)
		if err != nil {
			p.mu.Unlock()
			return nil, err
		}
		if active {
			origins = append(origins, dev)
		}
	}
	resume, err := p.suspendOrigins(origins, "the origins of group "+group)
	defer func() { _ = resume() }()
	if err != nil {
		return nil, fmt.Errorf("group %s: %w", group, err)
	}
	p.step("group:suspended")
	got, err := func() ([]*Volume, error) {
		p.mu.Lock()
		defer p.mu.Unlock()
		// Only the members' names were locked meanwhile: look again.
		srcs, sizeBytes, existing, err = p.checkGroup(ctx, group, members)
		if err != nil || existing != nil {
			return existing, err
		}
		return p.groupLocked(group, members, srcs, sizeBytes)
	}()
	if rerr := resume(); rerr != nil {
		return nil, rerr
	}
	return got, err
}

// checkGroup checks a group's request against the pool as it is: the
// sources, a group made already (returned as existing), admission. The
// caller holds p.mu.
func (p *Pool) checkGroup(ctx context.Context, group string, members []GroupMember) (srcs []*Volume, sizeBytes int64, existing []*Volume, err error) {
	if err := p.usable(); err != nil {
		return nil, 0, nil, err
	}
	if err := p.reapLocked(); err != nil {
		return nil, 0, nil, err
	}
	srcs = make([]*Volume, len(members))
	for i, m := range members {
		src := p.vols[m.Source]
		if src == nil || src.Deleting || src.Kind != KindVolume {
			return nil, 0, nil, fmt.Errorf("%w: source %s of group %s is not a volume", ErrNotFound, m.Source, group)
		}
		srcs[i] = src
		sizeBytes += src.SizeBytes
	}
	if existing, err := p.existingGroup(group, members); existing != nil || err != nil {
		return srcs, sizeBytes, existing, err
	}
	if err := ctx.Err(); err != nil {
		return nil, 0, nil, err
	}
	if err := p.admit(sizeBytes, KindSnapshot); err != nil {
		return nil, 0, nil, fmt.Errorf("group %s: %w", group, err)
	}
	return srcs, sizeBytes, nil, nil
}

// groupLocked makes the group's snapshots, its active sources suspended:
// intent, create_snap each, commit. The caller holds p.mu.
func (p *Pool) groupLocked(group string, members []GroupMember, srcs []*Volume, sizeBytes int64) ([]*Volume, error) {
	in := &intent{Op: opGroup, TID: p.tid + 1, Group: make([]groupMember, len(members))}
	now := time.Now().UTC()
	// Ids are taken all at once, so the intent names every device it may
	// leave behind before the first is made.
	next := p.nextID
	for i, m := range members {
		id, n, err := p.allocFrom(next)
		if err != nil {
			return nil, err
		}
		next = n
		in.Group[i] = groupMember{
			Vol:      Volume{Name: m.Name, DeviceID: id, SizeBytes: srcs[i].SizeBytes, Kind: KindSnapshot, Source: m.Source, CreatedAt: now, Group: group},
			OriginID: srcs[i].DeviceID,
		}
	}
	if err := p.st.apply(change{intent: in, nextID: &next}); err != nil {
		return nil, p.failed(p.recordsFailed(err))
	}
	p.nextID = next
	p.step("group:intent")
	made := func() ([]*Volume, bool) {
		out := make([]*Volume, len(in.Group))
		for i, m := range in.Group {
			cur := p.vols[m.Vol.Name]
			if cur == nil || cur.DeviceID != m.Vol.DeviceID {
				return nil, false
			}
			c := *cur
			out[i] = &c
		}
		return out, true
	}
	if err := p.groupMessages(in); err != nil {
		// Some members may have been made: the recovery deletes them.
		err = p.poolError("group snapshot "+group, err)
		if ferr := p.fail(err); ferr != nil {
			return nil, ferr
		}
		if got, ok := made(); ok {
			return got, nil
		}
		return nil, err
	}
	p.step("group:message")
	if err := p.commit(in); err != nil {
		if ferr := p.fail(err); ferr != nil {
			return nil, ferr
		}
		if got, ok := made(); ok {
			return got, nil
		}
		return nil, err
	}
	got, _ := made()
	return got, nil
}

// existingGroup returns the group when every member exists as asked (a
// repeated request), nil when none does, and ErrAlreadyExists otherwise.
func (p *Pool) existingGroup(group string, members []GroupMember) ([]*Volume, error) {
	var out []*Volume
	for _, m := range members {
		v := p.vols[m.Name]
		if v == nil {
			continue
		}
		if v.Deleting || v.Kind != KindSnapshot || v.Source != m.Source || v.Group != group {
			return nil, fmt.Errorf("%w: %s exists as a %s of %q in group %q", ErrAlreadyExists, m.Name, v.Kind, v.Source, v.Group)
		}
		c := *v
		out = append(out, &c)
	}
	switch {
	case len(out) == 0:
		return nil, nil
	case len(out) < len(members):
		return nil, fmt.Errorf("%w: group %s exists with %d of the %d snapshots asked for", ErrAlreadyExists, group, len(out), len(members))
	}
	return out, nil
}

// groupMessages sends create_snap for each member (the caller suspended
// the active sources). An id found taken by a device no record owns
// (EEXIST) is recorded as suspect and replaced in the intent by a new one,
// and that member's snapshot made again.
func (p *Pool) groupMessages(in *intent) error {
	for i := 0; i < len(in.Group); i++ {
		m := &in.Group[i]
		for attempt := 0; ; attempt++ {
			err := p.k.Message(p.dev, devmapper.CreateSnap{DeviceID: m.Vol.DeviceID, OriginID: m.OriginID})
			if err == nil {
				break
			}
			if !errors.Is(err, unix.EEXIST) || attempt >= 16 {
				return fmt.Errorf("snapshot %s of %s: %w", m.Vol.Name, m.Vol.Source, err)
			}
			id, next, aerr := p.allocFrom(p.nextID, in.devices()...)
			if aerr != nil {
				return aerr
			}
			suspects := append(slices.Clone(p.suspects), m.Vol.DeviceID)
			updated := *in
			updated.Group = slices.Clone(in.Group)
			updated.Group[i].Vol.DeviceID = id
			if err := p.st.apply(change{clearIntent: true, intent: &updated, suspects: &suspects, nextID: &next}); err != nil {
				return p.recordsFailed(err)
			}
			p.suspects, p.nextID = suspects, next
			*in = updated
			m = &in.Group[i]
			p.step("group:suspect")
		}
	}
	return nil
}

// GroupSnapshots returns the snapshots of a group, by name; ErrNotFound
// when it has none.
func (p *Pool) GroupSnapshots(group string) ([]Volume, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	var out []Volume
	for _, v := range p.vols {
		if v.Group == group && !v.Deleting {
			out = append(out, *v)
		}
	}
	if len(out) == 0 {
		return nil, fmt.Errorf("%w: group snapshot %s", ErrNotFound, group)
	}
	sort.Slice(out, func(i, j int) bool { return strings.Compare(out[i].Name, out[j].Name) < 0 })
	return out, nil
}
