package e2e

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"
)

// copyBenchEnv runs TestCopyThroughput (make bench-e2e sets it, with the
// copy rate unlimited): a measurement, not a check, so make e2e skips it.
const copyBenchEnv = "CSI_DMTHIN_E2E_COPYBENCH"

// copyBenchBytes is the data written to the source volume: the issue's
// 100 MiB in a 1Gi volume.
const copyBenchBytes = 100 << 20

var copyDurationRE = regexp.MustCompile(`moved by this run \(which began at byte \d+\), in ([0-9.a-zµ]+)`)

// TestCopyThroughput measures a copy between the two nodes against a plain
// transfer of the same data between them: 100 MiB of random data in a 1Gi
// volume on node 1, snapshotted, node 1 cordoned, a restore made on node 2
// by the driver's copy (TLS, the mapped blocks only, written to a thin
// device, synced, then both sides read again and hashed); then the same
// file served on node 1 by busybox httpd, fetched over the pod network by
// wget in a pod on node 2 that writes it with dd (O_DIRECT) to a new
// volume and syncs; then a clone of the volume, copied the same way. The table goes to the log and to copybench.md in the run
// directory.
func TestCopyThroughput(t *testing.T) {
	if os.Getenv(copyBenchEnv) == "" {
		t.Skipf("a measurement for make bench-e2e (set %s=1 and an unlimited copy rate)", copyBenchEnv)
	}
	c := requireDriver(t)
	ctx, cancel := context.WithTimeout(testCtx, 30*time.Minute)
	defer cancel()
	nodes := c.NodeNames()
	if len(nodes) < 2 {
		t.Fatalf("nodes %v: the copy needs two", nodes)
	}
	a, b := nodes[0], nodes[1]
	k := &k{t: t, c: c, ctx: ctx, ns: "e2e-copybench"}
	k.run("create", "namespace", k.ns)
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(testCtx, 5*time.Minute)
		defer cancel()
		_, _ = c.Kubectl(ctx, "uncordon", a)
		if _, err := c.Kubectl(ctx, "delete", "namespace", k.ns, "--wait=true", "--timeout=5m"); err != nil {
			t.Errorf("deleting namespace %s: %v", k.ns, err)
		}
	})
	k.apply(pvcYAML("src", "1Gi", "Filesystem", "") + "---\n" +
		pinned(podYAML("src", "src", fmt.Sprintf("head -c %d /dev/urandom >/data/big && sync && touch /data/written && exec httpd -f -p 8080 -h /data", copyBenchBytes), false), a))
	k.waitPodReady("src")
	k.eventually(5*time.Minute, "src's data written", func() string {
		if _, err := k.try("exec", "src", "--", "test", "-e", "/data/written"); err != nil {
			return err.Error()
		}
		return ""
	})
	k.apply(snapshotYAML("snap", "src"))
	k.waitSnapshotReady("snap")

	// The plain transfer first, while node 1 still takes pods: a receiver
	// on node 2 with a new volume, and the sender in the source's pod.
	k.apply(pvcYAML("recv", "1Gi", "Filesystem", "") + "---\n" + pinned(podYAML("recv", "recv", "sleep 100000", false), b))
	k.waitPodReady("recv")
	ip := k.run("get", "pod", "src", "-o", "jsonpath={.status.podIP}")
	start := time.Now()
	k.run("exec", "recv", "--", "sh", "-c",
		fmt.Sprintf("wget -q -O - http://%s:8080/big | dd of=/data/big bs=1M iflag=fullblock oflag=direct 2>/dev/null && sync /data/big", ip))
	plain := time.Since(start)
	if got := k.run("exec", "recv", "--", "sh", "-c", "md5sum /data/big | cut -d' ' -f1"); got != k.run("exec", "src", "--", "sh", "-c", "md5sum /data/big | cut -d' ' -f1") {
		t.Fatalf("the plain transfer's copy differs from the source (md5 %s)", got)
	}

	// The driver's copy: the restore must land on node 2.
	k.run("cordon", a)
	// copyOnto makes claim name from dataSource with a pod, and returns
	// what its copy moved, the copy's own time and the pod's wait.
	copyOnto := func(name, dataSource string) (moved int64, took, ready time.Duration) {
		start := time.Now()
		k.apply(pvcYAML(name, "1Gi", "Filesystem", dataSource) + "---\n" + podYAML(name, name, "sleep 100000", false))
		k.waitPodReady(name)
		ready = time.Since(start)
		k.placement(name, name, b)
		mapped, moved := k.copied(name, a)
		for _, e := range k.events(name) {
			if m := copyDurationRE.FindStringSubmatch(e); m != nil && strings.HasPrefix(e, "Normal CopyCompleted:") {
				took, _ = time.ParseDuration(m[1])
			}
		}
		if took <= 0 || moved != mapped {
			t.Fatalf("%s: %d of %d bytes moved in %s: not one whole run", name, moved, mapped, took)
		}
		return moved, took, ready
	}
	moved, took, toReady := copyOnto("restore", "  dataSource: {apiGroup: snapshot.storage.k8s.io, kind: VolumeSnapshot, name: snap}\n")
	// A clone of the volume itself, as the issue asks: the source node
	// snapshots it for the copy.
	cloneMoved, cloneTook, cloneReady := copyOnto("clone", "  dataSource: {kind: PersistentVolumeClaim, name: src}\n")
	mib := func(n int64, d time.Duration) string {
		return fmt.Sprintf("%.1f MiB/s", float64(n)/(1<<20)/d.Seconds())
	}
	table := fmt.Sprintf(`| transfer, node 1 to node 2 (qemu TCG, pod network over the nodes' bridge) | bytes | time | rate |
|---|---:|---:|---:|
| csi-dmthin copy: the snapshot's mapped blocks over TLS 1.3, written to a thin volume, synced, then read again and hashed on both sides | %d | %s | %s |
| csi-dmthin copy of a clone of the 1Gi volume (the source node snapshots it for the copy), the same way | %d | %s | %s |
| plain: busybox httpd serving the file, wget over TCP \| dd (O_DIRECT) to a new volume, then sync (time includes kubectl exec) | %d | %s | %s |
| restore claim created to its pod Ready (the copy and everything around it) | | %s | |
| clone claim created to its pod Ready | | %s | |
`, moved, took.Round(10*time.Millisecond), mib(moved, took), cloneMoved, cloneTook.Round(10*time.Millisecond), mib(cloneMoved, cloneTook),
		int64(copyBenchBytes), plain.Round(10*time.Millisecond), mib(copyBenchBytes, plain), toReady.Round(time.Second), cloneReady.Round(time.Second))
	t.Log("\n" + table)
	if testArt != nil {
		if err := os.WriteFile(filepath.Join(testArt.RunDir, "copybench.md"), []byte(table), 0o644); err != nil {
			t.Error(err)
		}
	}
}
