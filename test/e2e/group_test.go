package e2e

import (
	"context"
	"fmt"
	"strconv"
	"strings"
	"testing"
	"time"
)

// TestGroupSnapshot takes a VolumeGroupSnapshot of two volumes while a pod
// writes to both without pause, and checks that the restored pair is one
// point in time. The writer appends n to volume a, then n to volume b, for
// n = 1, 2, ...; at any instant the last numbers on disk are equal or a's is
// b's plus one. Snapshots of the two taken one after the other, with the
// writer running between them, break that: b's number would run ahead. The
// group goes through the snapshot-controller (distributed snapshotting),
// the driver's group content labelling and the csi-snapshotter's group
// calls.
func TestGroupSnapshot(t *testing.T) {
	c := requireDriver(t)
	ctx, cancel := context.WithTimeout(testCtx, 15*time.Minute)
	defer cancel()
	kc := &k{t: t, c: c, ctx: ctx, ns: "e2e-group"}
	kc.run("create", "namespace", kc.ns)
	defer kc.try("delete", "namespace", kc.ns, "--wait=false")

	for _, name := range []string{"ga", "gb"} {
		kc.apply(fmt.Sprintf(`apiVersion: v1
kind: PersistentVolumeClaim
metadata: {name: %s, labels: {group: g1}}
spec:
  storageClassName: %s
  accessModes: [ReadWriteOnce]
  resources: {requests: {storage: 1Gi}}
`, name, storageClass))
	}
	kc.apply(twoVolumePod("writer", "ga", "gb", `echo a > /a/who; echo b > /b/who; sync
n=0; while true; do n=$((n+1)); echo $n >> /a/seq; echo $n >> /b/seq; done`))
	kc.waitPodReady("writer")
	node := kc.run("get", "pod", "writer", "-o", "jsonpath={.spec.nodeName}")
	kc.eventually(2*time.Minute, "the writer past 100", func() string {
		out, _ := kc.try("exec", "writer", "--", "tail", "-n1", "/b/seq")
		if n, err := strconv.Atoi(strings.TrimSpace(out)); err != nil || n < 100 {
			return "b at " + out
		}
		return ""
	})

	class := "csi-dmthin"
	start := time.Now()
	kc.apply(fmt.Sprintf(`apiVersion: groupsnapshot.storage.k8s.io/v1
kind: VolumeGroupSnapshot
metadata: {name: g1}
spec:
  volumeGroupSnapshotClassName: %s
  source: {selector: {matchLabels: {group: g1}}}
`, class))
	kc.eventually(5*time.Minute, "VolumeGroupSnapshot g1 readyToUse", func() string {
		out, _ := kc.try("get", "volumegroupsnapshot", "g1", "-o", "jsonpath={.status.readyToUse} {.status.error.message}")
		if strings.HasPrefix(out, "true") {
			return ""
		}
		return out
	})
	t.Logf("VolumeGroupSnapshot g1 of 2 volumes on %s ready in %s", node, time.Since(start).Round(100*time.Millisecond))
	content := kc.run("get", "volumegroupsnapshot", "g1", "-o", "jsonpath={.status.boundVolumeGroupSnapshotContentName}")
	if label, _ := kc.try("get", "volumegroupsnapshotclass", class, "-o", `jsonpath={.metadata.labels.snapshot\.storage\.kubernetes\.io/managed-by}`); label != node {
		t.Errorf("VolumeGroupSnapshotClass %s is labelled for %q, want the node that took the group, %s", class, label, node)
	}
	if label, _ := kc.try("get", "volumegroupsnapshotcontent", content, "-o", `jsonpath={.metadata.labels.snapshot\.storage\.kubernetes\.io/managed-by}`); label != node {
		t.Errorf("VolumeGroupSnapshotContent %s is labelled for %q, want the volumes' node %s", content, label, node)
	}
	kc.run("delete", "pod", "writer", "--wait=true")

	// The group's member VolumeSnapshots are the only ones in the namespace.
	members := strings.Fields(kc.run("get", "volumesnapshot", "-o", "jsonpath={.items[*].metadata.name}"))
	if len(members) != 2 {
		t.Fatalf("the group has %d member VolumeSnapshots %q, want 2", len(members), members)
	}
	for i, snap := range members {
		kc.waitSnapshotReady(snap)
		kc.apply(fmt.Sprintf(`apiVersion: v1
kind: PersistentVolumeClaim
metadata: {name: r%d}
spec:
  storageClassName: %s
  accessModes: [ReadWriteOnce]
  resources: {requests: {storage: 1Gi}}
  dataSource: {apiGroup: snapshot.storage.k8s.io, kind: VolumeSnapshot, name: %s}
`, i, storageClass, snap))
	}
	kc.apply(twoVolumePod("reader", "r0", "r1", `for v in a b; do echo "$(cat /$v/who) $(tail -n1 /$v/seq)"; done; sleep 100000`))
	kc.waitPodReady("reader")
	if got := kc.run("get", "pod", "reader", "-o", "jsonpath={.spec.nodeName}"); got != node {
		t.Errorf("the restores were mounted on %s, want the group's node %s", got, node)
	}
	last := map[string]int{}
	kc.eventually(time.Minute, "the reader's output", func() string {
		log, _ := kc.try("logs", "reader")
		for _, line := range strings.Split(log, "\n") {
			if f := strings.Fields(line); len(f) == 2 {
				if n, err := strconv.Atoi(f[1]); err == nil {
					last[f[0]] = n
				}
			}
		}
		if len(last) != 2 {
			return log
		}
		return ""
	})
	a, okA := last["a"]
	b, okB := last["b"]
	if !okA || !okB || a < 100 || (a != b && a != b+1) {
		t.Fatalf("restored group: a at %d, b at %d (from %v): not one point in time (want a = b or a = b+1, past 100)", a, b, last)
	}
	t.Logf("restored group: a at %d, b at %d", a, b)

	kc.run("delete", "pod", "reader", "--wait=true")
	kc.run("delete", "pvc", "r0", "r1", "--wait=true")
	kc.run("delete", "volumegroupsnapshot", "g1", "--wait=true")
	kc.eventually(2*time.Minute, "the group's snapshots deleted", func() string {
		out, _ := kc.try("get", "volumesnapshotcontent", "-o", "jsonpath={.items[*].spec.volumeSnapshotRef.namespace}")
		if strings.Contains(out, kc.ns) {
			return "VolumeSnapshotContents left: " + out
		}
		return ""
	})
	kc.run("delete", "pvc", "ga", "gb", "--wait=true")
	kc.waitNoPVFor("ga", "gb", "r0", "r1")
}

// twoVolumePod is a pod with claim a at /a and claim b at /b.
func twoVolumePod(name, a, b, script string) string {
	return podWithVolumes(name, script, `volumeMounts: [{name: a, mountPath: /a}, {name: b, mountPath: /b}]`,
		fmt.Sprintf(`[{name: a, persistentVolumeClaim: {claimName: %s}}, {name: b, persistentVolumeClaim: {claimName: %s}}]`, a, b))
}
