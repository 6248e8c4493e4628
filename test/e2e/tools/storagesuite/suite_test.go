// Package storagesuite builds Kubernetes' external storage e2e suite on its
// own: `go test -c` in this directory gives an e2e.test holding only the
// "External Storage" specs that a --storage.testdriver file defines, not the
// other ~6000 specs of k8s.io/kubernetes/test/e2e, so it compiles in a
// fraction of the time. test/e2e runs it against csi-dmthin (storage_test.go
// there). It is our own entry point to the framework, in the shape the
// framework's documentation asks for: flags, then AfterReadingAllFlags,
// then ginkgo.RunSpecs with the framework's configuration.
package storagesuite

import (
	"context"
	"flag"
	"fmt"
	"os"
	"testing"

	"github.com/onsi/ginkgo/v2"
	"github.com/onsi/gomega"

	"k8s.io/component-base/logs"
	"k8s.io/klog/v2"
	"k8s.io/kubernetes/test/e2e/framework"
	e2econfig "k8s.io/kubernetes/test/e2e/framework/config"
	e2enode "k8s.io/kubernetes/test/e2e/framework/node"
	"k8s.io/kubernetes/test/e2e/framework/testfiles"
	e2etestingmanifests "k8s.io/kubernetes/test/e2e/testing-manifests"
	testfixtures "k8s.io/kubernetes/test/fixtures"
	imageutils "k8s.io/kubernetes/test/utils/image"

	// Feature and label constants, defined before any spec uses them.
	_ "k8s.io/kubernetes/test/e2e/feature"
	// The suite itself: registers --storage.testdriver, which defines the
	// specs for each driver file while the flags are parsed.
	_ "k8s.io/kubernetes/test/e2e/storage/external"
	// The framework's usual hooks: failure dumps, metrics, node checks.
	_ "k8s.io/kubernetes/test/e2e/framework/debug/init"
	_ "k8s.io/kubernetes/test/e2e/framework/metrics/init"
	_ "k8s.io/kubernetes/test/e2e/framework/node/init"
	_ "k8s.io/kubernetes/test/utils/ktesting/format"
)

// listImages makes the binary print the images its specs run, one
// "role=reference" line each, and exit: the harness builds images under
// exactly these names (no registry is reachable) instead of keeping a copy
// of Kubernetes' image list that would go stale. (The framework's own
// -list-images prints every suite's images, without roles.)
var listImages = flag.Bool("storage-images", false, "print the container images the storage specs use, as role=reference lines, and exit")

// images are the test images the storage specs and the framework helpers
// they call use. busybox-like: a shell and applets; agnhost: the agnhost
// program (mounttest, pause) with a shell and nsenter beside it.
var images = map[string]imageutils.ImageID{
	"busybox":           imageutils.BusyBox,
	"nginx":             imageutils.Nginx,
	"glibc-dns-testing": imageutils.GlibcDnsTesting,
	"agnhost":           imageutils.Agnhost,
	"pause":             imageutils.Pause,
}

func TestMain(m *testing.M) {
	e2econfig.CopyFlags(e2econfig.Flags, flag.CommandLine)
	framework.RegisterCommonFlags(flag.CommandLine)
	framework.RegisterClusterFlags(flag.CommandLine)
	flag.Parse()
	if flag.NArg() > 0 {
		fmt.Fprintf(os.Stderr, "unexpected arguments: %q\n", flag.Args())
		os.Exit(2)
	}
	if *listImages {
		for role, id := range images {
			fmt.Printf("%s=%s\n", role, imageutils.GetE2EImage(id))
		}
		os.Exit(0)
	}
	// Manifests and fixtures some specs read, from the binary itself.
	testfiles.AddFileSource(e2etestingmanifests.GetE2ETestingManifestsFS())
	testfiles.AddFileSource(testfixtures.GetTestFixturesFS())
	framework.AfterReadingAllFlags(&framework.TestContext)
	os.Exit(m.Run())
}

// The cluster is ready before any spec runs: every node schedulable, and
// the node count known to the specs that spread pods over nodes.
var _ = ginkgo.SynchronizedBeforeSuite(func(ctx context.Context) []byte {
	c, err := framework.LoadClientset()
	framework.ExpectNoError(err, "loading the client")
	timeouts := framework.NewTimeoutContext()
	framework.ExpectNoError(e2enode.WaitForAllNodesSchedulable(ctx, c, timeouts.NodeSchedulable))
	return nil
}, func(ctx context.Context, _ []byte) {
	c, err := framework.LoadClientset()
	framework.ExpectNoError(err, "loading the client")
	nodes, err := e2enode.GetReadySchedulableNodes(ctx, c)
	framework.ExpectNoError(err)
	framework.TestContext.CloudConfig.NumNodes = len(nodes.Items)
})

func TestExternalStorage(t *testing.T) {
	logs.InitLogs()
	defer logs.FlushLogs()
	klog.EnableContextualLogging(true)
	gomega.RegisterFailHandler(framework.Fail)
	suiteConfig, reporterConfig := framework.CreateGinkgoConfig()
	ginkgo.RunSpecs(t, "csi-dmthin: Kubernetes external storage", suiteConfig, reporterConfig)
}
