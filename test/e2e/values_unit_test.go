package e2e

import (
	"os"
	"path/filepath"
	"reflect"
	"testing"

	"helm.sh/helm/v3/pkg/chart/loader"
	"helm.sh/helm/v3/pkg/chartutil"
	"sigs.k8s.io/yaml"
)

// TestValuesFile checks testdata/values-e2e.yaml without a cluster: the
// chart's schema accepts it, the pool and class the storage suite and the
// scenarios use are the chart's defaults unchanged (the e2e must test what a
// user installs), and the small class names the small pool.
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
	defaults := ch.Values
	wantPool := list(list(defaults, "nodePools")[0].(map[string]any), "pools")[0]
	gotPools := list(list(vals, "nodePools")[0].(map[string]any), "pools")
	if !reflect.DeepEqual(gotPools[0], wantPool) {
		t.Errorf("first pool %v, want the chart's default %v", gotPools[0], wantPool)
	}
	if got, want := list(vals, "storageClasses")[0], list(defaults, "storageClasses")[0]; !reflect.DeepEqual(got, want) {
		t.Errorf("first class %v, want the chart's default %v", got, want)
	}
	var small map[string]any
	for _, sc := range list(vals, "storageClasses") {
		if m := sc.(map[string]any); m["name"] == smallClass {
			small = m
		}
	}
	if small == nil || small["pool"] != "small" || len(gotPools) != 2 || gotPools[1].(map[string]any)["name"] != "small" {
		t.Errorf("class %s %v and pools %v: want the class on pool small", smallClass, small, gotPools)
	}
}
