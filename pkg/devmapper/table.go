package devmapper

import (
	"fmt"
	"strconv"
	"strings"
)

// SectorSize is the unit of every length and offset in a dm table.
const SectorSize = 512

// Target is one line of a dm table: "start length type params", the sectors
// it covers and the target type's own parameters.
type Target struct {
	StartSector   uint64
	LengthSectors uint64
	Type          string // at most 15 bytes, e.g. "thin-pool"
	Params        string
}

// String formats the target the way dmsetup prints a table line.
func (t Target) String() string {
	return fmt.Sprintf("%d %d %s %s", t.StartSector, t.LengthSectors, t.Type, t.Params)
}

// Params is a typed parameter set of one target type.
type Params interface {
	// TargetType is the kernel's name of the target, e.g. "thin".
	TargetType() string
	// String is the parameter string the kernel's constructor parses.
	String() string
}

// NewTarget makes a Target from typed parameters.
func NewTarget(startSector, lengthSectors uint64, p Params) Target {
	return Target{StartSector: startSector, LengthSectors: lengthSectors, Type: p.TargetType(), Params: p.String()}
}

// ParseTarget parses "start length type params...".
func ParseTarget(line string) (Target, error) {
	f := strings.Fields(line)
	if len(f) < 3 {
		return Target{}, fmt.Errorf("%w target %q: want start, length and type", ErrParse, line)
	}
	start, err := strconv.ParseUint(f[0], 10, 64)
	if err != nil {
		return Target{}, fmt.Errorf("%w target %q: start: %v", ErrParse, line, err)
	}
	length, err := strconv.ParseUint(f[1], 10, 64)
	if err != nil {
		return Target{}, fmt.Errorf("%w target %q: length: %v", ErrParse, line, err)
	}
	return Target{StartSector: start, LengthSectors: length, Type: f[2], Params: strings.Join(f[3:], " ")}, nil
}

// Block sizes the thin-pool target accepts, in sectors (64 KiB to 1 GiB, in
// multiples of 64 KiB).
const (
	MinPoolBlockSectors      = 128
	MaxPoolBlockSectors      = 2097152
	PoolBlockSectorsMultiple = 128
)

// MaxDeviceID is the largest thin device id: the kernel's ids are 24 bits.
const MaxDeviceID = 1<<24 - 1

// ThinPoolFeatures are the optional arguments of a thin-pool table. Their zero
// value is the kernel's default: zero new blocks, discards passed down, queue
// I/O when the data device is full.
type ThinPoolFeatures struct {
	// SkipBlockZeroing stops the pool zeroing newly provisioned blocks. Faster
	// first writes, but a partial write to a new block can expose what a
	// deleted device left there.
	SkipBlockZeroing bool
	// IgnoreDiscard disables discard support altogether.
	IgnoreDiscard bool
	// NoDiscardPassdown frees pool blocks on discard without passing the
	// discard down to the data device.
	NoDiscardPassdown bool
	// ReadOnly refuses metadata changes; used for repair.
	ReadOnly bool
	// ErrorIfNoSpace fails I/O at once when the data device is full instead
	// of queueing it (up to no_space_timeout) in the hope the pool grows.
	ErrorIfNoSpace bool
}

var poolFeatureNames = []string{"skip_block_zeroing", "ignore_discard", "no_discard_passdown", "read_only", "error_if_no_space"}

func (f *ThinPoolFeatures) flags() []*bool {
	return []*bool{&f.SkipBlockZeroing, &f.IgnoreDiscard, &f.NoDiscardPassdown, &f.ReadOnly, &f.ErrorIfNoSpace}
}

// ThinPoolParams are a thin-pool table's parameters:
//
//	<metadata dev> <data dev> <data block size> <low water mark> <#features> <feature>...
type ThinPoolParams struct {
	MetadataDev Dev
	DataDev     Dev
	// BlockSectors is the data block size in sectors, fixed for the pool's
	// life: MinPoolBlockSectors to MaxPoolBlockSectors, a multiple of 128.
	BlockSectors uint32
	// LowWaterBlocks raises a dm event once when free data blocks fall below it.
	LowWaterBlocks uint64
	Features       ThinPoolFeatures
}

// TargetType implements Params.
func (p ThinPoolParams) TargetType() string { return "thin-pool" }

// String implements Params. Features are written in the order the kernel
// itself prints them, always with their count (which may be 0).
func (p ThinPoolParams) String() string {
	var feats []string
	for i, on := range p.Features.flags() {
		if *on {
			feats = append(feats, poolFeatureNames[i])
		}
	}
	s := fmt.Sprintf("%s %s %d %d %d", p.MetadataDev, p.DataDev, p.BlockSectors, p.LowWaterBlocks, len(feats))
	if len(feats) > 0 {
		s += " " + strings.Join(feats, " ")
	}
	return s
}

// Validate reports parameters the kernel would refuse.
func (p ThinPoolParams) Validate() error {
	if p.BlockSectors < MinPoolBlockSectors || p.BlockSectors > MaxPoolBlockSectors || p.BlockSectors%PoolBlockSectorsMultiple != 0 {
		return fmt.Errorf("%w: thin-pool block size %d sectors: want %d to %d in multiples of %d",
			ErrInvalid, p.BlockSectors, MinPoolBlockSectors, MaxPoolBlockSectors, PoolBlockSectorsMultiple)
	}
	if p.MetadataDev == 0 || p.DataDev == 0 {
		return fmt.Errorf("%w: thin-pool needs a metadata and a data device", ErrInvalid)
	}
	return nil
}

// ParseThinPoolParams parses a thin-pool parameter string, as given to the
// kernel or as read back from it.
func ParseThinPoolParams(s string) (ThinPoolParams, error) {
	f := strings.Fields(s)
	bad := func(what string, err error) (ThinPoolParams, error) {
		if err != nil {
			return ThinPoolParams{}, fmt.Errorf("%w thin-pool params %q: %s: %v", ErrParse, s, what, err)
		}
		return ThinPoolParams{}, fmt.Errorf("%w thin-pool params %q: %s", ErrParse, s, what)
	}
	if len(f) < 4 {
		return bad("want metadata dev, data dev, block size and low water mark", nil)
	}
	var p ThinPoolParams
	var err error
	if p.MetadataDev, err = ParseDev(f[0]); err != nil {
		return bad("metadata device", err)
	}
	if p.DataDev, err = ParseDev(f[1]); err != nil {
		return bad("data device", err)
	}
	bs, err := strconv.ParseUint(f[2], 10, 32)
	if err != nil {
		return bad("block size", err)
	}
	p.BlockSectors = uint32(bs)
	if p.LowWaterBlocks, err = strconv.ParseUint(f[3], 10, 64); err != nil {
		return bad("low water mark", err)
	}
	if len(f) == 4 {
		return p, nil
	}
	n, err := strconv.Atoi(f[4])
	if err != nil || n < 0 {
		return bad("feature count", err)
	}
	if len(f) != 5+n {
		return bad(fmt.Sprintf("feature count %d but %d features", n, len(f)-5), nil)
	}
	flags := p.Features.flags()
next:
	for _, name := range f[5:] {
		for i, known := range poolFeatureNames {
			if name == known {
				if *flags[i] {
					return bad("feature "+name+" given twice", nil)
				}
				*flags[i] = true
				continue next
			}
		}
		return bad("unknown feature "+name, nil)
	}
	return p, nil
}

// ThinParams are a thin target's parameters:
//
//	<pool dev> <device id> [<external origin dev>]
type ThinParams struct {
	PoolDev  Dev
	DeviceID uint32
	// ExternalOrigin, when not zero, is a read-only device whose blocks show
	// through wherever the thin device has not been written.
	ExternalOrigin Dev
}

// TargetType implements Params.
func (p ThinParams) TargetType() string { return "thin" }

// String implements Params.
func (p ThinParams) String() string {
	s := fmt.Sprintf("%s %d", p.PoolDev, p.DeviceID)
	if p.ExternalOrigin != 0 {
		s += " " + p.ExternalOrigin.String()
	}
	return s
}

// ParseThinParams parses a thin target's parameter string.
func ParseThinParams(s string) (ThinParams, error) {
	f := strings.Fields(s)
	if len(f) != 2 && len(f) != 3 {
		return ThinParams{}, fmt.Errorf("%w thin params %q: want pool dev, device id and an optional origin", ErrParse, s)
	}
	var p ThinParams
	var err error
	if p.PoolDev, err = ParseDev(f[0]); err != nil {
		return ThinParams{}, fmt.Errorf("%w thin params %q: pool: %v", ErrParse, s, err)
	}
	id, err := strconv.ParseUint(f[1], 10, 32)
	if err != nil || id > MaxDeviceID {
		return ThinParams{}, fmt.Errorf("%w thin params %q: device id must be 0 to %d", ErrParse, s, MaxDeviceID)
	}
	p.DeviceID = uint32(id)
	if len(f) == 3 {
		if p.ExternalOrigin, err = ParseDev(f[2]); err != nil {
			return ThinParams{}, fmt.Errorf("%w thin params %q: origin: %v", ErrParse, s, err)
		}
		if p.ExternalOrigin == 0 {
			return ThinParams{}, fmt.Errorf("%w thin params %q: origin 0:0", ErrParse, s)
		}
	}
	return p, nil
}

// LinearParams are a linear target's parameters: <dev> <offset sectors>.
type LinearParams struct {
	Dev           Dev
	OffsetSectors uint64
}

// TargetType implements Params.
func (p LinearParams) TargetType() string { return "linear" }

// String implements Params.
func (p LinearParams) String() string { return fmt.Sprintf("%s %d", p.Dev, p.OffsetSectors) }

// ParseLinearParams parses a linear target's parameter string.
func ParseLinearParams(s string) (LinearParams, error) {
	f := strings.Fields(s)
	if len(f) != 2 {
		return LinearParams{}, fmt.Errorf("%w linear params %q: want dev and offset", ErrParse, s)
	}
	d, err := ParseDev(f[0])
	if err != nil {
		return LinearParams{}, fmt.Errorf("%w linear params %q: %v", ErrParse, s, err)
	}
	off, err := strconv.ParseUint(f[1], 10, 64)
	if err != nil {
		return LinearParams{}, fmt.Errorf("%w linear params %q: offset: %v", ErrParse, s, err)
	}
	return LinearParams{Dev: d, OffsetSectors: off}, nil
}
