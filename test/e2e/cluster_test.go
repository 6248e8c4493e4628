package e2e

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/csi-dmthin/csi-dmthin/test/e2e/cluster"
)

// TestNodeReady checks that every node registered, at the address the
// harness gave it, with the version we built.
func TestNodeReady(t *testing.T) {
	c := requireCluster(t)
	ctx, cancel := context.WithTimeout(testCtx, time.Minute)
	defer cancel()
	if len(c.Nodes) < 2 {
		t.Errorf("%d nodes, want at least 2", len(c.Nodes))
	}
	for _, n := range c.Nodes {
		out, err := c.Kubectl(ctx, "get", "node", n.Name, "-o", `jsonpath={.status.nodeInfo.kubeletVersion} {.status.addresses[?(@.type=="InternalIP")].address}`)
		if err != nil {
			t.Fatal(err)
		}
		version, ip, _ := strings.Cut(string(out), " ")
		if want := testArtVersion(); !strings.HasPrefix(version, want) {
			t.Errorf("%s: kubelet version %q, want %q", n.Name, version, want)
		}
		if ip != n.IP {
			t.Errorf("%s: InternalIP %q, want %q", n.Name, ip, n.IP)
		}
	}
}

func testArtVersion() string {
	v, err := cluster.ReadVersions("versions.env")
	if err != nil {
		return "?"
	}
	return v["KUBERNETES_VERSION"]
}

// TestNodeSSH checks what the storage suite's Disruptive specs use on every
// node, through the node's SSH server with the run's key: systemctl says
// kubelet is active, sudo answers, and crictl reaches containerd.
func TestNodeSSH(t *testing.T) {
	c := requireCluster(t)
	ctx, cancel := context.WithTimeout(testCtx, 2*time.Minute)
	defer cancel()
	for _, n := range c.Nodes {
		for command, want := range map[string]string{
			"systemctl show kubelet --property ActiveState --value": "active\n",
			"sudo systemctl is-active kubelet":                      "active\n",
			"crictl info >/dev/null && echo reached":                "reached\n",
		} {
			res, err := c.NodeSSH(ctx, n.Name, command)
			if err != nil || res.Code != 0 || res.Stdout != want {
				t.Errorf("%s: %q: %+v, %v; want %q", n.Name, command, res, err, want)
			}
		}
	}
}
