package csi

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"strings"
	"sync"
	"time"

	"k8s.io/klog/v2"

	"github.com/csi-dmthin/csi-dmthin/pkg/blockcopy"
	"github.com/csi-dmthin/csi-dmthin/pkg/thinpool"
)

// errNoSource is a copy's source that is not on this node.
var errNoSource = blockcopy.ErrSourceNotFound

// CopySource is what this node serves to copies on other nodes: its
// snapshots, each read from its device while a copy has it open (the
// device is activated for the first copy and deactivated after the last),
// with the extents its thin device maps, from the pool's metadata; and its
// volumes, each through a snapshot made for the copy (copySnapshotName),
// kept until the copy is released, so a resumed copy reads the same bytes.
func (d *Driver) CopySource() blockcopy.Opener { return d.copySrc }

// copySnapshotPrefix starts the device name of a snapshot made for a copy
// of a volume. No CSI name maps to it: deviceName maps every name that
// starts with "h_" to "h_" and 40 hex digits.
const copySnapshotPrefix = hashedPrefix + "copy."

// copySnapshotTTL is how long a snapshot made for a copy that no copy has
// open is kept after its last use: one whose target never released it
// (gone, or its copy cancelled while this node was away).
const copySnapshotTTL = time.Hour

// copySnapshotName is the snapshot a copy of a volume reads.
func copySnapshotName(copyID string) string {
	sum := sha256.Sum256([]byte(copyID))
	return copySnapshotPrefix + hex.EncodeToString(sum[:16])
}

func isCopySnapshotName(name string) bool { return strings.HasPrefix(name, copySnapshotPrefix) }

type copySource struct {
	d    *Driver
	mu   sync.Mutex
	open map[string]int // pool/name -> sources open on it
	// lastUse is when a copy's snapshot was last closed, by pool/name;
	// one not here was last used before this driver started.
	lastUse map[string]time.Time
	started time.Time
}

// Open opens the snapshot sourceID for copyID. A snapshot never changes,
// so a resumed copy reads the same bytes; nothing is kept per copy.
func (s *copySource) Open(ctx context.Context, copyID, sourceID string) (blockcopy.Source, error) {
	id, ok := parseID(sourceID)
	if !ok {
		return nil, fmt.Errorf("%w: %q is not a csi-dmthin snapshot ID", errNoSource, sourceID)
	}
	if id.node != "" && id.node != s.d.nodeID {
		return nil, fmt.Errorf("%w: snapshot %s is on node %s, not on this node %s", errNoSource, sourceID, id.node, s.d.nodeID)
	}
	pool, err := s.d.pool(id.pool)
	if err != nil {
		return nil, fmt.Errorf("%w: %v", errNoSource, err)
	}
	v, err := pool.Get(id.name)
	if errors.Is(err, thinpool.ErrNotFound) {
		return nil, fmt.Errorf("%w: snapshot %s does not exist on node %s", errNoSource, sourceID, s.d.nodeID)
	}
	if err != nil {
		return nil, err
	}
	name := id.name
	s.mu.Lock()
	defer s.mu.Unlock()
	switch {
	case v.Kind == thinpool.KindSnapshot && !isCopySnapshotName(v.Name):
	case v.Kind == thinpool.KindVolume && id.node == "":
		// A live volume: the copy reads a snapshot of it made now, or
		// the one made when this copy first opened it.
		name = copySnapshotName(copyID)
		if old, err := pool.Get(name); err == nil && old.Source != id.name {
			// The copy ID was used before for another volume (a target
			// that gave up on that copy): that snapshot is no use now.
			if s.open[objectID{pool: id.pool, name: name}.String()] > 0 {
				return nil, fmt.Errorf("copy %s is reading volume %s, not %s", copyID, old.Source, id.name)
			}
			if err := pool.Delete(ctx, name); err != nil {
				return nil, fmt.Errorf("deleting copy %s's snapshot of another volume: %w", copyID, err)
			}
		}
		if _, err := pool.Get(name); errors.Is(err, thinpool.ErrNotFound) {
			if _, err := pool.Snapshot(ctx, name, id.name); errors.Is(err, thinpool.ErrNoSpace) {
				// Final for the copy: no retry makes room on this node.
				return nil, fmt.Errorf("%w: volume %s cannot be snapshotted for the copy: %v", errNoSource, sourceID, err)
			} else if err != nil {
				return nil, fmt.Errorf("snapshotting volume %s for copy %s: %w", sourceID, copyID, err)
			}
			klog.FromContext(ctx).Info("Snapshotted a volume for a copy to another node", "volume", id, "copy", copyID, "snapshot", name)
		} else if err != nil {
			return nil, err
		}
	default:
		return nil, fmt.Errorf("%w: %s is a %s, which is not copied", errNoSource, sourceID, v.Kind)
	}
	key := objectID{pool: id.pool, name: name}.String()
	if name != id.name {
		// A volume's copy reads its snapshot, whose size is the one that
		// goes with its extents (the volume may have grown since).
		snap, err := pool.Get(name)
		if err != nil {
			return nil, err
		}
		v = snap
	}
	path, err := pool.Activate(ctx, name)
	if err != nil {
		return nil, fmt.Errorf("activating snapshot %s: %w", key, err)
	}
	s.open[key]++
	src := &snapshotSource{s: s, pool: pool, key: key, name: name, size: v.SizeBytes}
	fail := func(err error) (blockcopy.Source, error) {
		s.closeLocked(src)
		return nil, err
	}
	exts, err := pool.MappedExtents(ctx, name)
	if err != nil {
		return fail(fmt.Errorf("reading the blocks snapshot %s maps: %w", key, err))
	}
	for _, e := range exts {
		src.extents = append(src.extents, blockcopy.Extent{Offset: e.Offset, Length: e.Length})
	}
	if src.f, err = s.d.openDev(path, false); err != nil {
		return fail(fmt.Errorf("opening snapshot %s: %w", key, err))
	}
	klog.FromContext(ctx).V(2).Info("Serving a snapshot to a copy", "snapshot", key, "copy", copyID, "extents", len(src.extents))
	return src, nil
}

// Release deletes the snapshot a copy of a volume read; a copy of a
// snapshot keeps nothing but the open source, which the server closes.
func (s *copySource) Release(ctx context.Context, copyID string) error {
	name := copySnapshotName(copyID)
	s.mu.Lock()
	defer s.mu.Unlock()
	var errs []error
	for _, pool := range s.d.pools {
		if _, err := pool.Get(name); err != nil {
			continue
		}
		// A source still open keeps the device: the pool defers the
		// removal of an open device to its last close.
		if err := pool.Delete(ctx, name); err != nil && !errors.Is(err, thinpool.ErrNotFound) {
			errs = append(errs, fmt.Errorf("deleting copy %s's snapshot %s: %w", copyID, name, err))
		}
	}
	return errors.Join(errs...)
}

// reap deletes the snapshots made for copies that no copy has open and
// none has used since cutoff (a snapshot this driver has not seen used
// counts as used at its start).
func (s *copySource) reap(ctx context.Context, cutoff time.Time) error {
	var errs []error
	for _, pool := range s.d.pools {
		for _, v := range pool.List() {
			if !isCopySnapshotName(v.Name) {
				continue
			}
			key := objectID{pool: pool.Name(), name: v.Name}.String()
			s.mu.Lock()
			used, seen := s.lastUse[key]
			if !seen {
				used = s.started
			}
			if s.open[key] > 0 || used.After(cutoff) {
				s.mu.Unlock()
				continue
			}
			// Under s.mu: no copy opens it while it goes.
			err := pool.Delete(ctx, v.Name)
			delete(s.lastUse, key)
			s.mu.Unlock()
			if err != nil && !errors.Is(err, thinpool.ErrNotFound) {
				errs = append(errs, err)
			} else {
				klog.FromContext(ctx).Info("Deleted a snapshot made for a copy that was never released", "snapshot", key, "lastUsed", used)
			}
		}
	}
	return errors.Join(errs...)
}

// closeLocked closes src and deactivates its snapshot after the last
// copy; s.mu is held.
func (s *copySource) closeLocked(src *snapshotSource) error {
	var err error
	if src.f != nil {
		err = src.f.Close()
	}
	s.open[src.key]--
	s.lastUse[src.key] = time.Now()
	if s.open[src.key] > 0 {
		return err
	}
	delete(s.open, src.key)
	return errors.Join(err, src.pool.Deactivate(context.Background(), src.name))
}

type snapshotSource struct {
	s       *copySource
	pool    Pool
	key     string
	name    string
	size    int64
	extents []blockcopy.Extent
	f       deviceFile
	once    sync.Once
}

func (src *snapshotSource) ReadAt(p []byte, off int64) (int, error) { return src.f.ReadAt(p, off) }
func (src *snapshotSource) Size() int64                             { return src.size }
func (src *snapshotSource) Extents() []blockcopy.Extent             { return src.extents }

func (src *snapshotSource) Close() error {
	var err error
	src.once.Do(func() {
		src.s.mu.Lock()
		defer src.s.mu.Unlock()
		err = src.s.closeLocked(src)
	})
	return err
}
