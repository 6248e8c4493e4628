package blockcopy

import (
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"time"
)

// Checkpoint is a copy's progress on the target node.
type Checkpoint struct {
	CopyID        string `json:"copyID"`
	SourceID      string `json:"sourceID"`
	ExtentsSHA256 string `json:"extentsSHA256"`
	// Next is a byte offset of the device: every mapped byte before it
	// is durable on the target (Sync returned before this was saved).
	Next int64 `json:"next"`
	// Done is set once the target verified against the source's digest.
	Done bool `json:"done"`
	// SHA256 is the verified digest, set with Done.
	SHA256    string    `json:"sha256,omitempty"`
	UpdatedAt time.Time `json:"updatedAt"`
}

// Checkpoints keeps checkpoints by copy ID.
type Checkpoints interface {
	// Load returns the checkpoint of copyID; false, and no error, when
	// there is none.
	Load(copyID string) (Checkpoint, bool, error)
	// Save replaces the checkpoint of cp.CopyID; when it returns nil the
	// checkpoint is durable.
	Save(cp Checkpoint) error
	// Delete drops the checkpoint of copyID; it is not an error when
	// there is none.
	Delete(copyID string) error
}

// CheckpointDir keeps each copy's checkpoint in <dir>/<copyID>.json.
type CheckpointDir struct {
	dir string
	// beforeRename is a test hook: see writeFileAtomic.
	beforeRename func() error
}

var _ Checkpoints = (*CheckpointDir)(nil)

// DirCheckpoints returns the checkpoints kept in dir, creating it (0700)
// when missing.
func DirCheckpoints(dir string) (*CheckpointDir, error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("create checkpoint directory: %w", err)
	}
	return &CheckpointDir{dir: dir}, nil
}

func (d *CheckpointDir) path(copyID string) (string, error) {
	// The ID is a file name: validateID keeps it from being "..", from
	// holding a separator and from hiding among the temporary files.
	if err := validateID("copyID", copyID); err != nil {
		return "", err
	}
	return filepath.Join(d.dir, copyID+".json"), nil
}

// Load implements Checkpoints.
func (d *CheckpointDir) Load(copyID string) (Checkpoint, bool, error) {
	p, err := d.path(copyID)
	if err != nil {
		return Checkpoint{}, false, err
	}
	data, err := os.ReadFile(p)
	if errors.Is(err, fs.ErrNotExist) {
		return Checkpoint{}, false, nil
	}
	if err != nil {
		return Checkpoint{}, false, fmt.Errorf("read checkpoint: %w", err)
	}
	var cp Checkpoint
	if err := json.Unmarshal(data, &cp); err != nil {
		return Checkpoint{}, false, fmt.Errorf("parse checkpoint %s: %w", p, err)
	}
	if cp.CopyID != copyID {
		return Checkpoint{}, false, fmt.Errorf("checkpoint %s is of copy %q", p, cp.CopyID)
	}
	return cp, true, nil
}

// Save implements Checkpoints.
func (d *CheckpointDir) Save(cp Checkpoint) error {
	p, err := d.path(cp.CopyID)
	if err != nil {
		return err
	}
	data, err := json.Marshal(cp)
	if err != nil {
		return fmt.Errorf("encode checkpoint: %w", err)
	}
	return writeFileAtomic(p, data, 0o600, d.beforeRename)
}

// Delete implements Checkpoints.
func (d *CheckpointDir) Delete(copyID string) error {
	p, err := d.path(copyID)
	if err != nil {
		return err
	}
	if err := os.Remove(p); err != nil {
		if errors.Is(err, fs.ErrNotExist) {
			return nil
		}
		return fmt.Errorf("delete checkpoint: %w", err)
	}
	return syncDir(d.dir)
}
