package safepath

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"golang.org/x/sys/unix"
)

// resolveFlags: stay beneath the directory a lookup starts from, and
// refuse every symbolic link (and so every magic link of /proc) on the
// way, the last name included.
const resolveFlags = unix.RESOLVE_BENEATH | unix.RESOLVE_NO_SYMLINKS

// openBeneath opens name, relative to the directory dirfd, with openat2.
// A symbolic link met on the way, or a step out of dirfd, is ErrSymlink;
// the errno stays in the chain otherwise (ENOENT is fs.ErrNotExist).
func openBeneath(dirfd int, name, display string, flags int, mode uint32) (*os.File, error) {
	how := &unix.OpenHow{Flags: uint64(flags | unix.O_CLOEXEC), Mode: uint64(mode), Resolve: resolveFlags}
	for try := 0; ; try++ {
		fd, err := unix.Openat2(dirfd, name, how)
		switch {
		case err == nil:
			return os.NewFile(uintptr(fd), display), nil
		case errors.Is(err, unix.EAGAIN) && try < 16:
			// RESOLVE_BENEATH gives up when a rename or a mount races
			// the lookup; trying again is what the kernel asks for.
			continue
		case errors.Is(err, unix.ELOOP), errors.Is(err, unix.EXDEV):
			return nil, fmt.Errorf("%s: %w", display, ErrSymlink)
		}
		return nil, &os.PathError{Op: "openat2", Path: display, Err: err}
	}
}

func (r Root) open() (*os.File, error) {
	fd, err := unix.Open(r.Dir(), unix.O_PATH|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, &os.PathError{Op: "open", Path: r.Dir(), Err: err}
	}
	return os.NewFile(uintptr(fd), r.Dir()), nil
}

// Lookup resolves p's parent directory beneath the root and returns p,
// which need not exist. A missing parent is fs.ErrNotExist; a symbolic
// link on the way, or as p itself, is ErrSymlink; a path that Rel refuses
// is ErrNotBeneath.
func (r Root) Lookup(p string) (*Path, error) {
	rel, err := r.Rel(p)
	if err != nil {
		return nil, err
	}
	parent, err := r.open()
	if err != nil {
		return nil, err
	}
	dir, base := filepath.Split(rel)
	if dir != "" {
		f, err := openBeneath(int(parent.Fd()), strings.TrimSuffix(dir, "/"), filepath.Join(r.Dir(), dir), unix.O_PATH|unix.O_DIRECTORY, 0)
		parent.Close()
		if err != nil {
			return nil, err
		}
		parent = f
	}
	sp := &Path{parent: parent, base: base, path: filepath.Join(r.Dir(), rel)}
	// Refused now, though every later step refuses it again: a link in
	// its place is the caller's mistake, whatever it is asked to do next.
	if _, err := sp.lstat(); err != nil && !errors.Is(err, os.ErrNotExist) {
		sp.Close()
		return nil, err
	}
	return sp, nil
}

// MkdirAll makes p and its missing parents beneath the root, each with
// mkdirat in its parent, and returns the directories it made, parents
// first. An existing name on the way must be a directory, not a link to
// one (ErrSymlink). The root itself is made with os.MkdirAll if missing.
func (r Root) MkdirAll(p string, perm os.FileMode) (made []string, err error) {
	rel, err := r.Rel(p)
	if err != nil {
		return nil, err
	}
	if err := os.MkdirAll(r.Dir(), 0o750); err != nil {
		return nil, err
	}
	cur, err := r.open()
	if err != nil {
		return nil, err
	}
	defer func() { cur.Close() }()
	display := r.Dir()
	for _, name := range strings.Split(rel, "/") {
		display = filepath.Join(display, name)
		switch err := unix.Mkdirat(int(cur.Fd()), name, uint32(perm.Perm())); {
		case err == nil:
			made = append(made, display)
		case !errors.Is(err, unix.EEXIST):
			return made, &os.PathError{Op: "mkdirat", Path: display, Err: err}
		}
		next, err := openBeneath(int(cur.Fd()), name, display, unix.O_PATH|unix.O_DIRECTORY, 0)
		if err != nil {
			return made, err
		}
		cur.Close()
		cur = next
	}
	return made, nil
}

// Remove removes p if it exists (see Path.Remove); a missing parent is
// nothing to remove.
func (r Root) Remove(p string) error {
	sp, err := r.Lookup(p)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return err
	}
	defer sp.Close()
	return sp.Remove()
}

func (p *Path) dirfd() int { return int(p.parent.Fd()) }

// lstat stats the name itself; a symbolic link is ErrSymlink.
func (p *Path) lstat() (unix.Stat_t, error) {
	var st unix.Stat_t
	if err := unix.Fstatat(p.dirfd(), p.base, &st, unix.AT_SYMLINK_NOFOLLOW); err != nil {
		return st, &os.PathError{Op: "fstatat", Path: p.path, Err: err}
	}
	if st.Mode&unix.S_IFMT == unix.S_IFLNK {
		return st, fmt.Errorf("%s: %w", p.path, ErrSymlink)
	}
	return st, nil
}

// Open opens the path itself with O_PATH: a handle on exactly what is
// there now (on the mounted filesystem's root, for a mount point), for
// fstat, fstatfs, statx, and as the target of move_mount(2) or the source
// of open_tree(2). It is fs.ErrNotExist when missing and ErrSymlink for a
// symbolic link.
func (p *Path) Open() (*os.File, error) {
	return openBeneath(p.dirfd(), p.base, p.path, unix.O_PATH, 0)
}

// Stat returns what is at the path (through any mount on it); a symbolic
// link is ErrSymlink.
func (p *Path) Stat() (os.FileInfo, error) {
	f, err := p.Open()
	if err != nil {
		return nil, err
	}
	defer f.Close()
	return f.Stat()
}

// Mkdir makes the directory; one that exists is fine, anything else
// there is an error. made reports whether it made it.
func (p *Path) Mkdir(perm os.FileMode) (made bool, err error) {
	err = unix.Mkdirat(p.dirfd(), p.base, uint32(perm.Perm()))
	if err == nil {
		return true, nil
	}
	if !errors.Is(err, unix.EEXIST) {
		return false, &os.PathError{Op: "mkdirat", Path: p.path, Err: err}
	}
	fi, err := p.Stat()
	if err != nil {
		return false, err
	}
	if !fi.IsDir() {
		return false, &os.PathError{Op: "mkdirat", Path: p.path, Err: unix.ENOTDIR}
	}
	return false, nil
}

// CreateFile makes an empty regular file (the target of a bind mount of a
// device node); one that exists is fine, anything else there is an
// error. made reports whether it made it.
func (p *Path) CreateFile(perm os.FileMode) (made bool, err error) {
	f, err := openBeneath(p.dirfd(), p.base, p.path, unix.O_CREAT|unix.O_EXCL|unix.O_WRONLY|unix.O_NOFOLLOW, uint32(perm.Perm()))
	if err == nil {
		return true, f.Close()
	}
	if !errors.Is(err, unix.EEXIST) {
		return false, err
	}
	fi, err := p.Stat()
	if err != nil {
		return false, err
	}
	if !fi.Mode().IsRegular() {
		return false, &os.PathError{Op: "create", Path: p.path, Err: unix.EISDIR}
	}
	return false, nil
}

// Remove removes the path, an empty directory or a file, with unlinkat in
// its parent; a missing one is fine. A symbolic link is left alone
// (ErrSymlink), and so is a mount point (EBUSY) or a directory that is
// not empty.
func (p *Path) Remove() error {
	err := unix.Unlinkat(p.dirfd(), p.base, unix.AT_REMOVEDIR)
	if errors.Is(err, unix.ENOTDIR) {
		if _, err := p.lstat(); err != nil {
			if errors.Is(err, os.ErrNotExist) {
				return nil
			}
			return err
		}
		err = unix.Unlinkat(p.dirfd(), p.base, 0)
	}
	if err == nil || errors.Is(err, unix.ENOENT) {
		return nil
	}
	return &os.PathError{Op: "unlinkat", Path: p.path, Err: err}
}

// InParent names the path through its open parent directory,
// /proc/self/fd/<parent>/<name>, for the calls that take a path and can
// be told not to follow a link in its last name (umount2's
// UMOUNT_NOFOLLOW): nothing before the last name is looked up again. It
// holds while p is open.
func (p *Path) InParent() string {
	return fmt.Sprintf("/proc/self/fd/%d/%s", p.dirfd(), p.base)
}
