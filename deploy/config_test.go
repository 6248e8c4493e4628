package deploy

import (
	"encoding/json"
	"go/ast"
	"go/parser"
	"go/token"
	"os"
	"reflect"
	"slices"
	"strconv"
	"strings"
	"testing"
)

// jsonFields returns the JSON names of the fields of the named struct types
// in a Go source file.
func jsonFields(t *testing.T, file string, types ...string) map[string][]string {
	t.Helper()
	f, err := parser.ParseFile(token.NewFileSet(), file, nil, 0)
	if err != nil {
		t.Fatal(err)
	}
	out := map[string][]string{}
	ast.Inspect(f, func(n ast.Node) bool {
		ts, ok := n.(*ast.TypeSpec)
		if !ok || !slices.Contains(types, ts.Name.Name) {
			return true
		}
		st, ok := ts.Type.(*ast.StructType)
		if !ok {
			t.Fatalf("%s is not a struct", ts.Name.Name)
		}
		for _, fld := range st.Fields.List {
			if fld.Tag == nil {
				t.Fatalf("%s: a field without a json tag", ts.Name.Name)
			}
			tag, err := strconv.Unquote(fld.Tag.Value)
			if err != nil {
				t.Fatal(err)
			}
			name, _, _ := strings.Cut(reflect.StructTag(tag).Get("json"), ",")
			out[ts.Name.Name] = append(out[ts.Name.Name], name)
		}
		return false
	})
	for _, ty := range types {
		if out[ty] == nil {
			t.Fatalf("%s: no struct %s", file, ty)
		}
	}
	return out
}

// TestSchemaMatchesPoolsConfig ties the schema of nodePools to the pools.yaml
// format the driver reads (cmd/csi-dmthin/config.go, which decodes strictly):
// a field added there and not here would be refused at install time, and a
// field here but not there would make the driver refuse its configuration.
func TestSchemaMatchesPoolsConfig(t *testing.T) {
	fields := jsonFields(t, "../cmd/csi-dmthin/config.go", "fileConfig", "poolConfig")

	b, err := os.ReadFile(chartDir + "/values.schema.json")
	if err != nil {
		t.Fatal(err)
	}
	type props struct {
		Properties map[string]json.RawMessage `json:"properties"`
	}
	var schema struct {
		Properties struct {
			NodePools struct {
				Items props `json:"items"`
			} `json:"nodePools"`
		} `json:"properties"`
		Definitions struct {
			Pool props `json:"pool"`
		} `json:"definitions"`
	}
	if err := json.Unmarshal(b, &schema); err != nil {
		t.Fatal(err)
	}
	keys := func(m map[string]json.RawMessage, skip ...string) []string {
		var out []string
		for k := range m {
			if !slices.Contains(skip, k) {
				out = append(out, k)
			}
		}
		slices.Sort(out)
		return out
	}
	sorted := func(s []string) []string { s = slices.Clone(s); slices.Sort(s); return s }

	// An entry is the file's fields plus the chart's own name and nodeSelector.
	if got, want := keys(schema.Properties.NodePools.Items.Properties, "name", "nodeSelector"), sorted(fields["fileConfig"]); !slices.Equal(got, want) {
		t.Errorf("nodePools entry fields %q, pools.yaml (fileConfig) fields %q", got, want)
	}
	if got, want := keys(schema.Definitions.Pool.Properties), sorted(fields["poolConfig"]); !slices.Equal(got, want) {
		t.Errorf("schema pool fields %q, pools.yaml (poolConfig) fields %q", got, want)
	}
}
