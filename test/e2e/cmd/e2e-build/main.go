// Command e2e-build builds (or finds in the cache) everything the e2e cluster
// runs: the pinned tools, the node's root filesystem and the images, and
// prints where they are and how long each took. `make e2e-build` runs it;
// the e2e tests do the same on their own, so running it first is optional.
package main

import (
	"context"
	"fmt"
	"os"
	"os/signal"
	"path/filepath"
	"syscall"
	"time"

	"github.com/csi-dmthin/csi-dmthin/test/e2e/cluster"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := run(ctx); err != nil {
		fmt.Fprintln(os.Stderr, "e2e-build:", err)
		os.Exit(1)
	}
}

func run(ctx context.Context) error {
	repo, err := cluster.RepoRoot()
	if err != nil {
		return err
	}
	v, err := cluster.ReadVersions(filepath.Join(repo, "test", "e2e", "versions.env"))
	if err != nil {
		return err
	}
	if len(os.Args) > 1 && os.Args[1] == "node" {
		return buildNode(ctx, v)
	}
	if err := buildNode(ctx, v); err != nil {
		return err
	}
	start := time.Now()
	tools, err := cluster.BuildTools(ctx, repo, v, os.Stderr)
	if err != nil {
		return err
	}
	fmt.Printf("tools: %s (%s, built %v)\n", tools.Bin, time.Since(start).Round(time.Second), tools.Built)
	return nil
}

func buildNode(ctx context.Context, v cluster.Versions) error {
	start := time.Now()
	img, err := cluster.BuildNodeImage(ctx, v, os.Stderr)
	if err != nil {
		return err
	}
	fmt.Printf("node image: %s (%s, built %v)\n", img.Root, time.Since(start).Round(time.Second), img.Built)
	return nil
}
