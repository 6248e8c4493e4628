package kube

import (
	"os"
	"testing"
)

func TestMain(m *testing.M) {
	// The snapshot client's generated informers (v8.7.0) do not tell the
	// reflector that a fake clientset cannot stream a watch-list, so the
	// reflector waits for a bookmark the fake never sends. Lists and
	// watches the old way, as the fakes support, for every informer here.
	os.Setenv("KUBE_FEATURE_WatchListClient", "false")
	os.Exit(m.Run())
}
