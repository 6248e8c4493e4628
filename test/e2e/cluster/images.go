package cluster

import (
	"archive/tar"
	"bufio"
	"context"
	"crypto/sha256"
	"debug/elf"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"hash"
	"io"
	"io/fs"
	"maps"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"time"

	"github.com/csi-dmthin/csi-dmthin/internal/vmtest"
)

// Image describes a single-layer image to write as a docker-archive tarball
// (what `docker save` writes and `ctr images import` reads): manifest.json,
// the config blob and one layer tar. No registry and no container engine is
// involved.
type Image struct {
	Ref        string            // e.g. "localhost/sig-storage/csi-provisioner:v6.4.0"
	RootDir    string            // a directory tree copied into the layer as /, or ""
	Files      map[string]string // image path -> host file, added over RootDir
	Links      map[string]string // image path -> symlink target
	Entrypoint []string
	Cmd        []string
	Env        []string
}

// imageFormat changes when the archive layout changes.
const imageFormat = "e2e-image-2"

// WriteImage writes one image as a docker-archive; see WriteImages.
func WriteImage(img Image) (string, error) {
	return WriteImages(strings.NewReplacer("/", "_", ":", "_").Replace(img.Ref), []Image{img})
}

// WriteImages writes the images into one docker-archive tarball,
// <cache>/e2e/images/<name>-<key>.tar, and returns its path. One archive
// holds them all because each `ctr images import` in the guest costs
// seconds under TCG. key hashes every reference, config and input file's
// path, size and modification time; an archive already there is reused.
func WriteImages(name string, imgs []Image) (string, error) {
	cache, err := vmtest.CacheDir()
	if err != nil {
		return "", err
	}
	dir := filepath.Join(cache, "e2e", "images")
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return "", err
	}
	h := sha256.New()
	fmt.Fprintf(h, "%s\n", imageFormat)
	layers := make([][]layerFile, len(imgs))
	for i, img := range imgs {
		files, err := img.layerFiles()
		if err != nil {
			return "", err
		}
		layers[i] = files
		fmt.Fprintf(h, "%s\n%q\n%q\n%q\n", img.Ref, img.Entrypoint, img.Cmd, img.Env)
		for _, f := range files {
			fmt.Fprintf(h, "%s %s %o %d %d %s\n", f.name, f.host, f.mode, f.size, f.mtime.UnixNano(), f.link)
		}
	}
	out := filepath.Join(dir, name+"-"+hex.EncodeToString(h.Sum(nil))[:16]+".tar")
	if _, err := os.Stat(out); err == nil {
		return out, nil
	}
	if err := writeArchive(out, imgs, layers); err != nil {
		return "", fmt.Errorf("cluster: images %s: %w", name, err)
	}
	// Earlier archives of the same name are stale (hundreds of MB each):
	// every driver rebuild makes a new one.
	old, _ := filepath.Glob(filepath.Join(dir, name+"-????????????????.tar"))
	for _, o := range old {
		if o != out {
			_ = os.Remove(o)
		}
	}
	return out, nil
}

// layerFile is one entry of the layer.
type layerFile struct {
	name  string // path in the image, without a leading slash
	host  string // regular files: host path
	link  string // symlinks: target
	mode  fs.FileMode
	size  int64
	mtime time.Time
}

// layerFiles lists the layer's entries, sorted by name so parents come
// first and the archive is reproducible.
func (img Image) layerFiles() ([]layerFile, error) {
	byName := map[string]layerFile{}
	if img.RootDir != "" {
		err := filepath.WalkDir(img.RootDir, func(p string, d fs.DirEntry, err error) error {
			if err != nil {
				return err
			}
			rel, err := filepath.Rel(img.RootDir, p)
			if err != nil || rel == "." {
				return err
			}
			fi, err := os.Lstat(p)
			if err != nil {
				return err
			}
			f := layerFile{name: filepath.ToSlash(rel), mode: fi.Mode(), mtime: fi.ModTime()}
			switch {
			case fi.Mode()&fs.ModeSymlink != 0:
				if f.link, err = os.Readlink(p); err != nil {
					return err
				}
			case fi.Mode().IsRegular():
				f.host, f.size = p, fi.Size()
			case fi.IsDir():
			default:
				return nil // devices, sockets: not in a package's data
			}
			byName[f.name] = f
			return nil
		})
		if err != nil {
			return nil, err
		}
	}
	for name, host := range img.Files {
		fi, err := os.Stat(host)
		if err != nil {
			return nil, err
		}
		name = strings.TrimPrefix(filepath.ToSlash(filepath.Clean(name)), "/")
		byName[name] = layerFile{name: name, host: host, mode: fi.Mode().Perm(), size: fi.Size(), mtime: fi.ModTime()}
		// Parent directories the tree may not have.
		for d := filepath.Dir(name); d != "." && d != "/"; d = filepath.Dir(d) {
			if _, ok := byName[d]; !ok {
				byName[d] = layerFile{name: d, mode: fs.ModeDir | 0o755}
			}
		}
	}
	for name, target := range img.Links {
		name = strings.TrimPrefix(filepath.ToSlash(filepath.Clean(name)), "/")
		byName[name] = layerFile{name: name, link: target, mode: fs.ModeSymlink | 0o777}
		for d := filepath.Dir(name); d != "." && d != "/"; d = filepath.Dir(d) {
			if _, ok := byName[d]; !ok {
				byName[d] = layerFile{name: d, mode: fs.ModeDir | 0o755}
			}
		}
	}
	if _, ok := byName["tmp"]; !ok {
		byName["tmp"] = layerFile{name: "tmp", mode: fs.ModeDir | fs.ModeSticky | 0o777}
	}
	files := make([]layerFile, 0, len(byName))
	for _, f := range byName {
		files = append(files, f)
	}
	sort.Slice(files, func(i, j int) bool { return files[i].name < files[j].name })
	return files, nil
}

// writeArchive builds each layer tar in a temporary file (hashing it for
// the config's diff_id), then the outer archive, then renames it into place.
func writeArchive(out string, imgs []Image, layers [][]layerFile) error {
	tmp, err := os.CreateTemp(filepath.Dir(out), ".image-*")
	if err != nil {
		return err
	}
	defer func() { _ = tmp.Close(); _ = os.Remove(tmp.Name()) }()
	tw := tar.NewWriter(tmp)
	add := func(name string, data []byte) error {
		if err := tw.WriteHeader(&tar.Header{Name: name, Mode: 0o644, Size: int64(len(data)), Typeflag: tar.TypeReg}); err != nil {
			return err
		}
		_, err := tw.Write(data)
		return err
	}
	var manifest []map[string]any
	for i, img := range imgs {
		configName, layerName, err := img.addTo(tw, add, layers[i])
		if err != nil {
			return fmt.Errorf("%s: %w", img.Ref, err)
		}
		manifest = append(manifest, map[string]any{"Config": configName, "RepoTags": []string{img.Ref}, "Layers": []string{layerName}})
	}
	m, err := json.Marshal(manifest)
	if err != nil {
		return err
	}
	if err := add("manifest.json", m); err != nil {
		return err
	}
	if err := tw.Close(); err != nil {
		return err
	}
	if err := tmp.Chmod(0o644); err != nil {
		return err
	}
	if err := tmp.Close(); err != nil {
		return err
	}
	return os.Rename(tmp.Name(), out)
}

// addTo writes the image's layer and config into the outer archive.
func (img Image) addTo(tw *tar.Writer, add func(string, []byte) error, files []layerFile) (configName, layerName string, err error) {
	layer, err := os.CreateTemp("", "csi-dmthin-layer-*")
	if err != nil {
		return "", "", err
	}
	defer func() { _ = layer.Close(); _ = os.Remove(layer.Name()) }()
	lh := sha256.New()
	bw := bufio.NewWriterSize(io.MultiWriter(layer, lh), 1<<20)
	if err := writeLayer(bw, files); err != nil {
		return "", "", err
	}
	if err := bw.Flush(); err != nil {
		return "", "", err
	}
	layerSize, err := layer.Seek(0, io.SeekCurrent)
	if err != nil {
		return "", "", err
	}
	diffID := "sha256:" + hex.EncodeToString(lh.Sum(nil))
	type containerConfig struct {
		Entrypoint []string `json:"Entrypoint,omitempty"`
		Cmd        []string `json:"Cmd,omitempty"`
		Env        []string `json:"Env,omitempty"`
	}
	env := img.Env
	if len(env) == 0 {
		env = []string{"PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"}
	}
	config, err := json.Marshal(map[string]any{
		"architecture": "amd64",
		"os":           "linux",
		"created":      "1970-01-01T00:00:00Z",
		"config":       containerConfig{Entrypoint: img.Entrypoint, Cmd: img.Cmd, Env: env},
		"rootfs":       map[string]any{"type": "layers", "diff_ids": []string{diffID}},
		"history":      []map[string]string{{"created": "1970-01-01T00:00:00Z", "created_by": "csi-dmthin test/e2e/cluster"}},
	})
	if err != nil {
		return "", "", err
	}
	configName = sha256Hex(config) + ".json"
	layerName = strings.TrimPrefix(diffID, "sha256:") + "/layer.tar"
	if err := add(configName, config); err != nil {
		return "", "", err
	}
	if err := tw.WriteHeader(&tar.Header{Name: filepath.Dir(layerName) + "/", Mode: 0o755, Typeflag: tar.TypeDir}); err != nil {
		return "", "", err
	}
	if err := tw.WriteHeader(&tar.Header{Name: layerName, Mode: 0o644, Size: layerSize, Typeflag: tar.TypeReg}); err != nil {
		return "", "", err
	}
	if _, err := layer.Seek(0, io.SeekStart); err != nil {
		return "", "", err
	}
	_, err = io.Copy(tw, layer)
	return configName, layerName, err
}

// writeLayer writes the files as a tar owned by root.
func writeLayer(w io.Writer, files []layerFile) error {
	tw := tar.NewWriter(w)
	for _, f := range files {
		hdr := &tar.Header{Name: f.name, Mode: int64(f.mode.Perm()), ModTime: f.mtime, Format: tar.FormatPAX}
		if f.mode&fs.ModeSticky != 0 {
			hdr.Mode |= 0o1000
		}
		if f.mode&fs.ModeSetuid != 0 {
			hdr.Mode |= 0o4000
		}
		switch {
		case f.mode.IsDir():
			hdr.Typeflag, hdr.Name = tar.TypeDir, f.name+"/"
		case f.link != "":
			hdr.Typeflag, hdr.Linkname = tar.TypeSymlink, f.link
		default:
			hdr.Typeflag, hdr.Size = tar.TypeReg, f.size
		}
		if err := tw.WriteHeader(hdr); err != nil {
			return err
		}
		if hdr.Typeflag == tar.TypeReg {
			fh, err := os.Open(f.host)
			if err != nil {
				return err
			}
			n, err := io.Copy(tw, fh)
			_ = fh.Close()
			if err != nil {
				return err
			}
			if n != f.size {
				return fmt.Errorf("%s changed size while being archived", f.host)
			}
		}
	}
	return tw.Close()
}

func sha256Hex(b []byte) string {
	var h hash.Hash = sha256.New()
	h.Write(b)
	return hex.EncodeToString(h.Sum(nil))
}

// DebianRootfs returns a directory holding the given Debian packages and
// everything they depend on (recursively, without recommends), each
// unpacked with `dpkg-deb -x` from `apt-get download`: the userland of an
// image without a base image or a container engine. Cached under
// <cache>/e2e/debs/<key> by the package list and apt's lists.
func DebianRootfs(ctx context.Context, packages []string) (string, error) {
	cache, err := vmtest.CacheDir()
	if err != nil {
		return "", err
	}
	lists, _ := filepath.Glob("/var/lib/apt/lists/*_Packages*")
	h := sha256.New()
	fmt.Fprintf(h, "%q\n", packages)
	for _, l := range lists {
		if fi, err := os.Stat(l); err == nil {
			fmt.Fprintf(h, "%s %d %d\n", l, fi.Size(), fi.ModTime().UnixNano())
		}
	}
	dir := filepath.Join(cache, "e2e", "debs", hex.EncodeToString(h.Sum(nil))[:16])
	root := filepath.Join(dir, "root")
	if _, err := os.Stat(filepath.Join(dir, ".done")); err == nil {
		return root, nil
	}
	_ = os.RemoveAll(dir)
	if err := os.MkdirAll(filepath.Join(dir, "debs"), 0o755); err != nil {
		return "", err
	}
	args := append([]string{"depends", "--recurse", "--no-recommends", "--no-suggests", "--no-conflicts",
		"--no-breaks", "--no-replaces", "--no-enhances"}, packages...)
	out, err := output(ctx, "", "apt-cache", args...)
	if err != nil {
		return "", err
	}
	seen := map[string]bool{}
	var all []string
	for _, line := range strings.Split(string(out), "\n") {
		if line == "" || strings.HasPrefix(line, " ") || strings.HasPrefix(line, "<") {
			continue
		}
		name := strings.TrimSpace(line)
		if !seen[name] {
			seen[name] = true
			all = append(all, name)
		}
	}
	if err := run(ctx, filepath.Join(dir, "debs"), "apt-get", append([]string{"download"}, all...)...); err != nil {
		return "", err
	}
	debs, _ := filepath.Glob(filepath.Join(dir, "debs", "*.deb"))
	for _, d := range debs {
		if err := run(ctx, "", "dpkg-deb", "-x", d, root); err != nil {
			return "", err
		}
	}
	// What debian:*-slim leaves out too (dpkg path-exclude there).
	for _, d := range []string{"usr/share/doc", "usr/share/man", "usr/share/info", "usr/share/locale"} {
		_ = os.RemoveAll(filepath.Join(root, d))
	}
	if err := os.WriteFile(filepath.Join(dir, ".done"), []byte(strings.Join(all, "\n")+"\n"), 0o644); err != nil {
		return "", err
	}
	return root, nil
}

// ReadPackageList parses hack/runtime-packages.txt: one name a line, '#'
// comments, blank lines ignored.
func ReadPackageList(path string) ([]string, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	var pkgs []string
	for _, line := range strings.Split(string(data), "\n") {
		if i := strings.IndexByte(line, '#'); i >= 0 {
			line = line[:i]
		}
		if line = strings.TrimSpace(line); line != "" {
			pkgs = append(pkgs, line)
		}
	}
	return pkgs, nil
}

// BusyboxImage is the image of the scenario tests' pods.
const BusyboxImage = "localhost/e2e/busybox:1"

// StorageSuiteImages are the images Kubernetes' external storage suite runs,
// under the references its e2e.test asks for (`e2e.test -storage-images`):
// busybox's applets for the busybox-shaped roles, and for agnhost the
// agnhost program over the same applets (its specs use its mounttest and
// pause commands, and nsenter for host exec). They are meant for
// BuildImages' extra, which builds the pause binary they share.
func StorageSuiteImages(ctx context.Context, tools *Tools) ([]Image, error) {
	out, err := output(ctx, "", tools.Path("e2e.test"), "-storage-images")
	if err != nil {
		return nil, err
	}
	binDir, err := mainBinDir()
	if err != nil {
		return nil, err
	}
	bb, err := busyboxImage(ctx, "")
	if err != nil {
		return nil, err
	}
	var imgs []Image
	for _, line := range strings.Split(strings.TrimSpace(string(out)), "\n") {
		role, ref, ok := strings.Cut(line, "=")
		if !ok || ref == "" {
			return nil, fmt.Errorf("cluster: e2e.test -storage-images printed %q", line)
		}
		img := bb
		img.Ref = ref
		switch role {
		case "busybox", "nginx", "glibc-dns-testing":
		case "agnhost":
			img.Files = map[string]string{"/agnhost": tools.Path("agnhost")}
			maps.Copy(img.Files, bb.Files)
			img.Entrypoint = []string{"/agnhost"}
		case "pause":
			img = Image{Ref: ref, Files: map[string]string{"/pause": filepath.Join(binDir, "pause")}, Entrypoint: []string{"/pause"}}
		default:
			return nil, fmt.Errorf("cluster: e2e.test wants an image for %q (%s), which the harness does not know how to build", role, ref)
		}
		imgs = append(imgs, img)
	}
	sort.Slice(imgs, func(i, j int) bool { return imgs[i].Ref < imgs[j].Ref })
	return imgs, nil
}

// mainBinDir is where BuildImages builds the main module's binaries that go
// into images (the driver, pause).
func mainBinDir() (string, error) {
	cache, err := vmtest.CacheDir()
	if err != nil {
		return "", err
	}
	return filepath.Join(cache, "e2e", "main-bin"), nil
}

// busyboxImage is the host's static busybox with a link for every applet
// but sh and dd, the host's GNU dd and dash (/bin/sh, the entry point) with
// the libraries they load. GNU dd because the storage suite's block specs
// write with oflag=nocache, which busybox's dd refuses (the suite's own
// busybox image knows it); dash because Debian's static busybox is built
// with its shell "standalone": its sh runs its own applet for `dd` whatever
// /bin/dd is, so a busybox sh never reaches GNU dd.
func busyboxImage(ctx context.Context, ref string) (Image, error) {
	applets, err := output(ctx, "", "/bin/busybox", "--list")
	if err != nil {
		return Image{}, fmt.Errorf("busybox-static: %w", err)
	}
	links := map[string]string{}
	for _, a := range strings.Fields(string(applets)) {
		if a != "busybox" && a != "dd" && a != "sh" {
			links["/bin/"+a] = "busybox"
		}
	}
	links["/bin/sh"] = "dash"
	files := map[string]string{"/bin/busybox": "/bin/busybox"}
	for _, prog := range []struct{ name, pkg string }{{"dd", "coreutils"}, {"dash", "dash"}} {
		path, err := exec.LookPath(prog.name)
		if err != nil {
			return Image{}, fmt.Errorf("%s (Debian package %s): %w", prog.name, prog.pkg, err)
		}
		libs, err := elfLibraries(path)
		if err != nil {
			return Image{}, err
		}
		maps.Copy(files, libs)
		files["/bin/"+prog.name] = path
	}
	return Image{Ref: ref, Files: files, Links: links, Entrypoint: []string{"/bin/sh"}}, nil
}

// libraryDirs are where the host's shared libraries are (Debian's
// multiarch layout, and the loader's).
var libraryDirs = []string{"/lib/x86_64-linux-gnu", "/usr/lib/x86_64-linux-gnu", "/lib64", "/usr/lib64", "/lib", "/usr/lib"}

// elfLibraries returns what a dynamically linked host program needs to run
// in an image: its interpreter, at the path the program names, and every
// library it loads, directly or through another, under
// /lib/x86_64-linux-gnu; as image path -> host path.
func elfLibraries(program string) (map[string]string, error) {
	files := map[string]string{}
	queue := []string{program}
	for len(queue) > 0 {
		path := queue[0]
		queue = queue[1:]
		f, err := elf.Open(path)
		if err != nil {
			return nil, fmt.Errorf("cluster: %s: %w", path, err)
		}
		for _, p := range f.Progs {
			if p.Type != elf.PT_INTERP {
				continue
			}
			b := make([]byte, p.Filesz)
			if _, err := p.ReadAt(b, 0); err != nil {
				_ = f.Close()
				return nil, fmt.Errorf("cluster: %s: interpreter: %w", path, err)
			}
			interp := strings.TrimRight(string(b), "\x00")
			files[interp] = interp
		}
		needed, err := f.ImportedLibraries()
		_ = f.Close()
		if err != nil {
			return nil, fmt.Errorf("cluster: %s: %w", path, err)
		}
		for _, lib := range needed {
			dst := "/lib/x86_64-linux-gnu/" + lib
			if _, done := files[dst]; done {
				continue
			}
			var found string
			for _, d := range libraryDirs {
				if _, err := os.Stat(filepath.Join(d, lib)); err == nil {
					found = filepath.Join(d, lib)
					break
				}
			}
			if found == "" {
				return nil, fmt.Errorf("cluster: %s needs %s, which is in none of %v", path, lib, libraryDirs)
			}
			files[dst] = found
			queue = append(queue, found)
		}
	}
	return files, nil
}

// BuildImages writes the pause, driver and sidecar images, named as the
// chart's defaults name them (registry "localhost"), and extra (the storage
// suite's), all in one archive. With withoutDriver, only the pause and
// busybox images are written.
func BuildImages(ctx context.Context, repo string, v Versions, tools *Tools, driverTag string, withoutDriver bool, extra ...Image) (tars []string, driverRef, driverBinary string, err error) {
	binDir, err := mainBinDir()
	if err != nil {
		return nil, "", "", err
	}
	for name, pkg := range map[string]string{"csi-dmthin": "./cmd/csi-dmthin", "pause": "./test/e2e/images/pause"} {
		if err := goBuild(ctx, repo, filepath.Join(binDir, name), pkg); err != nil {
			return nil, "", "", err
		}
	}
	images := []Image{{Ref: PauseImage, Files: map[string]string{"/pause": filepath.Join(binDir, "pause")}, Entrypoint: []string{"/pause"}}}
	// The test pods' image: the host's static busybox with its applets.
	bb, err := busyboxImage(ctx, BusyboxImage)
	if err != nil {
		return nil, "", "", err
	}
	images = append(images, bb)
	if !withoutDriver {
		// The driver image holds what the Dockerfile's runtime stage
		// installs: the packages of hack/runtime-packages.txt (with their
		// dependencies) and the static binary.
		pkgs, err := ReadPackageList(filepath.Join(repo, "hack", "runtime-packages.txt"))
		if err != nil {
			return nil, "", "", fmt.Errorf("the driver image's package list: %w", err)
		}
		debRoot, err := DebianRootfs(ctx, pkgs)
		if err != nil {
			return nil, "", "", err
		}
		driverRef = "localhost/csi-dmthin:" + driverTag
		images = append(images, Image{Ref: driverRef, RootDir: debRoot, Files: map[string]string{"/usr/bin/csi-dmthin": filepath.Join(binDir, "csi-dmthin")},
			Entrypoint: []string{"/usr/bin/csi-dmthin"}, Cmd: []string{"serve"},
			Env: []string{"PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL=C"}})
		for _, sc := range []struct{ name, version string }{
			{"csi-provisioner", v["CSI_PROVISIONER_VERSION"]},
			{"csi-snapshotter", v["CSI_SNAPSHOTTER_VERSION"]},
			{"csi-resizer", v["CSI_RESIZER_VERSION"]},
		} {
			images = append(images, Image{
				Ref:        "localhost/sig-storage/" + sc.name + ":" + sc.version,
				Files:      map[string]string{"/" + sc.name: tools.Path(sc.name)},
				Entrypoint: []string{"/" + sc.name},
			})
		}
	}
	images = append(images, extra...)
	name := "e2e-images"
	if withoutDriver {
		name = "e2e-images-cluster-only"
	}
	p, err := WriteImages(name, images)
	if err != nil {
		return nil, "", "", err
	}
	return []string{p}, driverRef, filepath.Join(binDir, "csi-dmthin"), nil
}

// goBuild builds a package of the main module statically, replacing out only
// when the binary changed (so the image cache keyed on it stays warm).
func goBuild(ctx context.Context, repo, out, pkg string) error {
	if err := os.MkdirAll(filepath.Dir(out), 0o755); err != nil {
		return err
	}
	tmp := out + ".new"
	// Stripped (-s -w): the binary goes into an image the guest imports.
	cmd := exec.CommandContext(ctx, "go", "build", "-trimpath", "-ldflags=-s -w", "-o", tmp, pkg)
	cmd.Dir = repo
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	if b, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("go build %s: %w\n%s", pkg, err, b)
	}
	if same(tmp, out) {
		return os.Remove(tmp)
	}
	return os.Rename(tmp, out)
}

func same(a, b string) bool {
	x, err1 := os.ReadFile(a)
	y, err2 := os.ReadFile(b)
	return err1 == nil && err2 == nil && string(x) == string(y)
}
