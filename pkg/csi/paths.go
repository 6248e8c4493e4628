package csi

import (
	"errors"
	"os"
	"path/filepath"
	"strconv"
	"syscall"

	"k8s.io/klog/v2"

	"github.com/csi-dmthin/csi-dmthin/internal/safepath"
)

// The paths a CO gives the node service (staging_target_path, target_path,
// volume_path and the health call's) lie in the kubelet directory. Each is
// checked on its string first (checkPath: absolute, beneath the directory),
// and then only ever reached through safepath: looked up beneath the
// kubelet directory's descriptor with no symbolic link followed, the last
// name included, and mounted onto, unmounted, made and removed relative to
// what that opened. A path through a link is InvalidArgument, and nothing
// outside the directory is touched.

// root is the kubelet directory, beneath which every node path is
// resolved. New made it absolute and clean.
func (d *Driver) root() safepath.Root { return safepath.Root(d.kubeletDir) }

// checkPath checks a path field on its string alone: InvalidArgument
// naming the field unless it is an absolute path beneath the kubelet
// directory.
func (d *Driver) checkPath(field, p string) error {
	if p == "" {
		return invalid("%s is required", field)
	}
	if _, err := d.root().Rel(p); err != nil {
		return invalid("%s %s is not a path in the kubelet directory %s: %v", field, quoted(p), d.root().Dir(), err)
	}
	return nil
}

// lookup resolves a path field, checked already, beneath the kubelet
// directory. It returns nil when the path's parent directory does not
// exist: then nothing is there.
func (d *Driver) lookup(field, p string) (*safepath.Path, error) {
	sp, err := d.root().Lookup(p)
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, pathError(field, p, err)
	}
	return sp, nil
}

// mustLookup is lookup for a path whose parent was just made.
func (d *Driver) mustLookup(field, p string) (*safepath.Path, error) {
	sp, err := d.lookup(field, p)
	if err == nil && sp == nil {
		err = pathError(field, p, os.ErrNotExist)
	}
	return sp, err
}

// makeDirs makes the directory p and its missing parents beneath the
// kubelet directory; undo removes the ones it made, deepest first, for a
// call that fails after it.
func (d *Driver) makeDirs(field, p string) (undo func(), err error) {
	made, err := d.root().MkdirAll(p, 0o750)
	undo = func() {
		for i := len(made) - 1; i >= 0; i-- {
			if err := d.root().Remove(made[i]); err != nil {
				klog.ErrorS(err, "Removing a directory a failed call made", "path", made[i])
			}
		}
	}
	if err != nil {
		undo()
		return nil, pathError(field, p, err)
	}
	return undo, nil
}

// parentDir returns the directory of p, "" when that is the kubelet
// directory itself (which is not made or removed).
func (d *Driver) parentDir(p string) string {
	dir := filepath.Dir(filepath.Clean(p))
	if _, err := d.root().Rel(dir); err != nil {
		return ""
	}
	return dir
}

// pathError maps an error about a path field: the caller's path (through a
// link, out of the kubelet directory, through a file, a name too long) is
// InvalidArgument naming the field; anything else goes through toStatus.
func pathError(field, p string, err error) error {
	switch {
	case errors.Is(err, safepath.ErrSymlink), errors.Is(err, safepath.ErrNotBeneath),
		errors.Is(err, syscall.ENOTDIR), errors.Is(err, syscall.ENAMETOOLONG):
		return invalid("%s %s: %v", field, quoted(p), err)
	}
	return toStatus(err, "%s %s", field, quoted(p))
}

// quoted quotes a path for a message, cut to a readable length: a hostile
// one may be kilobytes long.
func quoted(p string) string {
	const maxBytes = 256
	if len(p) > maxBytes {
		return strconv.Quote(p[:maxBytes]) + "..."
	}
	return strconv.Quote(p)
}
