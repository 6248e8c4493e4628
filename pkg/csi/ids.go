package csi

import (
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"regexp"
	"strings"
)

// IDs of volumes are "<pool>/<name>": the pool on this node and the thin
// device's name in it. IDs of snapshots are "<node>/<pool>/<name>": they
// carry their node, so that the cluster's controller can tell from a
// pre-provisioned VolumeSnapshotContent's handle alone which node holds
// it (a PV names its node in its affinity; a bare snapshot handle names
// nothing else). Snapshot IDs made before the node was added, and those
// whose node name would make the ID longer than CSI's 128 bytes, are
// "<pool>/<name>" and stay valid. The format is strict: anything else is
// not ours.
var (
	poolNameRE = regexp.MustCompile(`^[a-z][a-z0-9-]{0,31}$`)
	devNameRE  = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9_.-]{0,79}$`)
	nodeNameRE = regexp.MustCompile(`^[a-z0-9]([a-z0-9.-]{0,251}[a-z0-9])?$`)
)

// maxIDBytes is CSI's limit on a string field.
const maxIDBytes = 128

// objectID names a thin device on a node. node is "" for an ID that does
// not name its node.
type objectID struct{ pool, name, node string }

// String is the ID without its node: the key of locks and logs, the same
// for both forms of a snapshot ID.
func (id objectID) String() string { return id.pool + "/" + id.name }

// snapshotID is the ID of snapshot name in pool on node: with the node
// when node is a valid node name and the ID fits in CSI's limit.
func snapshotID(node, pool, name string) string {
	id := objectID{pool: pool, name: name}.String()
	if !nodeNameRE.MatchString(node) || len(node)+1+len(id) > maxIDBytes {
		return id
	}
	return node + "/" + id
}

// parseID parses a volume or snapshot ID; ok is false for anything that is
// not one of ours.
func parseID(s string) (objectID, bool) {
	parts := strings.Split(s, "/")
	var id objectID
	switch len(parts) {
	case 2:
		id = objectID{pool: parts[0], name: parts[1]}
	case 3:
		id = objectID{node: parts[0], pool: parts[1], name: parts[2]}
		if !nodeNameRE.MatchString(id.node) {
			return objectID{}, false
		}
	default:
		return objectID{}, false
	}
	if !poolNameRE.MatchString(id.pool) || !devNameRE.MatchString(id.name) {
		return objectID{}, false
	}
	return id, true
}

// SnapshotNode returns the node a snapshot ID names and its pool; node is
// "" for an ID that names none, ok false for one that is not ours.
func SnapshotNode(snapshotID string) (node, pool string, ok bool) {
	id, ok := parseID(snapshotID)
	return id.node, id.pool, ok
}

// IDPool returns the pool a volume or snapshot ID names; ok is false for
// one that is not ours.
func IDPool(s string) (pool string, ok bool) {
	id, ok := parseID(s)
	return id.pool, ok
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

// mustParseID parses a volume ID field (<pool>/<name>), or says why it is
// not one of ours.
func (d *Driver) mustParseID(field, s string) (objectID, error) {
	id, err := d.mustParseSnapshotID(field, s)
	if err == nil && id.node != "" {
		return objectID{}, notFound("%s %q is a snapshot ID (<node>/<pool>/<name>), not a volume ID (<pool>/<name>)", field, s)
	}
	return id, err
}

// mustParseSnapshotID parses a snapshot ID field of this node, in either
// form, or says why it is not one of ours: not an ID, or one naming
// another node.
func (d *Driver) mustParseSnapshotID(field, s string) (objectID, error) {
	if s == "" {
		return objectID{}, invalid("%s is required", field)
	}
	id, ok := d.parseID(s)
	if !ok {
		if other, ok := parseID(s); ok {
			return objectID{}, notFound("%s %q is on node %s, not on this node %s", field, s, other.node, d.nodeID)
		}
		return objectID{}, notFound("%s %q is not a csi-dmthin ID (<pool>/<name> or <node>/<pool>/<name>)", field, s)
	}
	return id, nil
}

// parseID parses an ID of this node: ok is false for one that is not ours
// or that names another node.
func (d *Driver) parseID(s string) (objectID, bool) {
	id, ok := parseID(s)
	if !ok || (id.node != "" && id.node != d.nodeID) {
		return objectID{}, false
	}
	return id, true
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
