package main

import (
	"os"
	"strings"
	"testing"
	"time"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
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
