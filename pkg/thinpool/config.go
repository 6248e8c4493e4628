package thinpool

import (
	"fmt"
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
	// it; default 1% of the data blocks.
	LowWaterBlocks uint64
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

	// Admission: a new volume or snapshot is refused with ErrNoSpace when
	// free data or metadata would fall under these percentages of the pool,
	// or when the sum of volume sizes would pass OverprovisionRatio times the
	// data size. Zero values take the defaults (10%, 10%, 10.0); a negative
	// ratio turns the ratio check off.
	MinFreeDataPercent     float64
	MinFreeMetadataPercent float64
	OverprovisionRatio     float64
}

var poolNameRE = regexp.MustCompile(`^[a-z][a-z0-9-]{0,31}$`)

const (
	defaultMinFreePercent     = 10
	defaultOverprovisionRatio = 10
)

func (c *Config) validate() error {
	if !poolNameRE.MatchString(c.Name) {
		return fmt.Errorf("%w: pool name %q: want 1 to 32 of [a-z0-9-] starting with a letter", ErrInvalid, c.Name)
	}
	if c.StateDir == "" {
		return fmt.Errorf("%w: pool %s: state directory is empty", ErrInvalid, c.Name)
	}
	devs := c.DataDevice != "" || c.MetadataDevice != ""
	files := c.DataFile != "" || c.MetadataFile != ""
	switch {
	case devs && files:
		return fmt.Errorf("%w: pool %s: give either devices or loop files, not both", ErrInvalid, c.Name)
	case devs && (c.DataDevice == "" || c.MetadataDevice == ""):
		return fmt.Errorf("%w: pool %s: needs both a data and a metadata device", ErrInvalid, c.Name)
	case files && (c.DataFile == "" || c.MetadataFile == ""):
		return fmt.Errorf("%w: pool %s: needs both a data and a metadata file", ErrInvalid, c.Name)
	case !devs && !files:
		return fmt.Errorf("%w: pool %s: no data and metadata devices or files", ErrInvalid, c.Name)
	}
	if c.DataFileBytes < 0 || c.MetadataFileBytes < 0 {
		return fmt.Errorf("%w: pool %s: negative file size", ErrInvalid, c.Name)
	}
	if c.BlockSectors == 0 {
		c.BlockSectors = 128
	}
	if err := (devmapper.ThinPoolParams{MetadataDev: 1, DataDev: 1, BlockSectors: c.BlockSectors}).Validate(); err != nil {
		return fmt.Errorf("%w: pool %s: %v", ErrInvalid, c.Name, err)
	}
	for _, p := range []*float64{&c.MinFreeDataPercent, &c.MinFreeMetadataPercent} {
		if *p == 0 {
			*p = defaultMinFreePercent
		}
		if *p < 0 || *p >= 100 {
			return fmt.Errorf("%w: pool %s: free-space floor %v%% must be 0 to 100", ErrInvalid, c.Name, *p)
		}
	}
	if c.OverprovisionRatio == 0 {
		c.OverprovisionRatio = defaultOverprovisionRatio
	}
	return nil
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
