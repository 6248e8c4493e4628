package devmapper

import (
	"fmt"
	"strconv"
	"strings"
)

// PoolMode is the thin-pool's operating mode as its status reports it.
type PoolMode string

const (
	PoolReadWrite      PoolMode = "rw"
	PoolReadOnly       PoolMode = "ro" // metadata problems; or read_only was asked for
	PoolOutOfDataSpace PoolMode = "out_of_data_space"
)

// DiscardMode is how the pool treats discards.
type DiscardMode string

const (
	DiscardPassdown   DiscardMode = "discard_passdown"
	NoDiscardPassdown DiscardMode = "no_discard_passdown"
	IgnoreDiscard     DiscardMode = "ignore_discard"
)

// MetadataBlockSectors is the size of a thin-pool metadata block: 4 KiB.
const MetadataBlockSectors = 8

// ThinPoolStatus is a thin-pool target's status line:
//
//	<transaction id> <used metadata blocks>/<total metadata blocks>
//	<used data blocks>/<total data blocks> <held metadata root>
//	ro|rw|out_of_data_space [no_]discard_passdown|ignore_discard
//	error_if_no_space|queue_if_no_space needs_check|- <metadata low watermark>
//
// or the single word "Fail" (the pool has failed: no other field is valid)
// or "Error" (the kernel could not read its own metadata for the status).
// Older kernels omit the needs_check field, the metadata watermark or both;
// they parse as false and 0.
type ThinPoolStatus struct {
	Fail  bool
	Error bool

	TransactionID       uint64
	UsedMetadataBlocks  uint64 // in 4 KiB metadata blocks
	TotalMetadataBlocks uint64
	UsedDataBlocks      uint64 // in the pool's data blocks
	TotalDataBlocks     uint64
	// HeldMetadataRoot is the block of the reserved metadata snapshot, 0 when
	// none is held.
	HeldMetadataRoot uint64
	Mode             PoolMode
	Discard          DiscardMode
	ErrorIfNoSpace   bool // false means queue_if_no_space
	// NeedsCheck is set by the kernel after a metadata error: the pool must be
	// repaired with thin_check/thin_repair before metadata can change again.
	NeedsCheck bool
	// MetadataLowWatermark is the number of free metadata blocks below which
	// the kernel raises an event (0 when the kernel does not report it).
	MetadataLowWatermark uint64
}

// String formats the status exactly as the kernel prints it.
func (s ThinPoolStatus) String() string {
	switch {
	case s.Fail:
		return "Fail"
	case s.Error:
		return "Error"
	}
	held := "-"
	if s.HeldMetadataRoot != 0 {
		held = strconv.FormatUint(s.HeldMetadataRoot, 10)
	}
	space := "queue_if_no_space"
	if s.ErrorIfNoSpace {
		space = "error_if_no_space"
	}
	check := "-"
	if s.NeedsCheck {
		check = "needs_check"
	}
	return fmt.Sprintf("%d %d/%d %d/%d %s %s %s %s %s %d", s.TransactionID,
		s.UsedMetadataBlocks, s.TotalMetadataBlocks, s.UsedDataBlocks, s.TotalDataBlocks,
		held, s.Mode, s.Discard, space, check, s.MetadataLowWatermark)
}

// ParseThinPoolStatus parses a thin-pool status line.
func ParseThinPoolStatus(line string) (ThinPoolStatus, error) {
	f := strings.Fields(line)
	var st ThinPoolStatus
	bad := func(what string) (ThinPoolStatus, error) {
		return ThinPoolStatus{}, fmt.Errorf("%w thin-pool status %q: %s", ErrParse, line, what)
	}
	if len(f) == 1 {
		switch f[0] {
		case "Fail":
			return ThinPoolStatus{Fail: true}, nil
		case "Error":
			return ThinPoolStatus{Error: true}, nil
		}
	}
	if len(f) < 7 || len(f) > 9 {
		return bad(fmt.Sprintf("%d fields, want 7 to 9", len(f)))
	}
	var err error
	if st.TransactionID, err = strconv.ParseUint(f[0], 10, 64); err != nil {
		return bad("transaction id")
	}
	if st.UsedMetadataBlocks, st.TotalMetadataBlocks, err = parseFraction(f[1]); err != nil {
		return bad("metadata blocks: " + err.Error())
	}
	if st.UsedDataBlocks, st.TotalDataBlocks, err = parseFraction(f[2]); err != nil {
		return bad("data blocks: " + err.Error())
	}
	if f[3] != "-" {
		if st.HeldMetadataRoot, err = strconv.ParseUint(f[3], 10, 64); err != nil || st.HeldMetadataRoot == 0 {
			return bad("held metadata root")
		}
	}
	switch m := PoolMode(f[4]); m {
	case PoolReadWrite, PoolReadOnly, PoolOutOfDataSpace:
		st.Mode = m
	default:
		return bad("mode " + f[4])
	}
	switch d := DiscardMode(f[5]); d {
	case DiscardPassdown, NoDiscardPassdown, IgnoreDiscard:
		st.Discard = d
	default:
		return bad("discard mode " + f[5])
	}
	switch f[6] {
	case "error_if_no_space":
		st.ErrorIfNoSpace = true
	case "queue_if_no_space":
	default:
		return bad("no-space policy " + f[6])
	}
	if len(f) >= 8 {
		switch f[7] {
		case "needs_check":
			st.NeedsCheck = true
		case "-":
		default:
			return bad("needs_check field " + f[7])
		}
	}
	if len(f) == 9 {
		if st.MetadataLowWatermark, err = strconv.ParseUint(f[8], 10, 64); err != nil {
			return bad("metadata low watermark")
		}
	}
	return st, nil
}

func parseFraction(s string) (used, total uint64, err error) {
	a, b, ok := strings.Cut(s, "/")
	if !ok {
		return 0, 0, fmt.Errorf("%q is not used/total", s)
	}
	if used, err = strconv.ParseUint(a, 10, 64); err != nil {
		return 0, 0, fmt.Errorf("%q: used: %w", s, err)
	}
	if total, err = strconv.ParseUint(b, 10, 64); err != nil {
		return 0, 0, fmt.Errorf("%q: total: %w", s, err)
	}
	if used > total {
		return 0, 0, fmt.Errorf("%q: used above total", s)
	}
	return used, total, nil
}

// ThinStatus is a thin target's status line: "<mapped sectors> <highest
// mapped sector>" ("-" for the latter while nothing is mapped), or "Fail"
// when its pool has failed, "Error" when the kernel could not read the
// metadata, "-" when the device is being torn down.
type ThinStatus struct {
	Fail    bool
	Error   bool
	Missing bool // "-": no thin device is attached to the target

	MappedSectors uint64
	// HighestMappedSector is valid only when HasMapping.
	HighestMappedSector uint64
	HasMapping          bool
}

// String formats the status exactly as the kernel prints it.
func (s ThinStatus) String() string {
	switch {
	case s.Fail:
		return "Fail"
	case s.Error:
		return "Error"
	case s.Missing:
		return "-"
	case !s.HasMapping:
		return fmt.Sprintf("%d -", s.MappedSectors)
	}
	return fmt.Sprintf("%d %d", s.MappedSectors, s.HighestMappedSector)
}

// ParseThinStatus parses a thin target's status line.
func ParseThinStatus(line string) (ThinStatus, error) {
	f := strings.Fields(line)
	if len(f) == 1 {
		switch f[0] {
		case "Fail":
			return ThinStatus{Fail: true}, nil
		case "Error":
			return ThinStatus{Error: true}, nil
		case "-":
			return ThinStatus{Missing: true}, nil
		}
	}
	if len(f) != 2 {
		return ThinStatus{}, fmt.Errorf("%w thin status %q: want 2 fields", ErrParse, line)
	}
	var st ThinStatus
	var err error
	if st.MappedSectors, err = strconv.ParseUint(f[0], 10, 64); err != nil {
		return ThinStatus{}, fmt.Errorf("%w thin status %q: mapped sectors: %v", ErrParse, line, err)
	}
	if f[1] == "-" {
		return st, nil
	}
	if st.HighestMappedSector, err = strconv.ParseUint(f[1], 10, 64); err != nil {
		return ThinStatus{}, fmt.Errorf("%w thin status %q: highest mapped sector: %v", ErrParse, line, err)
	}
	st.HasMapping = true
	return st, nil
}
