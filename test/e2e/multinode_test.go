package e2e

import (
	"context"
	"encoding/json"
	"fmt"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"k8s.io/apimachinery/pkg/api/resource"

	"github.com/csi-dmthin/csi-dmthin/test/e2e/cluster"
)

// TestMultiNode runs the scenarios that only a cluster of several nodes can
// get wrong, each checking where things went through the PV's node affinity,
// the PVC's selected node and the pod's spec.nodeName: restores and clones
// follow their source whichever node holds it; capacity decides which node
// a new volume goes to; a restore whose source node cannot take it says so
// and makes nothing; a node powered off takes nothing of the other node's
// with it, keeps its own volumes, and gives back what was synced.
func TestMultiNode(t *testing.T) {
	c := requireDriver(t)
	ctx, cancel := context.WithTimeout(testCtx, 40*time.Minute)
	defer cancel()
	nodes := c.NodeNames()
	if len(nodes) < 2 {
		t.Fatalf("nodes %v: these scenarios need two", nodes)
	}
	a, b := nodes[0], nodes[1]
	kc := &k{t: t, c: c, ctx: ctx, ns: "e2e-multinode"}
	kc.run("create", "namespace", kc.ns)
	// Whatever happens, nothing of this test outlives it: the chains after
	// it count every PV and thin device in the cluster.
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(testCtx, 5*time.Minute)
		defer cancel()
		_, _ = c.Kubectl(ctx, "uncordon", a)
		if _, err := c.Kubectl(ctx, "delete", "namespace", kc.ns, "--wait=true", "--timeout=5m"); err != nil {
			t.Errorf("deleting namespace %s: %v", kc.ns, err)
		}
	})
	step := stepper(t, c, ctx, kc.ns)

	// Sources on B and on A: a default that happened to pick one node
	// cannot pass both.
	sources := []string{b, a}
	snapOn := map[string]string{} // node -> a snapshot whose source is there
	step("RestoreAndCloneFollowTheSource", func(k *k) {
		var docs []string
		for i, n := range sources {
			docs = append(docs, pvcYAML(fmt.Sprintf("src-%d", i), "1Gi", "Filesystem", ""),
				pinned(podYAML(fmt.Sprintf("src-%d", i), fmt.Sprintf("src-%d", i), "echo from-"+n+" >/data/file && sync && sleep 100000", false), n))
		}
		k.apply(strings.Join(docs, "---\n"))
		docs = nil
		for i, n := range sources {
			name := fmt.Sprintf("src-%d", i)
			k.waitPodReady(name)
			k.placement(name, name, n)
			docs = append(docs, snapshotYAML(fmt.Sprintf("snap-%d", i), name))
			snapOn[n] = fmt.Sprintf("snap-%d", i)
		}
		k.apply(strings.Join(docs, "---\n"))
		for i := range sources {
			k.waitSnapshotReady(fmt.Sprintf("snap-%d", i))
		}
		// The sources change after the snapshot: a restore must have the
		// old data, a clone the new.
		docs = nil
		for i, n := range sources {
			k.run("exec", fmt.Sprintf("src-%d", i), "--", "sh", "-c", "echo changed-on-"+n+" >/data/file && sync")
			// Each claim and its pod together, as a user applies them; no
			// pod says where to run.
			docs = append(docs,
				pvcYAML(fmt.Sprintf("restore-%d", i), "1Gi", "Filesystem", fmt.Sprintf("  dataSource: {apiGroup: snapshot.storage.k8s.io, kind: VolumeSnapshot, name: snap-%d}\n", i)),
				podYAML(fmt.Sprintf("restore-%d", i), fmt.Sprintf("restore-%d", i), "sleep 100000", false),
				pvcYAML(fmt.Sprintf("clone-%d", i), "1Gi", "Filesystem", fmt.Sprintf("  dataSource: {kind: PersistentVolumeClaim, name: src-%d}\n", i)),
				podYAML(fmt.Sprintf("clone-%d", i), fmt.Sprintf("clone-%d", i), "sleep 100000", false))
		}
		k.apply(strings.Join(docs, "---\n"))
		for i, n := range sources {
			for _, w := range []struct{ name, data string }{
				{fmt.Sprintf("restore-%d", i), "from-" + n},
				{fmt.Sprintf("clone-%d", i), "changed-on-" + n},
			} {
				k.waitPodReady(w.name)
				k.placement(w.name, w.name, n)
				if got := k.run("exec", w.name, "--", "cat", "/data/file"); got != w.data {
					k.t.Errorf("%s reads %q, want %q", w.name, got, w.data)
				}
			}
		}
	})

	step("CapacityDecidesTheNode", func(k *k) {
		// The small pools admit 3Gi once each (4Gi, overprovisioning 1x,
		// 10% floor): after the first 3Gi claim lands on a node, only the
		// other can take the second, and neither the third. Block volumes:
		// no formatted template takes a share of the limit.
		const size = 3 << 30
		k.eventually(2*time.Minute, "every node's small pool reported able to take 3Gi", func() string {
			for _, n := range nodes {
				if got := k.capacity(smallClass, n); got < size {
					return fmt.Sprintf("%s: %d bytes", n, got)
				}
			}
			return ""
		})
		var used []string
		for i := 1; i <= 2; i++ {
			name := fmt.Sprintf("cap-%d", i)
			k.apply(classPVC(pvcYAML(name, "3Gi", "Block", ""), smallClass) + "---\n" + podYAML(name, name, "sleep 100000", true))
			k.waitPodReady(name)
			n := k.placement(name, name, "")
			if slices.Contains(used, n) {
				k.t.Fatalf("%s went to %s, whose small pool already holds a 3Gi volume", name, n)
			}
			// Never tried on a node that could not take it first: no
			// provisioning failure on the claim.
			for _, e := range k.events(name) {
				if strings.Contains(e, "ProvisioningFailed") {
					k.t.Errorf("%s: %s", name, e)
				}
			}
			used = append(used, n)
			k.eventually(time.Minute, "the capacity of "+n+" drops below 3Gi", func() string {
				if got := k.capacity(smallClass, n); got >= size {
					return fmt.Sprintf("%d bytes", got)
				}
				return ""
			})
		}
		// Neither can take it now: the scheduler says so, nothing is made,
		// and nothing is stuck.
		k.apply(classPVC(pvcYAML("cap-3", "3Gi", "Block", ""), smallClass) + "---\n" + podYAML("cap-3", "cap-3", "sleep 100000", true))
		k.eventually(2*time.Minute, "an Event saying no node has the storage", func() string {
			for _, e := range k.events("cap-3") {
				if strings.Contains(e, "FailedScheduling") && strings.Contains(e, "enough free storage") {
					return ""
				}
			}
			return strings.Join(k.events("cap-3"), " | ")
		})
		if pv := k.run("get", "pvc", "cap-3", "-o", "jsonpath={.spec.volumeName}"); pv != "" {
			k.t.Fatalf("cap-3 got PV %s, with no room on any node", pv)
		}
		k.run("delete", "pod", "cap-1", "cap-2", "cap-3", "--wait=true", "--timeout=2m")
		k.run("delete", "pvc", "cap-1", "cap-2", "cap-3", "--wait=true", "--timeout=2m")
		k.waitNoPVFor("cap-1", "cap-2", "cap-3")
	})

	step("RestoreCopiedWhenSourcePoolIsFull", func(k *k) {
		// A 1Gi volume and its 1Gi snapshot on B's small pool leave at most
		// 2Gi of its 4Gi limit: a 3Gi restore cannot be made on B. The
		// controller leaves it to the scheduler, which picks A (its small
		// pool is empty), and A's driver copies the snapshot from B.
		k.apply(classPVC(pvcYAML("full-src", "1Gi", "Filesystem", ""), smallClass) + "---\n" +
			pinned(podYAML("full-src", "full-src", "echo small >/data/file && sync && sleep 100000", false), b))
		k.waitPodReady("full-src")
		k.placement("full-src", "full-src", b)
		k.apply(snapshotYAML("full-snap", "full-src"))
		k.waitSnapshotReady("full-snap")
		// The controller decides from B's ThinPool, which B writes at most
		// once a minute for a change of use alone: until it says B cannot
		// take 3Gi, the controller would steer the restore to B, B's
		// provisioner would fail and clear it, and the pod would wait out
		// the scheduler's backoff (up to 5 min) before its copy.
		k.eventually(3*time.Minute, "node "+b+"'s small ThinPool reporting less than 3Gi available", func() string {
			out, err := k.try("get", "thinpools", "-o", `jsonpath={range .items[?(@.spec.nodeName=="`+b+`")]}{.spec.pool} {.status.available}{"\n"}{end}`)
			if err != nil {
				return err.Error()
			}
			for _, l := range strings.Split(out, "\n") {
				if pool, avail, ok := strings.Cut(l, " "); ok && pool == "small" {
					if q, err := resource.ParseQuantity(avail); err == nil && q.Value() < 3<<30 {
						return ""
					}
					return l
				}
			}
			return out
		})
		start := time.Now()
		k.apply(classPVC(pvcYAML("full-restore", "3Gi", "Filesystem", "  dataSource: {apiGroup: snapshot.storage.k8s.io, kind: VolumeSnapshot, name: full-snap}\n"), smallClass) +
			"---\n" + podYAML("full-restore", "full-restore", "sleep 100000", false))
		k.waitEvent("full-restore", "Normal", "RestoreCopiedFromSourceNode", b, start)
		k.waitPodReady("full-restore")
		k.placement("full-restore", "full-restore", a)
		if got := k.run("exec", "full-restore", "--", "cat", "/data/file"); got != "small" {
			k.t.Errorf("full-restore reads %q, want small", got)
		}
		k.copied("full-restore", b)
		// Deleted without waiting: a snapshot's deletion waits for its
		// content's, by the node's csi-snapshotter: minutes under TCG,
		// which the steps below overlap. NothingLeftBehind checks it all
		// went.
		k.run("delete", "pod", "full-restore", "full-src", "--wait=false")
		k.run("delete", "pvc", "full-restore", "full-src", "--wait=false")
		k.run("delete", "volumesnapshot", "full-snap", "--wait=false")
	})

	step("RestoreCopiedWhenSourceNodeIsCordoned", func(k *k) {
		// 32 MiB written to a 1Gi volume on A, snapshotted; A cordoned. The
		// restore lands on B with the data, and the copy moves the blocks
		// the snapshot maps, the 32 MiB and the filesystem's own, not 1Gi.
		// The driver on the copy's target, and then on its source, is
		// killed while the copy runs: it resumes and finishes. (make
		// bench-e2e copies a restore and a clone of 100 MiB of a 1Gi
		// volume and times them; TestCopyKernel in pkg/csi copies a clone
		// on the real kernel.)
		k.apply(pvcYAML("big-src", "1Gi", "Filesystem", "") + "---\n" +
			pinned(podYAML("big-src", "big-src", "head -c 33554432 /dev/urandom >/data/big && sync && md5sum /data/big | cut -d' ' -f1 >/data/big.md5 && sync && sleep 100000", false), a))
		k.waitPodReady("big-src")
		k.eventually(3*time.Minute, "big-src's 32 MiB written", func() string {
			out, _ := k.try("exec", "big-src", "--", "cat", "/data/big.md5")
			if len(out) == 32 {
				return ""
			}
			return "md5: " + out
		})
		want := k.run("exec", "big-src", "--", "cat", "/data/big.md5")
		k.apply(snapshotYAML("big-snap", "big-src"))
		k.waitSnapshotReady("big-snap")
		k.run("cordon", a)
		defer func() { _, _ = k.try("uncordon", a) }()
		// One restore, two kills: its target's driver once part of the
		// copy is durable, then its source's once more of it is.
		start := time.Now()
		k.apply(pvcYAML("big-restore", "1Gi", "Filesystem", "  dataSource: {apiGroup: snapshot.storage.k8s.io, kind: VolumeSnapshot, name: big-snap}\n") +
			"---\n" + podYAML("big-restore", "big-restore", "sleep 100000", false))
		k.waitEvent("big-restore", "Normal", "CopyStarted", a, start)
		durable := int64(0)
		for _, kill := range []string{b, a} {
			// `csi-dmthin copy list` on the target says how far the copy
			// is durable: the kill comes once that is past where the last
			// kill found it, so each restart has something to resume.
			k.eventually(4*time.Minute, fmt.Sprintf("big-restore's copy durable past byte %d on %s", durable, b), func() string {
				out, err := k.c.Kubectl(k.ctx, "-n", driverNamespace, "exec", driverPodOn(k, b), "-c", "csi-dmthin", "--", "csi-dmthin", "copy", "list")
				if err != nil {
					return err.Error()
				}
				for _, l := range strings.Split(string(out), "\n") {
					f := strings.Fields(l)
					if len(f) < 6 || f[1] != k.ns+"/big-restore" || f[4] != "copying" {
						continue
					}
					if n, _ := strconv.ParseInt(f[5], 10, 64); n > durable {
						durable = n
						k.t.Logf("big-restore: %s", l)
						return ""
					}
				}
				return string(out)
			})
			pod := driverPodOn(k, kill)
			k.t.Logf("big-restore: %s after the claim; killing the driver on %s (%s)", time.Since(start).Round(time.Second), kill, pod)
			k.run("-n", driverNamespace, "delete", "pod", pod, "--grace-period=0", "--force", "--wait=false")
		}
		k.waitPodReady("big-restore")
		k.placement("big-restore", "big-restore", b)
		if got := k.run("exec", "big-restore", "--", "sh", "-c", "md5sum /data/big | cut -d' ' -f1"); got != want {
			k.t.Errorf("big-restore: /data/big has md5 %s, want %s", got, want)
		}
		mapped, moved, began := k.copiedFrom("big-restore", a)
		if mapped < 32<<20 || mapped > 64<<20 {
			k.t.Errorf("big-restore: the copy says the snapshot maps %d bytes; want the 32 MiB and the filesystem's own blocks, far from 1Gi", mapped)
		}
		if moved >= mapped || began < durable {
			k.t.Errorf("big-restore: the run that finished moved %d of %d bytes from byte %d, and byte %d was durable at the second kill: it did not resume", moved, mapped, began, durable)
		}
		k.t.Logf("big-restore: %d bytes mapped, %d moved by the run that finished, %s in all", mapped, moved, time.Since(start).Round(time.Second))
		k.run("uncordon", a)
		k.copyTokens(a, b, "big-snap")
		k.run("delete", "pod", "big-restore", "big-src", "--wait=false")
		k.run("delete", "pvc", "big-restore", "big-src", "--wait=false")
		k.run("delete", "volumesnapshot", "big-snap", "--wait=false")
	})

	step("PowerCutOnOneNode", func(k *k) {
		k.powerCut(a, b)
	})

	step("NothingLeftBehind", func(k *k) {
		// What the restore steps deleted in the background: the
		// snapshots, their contents and the volumes.
		for _, snap := range []string{"full-snap", "big-snap"} {
			k.eventually(5*time.Minute, "snapshot "+snap+" and its content deleted", func() string {
				out, err := k.try("get", "volumesnapshot", snap, "-o", "name")
				switch {
				case err == nil:
					return out + " still there"
				case !strings.Contains(err.Error()+out, "NotFound"):
					return err.Error()
				}
				contents, err := k.c.Kubectl(k.ctx, "get", "volumesnapshotcontents", "-o",
					`jsonpath={range .items[?(@.spec.volumeSnapshotRef.name=="`+snap+`")]}{.metadata.name} {.spec.volumeSnapshotRef.namespace}{"\n"}{end}`)
				if err != nil {
					return err.Error()
				}
				for _, l := range strings.Split(strings.TrimSpace(string(contents)), "\n") {
					if name, ns, _ := strings.Cut(l, " "); ns == k.ns {
						return "content " + name + " still there"
					}
				}
				return ""
			})
		}
		k.waitNoPVFor("full-restore", "full-src", "big-restore", "big-src")
	})
}

// powerCut cuts lost's power while a pod there writes with fsync, and
// checks that kept's pods and volumes carry on, that lost's pods, once
// deleted, wait for their volumes' node without anything of theirs deleted
// or made elsewhere, and that lost, booted again on the same disks, runs
// them again with every synced write.
func (k *k) powerCut(lost, kept string) {
	k.t.Helper()
	// Each line is appended and fsync'd (busybox sync FILE) before the
	// loop says so on stdout.
	const writer = `i=0; while :; do i=$((i+1)); echo line-$i >>/data/log; sync /data/log || exit 1; echo synced $i; sleep 0.2; done`
	k.apply(strings.Join([]string{
		pvcYAML("writer", "1Gi", "Filesystem", ""), pinned(podYAML("writer", "writer", writer, false), lost),
		pvcYAML("steady", "1Gi", "Filesystem", ""), pinned(podYAML("steady", "steady", "echo before >/data/file && sync && sleep 100000", false), kept),
	}, "---\n"))
	k.waitPodReady("writer")
	k.waitPodReady("steady")
	k.placement("writer", "writer", lost)
	k.placement("steady", "steady", kept)
	writerPV := k.run("get", "pvc", "writer", "-o", "jsonpath={.spec.volumeName}")
	var synced int
	k.eventually(2*time.Minute, "the writer has synced 20 lines", func() string {
		synced = lastSynced(k.run("logs", "writer"))
		if synced < 20 {
			return fmt.Sprintf("%d synced", synced)
		}
		return ""
	})
	// The last count read before the cut is a floor: every line up to it
	// was synced before the power went.
	synced = lastSynced(k.run("logs", "writer"))
	pvsBefore := k.pvNames()
	cut := time.Now()
	if err := k.c.PowerOff(lost); err != nil {
		k.t.Fatal(err)
	}
	// A failure below must not leave the node off for the tests after.
	off := true
	defer func() {
		if off {
			if err := k.c.PowerOn(k.ctx, lost); err != nil {
				k.t.Errorf("powering %s on again: %v", lost, err)
			}
		}
	}()
	k.t.Logf("%s powered off after %d synced lines", lost, synced)
	// What runs on the other node carries on.
	k.run("exec", "steady", "--", "sh", "-c", "echo during >>/data/file && sync /data/file")
	k.eventually(3*time.Minute, lost+" NotReady", func() string {
		if s := k.run("get", "node", lost, "-o", `jsonpath={.status.conditions[?(@.type=="Ready")].status}`); s != "True" {
			return ""
		}
		return "still Ready"
	})
	k.t.Logf("%s NotReady %s after the cut", lost, time.Since(cut).Round(time.Second))
	// And new volumes are made there, while the scheduler keeps off the
	// lost node.
	k.apply(pvcYAML("during", "1Gi", "Filesystem", "") + "---\n" + podYAML("during", "during", "echo new >/data/file && sync && sleep 100000", false))
	k.waitPodReady("during")
	k.placement("during", "during", kept)
	// The pod on the lost node is deleted (it cannot end by itself there)
	// and made again without a node: its volume holds it to lost.
	k.run("delete", "pod", "writer", "--force", "--grace-period=0")
	k.eventually(time.Minute, "the writer pod gone", func() string {
		if out, _ := k.try("get", "pod", "writer", "-o", "name"); out != "" {
			return out
		}
		return ""
	})
	k.apply(podYAML("writer", "writer", "sleep 100000", false))
	// The scheduler's words for a bound volume on another node
	// (volumebinding's ErrReasonNodeConflict).
	k.eventually(2*time.Minute, "the writer unschedulable, for its volume's node", func() string {
		out := k.run("get", "pod", "writer", "-o", `jsonpath={.status.phase} {.status.conditions[?(@.type=="PodScheduled")].reason}: {.status.conditions[?(@.type=="PodScheduled")].message}`)
		if strings.HasPrefix(out, "Pending Unschedulable") && strings.Contains(out, "didn't match PersistentVolume's node affinity") {
			return ""
		}
		return out
	})
	// And stays so, with nothing of its deleted or made again elsewhere.
	time.Sleep(30 * time.Second)
	if phase := k.run("get", "pod", "writer", "-o", "jsonpath={.status.phase} {.spec.nodeName}"); phase != "Pending" {
		k.t.Fatalf("writer pod %q while its node is off", phase)
	}
	if pv := k.run("get", "pvc", "writer", "-o", "jsonpath={.spec.volumeName} {.status.phase}"); pv != writerPV+" Bound" {
		k.t.Fatalf("writer's claim is %q, want still bound to %s", pv, writerPV)
	}
	during := k.run("get", "pvc", "during", "-o", "jsonpath={.spec.volumeName}")
	if got, want := k.pvNames(), append(slices.Clone(pvsBefore), during); !sameSet(got, want) {
		k.t.Fatalf("PVs while %s is off: %v, want %v (the ones before and the new one on %s)", lost, got, want, kept)
	}
	off = false
	if err := k.c.PowerOn(k.ctx, lost); err != nil {
		k.t.Fatal(err)
	}
	k.t.Logf("%s Ready again %s after the cut", lost, time.Since(cut).Round(time.Second))
	k.waitPodReady("writer")
	k.placement("writer", "writer", lost)
	log := strings.Split(k.run("exec", "writer", "--", "cat", "/data/log"), "\n")
	if len(log) < synced {
		k.t.Fatalf("after the power cut the log has %d lines, want at least the %d synced", len(log), synced)
	}
	for i := 0; i < synced; i++ {
		if want := "line-" + strconv.Itoa(i+1); log[i] != want {
			k.t.Fatalf("after the power cut line %d is %q, want %q", i+1, log[i], want)
		}
	}
	k.t.Logf("after the power cut: %d lines read back, %d of them synced before it", len(log), synced)
	if got := k.run("exec", "steady", "--", "cat", "/data/file"); got != "before\nduring" {
		k.t.Errorf("steady reads %q", got)
	}
	// Both pools came back healthy on the rebooted node.
	status := k.driverExec(lost, "csi-dmthin", "pool", "status")
	healthy := map[string]bool{}
	for _, l := range strings.Split(status, "\n") {
		if f := strings.Fields(l); len(f) > 1 && f[1] == "ok" {
			healthy[f[0]] = true
		}
	}
	if !healthy["default"] || !healthy["small"] {
		k.t.Errorf("pool status on %s after the reboot, want default and small ok:\n%s", lost, status)
	}
}

// lastSynced returns the highest n of the "synced n" lines in a log.
func lastSynced(log string) int {
	last := 0
	for _, l := range strings.Split(log, "\n") {
		if v, ok := strings.CutPrefix(strings.TrimSpace(l), "synced "); ok {
			if n, err := strconv.Atoi(v); err == nil && n > last {
				last = n
			}
		}
	}
	return last
}

func sameSet(a, b []string) bool {
	a, b = slices.Clone(a), slices.Clone(b)
	slices.Sort(a)
	slices.Sort(b)
	return slices.Equal(a, b)
}

// stepper returns a function that runs one named step as a subtest with
// its own k, logs and records its time, and stops the test at the first
// failed step (each builds on the ones before).
func stepper(t *testing.T, c *cluster.Cluster, ctx context.Context, ns string) func(string, func(*k)) {
	return func(name string, f func(k *k)) {
		start := time.Now()
		ok := t.Run(name, func(t *testing.T) { f(&k{t: t, c: c, ctx: ctx, ns: ns}) })
		took := time.Since(start).Round(100 * time.Millisecond)
		t.Logf("%s: %s", name, took)
		if testArt != nil {
			testArt.Timings[t.Name()+"/"+name] = took.String()
		}
		if !ok {
			t.FailNow()
		}
	}
}

// pinned puts a node selector on a pod: for the sources the scenarios need
// on a given node. The pods whose placement is under test never have one.
func pinned(podYAML, node string) string {
	return strings.Replace(podYAML, "spec:\n", "spec:\n  nodeSelector: {kubernetes.io/hostname: "+node+"}\n", 1)
}

// classPVC gives a claim another class than the default one.
func classPVC(pvcYAML, class string) string {
	return strings.Replace(pvcYAML, "storageClassName: "+storageClass+"\n", "storageClassName: "+class+"\n", 1)
}

func snapshotYAML(name, pvc string) string {
	return fmt.Sprintf(`apiVersion: snapshot.storage.k8s.io/v1
kind: VolumeSnapshot
metadata: {name: %s}
spec:
  volumeSnapshotClassName: %s
  source: {persistentVolumeClaimName: %s}
`, name, snapshotClass, pvc)
}

func (k *k) waitSnapshotReady(name string) {
	k.t.Helper()
	k.eventually(3*time.Minute, "snapshot "+name+" readyToUse", func() string {
		out, _ := k.try("get", "volumesnapshot", name, "-o", "jsonpath={.status.readyToUse} {.status.error.message}")
		if strings.HasPrefix(out, "true") {
			return ""
		}
		return out
	})
}

// events returns the Events of the namespace's objects of that name, as
// "<type> <reason>: <message>" lines.
func (k *k) events(name string) []string {
	out, _ := k.try("get", "events", "--field-selector", "involvedObject.name="+name,
		"-o", `jsonpath={range .items[*]}{.type} {.reason}: {.message}{"\n"}{end}`)
	var lines []string
	for _, l := range strings.Split(out, "\n") {
		if l != "" {
			lines = append(lines, l)
		}
	}
	return lines
}

// waitWarning waits, a minute at most from start, for a Warning Event on
// the PVC that names node, and logs it.
func (k *k) waitWarning(pvc, node string, start time.Time) {
	k.t.Helper()
	k.eventually(time.Minute-time.Since(start), "a Warning on PVC "+pvc+" naming "+node, func() string {
		var seen []string
		out, _ := k.try("get", "events", "--field-selector", "involvedObject.kind=PersistentVolumeClaim,involvedObject.name="+pvc+",type=Warning",
			"-o", `jsonpath={range .items[*]}{.reason}: {.message}{"\n"}{end}`)
		for _, l := range strings.Split(out, "\n") {
			if strings.Contains(l, node) && !strings.HasPrefix(l, "ProvisioningFailed:") {
				k.t.Logf("PVC %s after %s: %s", pvc, time.Since(start).Round(time.Second), l)
				return ""
			}
			if l != "" {
				seen = append(seen, l)
			}
		}
		return "warnings: " + strings.Join(seen, " | ")
	})
}

// nothingMade checks, for a few seconds, that a claim got no volume.
func (k *k) nothingMade(pvc string) {
	k.t.Helper()
	for i := 0; i < 5; i++ {
		if pv := k.run("get", "pvc", pvc, "-o", "jsonpath={.spec.volumeName}"); pv != "" {
			k.t.Fatalf("PVC %s got PV %s", pvc, pv)
		}
		for _, pv := range k.pvNames() {
			if claim, _ := k.c.Kubectl(k.ctx, "get", "pv", pv, "-o", "jsonpath={.spec.claimRef.name}"); string(claim) == pvc {
				k.t.Fatalf("PV %s was made for PVC %s", pv, pvc)
			}
		}
		time.Sleep(2 * time.Second)
	}
}

// pvNames lists the PVs of this namespace's claims.
func (k *k) pvNames() []string {
	k.t.Helper()
	out, err := k.c.Kubectl(k.ctx, "get", "pv", "-o", `jsonpath={range .items[*]}{.metadata.name} {.spec.claimRef.namespace}{"\n"}{end}`)
	if err != nil {
		k.t.Fatal(err)
	}
	var names []string
	for _, l := range strings.Split(string(out), "\n") {
		if pv, ns, _ := strings.Cut(l, " "); ns == k.ns {
			names = append(names, pv)
		}
	}
	return names
}

// waitNoPVFor waits until no PV is bound to any of the namespace's named
// claims (their volumes deleted).
func (k *k) waitNoPVFor(claims ...string) {
	k.t.Helper()
	k.eventually(2*time.Minute, "the PVs of "+strings.Join(claims, ", ")+" deleted", func() string {
		out, _ := k.c.Kubectl(k.ctx, "get", "pv", "-o", `jsonpath={range .items[*]}{.metadata.name} {.spec.claimRef.namespace}/{.spec.claimRef.name}{"\n"}{end}`)
		for _, l := range strings.Split(string(out), "\n") {
			pv, ref, _ := strings.Cut(l, " ")
			ns, claim, _ := strings.Cut(ref, "/")
			if ns == k.ns && slices.Contains(claims, claim) {
				return "PV " + pv + " of " + claim + " still there"
			}
		}
		return ""
	})
}

// capacity returns what the CSIStorageCapacity of class on node offers a
// new volume (its maximumVolumeSize, else its capacity), 0 when there is
// none.
func (k *k) capacity(class, node string) int64 {
	k.t.Helper()
	out, err := k.c.Kubectl(k.ctx, "-n", driverNamespace, "get", "csistoragecapacities", "-o", "json")
	if err != nil {
		k.t.Fatal(err)
	}
	var list struct {
		Items []struct {
			StorageClassName string `json:"storageClassName"`
			NodeTopology     struct {
				MatchLabels map[string]string `json:"matchLabels"`
			} `json:"nodeTopology"`
			Capacity          *resource.Quantity `json:"capacity"`
			MaximumVolumeSize *resource.Quantity `json:"maximumVolumeSize"`
		} `json:"items"`
	}
	if err := json.Unmarshal(out, &list); err != nil {
		k.t.Fatal(err)
	}
	for _, c := range list.Items {
		if c.StorageClassName != class || c.NodeTopology.MatchLabels[topologyKey] != node {
			continue
		}
		switch {
		case c.MaximumVolumeSize != nil:
			return c.MaximumVolumeSize.Value()
		case c.Capacity != nil:
			return c.Capacity.Value()
		}
	}
	return 0
}

// driverExec runs a command in the driver's container on node.
func (k *k) driverExec(node string, args ...string) string {
	k.t.Helper()
	out, err := k.c.Kubectl(k.ctx, append([]string{"-n", driverNamespace, "exec", driverPodOn(k, node), "-c", "csi-dmthin", "--"}, args...)...)
	if err != nil {
		k.t.Fatalf("%s on %s: %v", strings.Join(args, " "), node, err)
	}
	return string(out)
}

// waitEvent waits, two minutes at most from start, for an Event of type
// and reason on the PVC whose message contains what, and logs it.
func (k *k) waitEvent(pvc, typ, reason, what string, start time.Time) {
	k.t.Helper()
	k.eventually(2*time.Minute-time.Since(start), typ+" "+reason+" on PVC "+pvc+" naming "+what, func() string {
		for _, e := range k.events(pvc) {
			if strings.HasPrefix(e, typ+" "+reason+":") && strings.Contains(e, what) {
				k.t.Logf("PVC %s after %s: %s", pvc, time.Since(start).Round(time.Second), e)
				return ""
			}
		}
		return strings.Join(k.events(pvc), " | ")
	})
}

// copyDoneRE reads the byte counts of a CopyCompleted Event.
var copyDoneRE = regexp.MustCompile(`(\d+) bytes mapped, (\d+) moved by this run \(which began at byte (\d+)\)`)

// copied checks that the PVC's volume was copied from node src, and
// returns the bytes the snapshot maps and those the run that finished
// moved, as the target's driver counted them.
func (k *k) copied(pvc, src string) (mapped, moved int64) {
	mapped, moved, _ = k.copiedFrom(pvc, src)
	return mapped, moved
}

// copiedFrom is copied, and the device offset the run that finished
// began at.
func (k *k) copiedFrom(pvc, src string) (mapped, moved, began int64) {
	k.t.Helper()
	for _, e := range k.events(pvc) {
		if !strings.HasPrefix(e, "Normal CopyCompleted:") || !strings.Contains(e, "from node "+src) {
			continue
		}
		m := copyDoneRE.FindStringSubmatch(e)
		if m == nil {
			k.t.Fatalf("PVC %s: no byte counts in %q", pvc, e)
		}
		mapped, _ = strconv.ParseInt(m[1], 10, 64)
		moved, _ = strconv.ParseInt(m[2], 10, 64)
		began, _ = strconv.ParseInt(m[3], 10, 64)
		return mapped, moved, began
	}
	k.t.Fatalf("PVC %s: no CopyCompleted Event naming node %s: %q", pvc, src, k.events(pvc))
	return 0, 0, 0
}

// copyAudience is the audience of the token a driver presents to another
// node's driver (the chart's copy.audience).
const copyAudience = "dmthin.csi.dmthin.io/copy"

// copyTokens checks who may copy from node src's driver, asking from the
// driver's pod on dst: its own copy token is taken; a token of another
// service account, and a token of the driver's own account for another
// audience, are refused.
func (k *k) copyTokens(src, dst, snap string) {
	k.t.Helper()
	content := k.run("get", "volumesnapshot", snap, "-o", "jsonpath={.status.boundVolumeSnapshotContentName}")
	handle := k.run("get", "volumesnapshotcontent", content, "-o", "jsonpath={.status.snapshotHandle}")
	parts := strings.Split(handle, "/")
	if len(parts) != 3 || parts[0] != src {
		k.t.Fatalf("snapshot %s's handle %q does not name node %s", snap, handle, src)
	}
	var addr, cert string
	out := k.run("get", "thinpools", "-o", `jsonpath={range .items[*]}{.spec.nodeName} {.spec.pool} {.status.copy.address} {.status.copy.certSHA256}{"\n"}{end}`)
	for _, l := range strings.Split(out, "\n") {
		if f := strings.Fields(l); len(f) == 4 && f[0] == src && f[1] == parts[1] {
			addr, cert = f[2], f[3]
		}
	}
	if addr == "" {
		k.t.Fatalf("no copy endpoint in the ThinPool of node %s, pool %s: %s", src, parts[1], out)
	}
	pod := driverPodOn(k, dst)
	probe := func(token, tokenFile string) (string, error) {
		out, err := k.c.KubectlStdin(k.ctx, token, "-n", driverNamespace, "exec", "-i", pod, "-c", "csi-dmthin", "--",
			"csi-dmthin", "copy", "probe", "--address", addr, "--cert-sha256", cert, "--token-file", tokenFile, "--source", handle)
		return strings.TrimSpace(string(out)), err
	}
	if out, err := probe("", "/var/run/secrets/dmthin.io/copy/token"); err != nil || !strings.Contains(out, "mapped") {
		k.t.Fatalf("the driver's own token was not taken: %v: %s", err, out)
	}
	k.run("create", "serviceaccount", "intruder")
	sa := k.run("-n", driverNamespace, "get", "pod", pod, "-o", "jsonpath={.spec.serviceAccountName}")
	for _, tc := range []struct{ what, token, want string }{
		{"another service account's token", k.run("create", "token", "intruder", "--audience", copyAudience), "not allowed"},
		{"the driver's token for the API server", k.run("-n", driverNamespace, "create", "token", sa), "refused"},
	} {
		// The refusal is on the probe's stderr, which the error carries.
		out, err := probe(tc.token, "-")
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			k.t.Errorf("%s: probe answered %q (err %v), want a refusal saying %q", tc.what, out, err, tc.want)
		} else {
			k.t.Logf("%s refused: %v", tc.what, err)
		}
	}
}
