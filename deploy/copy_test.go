package deploy

import (
	"slices"
	"strconv"
	"strings"
	"testing"

	"helm.sh/helm/v3/pkg/chartutil"
	"helm.sh/helm/v3/pkg/engine"
	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	rbacv1 "k8s.io/api/rbac/v1"
)

// copyTokenDir is where the driver finds its projected copy token.
const copyTokenDir = "/var/run/secrets/dmthin.io/copy"

// copyWant is what a node pod with copies enabled should have.
type copyWant struct {
	port              int32
	audience          string
	expirationSeconds int64
	rate              string
}

// checkCopy checks a node pod serves and makes copies as w says: the
// driver's flags, its copy port, its POD_IP, and a token for the copy
// audience from the pod's own ServiceAccount, mounted by the driver alone.
func checkCopy(t *testing.T, pod corev1.PodSpec, w copyWant) {
	t.Helper()
	drv := container(t, pod, "csi-dmthin")
	port := strconv.Itoa(int(w.port))
	wantArgs(t, drv,
		"--copy-listen=:"+port,
		"--copy-advertise=$(POD_IP):"+port,
		"--copy-audience="+w.audience,
		"--copy-token-file="+copyTokenDir+"/token",
		// The only caller accepted is the driver on another node: the
		// node pods' own ServiceAccount, the one this pod runs as.
		"--copy-allowed-user=system:serviceaccount:"+releaseNS+":"+pod.ServiceAccountName,
		"--copy-rate="+w.rate,
	)
	if pod.ServiceAccountName == "" {
		t.Error("the node pod names no ServiceAccount: its copy token would be the namespace's default one's")
	}
	if !slices.ContainsFunc(drv.Ports, func(p corev1.ContainerPort) bool {
		return p.Name == "copy" && p.ContainerPort == w.port && p.Protocol == corev1.ProtocolTCP
	}) {
		t.Errorf("driver ports %+v: no TCP port copy %d", drv.Ports, w.port)
	}
	if !hasEnvFromField(drv, "POD_IP", "status.podIP") {
		t.Error("driver has no POD_IP from status.podIP, which --copy-advertise names")
	}
	if pod.HostNetwork {
		t.Error("hostNetwork: the copy port would be the node's")
	}
	if m := mount(drv, "copy-token"); m == nil || m.MountPath != copyTokenDir || !m.ReadOnly {
		t.Errorf("driver mount of copy-token %+v, want %s read-only", m, copyTokenDir)
	}
	for _, c := range pod.Containers[1:] {
		if mount(c, "copy-token") != nil {
			t.Errorf("sidecar %s mounts the copy token", c.Name)
		}
	}
	var vol *corev1.Volume
	for i := range pod.Volumes {
		if pod.Volumes[i].Name == "copy-token" {
			vol = &pod.Volumes[i]
		}
	}
	if vol == nil || vol.Projected == nil || len(vol.Projected.Sources) != 1 || vol.Projected.Sources[0].ServiceAccountToken == nil {
		t.Fatalf("copy-token volume %+v, want one projected service-account token", vol)
	}
	tok := vol.Projected.Sources[0].ServiceAccountToken
	if tok.Audience != w.audience || tok.Path != "token" || tok.ExpirationSeconds == nil || *tok.ExpirationSeconds != w.expirationSeconds {
		t.Errorf("projected copy token %+v, want audience %q, path token, %ds", tok, w.audience, w.expirationSeconds)
	}
}

// Copies off: none of their flags, port, environment or token.
func TestCopyDisabled(t *testing.T) {
	vals := mustYAML(t, loopPool)
	vals["copy"] = map[string]any{"enabled": false}
	ds := ofKind[*appsv1.DaemonSet](objects(t, render(t, vals, capabilities(t))))[0]
	pod := ds.Spec.Template.Spec
	drv := container(t, pod, "csi-dmthin")
	for _, a := range drv.Args {
		if strings.HasPrefix(a, "--copy-") {
			t.Errorf("copies disabled, yet %s", a)
		}
	}
	if len(drv.Ports) != 1 || drv.Ports[0].Name != "metrics" {
		t.Errorf("copies disabled, yet ports %+v", drv.Ports)
	}
	if slices.ContainsFunc(drv.Env, func(e corev1.EnvVar) bool { return e.Name == "POD_IP" }) {
		t.Error("copies disabled, yet POD_IP")
	}
	for _, v := range pod.Volumes {
		if v.Projected != nil || v.Name == "copy-token" {
			t.Errorf("copies disabled, yet volume %+v", v)
		}
	}
}

// The accepted user follows the ServiceAccount's name, whatever names the
// release.
func TestCopyAllowedUserFollowsServiceAccount(t *testing.T) {
	vals := mustYAML(t, loopPool)
	vals["fullnameOverride"] = "storage"
	docs := objects(t, render(t, vals, capabilities(t)))
	pod := ofKind[*appsv1.DaemonSet](docs)[0].Spec.Template.Spec
	if pod.ServiceAccountName != "storage" {
		t.Fatalf("serviceAccountName %q", pod.ServiceAccountName)
	}
	checkCopy(t, pod, copyWant{port: 9811, audience: "dmthin.csi.dmthin.io/copy", expirationSeconds: 3600, rate: "0"})
	var sas []string
	for _, sa := range ofKind[*corev1.ServiceAccount](docs) {
		sas = append(sas, sa.Name)
	}
	if !slices.Contains(sas, pod.ServiceAccountName) {
		t.Errorf("the node pods' ServiceAccount %s is not the chart's (%q)", pod.ServiceAccountName, sas)
	}
}

// The copy port may not be the metrics port: the pod could not start.
func TestCopyPortClash(t *testing.T) {
	ch := loadChart(t)
	vals := mustYAML(t, loopPool)
	vals["copy"] = map[string]any{"port": 9808}
	rv, err := chartutil.ToRenderValues(ch, vals, chartutil.ReleaseOptions{Name: releaseName, Namespace: releaseNS, IsInstall: true}, capabilities(t))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := engine.Render(ch, rv); err == nil || !strings.Contains(err.Error(), "copy.port and metrics.port must differ") {
		t.Errorf("copy.port = metrics.port: %v", err)
	}
	// Off, the copy port is not used and may be anything.
	vals["copy"] = map[string]any{"port": 9808, "enabled": false}
	render(t, vals, capabilities(t))
}

// The driver's grants for copies, exactly: nothing else widened.
func TestCopyRBAC(t *testing.T) {
	docs := objects(t, render(t, nil, capabilities(t, snapshotAPI)))
	got := map[string][]string{}
	for _, r := range ofKind[*rbacv1.ClusterRole](docs) {
		if r.Name != "csi-dmthin-driver" {
			for _, rule := range r.Rules {
				if slices.Contains(rule.Resources, "tokenreviews") {
					t.Errorf("ClusterRole %s may review tokens; only the driver serves copies", r.Name)
				}
			}
			continue
		}
		for _, rule := range r.Rules {
			for _, g := range rule.APIGroups {
				for _, res := range rule.Resources {
					got[g+"/"+res] = append(got[g+"/"+res], rule.Verbs...)
				}
			}
		}
	}
	want := map[string][]string{
		"/persistentvolumeclaims":            {"get"},
		"/nodes":                             {"get"},
		"storage.k8s.io/storageclasses":      {"get"},
		"/events":                            {"create", "patch"},
		"events.k8s.io/events":               {"create", "patch"},
		"dmthin.io/thinpools":                {"get", "list", "create", "delete"},
		"dmthin.io/thinpools/status":         {"patch"},
		"authentication.k8s.io/tokenreviews": {"create"},
	}
	for k, v := range want {
		g := slices.Sorted(slices.Values(got[k]))
		if w := slices.Sorted(slices.Values(v)); !slices.Equal(g, w) {
			t.Errorf("driver ClusterRole %s: verbs %q, want %q", k, g, w)
		}
	}
	for k := range got {
		if _, ok := want[k]; !ok {
			t.Errorf("driver ClusterRole grants %s %q, which nothing asked for", k, got[k])
		}
	}
}
