package e2e

import (
	"context"
	"fmt"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/watch"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/cache"
	"k8s.io/client-go/tools/clientcmd"
	watchtools "k8s.io/client-go/tools/watch"
	"sigs.k8s.io/yaml"
)

// Pod start with a new volume against the same pod with an emptyDir
// (issue 14): the same number of pods of each kind are created at once, and each
// pod's time from its create call to the first watch event that shows it
// Running is taken on this side, with time.Now() (the API's timestamps have
// whole seconds only). Pod i is pinned to node i%2 on both sides, so each
// node starts half of each side's pods: like for like, and a volume's node
// is chosen by nothing but where its pod runs. The target (a new PVC's p50
// within podStartTarget times the emptyDir's) is printed, met or missed,
// never asserted: a slow machine must not fail the run. What fails it is a
// pod that never runs, or a claim or volume left behind.
const (
	// podStartPodsEnv sets how many pods a side. Issue 14 asks for 20;
	// under TCG on 2 cores one side of 20 took 6 min 45 s from the
	// creates to the pods deleted (each pod's sandbox costs some 20 s of
	// a node's CPU), so `make e2e` takes podStartPodsDefault, within its
	// few minutes, and `make bench-e2e` the 20.
	podStartPodsEnv     = "CSI_DMTHIN_E2E_PODSTART_PODS"
	podStartPodsDefault = 4
	podStartSize        = "1Gi" // the claims', podStartBytes
	podStartBytes       = 1 << 30
	podStartTarget      = 1.5
	podStartFile        = "podstart.md" // in the run directory
)

// podStartSide is one side's measurement.
type podStartSide struct {
	name      string
	running   []time.Duration // create call to Running, per pod
	scheduled []time.Duration // create call to PodScheduled True, per pod
	byNode    map[string][]time.Duration
	load      string // the host's /proc/loadavg at the start
	teardown  time.Duration
}

func TestPodStart(t *testing.T) {
	c := requireDriver(t)
	pods := podStartPodsDefault
	if v := os.Getenv(podStartPodsEnv); v != "" {
		n, err := strconv.Atoi(v)
		if err != nil || n < 1 {
			t.Fatalf("%s=%q: want a number of pods, 1 or more", podStartPodsEnv, v)
		}
		pods = n
	}
	ctx, cancel := context.WithTimeout(testCtx, 5*time.Minute+4*podStartBound(pods))
	defer cancel()
	nodes := c.NodeNames()
	kc := &k{t: t, c: c, ctx: ctx, ns: "e2e-podstart"}
	kc.run("create", "namespace", kc.ns)
	// Nothing of this test may outlive it: TestScenarios counts every PV
	// and thin device in the cluster.
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(testCtx, 5*time.Minute)
		defer cancel()
		if _, err := c.Kubectl(ctx, "delete", "namespace", kc.ns, "--wait=true", "--timeout=5m"); err != nil {
			t.Errorf("deleting namespace %s: %v", kc.ns, err)
		}
	})
	cfg, err := clientcmd.BuildConfigFromFlags("", c.Kubeconfig)
	if err != nil {
		t.Fatal(err)
	}
	// client-go's default limit (5 a second) would spread the creates
	// over four seconds and measure itself.
	cfg.QPS, cfg.Burst = 200, 200
	client, err := kubernetes.NewForConfig(cfg)
	if err != nil {
		t.Fatal(err)
	}
	step := stepper(t, c, ctx, kc.ns)
	var empty, claim podStartSide
	var templates string
	// Before both sides: the warm-up volume's pod is also the first pod a
	// fresh node starts, which a first run of 4 a side found costs a side
	// measured before it about twice what it costs the one after.
	step("Templates", func(k *k) { templates = k.warmTemplates(nodes, "ext4", podStartBytes) })
	step("EmptyDir", func(k *k) { empty = k.podStart(client, nodes, pods, false) })
	step("NewPVC", func(k *k) { claim = k.podStart(client, nodes, pods, true) })
	report := podStartReport(empty, claim, len(nodes), templates)
	t.Log("\n" + report)
	path := filepath.Join(testArt.RunDir, podStartFile)
	if err := os.WriteFile(path, []byte(report), 0o644); err != nil {
		t.Error(err)
	}
	t.Logf("pod start table written to %s", path)
}

// podStartBound is how long n pods a side may take to run, and to be
// deleted: generous, for a loaded machine (one side of 20 ran in 4 min 17 s
// and was deleted in 2 min 28 s).
func podStartBound(n int) time.Duration { return 2*time.Minute + time.Duration(n)*30*time.Second }

// podStart creates n pods at once, each with a new claim of the
// chart's WaitForFirstConsumer class when withPVC, else with an emptyDir,
// waits for all of them to run, deletes them (and their claims, and waits
// for the volumes to go) and returns their times.
func (k *k) podStart(client kubernetes.Interface, nodes []string, n int, withPVC bool) podStartSide {
	k.t.Helper()
	side := podStartSide{name: "emptydir", byNode: map[string][]time.Duration{}}
	if withPVC {
		side.name = "pvc"
	}
	selector := "podstart=" + side.name
	pods := client.CoreV1().Pods(k.ns)
	claims := client.CoreV1().PersistentVolumeClaims(k.ns)

	type object struct {
		name string
		node string
		pod  *corev1.Pod
		pvc  *corev1.PersistentVolumeClaim
	}
	objects := make([]object, n)
	for i := range objects {
		o := &objects[i]
		o.name = fmt.Sprintf("%s-%02d", side.name, i)
		o.node = nodes[i%len(nodes)]
		volume := `[{name: v, emptyDir: {}}]`
		if withPVC {
			volume = fmt.Sprintf(`[{name: v, persistentVolumeClaim: {claimName: %s}}]`, o.name)
			o.pvc = &corev1.PersistentVolumeClaim{}
			decodeStrict(k.t, pvcYAML(o.name, podStartSize, "Filesystem", ""), o.pvc)
			o.pvc.Labels = map[string]string{"podstart": side.name}
		}
		o.pod = &corev1.Pod{}
		decodeStrict(k.t, podWithVolumes(o.name, "sleep 100000", `volumeMounts: [{name: v, mountPath: /data}]`, volume), o.pod)
		o.pod.Labels = map[string]string{"podstart": side.name}
		o.pod.Spec.NodeSelector = map[string]string{"kubernetes.io/hostname": o.node}
	}

	// The watch starts before the first create, so no transition is
	// missed; a RetryWatcher carries on if the apiserver closes it.
	list, err := pods.List(k.ctx, metav1.ListOptions{LabelSelector: selector})
	if err != nil {
		k.t.Fatal(err)
	}
	if len(list.Items) != 0 {
		k.t.Fatalf("%d pods labelled %s before the start", len(list.Items), selector)
	}
	w, err := watchtools.NewRetryWatcherWithContext(k.ctx, list.ResourceVersion, &cache.ListWatch{
		WatchFuncWithContext: func(ctx context.Context, opts metav1.ListOptions) (watch.Interface, error) {
			opts.LabelSelector = selector
			return pods.Watch(ctx, opts)
		},
	})
	if err != nil {
		k.t.Fatal(err)
	}
	defer w.Stop()

	var (
		mu        sync.Mutex
		created   = map[string]time.Time{}
		scheduled = map[string]time.Time{}
		running   = map[string]time.Time{}
		failed    []string
		allRun    = make(chan struct{})
	)
	go func() {
		for ev := range w.ResultChan() {
			now := time.Now()
			pod, ok := ev.Object.(*corev1.Pod)
			if !ok {
				continue
			}
			mu.Lock()
			if _, seen := scheduled[pod.Name]; !seen && podCondition(pod, corev1.PodScheduled) {
				scheduled[pod.Name] = now
			}
			if _, seen := running[pod.Name]; !seen {
				switch pod.Status.Phase {
				case corev1.PodRunning:
					running[pod.Name] = now
					if len(running) == n {
						close(allRun)
					}
				case corev1.PodFailed, corev1.PodSucceeded:
					failed = append(failed, fmt.Sprintf("%s %s: %s", pod.Name, pod.Status.Phase, pod.Status.Message))
				}
			}
			mu.Unlock()
		}
	}()

	side.load = hostLoad()
	// At once: every goroutine waits for the one signal, then makes its
	// pod's claim (if any) and its pod, as `kubectl apply` of a claim and
	// its pod does. The clock starts before the first of them.
	start := make(chan struct{})
	errs := make([]error, len(objects))
	var wg sync.WaitGroup
	for i := range objects {
		o := &objects[i]
		wg.Go(func() {
			<-start
			t0 := time.Now()
			mu.Lock()
			created[o.name] = t0
			mu.Unlock()
			if o.pvc != nil {
				if _, err := claims.Create(k.ctx, o.pvc, metav1.CreateOptions{}); err != nil {
					errs[i] = err
					return
				}
			}
			_, errs[i] = pods.Create(k.ctx, o.pod, metav1.CreateOptions{})
		})
	}
	began := time.Now()
	close(start)
	wg.Wait()
	if err := someErrors(errs); err != nil {
		k.t.Fatalf("creating the %s pods: %v", side.name, err)
	}

	bound := podStartBound(n)
	timeout := time.NewTimer(bound - time.Since(began))
	defer timeout.Stop()
	select {
	case <-allRun:
	case <-timeout.C:
		k.podStartStuck(selector, n, bound, running, &mu)
	case <-k.ctx.Done():
		k.t.Fatal(k.ctx.Err())
	}
	mu.Lock()
	if len(failed) > 0 {
		k.t.Errorf("pods ended before the measurement did: %s", strings.Join(failed, "; "))
	}
	for _, o := range objects {
		d := running[o.name].Sub(created[o.name])
		side.running = append(side.running, d)
		side.scheduled = append(side.scheduled, scheduled[o.name].Sub(created[o.name]))
		side.byNode[o.node] = append(side.byNode[o.node], d)
	}
	mu.Unlock()
	if withPVC {
		k.podStartPlacement(client, selector, n, storageClass)
	}
	k.t.Logf("%s: %d pods Running %s after the first create; p50 %s",
		side.name, n, time.Since(began).Round(100*time.Millisecond), fmtSeconds(percentile(side.running, 50)))

	begin := time.Now()
	wait := fmt.Sprintf("--timeout=%s", bound)
	k.run("delete", "pods", "-l", selector, "--wait=true", wait)
	if withPVC {
		k.run("delete", "pvc", "-l", selector, "--wait=true", wait)
		if left := k.run("get", "pvc", "-l", selector, "-o", "name"); left != "" {
			k.t.Fatalf("claims left behind: %s", left)
		}
		k.eventually(bound, "the namespace's PVs deleted", func() string {
			if left := k.pvNames(); len(left) > 0 {
				return fmt.Sprintf("%d left: %s", len(left), strings.Join(left, " "))
			}
			return ""
		})
	}
	side.teardown = time.Since(begin)
	return side
}

// podStartPlacement checks that every claim of the selector is bound, and
// that its selected node and its PV's node are its pod's.
func (k *k) podStartPlacement(client kubernetes.Interface, selector string, n int, class string) {
	k.t.Helper()
	pvcs, err := client.CoreV1().PersistentVolumeClaims(k.ns).List(k.ctx, metav1.ListOptions{LabelSelector: selector})
	if err != nil {
		k.t.Fatal(err)
	}
	pvs, err := client.CoreV1().PersistentVolumes().List(k.ctx, metav1.ListOptions{})
	if err != nil {
		k.t.Fatal(err)
	}
	pvNode := map[string]string{}
	for _, pv := range pvs.Items {
		if a := pv.Spec.NodeAffinity; a != nil && a.Required != nil {
			for _, term := range a.Required.NodeSelectorTerms {
				for _, e := range term.MatchExpressions {
					if e.Key == topologyKey && len(e.Values) == 1 {
						pvNode[pv.Name] = e.Values[0]
					}
				}
			}
		}
	}
	podNode := map[string]string{}
	pods, err := client.CoreV1().Pods(k.ns).List(k.ctx, metav1.ListOptions{LabelSelector: selector})
	if err != nil {
		k.t.Fatal(err)
	}
	for _, p := range pods.Items {
		podNode[p.Name] = p.Spec.NodeName
	}
	if len(pvcs.Items) != n {
		k.t.Fatalf("%d claims labelled %s, want %d", len(pvcs.Items), selector, n)
	}
	for _, c := range pvcs.Items {
		selected := c.Annotations["volume.kubernetes.io/selected-node"]
		node := podNode[c.Name]
		if c.Status.Phase != corev1.ClaimBound || c.Spec.VolumeName == "" || selected != node || pvNode[c.Spec.VolumeName] != node || *c.Spec.StorageClassName != class {
			k.t.Errorf("claim %s (class %s) is %s with PV %q on %q, selected node %q; its pod is on %q",
				c.Name, *c.Spec.StorageClassName, c.Status.Phase, c.Spec.VolumeName, pvNode[c.Spec.VolumeName], selected, node)
		}
	}
}

// podStartStuck fails the test for the pods that did not run in time,
// with what would say why.
func (k *k) podStartStuck(selector string, n int, bound time.Duration, running map[string]time.Time, mu *sync.Mutex) {
	k.t.Helper()
	mu.Lock()
	ran := len(running)
	mu.Unlock()
	out, _ := k.try("get", "pods,pvc", "-l", selector, "-o", "wide")
	ev, _ := k.try("get", "events", "--sort-by=.lastTimestamp")
	var desc string
	for _, l := range strings.Split(out, "\n") {
		if f := strings.Fields(l); len(f) > 2 && strings.HasPrefix(f[0], "pod/") && f[2] != "Running" {
			desc, _ = k.try("describe", f[0])
			break
		}
	}
	k.t.Fatalf("%s: %d of %d pods Running within %s\n%s\n%s\n%s", selector, ran, n, bound,
		out, tailStr(desc, 30), tailStr(ev, 30))
}

// warmTemplates makes sure every node's default pool holds the sealed
// formatted template of the claims' filesystem and size, so that every
// claim measured is made the way all but a node's first volume of a size
// are: a clone of it (pkg/csi/templates.go). In `make e2e` the scenarios
// before have left them; alone, one volume a node makes them. It returns
// what was there before.
func (k *k) warmTemplates(nodes []string, fsType string, sizeBytes int64) string {
	k.t.Helper()
	before := map[string]bool{}
	var docs, parts []string
	var names []string
	for i, n := range nodes {
		before[n] = k.hasTemplate(n, fsType, sizeBytes)
		if before[n] {
			parts = append(parts, n+" present")
			continue
		}
		parts = append(parts, n+" none (made by one volume before the measure)")
		name := fmt.Sprintf("warm-%d", i)
		names = append(names, name)
		docs = append(docs, pvcYAML(name, podStartSize, "Filesystem", ""), pinned(podYAML(name, name, "sleep 100000", false), n))
	}
	if len(docs) == 0 {
		return strings.Join(parts, ", ")
	}
	k.apply(strings.Join(docs, "---\n"))
	for _, name := range names {
		k.waitPodReady(name)
	}
	k.run(append([]string{"delete", "pod", "--wait=true", "--timeout=2m"}, names...)...)
	k.run(append([]string{"delete", "pvc", "--wait=true", "--timeout=2m"}, names...)...)
	k.waitNoPVFor(names...)
	for _, n := range nodes {
		if !before[n] {
			k.eventually(3*time.Minute, "the formatted template on "+n, func() string {
				if k.hasTemplate(n, fsType, sizeBytes) {
					return ""
				}
				return "not built"
			})
		}
	}
	return strings.Join(parts, ", ")
}

// hasTemplate says whether node's default pool lists a built (inactive)
// formatted template of fsType and sizeBytes.
func (k *k) hasTemplate(node, fsType string, sizeBytes int64) bool {
	k.t.Helper()
	// pkg/csi's templateName, whatever its version suffix.
	prefix := fmt.Sprintf("default/t_%s_%d_v", fsType, sizeBytes)
	for _, l := range strings.Split(k.driverExec(node, "csi-dmthin", "volume", "list"), "\n") {
		// ID KIND SIZE (2 fields) SOURCE THIN-ID ACTIVE CREATED
		if f := strings.Fields(l); len(f) == 8 && strings.HasPrefix(f[0], prefix) && f[1] == "template" && f[6] == "false" {
			return true
		}
	}
	return false
}

func podCondition(p *corev1.Pod, c corev1.PodConditionType) bool {
	for _, cond := range p.Status.Conditions {
		if cond.Type == c {
			return cond.Status == corev1.ConditionTrue
		}
	}
	return false
}

func decodeStrict(t *testing.T, doc string, into any) {
	t.Helper()
	if err := yaml.UnmarshalStrict([]byte(doc), into); err != nil {
		t.Fatalf("%v\n%s", err, doc)
	}
}

// someErrors joins the non-nil errors, at most three of them, with a count.
func someErrors(errs []error) error {
	var msgs []string
	n := 0
	for _, err := range errs {
		if err != nil {
			n++
			if len(msgs) < 3 {
				msgs = append(msgs, err.Error())
			}
		}
	}
	if n == 0 {
		return nil
	}
	return fmt.Errorf("%d failed: %s", n, strings.Join(msgs, "; "))
}

func hostLoad() string {
	data, err := os.ReadFile("/proc/loadavg")
	if err != nil {
		return "?"
	}
	f := strings.Fields(string(data))
	if len(f) < 3 {
		return "?"
	}
	return strings.Join(f[:3], " ")
}

// percentile is the nearest-rank percentile: the smallest sample that at
// least p percent of the samples are at or under. Of 20 samples, p50 is
// the 10th and p99 the 20th, the largest.
func percentile(samples []time.Duration, p float64) time.Duration {
	if len(samples) == 0 {
		return 0
	}
	s := slices.Sorted(slices.Values(samples))
	rank := int(float64(len(s))*p/100 + 0.999999)
	return s[min(max(rank, 1), len(s))-1]
}

func fmtSeconds(d time.Duration) string { return fmt.Sprintf("%.2f s", d.Seconds()) }

// podStartReport is the markdown the test logs and writes to podStartFile.
func podStartReport(empty, claim podStartSide, nodes int, templates string) string {
	var b strings.Builder
	row := func(what string, s podStartSide) {
		fmt.Fprintf(&b, "| %s | %s | %s | %s | %s | %s |\n", what,
			fmtSeconds(percentile(s.running, 50)), fmtSeconds(percentile(s.running, 99)),
			fmtSeconds(slices.Max(s.running)), fmtSeconds(percentile(s.scheduled, 50)), s.load)
	}
	ratio := func(p float64) float64 {
		return percentile(claim.running, p).Seconds() / percentile(empty.running, p).Seconds()
	}
	fmt.Fprintf(&b, "### Pod start: a new WaitForFirstConsumer PVC against an emptyDir\n\n")
	fmt.Fprintf(&b, "%d pods a side, created at once, pod i pinned to node i%%%d on both sides; "+
		"time from the create call (the claim's, then the pod's) to the first watch event with the pod Running, on the test's clock; "+
		"percentiles by nearest rank (of %d, p99 is the largest). "+
		"Claims: %s of class %s (ext4); formatted templates of that size before the measure: %s.\n\n",
		len(claim.running), nodes, len(claim.running), podStartSize, storageClass, templates)
	fmt.Fprintf(&b, "| side | p50 | p99 | max | p50 to PodScheduled | host load at start |\n|---|---|---|---|---|---|\n")
	row("emptyDir", empty)
	row("new PVC", claim)
	fmt.Fprintf(&b, "| **PVC / emptyDir** | **%.2fx** | **%.2fx** | | | |\n\n", ratio(50), ratio(99))
	verdict := "met"
	if ratio(50) > podStartTarget {
		verdict = "missed"
	}
	fmt.Fprintf(&b, "Target (p50 of a new PVC within %.1fx the emptyDir's): **%s** (%.2fx).\n\n", podStartTarget, verdict, ratio(50))
	for _, s := range []podStartSide{empty, claim} {
		var parts []string
		for _, n := range slices.Sorted(maps.Keys(s.byNode)) {
			parts = append(parts, fmt.Sprintf("%s %s", n, fmtSeconds(percentile(s.byNode[n], 50))))
		}
		fmt.Fprintf(&b, "- %s: p50 by node %s; deleting took %s\n", s.name, strings.Join(parts, ", "), s.teardown.Round(100*time.Millisecond))
	}
	return b.String()
}
