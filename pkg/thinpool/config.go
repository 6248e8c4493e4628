package thinpool

import (
	"errors"
	"fmt"
	"path/filepath"
	"regexp"

	"github.com/csi-dmthin/csi-dmthin/pkg/devmapper"
)

// Config describes one pool. A pool's shape (block size, devices, zeroing)
// is fixed when it is created and stored; a later Open with a Config that
// disagrees is refused with ErrMismatch naming the field.
type Config struct {
	// Name names the pool on this node: 1 to 32 of [a-z0-9-], starting with
	// a letter. dm devices are called dmthin-<Name> and dmthin-<Name>-<volume>.
	Name string
	// StateDir holds the record database, <StateDir>/<Name>.db. It must not
	// be on the pool.
	StateDir string

	// Either a data and a metadata block device...
	DataDevice     string
	MetadataDevice string
	// ...or sparse files attached to loop devices, made with these sizes
	// if missing. For demos and tests only: a loop file on a node's root
	// filesystem is neither fast nor crash-proof.
	DataFile          string
	MetadataFile      string
	DataFileBytes     int64
	MetadataFileBytes int64 // 0: sized by MetadataBytesFor

	// BlockSectors is the pool's data block size in 512-byte sectors:
	// 128 (64 KiB, the default) to 2097152, a multiple of 128.
	BlockSectors uint32
	// LowWaterBlocks raises a kernel event when free data blocks fall under
	// it. When it is 0, the mark is LowWaterPercent of the data blocks
	// (default 1%), worked out again whenever the pool grows.
	LowWaterBlocks  uint64
	LowWaterPercent float64
	// SkipBlockZeroing makes first writes to new blocks faster, but a new
	// volume may then show data a deleted volume left in a block it reuses,
	// wherever it has not written the whole block itself. Leave it off on any
	// pool shared between tenants or used for raw block volumes.
	SkipBlockZeroing bool
	// QueueIfNoSpace makes writes to a full pool wait (up to the kernel's
	// no_space_timeout, 60 s) instead of failing at once. The default,
	// error_if_no_space, fails fast: queued writers hang, and XFS retries
	// forever.
	QueueIfNoSpace bool
	// Wipe lets a new pool be made on devices that hold something (a
	// filesystem, LVM, a partition table, another pool, data): their first
	// and last MiB are erased first. Without it such devices are refused.
	// It matters only when the pool is made.
	Wipe bool

	// Admission (admission.go): a new device is refused with ErrNoSpace
	// when the free data or metadata is at or under these percentages of
	// the pool, or when the sizes of the volumes, snapshots and templates
	// would pass OverprovisionRatio times the data size. Zero values take
	// the defaults (10%, 10%, 10.0); a negative ratio turns the ratio check
	// off.
	MinFreeDataPercent     float64
	MinFreeMetadataPercent float64
	OverprovisionRatio     float64
}

// SectorSize is the unit of BlockSectors (and of every dm size): 512 bytes.
const SectorSize = devmapper.SectorSize

var poolNameRE = regexp.MustCompile(`^[a-z][a-z0-9-]{0,31}$`)

const (
	defaultMinFreePercent     = 10
	defaultOverprovisionRatio = 10
	defaultLowWaterPercent    = 1
)

// FieldError is one problem with one field of a Config. Field is the
// Config field's name in lowerCamel case ("dataFileBytes"); Err wraps
// ErrInvalid.
type FieldError struct {
	Field string
	Err   error
}

func (e *FieldError) Error() string { return e.Field + ": " + e.Err.Error() }
func (e *FieldError) Unwrap() error { return e.Err }

// Check returns every problem with c that can be found without the kernel
// or the devices: each a *FieldError, in field order; none when c is valid
// (zero values stand for their defaults). Open runs it first.
func (c Config) Check() []error {
	var errs []error
	bad := func(field, format string, a ...any) {
		errs = append(errs, &FieldError{Field: field, Err: fmt.Errorf("%w: "+format, append([]any{ErrInvalid}, a...)...)})
	}
	if !poolNameRE.MatchString(c.Name) {
		bad("name", "%q: want 1 to 32 of [a-z0-9-] starting with a letter", c.Name)
	}
	if c.StateDir == "" {
		bad("stateDir", "empty")
	}
	devs := c.DataDevice != "" || c.MetadataDevice != ""
	files := c.DataFile != "" || c.MetadataFile != ""
	switch {
	case devs && files:
		bad("dataDevice", "give either devices or loop files, not both")
	case devs && c.DataDevice == "":
		bad("dataDevice", "missing: a pool on devices needs a data and a metadata device")
	case devs && c.MetadataDevice == "":
		bad("metadataDevice", "missing: a pool on devices needs a data and a metadata device")
	case files && c.DataFile == "":
		bad("dataFile", "missing: a loop-file pool needs a data file")
	case files && c.MetadataFile == "":
		bad("metadataFile", "missing: a loop-file pool needs a metadata file")
	case !devs && !files:
		bad("dataDevice", "no data and metadata devices or files")
	}
	for _, p := range []struct{ field, path string }{
		{"dataDevice", c.DataDevice}, {"metadataDevice", c.MetadataDevice},
		{"dataFile", c.DataFile}, {"metadataFile", c.MetadataFile},
	} {
		if p.path != "" && !filepath.IsAbs(p.path) {
			bad(p.field, "%q is not an absolute path", p.path)
		}
	}
	switch {
	case c.DataDevice != "" && c.DataDevice == c.MetadataDevice:
		bad("metadataDevice", "%s is the data device too: the pool needs two devices", c.MetadataDevice)
	case c.DataFile != "" && filepath.Clean(c.DataFile) == filepath.Clean(c.MetadataFile):
		bad("metadataFile", "%s is the data file too", c.MetadataFile)
	}
	if c.DataFileBytes < 0 {
		bad("dataFileBytes", "negative")
	}
	if c.MetadataFileBytes < 0 {
		bad("metadataFileBytes", "negative")
	}
	if devs && (c.DataFileBytes != 0 || c.MetadataFileBytes != 0) {
		bad("dataFileBytes", "file sizes are for loop-file pools; a device's size is the device's")
	}
	if bs := c.BlockSectors; bs != 0 {
		if err := (devmapper.ThinPoolParams{MetadataDev: 1, DataDev: 1, BlockSectors: bs}).Validate(); err != nil {
			bad("blockSectors", "%d sectors (%d bytes): want 64 KiB to 1 GiB in multiples of 64 KiB", bs, int64(bs)*devmapper.SectorSize)
		}
	}
	if c.LowWaterBlocks != 0 && c.LowWaterPercent != 0 {
		bad("lowWaterPercent", "give the low water mark in blocks or as a percentage, not both")
	}
	if c.LowWaterPercent < 0 || c.LowWaterPercent >= 100 {
		bad("lowWaterPercent", "%v%%: want more than 0 and less than 100", c.LowWaterPercent)
	}
	for _, f := range []struct {
		field string
		v     float64
	}{{"minFreeDataPercent", c.MinFreeDataPercent}, {"minFreeMetadataPercent", c.MinFreeMetadataPercent}} {
		if f.v < 0 || f.v >= 100 {
			bad(f.field, "%v%%: want 0 to 100 (0 means %d)", f.v, defaultMinFreePercent)
		}
	}
	return errs
}

// validate checks c and fills in the defaults; the first problem is the
// error, naming the pool.
func (c *Config) validate() error {
	if errs := c.Check(); len(errs) > 0 {
		var fe *FieldError
		if errors.As(errs[0], &fe) && fe.Field == "name" {
			return fmt.Errorf("pool name: %w", fe.Err)
		}
		return fmt.Errorf("pool %s: %w", c.Name, errs[0])
	}
	if c.BlockSectors == 0 {
		c.BlockSectors = 128
	}
	for _, p := range []*float64{&c.MinFreeDataPercent, &c.MinFreeMetadataPercent} {
		if *p == 0 {
			*p = defaultMinFreePercent
		}
	}
	if c.OverprovisionRatio == 0 {
		c.OverprovisionRatio = defaultOverprovisionRatio
	}
	return nil
}

// lowWaterBlocks is the pool's low water mark for a data device of
// dataBlocks blocks: LowWaterBlocks, or LowWaterPercent of the blocks
// (default 1%), at least 1.
func (c *Config) lowWaterBlocks(dataBlocks uint64) uint64 {
	if c.LowWaterBlocks != 0 {
		return c.LowWaterBlocks
	}
	pct := c.LowWaterPercent
	if pct == 0 {
		pct = defaultLowWaterPercent
	}
	return max(uint64(float64(dataBlocks)*pct/100), 1)
}

// MetadataBytesFor sizes a metadata device for a data device, following the
// kernel's thin-provisioning.rst rule of thumb (48 bytes per data block)
// doubled for snapshots' shared mappings, and clamped to what the kernel
// uses: at least 4 MiB, at most 16 GiB.
func MetadataBytesFor(dataBytes int64, blockSectors uint32) int64 {
	blocks := dataBytes / (int64(blockSectors) * devmapper.SectorSize)
	b := 2 * 48 * blocks
	b = max(b, 4<<20)
	b = min(b, 16<<30)
	return (b + 1<<20 - 1) &^ (1<<20 - 1)
}
