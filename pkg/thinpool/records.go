package thinpool

import (
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"

	bolt "go.etcd.io/bbolt"
)

// Kind tells a volume from a snapshot and from a template.
type Kind string

const (
	KindVolume   Kind = "volume"
	KindSnapshot Kind = "snapshot"
	// KindTemplate is a base device that volumes are cloned from, such as
	// a freshly formatted filesystem of one size. It is not counted as a
	// volume, nor its size as provisioned: only the blocks it maps use
	// the pool.
	KindTemplate Kind = "template"
)

// Volume is the record of one thin device.
type Volume struct {
	Name      string    `json:"name"`
	DeviceID  uint32    `json:"deviceID"`
	SizeBytes int64     `json:"sizeBytes"`
	Kind      Kind      `json:"kind"`
	Source    string    `json:"source,omitempty"` // what it was snapshotted or cloned from
	CreatedAt time.Time `json:"createdAt"`
	// Active: the volume should be active; Open reactivates it after a reboot.
	Active bool `json:"active,omitempty"`
	// Deleting: a delete is pending until the device's last opener closes it.
	Deleting bool `json:"deleting,omitempty"`
	// Sealed: a template's content is complete (SealTemplate). Only a
	// sealed template can be cloned; Open deletes one left unsealed by a
	// crash.
	Sealed bool `json:"sealed,omitempty"`
	// Group names the group snapshot (SnapshotGroup) a snapshot was made
	// in, with the others of the same moment.
	Group string `json:"group,omitempty"`
}

// poolRecord is the stored shape of the pool, fixed at creation.
type poolRecord struct {
	Version  int    `json:"version"`
	Name     string `json:"name"`
	Identity string `json:"identity"` // random, in every dm UUID of the pool
	// Exactly one pair is set, as in Config.
	DataDevice     string `json:"dataDevice,omitempty"`
	MetadataDevice string `json:"metadataDevice,omitempty"`
	DataFile       string `json:"dataFile,omitempty"`
	MetadataFile   string `json:"metadataFile,omitempty"`

	DataBytes        int64     `json:"dataBytes"`
	MetadataBytes    int64     `json:"metadataBytes"`
	BlockSectors     uint32    `json:"blockSectors"`
	SkipBlockZeroing bool      `json:"skipBlockZeroing"`
	CreatedAt        time.Time `json:"createdAt"`
	// The serials of the devices (Kernel.Serial) when the pool was made;
	// empty for a device that has none.
	DataSerial     string `json:"dataSerial,omitempty"`
	MetadataSerial string `json:"metadataSerial,omitempty"`
	// Marker: thin device 0 holds the pool's marker (identity.go). Pools
	// made before markers get one when they are next opened.
	Marker bool `json:"marker,omitempty"`
}

// op is what an intent was about to do.
type op string

const (
	opCreate   op = "create"   // create_thin
	opSnapshot op = "snapshot" // create_snap (snapshots and clones)
	opDelete   op = "delete"
	// opMarker writes the marker of a pool made before markers existed.
	opMarker op = "marker"
	// opGroup makes several snapshots at one commit (create_snap each).
	opGroup op = "group-snapshot"
)

// intent is written before a pool message and cleared after the commit.
type intent struct {
	Op  op     `json:"op"`
	TID uint64 `json:"tid"` // the transaction id the operation commits
	Vol Volume `json:"volume"`
	// OriginID is the origin's device id for a snapshot.
	OriginID uint32 `json:"originID,omitempty"`
	// Group holds a group snapshot's members; Vol is unused then.
	Group []groupMember `json:"group,omitempty"`
}

// groupMember is one snapshot of a group snapshot's intent.
type groupMember struct {
	Vol      Volume `json:"volume"`
	OriginID uint32 `json:"originID"`
}

// devices returns the thin ids the intent creates or deletes.
func (in *intent) devices() []uint32 {
	if in.Op != opGroup {
		return []uint32{in.Vol.DeviceID}
	}
	ids := make([]uint32, len(in.Group))
	for i, m := range in.Group {
		ids[i] = m.Vol.DeviceID
	}
	return ids
}

// what names the intent's object for messages.
func (in *intent) what() string {
	if in.Op != opGroup {
		return in.Vol.Name
	}
	names := make([]string, len(in.Group))
	for i, m := range in.Group {
		names[i] = m.Vol.Name
	}
	return strings.Join(names, ", ")
}

var (
	bucketMeta    = []byte("meta")
	bucketVolumes = []byte("volumes")
	keyPool       = []byte("pool")
	keyTID        = []byte("tid")
	keyNextID     = []byte("nextID")
	keyIntent     = []byte("intent")
	keySuspects   = []byte("suspects")
)

// records is the record database as a Pool uses it. *store is the real
// one; tests wrap it to make its calls fail.
type records interface {
	// load reads everything at once.
	load() (*state, error)
	// apply writes a change in one transaction, committed and fsynced
	// before it returns. An error means the change may or may not have
	// reached the disk.
	apply(c change) error
	// rewrite replaces the database with a new file holding exactly s,
	// fsynced and renamed into place, and goes on with it. After a failed
	// write nothing on disk can be trusted (a failed fsync may have dropped
	// dirty pages that the page cache still shows), so recovery writes
	// what it verified, whole, to a file of its own.
	rewrite(s *state) error
	close() error
}

// store is the record database. Every method is one bbolt transaction,
// committed (and fsynced) before it returns.
type store struct {
	path string
	db   *bolt.DB
}

var _ records = (*store)(nil)

// errInvariant: a change would break a rule of the records; it is a bug in
// the caller, and nothing is written.
var errInvariant = errors.New("records invariant")

func openStore(path string) (*store, error) {
	db, err := openDB(path)
	if err != nil {
		return nil, err
	}
	return &store{path: path, db: db}, nil
}

func openDB(path string) (*bolt.DB, error) {
	db, err := bolt.Open(path, 0o600, &bolt.Options{Timeout: 2 * time.Second})
	if err != nil {
		return nil, fmt.Errorf("open records %s (is another csi-dmthin using this pool?): %w", path, err)
	}
	err = db.Update(func(tx *bolt.Tx) error {
		for _, b := range [][]byte{bucketMeta, bucketVolumes} {
			if _, err := tx.CreateBucketIfNotExists(b); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		db.Close()
		return nil, err
	}
	return db, nil
}

func (s *store) close() error { return s.db.Close() }

func (s *store) rewrite(st *state) error {
	tmp := s.path + ".new"
	if err := os.Remove(tmp); err != nil && !errors.Is(err, os.ErrNotExist) {
		return err
	}
	db, err := openDB(tmp)
	if err != nil {
		return err
	}
	c := change{pool: st.pool, tid: &st.tid, nextID: &st.nextID, intent: st.intent, suspects: &st.suspects}
	for _, v := range st.volumes {
		c.put = append(c.put, v)
	}
	if err := db.Update(func(tx *bolt.Tx) error { return writeChange(tx, c) }); err != nil {
		db.Close()
		return fmt.Errorf("write %s: %w", tmp, err)
	}
	if err := db.Close(); err != nil {
		return err
	}
	if err := os.Rename(tmp, s.path); err != nil {
		return err
	}
	if err := syncDir(filepath.Dir(s.path)); err != nil {
		return err
	}
	_ = s.db.Close() // the old file is gone from the directory
	if s.db, err = openDB(s.path); err != nil {
		return err
	}
	return nil
}

// syncDir makes a rename in dir durable.
func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer d.Close()
	return d.Sync()
}

// state is everything the store holds, loaded at once on open.
type state struct {
	pool     *poolRecord
	tid      uint64
	nextID   uint32
	intent   *intent
	suspects []uint32
	volumes  map[string]*Volume
}

func (s *store) load() (*state, error) {
	st := &state{volumes: map[string]*Volume{}}
	err := s.db.View(func(tx *bolt.Tx) error {
		m := tx.Bucket(bucketMeta)
		if v := m.Get(keyPool); v != nil {
			st.pool = &poolRecord{}
			if err := json.Unmarshal(v, st.pool); err != nil {
				return fmt.Errorf("pool record: %w", err)
			}
		}
		if v := m.Get(keyTID); len(v) == 8 {
			st.tid = binary.BigEndian.Uint64(v)
		}
		if v := m.Get(keyNextID); len(v) == 4 {
			st.nextID = binary.BigEndian.Uint32(v)
		}
		if v := m.Get(keyIntent); v != nil {
			st.intent = &intent{}
			if err := json.Unmarshal(v, st.intent); err != nil {
				return fmt.Errorf("intent record: %w", err)
			}
		}
		if v := m.Get(keySuspects); v != nil {
			if err := json.Unmarshal(v, &st.suspects); err != nil {
				return fmt.Errorf("suspect ids: %w", err)
			}
		}
		return tx.Bucket(bucketVolumes).ForEach(func(k, v []byte) error {
			vol := &Volume{}
			if err := json.Unmarshal(v, vol); err != nil {
				return fmt.Errorf("volume record %q: %w", k, err)
			}
			st.volumes[vol.Name] = vol
			return nil
		})
	})
	return st, err
}

// change is a set of writes applied in one transaction.
type change struct {
	pool        *poolRecord
	tid         *uint64
	nextID      *uint32
	intent      *intent
	clearIntent bool
	suspects    *[]uint32
	put         []*Volume
	del         []string
}

func (s *store) apply(c change) error {
	return s.db.Update(func(tx *bolt.Tx) error {
		if err := checkChange(tx, c); err != nil {
			return err
		}
		return writeChange(tx, c)
	})
}

// checkChange enforces what must hold whatever the caller does: an intent
// is never written over a pending one, the transaction id never goes back
// (but while the pool is being made, at 0), a pool keeps its identity, and
// a record keeps its thin id and kind for as long as it exists.
func checkChange(tx *bolt.Tx, c change) error {
	m := tx.Bucket(bucketMeta)
	if c.intent != nil && m.Get(keyIntent) != nil && !c.clearIntent {
		return fmt.Errorf("%w: an intent to %s is written while another is pending", errInvariant, c.intent.Op)
	}
	if c.tid != nil {
		if old := m.Get(keyTID); len(old) == 8 {
			if o := binary.BigEndian.Uint64(old); o != 0 && *c.tid <= o {
				return fmt.Errorf("%w: transaction id %d after %d", errInvariant, *c.tid, o)
			}
		}
	}
	if c.pool != nil {
		if old := m.Get(keyPool); old != nil {
			var r poolRecord
			if err := json.Unmarshal(old, &r); err != nil {
				return fmt.Errorf("pool record: %w", err)
			}
			if r.Identity != c.pool.Identity || r.Name != c.pool.Name {
				return fmt.Errorf("%w: pool %s (%s) rewritten as %s (%s)", errInvariant, r.Name, r.Identity, c.pool.Name, c.pool.Identity)
			}
		}
	}
	vb := tx.Bucket(bucketVolumes)
	for _, v := range c.put {
		old := vb.Get([]byte(v.Name))
		if old == nil {
			continue
		}
		var o Volume
		if err := json.Unmarshal(old, &o); err != nil {
			return fmt.Errorf("volume record %q: %w", v.Name, err)
		}
		if o.DeviceID != v.DeviceID || o.Kind != v.Kind {
			return fmt.Errorf("%w: %s, a %s with thin id %d, rewritten as a %s with thin id %d", errInvariant, v.Name, o.Kind, o.DeviceID, v.Kind, v.DeviceID)
		}
	}
	return nil
}

func writeChange(tx *bolt.Tx, c change) error {
	m := tx.Bucket(bucketMeta)
	put := func(k []byte, v any) error {
		b, err := json.Marshal(v)
		if err != nil {
			return err
		}
		return m.Put(k, b)
	}
	if c.pool != nil {
		if err := put(keyPool, c.pool); err != nil {
			return err
		}
	}
	if c.tid != nil {
		if err := m.Put(keyTID, binary.BigEndian.AppendUint64(nil, *c.tid)); err != nil {
			return err
		}
	}
	if c.nextID != nil {
		if err := m.Put(keyNextID, binary.BigEndian.AppendUint32(nil, *c.nextID)); err != nil {
			return err
		}
	}
	if c.clearIntent {
		if err := m.Delete(keyIntent); err != nil {
			return err
		}
	}
	if c.intent != nil {
		if err := put(keyIntent, c.intent); err != nil {
			return err
		}
	}
	if c.suspects != nil {
		if err := put(keySuspects, *c.suspects); err != nil {
			return err
		}
	}
	vb := tx.Bucket(bucketVolumes)
	for _, v := range c.put {
		b, err := json.Marshal(v)
		if err != nil {
			return err
		}
		if err := vb.Put([]byte(v.Name), b); err != nil {
			return err
		}
	}
	for _, name := range c.del {
		if err := vb.Delete([]byte(name)); err != nil {
			return err
		}
	}
	return nil
}
