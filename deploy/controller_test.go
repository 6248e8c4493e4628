package deploy

import (
	"slices"
	"strings"
	"testing"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
)

// controllerImage is the driver image of the default render.
func controllerImage(t *testing.T) string {
	return "localhost/csi-dmthin:" + loadChart(t).Metadata.AppVersion
}

// checkDefaultController checks the controller Deployment of the default
// values: leader-elected replicas of the driver image, on no host path, with
// no privilege, spread over nodes, probed on its --http-endpoint.
func checkDefaultController(t *testing.T, deps []*appsv1.Deployment) {
	t.Helper()
	if len(deps) != 1 {
		t.Fatalf("%d Deployments, want the controller's", len(deps))
	}
	d := deps[0]
	if d.Spec.Replicas == nil || *d.Spec.Replicas != 2 {
		t.Errorf("controller replicas %v, want 2", d.Spec.Replicas)
	}
	for k, v := range d.Spec.Selector.MatchLabels {
		if d.Spec.Template.Labels[k] != v {
			t.Errorf("controller selector %s=%s does not match its pod labels", k, v)
		}
	}
	// The node DaemonSets' selectors must not take the controller's pods,
	// nor the controller's theirs.
	if d.Spec.Selector.MatchLabels["app.kubernetes.io/component"] != "controller" {
		t.Errorf("controller selector %v does not name its component", d.Spec.Selector.MatchLabels)
	}
	if _, ok := d.Spec.Template.Labels["dmthin.io/node-pool"]; ok {
		t.Error("controller pods carry the node DaemonSets' selector label")
	}
	pod := d.Spec.Template.Spec
	if pod.ServiceAccountName != "csi-dmthin-controller" {
		t.Errorf("controller serviceAccountName %q", pod.ServiceAccountName)
	}
	if pod.PriorityClassName != "system-cluster-critical" {
		t.Errorf("controller priorityClassName %q", pod.PriorityClassName)
	}
	if pod.HostNetwork || pod.HostPID || pod.HostIPC || len(pod.Volumes) != 0 {
		t.Errorf("controller pod has host access or volumes: %+v", pod)
	}
	if sc := pod.SecurityContext; sc == nil || sc.RunAsNonRoot == nil || !*sc.RunAsNonRoot || sc.RunAsUser == nil || *sc.RunAsUser == 0 ||
		sc.SeccompProfile == nil || sc.SeccompProfile.Type != corev1.SeccompProfileTypeRuntimeDefault {
		t.Errorf("controller pod security context %+v, want non-root with the runtime's seccomp profile", sc)
	}
	if len(pod.Containers) != 1 {
		t.Fatalf("controller containers %d, want 1", len(pod.Containers))
	}
	c := pod.Containers[0]
	if c.Image != controllerImage(t) {
		t.Errorf("controller image %q, want the driver's %q", c.Image, controllerImage(t))
	}
	wantArgs := []string{
		"controller",
		"--driver-name=dmthin.csi.dmthin.io",
		"--workers=4",
		"--http-endpoint=:9811",
		"--copy-across-nodes=true",
		"--leader-election=true",
		"--leader-election-namespace=$(NAMESPACE)",
		"-v=2",
	}
	if !slices.Equal(c.Args, wantArgs) {
		t.Errorf("controller args\n got %q\nwant %q", c.Args, wantArgs)
	}
	for env, field := range map[string]string{"NAMESPACE": "metadata.namespace", "POD_NAME": "metadata.name"} {
		if !hasEnvFromField(c, env, field) {
			t.Errorf("controller: no %s from %s (the Lease's namespace and holder)", env, field)
		}
	}
	sc := c.SecurityContext
	if sc == nil || sc.Privileged != nil && *sc.Privileged || sc.AllowPrivilegeEscalation == nil || *sc.AllowPrivilegeEscalation ||
		sc.ReadOnlyRootFilesystem == nil || !*sc.ReadOnlyRootFilesystem || sc.Capabilities == nil || !slices.Equal(sc.Capabilities.Drop, []corev1.Capability{"ALL"}) {
		t.Errorf("controller container security context %+v", sc)
	}
	lp := c.LivenessProbe
	if lp == nil || lp.HTTPGet == nil || lp.HTTPGet.Path != "/healthz" || lp.HTTPGet.Port.String() != "healthz" {
		t.Errorf("controller liveness probe %+v", lp)
	}
	if len(c.Ports) != 1 || c.Ports[0].Name != "healthz" || c.Ports[0].ContainerPort != 9811 {
		t.Errorf("controller ports %+v", c.Ports)
	}
	if cpu, mem := c.Resources.Requests[corev1.ResourceCPU], c.Resources.Requests[corev1.ResourceMemory]; cpu.String() != "10m" || mem.IsZero() {
		t.Errorf("controller requests %v", c.Resources.Requests)
	}
	if pod.NodeSelector["kubernetes.io/os"] != "linux" {
		t.Errorf("controller nodeSelector %v", pod.NodeSelector)
	}
	checkSpread(t, d)
}

// checkSpread: the replicas prefer different nodes, by a term that selects
// the controller's own pods.
func checkSpread(t *testing.T, d *appsv1.Deployment) {
	t.Helper()
	a := d.Spec.Template.Spec.Affinity
	if a == nil || a.PodAntiAffinity == nil || len(a.PodAntiAffinity.PreferredDuringSchedulingIgnoredDuringExecution) != 1 {
		t.Fatalf("controller affinity %+v: want one preferred pod anti-affinity", a)
	}
	term := a.PodAntiAffinity.PreferredDuringSchedulingIgnoredDuringExecution[0].PodAffinityTerm
	if term.TopologyKey != "kubernetes.io/hostname" || term.LabelSelector == nil || len(term.LabelSelector.MatchLabels) == 0 {
		t.Fatalf("controller anti-affinity term %+v", term)
	}
	if !mapsEqual(term.LabelSelector.MatchLabels, d.Spec.Selector.MatchLabels) {
		t.Errorf("controller anti-affinity selects %v, want its own pods %v", term.LabelSelector.MatchLabels, d.Spec.Selector.MatchLabels)
	}
}

// TestControllerFullValues: every controller value reaches the Deployment.
func TestControllerFullValues(t *testing.T) {
	docs := objects(t, render(t, fullValuesMap(t), capabilities(t, snapshotAPI, monitoringAPI)))
	deps := ofKind[*appsv1.Deployment](docs)
	if len(deps) != 1 {
		t.Fatalf("%d Deployments", len(deps))
	}
	d := deps[0]
	pod := d.Spec.Template.Spec
	if *d.Spec.Replicas != 3 || pod.PriorityClassName != "storage-control" ||
		!mapsEqual(pod.NodeSelector, map[string]string{"kubernetes.io/os": "linux", "node-role.example.org/infra": "true"}) ||
		len(pod.Tolerations) != 1 || pod.Tolerations[0].Key != "infra" {
		t.Errorf("controller scheduling values not applied: replicas %d, %+v", *d.Spec.Replicas, pod)
	}
	// The given nodeAffinity joins the default spread.
	if pod.Affinity == nil || pod.Affinity.NodeAffinity == nil {
		t.Errorf("controller affinity %+v lacks the given nodeAffinity", pod.Affinity)
	}
	checkSpread(t, d)
	if len(pod.ImagePullSecrets) != 1 || pod.ImagePullSecrets[0].Name != "regcred" {
		t.Errorf("controller imagePullSecrets %v", pod.ImagePullSecrets)
	}
	c := pod.Containers[0]
	if c.Image != "images.example.invalid:5000/mirror/storage/csi-dmthin:v9.9.9" || c.ImagePullPolicy != corev1.PullAlways {
		t.Errorf("controller image %q %s", c.Image, c.ImagePullPolicy)
	}
	wantArgs(t, c, "--driver-name=thin.example.org", "--workers=8", "-v=5", "--leader-election-lease-duration=30s")
	if mem := c.Resources.Limits[corev1.ResourceMemory]; mem.String() != "512Mi" {
		t.Errorf("controller limits %v", c.Resources.Limits)
	}
}

// TestControllerValues: a podAntiAffinity given replaces the default one;
// enabled false leaves out the controller and its grants, and NOTES.txt
// says what that loses.
func TestControllerValues(t *testing.T) {
	vals := mustYAML(t, `controller:
  affinity:
    podAntiAffinity:
      requiredDuringSchedulingIgnoredDuringExecution:
        - topologyKey: topology.kubernetes.io/zone
          labelSelector: {matchLabels: {app.kubernetes.io/component: controller}}
`)
	d := ofKind[*appsv1.Deployment](objects(t, render(t, vals, capabilities(t))))[0]
	aa := d.Spec.Template.Spec.Affinity.PodAntiAffinity
	if len(aa.RequiredDuringSchedulingIgnoredDuringExecution) != 1 || len(aa.PreferredDuringSchedulingIgnoredDuringExecution) != 0 {
		t.Errorf("a given podAntiAffinity is not used as given: %+v", aa)
	}

	files := render(t, mustYAML(t, `controller: {enabled: false}`), capabilities(t))
	for _, o := range objects(t, files) {
		if strings.HasSuffix(o.name, "-controller") {
			t.Errorf("controller.enabled false, yet %s %s", o.kind, o.name)
		}
	}
	if notes := files["csi-dmthin/templates/NOTES.txt"]; !strings.Contains(notes, "controller is OFF") {
		t.Errorf("NOTES.txt does not say the controller is off:\n%s", notes)
	}
}
