package deploy

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/prometheus/model/labels"
	"github.com/prometheus/prometheus/promql/parser"
	"google.golang.org/grpc"
	appsv1 "k8s.io/api/apps/v1"
	apiextensionsv1 "k8s.io/apiextensions-apiserver/pkg/apis/apiextensions/v1"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"

	"github.com/csi-dmthin/csi-dmthin/pkg/csi"
	"github.com/csi-dmthin/csi-dmthin/pkg/kube"
	"github.com/csi-dmthin/csi-dmthin/pkg/thinpool"
)

// The chart's operations parts: the ThinPool CRD against the driver's Go
// types, the alert rules and the dashboard against the driver's metrics,
// and the values the end-to-end test installs with.

// schemaPaths lists the dotted paths of a CRD schema's properties.
func schemaPaths(prefix string, s apiextensionsv1.JSONSchemaProps, out map[string]apiextensionsv1.JSONSchemaProps) {
	for name, p := range s.Properties {
		path := strings.TrimPrefix(prefix+"."+name, ".")
		out[path] = p
		schemaPaths(path, p, out)
	}
}

// leafPaths lists the dotted paths of an object's fields.
func objectPaths(prefix string, v any, out map[string]bool) {
	m, ok := v.(map[string]any)
	if !ok {
		return
	}
	for k, c := range m {
		path := strings.TrimPrefix(prefix+"."+k, ".")
		out[path] = true
		objectPaths(path, c, out)
	}
}

// TestThinPoolCRDMatchesTypes: every field the driver writes is in the
// CRD's schema (the API server would drop it), every field of the schema is
// one the driver writes, and the printer columns and selectable fields name
// fields that exist.
func TestThinPoolCRDMatchesTypes(t *testing.T) {
	var crd *apiextensionsv1.CustomResourceDefinition
	for _, c := range ofKind[*apiextensionsv1.CustomResourceDefinition](objects(t, render(t, nil, capabilities(t)))) {
		if c.Name == kube.ThinPoolGVR.Resource+"."+kube.ThinPoolGroup {
			crd = c
		}
	}
	if crd == nil {
		t.Fatal("no ThinPool CRD in the default render")
	}
	if crd.Spec.Group != kube.ThinPoolGroup || crd.Spec.Names.Kind != kube.ThinPoolKind || crd.Spec.Scope != apiextensionsv1.ClusterScoped ||
		len(crd.Spec.Versions) != 1 || crd.Spec.Versions[0].Name != kube.ThinPoolVersion || crd.Spec.Versions[0].Subresources == nil || crd.Spec.Versions[0].Subresources.Status == nil {
		t.Fatalf("CRD %+v", crd.Spec)
	}
	if crd.Annotations["helm.sh/resource-policy"] != "keep" {
		t.Error("the CRD is not kept at uninstall: every ThinPool would go with it")
	}
	v := crd.Spec.Versions[0]
	schema := map[string]apiextensionsv1.JSONSchemaProps{}
	schemaPaths("", *v.Schema.OpenAPIV3Schema, schema)

	q := resource.MustParse("1Gi")
	now := metav1.NewTime(time.Now())
	tp := &kube.ThinPool{
		TypeMeta:   metav1.TypeMeta{APIVersion: "dmthin.io/v1alpha1", Kind: "ThinPool"},
		ObjectMeta: metav1.ObjectMeta{Name: "n.p"},
		Spec:       kube.ThinPoolSpec{NodeName: "n", Pool: "p", Driver: "d"},
		Status: kube.ThinPoolStatus{
			Health: "Healthy", Message: "m", Mode: "rw",
			Data:        kube.SpaceStatus{Size: q, Used: q, UsedPercent: 1},
			Metadata:    kube.SpaceStatus{Size: q, Used: q, UsedPercent: 1},
			Provisioned: q, Available: q, Overprovisioning: "1.00", OverprovisionLimit: "10.00",
			Volumes: 1, Snapshots: 1, Templates: 1,
			LastEvent:     &kube.PoolEvent{Time: now, Reason: "LowWater", Message: "m"},
			LastGrowth:    &kube.PoolGrowth{Time: now, DataFrom: q, DataTo: q, MetadataFrom: q, MetadataTo: q},
			DriverVersion: "v", UpdateTime: now,
			Copy: &kube.CopyEndpoint{Address: "10.0.0.1:9811", CertSHA256: "ab"},
		},
	}
	u, err := runtime.DefaultUnstructuredConverter.ToUnstructured(tp)
	if err != nil {
		t.Fatal(err)
	}
	written := map[string]bool{}
	objectPaths("", u, written)
	for p := range written {
		if strings.HasPrefix(p, "metadata.") {
			continue
		}
		if _, ok := schema[p]; !ok {
			t.Errorf("the driver writes %s, which the CRD's schema does not have (the API server would drop it)", p)
		}
	}
	for p := range schema {
		if !written[p] {
			t.Errorf("the CRD's schema has %s, which the driver never writes", p)
		}
	}
	for _, c := range v.AdditionalPrinterColumns {
		p := strings.TrimPrefix(c.JSONPath, ".")
		if _, ok := schema[p]; !ok && p != "metadata.creationTimestamp" {
			t.Errorf("printer column %s: %s is not in the schema", c.Name, c.JSONPath)
		}
	}
	var cols []string
	for _, c := range v.AdditionalPrinterColumns {
		if c.Priority == 0 {
			cols = append(cols, c.Name)
		}
	}
	if want := []string{"Node", "Pool", "Health", "Data", "Data%", "Meta%", "Provisioned", "Volumes", "Snapshots", "Age"}; !slices.Equal(cols, want) {
		t.Errorf("kubectl get thinpools prints %q, want %q", cols, want)
	}
	for _, f := range v.SelectableFields {
		if _, ok := schema[strings.TrimPrefix(f.JSONPath, ".")]; !ok {
			t.Errorf("selectable field %s is not in the schema", f.JSONPath)
		}
	}
}

// family is a metric the driver exports, with its labels.
type family struct {
	labels map[string]bool
}

// targetLabels are the labels a scrape adds (the chart's monitors add
// node).
var targetLabels = []string{"job", "instance", "node", "namespace", "pod", "container", "endpoint", "service"}

// driverMetrics gathers every metric family the driver registers, each
// with at least one sample, from the driver's own code.
func driverMetrics(t *testing.T) map[string]family {
	t.Helper()
	reg := prometheus.NewRegistry()
	full := thinpool.Usage{DataBytes: 1, DataUsedBytes: 1, MetadataBytes: 1, MetadataUsedBytes: 1, OverprovisionRatio: 10, Mode: thinpool.ModeReadWrite}
	m, err := csi.NewMetrics(reg, func() map[string]csi.UsageSource {
		return map[string]csi.UsageSource{"p": usageOf(full), "broken": usageOf(thinpool.Usage{})}
	})
	if err != nil {
		t.Fatal(err)
	}
	if err := csi.RegisterBuildInfo(reg, "v"); err != nil {
		t.Fatal(err)
	}
	m.PoolEvent("p", time.Now())
	m.PoolGrown("p", csi.GrowTriggerAdmin)
	_, _ = m.UnaryServerInterceptor()(context.Background(), nil, &grpc.UnaryServerInfo{FullMethod: "/csi.v1.Controller/CreateVolume"},
		func(context.Context, any) (any, error) { return nil, nil })
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	out := map[string]family{}
	for _, mf := range mfs {
		f := family{labels: map[string]bool{}}
		for _, l := range targetLabels {
			f.labels[l] = true
		}
		for _, mm := range mf.GetMetric() {
			for _, lp := range mm.GetLabel() {
				f.labels[lp.GetName()] = true
			}
		}
		names := []string{mf.GetName()}
		if mf.GetType() == dto.MetricType_HISTOGRAM {
			f.labels["le"] = true
			names = []string{mf.GetName() + "_bucket", mf.GetName() + "_sum", mf.GetName() + "_count"}
		}
		for _, n := range names {
			out[n] = f
		}
	}
	// Prometheus's own, for every target.
	out["up"] = family{labels: map[string]bool{}}
	for _, l := range targetLabels {
		out["up"].labels[l] = true
	}
	return out
}

type usageOf thinpool.Usage

func (u usageOf) Usage() (thinpool.Usage, error) {
	if u.DataBytes == 0 {
		return thinpool.Usage{}, thinpool.ErrClosed // an unreadable pool: the error counter
	}
	return thinpool.Usage(u), nil
}

// checkQuery parses a PromQL expression and checks every metric it reads
// is the driver's (or up), with labels the metric has; it returns the
// labels its result carries.
func checkQuery(errorf func(format string, a ...any), what, expr string, metrics map[string]family) map[string]bool {
	e, err := parser.ParseExpr(expr)
	if err != nil {
		errorf("%s: %q does not parse: %v", what, expr, err)
		return nil
	}
	var result map[string]bool
	parser.Inspect(e, func(n parser.Node, _ []parser.Node) error {
		switch n := n.(type) {
		case *parser.VectorSelector:
			f, ok := metrics[n.Name]
			if !ok {
				errorf("%s: the driver exports no metric %q", what, n.Name)
				return nil
			}
			for _, m := range n.LabelMatchers {
				if m.Name != labels.MetricName && !f.labels[m.Name] {
					errorf("%s: metric %s has no label %q", what, n.Name, m.Name)
				}
			}
			if result == nil {
				result = map[string]bool{}
				for l := range f.labels {
					result[l] = true
				}
			} else {
				for l := range result {
					if !f.labels[l] {
						delete(result, l)
					}
				}
			}
		case *parser.AggregateExpr:
			for _, g := range n.Grouping {
				found := false
				parser.Inspect(n.Expr, func(c parser.Node, _ []parser.Node) error {
					if vs, ok := c.(*parser.VectorSelector); ok && metrics[vs.Name].labels[g] {
						found = true
					}
					return nil
				})
				if !found {
					errorf("%s: grouping by %q, which no metric of it has", what, g)
				}
			}
		}
		return nil
	})
	switch top := e.(type) {
	case *parser.AggregateExpr:
		result = map[string]bool{}
		for _, g := range top.Grouping {
			result[g] = true
		}
	case *parser.Call:
		if top.Func.Name == "absent" {
			result = map[string]bool{}
		}
	}
	return result
}

// TestAlertRulesMatchMetrics parses every alert's expression with
// Prometheus's own parser and checks it against the metrics the driver
// exports: their names, their labels, the job the chart's monitors give
// them, and the labels the annotations use. Every runbook it links exists.
func TestAlertRulesMatchMetrics(t *testing.T) {
	metrics := driverMetrics(t)
	vals := mustYAML(t, `metrics: {podMonitor: {enabled: true}, prometheusRule: {enabled: true}}`)
	rules := ofKind[*prometheusRule](objects(t, render(t, vals, capabilities(t, monitoringAPI))))
	if len(rules) != 1 {
		t.Fatalf("%d PrometheusRules", len(rules))
	}
	labelRef := regexp.MustCompile(`\$labels\.([a-zA-Z_]+)`)
	seen := map[string]bool{}
	for _, g := range rules[0].Spec.Groups {
		for _, r := range g.Rules {
			what := "alert " + r.Alert
			seen[r.Alert] = true
			if !strings.Contains(r.Expr, `job="csi-dmthin"`) {
				t.Errorf("%s: %q does not select the chart's job", what, r.Expr)
			}
			out := checkQuery(t.Errorf, what, r.Expr, metrics)
			for _, a := range r.Annotations {
				for _, m := range labelRef.FindAllStringSubmatch(a, -1) {
					if !out[m[1]] {
						t.Errorf("%s: an annotation uses $labels.%s, which its expression's result does not carry", what, m[1])
					}
				}
			}
			if s := r.Labels["severity"]; s != "warning" && s != "critical" {
				t.Errorf("%s: severity %q", what, s)
			}
			url := r.Annotations["runbook_url"]
			doc, ok := strings.CutPrefix(url, "https://github.com/csi-dmthin/csi-dmthin/blob/main/")
			if !ok {
				t.Errorf("%s: runbook_url %q", what, url)
			} else if _, err := os.Stat(filepath.Join("..", doc)); err != nil {
				t.Errorf("%s: its runbook %s: %v", what, doc, err)
			}
			if r.Annotations["summary"] == "" || r.Annotations["description"] == "" {
				t.Errorf("%s: no summary or description", what)
			}
		}
	}
	// What the issue asks for: data and metadata over thresholds, out of
	// space, needs_check, read-only, the driver down.
	for _, a := range []string{"CSIDmthinPoolDataFilling", "CSIDmthinPoolDataFull", "CSIDmthinPoolMetadataFilling", "CSIDmthinPoolMetadataFull",
		"CSIDmthinPoolOutOfDataSpace", "CSIDmthinPoolNeedsCheck", "CSIDmthinPoolReadOnly", "CSIDmthinPoolFailed", "CSIDmthinDriverDown"} {
		if !seen[a] {
			t.Errorf("no alert %s", a)
		}
	}
	// A rule that reads a metric or label the driver does not export
	// fails the check.
	var errs []string
	collect := func(format string, a ...any) { errs = append(errs, fmt.Sprintf(format, a...)) }
	checkQuery(collect, "x", `csi_dmthin_pool_data_free_bytes{job="csi-dmthin"} > 0`, metrics)
	checkQuery(collect, "y", `csi_dmthin_pool_healthy{volume="v"} == 0`, metrics)
	checkQuery(collect, "z", `sum by (volume) (csi_dmthin_pool_volumes)`, metrics)
	checkQuery(collect, "w", `csi_dmthin_pool_healthy ==`, metrics)
	if len(errs) != 4 {
		t.Errorf("the check reported %q, want one error for each of four wrong queries", errs)
	}
}

// TestDashboardQueriesMatchMetrics: every query of the Grafana dashboard
// parses and reads metrics and labels the driver exports.
func TestDashboardQueriesMatchMetrics(t *testing.T) {
	metrics := driverMetrics(t)
	b, err := os.ReadFile(chartDir + "/files/dashboard.json")
	if err != nil {
		t.Fatal(err)
	}
	var dash struct {
		UID        string `json:"uid"`
		Templating struct {
			List []struct {
				Name  string `json:"name"`
				Type  string `json:"type"`
				Query any    `json:"query"`
			} `json:"list"`
		} `json:"templating"`
		Panels []struct {
			Title   string `json:"title"`
			Type    string `json:"type"`
			Targets []struct {
				Expr string `json:"expr"`
			} `json:"targets"`
		} `json:"panels"`
	}
	if err := json.Unmarshal(b, &dash); err != nil {
		t.Fatal(err)
	}
	subst := strings.NewReplacer("$__rate_interval", "5m", "$job", "csi-dmthin", "$node", ".*", "$pool", ".*")
	queries := 0
	for _, p := range dash.Panels {
		for _, tg := range p.Targets {
			checkQuery(t.Errorf, "panel "+p.Title, subst.Replace(tg.Expr), metrics)
			queries++
		}
	}
	labelValues := regexp.MustCompile(`^label_values\((.*), *([a-z_]+)\)$`)
	for _, v := range dash.Templating.List {
		q, ok := v.Query.(map[string]any)
		if v.Type != "query" || !ok {
			continue
		}
		m := labelValues.FindStringSubmatch(q["query"].(string))
		if m == nil {
			t.Errorf("variable %s: query %v", v.Name, q["query"])
			continue
		}
		if out := checkQuery(t.Errorf, "variable "+v.Name, subst.Replace(m[1]), metrics); !out[m[2]] {
			t.Errorf("variable %s: the label %q is not on %s", v.Name, m[2], m[1])
		}
	}
	if queries < 15 || dash.UID == "" {
		t.Errorf("%d panel queries, uid %q", queries, dash.UID)
	}
}

// TestE2EValues: charts/csi-dmthin/ci/e2e-values.yaml, which the end-to-end
// test and throwaway clusters install with, names the images the e2e
// harness imports (registry localhost, the versions of
// test/e2e/versions.env) and one loop-file pool.
func TestE2EValues(t *testing.T) {
	b, err := os.ReadFile(chartDir + "/ci/e2e-values.yaml")
	if err != nil {
		t.Fatal(err)
	}
	versions := map[string]string{}
	f, err := os.Open("../test/e2e/versions.env")
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if k, v, ok := strings.Cut(sc.Text(), "="); ok && !strings.HasPrefix(k, "#") {
			versions[k] = v
		}
	}
	docs := objects(t, render(t, mustYAML(t, string(b)), capabilities(t)))
	dss := ofKind[*appsv1.DaemonSet](docs)
	if len(dss) != 1 {
		t.Fatalf("%d DaemonSets", len(dss))
	}
	var images []string
	for _, c := range dss[0].Spec.Template.Spec.Containers {
		images = append(images, c.Image)
	}
	sort.Strings(images)
	want := []string{
		"localhost/csi-dmthin:" + loadChart(t).Metadata.AppVersion,
		"localhost/sig-storage/csi-provisioner:" + versions["CSI_PROVISIONER_VERSION"],
		"localhost/sig-storage/csi-resizer:" + versions["CSI_RESIZER_VERSION"],
		"localhost/sig-storage/csi-snapshotter:" + versions["CSI_SNAPSHOTTER_VERSION"],
	}
	if !slices.Equal(images, want) {
		t.Errorf("e2e images %q, want %q", images, want)
	}
	// The chart's defaults pin the same versions.
	vals := mustYAML(t, mustRead(t, chartDir+"/values.yaml"))
	for name, key := range map[string]string{"provisioner": "CSI_PROVISIONER_VERSION", "snapshotter": "CSI_SNAPSHOTTER_VERSION", "resizer": "CSI_RESIZER_VERSION"} {
		img := vals["sidecars"].(map[string]any)[name].(map[string]any)["image"].(map[string]any)
		if img["tag"] != versions[key] || img["registry"] != "registry.k8s.io" {
			t.Errorf("sidecar %s: %v, want registry.k8s.io at %s", name, img, versions[key])
		}
	}
}

func mustRead(t *testing.T, path string) string {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}
