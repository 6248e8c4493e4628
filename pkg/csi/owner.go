package csi

import (
	"errors"
	"fmt"

	"github.com/csi-dmthin/csi-dmthin/pkg/thinpool"
)

// Questions the Kubernetes side (pkg/kube) asks before it steers a restore
// or clone to this node. They answer from this node's pools alone and never
// change anything.

// HasVolume reports whether id is a volume in one of this node's pools.
func (d *Driver) HasVolume(id string) bool { return d.has(id, thinpool.KindVolume) }

// HasSnapshot reports whether id is a snapshot in one of this node's pools.
func (d *Driver) HasSnapshot(id string) bool { return d.has(id, thinpool.KindSnapshot) }

// HasGroupSnapshot reports whether id is a group snapshot in one of this
// node's pools.
func (d *Driver) HasGroupSnapshot(s string) bool {
	p, id, ok := d.localPool(s)
	if !ok {
		return false
	}
	_, err := p.GroupSnapshots(id.name)
	return err == nil
}

func (d *Driver) has(s string, kind thinpool.Kind) bool {
	p, id, ok := d.localPool(s)
	if !ok {
		return false
	}
	if id.node != "" && kind != thinpool.KindSnapshot {
		return false // a volume ID never names its node
	}
	v, err := p.Get(id.name)
	return err == nil && v.Kind == kind
}

// localPool parses an ID and finds its pool on this node.
func (d *Driver) localPool(s string) (Pool, objectID, bool) {
	id, ok := d.parseID(s)
	if !ok {
		return nil, id, false
	}
	p, ok := d.pools[id.pool]
	return p, id, ok
}

// RoomFor returns nil when the pool holding sourceID (a volume or snapshot
// of this node) would admit a new volume of sizeBytes cloned from it, and
// otherwise an error wrapping thinpool.ErrNotFound, ErrPoolUnhealthy or
// ErrNoSpace that names the pool and says why. CreateVolume makes a clone
// at least as large as its source, and so does this check.
//
// The pool answers (thinpool.Pool.Admit), by the rule its CreateVolume
// and Clone apply; this package does not repeat it. The answer can be
// stale by the time the volume is created; CreateVolume's own admission
// stays the authority.
func (d *Driver) RoomFor(sourceID string, sizeBytes int64) error {
	id, ok := d.parseID(sourceID)
	if !ok {
		return fmt.Errorf("%q is not a csi-dmthin ID: %w", sourceID, thinpool.ErrNotFound)
	}
	p, ok := d.pools[id.pool]
	if !ok {
		return fmt.Errorf("pool %s is not on node %s: %w", id.pool, d.nodeID, thinpool.ErrNotFound)
	}
	src, err := p.Get(id.name)
	if err == nil {
		err = p.Admit(max(sizeBytes, src.SizeBytes), thinpool.KindVolume)
	} else {
		err = fmt.Errorf("%s: %w", id, err)
	}
	if errors.Is(err, thinpool.ErrClosed) {
		// The driver is stopping: to the caller, a pool that takes nothing.
		return fmt.Errorf("pool %s is closed: %w", id.pool, thinpool.ErrPoolUnhealthy)
	}
	return err
}
