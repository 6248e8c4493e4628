package cluster

import (
	"slices"
	"testing"
)

// Every wrapper module is in exactly one of the sets the harness builds,
// so a new tool cannot silently be left out of a run.
func TestToolSetsCoverEveryBuild(t *testing.T) {
	all := append(slices.Clone(DriverTools), StorageSuiteTool)
	for _, tb := range toolBuilds {
		if n := count(all, tb.dir); n != 1 {
			t.Errorf("tool %s is in %d of DriverTools and StorageSuiteTool, want 1", tb.dir, n)
		}
	}
	for _, d := range all {
		if !slices.ContainsFunc(toolBuilds, func(tb toolBuild) bool { return tb.dir == d }) {
			t.Errorf("%s names no tool build", d)
		}
	}
	for _, d := range ClusterTools {
		if !slices.Contains(DriverTools, d) {
			t.Errorf("ClusterTools has %s, DriverTools does not", d)
		}
	}
}

func count(list []string, s string) (n int) {
	for _, x := range list {
		if x == s {
			n++
		}
	}
	return n
}
