package e2e

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	"github.com/csi-dmthin/csi-dmthin/test/e2e/cluster"
)

// enableEnv turns the cluster tests on: `make e2e` sets it. Without it
// `go test ./...` runs only the tests that need no cluster and the cluster
// tests skip; with it, anything missing is a failure, never a skip.
const enableEnv = "CSI_DMTHIN_E2E"

// artifactsEnv carries the prepared artifacts from the parent process (which
// has the network, for the module proxy and apt) to the re-executed one in
// the isolated namespace.
const artifactsEnv = "CSI_DMTHIN_E2E_ARTIFACTS"

// artifacts is everything built before the cluster starts.
type artifacts struct {
	RunDir string
	Tools  *cluster.Tools
	Image  *cluster.NodeImage
	Images []string
	// ImagesDisk is containerd's root with Images imported, which every
	// node mounts (through its own overlay).
	ImagesDisk string
	// SSHD is the nodes' SSH server (cluster.BuildSSHD).
	SSHD   string
	Driver string // driver image reference
	// DriverBinary is the host path of the csi-dmthin binary in the image.
	DriverBinary string
	Repo         string
	Timings      map[string]string
}

// The running cluster, for the tests; nil when enableEnv is unset.
// testCtx is cancelled by SIGINT or SIGTERM, so an interrupted run stops its
// tests and then every process it started.
var (
	testCluster *cluster.Cluster
	testArt     *artifacts
	testCtx     = context.Background()
)

func TestMain(m *testing.M) {
	flag.Parse()
	if os.Getenv(enableEnv) == "" {
		os.Exit(m.Run())
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if !cluster.InIsolatedNetns() {
		os.Exit(outside(ctx))
	}
	os.Exit(inside(ctx, m))
}

// outside builds everything (it needs the network) and then runs this test
// binary again inside a fresh network namespace that has only lo.
func outside(ctx context.Context) int {
	start := time.Now()
	art, err := prepare(ctx)
	if err != nil {
		fmt.Fprintln(os.Stderr, "e2e: FAIL: prepare:", err)
		return 1
	}
	art.Timings["prepare"] = time.Since(start).Round(time.Second).String()
	path := filepath.Join(art.RunDir, "artifacts.json")
	data, _ := json.MarshalIndent(art, "", "  ")
	if err := os.WriteFile(path, data, 0o644); err != nil {
		fmt.Fprintln(os.Stderr, "e2e: FAIL:", err)
		return 1
	}
	os.Setenv(artifactsEnv, path)
	code, err := cluster.RunInNetns(ctx, art.RunDir)
	if err != nil {
		fmt.Fprintln(os.Stderr, "e2e: FAIL:", err)
		return 1
	}
	fmt.Fprintf(os.Stderr, "e2e: logs of this run: %s\n", filepath.Join(art.RunDir, "logs"))
	return code
}

// inside starts the cluster in the namespace, runs the tests and stops every
// process, printing the logs' tails when anything failed.
func inside(ctx context.Context, m *testing.M) (code int) {
	data, err := os.ReadFile(os.Getenv(artifactsEnv))
	if err != nil {
		fmt.Fprintln(os.Stderr, "e2e: FAIL: no artifacts:", err)
		return 1
	}
	art := &artifacts{}
	if err := json.Unmarshal(data, art); err != nil {
		fmt.Fprintln(os.Stderr, "e2e: FAIL:", err)
		return 1
	}
	testArt = art
	testCtx = ctx
	start := time.Now()
	c, err := cluster.Start(ctx, cluster.Config{
		RunDir: art.RunDir, Tools: art.Tools, Image: art.Image, ImagesDisk: art.ImagesDisk,
		SSHD: art.SSHD, Log: os.Stderr,
	})
	defer func() {
		if c == nil {
			return
		}
		for _, line := range c.Stop() {
			fmt.Fprintln(os.Stderr, "e2e: stop:", line)
		}
		if code != 0 {
			cluster.TailLogs(os.Stderr, art.RunDir, 40)
		}
		c.RemoveDisks()
		fmt.Fprintf(os.Stderr, "e2e: timings: %v\n", art.Timings)
		for _, n := range c.Nodes {
			fmt.Fprintf(os.Stderr, "e2e: %s: %d boot(s), last Ready in %s, failed boots: %q\n", n.Name, n.Boots, n.Ready.Round(time.Second), n.BootFailures)
		}
	}()
	if err != nil {
		fmt.Fprintln(os.Stderr, "e2e: FAIL: cluster start:", err)
		return 1
	}
	art.Timings["cluster-start"] = time.Since(start).Round(time.Second).String()
	art.Timings["nodes-ready"] = c.NodesReady.Round(time.Second).String()
	for _, n := range c.Nodes {
		art.Timings["ready-"+n.Name] = n.Ready.Round(time.Second).String()
	}
	testCluster = c
	if !clusterOnly() {
		start = time.Now()
		if err := installDriver(ctx, c, art); err != nil {
			fmt.Fprintln(os.Stderr, "e2e: FAIL: install the driver:", err)
			return 1
		}
		art.Timings["driver-install"] = time.Since(start).Round(time.Second).String()
	}
	start = time.Now()
	code = m.Run()
	art.Timings["tests"] = time.Since(start).Round(time.Second).String()
	return code
}

// requireCluster skips a test outside `make e2e` and returns the cluster.
func requireCluster(t *testing.T) *cluster.Cluster {
	t.Helper()
	if os.Getenv(enableEnv) == "" {
		t.Skipf("needs the e2e cluster: run make e2e (sets %s=1)", enableEnv)
	}
	if testCluster == nil {
		t.Fatal("e2e: no cluster")
	}
	return testCluster
}

// requireDriver is requireCluster for tests that need the driver installed.
func requireDriver(t *testing.T) *cluster.Cluster {
	t.Helper()
	c := requireCluster(t)
	if clusterOnly() {
		t.Skipf("%s=1: the driver is not installed", clusterOnlyEnv)
	}
	return c
}
