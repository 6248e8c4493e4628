package csi

import (
	"context"
	"errors"
	"fmt"
	"sync"

	"k8s.io/klog/v2"

	"github.com/csi-dmthin/csi-dmthin/pkg/blockcopy"
	"github.com/csi-dmthin/csi-dmthin/pkg/thinpool"
)

// errNoSource is a copy's source that is not on this node.
var errNoSource = blockcopy.ErrSourceNotFound

// CopySource is what this node serves to copies on other nodes: its
// snapshots, each read from its device while a copy has it open (the
// device is activated for the first copy and deactivated after the last),
// with the extents its thin device maps, from the pool's metadata.
func (d *Driver) CopySource() blockcopy.Opener {
	return &copySource{d: d, open: map[string]int{}}
}

type copySource struct {
	d    *Driver
	mu   sync.Mutex
	open map[string]int // pool/name -> sources open on it
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
	if v.Kind != thinpool.KindSnapshot {
		return nil, fmt.Errorf("%w: %s is a %s, not a snapshot", errNoSource, sourceID, v.Kind)
	}
	key := id.String()
	s.mu.Lock()
	defer s.mu.Unlock()
	path, err := pool.Activate(ctx, id.name)
	if err != nil {
		return nil, fmt.Errorf("activating snapshot %s: %w", key, err)
	}
	s.open[key]++
	src := &snapshotSource{s: s, pool: pool, key: key, name: id.name, size: v.SizeBytes}
	fail := func(err error) (blockcopy.Source, error) {
		s.closeLocked(src)
		return nil, err
	}
	exts, err := pool.MappedExtents(ctx, id.name)
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

// Release has nothing to drop: a snapshot's copy keeps nothing but the
// open source, which the server closes.
func (s *copySource) Release(context.Context, string) error { return nil }

// closeLocked closes src and deactivates its snapshot after the last
// copy; s.mu is held.
func (s *copySource) closeLocked(src *snapshotSource) error {
	var err error
	if src.f != nil {
		err = src.f.Close()
	}
	s.open[src.key]--
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
