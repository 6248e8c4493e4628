package cluster

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/csi-dmthin/csi-dmthin/internal/vmtest"
)

// imagesDiskFormat changes when the images disk's layout changes in a way
// its hashed inputs do not show.
const imagesDiskFormat = "e2e-images-disk-1"

// imagesDiskBytes is the images disk's apparent size (sparse): the images
// imported and unpacked, about 1 GB, and room for the writable layers of the
// containers that run on the node.
const imagesDiskBytes = 16 << 30

// ImagesDiskLabel is the images disk's filesystem label.
const ImagesDiskLabel = "e2e-images"

// BuildImagesDisk returns an ext4 disk image holding containerd's root
// directory with the archives already imported and unpacked, for the nodes
// to mount at /var/lib/containerd (each boot through its own overlay). The
// import runs once, on the host, with the very containerd and ctr the nodes
// run: natively it takes seconds, where each boot's import under TCG took
// minutes. Cached under <cache>/e2e/images-disk by the containerd build, the
// archives (whose names carry their contents' hash) and the format.
func BuildImagesDisk(ctx context.Context, tools *Tools, archives []string, log io.Writer) (string, error) {
	cache, err := vmtest.CacheDir()
	if err != nil {
		return "", err
	}
	dir := filepath.Join(cache, "e2e", "images-disk")
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return "", err
	}
	h := sha256.New()
	fmt.Fprintf(h, "%s\n%d\n%s\n", imagesDiskFormat, imagesDiskBytes, containerdConfig)
	for _, f := range append([]string{tools.Path("containerd"), tools.Path("ctr")}, archives...) {
		fi, err := os.Stat(f)
		if err != nil {
			return "", err
		}
		fmt.Fprintf(h, "%s %d %d\n", f, fi.Size(), fi.ModTime().UnixNano())
	}
	out := filepath.Join(dir, "images-"+hex.EncodeToString(h.Sum(nil))[:16]+".img")
	if _, err := os.Stat(out); err == nil {
		return out, nil
	}
	unlock, err := vmtest.LockFile(ctx, filepath.Join(dir, ".lock"))
	if err != nil {
		return "", err
	}
	defer unlock()
	if _, err := os.Stat(out); err == nil {
		return out, nil
	}
	start := time.Now()
	tmp, err := os.MkdirTemp(dir, ".build-")
	if err != nil {
		return "", err
	}
	defer func() { _ = os.RemoveAll(tmp) }()
	root := filepath.Join(tmp, "root")
	if err := importImages(ctx, tools, tmp, root, archives); err != nil {
		return "", err
	}
	// Each node makes its own instance id; a shared one would only confuse
	// whoever reads them.
	_ = os.Remove(filepath.Join(root, "io.containerd.grpc.v1.introspection", "uuid"))
	img := filepath.Join(tmp, "images.img")
	if err := run(ctx, "", "mkfs.ext4", "-q", "-L", ImagesDiskLabel, "-d", root, img, fmt.Sprintf("%dk", imagesDiskBytes>>10)); err != nil {
		return "", err
	}
	if err := os.Rename(img, out); err != nil {
		return "", err
	}
	old, _ := filepath.Glob(filepath.Join(dir, "images-????????????????.img"))
	for _, o := range old {
		if o != out {
			_ = os.Remove(o)
		}
	}
	fmt.Fprintf(log, "e2e: imported the images into the images disk in %s\n", time.Since(start).Round(100*time.Millisecond))
	return out, nil
}

// importImages runs containerd on the host, rooted at root, in a mount
// namespace of its own (the mounts it makes to unpack stay there and go
// with it), imports the archives into its k8s.io namespace with ctr, and
// stops it by its pid.
func importImages(ctx context.Context, tools *Tools, tmp, root string, archives []string) error {
	state := filepath.Join(tmp, "state")
	sock := filepath.Join(state, "containerd.sock")
	// The CRI plugins and NRI are not needed to import and would look
	// for CNI and a runtime on the host.
	cfg := fmt.Sprintf(`version = 3
root = %q
state = %q
disabled_plugins = ["io.containerd.grpc.v1.cri", "io.containerd.cri.v1.runtime", "io.containerd.cri.v1.images", "io.containerd.nri.v1.nri"]
[grpc]
  address = %q
[ttrpc]
  address = %q
[debug]
  address = ""
[metrics]
  address = ""
`, root, state, sock, sock+".ttrpc")
	cfgPath := filepath.Join(tmp, "containerd.toml")
	if err := os.WriteFile(cfgPath, []byte(cfg), 0o644); err != nil {
		return err
	}
	logPath := filepath.Join(tmp, "containerd.log")
	logf, err := os.Create(logPath)
	if err != nil {
		return err
	}
	defer func() { _ = logf.Close() }()
	cmd := exec.Command("unshare", "--mount", "--propagation", "private", tools.Path("containerd"), "--config", cfgPath)
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.Env = append(os.Environ(), "LC_ALL=C")
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		return fmt.Errorf("cluster: start containerd for the import: %w", err)
	}
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	stopped := false
	stop := func() error {
		if stopped {
			return nil
		}
		stopped = true
		// containerd closes its databases on SIGTERM; how it exits then
		// does not matter.
		_ = cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-done:
			return nil
		case <-time.After(20 * time.Second):
			_ = cmd.Process.Kill()
			<-done
			return fmt.Errorf("cluster: the import's containerd did not stop in 20s")
		}
	}
	defer func() { _ = stop() }()
	failed := func(err error) error {
		return fmt.Errorf("%w\ncontainerd's log:\n%s", err, tail(readFile(logPath), 20))
	}
	ctr := func(args ...string) ([]byte, error) {
		return output(ctx, "", tools.Path("ctr"), append([]string{"--address", sock, "--namespace", "k8s.io"}, args...)...)
	}
	for i := 0; ; i++ {
		if _, err := ctr("version"); err == nil {
			break
		}
		select {
		case err := <-done:
			stopped = true
			return failed(fmt.Errorf("cluster: the import's containerd exited: %v", err))
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(200 * time.Millisecond):
		}
		if i > 150 {
			return failed(fmt.Errorf("cluster: the import's containerd did not answer in 30s"))
		}
	}
	for _, a := range archives {
		if _, err := ctr("images", "import", "--local", a); err != nil {
			return failed(fmt.Errorf("cluster: import %s: %w", a, err))
		}
	}
	list, err := ctr("images", "list", "--quiet")
	if err != nil {
		return failed(err)
	}
	if len(strings.Fields(string(list))) == 0 {
		return failed(fmt.Errorf("cluster: the import left no image"))
	}
	if err := stop(); err != nil {
		return failed(err)
	}
	return nil
}
