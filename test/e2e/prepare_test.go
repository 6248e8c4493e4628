package e2e

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"time"

	"github.com/csi-dmthin/csi-dmthin/test/e2e/cluster"
)

// driverTag is the tag the driver image gets and the chart is told to use.
const driverTag = "e2e"

// clusterOnlyEnv, set to 1, brings up the cluster without the driver (only
// TestNodeReady runs; the rest skip): for working on the harness itself
// without building the sidecars.
const clusterOnlyEnv = "CSI_DMTHIN_E2E_CLUSTER_ONLY"

func clusterOnly() bool { return os.Getenv(clusterOnlyEnv) == "1" }

// prepare builds, or finds in the cache, everything the cluster needs.
func prepare(ctx context.Context) (*artifacts, error) {
	repo, err := cluster.RepoRoot()
	if err != nil {
		return nil, err
	}
	v, err := cluster.ReadVersions(filepath.Join(repo, "test", "e2e", "versions.env"))
	if err != nil {
		return nil, err
	}
	runDir := os.Getenv("CSI_DMTHIN_E2E_RUNDIR")
	if runDir == "" {
		runDir = filepath.Join(os.TempDir(), "csi-dmthin-e2e", time.Now().Format("20060102-150405"))
	}
	// A run directory holds etcd's data: an old one would bring back an
	// old cluster (a node already Ready, a driver already installed).
	if entries, err := os.ReadDir(runDir); err == nil && len(entries) > 0 {
		return nil, fmt.Errorf("run directory %s is not empty: give CSI_DMTHIN_E2E_RUNDIR a new directory", runDir)
	}
	if err := os.MkdirAll(runDir, 0o755); err != nil {
		return nil, err
	}
	art := &artifacts{RunDir: runDir, Repo: repo, Timings: map[string]string{}}
	fmt.Fprintf(os.Stderr, "e2e: run directory %s\n", runDir)

	step := func(name string, f func() error) error {
		start := time.Now()
		err := f()
		art.Timings[name] = time.Since(start).Round(100 * time.Millisecond).String()
		return err
	}
	if err := step("tools", func() (err error) {
		var only []string
		switch {
		case clusterOnly():
			only = cluster.ClusterTools
		case storageSet() == "":
			only = cluster.DriverTools
		}
		art.Tools, err = cluster.BuildTools(ctx, repo, v, os.Stderr, only...)
		return err
	}); err != nil {
		return nil, err
	}
	if err := step("sshd", func() (err error) {
		art.SSHD, err = cluster.BuildSSHD(ctx, repo)
		return err
	}); err != nil {
		return nil, err
	}
	if err := step("node-image", func() (err error) {
		art.Image, err = cluster.BuildNodeImage(ctx, v, os.Stderr)
		return err
	}); err != nil {
		return nil, err
	}
	if err := step("images", func() (err error) {
		var extra []cluster.Image
		if storageSet() != "" {
			if extra, err = cluster.StorageSuiteImages(ctx, art.Tools); err != nil {
				return err
			}
		}
		art.Images, art.Driver, art.DriverBinary, err = cluster.BuildImages(ctx, repo, v, art.Tools, driverTag, clusterOnly(), extra...)
		return err
	}); err != nil {
		return nil, err
	}
	if err := step("images-disk", func() (err error) {
		art.ImagesDisk, err = cluster.BuildImagesDisk(ctx, art.Tools, art.Images, os.Stderr)
		return err
	}); err != nil {
		return nil, err
	}
	return art, nil
}
