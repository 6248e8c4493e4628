package csi

import (
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"regexp"
	"strings"
)

// IDs of volumes and snapshots are "<pool>/<name>": the pool on this node
// and the thin device's name in it. The format is strict: anything else is
// not ours.
var (
	poolNameRE = regexp.MustCompile(`^[a-z][a-z0-9-]{0,31}$`)
	devNameRE  = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9_.-]{0,79}$`)
)

type objectID struct{ pool, name string }

func (id objectID) String() string { return id.pool + "/" + id.name }

// parseID parses a volume or snapshot ID; ok is false for anything that is
// not one of ours.
func parseID(s string) (objectID, bool) {
	pool, name, found := strings.Cut(s, "/")
	if !found || !poolNameRE.MatchString(pool) || !devNameRE.MatchString(name) {
		return objectID{}, false
	}
	return objectID{pool: pool, name: name}, true
}

// hashedPrefix starts the device name of a CSI name that is not a valid
// device name as it is. A valid CSI name starting with it is hashed too, so
// the mapping stays one to one.
const hashedPrefix = "h_"

// deviceName maps a CSI object name (any string up to 128 bytes) to a thin
// device name, deterministically, so a repeated CreateVolume finds what the
// first one made. Kubernetes' names (pvc-<uid>, snapshot-<uid>) map to
// themselves, which keeps `dmsetup ls` readable. Names that start like a
// hashed name or a template's are hashed too.
func deviceName(csiName string) string {
	if devNameRE.MatchString(csiName) && !strings.HasPrefix(csiName, hashedPrefix) && !isTemplateName(csiName) {
		return csiName
	}
	sum := sha256.Sum256([]byte(csiName))
	return hashedPrefix + hex.EncodeToString(sum[:20])
}

// checkName validates a CSI name field.
func checkName(field, name string) error {
	if name == "" {
		return invalid("%s is required", field)
	}
	if len(name) > 128 {
		return invalid("%s is %d bytes long; at most 128", field, len(name))
	}
	return nil
}

// mustParseID parses an ID field, or says why it is not one of ours.
func mustParseID(field, s string) (objectID, error) {
	if s == "" {
		return objectID{}, invalid("%s is required", field)
	}
	id, ok := parseID(s)
	if !ok {
		return objectID{}, notFound("%s %q is not a csi-dmthin ID (<pool>/<name>)", field, s)
	}
	return id, nil
}

func fmtBytes(b int64) string {
	switch {
	case b >= 1<<30 && b%(1<<30) == 0:
		return fmt.Sprintf("%d GiB", b>>30)
	case b >= 1<<20 && b%(1<<20) == 0:
		return fmt.Sprintf("%d MiB", b>>20)
	}
	return fmt.Sprintf("%d bytes", b)
}
