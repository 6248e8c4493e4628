package devmapper

import (
	"fmt"
	"strconv"
	"strings"
)

// Dev is a block device number in the kernel's "huge" encoding, the one the
// dm ioctls use in their dev field and the one stat(2) returns in st_rdev.
type Dev uint64

// MakeDev builds a Dev from a major and a minor number.
func MakeDev(major, minor uint32) Dev {
	return Dev(uint64(minor&0xff) | uint64(major&0xfff)<<8 |
		uint64(minor&^0xff)<<12 | uint64(major&^0xfff)<<32)
}

// Major returns the device's major number.
func (d Dev) Major() uint32 {
	return uint32((uint64(d)>>8)&0xfff) | uint32((uint64(d)>>32)&^0xfff)
}

// Minor returns the device's minor number.
func (d Dev) Minor() uint32 {
	return uint32(uint64(d)&0xff) | uint32((uint64(d)>>12)&^0xff)
}

// String formats the device as "major:minor", the form dm tables use.
func (d Dev) String() string {
	return strconv.FormatUint(uint64(d.Major()), 10) + ":" + strconv.FormatUint(uint64(d.Minor()), 10)
}

// ParseDev parses "major:minor". Paths are refused on purpose: a table that
// names a path depends on udev or devtmpfs having made it, and the kernel
// prints tables back with numbers anyway.
func ParseDev(s string) (Dev, error) {
	maj, min, ok := strings.Cut(s, ":")
	if !ok {
		return 0, fmt.Errorf("device %q: want major:minor", s)
	}
	ma, err := strconv.ParseUint(maj, 10, 32)
	if err != nil {
		return 0, fmt.Errorf("device %q: bad major: %w", s, err)
	}
	mi, err := strconv.ParseUint(min, 10, 32)
	if err != nil {
		return 0, fmt.Errorf("device %q: bad minor: %w", s, err)
	}
	return MakeDev(uint32(ma), uint32(mi)), nil
}

// UUIDPrefix starts the dm UUID of every device this project creates; a
// listing (and an operator's `dmsetup ls`) tells ours from others' by it.
const UUIDPrefix = "DMTHIN-"

// Owned reports whether a dm UUID carries UUIDPrefix.
func Owned(uuid string) bool { return strings.HasPrefix(uuid, UUIDPrefix) }
