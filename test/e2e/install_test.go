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

// valuesFile is what helm install is given besides the image tag: the
// images from the nodes' own store, the pools (the class csi-dmthin's, a
// small one for the capacity scenarios and a tiny one to fill by writing)
// and their classes, and a faster capacity poll. The deploy package's
// TestE2EValues checks its images against the harness's.
const valuesFile = "../../charts/csi-dmthin/ci/e2e-values.yaml"

// copyRateEnv, when set, overrides valuesFile's copy rate (bytes per
// second; 0 is unlimited).
const copyRateEnv = "CSI_DMTHIN_E2E_COPY_RATE"

// installDriver does what an operator does: the snapshot CRDs and a
// snapshot-controller with distributed snapshotting (on the host side, like
// the rest of the control plane), then `helm install` of charts/csi-dmthin
// with the image tag and valuesFile, and waits for the driver to register
// with every kubelet.
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
	if err := checkDriverFlags(ctx, c, art); err != nil {
		return err
	}
	values, err := filepath.Abs(valuesFile)
	if err != nil {
		return err
	}
	args := []string{"install", "csi-dmthin", filepath.Join(art.Repo, "charts", "csi-dmthin"),
		"--kubeconfig", c.Kubeconfig, "--namespace", driverNamespace, "--create-namespace",
		"--set", "image.tag=" + driverTag, "-f", values,
		"--wait", "--timeout", "6m"}
	if rate := os.Getenv(copyRateEnv); rate != "" {
		// make bench-e2e measures copies at full speed.
		args = append(args, "--set", "copy.rateBytesPerSec="+rate)
	}
	start := time.Now()
	_, err = cluster.Output(ctx, c.Bin("helm"), args...)
	if err != nil {
		return err
	}
	fmt.Fprintf(os.Stderr, "e2e: helm install --wait took %s\n", time.Since(start).Round(time.Second))
	if err := waitController(ctx, c); err != nil {
		return err
	}
	// The driver registers with each kubelet itself; CSINode lists it then.
	return waitRegistered(ctx, c, c.NodeNames()...)
}

// controllerDeployment is the chart's controller Deployment, and
// controllerLease the Lease its replicas elect a leader through (named
// after the driver).
const (
	controllerDeployment = "csi-dmthin-controller"
	controllerSelector   = "app.kubernetes.io/name=csi-dmthin,app.kubernetes.io/component=controller"
)

var controllerLease = strings.ReplaceAll(driverName, ".", "-") + "-controller"

// waitController waits until the controller Deployment is Available and
// one of its replicas holds the Lease: until then no restore is steered to
// its source's node. On failure it returns the replicas' log tails.
func waitController(ctx context.Context, c *cluster.Cluster) error {
	_, err := c.Kubectl(ctx, "-n", driverNamespace, "wait", "--for=condition=Available", "deployment/"+controllerDeployment, "--timeout=2m")
	if err == nil {
		err = poll(ctx, 2*time.Minute, func() (bool, error) {
			out, _ := c.Kubectl(ctx, "-n", driverNamespace, "get", "lease", controllerLease, "-o", "jsonpath={.spec.holderIdentity}")
			return strings.TrimSpace(string(out)) != "", nil
		})
	}
	if err != nil {
		logs, _ := c.Kubectl(ctx, "-n", driverNamespace, "logs", "-l", controllerSelector, "--all-containers", "--prefix", "--tail=20")
		return fmt.Errorf("controller not Available and leading: %w\n%s", err, logs)
	}
	return nil
}

// waitRegistered waits until the driver is in the CSINode of every named
// node.
func waitRegistered(ctx context.Context, c *cluster.Cluster, nodes ...string) error {
	for _, n := range nodes {
		err := poll(ctx, 2*time.Minute, func() (bool, error) {
			out, err := c.Kubectl(ctx, "get", "csinode", n, "-o", "jsonpath={.spec.drivers[*].name}")
			return err == nil && strings.Contains(string(out), driverName), nil
		})
		if err != nil {
			return fmt.Errorf("driver not registered on %s: %w", n, err)
		}
	}
	return nil
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

// checkDriverFlags renders the chart and checks that the driver binary in
// the image defines every flag the chart passes to `serve` and to
// `controller`, so a chart ahead of the driver (or behind it) fails here in
// a second with the names, rather than as a crash-looping pod after helm's
// whole --wait.
func checkDriverFlags(ctx context.Context, c *cluster.Cluster, art *artifacts) error {
	rendered, err := cluster.Output(ctx, c.Bin("helm"), "template", "csi-dmthin", filepath.Join(art.Repo, "charts", "csi-dmthin"),
		"--namespace", driverNamespace, "--set", "image.tag="+driverTag, "-f", valuesFile, "--kube-version", testArtVersion())
	if err != nil {
		return err
	}
	var problems []string
	for _, cmd := range []string{"serve", "controller"} {
		help, _ := cluster.Output(ctx, art.DriverBinary, cmd, "-h")
		helpErr, _ := cluster.CombinedOutput(ctx, art.DriverBinary, cmd, "-h")
		defined := string(help) + string(helpErr)
		var missing []string
		inCmd := false
		for _, line := range strings.Split(string(rendered), "\n") {
			item := strings.TrimSpace(line)
			switch {
			case item == "- "+cmd:
				inCmd = true
			case inCmd && strings.HasPrefix(item, "- -"):
				name, _, _ := strings.Cut(strings.TrimLeft(strings.TrimPrefix(item, "- "), "-"), "=")
				if !strings.Contains(defined, "  -"+name+" ") && !strings.Contains(defined, "  -"+name+"\n") {
					missing = append(missing, "--"+name)
				}
			case inCmd && strings.HasPrefix(item, "#"):
				// a comment between the flags
			case inCmd:
				inCmd = false
			}
		}
		if len(missing) > 0 {
			problems = append(problems, fmt.Sprintf("csi-dmthin %s does not define %s", cmd, strings.Join(missing, " ")))
		}
	}
	if len(problems) > 0 {
		return fmt.Errorf("charts/csi-dmthin passes flags that this binary lacks: %s", strings.Join(problems, "; "))
	}
	return nil
}

// valuesFile's classes on each node's small and tiny pools.
const (
	smallClass = "csi-dmthin-small"
	tinyClass  = "csi-dmthin-tiny"
)
