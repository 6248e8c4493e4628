package safepath

import (
	"errors"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
)

// tree makes a root with a sentinel directory beside it (outside) and the
// links into it that the tests resolve.
//
//	root/
//	  a/b/            directory
//	  a/file          regular file
//	  abs -> outside  absolute link out
//	  rel -> ../outside
//	  inner -> a      link that stays inside
//	  a/up -> ../..   link up and out, in the middle of a path
//	  self -> /       the host's root
//	outside/keep
func tree(t *testing.T) (r Root, root, outside string) {
	t.Helper()
	base := t.TempDir()
	root, outside = filepath.Join(base, "root"), filepath.Join(base, "outside")
	for _, d := range []string{filepath.Join(root, "a", "b"), outside} {
		if err := os.MkdirAll(d, 0o750); err != nil {
			t.Fatal(err)
		}
	}
	for name, content := range map[string]string{filepath.Join(root, "a", "file"): "x", filepath.Join(outside, "keep"): "keep"} {
		if err := os.WriteFile(name, []byte(content), 0o640); err != nil {
			t.Fatal(err)
		}
	}
	for link, to := range map[string]string{
		"abs": outside, "rel": "../outside", "inner": "a", "a/up": "../..", "self": "/",
	} {
		if err := os.Symlink(to, filepath.Join(root, link)); err != nil {
			t.Fatal(err)
		}
	}
	r, err := NewRoot(root)
	if err != nil {
		t.Fatal(err)
	}
	return r, root, outside
}

// listing is every name under dir with its type, to show nothing changed.
func listing(t *testing.T, dir string) string {
	t.Helper()
	var out []string
	err := filepath.WalkDir(dir, func(p string, d os.DirEntry, err error) error {
		if err != nil {
			return err
		}
		out = append(out, p+" "+d.Type().String())
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return strings.Join(out, "\n")
}

func TestRel(t *testing.T) {
	r, err := NewRoot("/var/lib/kubelet/")
	if err != nil {
		t.Fatal(err)
	}
	for p, want := range map[string]string{
		"/var/lib/kubelet/pods/x":            "pods/x",
		"/var/lib/kubelet//pods/./x/":        "pods/x",
		"/var/lib/kubelet/pods/../plugins/y": "plugins/y",
	} {
		if got, err := r.Rel(p); got != want || err != nil {
			t.Errorf("Rel(%q) = %q, %v; want %q", p, got, err, want)
		}
	}
	for _, p := range []string{
		"", "pods/x", "./pods", "/var/lib/kubelet", "/var/lib/kubelet/", "/var/lib/kubelet/pods/..",
		"/var/lib/kubelet/../kubelet-other/x", "/var/lib/kubelet-other/x", "/", "/etc/passwd",
		"/var/lib/kubelet/../../../etc", "/var/lib/kubelet/a\x00b",
		"/var/lib/kubelet/" + strings.Repeat("n", 256),
		"/var/lib/kubelet/" + strings.Repeat("d/", 2100),
	} {
		if got, err := r.Rel(p); !errors.Is(err, ErrNotBeneath) {
			t.Errorf("Rel(%.40q) = %q, %v; want ErrNotBeneath", p, got, err)
		}
	}
	if _, err := NewRoot("relative"); err == nil {
		t.Error("NewRoot took a relative directory")
	}
	if _, err := Root("relative").Rel("/relative/x"); !errors.Is(err, ErrNotBeneath) {
		t.Errorf("a relative Root took a path: %v", err)
	}
}

func TestLookup(t *testing.T) {
	r, root, outside := tree(t)
	before := listing(t, outside)
	for _, tc := range []struct {
		name string
		p    string
		want error // nil: resolves
	}{
		{"missing last name", "a/b/new", nil},
		{"directory", "a/b", nil},
		{"file", "a/file", nil},
		{"dot-dot that stays inside", "a/b/../b", nil},
		{"link as the last name, absolute", "abs", ErrSymlink},
		{"link as the last name, relative", "rel", ErrSymlink},
		{"link to /", "self", ErrSymlink},
		{"link that stays inside, last name", "inner", ErrSymlink},
		{"link that stays inside, in the middle", "inner/b", ErrSymlink},
		{"absolute link in the middle", "abs/keep", ErrSymlink},
		{"relative link in the middle", "rel/keep", ErrSymlink},
		{"link up and out in the middle", "a/up/outside/keep", ErrSymlink},
		{"link to / in the middle", "self/etc/passwd", ErrSymlink},
		{"dot-dot out", "../outside/keep", ErrNotBeneath},
		{"missing parent", "a/missing/x", os.ErrNotExist},
		{"file as a parent", "a/file/x", nil}, // ENOTDIR, checked below
	} {
		t.Run(tc.name, func(t *testing.T) {
			sp, err := r.Lookup(root + "/" + tc.p)
			if tc.name == "file as a parent" {
				if err == nil {
					sp.Close()
					t.Fatal("resolved a path through a file")
				}
				return
			}
			if tc.want == nil {
				if err != nil {
					t.Fatal(err)
				}
				defer sp.Close()
				if sp.String() != filepath.Join(root, tc.p) {
					t.Errorf("String() = %q", sp.String())
				}
				return
			}
			if !errors.Is(err, tc.want) {
				t.Fatalf("Lookup: %v, want %v", err, tc.want)
			}
		})
	}
	if after := listing(t, outside); after != before {
		t.Errorf("outside changed:\n%s\n%s", before, after)
	}
}

func TestPathOperations(t *testing.T) {
	r, root, _ := tree(t)
	sp, err := r.Lookup(filepath.Join(root, "a", "b", "dir"))
	if err != nil {
		t.Fatal(err)
	}
	defer sp.Close()
	if _, err := sp.Open(); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("Open of a missing path: %v", err)
	}
	if made, err := sp.Mkdir(0o750); !made || err != nil {
		t.Fatalf("Mkdir: %v, %v", made, err)
	}
	if made, err := sp.Mkdir(0o750); made || err != nil {
		t.Errorf("Mkdir again: %v, %v; want nothing done", made, err)
	}
	if fi, err := sp.Stat(); err != nil || !fi.IsDir() {
		t.Errorf("Stat: %v, %v", fi, err)
	}
	if _, err := sp.CreateFile(0o640); err == nil {
		t.Error("CreateFile over a directory")
	}
	if err := sp.Remove(); err != nil {
		t.Fatal(err)
	}
	if err := sp.Remove(); err != nil {
		t.Errorf("Remove of what is gone: %v", err)
	}
	if made, err := sp.CreateFile(0o640); !made || err != nil {
		t.Fatalf("CreateFile: %v, %v", made, err)
	}
	if made, err := sp.CreateFile(0o640); made || err != nil {
		t.Errorf("CreateFile again: %v, %v", made, err)
	}
	if _, err := sp.Mkdir(0o750); err == nil {
		t.Error("Mkdir over a file")
	}
	if err := sp.Remove(); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Lstat(sp.String()); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("still there: %v", err)
	}
	if want := "/proc/self/fd/"; !strings.HasPrefix(sp.InParent(), want) || !strings.HasSuffix(sp.InParent(), "/dir") {
		t.Errorf("InParent() = %q", sp.InParent())
	}
	fi, err := os.Stat(sp.InParent())
	if !errors.Is(err, os.ErrNotExist) {
		t.Errorf("stat of InParent after Remove: %v, %v", fi, err)
	}
	if err := os.Mkdir(sp.String(), 0o750); err != nil {
		t.Fatal(err)
	}
	if fi, err := os.Stat(sp.InParent()); err != nil || !fi.IsDir() {
		t.Errorf("InParent does not name the path: %v, %v", fi, err)
	}
}

func TestMkdirAll(t *testing.T) {
	r, root, outside := tree(t)
	made, err := r.MkdirAll(filepath.Join(root, "a", "n1", "n2"), 0o750)
	if want := []string{filepath.Join(root, "a", "n1"), filepath.Join(root, "a", "n1", "n2")}; err != nil || !slices.Equal(made, want) {
		t.Fatalf("MkdirAll = %v, %v; want %v", made, err, want)
	}
	if made, err := r.MkdirAll(filepath.Join(root, "a", "n1", "n2"), 0o750); len(made) != 0 || err != nil {
		t.Errorf("MkdirAll again = %v, %v", made, err)
	}
	before := listing(t, outside)
	for _, p := range []string{"abs/new", "rel/new/deeper", "a/up/outside/new", "self/tmp/new", "inner/new", "abs"} {
		if made, err := r.MkdirAll(filepath.Join(root, p), 0o750); !errors.Is(err, ErrSymlink) || len(made) != 0 {
			t.Errorf("MkdirAll(%s) = %v, %v; want ErrSymlink", p, made, err)
		}
	}
	if after := listing(t, outside); after != before {
		t.Errorf("outside changed:\n%s\n%s", before, after)
	}
	if _, err := os.Stat("/new"); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("/new: %v", err)
	}
	// A missing root is made (the kubelet's directory, before its first
	// volume).
	r2, err := NewRoot(filepath.Join(t.TempDir(), "kubelet"))
	if err != nil {
		t.Fatal(err)
	}
	if made, err := r2.MkdirAll(filepath.Join(r2.Dir(), "x"), 0o750); err != nil || len(made) != 1 {
		t.Errorf("MkdirAll under a missing root: %v, %v", made, err)
	}
	if err := r2.Remove(filepath.Join(r2.Dir(), "x")); err != nil {
		t.Error(err)
	}
	if err := r2.Remove(filepath.Join(r2.Dir(), "gone", "x")); err != nil {
		t.Errorf("Remove under a missing parent: %v", err)
	}
}

// A link swapped in after the lookup changes nothing: every later step is
// relative to the directory the lookup opened, and the last name is never
// followed.
func TestSwappedAfterLookup(t *testing.T) {
	r, root, outside := tree(t)
	before := listing(t, outside)

	// The parent: renamed away and replaced by a link out, between Lookup
	// and Mkdir. The directory lands in the renamed parent.
	sp, err := r.Lookup(filepath.Join(root, "a", "b", "new"))
	if err != nil {
		t.Fatal(err)
	}
	defer sp.Close()
	if err := os.Rename(filepath.Join(root, "a", "b"), filepath.Join(root, "a", "moved")); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink(outside, filepath.Join(root, "a", "b")); err != nil {
		t.Fatal(err)
	}
	if made, err := sp.Mkdir(0o750); !made || err != nil {
		t.Fatalf("Mkdir: %v, %v", made, err)
	}
	if fi, err := os.Stat(filepath.Join(root, "a", "moved", "new")); err != nil || !fi.IsDir() {
		t.Errorf("the directory is not in the parent that was looked up: %v", err)
	}
	if made, err := sp.CreateFile(0o640); made || err == nil {
		t.Errorf("CreateFile over the directory: %v, %v", made, err)
	}

	// The last name: a directory when looked up, a link out when used.
	victim := filepath.Join(root, "a", "victim")
	if err := os.Mkdir(victim, 0o750); err != nil {
		t.Fatal(err)
	}
	sv, err := r.Lookup(victim)
	if err != nil {
		t.Fatal(err)
	}
	defer sv.Close()
	if err := os.Remove(victim); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink(outside, victim); err != nil {
		t.Fatal(err)
	}
	if _, err := sv.Open(); !errors.Is(err, ErrSymlink) {
		t.Errorf("Open of a swapped-in link: %v, want ErrSymlink", err)
	}
	if _, err := sv.Stat(); !errors.Is(err, ErrSymlink) {
		t.Errorf("Stat of a swapped-in link: %v, want ErrSymlink", err)
	}
	if _, err := sv.Mkdir(0o750); err == nil {
		t.Error("Mkdir over a swapped-in link")
	}
	if _, err := sv.CreateFile(0o640); err == nil {
		t.Error("CreateFile over a swapped-in link")
	}
	if err := sv.Remove(); !errors.Is(err, ErrSymlink) {
		t.Errorf("Remove of a swapped-in link: %v, want ErrSymlink", err)
	}
	if fi, err := os.Lstat(victim); err != nil || fi.Mode()&os.ModeSymlink == 0 {
		t.Errorf("the link was removed or changed: %v, %v", fi, err)
	}
	if after := listing(t, outside); after != before {
		t.Errorf("outside changed:\n%s\n%s", before, after)
	}
}
