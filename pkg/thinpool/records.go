package thinpool

import (
	"encoding/binary"
	"encoding/json"
	"fmt"
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
}

// op is what an intent was about to do.
type op string

const (
	opCreate   op = "create"   // create_thin
	opSnapshot op = "snapshot" // create_snap (snapshots and clones)
	opDelete   op = "delete"
)

// intent is written before a pool message and cleared after the commit.
type intent struct {
	Op  op     `json:"op"`
	TID uint64 `json:"tid"` // the transaction id the operation commits
	Vol Volume `json:"volume"`
	// OriginID is the origin's device id for a snapshot.
	OriginID uint32 `json:"originID,omitempty"`
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

// store is the record database. Every method is one bbolt transaction,
// committed (and fsynced) before it returns.
type store struct{ db *bolt.DB }

func openStore(path string) (*store, error) {
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
	return &store{db: db}, nil
}

func (s *store) close() error { return s.db.Close() }

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
		if c.intent != nil {
			if err := put(keyIntent, c.intent); err != nil {
				return err
			}
		}
		if c.clearIntent {
			if err := m.Delete(keyIntent); err != nil {
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
	})
}
