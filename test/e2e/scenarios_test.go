package e2e

import (
	"cmp"
	"context"
	"encoding/json"
	"fmt"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/csi-dmthin/csi-dmthin/test/e2e/cluster"
)

// k is a test's handle on the cluster: kubectl in one namespace.
type k struct {
	t   *testing.T
	c   *cluster.Cluster
	ctx context.Context
	ns  string
}

func (k *k) run(args ...string) string {
	k.t.Helper()
	out, err := k.c.Kubectl(k.ctx, append([]string{"-n", k.ns}, args...)...)
	if err != nil {
		k.t.Fatal(err)
	}
	return strings.TrimSpace(string(out))
}

func (k *k) try(args ...string) (string, error) {
	out, err := k.c.Kubectl(k.ctx, append([]string{"-n", k.ns}, args...)...)
	return strings.TrimSpace(string(out)), err
}

func (k *k) apply(yaml string) {
	k.t.Helper()
	if _, err := k.c.KubectlStdin(k.ctx, yaml, "-n", k.ns, "apply", "-f", "-"); err != nil {
		k.t.Fatal(err)
	}
}

// eventually polls f until it returns "" (done) or timeout passes; the last
// answer is the failure message.
func (k *k) eventually(timeout time.Duration, what string, f func() string) {
	k.t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		msg := f()
		if msg == "" {
			return
		}
		if time.Now().After(deadline) || k.ctx.Err() != nil {
			k.t.Fatalf("%s: not within %s: %s", what, timeout, msg)
		}
		time.Sleep(time.Second)
	}
}

func (k *k) waitPodReady(name string) {
	k.t.Helper()
	start := time.Now()
	if _, err := k.try("wait", "--for=condition=Ready", "pod/"+name, "--timeout=5m"); err != nil {
		desc, _ := k.try("describe", "pod", name)
		ev, _ := k.try("get", "events", "--sort-by=.lastTimestamp")
		k.t.Fatalf("pod %s not Ready: %v\n%s\n%s", name, err, tailStr(desc, 30), tailStr(ev, 20))
	}
	k.t.Logf("pod %s Ready in %s", name, time.Since(start).Round(100*time.Millisecond))
}

func tailStr(s string, n int) string {
	lines := strings.Split(s, "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

func pvcYAML(name, size, mode, dataSource string) string {
	y := fmt.Sprintf(`apiVersion: v1
kind: PersistentVolumeClaim
metadata: {name: %s}
spec:
  storageClassName: %s
  accessModes: [ReadWriteOnce]
  volumeMode: %s
  resources: {requests: {storage: %s}}
`, name, storageClass, mode, size)
	return y + dataSource
}

func podYAML(name, claim, script string, block bool) string {
	vol := `volumeMounts: [{name: v, mountPath: /data}]`
	if block {
		vol = `volumeDevices: [{name: v, devicePath: /dev/xvda}]`
	}
	return podWithVolumes(name, script, vol, fmt.Sprintf(`[{name: v, persistentVolumeClaim: {claimName: %s}}]`, claim))
}

// podWithVolumes is a busybox pod running script, with the container's
// volume lines (volumeMounts or volumeDevices) and the pod's volumes list.
func podWithVolumes(name, script, containerVolumes, volumes string) string {
	return fmt.Sprintf(`apiVersion: v1
kind: Pod
metadata: {name: %s}
spec:
  automountServiceAccountToken: false
  terminationGracePeriodSeconds: 1
  containers:
  - name: c
    image: %s
    imagePullPolicy: Never
    command: ["/bin/sh", "-c", %q]
    %s
  volumes: %s
`, name, cluster.BusyboxImage, script, containerVolumes, volumes)
}

// TestScenarios walks the life of volumes as a user sees it, each step
// building on the one before: a WaitForFirstConsumer PVC and a pod that
// writes, a snapshot, a restore with the data, a clone, online expansion,
// a raw block volume, ReadWriteOncePod, the driver's pod killed while
// volumes are mounted, and deleting everything leaving the pool with no thin
// device.
func TestScenarios(t *testing.T) {
	c := requireDriver(t)
	ctx, cancel := context.WithTimeout(testCtx, 30*time.Minute)
	defer cancel()
	kc := &k{t: t, c: c, ctx: ctx, ns: "e2e-scenarios"}
	kc.run("create", "namespace", kc.ns)
	var sourceNode string // where the first volume went

	step := stepper(t, c, ctx, kc.ns)

	step("WFFCPodWrites", func(k *k) {
		k.apply(pvcYAML("data", "1Gi", "Filesystem", ""))
		// WaitForFirstConsumer: nothing is provisioned before a pod.
		time.Sleep(2 * time.Second)
		if phase := k.run("get", "pvc", "data", "-o", "jsonpath={.status.phase}"); phase != "Pending" {
			k.t.Fatalf("PVC phase %q before any pod, want Pending", phase)
		}
		k.apply(podYAML("writer", "data", "echo hello-dmthin >/data/file && sync && sleep 100000", false))
		k.waitPodReady("writer")
		if got := k.run("exec", "writer", "--", "cat", "/data/file"); got != "hello-dmthin" {
			k.t.Fatalf("read back %q", got)
		}
		// The volume went where the scheduler put the pod.
		sourceNode = k.placement("data", "writer", "")
	})

	step("Snapshot", func(k *k) {
		k.apply(fmt.Sprintf(`apiVersion: snapshot.storage.k8s.io/v1
kind: VolumeSnapshot
metadata: {name: snap}
spec:
  volumeSnapshotClassName: %s
  source: {persistentVolumeClaimName: data}
`, snapshotClass))
		k.eventually(3*time.Minute, "snapshot readyToUse", func() string {
			out, _ := k.try("get", "volumesnapshot", "snap", "-o", "jsonpath={.status.readyToUse} {.status.error.message}")
			if strings.HasPrefix(out, "true") {
				return ""
			}
			return out
		})
	})

	step("RestoreOnSourceNode", func(k *k) {
		// Overwrite the source first: the restore must have the old data.
		k.run("exec", "writer", "--", "sh", "-c", "echo changed >/data/file && sync")
		// The claim and its pod together, as a user applies them: no
		// affinity written, the pod could run on any node.
		k.apply(pvcYAML("restored", "1Gi", "Filesystem", `  dataSource: {apiGroup: snapshot.storage.k8s.io, kind: VolumeSnapshot, name: snap}
`) + "---\n" + podYAML("restore-reader", "restored", "sleep 100000", false))
		k.waitPodReady("restore-reader")
		if got := k.run("exec", "restore-reader", "--", "cat", "/data/file"); got != "hello-dmthin" {
			k.t.Fatalf("restored volume has %q, want the snapshot's hello-dmthin", got)
		}
		k.placement("restored", "restore-reader", sourceNode)
	})

	step("Clone", func(k *k) {
		k.apply(pvcYAML("clone", "1Gi", "Filesystem", `  dataSource: {kind: PersistentVolumeClaim, name: data}
`) + "---\n" + podYAML("clone-reader", "clone", "sleep 100000", false))
		k.waitPodReady("clone-reader")
		if got := k.run("exec", "clone-reader", "--", "cat", "/data/file"); got != "changed" {
			k.t.Fatalf("clone has %q, want the source's current 'changed'", got)
		}
		k.placement("clone", "clone-reader", sourceNode)
	})

	step("OnlineExpansion", func(k *k) {
		before := dfKiB(k, "writer")
		k.run("patch", "pvc", "data", "-p", `{"spec":{"resources":{"requests":{"storage":"2Gi"}}}}`)
		k.eventually(4*time.Minute, "filesystem grows inside the running pod", func() string {
			if after := dfKiB(k, "writer"); after > before+512*1024 {
				return ""
			}
			cond, _ := k.try("get", "pvc", "data", "-o", "jsonpath={.status.capacity.storage} {.status.conditions}")
			return fmt.Sprintf("df %d KiB before; pvc %s", before, cond)
		})
		if got := k.run("exec", "writer", "--", "cat", "/data/file"); got != "changed" {
			k.t.Fatalf("after expansion read %q", got)
		}
	})

	step("RawBlock", func(k *k) {
		k.apply(pvcYAML("block", "64Mi", "Block", ""))
		k.apply(podYAML("block-user", "block", "echo raw-block-data | dd of=/dev/xvda bs=512 conv=sync,fsync 2>/dev/null && sleep 100000", true))
		k.waitPodReady("block-user")
		k.eventually(time.Minute, "block data read back", func() string {
			got, err := k.try("exec", "block-user", "--", "sh", "-c", "dd if=/dev/xvda bs=512 count=1 2>/dev/null | head -n1")
			if err == nil && got == "raw-block-data" {
				return ""
			}
			return fmt.Sprintf("%q %v", got, err)
		})
	})

	step("ReadWriteOncePod", func(k *k) {
		k.apply(strings.Replace(pvcYAML("rwop", "64Mi", "Filesystem", ""), "[ReadWriteOnce]", "[ReadWriteOncePod]", 1))
		k.apply(podYAML("rwop-1", "rwop", "sleep 100000", false))
		k.waitPodReady("rwop-1")
		k.apply(podYAML("rwop-2", "rwop", "sleep 100000", false))
		// The scheduler must keep the second pod off the volume.
		k.eventually(time.Minute, "second pod unschedulable", func() string {
			out, _ := k.try("get", "pod", "rwop-2", "-o", `jsonpath={.status.conditions[?(@.type=="PodScheduled")].status} {.status.conditions[?(@.type=="PodScheduled")].message}`)
			if strings.HasPrefix(out, "False") && strings.Contains(out, "ReadWriteOncePod") {
				return ""
			}
			return out
		})
		time.Sleep(5 * time.Second)
		if phase := k.run("get", "pod", "rwop-2", "-o", "jsonpath={.status.phase}"); phase != "Pending" {
			k.t.Fatalf("second pod of a ReadWriteOncePod volume is %s", phase)
		}
	})

	step("TooLargeGetsEventNothingStuck", func(k *k) {
		// Far past the pool's admission limit: the scheduler (from the
		// CSIStorageCapacity the provisioner publishes) or the driver
		// (ResourceExhausted) refuses it, and says so in an Event.
		k.apply(pvcYAML("huge", "1000Ti", "Filesystem", ""))
		k.apply(podYAML("huge-pod", "huge", "sleep 100000", false))
		k.eventually(3*time.Minute, "an Event saying the volume does not fit", func() string {
			var seen []string
			for _, obj := range []string{"huge-pod", "huge"} {
				out, _ := k.try("get", "events", "--field-selector", "involvedObject.name="+obj,
					"-o", `jsonpath={range .items[*]}{.reason}: {.message}{"\n"}{end}`)
				for _, l := range strings.Split(out, "\n") {
					switch {
					case strings.HasPrefix(l, "FailedScheduling:") && strings.Contains(l, "enough free storage"),
						strings.HasPrefix(l, "ProvisioningNoSpace:"),
						strings.HasPrefix(l, "ProvisioningFailed:") && strings.Contains(l, "ResourceExhausted"):
						return ""
					}
					if l != "" {
						seen = append(seen, l)
					}
				}
			}
			return "events: " + strings.Join(seen, " | ")
		})
		if pv := k.run("get", "pvc", "huge", "-o", "jsonpath={.spec.volumeName}"); pv != "" {
			k.t.Fatalf("a PV (%s) was made for a claim past the pool's limit", pv)
		}
		// Nothing is stuck: both go at once.
		k.run("delete", "pod", "huge-pod", "--wait=true", "--timeout=1m")
		k.run("delete", "pvc", "huge", "--wait=true", "--timeout=1m")
	})

	step("DeleteLeavesNoThinDevice", func(k *k) {
		k.run("delete", "pod", "--all", "--wait=true", "--timeout=5m")
		k.run("delete", "volumesnapshot", "--all", "--wait=true", "--timeout=3m")
		k.run("delete", "pvc", "--all", "--wait=true", "--timeout=3m")
		k.eventually(3*time.Minute, "every PV and snapshot content gone", func() string {
			pvs, _ := k.c.Kubectl(k.ctx, "get", "pv", "-o", "name")
			vscs, _ := k.c.Kubectl(k.ctx, "get", "volumesnapshotcontent", "-o", "name")
			if s := strings.TrimSpace(string(pvs) + string(vscs)); s != "" {
				return s
			}
			return ""
		})
		for _, node := range k.c.NodeNames() {
			k.noThinDevice(node)
		}
	})
	step("DriverRestartKeepsMounts", func(k *k) {
		// Its own volume: the steps before have deleted theirs.
		k.apply(pvcYAML("survivor", "64Mi", "Filesystem", ""))
		k.apply(podYAML("survivor", "survivor", "echo changed >/data/file && sync && sleep 100000", false))
		k.waitPodReady("survivor")
		node := k.run("get", "pod", "survivor", "-o", "jsonpath={.spec.nodeName}")
		old := driverPodOn(k, node)
		if _, err := k.c.Kubectl(k.ctx, "-n", driverNamespace, "delete", "pod", old, "--wait=false"); err != nil {
			k.t.Fatal(err)
		}
		// While the driver is down and coming back, the mounted volume
		// keeps working: the kernel serves it, not the driver.
		for i := 0; i < 5; i++ {
			k.run("exec", "survivor", "--", "sh", "-c", fmt.Sprintf("echo during-%d >>/data/log && sync", i))
			time.Sleep(2 * time.Second)
		}
		k.eventually(4*time.Minute, "driver pod replaced and Ready", func() string {
			out, _ := k.c.Kubectl(k.ctx, "-n", driverNamespace, "get", "pods", "-l", driverPodSelector,
				"--field-selector", "spec.nodeName="+node,
				"-o", `jsonpath={range .items[*]}{.metadata.name}={.status.conditions[?(@.type=="Ready")].status} {end}`)
			for _, f := range strings.Fields(string(out)) {
				name, ready, _ := strings.Cut(f, "=")
				if name != old && ready == "True" {
					return ""
				}
			}
			return string(out)
		})
		// Ready once is not enough: the replacement must stay up (a driver
		// that cannot take its pool back crash-loops after a first Ready).
		time.Sleep(30 * time.Second)
		state := k.c.Kubectl
		out, err := state(k.ctx, "-n", driverNamespace, "get", "pods", "-l", driverPodSelector,
			"--field-selector", "spec.nodeName="+node,
			"-o", `jsonpath={range .items[*].status.containerStatuses[*]}{.name}={.restartCount},{.ready} {end}`)
		if err != nil {
			k.t.Fatal(err)
		}
		for _, f := range strings.Fields(string(out)) {
			if !strings.HasSuffix(f, "=0,true") {
				logs, _ := state(k.ctx, "-n", driverNamespace, "logs", driverPodOn(k, node), "-c", "csi-dmthin", "--previous", "--tail=5")
				k.t.Fatalf("driver pod after the restart: %s (want every container ready with 0 restarts); driver's last log:\n%s", out, logs)
			}
		}
		if got := k.run("exec", "survivor", "--", "sh", "-c", "wc -l </data/log && cat /data/file"); got != "5\nchanged" {
			k.t.Fatalf("after the driver restart read %q", got)
		}
	})

	kc.run("delete", "namespace", kc.ns, "--wait=false")
}

// dfKiB returns the size of /data in the pod, in KiB.
func dfKiB(k *k, pod string) int64 {
	k.t.Helper()
	out := k.run("exec", pod, "--", "df", "-k", "/data")
	lines := strings.Split(out, "\n")
	fields := strings.Fields(lines[len(lines)-1])
	if len(fields) < 2 {
		k.t.Fatalf("df: %q", out)
	}
	n, err := strconv.ParseInt(fields[1], 10, 64)
	if err != nil {
		k.t.Fatalf("df: %q", out)
	}
	return n
}

// driverPodOn returns the name of the driver's pod on node.
func driverPodOn(k *k, node string) string {
	k.t.Helper()
	out, err := k.c.Kubectl(k.ctx, "-n", driverNamespace, "get", "pods", "-l", driverPodSelector,
		"--field-selector", "spec.nodeName="+node, "-o", "jsonpath={.items[0].metadata.name}")
	if err != nil || len(out) == 0 {
		k.t.Fatalf("no driver pod on %s: %v", node, err)
	}
	return string(out)
}

// noThinDevice waits until the driver on node lists no volume but its
// inactive formatted templates, and the node has no active thin device.
func (k *k) noThinDevice(node string) {
	k.t.Helper()
	pod := driverPodOn(k, node)
	// Three minutes: the PVs of the tests before (TestPodStart's) are
	// deleted by the provisioner after their claims, which under the
	// whole run's load took more than the one minute this waited before.
	k.eventually(3*time.Minute, "no thin device in the pool of "+node, func() string {
		list, err := k.c.Kubectl(k.ctx, "-n", driverNamespace, "exec", pod, "-c", "csi-dmthin", "--", "csi-dmthin", "volume", "list")
		if err != nil {
			return err.Error()
		}
		dm, err := k.c.Kubectl(k.ctx, "-n", driverNamespace, "exec", pod, "-c", "csi-dmthin", "--", "dmsetup", "ls", "--target", "thin")
		if err != nil && !strings.Contains(err.Error(), "No devices found") {
			return err.Error()
		}
		if strings.Contains(string(dm), "(") {
			return "active thin devices:\n" + string(dm)
		}
		// Formatted templates stay by design (pkg/csi/templates.go):
		// inactive, not volumes. Anything else is a leak.
		for _, line := range strings.Split(strings.TrimSpace(string(list)), "\n")[1:] {
			f := strings.Fields(line)
			if len(f) == 0 {
				continue
			}
			if len(f) != 8 || f[1] != "template" || f[6] != "false" {
				return "volume list:\n" + string(list)
			}
		}
		return ""
	})
}

// placement checks where a claim's volume and its pod went: the PVC's
// selected node, the node its PV's affinity names and the pod's node must
// be one node, and want when want is not empty. It returns that node.
func (k *k) placement(pvc, pod, want string) string {
	k.t.Helper()
	selected := k.run("get", "pvc", pvc, "-o", `jsonpath={.metadata.annotations.volume\.kubernetes\.io/selected-node}`)
	pv := k.run("get", "pvc", pvc, "-o", "jsonpath={.spec.volumeName}")
	if pv == "" {
		k.t.Fatalf("PVC %s is not bound", pvc)
	}
	pvNode := k.pvNode(pv)
	podNode := k.run("get", "pod", pod, "-o", "jsonpath={.spec.nodeName}")
	if selected != podNode || pvNode != podNode || (want != "" && podNode != want) {
		k.t.Fatalf("PVC %s: selected node %q, its PV %s on %q, pod %s on %q; want all on %q", pvc, selected, pv, pvNode, pod, podNode, cmp.Or(want, podNode))
	}
	k.t.Logf("PVC %s and pod %s on %s", pvc, pod, podNode)
	return podNode
}

// pvNode returns the node a PV's required node affinity names on the
// driver's topology key.
func (k *k) pvNode(pv string) string {
	k.t.Helper()
	out, err := k.c.Kubectl(k.ctx, "get", "pv", pv, "-o",
		`jsonpath={.spec.nodeAffinity.required.nodeSelectorTerms[*].matchExpressions[?(@.key=="`+topologyKey+`")].values}`)
	if err != nil {
		k.t.Fatal(err)
	}
	var values []string
	if err := json.Unmarshal(out, &values); err != nil || len(values) != 1 {
		k.t.Fatalf("PV %s: node affinity on %s is %q, want one node (%v)", pv, topologyKey, out, err)
	}
	return values[0]
}

// topologyKey is the driver's topology label: one value per node.
const topologyKey = "topology.dmthin.csi.dmthin.io/node"
