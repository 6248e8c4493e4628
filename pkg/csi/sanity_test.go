package csi

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"testing"

	"github.com/kubernetes-csi/csi-test/v5/pkg/sanity"
	"github.com/onsi/ginkgo/v2"
	"github.com/onsi/ginkgo/v2/types"
	"github.com/onsi/gomega"
	"google.golang.org/grpc"
	"google.golang.org/protobuf/proto"

	"github.com/csi-dmthin/csi-dmthin/internal/vmtest"
	"github.com/csi-dmthin/csi-dmthin/pkg/thinpool"
	"github.com/csi-dmthin/csi-dmthin/pkg/thinpool/thinpooltest"
)

// csi-sanity, in-process, over gRPC on a unix socket: here against the fake
// kernel and FS, in sanity_kernel_test.go against the real ones in the VM.
//
// Ginkgo runs one suite per process (a second RunSpecs is an error), so the
// mount and the block runs are two top-level containers of one suite, each
// with its own TestConfig, rather than two calls of sanity.Test. For the
// same reason the host's TestSanity skips itself in the VM, where
// TestSanityKernel runs the suite.

const (
	sanityPoolBytes   = 1 << 30
	sanityVolumeBytes = 64 << 20
)

// serveDriver serves d on a unix socket in a temporary directory until the
// test ends, and returns the address.
func serveDriver(t *testing.T, d *Driver) string {
	t.Helper()
	sock := filepath.Join(t.TempDir(), "csi.sock")
	l, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- d.ServeListener(l) }()
	t.Cleanup(func() {
		d.Stop()
		if err := <-done; err != nil {
			t.Errorf("ServeListener: %v", err)
		}
	})
	return "unix://" + sock
}

// sanityConfig is csi-sanity's configuration for one access type ("mount"
// or "block"), with its target and staging paths under the kubelet
// directory, where the driver accepts them. The hooks make and remove the
// directories and report what is left over that the driver should have
// removed.
func sanityConfig(t *testing.T, address, kubeletDir, accessType string) *sanity.TestConfig {
	cfg := sanity.NewTestConfig()
	cfg.Address = address
	base := filepath.Join(kubeletDir, "sanity-"+accessType)
	cfg.TargetPath = filepath.Join(base, "pods", "target")
	cfg.StagingPath = filepath.Join(base, "plugins", "staging")
	cfg.TestVolumeSize = sanityVolumeBytes
	cfg.TestVolumeExpandSize = 2 * sanityVolumeBytes
	cfg.TestVolumeAccessType = accessType
	cfg.TestVolumeParameters = nil
	cfg.IdempotentCount = 2
	mkdir := func(p string) (string, error) { return p, os.MkdirAll(p, 0o750) }
	cfg.CreateTargetDir, cfg.CreateStagingDir = mkdir, mkdir
	// csi-sanity ignores what these return; a directory that cannot be
	// removed holds something the driver left behind.
	remove := func(p string) error {
		err := os.Remove(p)
		if err != nil && !errors.Is(err, os.ErrNotExist) {
			entries, _ := os.ReadDir(p)
			t.Errorf("%s: cannot remove %s: %v (left: %v)", ginkgo.CurrentSpecReport().FullText(), p, err, entries)
		}
		return err
	}
	cfg.RemoveTargetPath, cfg.RemoveStagingPath = remove, remove
	cfg.DialOptions = append(cfg.DialOptions, grpc.WithChainUnaryInterceptor(sizeReplies))
	cfg.CheckPath = func(p string) (sanity.PathKind, error) {
		fi, err := os.Stat(p)
		switch {
		case errors.Is(err, os.ErrNotExist):
			return sanity.PathIsNotFound, nil
		case err != nil:
			return "", err
		case fi.Mode().IsRegular():
			return sanity.PathIsFile, nil
		case fi.IsDir():
			return sanity.PathIsDir, nil
		}
		return sanity.PathIsOther, nil
	}
	return &cfg
}

// sizeReplies computes each reply's encoded size once, as marshalling it
// would. csi-test v5.6.0 compares a reply's snapshot topology with the
// topology it sent, using gomega's Equal, which is reflect.DeepEqual and so
// also compares the size that protobuf-go caches in every message it has
// marshalled (controller.go:1454, "should succeed when creating a snapshot
// with accessibility requirements"): the sent message has one, a reply
// fresh off the wire has none, and equal topologies compare unequal. With
// the reply's sizes cached the same way, the comparison is by value, as it
// means to be. No field of the reply changes.
func sizeReplies(ctx context.Context, method string, req, reply any, cc *grpc.ClientConn, invoker grpc.UnaryInvoker, opts ...grpc.CallOption) error {
	err := invoker(ctx, method, req, reply, cc, opts...)
	if m, ok := reply.(proto.Message); ok && err == nil {
		_ = proto.Size(m)
	}
	return err
}

// sanityCounts tallies a run's specs.
type sanityCounts struct {
	passed, failed, skipped, pending int
	skips                            map[string][]string // reason -> spec texts
}

var sanityResults struct {
	mu     sync.Mutex
	counts map[string]*sanityCounts // by run name
}

// skipUnlessSanityCanRun skips a csi-sanity test under go test -count > 1,
// which Ginkgo refuses (it runs one suite per process).
func skipUnlessSanityCanRun(t *testing.T) {
	t.Helper()
	if f := flag.Lookup("test.count"); f != nil && f.Value.String() != "1" {
		t.Skip("Ginkgo runs one suite per process and refuses go test -count > 1; run csi-sanity with -count=1")
	}
}

// runSanity runs csi-sanity once per config, as one Ginkgo suite, and logs
// each run's counts with the reason for every skip.
func runSanity(t *testing.T, configs map[string]*sanity.TestConfig) map[string]*sanityCounts {
	t.Helper()
	skipUnlessSanityCanRun(t)
	names := make([]string, 0, len(configs))
	for n := range configs {
		names = append(names, n)
	}
	sort.Strings(names)
	for _, n := range names {
		cfg := configs[n]
		ginkgo.Describe(n, func() { sanity.GinkgoTest(cfg) })
	}
	ginkgo.ReportAfterSuite("csi-dmthin sanity counts", func(r ginkgo.Report) {
		counts := map[string]*sanityCounts{}
		for _, n := range names {
			counts[n] = &sanityCounts{skips: map[string][]string{}}
		}
		for _, s := range r.SpecReports {
			if s.LeafNodeType != types.NodeTypeIt || len(s.ContainerHierarchyTexts) == 0 {
				continue
			}
			c := counts[s.ContainerHierarchyTexts[0]]
			if c == nil {
				continue
			}
			switch {
			case s.State == types.SpecStatePassed:
				c.passed++
			case s.State == types.SpecStateSkipped:
				c.skipped++
				c.skips[s.Failure.Message] = append(c.skips[s.Failure.Message], s.FullText())
			case s.State == types.SpecStatePending:
				c.pending++ // XIt in csi-test itself
			case s.State.Is(types.SpecStateFailureStates):
				c.failed++
			}
		}
		sanityResults.mu.Lock()
		sanityResults.counts = counts
		sanityResults.mu.Unlock()
	})
	gomega.RegisterFailHandler(ginkgo.Fail)
	suiteConfig, reporterConfig := ginkgo.GinkgoConfiguration()
	reporterConfig.Succinct = true
	ginkgo.RunSpecs(t, "csi-dmthin sanity", suiteConfig, reporterConfig)
	sanityResults.mu.Lock()
	counts := sanityResults.counts
	sanityResults.mu.Unlock()
	for _, n := range names {
		c := counts[n]
		if c == nil {
			t.Errorf("no results for the %s run", n)
			continue
		}
		var b strings.Builder
		fmt.Fprintf(&b, "csi-sanity %s: %d passed, %d failed, %d skipped, %d pending", n, c.passed, c.failed, c.skipped, c.pending)
		reasons := make([]string, 0, len(c.skips))
		for r := range c.skips {
			reasons = append(reasons, r)
		}
		sort.Strings(reasons)
		for _, r := range reasons {
			fmt.Fprintf(&b, "\n  skipped (%q):", r)
			for _, s := range c.skips[r] {
				fmt.Fprintf(&b, "\n    %s", s)
			}
		}
		t.Log(b.String())
	}
	return counts
}

func TestSanity(t *testing.T) {
	if vmtest.InGuest() {
		t.Skip("one Ginkgo suite per process: the VM runs TestSanityKernel")
	}
	skipUnlessSanityCanRun(t)
	k := thinpooltest.NewFakeKernel()
	dir := t.TempDir()
	p, err := thinpool.Open(t.Context(), loopPoolConfig(dir, testPool, sanityPoolBytes), k)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = p.Close() })
	kubeletDir := filepath.Join(dir, "kubelet")
	fs := newFakeFS(k)
	sanityOnPool(t, testPool, p, kubeletDir, fs, fs.mountPoints)
}

// sanityOnPool runs csi-sanity, mount and block, against a driver on pool
// p with fs, then checks it left no volume, snapshot or mount (mounts lists
// the mount points under kubeletDir).
func sanityOnPool(t *testing.T, name string, p Pool, kubeletDir string, fs FS, mounts func() []string) {
	t.Helper()
	d, err := New(Options{NodeID: testNode, Version: "sanity", Pools: map[string]Pool{name: p}, KubeletDir: kubeletDir, FS: fs})
	if err != nil {
		t.Fatal(err)
	}
	addr := serveDriver(t, d)
	runSanity(t, map[string]*sanity.TestConfig{
		"mount": sanityConfig(t, addr, kubeletDir, "mount"),
		"block": sanityConfig(t, addr, kubeletDir, "block"),
	})
	if left := leftovers(d, p); len(left) != 0 {
		t.Errorf("csi-sanity left %d volumes and snapshots: %v", len(left), left)
	}
	if mp := mounts(); len(mp) != 0 {
		t.Errorf("csi-sanity left mounts: %v", mp)
	}
}
