package deploy

import (
	"os"
	"sort"
	"strings"
	"testing"
)

// freeForm are the values that are maps of the user's own keys (labels,
// resources, ...): documented as one value.
var freeForm = map[string]bool{
	"nodeSelector": true, "podAnnotations": true, "customLabels": true, "labels": true,
	"resources": true, "affinity": true, "parameters": true, "annotations": true,
}

// leafPaths lists the dotted paths of a values tree down to its scalars,
// lists and free-form maps.
func leafPaths(prefix string, v any, out *[]string) {
	m, ok := v.(map[string]any)
	if !ok || len(m) == 0 || freeForm[prefix[strings.LastIndex(prefix, ".")+1:]] {
		*out = append(*out, prefix)
		return
	}
	for k, c := range m {
		p := k
		if prefix != "" {
			p = prefix + "." + k
		}
		leafPaths(p, c, out)
	}
}

// TestReadmeListsEveryValue: the chart README's table names every value of
// values.yaml (an image's four fields may share one row).
func TestReadmeListsEveryValue(t *testing.T) {
	vals, err := os.ReadFile(chartDir + "/values.yaml")
	if err != nil {
		t.Fatal(err)
	}
	readme, err := os.ReadFile(chartDir + "/README.md")
	if err != nil {
		t.Fatal(err)
	}
	var paths []string
	leafPaths("", mustYAML(t, string(vals)), &paths)
	sort.Strings(paths)
	for _, p := range paths {
		row := func(q string) bool { return strings.Contains(string(readme), "| `"+q+"` |") }
		documented := row(p)
		// A sidecar image's four fields share the image's row.
		if parent, _, ok := cutLast(p, "."); ok && strings.HasSuffix(parent, ".image") {
			documented = documented || row(parent)
		}
		if !documented {
			t.Errorf("value %s is not in the README's table", p)
		}
	}
}

func cutLast(s, sep string) (before, after string, found bool) {
	i := strings.LastIndex(s, sep)
	if i < 0 {
		return s, "", false
	}
	return s[:i], s[i+len(sep):], true
}
