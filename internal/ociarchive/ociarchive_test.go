package ociarchive

import (
	"archive/tar"
	"bytes"
	"compress/gzip"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// readArchive returns the archive's files by name.
func readArchive(t *testing.T, path string) map[string][]byte {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	out := map[string][]byte{}
	tr := tar.NewReader(f)
	for {
		h, err := tr.Next()
		if err == io.EOF {
			return out
		}
		if err != nil {
			t.Fatal(err)
		}
		b, err := io.ReadAll(tr)
		if err != nil {
			t.Fatal(err)
		}
		out[h.Name] = b
	}
}

func blob(t *testing.T, files map[string][]byte, digest string) []byte {
	t.Helper()
	b, ok := files[blobName(digest)]
	if !ok {
		t.Fatalf("no blob %s", digest)
	}
	sum := sha256.Sum256(b)
	if "sha256:"+hex.EncodeToString(sum[:]) != digest {
		t.Fatalf("blob %s holds content of another digest", digest)
	}
	return b
}

// The archive is an OCI image layout a loader reads: index, manifest,
// config and layer tied by their digests, the name in the index, the
// config's diff_id the uncompressed layer's, and the files with their
// modes; written twice, it is the same bytes.
func TestWrite(t *testing.T) {
	dir := t.TempDir()
	root := filepath.Join(dir, "root")
	for p, content := range map[string]string{"usr/sbin/mkfs.ext4": "#!mkfs", "etc/ld.so.conf": "x"} {
		if err := os.MkdirAll(filepath.Join(root, filepath.Dir(p)), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(root, p), []byte(content), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.Symlink("mkfs.ext4", filepath.Join(root, "usr/sbin/mke2fs")); err != nil {
		t.Fatal(err)
	}
	bin := filepath.Join(dir, "csi-dmthin")
	if err := os.WriteFile(bin, []byte("\x7fELF driver"), 0o755); err != nil {
		t.Fatal(err)
	}
	img := Image{Ref: "localhost/csi-dmthin:1.2.3", RootDir: root, Files: map[string]string{"/usr/bin/csi-dmthin": bin},
		Entrypoint: []string{"/usr/bin/csi-dmthin"}, Cmd: []string{"serve"}, Env: []string{"LC_ALL=C"}, Created: time.Unix(1700000000, 0),
		Dirs: map[string]os.FileMode{"tmp": os.ModeSticky | 0o777}}
	out := filepath.Join(dir, "image.oci.tar")
	digest, err := Write(out, img)
	if err != nil {
		t.Fatal(err)
	}
	files := readArchive(t, out)
	if string(files["oci-layout"]) != `{"imageLayoutVersion":"1.0.0"}` {
		t.Errorf("oci-layout %q", files["oci-layout"])
	}
	var index struct {
		SchemaVersion int          `json:"schemaVersion"`
		Manifests     []descriptor `json:"manifests"`
	}
	if err := json.Unmarshal(files["index.json"], &index); err != nil {
		t.Fatal(err)
	}
	if index.SchemaVersion != 2 || len(index.Manifests) != 1 || index.Manifests[0].Digest != digest ||
		index.Manifests[0].Annotations["io.containerd.image.name"] != img.Ref || index.Manifests[0].Annotations["org.opencontainers.image.ref.name"] != img.Ref {
		t.Fatalf("index %s", files["index.json"])
	}
	var manifest struct {
		Config descriptor   `json:"config"`
		Layers []descriptor `json:"layers"`
	}
	if err := json.Unmarshal(blob(t, files, digest), &manifest); err != nil {
		t.Fatal(err)
	}
	var config struct {
		Architecture string `json:"architecture"`
		OS           string `json:"os"`
		Config       struct {
			Entrypoint, Cmd, Env []string
		} `json:"config"`
		Rootfs struct {
			DiffIDs []string `json:"diff_ids"`
		} `json:"rootfs"`
	}
	if err := json.Unmarshal(blob(t, files, manifest.Config.Digest), &config); err != nil {
		t.Fatal(err)
	}
	if config.OS != "linux" || config.Architecture != "amd64" || config.Config.Entrypoint[0] != "/usr/bin/csi-dmthin" || config.Config.Cmd[0] != "serve" || len(manifest.Layers) != 1 {
		t.Fatalf("config %+v, manifest %+v", config, manifest)
	}
	gz, err := gzip.NewReader(bytes.NewReader(blob(t, files, manifest.Layers[0].Digest)))
	if err != nil {
		t.Fatal(err)
	}
	raw, err := io.ReadAll(gz)
	if err != nil {
		t.Fatal(err)
	}
	if sum := sha256.Sum256(raw); len(config.Rootfs.DiffIDs) != 1 || config.Rootfs.DiffIDs[0] != "sha256:"+hex.EncodeToString(sum[:]) {
		t.Errorf("diff_ids %q do not match the layer", config.Rootfs.DiffIDs)
	}
	var names []string
	tr := tar.NewReader(bytes.NewReader(raw))
	for {
		h, err := tr.Next()
		if err == io.EOF {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		names = append(names, h.Name)
		if h.Uid != 0 || h.Gid != 0 || !h.ModTime.Equal(img.Created) {
			t.Errorf("%s: owner %d:%d, mtime %v", h.Name, h.Uid, h.Gid, h.ModTime)
		}
		switch h.Name {
		case "usr/bin/csi-dmthin":
			b, _ := io.ReadAll(tr)
			if string(b) != "\x7fELF driver" || h.Mode != 0o755 {
				t.Errorf("the driver: %q mode %o", b, h.Mode)
			}
		case "tmp/":
			if h.Typeflag != tar.TypeDir || h.Mode != 0o1777 {
				t.Errorf("/tmp: %+v", h)
			}
		case "usr/sbin/mke2fs":
			if h.Typeflag != tar.TypeSymlink || h.Linkname != "mkfs.ext4" {
				t.Errorf("the link: %+v", h)
			}
		}
	}
	want := "etc/,etc/ld.so.conf,tmp/,usr/,usr/bin/,usr/bin/csi-dmthin,usr/sbin/,usr/sbin/mke2fs,usr/sbin/mkfs.ext4"
	if got := strings.Join(names, ","); got != want {
		t.Errorf("layer %s, want %s", got, want)
	}
	// Reproducible.
	out2 := filepath.Join(dir, "again.oci.tar")
	if d2, err := Write(out2, img); err != nil || d2 != digest {
		t.Errorf("written again: %s, %v; want %s", d2, err, digest)
	}
	a, _ := os.ReadFile(out)
	b, _ := os.ReadFile(out2)
	if !bytes.Equal(a, b) {
		t.Error("two writes of one image differ")
	}
	if _, err := Write(filepath.Join(dir, "x"), Image{}); err == nil {
		t.Error("an image without a name was written")
	}
}
