package e2e

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/csi-dmthin/csi-dmthin/test/e2e/cluster"
)

// TestVersionsMatchWrappers checks that every wrapper module under tools/
// requires the version versions.env pins, so the one file stays the truth.
// It runs in every `go test ./...`: no cluster needed.
func TestVersionsMatchWrappers(t *testing.T) {
	v, err := cluster.ReadVersions("versions.env")
	if err != nil {
		t.Fatal(err)
	}
	want := map[string][]string{
		"kubernetes":  {"k8s.io/kubernetes " + v["KUBERNETES_VERSION"], "k8s.io/client-go => k8s.io/client-go " + v["KUBERNETES_STAGING_VERSION"]},
		"etcd":        {"go.etcd.io/etcd/server/v3 " + v["ETCD_VERSION"]},
		"containerd":  {"github.com/containerd/containerd/v2 " + v["CONTAINERD_VERSION"]},
		"provisioner": {"github.com/kubernetes-csi/external-provisioner/v6 " + v["CSI_PROVISIONER_VERSION"]},
		"snapshotter": {"github.com/kubernetes-csi/external-snapshotter/v8 " + v["CSI_SNAPSHOTTER_VERSION"], "github.com/kubernetes-csi/external-snapshotter/client/v8 " + v["CSI_SNAPSHOTTER_VERSION"]},
		"resizer":     {"github.com/kubernetes-csi/external-resizer/v2 " + v["CSI_RESIZER_VERSION"]},
		"helm":        {"helm.sh/helm/v3 " + v["HELM_VERSION"]},
		"critools":    {"sigs.k8s.io/cri-tools " + v["CRI_TOOLS_VERSION"], "tool sigs.k8s.io/cri-tools/cmd/crictl"},
		"storagesuite": {"k8s.io/kubernetes " + v["KUBERNETES_VERSION"], "k8s.io/client-go => k8s.io/client-go " + v["KUBERNETES_STAGING_VERSION"],
			"tool github.com/onsi/ginkgo/v2/ginkgo", "tool k8s.io/kubernetes/test/images/agnhost"},
	}
	for dir, lines := range want {
		data, err := os.ReadFile(filepath.Join("tools", dir, "go.mod"))
		if err != nil {
			t.Fatal(err)
		}
		for _, l := range lines {
			if !strings.Contains(string(data), l) {
				t.Errorf("tools/%s/go.mod does not have %q: run make e2e-tools-tidy", dir, l)
			}
		}
	}
}
