//go:build ignore

// tidy regenerates the wrapper modules under test/e2e/tools from
// test/e2e/versions.env: `go run ./test/e2e/tools/tidy.go` (make e2e-tools-tidy).
//
// Why wrapper modules: `go install mod/cmd@version` refuses modules whose
// go.mod has replace directives (csi-provisioner, csi-snapshotter, etcd,
// k8s.io/kubernetes itself). A module of our own that requires the target,
// repeats its replace lines (a local-path replace such as `./client` becomes
// the same module at the same version) and names the commands in `tool`
// directives builds them with the ordinary module machinery, from the Go
// module proxy, with go.sum pinning every byte. Each tool gets its own module
// so that their dependency graphs (client-go v0.36 against v0.37, ...) never
// have to agree.
//
// The generated go.mod and go.sum files are committed; versions_test.go
// checks that they still require what versions.env says.
package main

import (
	"bufio"
	"bytes"
	"encoding/json"
	"fmt"
	"log"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
)

// wrapper describes one module under tools/.
type wrapper struct {
	dir      string   // directory under tools/
	module   string   // the module that holds the commands
	version  string   // versions.env key of its version
	extra    []string // other modules to require at the same version
	tools    []string // package paths of the commands
	replaces []string // extra "old => new version" lines
	// ownReplaces: the upstream replaces point into its own tree (Kubernetes'
	// staging/), so use replaces only instead of translating those.
	ownReplaces bool
}

// stagingModules are the k8s.io modules that k8s.io/kubernetes requires at
// v0.0.0 and replaces with its own staging directories; outside its tree
// they must be replaced by their published versions.
var stagingModules = []string{
	"api", "apiextensions-apiserver", "apimachinery", "apiserver", "cli-runtime",
	"client-go", "cloud-provider", "cluster-bootstrap", "code-generator",
	"component-base", "component-helpers", "controller-manager", "cri-api",
	"cri-client", "cri-streaming", "csi-translation-lib", "dynamic-resource-allocation",
	"endpointslice", "externaljwt", "kms", "kube-aggregator", "kube-controller-manager",
	"kube-proxy", "kube-scheduler", "kubectl", "kubelet", "metrics", "mount-utils",
	"pod-security-admission", "sample-apiserver", "streaming",
}

func wrappers(v map[string]string) []wrapper {
	var staging []string
	for _, m := range stagingModules {
		staging = append(staging, "k8s.io/"+m+" => k8s.io/"+m+" "+v["KUBERNETES_STAGING_VERSION"])
	}
	return []wrapper{
		{dir: "kubernetes", module: "k8s.io/kubernetes", version: "KUBERNETES_VERSION", replaces: staging, ownReplaces: true, tools: []string{
			"k8s.io/kubernetes/cmd/kube-apiserver",
			"k8s.io/kubernetes/cmd/kube-controller-manager",
			"k8s.io/kubernetes/cmd/kube-scheduler",
			"k8s.io/kubernetes/cmd/kubelet",
			"k8s.io/kubernetes/cmd/kube-proxy",
			"k8s.io/kubernetes/cmd/kubectl",
		}},
		// The external storage e2e suite: our suite_test.go in that
		// directory, the ginkgo runner at the version Kubernetes uses, and
		// agnhost, the test image's program (subPath and host-exec specs).
		{dir: "storagesuite", module: "k8s.io/kubernetes", version: "KUBERNETES_VERSION", replaces: staging, ownReplaces: true, tools: []string{
			"github.com/onsi/ginkgo/v2/ginkgo",
			"k8s.io/kubernetes/test/images/agnhost",
		}},
		{dir: "etcd", module: "go.etcd.io/etcd/server/v3", version: "ETCD_VERSION",
			tools: []string{"go.etcd.io/etcd/server/v3"}},
		{dir: "containerd", module: "github.com/containerd/containerd/v2", version: "CONTAINERD_VERSION", tools: []string{
			"github.com/containerd/containerd/v2/cmd/containerd",
			"github.com/containerd/containerd/v2/cmd/containerd-shim-runc-v2",
			"github.com/containerd/containerd/v2/cmd/ctr",
		}},
		{dir: "provisioner", module: "github.com/kubernetes-csi/external-provisioner/v6", version: "CSI_PROVISIONER_VERSION",
			tools: []string{"github.com/kubernetes-csi/external-provisioner/v6/cmd/csi-provisioner"}},
		{dir: "snapshotter", module: "github.com/kubernetes-csi/external-snapshotter/v8", version: "CSI_SNAPSHOTTER_VERSION",
			extra: []string{"github.com/kubernetes-csi/external-snapshotter/client/v8"},
			tools: []string{
				"github.com/kubernetes-csi/external-snapshotter/v8/cmd/csi-snapshotter",
				"github.com/kubernetes-csi/external-snapshotter/v8/cmd/snapshot-controller",
			}},
		{dir: "resizer", module: "github.com/kubernetes-csi/external-resizer/v2", version: "CSI_RESIZER_VERSION",
			tools: []string{"github.com/kubernetes-csi/external-resizer/v2/cmd/csi-resizer"}},
		{dir: "helm", module: "helm.sh/helm/v3", version: "HELM_VERSION",
			tools: []string{"helm.sh/helm/v3/cmd/helm"}},
		{dir: "critools", module: "sigs.k8s.io/cri-tools", version: "CRI_TOOLS_VERSION",
			tools: []string{"sigs.k8s.io/cri-tools/cmd/crictl"}},
	}
}

func main() {
	log.SetFlags(0)
	root := filepath.Join("test", "e2e")
	v, err := readEnv(filepath.Join(root, "versions.env"))
	if err != nil {
		log.Fatal(err)
	}
	only := map[string]bool{}
	for _, a := range os.Args[1:] {
		only[a] = true
	}
	for _, w := range wrappers(v) {
		if len(only) > 0 && !only[w.dir] {
			continue
		}
		if err := generate(filepath.Join(root, "tools", w.dir), w, v[w.version]); err != nil {
			log.Fatalf("%s: %v", w.dir, err)
		}
	}
}

func generate(dir string, w wrapper, version string) error {
	if version == "" {
		return fmt.Errorf("versions.env has no %s", w.version)
	}
	var upstream []string
	if !w.ownReplaces {
		var err error
		if upstream, err = upstreamReplaces(w.module, version); err != nil {
			return err
		}
	}
	var b strings.Builder
	fmt.Fprintf(&b, "// Generated by test/e2e/tools/tidy.go from test/e2e/versions.env; do not edit.\n")
	fmt.Fprintf(&b, "// Builds %s %s.\n", w.module, version)
	fmt.Fprintf(&b, "module github.com/csi-dmthin/csi-dmthin/test/e2e/tools/%s\n\ngo 1.26.0\n\n", w.dir)
	fmt.Fprintf(&b, "require %s %s\n", w.module, version)
	for _, m := range w.extra {
		fmt.Fprintf(&b, "require %s %s\n", m, version)
	}
	for _, t := range w.tools {
		fmt.Fprintf(&b, "\ntool %s", t)
	}
	b.WriteString("\n")
	for _, r := range append(upstream, w.replaces...) {
		fmt.Fprintf(&b, "\nreplace %s", r)
	}
	b.WriteString("\n")
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	_ = os.Remove(filepath.Join(dir, "go.sum"))
	if err := os.WriteFile(filepath.Join(dir, "go.mod"), []byte(b.String()), 0o644); err != nil {
		return err
	}
	cmd := exec.Command("go", "mod", "tidy")
	cmd.Dir = dir
	cmd.Stdout, cmd.Stderr = os.Stdout, os.Stderr
	return cmd.Run()
}

// upstreamReplaces reads the replace directives of module@version's go.mod
// from the module proxy and returns them as "old => new version" lines:
// local paths become the same module at the same version, and etcd's
// FORBIDDEN_DEPENDENCY guards are dropped (nothing we build imports them).
func upstreamReplaces(module, version string) ([]string, error) {
	out, err := exec.Command("go", "mod", "download", "-json", module+"@"+version).Output()
	if err != nil {
		return nil, fmt.Errorf("go mod download %s@%s: %w", module, version, err)
	}
	var dl struct{ GoMod, Error string }
	if err := json.Unmarshal(out, &dl); err != nil || dl.Error != "" {
		return nil, fmt.Errorf("go mod download %s@%s: %v %s", module, version, err, dl.Error)
	}
	out, err = exec.Command("go", "mod", "edit", "-json", dl.GoMod).Output()
	if err != nil {
		return nil, fmt.Errorf("go mod edit -json %s: %w", dl.GoMod, err)
	}
	type modVer struct{ Path, Version string }
	var gm struct {
		Replace []struct{ Old, New modVer }
	}
	if err := json.Unmarshal(out, &gm); err != nil {
		return nil, err
	}
	var lines []string
	for _, r := range gm.Replace {
		old := r.Old.Path
		if r.Old.Version != "" {
			old += " " + r.Old.Version
		}
		switch {
		case strings.Contains(r.New.Path, "FORBIDDEN_DEPENDENCY"):
			continue
		case strings.HasPrefix(r.New.Path, "./") || strings.HasPrefix(r.New.Path, "../"):
			lines = append(lines, old+" => "+r.Old.Path+" "+version)
		default:
			lines = append(lines, old+" => "+r.New.Path+" "+r.New.Version)
		}
	}
	return lines, nil
}

// readEnv parses KEY=value lines, skipping blanks and # comments.
func readEnv(path string) (map[string]string, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	v := map[string]string{}
	sc := bufio.NewScanner(bytes.NewReader(data))
	for sc.Scan() {
		line := strings.TrimSpace(sc.Text())
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		k, val, ok := strings.Cut(line, "=")
		if !ok {
			return nil, fmt.Errorf("%s: bad line %q", path, line)
		}
		v[k] = val
	}
	return v, sc.Err()
}
