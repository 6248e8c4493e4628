// Command image-archive writes the driver's image as an OCI archive with no
// container engine (make image-archive): the Debian packages of
// hack/runtime-packages.txt with their dependencies (apt-get download, as
// the end-to-end test builds its driver image) and the static binary, under
// the name the chart's default values use. Air-gapped operators load it on
// each node:
//
//	ctr -n k8s.io images import bin/csi-dmthin-<version>.oci.tar
//
// or push it to their registry (skopeo copy oci-archive:... docker://...).
package main

import (
	"context"
	"flag"
	"fmt"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"time"

	"github.com/csi-dmthin/csi-dmthin/internal/ociarchive"
	"github.com/csi-dmthin/csi-dmthin/test/e2e/cluster"
)

func main() {
	version := flag.String("version", "dev", "the driver's version (main.version) and the image's tag")
	ref := flag.String("ref", "", "the image's name (default localhost/csi-dmthin:<version>, the chart's default)")
	out := flag.String("out", "", "the archive to write (default bin/csi-dmthin-<version>.oci.tar)")
	flag.Parse()
	if *ref == "" {
		*ref = "localhost/csi-dmthin:" + *version
	}
	if *out == "" {
		*out = filepath.Join("bin", "csi-dmthin-"+*version+".oci.tar")
	}
	if err := run(context.Background(), *version, *ref, *out); err != nil {
		fmt.Fprintln(os.Stderr, "image-archive:", err)
		os.Exit(1)
	}
}

func run(ctx context.Context, version, ref, out string) error {
	if err := os.MkdirAll(filepath.Dir(out), 0o755); err != nil {
		return err
	}
	bin := filepath.Join(filepath.Dir(out), "csi-dmthin-image-binary")
	cmd := exec.CommandContext(ctx, "go", "build", "-trimpath", "-ldflags=-s -w -X main.version="+version, "-o", bin, "./cmd/csi-dmthin")
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	cmd.Stdout, cmd.Stderr = os.Stdout, os.Stderr
	if err := cmd.Run(); err != nil {
		return fmt.Errorf("go build: %w", err)
	}
	defer os.Remove(bin)
	pkgs, err := cluster.ReadPackageList(filepath.Join("hack", "runtime-packages.txt"))
	if err != nil {
		return err
	}
	root, err := cluster.DebianRootfs(ctx, pkgs)
	if err != nil {
		return fmt.Errorf("the runtime packages: %w", err)
	}
	created := time.Unix(0, 0)
	if s := os.Getenv("SOURCE_DATE_EPOCH"); s != "" {
		n, err := strconv.ParseInt(s, 10, 64)
		if err != nil {
			return fmt.Errorf("SOURCE_DATE_EPOCH: %w", err)
		}
		created = time.Unix(n, 0)
	}
	digest, err := ociarchive.Write(out, ociarchive.Image{
		Ref: ref, RootDir: root, Files: map[string]string{"/usr/bin/csi-dmthin": bin},
		Dirs:       map[string]fs.FileMode{"tmp": fs.ModeSticky | 0o777},
		Entrypoint: []string{"/usr/bin/csi-dmthin"}, Cmd: []string{"serve"},
		Env:     []string{"PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL=C"},
		Created: created,
	})
	if err != nil {
		return err
	}
	fi, err := os.Stat(out)
	if err != nil {
		return err
	}
	fmt.Printf("%s: %s (%s), %.1f MiB\nload it on a node: ctr -n k8s.io images import %s\n", out, ref, digest, float64(fi.Size())/(1<<20), out)
	return nil
}
