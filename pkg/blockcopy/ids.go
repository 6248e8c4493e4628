package blockcopy

import (
	"fmt"
	"strings"
)

// maxIDLen bounds copy and source IDs: they become file names (a
// checkpoint per copy) and the caller's own names (a snapshot per copy),
// so they stay well below NAME_MAX.
const maxIDLen = 128

// validateID accepts 1 to maxIDLen characters of [A-Za-z0-9._-] starting
// with a letter or digit, so an ID can never be "", "." or "..", hide as a
// dot file or carry a path separator. field names the ID in the error.
func validateID(field, id string) error {
	if id == "" {
		return fmt.Errorf("%w: %s is empty", ErrInvalidID, field)
	}
	if len(id) > maxIDLen {
		return fmt.Errorf("%w: %s is %d bytes long, more than %d", ErrInvalidID, field, len(id), maxIDLen)
	}
	for i := 0; i < len(id); i++ {
		c := id[i]
		alnum := c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9'
		if alnum || i > 0 && (c == '.' || c == '_' || c == '-') {
			continue
		}
		return fmt.Errorf("%w: %s %q has %q at byte %d (allowed: letters, digits, '.', '_', '-', starting with a letter or digit)", ErrInvalidID, field, id, c, i)
	}
	return nil
}

// maxSourceIDLen bounds a source ID: the caller's name of what is copied
// (csi-dmthin's snapshot IDs, up to CSI's 128 bytes).
const maxSourceIDLen = 128

// validateSourceID accepts segments that validateID accepts, joined by
// single '/': a source ID names the caller's object ("<node>/<pool>/<name>"
// in csi-dmthin) and is never a file name here, but it can still hold no
// empty, "." or ".." segment.
func validateSourceID(id string) error {
	if len(id) > maxSourceIDLen {
		return fmt.Errorf("%w: sourceID is %d bytes long, more than %d", ErrInvalidID, len(id), maxSourceIDLen)
	}
	for _, seg := range strings.Split(id, "/") {
		if err := validateID("sourceID", seg); err != nil {
			return fmt.Errorf("%w (in sourceID %q)", err, id)
		}
	}
	return nil
}
