package main

import (
	"net"
	"os"
	"strconv"
	"strings"
	"testing"
	"time"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	storagev1 "k8s.io/api/storage/v1"
	"sigs.k8s.io/yaml"
)

// The shipped manifests (the chart's render of a nodePools entry) start
// the driver with flags this binary knows, and give it a pools file it
// reads: a flag or field renamed on one side only would crash-loop every
// node pod.
func TestManifestArgsParse(t *testing.T) {
	b, err := os.ReadFile("../../deploy/kubernetes/node-example.yaml")
	if err != nil {
		t.Fatal(err)
	}
	found := 0
	for _, doc := range strings.Split(string(b), "\n---\n") {
		if strings.Contains(doc, "kind: ConfigMap") {
			var cm corev1.ConfigMap
			if err := yaml.Unmarshal([]byte(doc), &cm); err != nil {
				t.Fatal(err)
			}
			if _, err := loadNodeConfig(writeConfig(t, cm.Data["pools.yaml"]), "/var/lib/csi-dmthin"); err != nil {
				t.Errorf("the manifest's pools.yaml: %v", err)
			}
			continue
		}
		if !strings.Contains(doc, "kind: DaemonSet") {
			continue
		}
		var ds appsv1.DaemonSet
		if err := yaml.Unmarshal([]byte(doc), &ds); err != nil {
			t.Fatal(err)
		}
		for _, c := range ds.Spec.Template.Spec.Containers {
			if c.Name != "csi-dmthin" {
				continue
			}
			found++
			if len(c.Args) == 0 || c.Args[0] != "serve" {
				t.Fatalf("driver args %q do not start with serve", c.Args)
			}
			fs, f := newServeFlags()
			if err := fs.Parse(c.Args[1:]); err != nil {
				t.Fatalf("serve rejects the manifest's args %q: %v", c.Args[1:], err)
			}
			if fs.NArg() != 0 {
				t.Errorf("stray arguments %q", fs.Args())
			}
			if !f.kube.kubeAPI || f.kube.registrationDir == "" || !strings.HasSuffix(f.kube.kubeletEndpoint, "/csi.sock") {
				t.Errorf("the manifest does not turn on the Kubernetes side: %+v", *f.kube)
			}
			if *f.nodeID != "$(NODE_NAME)" {
				t.Errorf("node id %q, want the downward API's NODE_NAME", *f.nodeID)
			}
			// The kubelet SIGKILLs the driver at the end of the grace
			// period: the calls' time must end well before, leaving time
			// to stop the rest and close the pools (their servers' own
			// shutdown takes up to httpShutdownTimeout).
			grace := time.Duration(30) * time.Second // the API's default
			if p := ds.Spec.Template.Spec.TerminationGracePeriodSeconds; p != nil {
				grace = time.Duration(*p) * time.Second
			}
			if *f.shutdownTimeout+2*httpShutdownTimeout > grace {
				t.Errorf("--shutdown-timeout=%v leaves under %v of the %v grace period for the rest of the shutdown", *f.shutdownTimeout, 2*httpShutdownTimeout, grace)
			}
		}
	}
	if found == 0 {
		t.Fatal("no csi-dmthin container in the manifests")
	}
}

// The shipped manifests' controller Deployment starts `csi-dmthin
// controller` with flags it knows, elected among at least two replicas,
// for the driver the CSIDriver names, and probes the port it serves
// /healthz on.
func TestManifestControllerArgsParse(t *testing.T) {
	b, err := os.ReadFile("../../deploy/kubernetes/csi-dmthin.yaml")
	if err != nil {
		t.Fatal(err)
	}
	var deps []appsv1.Deployment
	var drivers []string
	for _, doc := range strings.Split(string(b), "\n---\n") {
		switch {
		case strings.Contains(doc, "\nkind: Deployment\n"):
			var d appsv1.Deployment
			if err := yaml.Unmarshal([]byte(doc), &d); err != nil {
				t.Fatal(err)
			}
			deps = append(deps, d)
		case strings.Contains(doc, "\nkind: CSIDriver\n"):
			var d storagev1.CSIDriver
			if err := yaml.Unmarshal([]byte(doc), &d); err != nil {
				t.Fatal(err)
			}
			drivers = append(drivers, d.Name)
		}
	}
	if len(deps) != 1 || len(drivers) != 1 {
		t.Fatalf("%d Deployments and %d CSIDrivers in the manifests, want the controller's and one", len(deps), len(drivers))
	}
	d := deps[0]
	if d.Spec.Replicas == nil || *d.Spec.Replicas < 2 {
		t.Errorf("controller replicas %v: want at least 2, so one takes over when the leader's node goes", d.Spec.Replicas)
	}
	pod := d.Spec.Template.Spec
	if len(pod.Containers) != 1 {
		t.Fatalf("controller pod has %d containers, want 1", len(pod.Containers))
	}
	c := pod.Containers[0]
	if len(c.Args) == 0 || c.Args[0] != "controller" {
		t.Fatalf("controller args %q do not start with controller", c.Args)
	}
	f, err := parseControllerFlags(c.Args[1:])
	if err != nil {
		t.Fatalf("controller rejects the manifest's args %q: %v", c.Args[1:], err)
	}
	if !f.leaderElection {
		t.Error("the manifest runs the controller's replicas without leader election")
	}
	if f.driverName != drivers[0] {
		t.Errorf("controller --driver-name %q, want the CSIDriver's %q", f.driverName, drivers[0])
	}
	// The Lease's namespace and holder come from the downward API.
	for name, field := range map[string]string{"NAMESPACE": "metadata.namespace", "POD_NAME": "metadata.name"} {
		if !hasFieldEnv(c, name, field) {
			t.Errorf("controller container has no %s from %s", name, field)
		}
	}
	if f.leaseNamespace != "$(NAMESPACE)" {
		t.Errorf("controller Lease namespace %q, want $(NAMESPACE), the pod's", f.leaseNamespace)
	}
	_, portStr, err := net.SplitHostPort(f.httpEndpoint)
	if err != nil {
		t.Fatalf("--http-endpoint=%q: %v", f.httpEndpoint, err)
	}
	port, err := strconv.Atoi(portStr)
	if err != nil {
		t.Fatalf("--http-endpoint=%q: %v", f.httpEndpoint, err)
	}
	lp := c.LivenessProbe
	if lp == nil || lp.HTTPGet == nil || lp.HTTPGet.Path != "/healthz" {
		t.Fatalf("controller liveness probe %+v, want an HTTP GET of /healthz", lp)
	}
	probed := lp.HTTPGet.Port.IntValue()
	if name := lp.HTTPGet.Port.StrVal; name != "" {
		probed = 0
		for _, p := range c.Ports {
			if p.Name == name {
				probed = int(p.ContainerPort)
			}
		}
	}
	if probed != port {
		t.Errorf("the liveness probe calls port %d (%s), the controller serves /healthz on %d (--http-endpoint=%s)", probed, lp.HTTPGet.Port.String(), port, f.httpEndpoint)
	}
}

func hasFieldEnv(c corev1.Container, name, field string) bool {
	for _, e := range c.Env {
		if e.Name == name && e.ValueFrom != nil && e.ValueFrom.FieldRef != nil && e.ValueFrom.FieldRef.FieldPath == field {
			return true
		}
	}
	return false
}
