package csi

import (
	"fmt"

	csi "github.com/container-storage-interface/spec/lib/go/csi"
)

// Filesystems the node can make and grow.
var supportedFS = map[string]bool{"ext4": true, "xfs": true}

const defaultFS = "ext4"

// checkCapabilities validates volume capabilities: single-node access modes
// only (a volume lives on one node's pool), mount with a supported
// filesystem, or block.
func checkCapabilities(field string, caps []*csi.VolumeCapability) error {
	if len(caps) == 0 {
		return invalid("%s is required", field)
	}
	for i, c := range caps {
		if err := checkCapability(fmt.Sprintf("%s[%d]", field, i), c); err != nil {
			return err
		}
	}
	return nil
}

func checkCapability(field string, c *csi.VolumeCapability) error {
	if c == nil {
		return invalid("%s is required", field)
	}
	if c.GetAccessMode() == nil {
		return invalid("%s.access_mode is required", field)
	}
	switch m := c.GetAccessMode().GetMode(); m {
	case csi.VolumeCapability_AccessMode_SINGLE_NODE_WRITER,
		csi.VolumeCapability_AccessMode_SINGLE_NODE_READER_ONLY,
		csi.VolumeCapability_AccessMode_SINGLE_NODE_SINGLE_WRITER,
		csi.VolumeCapability_AccessMode_SINGLE_NODE_MULTI_WRITER:
	default:
		return invalid("%s.access_mode %s: a csi-dmthin volume lives on one node", field, m)
	}
	switch {
	case c.GetBlock() != nil:
	case c.GetMount() != nil:
		if fs := c.GetMount().GetFsType(); fs != "" && !supportedFS[fs] {
			return invalid("%s.mount.fs_type %q: want ext4 or xfs", field, fs)
		}
	default:
		return invalid("%s needs an access type, mount or block", field)
	}
	return nil
}
