// Package ociarchive writes a single-layer container image as an OCI image
// layout in a tar archive, in Go, without a container engine: what
// `make image-archive` gives air-gapped operators to load on their nodes
// (`ctr -n k8s.io images import`, `podman load`, `docker load`).
//
// The layer is reproducible: entries sorted by name, owned by root, with
// one fixed modification time, so the same inputs give the same digests.
package ociarchive

import (
	"archive/tar"
	"compress/gzip"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path"
	"path/filepath"
	"sort"
	"strings"
	"time"
)

// Media types of the OCI image specification.
const (
	mediaIndex    = "application/vnd.oci.image.index.v1+json"
	mediaManifest = "application/vnd.oci.image.manifest.v1+json"
	mediaConfig   = "application/vnd.oci.image.config.v1+json"
	mediaLayer    = "application/vnd.oci.image.layer.v1.tar+gzip"
)

// Image is what goes into the archive.
type Image struct {
	// Ref names the image, e.g. "localhost/csi-dmthin:0.1.0"; importers
	// take it from the index's annotations.
	Ref string
	// RootDir is a directory tree copied in as /; may be empty.
	RootDir string
	// Files are added over RootDir: image path -> host file.
	Files map[string]string
	// Dirs are empty directories added with these modes (/tmp, say).
	Dirs       map[string]fs.FileMode
	Entrypoint []string
	Cmd        []string
	Env        []string
	// Created is the image's creation time and every entry's modification
	// time (SOURCE_DATE_EPOCH, say); zero means the Unix epoch.
	Created time.Time
	// Arch is the GOARCH-style architecture; default amd64.
	Arch string
}

// entry is one file of the layer.
type entry struct {
	name string // without a leading slash
	host string // for regular files
	link string // for symbolic links
	mode fs.FileMode
	size int64
}

// entries lists the layer: the tree under RootDir, then Files over it,
// with every parent directory, sorted by name.
func (img Image) entries() ([]entry, error) {
	byName := map[string]entry{}
	if img.RootDir != "" {
		err := filepath.WalkDir(img.RootDir, func(p string, d fs.DirEntry, err error) error {
			if err != nil {
				return err
			}
			rel, err := filepath.Rel(img.RootDir, p)
			if err != nil || rel == "." {
				return err
			}
			fi, err := d.Info()
			if err != nil {
				return err
			}
			e := entry{name: filepath.ToSlash(rel), mode: fi.Mode()}
			switch {
			case fi.Mode().IsRegular():
				e.host, e.size = p, fi.Size()
			case fi.Mode()&fs.ModeSymlink != 0:
				if e.link, err = os.Readlink(p); err != nil {
					return err
				}
			case fi.IsDir():
			default:
				return nil // devices, sockets, fifos: not in an image
			}
			byName[e.name] = e
			return nil
		})
		if err != nil {
			return nil, fmt.Errorf("ociarchive: %s: %w", img.RootDir, err)
		}
	}
	for name, host := range img.Files {
		fi, err := os.Stat(host)
		if err != nil {
			return nil, fmt.Errorf("ociarchive: %w", err)
		}
		if !fi.Mode().IsRegular() {
			return nil, fmt.Errorf("ociarchive: %s is not a regular file", host)
		}
		name = strings.TrimPrefix(path.Clean("/"+name), "/")
		byName[name] = entry{name: name, host: host, mode: fi.Mode().Perm(), size: fi.Size()}
		for d := path.Dir(name); d != "." && d != "/"; d = path.Dir(d) {
			if _, ok := byName[d]; !ok {
				byName[d] = entry{name: d, mode: fs.ModeDir | 0o755}
			}
		}
	}
	for name, mode := range img.Dirs {
		name = strings.TrimPrefix(path.Clean("/"+name), "/")
		byName[name] = entry{name: name, mode: fs.ModeDir | mode}
	}
	out := make([]entry, 0, len(byName))
	for _, e := range byName {
		out = append(out, e)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].name < out[j].name })
	return out, nil
}

// writeLayer writes the layer's tar to w.
func writeLayer(w io.Writer, es []entry, mtime time.Time) error {
	tw := tar.NewWriter(w)
	for _, e := range es {
		h := &tar.Header{Name: e.name, Mode: int64(e.mode.Perm()), ModTime: mtime, Format: tar.FormatPAX}
		if e.mode&fs.ModeSetuid != 0 {
			h.Mode |= 0o4000
		}
		if e.mode&fs.ModeSetgid != 0 {
			h.Mode |= 0o2000
		}
		if e.mode&fs.ModeSticky != 0 {
			h.Mode |= 0o1000
		}
		switch {
		case e.mode.IsDir():
			h.Typeflag, h.Name = tar.TypeDir, e.name+"/"
		case e.mode&fs.ModeSymlink != 0:
			h.Typeflag, h.Linkname = tar.TypeSymlink, e.link
		default:
			h.Typeflag, h.Size = tar.TypeReg, e.size
		}
		if err := tw.WriteHeader(h); err != nil {
			return err
		}
		if h.Typeflag != tar.TypeReg {
			continue
		}
		f, err := os.Open(e.host)
		if err != nil {
			return err
		}
		n, err := io.Copy(tw, f)
		f.Close()
		if err != nil {
			return err
		}
		if n != e.size {
			return fmt.Errorf("ociarchive: %s changed size while it was written", e.host)
		}
	}
	return tw.Close()
}

// descriptor is an OCI content descriptor.
type descriptor struct {
	MediaType   string            `json:"mediaType"`
	Digest      string            `json:"digest"`
	Size        int64             `json:"size"`
	Annotations map[string]string `json:"annotations,omitempty"`
	Platform    *platform         `json:"platform,omitempty"`
}

type platform struct {
	Architecture string `json:"architecture"`
	OS           string `json:"os"`
}

func digestOf(b []byte) string {
	s := sha256.Sum256(b)
	return "sha256:" + hex.EncodeToString(s[:])
}

// Write writes img as an OCI image layout tar to out (made anew) and
// returns the manifest's digest. The layer is built in a temporary file
// next to out.
func Write(out string, img Image) (string, error) {
	if img.Ref == "" {
		return "", errors.New("ociarchive: the image needs a reference")
	}
	if img.Arch == "" {
		img.Arch = "amd64"
	}
	mtime := img.Created
	if mtime.IsZero() {
		mtime = time.Unix(0, 0)
	}
	mtime = mtime.UTC()
	es, err := img.entries()
	if err != nil {
		return "", err
	}
	// The layer: gzip over tar, with the uncompressed digest (the
	// config's diff_id) and the compressed one computed on the way.
	tmp, err := os.CreateTemp(filepath.Dir(out), ".layer-*")
	if err != nil {
		return "", err
	}
	defer os.Remove(tmp.Name())
	defer tmp.Close()
	compressed := sha256.New()
	gz, err := gzip.NewWriterLevel(io.MultiWriter(tmp, compressed), gzip.BestCompression)
	if err != nil {
		return "", err
	}
	uncompressed := sha256.New()
	if err := writeLayer(io.MultiWriter(gz, uncompressed), es, mtime); err != nil {
		return "", fmt.Errorf("ociarchive: layer: %w", err)
	}
	if err := gz.Close(); err != nil {
		return "", err
	}
	layerSize, err := tmp.Seek(0, io.SeekCurrent)
	if err != nil {
		return "", err
	}
	layer := descriptor{MediaType: mediaLayer, Digest: "sha256:" + hex.EncodeToString(compressed.Sum(nil)), Size: layerSize}

	config, err := json.Marshal(map[string]any{
		"created":      mtime.Format(time.RFC3339),
		"architecture": img.Arch,
		"os":           "linux",
		"config":       map[string]any{"Entrypoint": img.Entrypoint, "Cmd": img.Cmd, "Env": img.Env},
		"rootfs":       map[string]any{"type": "layers", "diff_ids": []string{"sha256:" + hex.EncodeToString(uncompressed.Sum(nil))}},
		"history":      []map[string]any{{"created": mtime.Format(time.RFC3339), "created_by": "csi-dmthin ociarchive"}},
	})
	if err != nil {
		return "", err
	}
	manifest, err := json.Marshal(map[string]any{
		"schemaVersion": 2,
		"mediaType":     mediaManifest,
		"config":        descriptor{MediaType: mediaConfig, Digest: digestOf(config), Size: int64(len(config))},
		"layers":        []descriptor{layer},
	})
	if err != nil {
		return "", err
	}
	index, err := json.Marshal(map[string]any{
		"schemaVersion": 2,
		"mediaType":     mediaIndex,
		"manifests": []descriptor{{
			MediaType: mediaManifest, Digest: digestOf(manifest), Size: int64(len(manifest)),
			// containerd names the import by the first, podman and
			// docker by the second.
			Annotations: map[string]string{"io.containerd.image.name": img.Ref, "org.opencontainers.image.ref.name": img.Ref},
			Platform:    &platform{Architecture: img.Arch, OS: "linux"},
		}},
	})
	if err != nil {
		return "", err
	}

	f, err := os.Create(out)
	if err != nil {
		return "", err
	}
	defer f.Close()
	tw := tar.NewWriter(f)
	add := func(name string, b []byte) error {
		if err := tw.WriteHeader(&tar.Header{Name: name, Mode: 0o644, Size: int64(len(b)), ModTime: mtime, Typeflag: tar.TypeReg}); err != nil {
			return err
		}
		_, err := tw.Write(b)
		return err
	}
	for _, d := range []string{"blobs/", "blobs/sha256/"} {
		if err := tw.WriteHeader(&tar.Header{Name: d, Mode: 0o755, ModTime: mtime, Typeflag: tar.TypeDir}); err != nil {
			return "", err
		}
	}
	for _, blob := range []struct {
		name string
		b    []byte
	}{
		{"oci-layout", []byte(`{"imageLayoutVersion":"1.0.0"}`)},
		{"index.json", index},
		{blobName(digestOf(manifest)), manifest},
		{blobName(digestOf(config)), config},
	} {
		if err := add(blob.name, blob.b); err != nil {
			return "", err
		}
	}
	if _, err := tmp.Seek(0, io.SeekStart); err != nil {
		return "", err
	}
	if err := tw.WriteHeader(&tar.Header{Name: blobName(layer.Digest), Mode: 0o644, Size: layer.Size, ModTime: mtime, Typeflag: tar.TypeReg}); err != nil {
		return "", err
	}
	if _, err := io.Copy(tw, tmp); err != nil {
		return "", err
	}
	if err := tw.Close(); err != nil {
		return "", err
	}
	if err := f.Sync(); err != nil {
		return "", err
	}
	return digestOf(manifest), f.Close()
}

func blobName(digest string) string {
	return "blobs/sha256/" + strings.TrimPrefix(digest, "sha256:")
}
