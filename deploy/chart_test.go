package deploy

import (
	"bytes"
	"encoding/json"
	"flag"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	groupv1 "github.com/kubernetes-csi/external-snapshotter/client/v8/apis/volumegroupsnapshot/v1"
	snapshotv1 "github.com/kubernetes-csi/external-snapshotter/client/v8/apis/volumesnapshot/v1"
	"helm.sh/helm/v3/pkg/chartutil"
	"helm.sh/helm/v3/pkg/lint"
	"helm.sh/helm/v3/pkg/lint/support"
	"helm.sh/helm/v3/pkg/releaseutil"
	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	storagev1 "k8s.io/api/storage/v1"
	apiextensionsv1 "k8s.io/apiextensions-apiserver/pkg/apis/apiextensions/v1"
	"sigs.k8s.io/yaml"
)

var update = flag.Bool("update", false, "rewrite deploy/kubernetes from the chart's default render")

// fullValues sets every value the chart has, to something other than its
// default, with two nodePools and two storage classes.
const fullValues = `
driverName: thin.example.org
kubeletDir: /var/lib/k0s/kubelet/
global:
  imageRegistry: images.example.invalid:5000/mirror
image:
  registry: unused.example.invalid
  repository: storage/csi-dmthin
  tag: v9.9.9
  pullPolicy: Always
imagePullSecrets:
  - name: regcred
customLabels:
  team: storage
sidecars:
  provisioner:
    image: {registry: unused.example.invalid, repository: csi/provisioner, tag: p1, pullPolicy: Never}
    logLevel: 5
    nodeDeploymentBaseDelay: 2s
    additionalArgs: [--worker-threads=3]
    resources: {requests: {cpu: 10m, memory: 20Mi}}
  snapshotter:
    image: {registry: unused.example.invalid, repository: csi/snapshotter, tag: s1, pullPolicy: Never}
    logLevel: 4
    additionalArgs: [--worker-threads=2]
    resources: {limits: {memory: 64Mi}}
  resizer:
    image: {registry: unused.example.invalid, repository: csi/resizer, tag: r1, pullPolicy: Never}
    logLevel: 3
    additionalArgs: [--workers=2]
    resources: {requests: {cpu: 5m}}
node:
  logLevel: 6
  poolFullPercent: 75
  nodeSelector: {kubernetes.io/os: linux, storage: "yes"}
  tolerations:
    - {key: storage, operator: Exists, effect: NoSchedule}
  affinity:
    nodeAffinity:
      requiredDuringSchedulingIgnoredDuringExecution:
        nodeSelectorTerms:
          - matchExpressions: [{key: kubernetes.io/arch, operator: In, values: [amd64]}]
  resources: {requests: {cpu: 50m, memory: 64Mi}, limits: {memory: 256Mi}}
  priorityClassName: storage-critical
  podAnnotations: {example.org/scrape: "true"}
  extraArgs: [--thinpool-min-interval=5m]
  extraEnv: [{name: GODEBUG, value: madvdontneed=1}]
  extraVolumes: [{name: pool-disk, hostPath: {path: /mnt/pools, type: Directory}}]
  extraVolumeMounts: [{name: pool-disk, mountPath: /mnt/pools}]
controller:
  enabled: true
  replicas: 3
  logLevel: 5
  workers: 8
  resources: {requests: {cpu: 20m, memory: 96Mi}, limits: {memory: 512Mi}}
  priorityClassName: storage-control
  nodeSelector: {kubernetes.io/os: linux, node-role.example.org/infra: "true"}
  tolerations:
    - {key: infra, operator: Exists, effect: NoSchedule}
  affinity:
    nodeAffinity:
      preferredDuringSchedulingIgnoredDuringExecution:
        - weight: 10
          preference:
            matchExpressions: [{key: kubernetes.io/arch, operator: In, values: [amd64]}]
  additionalArgs: [--leader-election-lease-duration=30s]
thinPools:
  installCRD: false
copy:
  enabled: true
  port: 9911
  # Above 2^20: helm's values are float64, printed 2.097152e+08 unless
  # the template makes an integer of it.
  rateBytesPerSec: 209715200
  audience: copy.thin.example.org
  tokenExpirationSeconds: 7200
metrics:
  enabled: true
  port: 9900
  serviceMonitor:
    enabled: true
    interval: 15s
    labels: {release: prometheus}
  podMonitor:
    enabled: true
    interval: 20s
    labels: {release: prometheus}
  prometheusRule:
    enabled: true
    labels: {release: prometheus}
    dataWarningPercent: 75
    dataCriticalPercent: 85
    metadataWarningPercent: 60
    metadataCriticalPercent: 70
    for: 2m
  dashboard:
    enabled: true
    labels: {grafana_dashboard: "1", example.org/team: storage}
    namespace: monitoring
test:
  enabled: true
  image: {registry: unused.example.invalid, repository: tools/selftest, tag: t1, pullPolicy: Always}
  size: 128Mi
nodePools:
  - name: nvme
    nodeSelector: {storage: nvme}
    defaultPool: fast
    pools:
      - name: fast
        dataDevice: /dev/nvme1n1
        metadataDevice: /dev/nvme2n1
        blockSize: 128Ki
        lowWaterMark: 1Gi
        skipBlockZeroing: false
        queueIfNoSpace: false
        minFreeDataPercent: 5
        minFreeMetadataPercent: 15
        overprovisionRatio: 4
      - name: scratch
        dataFile: /var/lib/csi-dmthin/scratch.data
        metadataFile: /var/lib/csi-dmthin/scratch.meta
        dataFileSize: 50Gi
        metadataFileSize: 1Gi
  - name: hdd
    nodeSelector: {storage: hdd}
    pools:
      - name: bulk
        dataDevice: /dev/sdb
        metadataDevice: /dev/sdc
classes: []
`

// fullValuesMap is fullValues without the placeholder key (kept so the
// schema test can show an unknown key fails).
func fullValuesMap(t *testing.T) map[string]any {
	t.Helper()
	m := mustYAML(t, fullValues)
	delete(m, "classes")
	m["storageClasses"] = mustYAML(t, `l:
  - name: fast-xfs
    isDefaultClass: true
    fsType: xfs
    pool: fast
    reclaimPolicy: Retain
    mountOptions: [noatime]
    parameters: {example.org/tier: gold}
    annotations: {example.org/owner: storage}
  - name: scratch
    fsType: ext4
    pool: scratch
`)["l"]
	m["volumeSnapshotClasses"] = mustYAML(t, `l:
  - name: thin-snap
    isDefaultClass: true
    deletionPolicy: Retain
    parameters: {example.org/k: v}
    annotations: {example.org/owner: storage}
  - name: thin-snap-delete
`)["l"]
	return m
}

func container(t *testing.T, pod corev1.PodSpec, name string) corev1.Container {
	t.Helper()
	for _, c := range pod.Containers {
		if c.Name == name {
			return c
		}
	}
	t.Fatalf("no container %q", name)
	return corev1.Container{}
}

func hasEnvFromField(c corev1.Container, name, field string) bool {
	for _, e := range c.Env {
		if e.Name == name && e.ValueFrom != nil && e.ValueFrom.FieldRef != nil && e.ValueFrom.FieldRef.FieldPath == field {
			return true
		}
	}
	return false
}

func wantArgs(t *testing.T, c corev1.Container, want ...string) {
	t.Helper()
	for _, a := range want {
		if !slices.Contains(c.Args, a) {
			t.Errorf("container %s: no argument %q in %q", c.Name, a, c.Args)
		}
	}
}

func mount(c corev1.Container, name string) *corev1.VolumeMount {
	for i := range c.VolumeMounts {
		if c.VolumeMounts[i].Name == name {
			return &c.VolumeMounts[i]
		}
	}
	return nil
}

func hostPath(pod corev1.PodSpec, name string) string {
	for _, v := range pod.Volumes {
		if v.Name == name && v.HostPath != nil {
			return v.HostPath.Path
		}
	}
	return ""
}

// loopPool is one nodePools entry with a loop-file pool, the least a node
// needs to run the driver.
const loopPool = `nodePools: [{name: default, defaultPool: default, pools: [{name: default, dataFile: /var/lib/csi-dmthin/default.data, dataFileSize: 20Gi}]}]`

// TestDefaultRender checks the objects `helm install` creates with the
// default values on a cluster without the snapshot CRDs: the cluster-wide
// ones, and no node pod until a pool is named; and then the node pods with
// a pool named and every other value at its default.
func TestDefaultRender(t *testing.T) {
	files := render(t, nil, capabilities(t))
	docs := objects(t, files)

	var got []string
	for _, d := range docs {
		got = append(got, d.kind+"/"+d.name)
	}
	want := []string{
		"CSIDriver/dmthin.csi.dmthin.io",
		"CustomResourceDefinition/thinpools.dmthin.io",
		"ClusterRole/csi-dmthin-driver", "ClusterRoleBinding/csi-dmthin-driver",
		"Role/csi-dmthin-driver", "RoleBinding/csi-dmthin-driver",
		"ClusterRole/csi-dmthin-provisioner", "ClusterRoleBinding/csi-dmthin-provisioner",
		"Role/csi-dmthin-provisioner", "RoleBinding/csi-dmthin-provisioner",
		"ClusterRole/csi-dmthin-resizer", "ClusterRoleBinding/csi-dmthin-resizer",
		"Role/csi-dmthin-resizer", "RoleBinding/csi-dmthin-resizer",
		"ClusterRole/csi-dmthin-snapshotter", "ClusterRoleBinding/csi-dmthin-snapshotter",
		"ServiceAccount/csi-dmthin",
		"StorageClass/csi-dmthin",
		// The controller is cluster-wide: there with no pool named too.
		"Deployment/csi-dmthin-controller", "ServiceAccount/csi-dmthin-controller",
		"ClusterRole/csi-dmthin-controller", "ClusterRoleBinding/csi-dmthin-controller",
		"Role/csi-dmthin-controller", "RoleBinding/csi-dmthin-controller",
	}
	slices.Sort(got)
	slices.Sort(want)
	if !slices.Equal(got, want) {
		t.Errorf("objects:\n got %q\nwant %q\n(no pool, so no DaemonSet, unless one is named; no VolumeSnapshotClass without the snapshot API, no metrics Service by default)", got, want)
	}
	checkDefaultController(t, ofKind[*appsv1.Deployment](docs))
	if notes := files["csi-dmthin/templates/NOTES.txt"]; !strings.Contains(notes, "NO POOLS ARE CONFIGURED") || !strings.Contains(notes, "nodePools:") {
		t.Errorf("NOTES.txt without pools does not say what to configure:\n%s", notes)
	}

	d := ofKind[*storagev1.CSIDriver](docs)[0]
	if d.Spec.AttachRequired == nil || *d.Spec.AttachRequired ||
		d.Spec.StorageCapacity == nil || !*d.Spec.StorageCapacity ||
		d.Spec.PodInfoOnMount == nil || !*d.Spec.PodInfoOnMount ||
		d.Spec.FSGroupPolicy == nil || *d.Spec.FSGroupPolicy != storagev1.FileFSGroupPolicy ||
		d.Spec.SELinuxMount == nil || !*d.Spec.SELinuxMount ||
		!slices.Equal(d.Spec.VolumeLifecycleModes, []storagev1.VolumeLifecycleMode{storagev1.VolumeLifecyclePersistent}) {
		t.Errorf("CSIDriver spec: %+v", d.Spec)
	}

	sc := ofKind[*storagev1.StorageClass](docs)[0]
	if sc.Provisioner != "dmthin.csi.dmthin.io" ||
		sc.VolumeBindingMode == nil || *sc.VolumeBindingMode != storagev1.VolumeBindingWaitForFirstConsumer ||
		sc.AllowVolumeExpansion == nil || !*sc.AllowVolumeExpansion ||
		sc.ReclaimPolicy == nil || *sc.ReclaimPolicy != corev1.PersistentVolumeReclaimDelete {
		t.Errorf("StorageClass %+v", sc)
	}
	if want := map[string]string{"csi.storage.k8s.io/fstype": "ext4"}; !mapsEqual(sc.Parameters, want) {
		t.Errorf("StorageClass parameters %v, want %v", sc.Parameters, want)
	}
	if len(sc.Annotations) != 0 {
		t.Errorf("StorageClass annotations %v: it is not the default class by default", sc.Annotations)
	}

	// The node pods, once a pool is named.
	docs = objects(t, render(t, mustYAML(t, loopPool), capabilities(t)))
	ds := ofKind[*appsv1.DaemonSet](docs)[0]
	pod := ds.Spec.Template.Spec
	var names []string
	for _, c := range pod.Containers {
		names = append(names, c.Name)
	}
	// No node-driver-registrar and no livenessprobe: the driver registers
	// with kubelet and serves /livez itself.
	if want := []string{"csi-dmthin", "csi-provisioner", "csi-snapshotter", "csi-resizer"}; !slices.Equal(names, want) {
		t.Errorf("containers %q, want %q", names, want)
	}
	if pod.HostNetwork {
		t.Error("hostNetwork is set; the driver does not need it")
	}
	if pod.PriorityClassName != "system-node-critical" {
		t.Errorf("priorityClassName %q", pod.PriorityClassName)
	}
	if pod.ServiceAccountName != "csi-dmthin" {
		t.Errorf("serviceAccountName %q", pod.ServiceAccountName)
	}
	if pod.NodeSelector["kubernetes.io/os"] != "linux" {
		t.Errorf("nodeSelector %v", pod.NodeSelector)
	}

	drv := container(t, pod, "csi-dmthin")
	wantDriverArgs := []string{
		"serve",
		"--driver-name=dmthin.csi.dmthin.io",
		"--endpoint=unix:///csi/csi.sock",
		"--node-id=$(NODE_NAME)",
		"--config=/etc/csi-dmthin/pools.yaml",
		"--kubelet-dir=/var/lib/kubelet",
		"--state-dir=/var/lib/csi-dmthin",
		"--metrics-address=:9808",
		"--registration-dir=/var/lib/kubelet/plugins_registry",
		"--kubelet-endpoint=/var/lib/kubelet/plugins/dmthin.csi.dmthin.io/csi.sock",
		"--kube-api=true",
		"--pool-full-percent=90",
		"--shutdown-timeout=20s",
		"--copy-listen=:9811",
		"--copy-advertise=$(POD_IP):9811",
		"--copy-audience=dmthin.csi.dmthin.io/copy",
		"--copy-token-file=/var/run/secrets/dmthin.io/copy/token",
		"--copy-allowed-user=system:serviceaccount:kube-system:csi-dmthin",
		"--copy-rate=0",
		"-v=2",
	}
	if !slices.Equal(drv.Args, wantDriverArgs) {
		t.Errorf("driver args\n got %q\nwant %q", drv.Args, wantDriverArgs)
	}
	if drv.SecurityContext == nil || drv.SecurityContext.Privileged == nil || !*drv.SecurityContext.Privileged {
		t.Error("driver is not privileged")
	}
	if !hasEnvFromField(drv, "NODE_NAME", "spec.nodeName") {
		t.Error("driver has no NODE_NAME from spec.nodeName")
	}
	lp := drv.LivenessProbe
	if lp == nil || lp.HTTPGet == nil || lp.HTTPGet.Path != "/livez" || lp.HTTPGet.Port.String() != "metrics" {
		t.Errorf("driver liveness probe %+v", lp)
	}
	if len(drv.Ports) != 2 || drv.Ports[0].Name != "metrics" || drv.Ports[0].ContainerPort != 9808 ||
		drv.Ports[1].Name != "copy" || drv.Ports[1].ContainerPort != 9811 || drv.Ports[1].Protocol != corev1.ProtocolTCP {
		t.Errorf("driver ports %+v, want metrics 9808 and copy 9811", drv.Ports)
	}
	checkCopy(t, pod, copyWant{port: 9811, audience: "dmthin.csi.dmthin.io/copy", expirationSeconds: 3600, rate: "0"})
	for _, m := range []struct {
		volume, path, hostPath string
		propagation            corev1.MountPropagationMode
		readOnly               bool
	}{
		{"socket-dir", "/csi", "/var/lib/kubelet/plugins/dmthin.csi.dmthin.io", "", false},
		{"mountpoint-dir", "/var/lib/kubelet/pods", "/var/lib/kubelet/pods", corev1.MountPropagationBidirectional, false},
		{"plugins-dir", "/var/lib/kubelet/plugins", "/var/lib/kubelet/plugins", corev1.MountPropagationBidirectional, false},
		{"registration-dir", "/var/lib/kubelet/plugins_registry", "/var/lib/kubelet/plugins_registry", "", false},
		{"dev", "/dev", "/dev", "", false},
		{"lib-modules", "/lib/modules", "/lib/modules", "", true},
		{"state-dir", "/var/lib/csi-dmthin", "/var/lib/csi-dmthin", "", false},
	} {
		vm := mount(drv, m.volume)
		switch {
		case vm == nil:
			t.Errorf("driver does not mount %s", m.volume)
		case vm.MountPath != m.path || vm.ReadOnly != m.readOnly:
			t.Errorf("driver mount %s: %+v", m.volume, *vm)
		case m.propagation != "" && (vm.MountPropagation == nil || *vm.MountPropagation != m.propagation):
			t.Errorf("driver mount %s: propagation %v, want %s", m.volume, vm.MountPropagation, m.propagation)
		case m.propagation == "" && vm.MountPropagation != nil:
			t.Errorf("driver mount %s: propagation %s, want none", m.volume, *vm.MountPropagation)
		}
		if hp := hostPath(pod, m.volume); hp != m.hostPath {
			t.Errorf("volume %s: hostPath %q, want %q", m.volume, hp, m.hostPath)
		}
	}

	prov := container(t, pod, "csi-provisioner")
	wantArgs(t, prov, "--csi-address=/csi/csi.sock", "--node-deployment", "--strict-topology",
		"--immediate-topology=false", "--enable-capacity", "--capacity-ownerref-level=1",
		"--extra-create-metadata", "--feature-gates=Topology=true", "--node-deployment-base-delay=20s", "-v=2")
	if slices.ContainsFunc(prov.Args, func(a string) bool { return strings.HasPrefix(a, "--leader-election") }) {
		t.Error("the node-deployment provisioner must not run leader election")
	}
	for env, field := range map[string]string{"NODE_NAME": "spec.nodeName", "NAMESPACE": "metadata.namespace", "POD_NAME": "metadata.name"} {
		if !hasEnvFromField(prov, env, field) {
			t.Errorf("provisioner: no %s from %s (node deployment and capacity need it)", env, field)
		}
	}
	snap := container(t, pod, "csi-snapshotter")
	wantArgs(t, snap, "--csi-address=/csi/csi.sock", "--node-deployment")
	if !hasEnvFromField(snap, "NODE_NAME", "spec.nodeName") {
		t.Error("snapshotter: no NODE_NAME")
	}
	if slices.ContainsFunc(snap.Args, func(a string) bool { return strings.HasPrefix(a, "--leader-election") }) {
		t.Error("the snapshotter's --node-deployment and --leader-election are a fatal combination")
	}
	rs := container(t, pod, "csi-resizer")
	wantArgs(t, rs, "--csi-address=/csi/csi.sock", "--leader-election", "--leader-election-namespace=$(NAMESPACE)")
	if !hasEnvFromField(rs, "NAMESPACE", "metadata.namespace") {
		t.Error("resizer: no NAMESPACE for its lease")
	}
	for _, c := range pod.Containers[1:] {
		if mount(c, "socket-dir") == nil {
			t.Errorf("%s does not mount the CSI socket", c.Name)
		}
		sc := c.SecurityContext
		if sc == nil || sc.Privileged != nil && *sc.Privileged || sc.AllowPrivilegeEscalation == nil || *sc.AllowPrivilegeEscalation {
			t.Errorf("%s: sidecars run unprivileged without privilege escalation: %+v", c.Name, sc)
		}
	}
	// The sidecars come from the Kubernetes project's registry, at the
	// pinned versions; every container asks for resources (no pod is
	// BestEffort, which is evicted first).
	for _, c := range []struct{ name, image, cpu string }{
		{"csi-dmthin", "localhost/csi-dmthin:" + loadChart(t).Metadata.AppVersion, "20m"},
		{"csi-provisioner", "registry.k8s.io/sig-storage/csi-provisioner:v6.4.0", "10m"},
		{"csi-snapshotter", "registry.k8s.io/sig-storage/csi-snapshotter:v8.7.0", "10m"},
		{"csi-resizer", "registry.k8s.io/sig-storage/csi-resizer:v2.3.0", "10m"},
	} {
		ctr := container(t, pod, c.name)
		if ctr.Image != c.image {
			t.Errorf("%s image %q, want %q", c.name, ctr.Image, c.image)
		}
		if cpu, mem := ctr.Resources.Requests[corev1.ResourceCPU], ctr.Resources.Requests[corev1.ResourceMemory]; cpu.String() != c.cpu || mem.IsZero() {
			t.Errorf("%s requests %v, want cpu %s and some memory", c.name, ctr.Resources.Requests, c.cpu)
		}
	}
	if !hasEnvFromField(drv, "NAMESPACE", "metadata.namespace") {
		t.Error("driver has no NAMESPACE, where its node's CSIStorageCapacity objects are")
	}

	cm := ofKind[*corev1.ConfigMap](docs)[0]
	pc := decodePools(t, cm.Data["pools.yaml"])
	if pc.DefaultPool != "default" || len(pc.Pools) != 1 || pc.Pools[0]["dataFile"] != "/var/lib/csi-dmthin/default.data" {
		t.Errorf("default pools.yaml: %+v", pc)
	}
}

func mapsEqual(a, b map[string]string) bool {
	if len(a) != len(b) {
		return false
	}
	for k, v := range a {
		if w, ok := b[k]; !ok || w != v {
			return false
		}
	}
	return true
}

// TestFullValues sets every value and checks that each one reaches the
// objects it is meant for, and nowhere else.
func TestFullValues(t *testing.T) {
	files := render(t, fullValuesMap(t), capabilities(t, snapshotAPI, monitoringAPI))
	docs := objects(t, files)

	for _, d := range docs {
		// kubeletDir reaches every path and flag: nothing may still name
		// the default.
		if strings.Contains(d.yaml, "/var/lib/kubelet/") || strings.Contains(d.yaml, "k0s/kubelet//") {
			t.Errorf("%s %s names a kubelet path other than kubeletDir:\n%s", d.kind, d.name, d.yaml)
		}
		m := mustYAML(t, d.yaml)
		labels, _ := m["metadata"].(map[string]any)["labels"].(map[string]any)
		if labels["team"] != "storage" {
			t.Errorf("%s %s: customLabels missing: %v", d.kind, d.name, labels)
		}
	}

	dss := ofKind[*appsv1.DaemonSet](docs)
	if len(dss) != 2 {
		t.Fatalf("%d DaemonSets, want one per nodePools entry (2)", len(dss))
	}
	cms := map[string]*corev1.ConfigMap{}
	for _, cm := range ofKind[*corev1.ConfigMap](docs) {
		cms[cm.Name] = cm
	}
	const kd = "/var/lib/k0s/kubelet"
	for i, want := range []struct {
		name, storage, configMap, defaultPool string
		pools                                 []string
	}{
		{"csi-dmthin-node-nvme", "nvme", "csi-dmthin-pools-nvme", "fast", []string{"fast", "scratch"}},
		{"csi-dmthin-node-hdd", "hdd", "csi-dmthin-pools-hdd", "", []string{"bulk"}},
	} {
		ds := dss[i]
		pod := ds.Spec.Template.Spec
		if ds.Name != want.name {
			t.Errorf("DaemonSet %d: %s, want %s", i, ds.Name, want.name)
		}
		// The entry's nodeSelector wins over node.nodeSelector's same key.
		if wantSel := map[string]string{"kubernetes.io/os": "linux", "storage": want.storage}; !mapsEqual(pod.NodeSelector, wantSel) {
			t.Errorf("%s nodeSelector %v, want %v", ds.Name, pod.NodeSelector, wantSel)
		}
		sel := ds.Spec.Selector.MatchLabels
		for k, v := range sel {
			if ds.Spec.Template.Labels[k] != v {
				t.Errorf("%s: selector %s=%s does not match the pod labels", ds.Name, k, v)
			}
		}
		if sel["dmthin.io/node-pool"] != want.storage {
			t.Errorf("%s: selector %v does not tell the DaemonSets apart", ds.Name, sel)
		}
		var cmName string
		for _, v := range pod.Volumes {
			if v.ConfigMap != nil {
				cmName = v.ConfigMap.Name
			}
		}
		if cmName != want.configMap || cms[cmName] == nil {
			t.Errorf("%s mounts ConfigMap %q, want %q", ds.Name, cmName, want.configMap)
		} else {
			pc := decodePools(t, cms[cmName].Data["pools.yaml"])
			var got []string
			for _, p := range pc.Pools {
				got = append(got, p["name"].(string))
			}
			if pc.DefaultPool != want.defaultPool || !slices.Equal(got, want.pools) {
				t.Errorf("%s pools.yaml: default %q pools %q, want %q %q", cmName, pc.DefaultPool, got, want.defaultPool, want.pools)
			}
		}
		if pod.PriorityClassName != "storage-critical" || len(pod.Tolerations) != 1 || pod.Tolerations[0].Key != "storage" ||
			pod.Affinity == nil || pod.Affinity.NodeAffinity == nil {
			t.Errorf("%s: node scheduling values not applied: %+v", ds.Name, pod)
		}
		if ds.Spec.Template.Annotations["example.org/scrape"] != "true" || ds.Spec.Template.Annotations["checksum/pools"] == "" {
			t.Errorf("%s pod annotations %v", ds.Name, ds.Spec.Template.Annotations)
		}
		if len(pod.ImagePullSecrets) != 1 || pod.ImagePullSecrets[0].Name != "regcred" {
			t.Errorf("%s imagePullSecrets %v", ds.Name, pod.ImagePullSecrets)
		}
		// Every image comes from values, with global.imageRegistry over
		// each image's registry.
		for _, c := range []struct {
			name, image string
			policy      corev1.PullPolicy
			resource    string
		}{
			{"csi-dmthin", "images.example.invalid:5000/mirror/storage/csi-dmthin:v9.9.9", corev1.PullAlways, "256Mi"},
			{"csi-provisioner", "images.example.invalid:5000/mirror/csi/provisioner:p1", corev1.PullNever, "20Mi"},
			{"csi-snapshotter", "images.example.invalid:5000/mirror/csi/snapshotter:s1", corev1.PullNever, "64Mi"},
			{"csi-resizer", "images.example.invalid:5000/mirror/csi/resizer:r1", corev1.PullNever, "5m"},
		} {
			ctr := container(t, pod, c.name)
			if ctr.Image != c.image || ctr.ImagePullPolicy != c.policy {
				t.Errorf("%s/%s image %q %s, want %q %s", ds.Name, c.name, ctr.Image, ctr.ImagePullPolicy, c.image, c.policy)
			}
			if r, _ := yaml.Marshal(ctr.Resources); !strings.Contains(string(r), c.resource) {
				t.Errorf("%s/%s resources %v lack %s", ds.Name, c.name, ctr.Resources, c.resource)
			}
		}
		drv := container(t, pod, "csi-dmthin")
		wantArgs(t, drv, "--driver-name=thin.example.org", "--kubelet-dir="+kd, "--registration-dir="+kd+"/plugins_registry",
			"--kubelet-endpoint="+kd+"/plugins/thin.example.org/csi.sock",
			"--metrics-address=:9900", "--pool-full-percent=75", "-v=6")
		if drv.Ports[0].ContainerPort != 9900 {
			t.Errorf("driver port %d", drv.Ports[0].ContainerPort)
		}
		checkCopy(t, pod, copyWant{port: 9911, audience: "copy.thin.example.org", expirationSeconds: 7200, rate: "209715200"})
		for _, v := range []string{"socket-dir", "mountpoint-dir", "plugins-dir", "registration-dir"} {
			if hp := hostPath(pod, v); !strings.HasPrefix(hp, kd+"/") {
				t.Errorf("%s volume %s: hostPath %q is not under kubeletDir", ds.Name, v, hp)
			}
			if m := mount(drv, v); m != nil && v != "socket-dir" && !strings.HasPrefix(m.MountPath, kd+"/") {
				t.Errorf("%s driver mount %s at %q is not under kubeletDir", ds.Name, v, m.MountPath)
			}
		}
		wantArgs(t, container(t, pod, "csi-provisioner"), "-v=5", "--node-deployment-base-delay=2s", "--worker-threads=3")
		wantArgs(t, container(t, pod, "csi-snapshotter"), "-v=4", "--worker-threads=2")
		wantArgs(t, container(t, pod, "csi-resizer"), "-v=3", "--workers=2")
	}

	if d := ofKind[*storagev1.CSIDriver](docs); len(d) != 1 || d[0].Name != "thin.example.org" {
		t.Errorf("CSIDriver %v", d)
	}
	scs := ofKind[*storagev1.StorageClass](docs)
	if len(scs) != 2 {
		t.Fatalf("%d StorageClasses, want 2", len(scs))
	}
	fast, scratch := scs[0], scs[1]
	if fast.Name != "fast-xfs" || fast.Provisioner != "thin.example.org" ||
		fast.Annotations["storageclass.kubernetes.io/is-default-class"] != "true" ||
		fast.Annotations["example.org/owner"] != "storage" ||
		*fast.ReclaimPolicy != corev1.PersistentVolumeReclaimRetain ||
		!slices.Equal(fast.MountOptions, []string{"noatime"}) ||
		!mapsEqual(fast.Parameters, map[string]string{"csi.storage.k8s.io/fstype": "xfs", "pool": "fast", "example.org/tier": "gold"}) {
		t.Errorf("StorageClass fast-xfs: %+v", fast)
	}
	if scratch.Annotations["storageclass.kubernetes.io/is-default-class"] != "" ||
		!mapsEqual(scratch.Parameters, map[string]string{"csi.storage.k8s.io/fstype": "ext4", "pool": "scratch"}) {
		t.Errorf("StorageClass scratch: %+v", scratch)
	}
	for _, sc := range scs {
		if *sc.VolumeBindingMode != storagev1.VolumeBindingWaitForFirstConsumer || !*sc.AllowVolumeExpansion {
			t.Errorf("StorageClass %s: binding %s, expansion %v", sc.Name, *sc.VolumeBindingMode, *sc.AllowVolumeExpansion)
		}
	}

	vscs := ofKind[*snapshotv1.VolumeSnapshotClass](docs)
	if len(vscs) != 2 {
		t.Fatalf("%d VolumeSnapshotClasses with the snapshot API present, want 2", len(vscs))
	}
	if v := vscs[0]; v.Driver != "thin.example.org" || v.DeletionPolicy != snapshotv1.VolumeSnapshotContentRetain ||
		v.Annotations["snapshot.storage.kubernetes.io/is-default-class"] != "true" || v.Parameters["example.org/k"] != "v" {
		t.Errorf("VolumeSnapshotClass %+v", v)
	}
	if v := vscs[1]; v.DeletionPolicy != snapshotv1.VolumeSnapshotContentDelete || len(v.Annotations) != 0 {
		t.Errorf("VolumeSnapshotClass %+v", v)
	}

	if g := ofKind[*groupv1.VolumeGroupSnapshotClass](docs); len(g) != 0 {
		t.Errorf("%d VolumeGroupSnapshotClasses without the group snapshot API", len(g))
	}

	svcs := ofKind[*corev1.Service](docs)
	sms := ofKind[*serviceMonitor](docs)
	if len(svcs) != 1 || len(sms) != 1 {
		t.Fatalf("%d Services, %d ServiceMonitors; want 1 each", len(svcs), len(sms))
	}
	if p := svcs[0].Spec.Ports; len(p) != 1 || p[0].Port != 9900 || p[0].TargetPort.String() != "metrics" {
		t.Errorf("metrics Service ports %+v", p)
	}
	for k, v := range svcs[0].Spec.Selector {
		if dss[0].Spec.Template.Labels[k] != v || dss[1].Spec.Template.Labels[k] != v {
			t.Errorf("metrics Service selector %s=%s misses the node pods", k, v)
		}
	}
	for k, v := range sms[0].Spec.Selector.MatchLabels {
		if svcs[0].Labels[k] != v {
			t.Errorf("ServiceMonitor selector %s=%s misses the Service", k, v)
		}
	}
	if sms[0].Labels["release"] != "prometheus" || sms[0].Spec.Endpoints[0].Interval != "15s" {
		t.Errorf("ServiceMonitor %+v", sms[0])
	}

	if notes := files["csi-dmthin/templates/NOTES.txt"]; !strings.Contains(notes, "VolumeSnapshotClasses thin-snap thin-snap-delete were created") {
		t.Errorf("NOTES.txt does not report the snapshot classes:\n%s", notes)
	}

	// node.extra*: flags, environment, volumes of the driver.
	for _, ds := range dss {
		pod := ds.Spec.Template.Spec
		drv := container(t, pod, "csi-dmthin")
		wantArgs(t, drv, "--thinpool-min-interval=5m")
		if !slices.ContainsFunc(drv.Env, func(e corev1.EnvVar) bool { return e.Name == "GODEBUG" && e.Value == "madvdontneed=1" }) {
			t.Errorf("%s: extraEnv missing: %+v", ds.Name, drv.Env)
		}
		if m := mount(drv, "pool-disk"); m == nil || m.MountPath != "/mnt/pools" || hostPath(pod, "pool-disk") != "/mnt/pools" {
			t.Errorf("%s: extraVolumes/extraVolumeMounts missing", ds.Name)
		}
	}
	if crds := ofKind[*apiextensionsv1.CustomResourceDefinition](docs); len(crds) != 0 {
		t.Errorf("thinPools.installCRD false, yet %d CRDs", len(crds))
	}
	// A PodMonitor that selects the node pods with no Service between.
	pms := ofKind[*podMonitor](docs)
	if len(pms) != 1 {
		t.Fatalf("%d PodMonitors, want 1", len(pms))
	}
	for k, v := range pms[0].Spec.Selector.MatchLabels {
		if dss[0].Spec.Template.Labels[k] != v || dss[1].Spec.Template.Labels[k] != v {
			t.Errorf("PodMonitor selector %s=%s misses the node pods", k, v)
		}
	}
	if e := pms[0].Spec.PodMetricsEndpoints; len(e) != 1 || e[0].Port != "metrics" || e[0].Interval != "20s" || pms[0].Labels["release"] != "prometheus" ||
		pms[0].Spec.JobLabel != "app.kubernetes.io/name" || dss[0].Spec.Template.Labels[pms[0].Spec.JobLabel] != "csi-dmthin" {
		t.Errorf("PodMonitor %+v", pms[0])
	}
	rules := ofKind[*prometheusRule](docs)
	if len(rules) != 1 || rules[0].Labels["release"] != "prometheus" {
		t.Fatalf("PrometheusRules %+v", rules)
	}
	thresholds := map[string]string{"CSIDmthinPoolDataFilling": "> 75", "CSIDmthinPoolDataFull": "> 85", "CSIDmthinPoolMetadataFilling": "> 60", "CSIDmthinPoolMetadataFull": "> 70"}
	for _, g := range rules[0].Spec.Groups {
		for _, r := range g.Rules {
			if th, ok := thresholds[r.Alert]; ok {
				if !strings.HasSuffix(r.Expr, th) || r.For != "2m" {
					t.Errorf("alert %s: %q for %s, want the threshold %q for 2m", r.Alert, r.Expr, r.For, th)
				}
				delete(thresholds, r.Alert)
			}
		}
	}
	if len(thresholds) != 0 {
		t.Errorf("alerts missing: %v", thresholds)
	}
	var dash *corev1.ConfigMap
	for _, cm := range ofKind[*corev1.ConfigMap](docs) {
		if cm.Name == "csi-dmthin-dashboard" {
			dash = cm
		}
	}
	if dash == nil || dash.Namespace != "monitoring" || dash.Labels["grafana_dashboard"] != "1" || dash.Labels["example.org/team"] != "storage" || !json.Valid([]byte(dash.Data["csi-dmthin.json"])) {
		t.Fatalf("dashboard ConfigMap %+v", dash)
	}

	// The helm test: written, snapshotted, restored and verified with the
	// test image, at the test size, with the first classes.
	tests := testObjects(t, files)
	pods := ofKind[*corev1.Pod](tests)
	pvcs := ofKind[*corev1.PersistentVolumeClaim](tests)
	snaps := ofKind[*snapshotv1.VolumeSnapshot](tests)
	if len(pods) != 2 || len(pvcs) != 2 || len(snaps) != 1 {
		t.Fatalf("helm test objects: %d pods, %d PVCs, %d snapshots", len(pods), len(pvcs), len(snaps))
	}
	for _, p := range pods {
		c := p.Spec.Containers[0]
		if c.Image != "images.example.invalid:5000/mirror/tools/selftest:t1" || c.ImagePullPolicy != corev1.PullAlways {
			t.Errorf("test pod %s image %q %s", p.Name, c.Image, c.ImagePullPolicy)
		}
		if len(p.Spec.ImagePullSecrets) != 1 {
			t.Errorf("test pod %s: no pull secret", p.Name)
		}
	}
	for _, c := range pvcs {
		if q := c.Spec.Resources.Requests[corev1.ResourceStorage]; q.String() != "128Mi" || *c.Spec.StorageClassName != "fast-xfs" {
			t.Errorf("test PVC %s: %v of %s", c.Name, q, *c.Spec.StorageClassName)
		}
	}
	if cls := snaps[0].Spec.VolumeSnapshotClassName; cls == nil || *cls != "thin-snap" {
		t.Errorf("test snapshot class %v", cls)
	}
}

// nameOverride and fullnameOverride name every object.
func TestNameOverrides(t *testing.T) {
	for _, tc := range []struct {
		values, ds, sa, label string
	}{
		{`{nameOverride: blocks}`, "csi-dmthin-blocks-node-default", "csi-dmthin-blocks", "blocks"},
		{`{fullnameOverride: storage}`, "storage-node-default", "storage", "csi-dmthin"},
	} {
		vals := mustYAML(t, loopPool)
		for k, v := range mustYAML(t, tc.values) {
			vals[k] = v
		}
		docs := objects(t, render(t, vals, capabilities(t)))
		ds := ofKind[*appsv1.DaemonSet](docs)[0]
		if ds.Name != tc.ds || ds.Spec.Template.Spec.ServiceAccountName != tc.sa || ds.Spec.Template.Labels["app.kubernetes.io/name"] != tc.label {
			t.Errorf("%s: DaemonSet %s, service account %s, name label %q", tc.values, ds.Name, ds.Spec.Template.Spec.ServiceAccountName, ds.Spec.Template.Labels["app.kubernetes.io/name"])
		}
		for _, d := range docs {
			if d.kind != "CSIDriver" && d.kind != "StorageClass" && d.kind != "CustomResourceDefinition" && !strings.HasPrefix(d.name, tc.sa) {
				t.Errorf("%s: %s %s is not named after %s", tc.values, d.kind, d.name, tc.sa)
			}
		}
	}
}

// TestNotesWithoutSnapshotAPI: the operator is told the snapshot CRDs and
// controller are missing, and what to check next.
func TestNotesWithoutSnapshotAPI(t *testing.T) {
	notes := render(t, mustYAML(t, loopPool), capabilities(t))["csi-dmthin/templates/NOTES.txt"]
	for _, want := range []string{
		"snapshot.storage.k8s.io/v1 API is NOT present",
		"--enable-distributed-snapshotting",
		"kubectl get csistoragecapacities",
		"kubectl get thinpools",
		"csi-dmthin pool status",
		"csi-dmthin pool grow",
		"# default: pools default",
		"helm test csi-dmthin",
		"get lease dmthin-csi-dmthin-io-controller",
	} {
		if !strings.Contains(notes, want) {
			t.Errorf("NOTES.txt lacks %q:\n%s", want, notes)
		}
	}
}

// TestRBACLeastPrivilege: no wildcards, no secrets, every role bound to the
// chart's ServiceAccount, and each sidecar's grants are the ones its mode
// needs.
func TestRBACLeastPrivilege(t *testing.T) {
	for _, tc := range []struct {
		name string
		vals map[string]any
	}{{"default", nil}, {"full", fullValuesMap(t)}} {
		t.Run(tc.name, func(t *testing.T) {
			docs := objects(t, render(t, tc.vals, capabilities(t, snapshotAPI)))
			rules := map[string][]rbacv1.PolicyRule{}
			for _, r := range ofKind[*rbacv1.ClusterRole](docs) {
				rules["ClusterRole/"+r.Name] = r.Rules
			}
			for _, r := range ofKind[*rbacv1.Role](docs) {
				if r.Namespace != releaseNS {
					t.Errorf("Role %s in namespace %q", r.Name, r.Namespace)
				}
				rules["Role/"+r.Name] = r.Rules
			}
			for name, rs := range rules {
				for _, r := range rs {
					for _, s := range slices.Concat(r.Verbs, r.Resources, r.APIGroups) {
						if strings.Contains(s, "*") {
							t.Errorf("%s: wildcard %q in %+v", name, s, r)
						}
					}
					if slices.Contains(r.Resources, "secrets") {
						t.Errorf("%s grants secrets: %+v", name, r)
					}
				}
			}
			bound := map[string]bool{}
			check := func(kind, name string, ref rbacv1.RoleRef, subjects []rbacv1.Subject) {
				// The controller's roles are its own ServiceAccount's; the
				// node pods' ServiceAccount holds none of them.
				sa := "csi-dmthin"
				if strings.HasSuffix(ref.Name, "-controller") {
					sa = "csi-dmthin-controller"
				}
				if len(subjects) != 1 || subjects[0].Kind != "ServiceAccount" || subjects[0].Name != sa || subjects[0].Namespace != releaseNS {
					t.Errorf("%s %s subjects %+v, want ServiceAccount %s", kind, name, subjects, sa)
				}
				if rules[ref.Kind+"/"+ref.Name] == nil {
					t.Errorf("%s %s refers to missing %s %s", kind, name, ref.Kind, ref.Name)
				}
				bound[ref.Kind+"/"+ref.Name] = true
			}
			for _, b := range ofKind[*rbacv1.ClusterRoleBinding](docs) {
				check("ClusterRoleBinding", b.Name, b.RoleRef, b.Subjects)
			}
			for _, b := range ofKind[*rbacv1.RoleBinding](docs) {
				check("RoleBinding", b.Name, b.RoleRef, b.Subjects)
			}
			for name := range rules {
				if !bound[name] {
					t.Errorf("%s is bound to nothing", name)
				}
			}

			grants := func(role, group, resource, verb string) bool {
				for _, r := range rules[role] {
					if slices.Contains(r.APIGroups, group) && slices.Contains(r.Resources, resource) && slices.Contains(r.Verbs, verb) {
						return true
					}
				}
				return false
			}
			for _, g := range []struct {
				role, group, resource, verb string
				want                        bool
			}{
				// The driver on a node watches nothing: it reads a claim
				// for its UID, its Node and the classes of its capacity,
				// and writes Events.
				{"ClusterRole/csi-dmthin-driver", "", "persistentvolumeclaims", "get", true},
				{"ClusterRole/csi-dmthin-driver", "", "persistentvolumeclaims", "list", false},
				{"ClusterRole/csi-dmthin-driver", "", "persistentvolumeclaims", "watch", false},
				{"ClusterRole/csi-dmthin-driver", "", "persistentvolumeclaims", "update", false},
				{"ClusterRole/csi-dmthin-driver", "", "persistentvolumeclaims", "patch", false},
				{"ClusterRole/csi-dmthin-driver", "", "persistentvolumes", "watch", false},
				{"ClusterRole/csi-dmthin-driver", "storage.k8s.io", "storageclasses", "get", true},
				{"ClusterRole/csi-dmthin-driver", "storage.k8s.io", "storageclasses", "watch", false},
				{"ClusterRole/csi-dmthin-driver", "snapshot.storage.k8s.io", "volumesnapshots", "list", false},
				{"ClusterRole/csi-dmthin-driver", "snapshot.storage.k8s.io", "volumesnapshotcontents", "list", false},
				{"ClusterRole/csi-dmthin-driver", "snapshot.storage.k8s.io", "volumesnapshotcontents", "patch", false},
				{"ClusterRole/csi-dmthin-driver", "groupsnapshot.storage.k8s.io", "volumegroupsnapshotcontents", "patch", false},
				{"ClusterRole/csi-dmthin-driver", "groupsnapshot.storage.k8s.io", "volumegroupsnapshotclasses", "patch", false},
				{"ClusterRole/csi-dmthin-driver", "", "nodes", "get", true},
				{"ClusterRole/csi-dmthin-driver", "", "nodes", "list", false},
				{"ClusterRole/csi-dmthin-driver", "", "events", "create", true},
				{"ClusterRole/csi-dmthin-driver", "events.k8s.io", "events", "patch", true},
				// ... keeps its node's ThinPools (status through the
				// subresource only) and refreshes its node's capacity.
				{"ClusterRole/csi-dmthin-driver", "dmthin.io", "thinpools", "create", true},
				{"ClusterRole/csi-dmthin-driver", "dmthin.io", "thinpools", "update", false},
				{"ClusterRole/csi-dmthin-driver", "dmthin.io", "thinpools", "watch", false},
				{"ClusterRole/csi-dmthin-driver", "dmthin.io", "thinpools/status", "patch", true},
				// ... reads another node's ThinPool for its copy endpoint,
				// and has the API server review its copy callers' tokens.
				{"ClusterRole/csi-dmthin-driver", "dmthin.io", "thinpools", "get", true},
				{"ClusterRole/csi-dmthin-driver", "authentication.k8s.io", "tokenreviews", "create", true},
				{"ClusterRole/csi-dmthin-driver", "authorization.k8s.io", "subjectaccessreviews", "create", false},
				{"ClusterRole/csi-dmthin-controller", "authentication.k8s.io", "tokenreviews", "create", false},
				{"Role/csi-dmthin-driver", "storage.k8s.io", "csistoragecapacities", "update", true},
				{"Role/csi-dmthin-driver", "storage.k8s.io", "csistoragecapacities", "create", false},
				{"ClusterRole/csi-dmthin-driver", "storage.k8s.io", "csistoragecapacities", "update", false},
				// The controller sets selected-node on claims, labels
				// contents and group classes, reads ThinPools, and holds
				// its Lease in the release namespace.
				{"ClusterRole/csi-dmthin-controller", "", "persistentvolumeclaims", "watch", true},
				{"ClusterRole/csi-dmthin-controller", "", "persistentvolumeclaims", "update", true},
				{"ClusterRole/csi-dmthin-controller", "", "persistentvolumeclaims", "delete", false},
				{"ClusterRole/csi-dmthin-controller", "", "persistentvolumes", "watch", true},
				{"ClusterRole/csi-dmthin-controller", "", "persistentvolumes", "update", false},
				{"ClusterRole/csi-dmthin-controller", "storage.k8s.io", "storageclasses", "watch", true},
				{"ClusterRole/csi-dmthin-controller", "", "nodes", "get", true},
				{"ClusterRole/csi-dmthin-controller", "", "nodes", "update", false},
				{"ClusterRole/csi-dmthin-controller", "snapshot.storage.k8s.io", "volumesnapshots", "watch", true},
				{"ClusterRole/csi-dmthin-controller", "snapshot.storage.k8s.io", "volumesnapshots", "patch", false},
				{"ClusterRole/csi-dmthin-controller", "snapshot.storage.k8s.io", "volumesnapshotcontents", "patch", true},
				{"ClusterRole/csi-dmthin-controller", "snapshot.storage.k8s.io", "volumesnapshotcontents", "delete", false},
				{"ClusterRole/csi-dmthin-controller", "groupsnapshot.storage.k8s.io", "volumegroupsnapshotcontents", "patch", true},
				{"ClusterRole/csi-dmthin-controller", "groupsnapshot.storage.k8s.io", "volumegroupsnapshotcontents", "delete", false},
				{"ClusterRole/csi-dmthin-controller", "groupsnapshot.storage.k8s.io", "volumegroupsnapshotclasses", "patch", true},
				{"ClusterRole/csi-dmthin-controller", "dmthin.io", "thinpools", "watch", true},
				{"ClusterRole/csi-dmthin-controller", "dmthin.io", "thinpools", "create", false},
				{"ClusterRole/csi-dmthin-controller", "dmthin.io", "thinpools/status", "patch", false},
				{"ClusterRole/csi-dmthin-controller", "", "events", "create", true},
				{"ClusterRole/csi-dmthin-controller", "coordination.k8s.io", "leases", "update", false},
				{"Role/csi-dmthin-controller", "coordination.k8s.io", "leases", "get", true},
				{"Role/csi-dmthin-controller", "coordination.k8s.io", "leases", "create", true},
				{"Role/csi-dmthin-controller", "coordination.k8s.io", "leases", "update", true},
				{"Role/csi-dmthin-controller", "coordination.k8s.io", "leases", "delete", false},
				// The provisioner makes and deletes PVs and publishes capacity
				// in the release namespace only.
				{"ClusterRole/csi-dmthin-provisioner", "", "persistentvolumes", "create", true},
				{"ClusterRole/csi-dmthin-provisioner", "", "persistentvolumes", "patch", true},
				{"ClusterRole/csi-dmthin-provisioner", "", "persistentvolumes", "delete", true},
				{"ClusterRole/csi-dmthin-provisioner", "storage.k8s.io", "csistoragecapacities", "create", false},
				{"Role/csi-dmthin-provisioner", "storage.k8s.io", "csistoragecapacities", "create", true},
				{"Role/csi-dmthin-provisioner", "", "pods", "get", true},
				{"Role/csi-dmthin-provisioner", "", "pods", "list", false},
				// The snapshotter in node mode: no leases.
				{"ClusterRole/csi-dmthin-snapshotter", "snapshot.storage.k8s.io", "volumesnapshotcontents/status", "patch", true},
				// It cuts group snapshots and makes their members' contents.
				{"ClusterRole/csi-dmthin-snapshotter", "groupsnapshot.storage.k8s.io", "volumegroupsnapshotcontents/status", "patch", true},
				{"ClusterRole/csi-dmthin-snapshotter", "groupsnapshot.storage.k8s.io", "volumegroupsnapshotclasses", "watch", true},
				{"ClusterRole/csi-dmthin-snapshotter", "snapshot.storage.k8s.io", "volumesnapshotcontents", "create", true},
				{"ClusterRole/csi-dmthin-snapshotter", "coordination.k8s.io", "leases", "create", false},
				// The resizer: elected, and patches claim status.
				{"Role/csi-dmthin-resizer", "coordination.k8s.io", "leases", "update", true},
				{"ClusterRole/csi-dmthin-resizer", "", "persistentvolumeclaims/status", "patch", true},
				{"ClusterRole/csi-dmthin-resizer", "", "persistentvolumes", "delete", false},
			} {
				if got := grants(g.role, g.group, g.resource, g.verb); got != g.want {
					t.Errorf("%s %s %q/%s: granted %v, want %v", g.role, g.verb, g.group, g.resource, got, g.want)
				}
			}
		})
	}
}

// TestSchemaRejectsBadValues runs the chart's values.schema.json the way
// helm install does: the user's values coalesced with the defaults.
func TestSchemaRejectsBadValues(t *testing.T) {
	ch := loadChart(t)
	for _, tc := range []struct {
		name    string
		values  string
		wantErr string // "" when the values are valid
	}{
		{"defaults", ``, ""},
		{"a typo'd top-level key", `kubeletdir: /var/lib/k0s/kubelet`, "kubeletdir"},
		{"a typo'd nested key", `node: {toleration: []}`, "toleration"},
		{"a typo'd sidecar key", `sidecars: {resizer: {loglevel: 3}}`, "loglevel"},
		{"a typo'd pool key", `nodePools: [{name: a, pools: [{name: p, dataFile: /x, dataFileSise: 1Gi}]}]`, "dataFileSise"},
		{"a wrong type", `metrics: {port: "9808"}`, "port"},
		{"a wrong type in a list", `storageClasses: [{name: a, isDefaultClass: "yes"}]`, "isDefaultClass"},
		{"an invalid pullPolicy", `image: {pullPolicy: Sometimes}`, "pullPolicy"},
		{"an invalid sidecar pullPolicy", `sidecars: {provisioner: {image: {pullPolicy: always}}}`, "pullPolicy"},
		{"an unknown fsType", `storageClasses: [{name: a, fsType: btrfs}]`, "fsType"},
		{"a pool with devices and files", `nodePools: [{name: a, pools: [{name: p, dataDevice: /dev/sdb, metadataDevice: /dev/sdc, dataFile: /x}]}]`, "oneOf"},
		{"a pool with no data", `nodePools: [{name: a, pools: [{name: p}]}]`, "oneOf"},
		{"a bad pool name", `nodePools: [{name: a, pools: [{name: Fast, dataFile: /x}]}]`, "name"},
		{"a bad size", `nodePools: [{name: a, pools: [{name: p, dataFile: /x, dataFileSize: 20GB}]}]`, "dataFileSize"},
		{"no nodePools", `nodePools: []`, ""},
		{"a parent chart's global", `global: {storageClass: fast, imagePullSecrets: [x]}`, ""},
		{"an autoExtend without its maximum", `nodePools: [{name: a, pools: [{name: p, dataFile: /x, autoExtend: {thresholdPercent: 80}}]}]`, "maxDataFileSize"},
		{"a percentage low water mark", `nodePools: [{name: a, pools: [{name: p, dataFile: /x, lowWaterMark: "10%"}]}]`, ""},
		{"a decimal size", `nodePools: [{name: a, pools: [{name: p, dataFile: /x, dataFileSize: 20G}]}]`, ""},
		{"a bad alert threshold", `metrics: {prometheusRule: {dataWarningPercent: 120}}`, "dataWarningPercent"},
		{"an extra env without a name", `node: {extraEnv: [{value: x}]}`, "name"},
		{"a relative kubeletDir", `kubeletDir: var/lib/kubelet`, "kubeletDir"},
		{"poolFullPercent over 100", `node: {poolFullPercent: 120}`, "poolFullPercent"},
		{"a fractional poolFullPercent", `node: {poolFullPercent: 85.5}`, "poolFullPercent"},
		{"a bad base delay", `sidecars: {provisioner: {nodeDeploymentBaseDelay: 20}}`, "nodeDeploymentBaseDelay"},
		{"an argument that is not a flag", `sidecars: {snapshotter: {additionalArgs: [worker-threads=2]}}`, "additionalArgs"},
		{"a typo'd controller key", `controller: {replica: 2}`, "replica"},
		{"no controller replica", `controller: {replicas: 0}`, "replicas"},
		{"no controller worker", `controller: {workers: 0}`, "workers"},
		{"a controller argument that is not a flag", `controller: {additionalArgs: [workers=2]}`, "additionalArgs"},
		{"a typo'd controller affinity", `controller: {affinity: {podAntiAfinity: {}}}`, "podAntiAfinity"},
		{"the controller off", `controller: {enabled: false}`, ""},
		{"a typo'd copy key", `copy: {enable: false}`, "enable"},
		{"a copy port out of range", `copy: {port: 70000}`, "port"},
		{"a negative copy rate", `copy: {rateBytesPerSec: -1}`, "rateBytesPerSec"},
		{"a fractional copy rate", `copy: {rateBytesPerSec: 1.5}`, "rateBytesPerSec"},
		{"no copy audience", `copy: {audience: ""}`, "audience"},
		{"a copy token shorter than the API allows", `copy: {tokenExpirationSeconds: 300}`, "tokenExpirationSeconds"},
		{"copies off", `copy: {enabled: false}`, ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			vals, err := chartutil.CoalesceValues(ch, mustYAML(t, tc.values))
			if err != nil {
				t.Fatal(err)
			}
			err = chartutil.ValidateAgainstSchema(ch, vals)
			switch {
			case tc.wantErr == "" && err != nil:
				t.Errorf("valid values rejected: %v", err)
			case tc.wantErr != "" && err == nil:
				t.Errorf("accepted; want an error naming %q", tc.wantErr)
			case tc.wantErr != "" && !strings.Contains(err.Error(), tc.wantErr):
				t.Errorf("error %q does not name %q", err, tc.wantErr)
			}
		})
	}
	t.Run("full values", func(t *testing.T) {
		vals, err := chartutil.CoalesceValues(ch, fullValuesMap(t))
		if err != nil {
			t.Fatal(err)
		}
		if err := chartutil.ValidateAgainstSchema(ch, vals); err != nil {
			t.Errorf("full values rejected: %v", err)
		}
	})
}

// TestLint runs what `helm lint` runs, with the default and the full
// values, and fails on anything above INFO.
func TestLint(t *testing.T) {
	kv, err := chartutil.ParseKubeVersion(kubeVersion)
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name string
		vals map[string]any
	}{{"default", nil}, {"full", fullValuesMap(t)}} {
		t.Run(tc.name, func(t *testing.T) {
			l := lint.AllWithKubeVersion(chartDir, tc.vals, releaseNS, kv)
			for _, m := range l.Messages {
				if m.Severity >= support.WarningSev {
					t.Error(m.Error())
				} else {
					t.Log(m.Error())
				}
			}
		})
	}
}

// manifestsHeader opens each file of deploy/kubernetes.
const manifestsHeader = `# Generated from charts/csi-dmthin with its default values (release
# csi-dmthin, namespace kube-system) by ` + "`make manifests`" + `; do not edit.
# The chart's README lists the values; change them there and regenerate.
`

// defaultManifests is deploy/kubernetes as the default render makes it: the
// VolumeSnapshotClass and the VolumeGroupSnapshotClass in files of their
// own, since they apply only where their CRDs are installed. The objects
// come in helm's install order, so that `kubectl apply -f` makes the
// ServiceAccounts, the CRD and the RBAC before the controller Deployment,
// whose pods use the first and look for the second at start.
func defaultManifests(t *testing.T) map[string][]byte {
	t.Helper()
	docs := installOrder(objects(t, render(t, nil, capabilities(t, snapshotAPI, groupAPI))))
	var main, snap, group bytes.Buffer
	main.WriteString(manifestsHeader)
	snap.WriteString(manifestsHeader + "# Needs the snapshot CRDs (snapshot.storage.k8s.io/v1) and a snapshot-controller\n# run with --enable-distributed-snapshotting.\n")
	group.WriteString(manifestsHeader + "# Needs the group snapshot CRDs (groupsnapshot.storage.k8s.io/v1) as well.\n")
	for _, d := range docs {
		b := &main
		switch d.kind {
		case "VolumeSnapshotClass":
			b = &snap
		case "VolumeGroupSnapshotClass":
			b = &group
		}
		b.WriteString("---\n# Source: " + d.source + "\n" + strings.TrimLeft(stripLeadingComments(d.yaml), "\n"))
	}
	// The node parts: one nodePools entry with devices to fill in, on the
	// nodes labelled for it, so that applying it unchanged starts nothing.
	var node bytes.Buffer
	node.WriteString(nodeExampleHeader)
	for _, d := range installOrder(objects(t, render(t, mustYAML(t, nodeExampleValues), capabilities(t, snapshotAPI)))) {
		if d.kind == "DaemonSet" || d.kind == "ConfigMap" {
			node.WriteString("---\n# Source: " + d.source + "\n" + strings.TrimLeft(stripLeadingComments(d.yaml), "\n"))
		}
	}
	return map[string][]byte{"csi-dmthin.yaml": main.Bytes(), "volumesnapshotclass.yaml": snap.Bytes(), "volumegroupsnapshotclass.yaml": group.Bytes(), "node-example.yaml": node.Bytes()}
}

// installOrder sorts docs by kind the way helm install does (kinds it does
// not know last), keeping the render order within a kind.
func installOrder(docs []doc) []doc {
	rank := func(kind string) int {
		if i := slices.Index(releaseutil.InstallOrder, kind); i >= 0 {
			return i
		}
		return len(releaseutil.InstallOrder)
	}
	out := slices.Clone(docs)
	slices.SortStableFunc(out, func(a, b doc) int { return rank(a.kind) - rank(b.kind) })
	return out
}

// nodeExampleValues render deploy/kubernetes/node-example.yaml.
const nodeExampleValues = `nodePools:
  - name: example
    nodeSelector: {dmthin.io/example-pool: "true"}
    defaultPool: fast
    pools:
      - name: fast
        dataDevice: /dev/disk/by-id/CHANGE-ME-data
        metadataDevice: /dev/disk/by-id/CHANGE-ME-metadata
`

const nodeExampleHeader = `# Generated from charts/csi-dmthin by ` + "`make manifests`" + ` with one nodePools
# entry (nodeExampleValues in deploy/chart_test.go): the node parts for one
# group of nodes. Copy it, put your devices in pools.yaml (csi-dmthin config
# check checks a pools file), apply it after csi-dmthin.yaml, then label the
# nodes: kubectl label node <node> dmthin.io/example-pool=true
`

// stripLeadingComments drops the template's comment lines above the object
// (they explain the template, and the Source line replaces them).
func stripLeadingComments(s string) string {
	lines := strings.Split(s, "\n")
	i := 0
	for i < len(lines) && strings.HasPrefix(strings.TrimSpace(lines[i]), "#") {
		i++
	}
	return strings.Join(lines[i:], "\n")
}

// TestManifestsMatchDefaultRender keeps deploy/kubernetes equal to the
// chart's default render; -update rewrites it.
func TestManifestsMatchDefaultRender(t *testing.T) {
	want := defaultManifests(t)
	dir := "kubernetes"
	if *update {
		for name, b := range want {
			if err := os.WriteFile(filepath.Join(dir, name), b, 0o644); err != nil {
				t.Fatal(err)
			}
		}
	}
	entries, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range entries {
		if _, ok := want[e.Name()]; !ok && filepath.Ext(e.Name()) == ".yaml" {
			t.Errorf("%s/%s is not part of the default render; remove it", dir, e.Name())
		}
	}
	for name, b := range want {
		got, err := os.ReadFile(filepath.Join(dir, name))
		if err != nil {
			t.Errorf("%v (run make manifests)", err)
			continue
		}
		if !bytes.Equal(got, b) {
			t.Errorf("%s/%s differs from the chart's default render; run make manifests", dir, name)
		}
	}
}

// poolsFile is what the test reads back from a ConfigMap's pools.yaml.
type poolsFile struct {
	DefaultPool string           `json:"defaultPool,omitempty"`
	Pools       []map[string]any `json:"pools"`
}

func decodePools(t *testing.T, s string) poolsFile {
	t.Helper()
	var pc poolsFile
	if err := yaml.UnmarshalStrict([]byte(s), &pc); err != nil {
		t.Fatalf("pools.yaml: %v\n%s", err, s)
	}
	return pc
}

// TestGroupSnapshotClass: with the group snapshot API, the default values
// give one VolumeGroupSnapshotClass of the driver; a default one is
// annotated so.
func TestGroupSnapshotClass(t *testing.T) {
	docs := objects(t, render(t, nil, capabilities(t, snapshotAPI, groupAPI)))
	g := ofKind[*groupv1.VolumeGroupSnapshotClass](docs)
	if len(g) != 1 || g[0].Name != "csi-dmthin" || g[0].Driver != "dmthin.csi.dmthin.io" || g[0].DeletionPolicy != snapshotv1.VolumeSnapshotContentDelete || len(g[0].Annotations) != 0 {
		t.Fatalf("VolumeGroupSnapshotClasses %+v", g)
	}
	vals := map[string]any{"volumeGroupSnapshotClasses": []any{map[string]any{"name": "db", "isDefaultClass": true, "deletionPolicy": "Retain"}}}
	g = ofKind[*groupv1.VolumeGroupSnapshotClass](objects(t, render(t, vals, capabilities(t, snapshotAPI, groupAPI))))
	if len(g) != 1 || g[0].DeletionPolicy != snapshotv1.VolumeSnapshotContentRetain || g[0].Annotations["groupsnapshot.storage.kubernetes.io/is-default-class"] != "true" {
		t.Fatalf("a default, retained class: %+v", g)
	}
}
