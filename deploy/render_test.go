package deploy

import (
	"fmt"
	"path"
	"regexp"
	"sort"
	"strings"
	"testing"

	groupv1 "github.com/kubernetes-csi/external-snapshotter/client/v8/apis/volumegroupsnapshot/v1"
	snapshotv1 "github.com/kubernetes-csi/external-snapshotter/client/v8/apis/volumesnapshot/v1"
	"helm.sh/helm/v3/pkg/chart"
	"helm.sh/helm/v3/pkg/chart/loader"
	"helm.sh/helm/v3/pkg/chartutil"
	"helm.sh/helm/v3/pkg/engine"
	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	storagev1 "k8s.io/api/storage/v1"
	apiextensionsv1 "k8s.io/apiextensions-apiserver/pkg/apis/apiextensions/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"sigs.k8s.io/yaml"
)

const (
	chartDir      = "../charts/csi-dmthin"
	releaseName   = "csi-dmthin"
	releaseNS     = "kube-system"
	kubeVersion   = "v1.37.2"
	snapshotAPI   = "snapshot.storage.k8s.io/v1"
	groupAPI      = "groupsnapshot.storage.k8s.io/v1"
	monitoringAPI = "monitoring.coreos.com/v1"
)

// doc is one rendered object: the template it came from, its YAML, and the
// typed object it strictly decoded into.
type doc struct {
	source string
	yaml   string
	kind   string
	name   string
	obj    any
}

// serviceMonitor mirrors the fields of prometheus-operator's ServiceMonitor
// (monitoring.coreos.com/v1) that the chart writes. Its module is not a
// dependency of this project; the mirror still makes a misspelt or
// misplaced field fail the strict decode.
type serviceMonitor struct {
	metav1.TypeMeta   `json:",inline"`
	metav1.ObjectMeta `json:"metadata"`
	Spec              struct {
		JobLabel          string               `json:"jobLabel"`
		Selector          metav1.LabelSelector `json:"selector"`
		NamespaceSelector struct {
			MatchNames []string `json:"matchNames"`
		} `json:"namespaceSelector"`
		Endpoints []struct {
			Port        string       `json:"port"`
			Path        string       `json:"path"`
			Interval    string       `json:"interval"`
			Relabelings []relabeling `json:"relabelings"`
		} `json:"endpoints"`
	} `json:"spec"`
}

// relabeling is one of a monitor's relabelings.
type relabeling struct {
	SourceLabels []string `json:"sourceLabels"`
	TargetLabel  string   `json:"targetLabel"`
}

// podMonitor mirrors the fields of prometheus-operator's PodMonitor that
// the chart writes.
type podMonitor struct {
	metav1.TypeMeta   `json:",inline"`
	metav1.ObjectMeta `json:"metadata"`
	Spec              struct {
		JobLabel          string               `json:"jobLabel"`
		Selector          metav1.LabelSelector `json:"selector"`
		NamespaceSelector struct {
			MatchNames []string `json:"matchNames"`
		} `json:"namespaceSelector"`
		PodMetricsEndpoints []struct {
			Port        string       `json:"port"`
			Path        string       `json:"path"`
			Interval    string       `json:"interval"`
			Relabelings []relabeling `json:"relabelings"`
		} `json:"podMetricsEndpoints"`
	} `json:"spec"`
}

// prometheusRule mirrors prometheus-operator's PrometheusRule.
type prometheusRule struct {
	metav1.TypeMeta   `json:",inline"`
	metav1.ObjectMeta `json:"metadata"`
	Spec              struct {
		Groups []struct {
			Name  string `json:"name"`
			Rules []struct {
				Alert       string            `json:"alert"`
				Expr        string            `json:"expr"`
				For         string            `json:"for"`
				Labels      map[string]string `json:"labels"`
				Annotations map[string]string `json:"annotations"`
			} `json:"rules"`
		} `json:"groups"`
	} `json:"spec"`
}

// newObject returns an empty typed object for an apiVersion and kind the
// chart may render, or an error for anything else: a kind the tests do not
// know is a kind nobody reviewed.
func newObject(apiVersion, kind string) (any, error) {
	types := map[string]func() any{
		"v1/ServiceAccount":                                func() any { return &corev1.ServiceAccount{} },
		"v1/ConfigMap":                                     func() any { return &corev1.ConfigMap{} },
		"v1/Service":                                       func() any { return &corev1.Service{} },
		"apps/v1/DaemonSet":                                func() any { return &appsv1.DaemonSet{} },
		"apps/v1/Deployment":                               func() any { return &appsv1.Deployment{} },
		"storage.k8s.io/v1/CSIDriver":                      func() any { return &storagev1.CSIDriver{} },
		"storage.k8s.io/v1/StorageClass":                   func() any { return &storagev1.StorageClass{} },
		"rbac.authorization.k8s.io/v1/ClusterRole":         func() any { return &rbacv1.ClusterRole{} },
		"rbac.authorization.k8s.io/v1/ClusterRoleBinding":  func() any { return &rbacv1.ClusterRoleBinding{} },
		"rbac.authorization.k8s.io/v1/Role":                func() any { return &rbacv1.Role{} },
		"rbac.authorization.k8s.io/v1/RoleBinding":         func() any { return &rbacv1.RoleBinding{} },
		snapshotAPI + "/VolumeSnapshotClass":               func() any { return &snapshotv1.VolumeSnapshotClass{} },
		groupAPI + "/VolumeGroupSnapshotClass":             func() any { return &groupv1.VolumeGroupSnapshotClass{} },
		snapshotAPI + "/VolumeSnapshot":                    func() any { return &snapshotv1.VolumeSnapshot{} },
		monitoringAPI + "/ServiceMonitor":                  func() any { return &serviceMonitor{} },
		monitoringAPI + "/PodMonitor":                      func() any { return &podMonitor{} },
		monitoringAPI + "/PrometheusRule":                  func() any { return &prometheusRule{} },
		"apiextensions.k8s.io/v1/CustomResourceDefinition": func() any { return &apiextensionsv1.CustomResourceDefinition{} },
		"v1/Pod":                   func() any { return &corev1.Pod{} },
		"v1/PersistentVolumeClaim": func() any { return &corev1.PersistentVolumeClaim{} },
	}
	f, ok := types[apiVersion+"/"+kind]
	if !ok {
		return nil, fmt.Errorf("no Go type for %s %s", apiVersion, kind)
	}
	return f(), nil
}

func loadChart(t *testing.T) *chart.Chart {
	t.Helper()
	ch, err := loader.Load(chartDir)
	if err != nil {
		t.Fatalf("loading the chart: %v", err)
	}
	return ch
}

// capabilities is a v1.37 cluster with the given extra API group versions
// (e.g. the snapshot CRDs').
func capabilities(t *testing.T, apis ...string) *chartutil.Capabilities {
	t.Helper()
	kv, err := chartutil.ParseKubeVersion(kubeVersion)
	if err != nil {
		t.Fatal(err)
	}
	return &chartutil.Capabilities{
		KubeVersion: *kv,
		APIVersions: append(append(chartutil.VersionSet{}, chartutil.DefaultVersionSet...), apis...),
		HelmVersion: chartutil.DefaultCapabilities.HelmVersion,
	}
}

// render renders the chart the way `helm install` does (values coalesced
// with the chart's defaults and checked against values.schema.json) and
// returns the rendered files by template path, NOTES.txt included.
func render(t *testing.T, vals map[string]any, caps *chartutil.Capabilities) map[string]string {
	t.Helper()
	ch := loadChart(t)
	rv, err := chartutil.ToRenderValues(ch, vals, chartutil.ReleaseOptions{
		Name: releaseName, Namespace: releaseNS, Revision: 1, IsInstall: true,
	}, caps)
	if err != nil {
		t.Fatalf("values: %v", err)
	}
	files, err := engine.Render(ch, rv)
	if err != nil {
		t.Fatalf("rendering: %v", err)
	}
	return files
}

var docSep = regexp.MustCompile(`(?m)^---\s*$`)

// objects splits the rendered templates, all but the helm test's, into
// documents (in template path order, then document order) and strictly
// decodes each into its type.
func objects(t *testing.T, files map[string]string) []doc {
	t.Helper()
	return objectsOf(t, files, func(n string) bool { return !isTestTemplate(n) })
}

// testObjects are the helm test's objects (templates/tests/).
func testObjects(t *testing.T, files map[string]string) []doc {
	t.Helper()
	return objectsOf(t, files, isTestTemplate)
}

func isTestTemplate(name string) bool { return strings.Contains(name, "/templates/tests/") }

func objectsOf(t *testing.T, files map[string]string, keep func(string) bool) []doc {
	t.Helper()
	var names []string
	for n := range files {
		if path.Ext(n) == ".yaml" && keep(n) {
			names = append(names, n)
		}
	}
	sort.Strings(names)
	var out []doc
	for _, n := range names {
		for _, part := range docSep.Split(files[n], -1) {
			if strings.TrimSpace(stripComments(part)) == "" {
				continue
			}
			d := doc{source: strings.TrimPrefix(n, "csi-dmthin/"), yaml: strings.TrimSpace(part) + "\n"}
			var tm struct {
				APIVersion string `json:"apiVersion"`
				Kind       string `json:"kind"`
				Metadata   struct {
					Name string `json:"name"`
				} `json:"metadata"`
			}
			if err := yaml.Unmarshal([]byte(part), &tm); err != nil {
				t.Fatalf("%s: not YAML: %v\n%s", n, err, part)
			}
			obj, err := newObject(tm.APIVersion, tm.Kind)
			if err != nil {
				t.Fatalf("%s: %v", n, err)
			}
			if err := yaml.UnmarshalStrict([]byte(part), obj); err != nil {
				t.Fatalf("%s: %s %q does not strictly decode into its API type: %v\n%s", n, tm.Kind, tm.Metadata.Name, err, part)
			}
			d.kind, d.name, d.obj = tm.Kind, tm.Metadata.Name, obj
			out = append(out, d)
		}
	}
	return out
}

func stripComments(s string) string {
	var b strings.Builder
	for _, l := range strings.Split(s, "\n") {
		if !strings.HasPrefix(strings.TrimSpace(l), "#") {
			b.WriteString(l + "\n")
		}
	}
	return b.String()
}

// ofKind returns the decoded objects of one kind, in render order.
func ofKind[T any](docs []doc) []T {
	var out []T
	for _, d := range docs {
		if o, ok := d.obj.(T); ok {
			out = append(out, o)
		}
	}
	return out
}

func mustYAML(t *testing.T, s string) map[string]any {
	t.Helper()
	var m map[string]any
	if err := yaml.Unmarshal([]byte(s), &m); err != nil {
		t.Fatal(err)
	}
	return m
}
