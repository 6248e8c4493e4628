package e2e

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/csi-dmthin/csi-dmthin/test/e2e/cluster"
)

// driverNamespace is where the chart is installed.
const driverNamespace = "csi-dmthin"

// Names the chart gives by default.
const (
	storageClass  = "csi-dmthin"
	snapshotClass = "csi-dmthin"
	driverName    = "dmthin.csi.dmthin.io"
)

// installDriver does what an operator does: the snapshot CRDs and a
// snapshot-controller with distributed snapshotting (on the host side, like
// the rest of the control plane), then `helm install` of charts/csi-dmthin
// with only the image tag overridden, and waits for the driver to register
// with the kubelet.
func installDriver(ctx context.Context, c *cluster.Cluster, art *artifacts) error {
	ctx, cancel := context.WithTimeout(ctx, 10*time.Minute)
	defer cancel()
	if _, err := c.Kubectl(ctx, "create", "-f", art.Tools.CRDDir); err != nil {
		return err
	}
	if _, err := c.Kubectl(ctx, "wait", "--for=condition=Established", "crd", "--all", "--timeout=120s"); err != nil {
		return err
	}
	if _, err := c.Procs.Start("snapshot-controller", c.Bin("snapshot-controller"),
		"--kubeconfig="+filepath.Join(art.RunDir, "snapshot-controller.kubeconfig"),
		"--enable-distributed-snapshotting", "--leader-election=false", "--v=2",
	); err != nil {
		return err
	}
	helmHome := filepath.Join(art.RunDir, "helm")
	for _, d := range []string{"cache", "config", "data"} {
		if err := os.MkdirAll(filepath.Join(helmHome, d), 0o755); err != nil {
			return err
		}
	}
	os.Setenv("HELM_CACHE_HOME", filepath.Join(helmHome, "cache"))
	os.Setenv("HELM_CONFIG_HOME", filepath.Join(helmHome, "config"))
	os.Setenv("HELM_DATA_HOME", filepath.Join(helmHome, "data"))
	start := time.Now()
	_, err := cluster.Output(ctx, c.Bin("helm"), "install", "csi-dmthin", filepath.Join(art.Repo, "charts", "csi-dmthin"),
		"--kubeconfig", c.Kubeconfig, "--namespace", driverNamespace, "--create-namespace",
		"--set", "image.tag="+driverTag,
		"--wait", "--timeout", "6m")
	if err != nil {
		return err
	}
	fmt.Fprintf(os.Stderr, "e2e: helm install --wait took %s\n", time.Since(start).Round(time.Second))
	// The driver registers with the kubelet itself; CSINode lists it then.
	return poll(ctx, 2*time.Minute, func() (bool, error) {
		out, err := c.Kubectl(ctx, "get", "csinode", cluster.NodeName, "-o", "jsonpath={.spec.drivers[*].name}")
		return err == nil && strings.Contains(string(out), driverName), nil
	})
}

// poll calls f every second until it reports done, fails, or timeout passes.
func poll(ctx context.Context, timeout time.Duration, f func() (bool, error)) error {
	deadline := time.Now().Add(timeout)
	for {
		done, err := f()
		if err != nil {
			return err
		}
		if done {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("not done within %s", timeout)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(time.Second):
		}
	}
}
