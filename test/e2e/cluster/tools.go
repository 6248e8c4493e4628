package cluster

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"github.com/csi-dmthin/csi-dmthin/internal/vmtest"
)

// toolsFormat changes when the layout of a cached tools directory changes
// in a way the hashed inputs do not show.
const toolsFormat = "e2e-tools-1"

// toolBuild is one wrapper module under test/e2e/tools and what to build
// from it.
type toolBuild struct {
	dir  string            // wrapper module directory under test/e2e/tools
	pkgs map[string]string // output binary name -> package path
	// ldflags are -X settings; values may name versions.env keys as ${KEY}.
	ldflags []string
	tags    []string
	// strip drops the symbol table and DWARF (-s -w): the sidecars go into
	// an image that the guest imports, hashing every byte under TCG, and
	// stripping takes a third off their 95-100 MB.
	strip bool
	// crds copies <module dir>/config/crd/*.yaml of this module into crd/.
	crds string
	// tests are test binaries (`go test -c`): output name -> package
	// directory relative to the wrapper module, whose own Go files are
	// then part of the cache key.
	tests map[string]string
}

var toolBuilds = []toolBuild{
	{dir: "etcd", pkgs: map[string]string{"etcd": "go.etcd.io/etcd/server/v3"}},
	{dir: "kubernetes", pkgs: map[string]string{
		"kube-apiserver":          "k8s.io/kubernetes/cmd/kube-apiserver",
		"kube-controller-manager": "k8s.io/kubernetes/cmd/kube-controller-manager",
		"kube-scheduler":          "k8s.io/kubernetes/cmd/kube-scheduler",
		"kubelet":                 "k8s.io/kubernetes/cmd/kubelet",
		"kube-proxy":              "k8s.io/kubernetes/cmd/kube-proxy",
		"kubectl":                 "k8s.io/kubernetes/cmd/kubectl",
	}, ldflags: kubeVersionLdflags()},
	{dir: "containerd", pkgs: map[string]string{
		"containerd":              "github.com/containerd/containerd/v2/cmd/containerd",
		"containerd-shim-runc-v2": "github.com/containerd/containerd/v2/cmd/containerd-shim-runc-v2",
		"ctr":                     "github.com/containerd/containerd/v2/cmd/ctr",
	}, tags: []string{"no_btrfs", "no_zfs", "no_devmapper"}},
	{dir: "provisioner", strip: true, pkgs: map[string]string{"csi-provisioner": "github.com/kubernetes-csi/external-provisioner/v6/cmd/csi-provisioner"}},
	{dir: "snapshotter", strip: true, pkgs: map[string]string{
		"csi-snapshotter":     "github.com/kubernetes-csi/external-snapshotter/v8/cmd/csi-snapshotter",
		"snapshot-controller": "github.com/kubernetes-csi/external-snapshotter/v8/cmd/snapshot-controller",
	}, crds: "github.com/kubernetes-csi/external-snapshotter/client/v8"},
	{dir: "resizer", strip: true, pkgs: map[string]string{"csi-resizer": "github.com/kubernetes-csi/external-resizer/v2/cmd/csi-resizer"}},
	{dir: "helm", pkgs: map[string]string{"helm": "helm.sh/helm/v3/cmd/helm"}},
	// crictl for the nodes: the storage suite's subPath specs stop a
	// container with it, through a host-exec pod.
	{dir: "critools", pkgs: map[string]string{"crictl": "sigs.k8s.io/cri-tools/cmd/crictl"},
		ldflags: []string{"sigs.k8s.io/cri-tools/pkg/version.Version=${CRI_TOOLS_VERSION}"}},
	// Kubernetes' external storage suite alone (tools/storagesuite), the
	// ginkgo runner that runs it in parallel, and agnhost for the image its
	// subPath and host-exec specs use.
	{dir: StorageSuiteTool, strip: true, tests: map[string]string{"e2e.test": "."}, pkgs: map[string]string{
		"ginkgo":  "github.com/onsi/ginkgo/v2/ginkgo",
		"agnhost": "k8s.io/kubernetes/test/images/agnhost",
	}},
}

// kubeVersionLdflags stamps the Kubernetes version into the binaries;
// without it the node reports v0.0.0 and kubectl warns about skew.
func kubeVersionLdflags() []string {
	var out []string
	for _, pkg := range []string{"k8s.io/component-base/version", "k8s.io/client-go/pkg/version"} {
		out = append(out,
			pkg+".gitVersion=${KUBERNETES_VERSION}",
			pkg+".gitMajor=${KUBERNETES_MAJOR}",
			pkg+".gitMinor=${KUBERNETES_MINOR}",
			pkg+".gitTreeState=clean",
		)
	}
	return out
}

// ClusterTools are the wrapper modules a cluster without the driver needs.
var ClusterTools = []string{"etcd", "kubernetes", "containerd", "critools"}

// DriverTools add what installing the driver needs: the sidecars and helm.
var DriverTools = append(slices.Clone(ClusterTools), "provisioner", "snapshotter", "resizer", "helm")

// StorageSuiteTool is the wrapper module of Kubernetes' external storage
// suite (e2e.test, ginkgo, agnhost).
const StorageSuiteTool = "storagesuite"

// Tools are the built binaries, all in one directory.
type Tools struct {
	Bin    string // directory of every binary, by its usual name
	CRDDir string // the external-snapshotter CRDs
	// Built names the wrapper modules that were compiled in this call
	// (empty on a warm run).
	Built []string
}

// Path returns the host path of a built binary.
func (t *Tools) Path(name string) string { return filepath.Join(t.Bin, name) }

// BuildTools builds every tool that is not in the cache yet, at `nice 10`
// (the machine is shared), and links them all into <cache>/e2e/bin-<key>.
// log receives one line per module built, with its duration. With only,
// just those wrapper modules are built (ClusterTools: enough for a cluster
// without the driver).
func BuildTools(ctx context.Context, repo string, v Versions, log io.Writer, only ...string) (*Tools, error) {
	cache, err := vmtest.CacheDir()
	if err != nil {
		return nil, err
	}
	root := filepath.Join(cache, "e2e", "tools")
	if err := os.MkdirAll(root, 0o755); err != nil {
		return nil, err
	}
	unlock, err := vmtest.LockFile(ctx, filepath.Join(root, ".lock"))
	if err != nil {
		return nil, err
	}
	defer unlock()

	t := &Tools{}
	var outDirs []string
	for _, tb := range toolBuilds {
		if len(only) > 0 && !slices.Contains(only, tb.dir) {
			continue
		}
		out, built, err := buildTool(ctx, repo, root, tb, v, log)
		if err != nil {
			return nil, err
		}
		if built {
			t.Built = append(t.Built, tb.dir)
		}
		outDirs = append(outDirs, out)
	}
	// One directory with every binary, for PATH and the 9p share.
	h := sha256.New()
	for _, d := range outDirs {
		fmt.Fprintln(h, d)
	}
	bin := filepath.Join(cache, "e2e", "bin-"+hex.EncodeToString(h.Sum(nil))[:16])
	if _, err := os.Stat(filepath.Join(bin, ".done")); err != nil {
		_ = os.RemoveAll(bin)
		if err := os.MkdirAll(filepath.Join(bin, "crd"), 0o755); err != nil {
			return nil, err
		}
		for _, d := range outDirs {
			entries, err := os.ReadDir(d)
			if err != nil {
				return nil, err
			}
			for _, e := range entries {
				if e.Name() == ".done" {
					continue
				}
				if e.Name() == "crd" {
					crds, _ := filepath.Glob(filepath.Join(d, "crd", "*.yaml"))
					for _, c := range crds {
						if err := os.Link(c, filepath.Join(bin, "crd", filepath.Base(c))); err != nil {
							return nil, err
						}
					}
					continue
				}
				if err := os.Link(filepath.Join(d, e.Name()), filepath.Join(bin, e.Name())); err != nil {
					return nil, err
				}
			}
		}
		if err := os.WriteFile(filepath.Join(bin, ".done"), nil, 0o644); err != nil {
			return nil, err
		}
	}
	t.Bin = bin
	t.CRDDir = filepath.Join(bin, "crd")
	return t, nil
}

// buildTool builds one wrapper module's commands into
// <root>/<dir>-<key>/ unless that directory is complete already.
func buildTool(ctx context.Context, repo, root string, tb toolBuild, v Versions, log io.Writer) (dir string, built bool, err error) {
	src := filepath.Join(repo, "test", "e2e", "tools", tb.dir)
	vars := map[string]string{}
	for k, val := range v {
		vars[k] = val
	}
	if kv := v["KUBERNETES_VERSION"]; kv != "" {
		parts := strings.SplitN(strings.TrimPrefix(kv, "v"), ".", 3)
		if len(parts) >= 2 {
			vars["KUBERNETES_MAJOR"], vars["KUBERNETES_MINOR"] = parts[0], parts[1]
		}
	}
	var ldflags []string
	if tb.strip {
		ldflags = append(ldflags, "-s", "-w")
	}
	for _, l := range tb.ldflags {
		ldflags = append(ldflags, "-X", os.Expand(l, func(k string) string { return vars[k] }))
	}
	goVersion, err := exec.CommandContext(ctx, "go", "env", "GOVERSION").Output()
	if err != nil {
		return "", false, fmt.Errorf("cluster: go env GOVERSION: %w", err)
	}

	h := sha256.New()
	fmt.Fprintf(h, "%s\n%s\n%q\n%q\n%q\n%s\n%q\n", toolsFormat, strings.TrimSpace(string(goVersion)), ldflags, tb.tags, tb.pkgs, tb.crds, tb.tests)
	inputs := []string{"go.mod", "go.sum"}
	if len(tb.tests) > 0 {
		own, err := filepath.Glob(filepath.Join(src, "*.go"))
		if err != nil {
			return "", false, err
		}
		for _, f := range own {
			inputs = append(inputs, filepath.Base(f))
		}
	}
	for _, f := range inputs {
		data, err := os.ReadFile(filepath.Join(src, f))
		if err != nil {
			return "", false, fmt.Errorf("cluster: wrapper module %s: %w", tb.dir, err)
		}
		h.Write(data)
	}
	dir = filepath.Join(root, tb.dir+"-"+hex.EncodeToString(h.Sum(nil))[:16])
	if _, err := os.Stat(filepath.Join(dir, ".done")); err == nil {
		return dir, false, nil
	}
	_ = os.RemoveAll(dir)
	tmp := dir + ".tmp"
	_ = os.RemoveAll(tmp)
	if err := os.MkdirAll(tmp, 0o755); err != nil {
		return "", false, err
	}
	start := time.Now()
	for name, pkg := range tb.pkgs {
		args := []string{"-n", "10", "go", "build", "-trimpath", "-o", filepath.Join(tmp, name)}
		if len(tb.tags) > 0 {
			args = append(args, "-tags", strings.Join(tb.tags, ","))
		}
		if len(ldflags) > 0 {
			args = append(args, "-ldflags", strings.Join(ldflags, " "))
		}
		args = append(args, pkg)
		if err := goCmd(ctx, src, "nice", args...); err != nil {
			return "", false, fmt.Errorf("cluster: build %s (%s): %w", name, tb.dir, err)
		}
	}
	for name, dir := range tb.tests {
		args := []string{"-n", "10", "go", "test", "-c", "-trimpath", "-o", filepath.Join(tmp, name)}
		if len(ldflags) > 0 {
			args = append(args, "-ldflags", strings.Join(ldflags, " "))
		}
		args = append(args, dir)
		if err := goCmd(ctx, src, "nice", args...); err != nil {
			return "", false, fmt.Errorf("cluster: build %s (%s): %w", name, tb.dir, err)
		}
	}
	if tb.crds != "" {
		out, err := goOutput(ctx, src, "go", "list", "-m", "-json", tb.crds)
		if err != nil {
			return "", false, err
		}
		var m struct{ Dir string }
		if err := json.Unmarshal(out, &m); err != nil || m.Dir == "" {
			return "", false, fmt.Errorf("cluster: go list -m %s: no directory (%v)", tb.crds, err)
		}
		crds, _ := filepath.Glob(filepath.Join(m.Dir, "config", "crd", "*.yaml"))
		if len(crds) == 0 {
			return "", false, fmt.Errorf("cluster: no CRDs under %s/config/crd", m.Dir)
		}
		if err := os.MkdirAll(filepath.Join(tmp, "crd"), 0o755); err != nil {
			return "", false, err
		}
		for _, c := range crds {
			if filepath.Base(c) == "kustomization.yaml" {
				continue
			}
			data, err := os.ReadFile(c)
			if err != nil {
				return "", false, err
			}
			if err := os.WriteFile(filepath.Join(tmp, "crd", filepath.Base(c)), data, 0o644); err != nil {
				return "", false, err
			}
		}
	}
	if err := os.WriteFile(filepath.Join(tmp, ".done"), nil, 0o644); err != nil {
		return "", false, err
	}
	if err := os.Rename(tmp, dir); err != nil {
		return "", false, err
	}
	fmt.Fprintf(log, "e2e: built %s in %s\n", tb.dir, time.Since(start).Round(time.Second))
	return dir, true, nil
}

// goEnv is the environment of every go command the harness runs: static
// binaries, the wrapper module alone (no workspace), modules from the proxy.
func goEnv() []string {
	return append(os.Environ(), "CGO_ENABLED=0", "GOWORK=off", "GOFLAGS=-mod=readonly -buildvcs=false", "LC_ALL=C")
}

func goCmd(ctx context.Context, dir, name string, args ...string) error {
	_, err := goOutput(ctx, dir, name, args...)
	return err
}

func goOutput(ctx context.Context, dir, name string, args ...string) ([]byte, error) {
	cmd := exec.CommandContext(ctx, name, args...)
	cmd.Dir = dir
	cmd.Env = goEnv()
	var stderr strings.Builder
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		return out, fmt.Errorf("%s %s: %w\n%s", name, strings.Join(args, " "), err, tail(stderr.String(), 30))
	}
	return out, nil
}

// tail returns the last n lines of s.
func tail(s string, n int) string {
	lines := strings.Split(strings.TrimRight(s, "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}
