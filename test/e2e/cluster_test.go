package e2e

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/csi-dmthin/csi-dmthin/test/e2e/cluster"
)

// TestNodeReady checks the node registered with the version we built.
func TestNodeReady(t *testing.T) {
	c := requireCluster(t)
	ctx, cancel := context.WithTimeout(testCtx, time.Minute)
	defer cancel()
	out, err := c.Kubectl(ctx, "get", "node", cluster.NodeName, "-o", "jsonpath={.status.nodeInfo.kubeletVersion}")
	if err != nil {
		t.Fatal(err)
	}
	if want := testArtVersion(); !strings.HasPrefix(string(out), want) {
		t.Errorf("kubelet version %q, want %q", out, want)
	}
}

func testArtVersion() string {
	v, err := cluster.ReadVersions("versions.env")
	if err != nil {
		return "?"
	}
	return v["KUBERNETES_VERSION"]
}
