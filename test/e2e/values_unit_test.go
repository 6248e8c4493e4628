package e2e

import (
	"os"
	"path/filepath"
	"testing"

	"helm.sh/helm/v3/pkg/chart/loader"
	"helm.sh/helm/v3/pkg/chartutil"
	"sigs.k8s.io/yaml"
)

// TestValuesFile checks valuesFile without a cluster: the chart's schema
// accepts it; the class csi-dmthin is the chart's default class with no pool
// named (the node's default pool), as a user installs it; the small class
// is on a pool that admits no overprovisioning, so provisioning alone fills
// it; and the tiny class is on the tiny pool that a pod fills by writing.
func TestValuesFile(t *testing.T) {
	ch, err := loader.Load(filepath.Join("..", "..", "charts", "csi-dmthin"))
	if err != nil {
		t.Fatal(err)
	}
	data, err := os.ReadFile(valuesFile)
	if err != nil {
		t.Fatal(err)
	}
	var e2e map[string]any
	if err := yaml.UnmarshalStrict(data, &e2e); err != nil {
		t.Fatal(err)
	}
	vals, err := chartutil.CoalesceValues(ch, e2e)
	if err != nil {
		t.Fatal(err)
	}
	if err := chartutil.ValidateAgainstSchema(ch, vals); err != nil {
		t.Fatalf("the chart's schema refuses %s: %v", valuesFile, err)
	}
	list := func(m map[string]any, key string) []any {
		l, _ := m[key].([]any)
		return l
	}
	entries := list(vals, "nodePools")
	if len(entries) != 1 {
		t.Fatalf("%d nodePools entries, want one for every node", len(entries))
	}
	entry := entries[0].(map[string]any)
	pools := map[string]map[string]any{}
	for _, p := range list(entry, "pools") {
		m := p.(map[string]any)
		pools[m["name"].(string)] = m
	}
	classes := map[string]map[string]any{}
	for _, sc := range list(vals, "storageClasses") {
		m := sc.(map[string]any)
		classes[m["name"].(string)] = m
	}
	def := list(ch.Values, "storageClasses")[0].(map[string]any)
	if c := classes[storageClass]; c == nil || c["pool"] != nil && c["pool"] != "" || c["fsType"] != def["fsType"] {
		t.Errorf("class %s %v: want the default pool and the chart's default fsType %v", storageClass, c, def["fsType"])
	}
	if pools[entry["defaultPool"].(string)] == nil {
		t.Errorf("defaultPool %v is not a pool of %v", entry["defaultPool"], pools)
	}
	if c, p := classes[smallClass], pools["small"]; c == nil || c["pool"] != "small" || p == nil || p["overprovisionRatio"] != float64(1) {
		t.Errorf("class %s %v on pool %v: want pool small with overprovisionRatio 1", smallClass, c, p)
	}
	if c, p := classes[tinyClass], pools["tiny"]; c == nil || c["pool"] != "tiny" || p == nil {
		t.Errorf("class %s %v on pool %v: want pool tiny", tinyClass, c, p)
	}
}
