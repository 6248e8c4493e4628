package cluster

import (
	"archive/tar"
	"bytes"
	"context"
	"encoding/json"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"strings"
	"syscall"
	"testing"
)

// TestWriteImage checks the docker-archive layout `ctr images import`
// reads: manifest.json naming the config and the layer, the config's
// diff_id, and the files in the layer.
func TestWriteImage(t *testing.T) {
	t.Setenv("CSI_DMTHIN_CACHE", t.TempDir())
	bin := filepath.Join(t.TempDir(), "hello")
	if err := os.WriteFile(bin, []byte("#!/bin/true\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	img := Image{Ref: "localhost/test/hello:v1", Files: map[string]string{"/usr/bin/hello": bin}, Entrypoint: []string{"/usr/bin/hello"}}
	path, err := WriteImage(img)
	if err != nil {
		t.Fatal(err)
	}
	again, err := WriteImage(img)
	if err != nil || again != path {
		t.Fatalf("second WriteImage = %q, %v; want the cached %q", again, err, path)
	}
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	blobs := map[string][]byte{}
	tr := tar.NewReader(f)
	for {
		hdr, err := tr.Next()
		if err == io.EOF {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		b, _ := io.ReadAll(tr)
		blobs[hdr.Name] = b
	}
	var manifest []struct {
		Config   string
		RepoTags []string
		Layers   []string
	}
	if err := json.Unmarshal(blobs["manifest.json"], &manifest); err != nil || len(manifest) != 1 {
		t.Fatalf("manifest.json: %v %s", err, blobs["manifest.json"])
	}
	m := manifest[0]
	if len(m.RepoTags) != 1 || m.RepoTags[0] != img.Ref {
		t.Errorf("RepoTags = %q", m.RepoTags)
	}
	var config struct {
		Config struct{ Entrypoint []string }
		RootFS struct {
			DiffIDs []string `json:"diff_ids"`
		} `json:"rootfs"`
	}
	if err := json.Unmarshal(blobs[m.Config], &config); err != nil {
		t.Fatal(err)
	}
	if len(m.Layers) != 1 || len(config.RootFS.DiffIDs) != 1 || config.RootFS.DiffIDs[0] != "sha256:"+sha256Hex(blobs[m.Layers[0]]) {
		t.Fatalf("layers %q, diff_ids %q", m.Layers, config.RootFS.DiffIDs)
	}
	names := map[string]bool{}
	lr := tar.NewReader(bytes.NewReader(blobs[m.Layers[0]]))
	for {
		hdr, err := lr.Next()
		if err != nil {
			break
		}
		names[hdr.Name] = true
	}
	for _, want := range []string{"usr/", "usr/bin/", "usr/bin/hello", "tmp/"} {
		if !names[want] {
			t.Errorf("layer lacks %s; has %v", want, names)
		}
	}
}

// TestWriteImagesPrunesStale checks that a new archive of the same name
// replaces the old one rather than piling up in the cache.
func TestWriteImagesPrunesStale(t *testing.T) {
	t.Setenv("CSI_DMTHIN_CACHE", t.TempDir())
	bin := filepath.Join(t.TempDir(), "x")
	for i, content := range []string{"one\n", "two, longer\n"} {
		if err := os.WriteFile(bin, []byte(content), 0o755); err != nil {
			t.Fatal(err)
		}
		p, err := WriteImages("bundle", []Image{{Ref: "localhost/x:1", Files: map[string]string{"/x": bin}}})
		if err != nil {
			t.Fatal(err)
		}
		all, _ := filepath.Glob(filepath.Join(filepath.Dir(p), "bundle-*.tar"))
		if len(all) != 1 || all[0] != p {
			t.Fatalf("write %d: archives %q, want only %q", i, all, p)
		}
	}
}

// StorageSuiteImages builds one image per role the suite names, under the
// suite's own references, and refuses a role it does not know.
func TestStorageSuiteImages(t *testing.T) {
	if _, err := os.Stat("/bin/busybox"); err != nil {
		if os.Getenv("CI") == "true" {
			t.Fatal("needs busybox-static, which make deps installs")
		}
		t.Skip("needs busybox-static (make deps installs it)")
	}
	t.Setenv("CSI_DMTHIN_CACHE", t.TempDir())
	bin := t.TempDir()
	script := "#!/bin/sh\nprintf 'busybox=reg/busybox:1\\nagnhost=reg/agnhost:2\\npause=reg/pause:3\\nnginx=reg/nginx:4\\n'\n"
	if err := os.WriteFile(filepath.Join(bin, "e2e.test"), []byte(script), 0o755); err != nil {
		t.Fatal(err)
	}
	imgs, err := StorageSuiteImages(context.Background(), &Tools{Bin: bin})
	if err != nil {
		t.Fatal(err)
	}
	byRef := map[string]Image{}
	for _, img := range imgs {
		byRef[img.Ref] = img
	}
	if len(byRef) != 4 {
		t.Fatalf("images %v, want 4", imgs)
	}
	for _, ref := range []string{"reg/busybox:1", "reg/nginx:4", "reg/agnhost:2"} {
		img := byRef[ref]
		if img.Files["/bin/busybox"] != "/bin/busybox" || img.Links["/bin/ls"] != "busybox" || img.Links["/bin/sh"] != "dash" {
			t.Errorf("%s lacks busybox and its applets, or dash as sh: %+v %+v", ref, img.Files, img.Links)
		}
	}
	if a := byRef["reg/agnhost:2"]; a.Files["/agnhost"] != filepath.Join(bin, "agnhost") || !reflect.DeepEqual(a.Entrypoint, []string{"/agnhost"}) {
		t.Errorf("agnhost image %+v", a)
	}
	if _, ok := byRef["reg/busybox:1"].Files["/agnhost"]; ok {
		t.Error("the busybox image got agnhost too")
	}
	if p := byRef["reg/pause:3"]; !strings.HasSuffix(p.Files["/pause"], "/main-bin/pause") {
		t.Errorf("pause image %+v", p)
	}
	script = "#!/bin/sh\necho 'registry=reg/registry:1'\n"
	if err := os.WriteFile(filepath.Join(bin, "e2e.test"), []byte(script), 0o755); err != nil {
		t.Fatal(err)
	}
	if _, err := StorageSuiteImages(context.Background(), &Tools{Bin: bin}); err == nil || !strings.Contains(err.Error(), "registry") {
		t.Errorf("an unknown role: %v", err)
	}
}

// TestBusyboxImageHasGNUdd checks that the test image carries GNU dd, not
// busybox's, with the loader and libraries it needs, so oflag=nocache works.
func TestBusyboxImageHasGNUdd(t *testing.T) {
	if _, err := os.Stat("/bin/busybox"); err != nil {
		t.Skip("no /bin/busybox (busybox-static)")
	}
	img, err := busyboxImage(context.Background(), "localhost/test/busybox:1")
	if err != nil {
		t.Fatal(err)
	}
	if _, ok := img.Links["/bin/dd"]; ok {
		t.Fatal("/bin/dd is busybox's applet")
	}
	dd := img.Files["/bin/dd"]
	if out, err := exec.Command(dd, "--version").Output(); err != nil || !strings.Contains(string(out), "(coreutils)") {
		t.Fatalf("/bin/dd is %s: %q %v, want GNU coreutils' dd", dd, out, err)
	}
	if img.Files["/lib64/ld-linux-x86-64.so.2"] == "" || img.Files["/lib/x86_64-linux-gnu/libc.so.6"] == "" {
		t.Errorf("no loader or libc in %v", img.Files)
	}
	if img.Links["/bin/sh"] != "dash" {
		t.Errorf("/bin/sh -> %q, want dash", img.Links["/bin/sh"])
	}
}

// TestBusyboxImageShellRunsGNUdd runs the image's own shell in a root made
// of the image's files: `dd` typed at its sh must be GNU dd (a busybox sh
// runs its own applet whatever /bin/dd is), and the applets the scenarios'
// scripts use must still work.
func TestBusyboxImageShellRunsGNUdd(t *testing.T) {
	if _, err := os.Stat("/bin/busybox"); err != nil {
		t.Skip("no /bin/busybox (busybox-static)")
	}
	if os.Geteuid() != 0 {
		t.Skip("chroot needs root")
	}
	img, err := busyboxImage(context.Background(), "localhost/test/busybox:1")
	if err != nil {
		t.Fatal(err)
	}
	root := t.TempDir()
	for dst, src := range img.Files {
		data, err := os.ReadFile(src)
		if err != nil {
			t.Fatal(err)
		}
		if err := os.MkdirAll(filepath.Join(root, filepath.Dir(dst)), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(root, dst), data, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	for dst, target := range img.Links {
		if err := os.MkdirAll(filepath.Join(root, filepath.Dir(dst)), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.Symlink(target, filepath.Join(root, dst)); err != nil {
			t.Fatal(err)
		}
	}
	cmd := exec.Command("/bin/sh", "-c", `dd --version | head -n 1; echo x | dd of=/tmp-file oflag=nocache status=none && cat /tmp-file; i=0; i=$((i+1)); echo i=$i; sleep 0.1; sync /tmp-file && echo synced`)
	cmd.SysProcAttr = &syscall.SysProcAttr{Chroot: root}
	cmd.Dir = "/"
	cmd.Env = []string{"PATH=/bin"}
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("the image's sh: %v\n%s", err, out)
	}
	want := "x\ni=1\nsynced\n"
	if !strings.Contains(string(out), "dd (coreutils)") || !strings.HasSuffix(string(out), want) {
		t.Errorf("the image's sh printed %q; want GNU dd's version, then %q", out, want)
	}
}
