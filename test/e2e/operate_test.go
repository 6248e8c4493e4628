package e2e

import (
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/csi-dmthin/csi-dmthin/test/e2e/cluster"
)

// Operating pools on the cluster, as an operator does: every node's pools
// in `kubectl get thinpools`, a pool that a pod fills and the operator
// grows while the pod goes on writing, and `helm test`.
// They use valuesFile's pools (default, small, tiny) and the class
// csi-dmthin-tiny.

// driverPodSelector selects the driver's node pods (the chart's helm test
// pods carry the same name label, with another component).
const driverPodSelector = "app.kubernetes.io/name=csi-dmthin,app.kubernetes.io/component=node"

func TestOperateThinPools(t *testing.T) {
	c := requireDriver(t)
	kc := &k{t: t, c: c, ctx: testCtx, ns: driverNamespace}
	pools := []string{"default", "small", "tiny"}
	for _, node := range c.NodeNames() {
		for _, pool := range pools {
			name := node + "." + pool
			kc.eventually(2*time.Minute, "ThinPool "+name, func() string {
				out, err := kc.try("get", "thinpool", name, "-o", "jsonpath={.spec.nodeName} {.spec.pool} {.status.health} {.status.data.size}")
				if err != nil {
					return err.Error()
				}
				if f := strings.Fields(out); len(f) != 4 || f[0] != node || f[1] != pool || f[2] != "Healthy" {
					return out
				}
				return ""
			})
		}
	}
	table := kc.run("get", "thinpools")
	for _, col := range []string{"NODE", "POOL", "HEALTH", "DATA", "DATA%", "META%", "PROVISIONED", "VOLUMES", "SNAPSHOTS"} {
		if !strings.Contains(table, col) {
			t.Errorf("kubectl get thinpools has no %s column:\n%s", col, table)
		}
	}
	for _, node := range c.NodeNames() {
		if out := kc.run("get", "thinpools", "--field-selector", "spec.nodeName="+node, "-o", "name"); strings.Count(out, "\n")+1 != len(pools) {
			t.Errorf("thinpools of node %s: %q, want %d", node, out, len(pools))
		}
	}
	t.Logf("kubectl get thinpools -o wide:\n%s", kc.run("get", "thinpools", "-o", "wide"))
}

// A pod writes a raw block volume of the tiny pool until the pool is out
// of data space and its writes fail; the operator sees it (ThinPool, Node
// Event), grows the pool with `csi-dmthin pool grow`, and the pod's writes
// succeed again, on the same volume, without a restart.
func TestOperateFillAndGrow(t *testing.T) {
	c := requireDriver(t)
	kc := &k{t: t, c: c, ctx: testCtx, ns: "e2e-operate"}
	kc.run("create", "namespace", kc.ns)
	defer kc.try("delete", "namespace", kc.ns, "--wait=false")
	kc.apply(fmt.Sprintf(`apiVersion: v1
kind: PersistentVolumeClaim
metadata: {name: fill}
spec:
  storageClassName: %s
  accessModes: [ReadWriteOnce]
  volumeMode: Block
  resources: {requests: {storage: 1Gi}}
`, tinyClass))
	// 1 MiB at a time; a failed write is retried at the same offset, so the
	// log shows when writes succeed again.
	kc.apply(podYAML("filler", "fill", `i=0; while [ $i -lt 1000 ]; do
  if dd if=/dev/zero of=/dev/xvda bs=1M count=1 seek=$i oflag=direct conv=notrunc 2>/dev/null; then echo "ok $i $(date +%s.%N)"; i=$((i+1)); else echo "fail $i $(date +%s.%N)"; sleep 0.2; fi
done; sleep 100000`, true))
	kc.waitPodReady("filler")
	kc.eventually(10*time.Minute, "the pod's writes fail on the full pool", func() string {
		if strings.Contains(kc.run("logs", "filler", "--tail=5"), "fail") {
			return ""
		}
		return "no failed write yet"
	})
	node := kc.run("get", "pod", "filler", "-o", "jsonpath={.spec.nodeName}")
	name := node + ".tiny"
	kc.eventually(time.Minute, "ThinPool says out of data space", func() string {
		if h, _ := kc.try("get", "thinpool", name, "-o", "jsonpath={.status.health}"); h != "OutOfDataSpace" {
			return h
		}
		return ""
	})
	if ev, _ := kc.try("get", "events", "-A", "--field-selector", "involvedObject.kind=Node,involvedObject.name="+node+",reason=PoolOutOfDataSpace", "-o", "name"); ev == "" {
		t.Errorf("no PoolOutOfDataSpace Event on the Node %s", node)
	}
	start := time.Now()
	grow, err := c.Kubectl(testCtx, "-n", driverNamespace, "exec", driverPodOn(kc, node), "-c", "csi-dmthin", "--",
		"csi-dmthin", "pool", "grow", "tiny", "--data-file-size=2Gi")
	if err != nil {
		t.Fatalf("pool grow: %v\n%s", err, grow)
	}
	t.Logf("pool grow (%v): %s", time.Since(start).Round(time.Millisecond), strings.TrimSpace(string(grow)))
	kc.eventually(time.Minute, "the pod's writes succeed again", func() string {
		log := kc.run("logs", "filler", "--tail=3")
		lines := strings.Split(log, "\n")
		if strings.HasPrefix(lines[len(lines)-1], "ok ") {
			return ""
		}
		return log
	})
	t.Logf("writes succeeded again %v after pool grow was run", time.Since(start).Round(time.Millisecond))
	kc.eventually(time.Minute, "ThinPool healthy and grown", func() string {
		out, _ := kc.try("get", "thinpool", name, "-o", "jsonpath={.status.health} {.status.data.size} {.status.lastGrowth.dataTo}")
		if out == "Healthy 2Gi 2Gi" {
			return ""
		}
		return out
	})
}

// `helm test`: a volume written, snapshotted, restored and read back by the
// chart's test pods.
func TestOperateHelmTest(t *testing.T) {
	c := requireDriver(t)
	start := time.Now()
	// The chart's test pods have their logs printed by helm itself (their
	// hook-output-log-policy): --logs would take every test hook, the
	// claims and the snapshot too, for a pod, and fail.
	out, err := cluster.CombinedOutput(testCtx, c.Bin("helm"), "test", "csi-dmthin", "--kubeconfig", c.Kubeconfig,
		"--namespace", driverNamespace, "--timeout", "6m")
	if err != nil {
		t.Fatalf("helm test: %v\n%s", err, out)
	}
	if !strings.Contains(string(out), "verified") {
		t.Errorf("helm test passed without the verify pod's log:\n%s", out)
	}
	t.Logf("helm test took %v:\n%s", time.Since(start).Round(time.Second), out)
}
