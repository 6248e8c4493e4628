package safepath

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
)

var (
	// ErrNotBeneath: the path is not absolute, is malformed, or is not
	// strictly beneath the root once cleaned. Decided on the string alone.
	ErrNotBeneath = errors.New("not a path beneath the root")
	// ErrSymlink: resolving the path met a symbolic link, or would have
	// left the root.
	ErrSymlink = errors.New("goes through a symbolic link or out of the root")
)

// Limits of Linux paths: PATH_MAX and NAME_MAX.
const (
	maxPathBytes = 4096
	maxNameBytes = 255
)

// Root is a directory that paths are resolved beneath, by its absolute
// path. It is opened afresh for every lookup, so it may be made after the
// Root (the kubelet makes its directory when it starts). A Root that is not
// absolute refuses every path.
type Root string

// NewRoot returns the Root at dir, which must be absolute.
func NewRoot(dir string) (Root, error) {
	if !filepath.IsAbs(dir) {
		return "", fmt.Errorf("safepath: root %q is not absolute", dir)
	}
	return Root(filepath.Clean(dir)), nil
}

// Dir returns the root's directory.
func (r Root) Dir() string { return filepath.Clean(string(r)) }

// Rel returns p relative to the root. p must be absolute, hold no NUL,
// fit PATH_MAX with every name within NAME_MAX, and, once cleaned
// lexically, be strictly beneath the root (not the root itself); otherwise
// the error wraps ErrNotBeneath. Nothing is looked at on disk: whatever
// the result names may still be, or hold, a symbolic link.
func (r Root) Rel(p string) (string, error) {
	switch {
	case !filepath.IsAbs(string(r)):
		return "", fmt.Errorf("%w: the root %q is not absolute", ErrNotBeneath, string(r))
	case p == "":
		return "", fmt.Errorf("%w: empty", ErrNotBeneath)
	case strings.IndexByte(p, 0) >= 0:
		return "", fmt.Errorf("%w: holds a NUL byte", ErrNotBeneath)
	case len(p) > maxPathBytes:
		return "", fmt.Errorf("%w: %d bytes long, over %d", ErrNotBeneath, len(p), maxPathBytes)
	case !filepath.IsAbs(p):
		return "", fmt.Errorf("%w: not absolute", ErrNotBeneath)
	}
	rel, err := filepath.Rel(r.Dir(), filepath.Clean(p))
	if err != nil || rel == "." || rel == ".." || strings.HasPrefix(rel, "../") {
		return "", fmt.Errorf("%w: outside %s", ErrNotBeneath, r.Dir())
	}
	for _, name := range strings.Split(rel, "/") {
		if len(name) > maxNameBytes {
			return "", fmt.Errorf("%w: a name is %d bytes long, over %d", ErrNotBeneath, len(name), maxNameBytes)
		}
	}
	return rel, nil
}

// Path is a path beneath a Root whose parent directory is open: every
// operation on it is relative to that directory, which was resolved
// beneath the root without symbolic links. The path itself need not
// exist. Close it when done.
type Path struct {
	parent *os.File // O_PATH, the parent directory
	base   string   // one name: no slash, not "." or ".."
	path   string   // the clean absolute path, for messages and tables
}

// String returns the clean absolute path.
func (p *Path) String() string { return p.path }

// Close closes the parent directory.
func (p *Path) Close() error { return p.parent.Close() }
