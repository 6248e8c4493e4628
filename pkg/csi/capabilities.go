package csi

import (
	"fmt"
	"strings"

	csipb "github.com/container-storage-interface/spec/lib/go/csi"
)

// Filesystems the node can make and grow.
var supportedFS = map[string]bool{"ext4": true, "xfs": true}

const defaultFS = "ext4"

// checkCapabilities validates volume capabilities: single-node access modes
// only (a volume lives on one node's pool), mount with a supported
// filesystem, or block.
func checkCapabilities(field string, caps []*csipb.VolumeCapability) error {
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

func checkCapability(field string, c *csipb.VolumeCapability) error {
	if c == nil {
		return invalid("%s is required", field)
	}
	if c.GetAccessMode() == nil {
		return invalid("%s.access_mode is required", field)
	}
	switch m := c.GetAccessMode().GetMode(); m {
	case csipb.VolumeCapability_AccessMode_SINGLE_NODE_WRITER,
		csipb.VolumeCapability_AccessMode_SINGLE_NODE_READER_ONLY,
		csipb.VolumeCapability_AccessMode_SINGLE_NODE_SINGLE_WRITER,
		csipb.VolumeCapability_AccessMode_SINGLE_NODE_MULTI_WRITER:
	default:
		return invalid("%s.access_mode %s: a csi-dmthin volume lives on one node", field, m)
	}
	switch {
	case c.GetBlock() != nil:
	case c.GetMount() != nil:
		if fs := c.GetMount().GetFsType(); fs != "" && !supportedFS[fs] {
			return invalid("%s.mount.fs_type %q: want ext4 or xfs", field, fs)
		}
		if err := checkMountFlags(field+".mount.mount_flags", c.GetMount().GetMountFlags()); err != nil {
			return err
		}
	default:
		return invalid("%s needs an access type, mount or block", field)
	}
	return nil
}

// notFSOptions are mount(8) options that are no filesystem's: they choose
// what kind of mount is made (a bind, a move, a remount, a loop device,
// propagation), which is the driver's to decide.
var notFSOptions = map[string]bool{
	"bind": true, "rbind": true, "move": true, "rmove": true, "remount": true, "loop": true,
	"shared": true, "rshared": true, "private": true, "rprivate": true,
	"slave": true, "rslave": true, "unbindable": true, "runbindable": true,
	"make-shared": true, "make-rshared": true, "make-private": true, "make-rprivate": true,
	"make-slave": true, "make-rslave": true, "make-unbindable": true, "make-runbindable": true,
}

// maxMountFlagBytes bounds one flag: the kernel takes one page of
// options in all.
const maxMountFlagBytes = 4096

// checkMountFlags refuses, before anything is done, mount flags that
// cannot be one filesystem option: empty, oversized, with control
// characters, a comma list (each option is its own flag; a comma inside
// double quotes, as in an SELinux context=, is part of the value), or an
// option that is no filesystem's. What passes may still be refused by the
// filesystem when the volume is staged, which is InvalidArgument too.
func checkMountFlags(field string, flags []string) error {
	for i, f := range flags {
		name := fmt.Sprintf("%s[%d]", field, i)
		switch {
		case f == "":
			return invalid("%s is empty", name)
		case len(f) > maxMountFlagBytes:
			return invalid("%s is %d bytes long; at most %d", name, len(f), maxMountFlagBytes)
		case strings.ContainsFunc(f, func(r rune) bool { return r < 0x20 || r == 0x7f }):
			return invalid("%s %q holds a control character", name, f)
		case unquotedComma(f):
			return invalid("%s %q is a list: give each option as a flag of its own", name, f)
		}
		if opt, _, _ := strings.Cut(f, "="); notFSOptions[opt] {
			return invalid("%s %q is not a filesystem's option: how the volume is mounted is the driver's to decide", name, f)
		}
	}
	return nil
}

// unquotedComma reports whether s has a comma outside double quotes.
func unquotedComma(s string) bool {
	quoted := false
	for _, r := range s {
		switch {
		case r == '"':
			quoted = !quoted
		case r == ',' && !quoted:
			return true
		}
	}
	return false
}
