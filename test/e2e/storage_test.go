package e2e

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/csi-dmthin/csi-dmthin/test/e2e/cluster"
)

// storageEnv picks the part of Kubernetes' external storage suite that
// TestExternalStorage runs: "fast" (the default: what `make test` runs),
// "parallel" (every spec neither Slow nor Serial), "full" (`make e2e-full`:
// every applicable spec, the Disruptive ones after the rest), "disruptive"
// (those alone), "group" or "off", or several joined by "+".
const storageEnv = "CSI_DMTHIN_E2E_STORAGE"

// storageSelection is one way to run the suite.
type storageSelection struct {
	// suites, when set, are the only test suites run (provisioning,
	// snapshottable, ...: the word after the test pattern in a spec's name).
	suites []string
	// only, when set, is a pattern the spec's full text must match too.
	only    string
	skip    string        // ginkgo --skip, on the spec's full text
	procs   int           // parallel ginkgo processes
	timeout time.Duration // ginkgo --timeout for the whole run
	// leftOut says where the specs this selection leaves out (other than
	// the not applicable ones) are run.
	leftOut string
	// oneNode: every node but the first is cordoned while it runs.
	oneNode bool
	// disruptive: its specs stop and start kubelet on the nodes over SSH.
	// Before it runs, every node must answer over SSH with its kubelet
	// active, and after it, again.
	disruptive bool
}

// groupSuite is the suite of group snapshots. Its StatefulSet of three
// replicas has no node preference, so the scheduler spreads the pods and
// their WaitForFirstConsumer volumes over the nodes, and a group of volumes
// on several nodes is refused by design (one group is one pool's single
// commit). It runs in its own selection, with one node schedulable.
const groupSuite = "volumegroupsnapshottable"

// notApplicable are the specs no run selects, and why. They need what this
// cluster or driver lacks by design, so selecting them would report the
// test bed, not the driver.
var notApplicable = []struct {
	pattern *regexp.Regexp
	why     string
}{
	{regexp.MustCompile(`\[Feature:VolumeAttributesClass\]`), "needs ModifyVolume; csi-dmthin has no volume attributes to change (a thin volume has no performance tiers)"},
	{regexp.MustCompile(`\[Feature:SELinux\]`), "needs a node that enforces SELinux; Debian's kernel boots without it"},
	{regexp.MustCompile(`should provision storage with any volume data source`), "runs the hello-populator and volume-data-source-validator images, which the harness does not build; it tests Kubernetes' volume populators (a populator copies into a volume the driver provisions like any other), not a path of the driver's own"},
}

var storageSelections = map[string]storageSelection{
	// What make test runs: the suites that only several nodes can fail
	// (topology: a class's allowed topologies against the pod's node;
	// capacity: CSIStorageCapacity per node). Each costs under two
	// minutes. Restores and clones across nodes are TestMultiNode's; the
	// rest proves what one node proves too, at two to five minutes a spec
	// under TCG, and is left to make e2e-full (see README.md).
	"fast": {suites: []string{"capacity", "topology"}, skip: `\[(Slow|Serial|Disruptive)\]`, procs: 2, timeout: 30 * time.Minute,
		leftOut: "left to `make e2e-full` (the suites or Slow, Serial and Disruptive specs `make test` does not run)"},
	// Neither Slow nor Serial: the set CSI projects run on every change,
	// snapshot and XFS specs included.
	"parallel": {skip: `\[(Slow|Serial|Disruptive)\]|` + groupSuite + ` `, procs: 4, timeout: 90 * time.Minute,
		leftOut: "left to `make e2e-full` (Slow, Serial or Disruptive), or to the group set (" + groupSuite + ")"},
	// Everything applicable, Slow and Serial included, but the Disruptive
	// specs, which the full set runs after it (storageSetParts).
	"full": {skip: disruptive + `|` + groupSuite + ` `, procs: 4, timeout: 3 * time.Hour,
		leftOut: "left to the disruptive part of the full set (one spec at a time, after the rest), or to the group set (" + groupSuite + ", on one node)"},
	// The Disruptive specs: each stops kubelet on a node (over SSH, with
	// the node's systemctl) while a volume is in use, and starts it again.
	// One at a time: a spec running beside them on that node would see its
	// kubelet gone (Kubernetes never runs Disruptive specs in parallel).
	"disruptive": {only: disruptive, procs: 1, timeout: 90 * time.Minute, disruptive: true,
		leftOut: "run by the other sets"},
	// The group snapshot suite, on one schedulable node (groupSuite).
	"group": {suites: []string{groupSuite}, procs: 2, timeout: 40 * time.Minute, oneNode: true,
		leftOut: "run by the other sets"},
}

// disruptive matches the specs that stop and start kubelet.
const disruptive = `\[Disruptive\]`

// storageSetParts are the sets that run several selections, one after the
// other.
var storageSetParts = map[string][]string{"full": {"full", "disruptive"}}

// storageSet returns the selected set's name, or "" for none.
func storageSet() string {
	switch s := os.Getenv(storageEnv); s {
	case "", "fast":
		return "fast"
	case "off":
		return ""
	default:
		return s
	}
}

// focusPattern is the ginkgo --focus of a selection: External Storage, and
// only its suites when it names some, and only what matches its only.
func (s storageSelection) focusPattern() string {
	p := `External.Storage`
	if len(s.suites) > 0 {
		p += ` .*\[Testpattern: [^]]*\] (` + strings.Join(s.suites, "|") + `) `
	}
	if s.only != "" {
		p += `.*(` + s.only + `)`
	}
	return p
}

// selected reports whether the selection runs the spec of that full name.
func (s storageSelection) selected(name string) bool {
	return regexp.MustCompile(s.focusPattern()).MatchString(name) && !regexp.MustCompile(s.skipPattern()).MatchString(name)
}

// skipPattern is the ginkgo --skip of a selection: its own pattern and the
// specs that are not applicable.
func (s storageSelection) skipPattern() string {
	var parts []string
	for _, n := range notApplicable {
		parts = append(parts, n.pattern.String())
	}
	if s.skip != "" {
		parts = append(parts, s.skip)
	}
	return strings.Join(parts, "|")
}

// TestExternalStorage runs Kubernetes' external storage e2e suite
// (tools/storagesuite, built from k8s.io/kubernetes at the pinned version)
// against the installed driver, as CSI projects do: ginkgo in parallel,
// focus "External.Storage", the driver described by testdata/testdriver.yaml.
// Every selected spec must pass or be skipped by the suite itself; the
// summary (also written to storage-summary-<set>.md in the run directory) counts
// passes, failures and skips with the suite's reason for each skip.
func TestExternalStorage(t *testing.T) {
	c := requireDriver(t)
	set := storageSet()
	if set == "" {
		t.Skipf("%s=off", storageEnv)
	}
	names, err := storageRuns(set)
	if err != nil {
		t.Fatal(err)
	}
	for _, name := range names {
		sel, err := narrowed(storageSelections[name], os.Getenv(onlyEnv))
		if err != nil {
			t.Fatal(err)
		}
		t.Run(name, func(t *testing.T) { runStorage(t, c, name, sel) })
	}
}

// onlyEnv narrows every selection to the specs whose full name matches
// its pattern too: to run one spec again (say, a failure of a full run)
// without the rest of its set.
const onlyEnv = "CSI_DMTHIN_E2E_ONLY"

// narrowed is sel narrowed to the specs that match only as well; sel
// unchanged for "".
func narrowed(sel storageSelection, only string) (storageSelection, error) {
	if only == "" {
		return sel, nil
	}
	if _, err := regexp.Compile(only); err != nil {
		return sel, fmt.Errorf("%s=%q: %w", onlyEnv, only, err)
	}
	if sel.only != "" {
		// Both must match, in either order.
		only = `(` + sel.only + `).*(` + only + `)|(` + only + `).*(` + sel.only + `)`
	}
	sel.only = only
	sel.leftOut = "not matched by " + onlyEnv + ", or " + sel.leftOut
	return sel, nil
}

// storageRuns lists the selections a set runs, in order: one name, or
// several joined by "+" (e.g. "fast+group"), each a selection or a set of
// several (storageSetParts), none twice.
func storageRuns(set string) ([]string, error) {
	var names []string
	for _, name := range strings.Split(set, "+") {
		parts, ok := storageSetParts[name]
		if !ok {
			parts = []string{name}
		}
		for _, p := range parts {
			if _, ok := storageSelections[p]; !ok || slices.Contains(names, p) {
				return nil, fmt.Errorf("%s=%q: want fast, parallel, full, disruptive, group or off, or several of them joined by + (full runs disruptive already)", storageEnv, set)
			}
			names = append(names, p)
		}
	}
	return names, nil
}

// runStorage runs one selection of the suite and counts its report.
func runStorage(t *testing.T, c *cluster.Cluster, name string, sel storageSelection) {
	if sel.oneNode {
		nodes := c.NodeNames()
		for _, n := range nodes[1:] {
			if _, err := c.Kubectl(testCtx, "cordon", n); err != nil {
				t.Fatal(err)
			}
			defer c.Kubectl(testCtx, "uncordon", n)
		}
		t.Logf("storage suite (%s): only %s schedulable", name, nodes[0])
	}
	if sel.disruptive {
		checkKubeletsOverSSH(t, c, "before")
		defer checkKubeletsOverSSH(t, c, "after")
	}
	dir := filepath.Join(testArt.RunDir, "storage-"+name)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	driverFile, err := filepath.Abs(filepath.Join("testdata", "testdriver.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	report := filepath.Join(dir, "report.json")
	args := []string{
		"--procs", fmt.Sprint(sel.procs), "--timeout", sel.timeout.String(),
		"--focus", sel.focusPattern(), "--skip", sel.skipPattern(),
		"--json-report", report, "--no-color", "--silence-skips",
		c.Bin("e2e.test"), "--",
		"--kubeconfig", c.Kubeconfig, "--kubectl-path", c.Bin("kubectl"),
		"--storage.testdriver", driverFile,
		"--report-dir", dir, "--node-os-distro", "debian",
		// "local" is a provider whose nodes the framework reaches over
		// SSH (framework.ProvidersWithSSH): the disruptive suite runs only
		// for those, and its key is the one KUBE_SSH_KEY_PATH names.
		"--provider", "local",
	}
	t.Logf("storage suite (%s): ginkgo %s", name, strings.Join(args, " "))
	start := time.Now()
	// Started like every other process of the run, so it and its parallel
	// test processes are stopped by pid when the run ends or is cut short.
	// The framework's SSH client (framework/ssh) takes its key and user
	// from the environment.
	env := []string{"KUBE_SSH_KEY_PATH=" + c.SSHKey(), "KUBE_SSH_USER=" + cluster.SSHUser}
	p, err := c.Procs.StartEnv("storage-suite-"+name, env, c.Bin("ginkgo"), args...)
	if err != nil {
		t.Fatal(err)
	}
	runErr := waitWithProgress(t, p, start)
	took := time.Since(start).Round(time.Second)
	testArt.Timings["storage-suite-"+name] = took.String()

	data, err := os.ReadFile(report)
	if err != nil {
		t.Fatalf("ginkgo wrote no report (%v): %v; its output is in %s", runErr, err, p.Log)
	}
	res, err := parseGinkgoReport(data, sel.selected)
	if err != nil {
		t.Fatal(err)
	}
	summary := res.markdown(name, took, sel.leftOut)
	_ = os.WriteFile(filepath.Join(testArt.RunDir, "storage-summary-"+name+".md"), []byte(summary), 0o644)
	t.Log("\n" + summary)
	for _, f := range res.Failed {
		t.Errorf("FAILED %s\n%s", f.Name, f.Message)
	}
	if res.Passed == 0 && len(res.Failed) == 0 && len(res.Skipped) == 0 && os.Getenv(onlyEnv) != "" {
		t.Skipf("%s matched no spec of this part", onlyEnv) // a narrowed set may leave a part empty
	}
	if res.Passed == 0 {
		t.Errorf("no spec passed")
	}
	if runErr != nil && len(res.Failed) == 0 {
		t.Errorf("ginkgo failed without a failed spec: %v (see %s)", runErr, p.Log)
	}
}

// checkKubeletsOverSSH asks every node over SSH, as the suite does, whether
// its kubelet is active: before the Disruptive specs, so that a test bed
// they cannot use fails at once and says why; after them, so that a
// kubelet a failed spec left stopped is reported, not discovered by the
// next test.
func checkKubeletsOverSSH(t *testing.T, c *cluster.Cluster, when string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(testCtx, time.Minute)
	defer cancel()
	ok := true
	for _, n := range c.NodeNames() {
		res, err := c.NodeSSH(ctx, n, "systemctl show kubelet --property ActiveState --value")
		if err != nil || res.Code != 0 || res.Stdout != "active\n" {
			t.Errorf("%s the Disruptive specs, %s: ssh: systemctl show kubelet: %+v, %v; want active", when, n, res, err)
			ok = false
			continue
		}
		t.Logf("%s the Disruptive specs, %s: kubelet active (asked over SSH)", when, n)
	}
	if !ok && when == "before" {
		t.FailNow()
	}
}

// waitWithProgress waits for the suite, logging every few minutes how many
// specs have ended (ginkgo prints "•" per passed spec and "• [FAILED]" at
// the head of each failure's report), so a long run shows it is moving.
func waitWithProgress(t *testing.T, p *cluster.Proc, start time.Time) error {
	tick := time.NewTicker(3 * time.Minute)
	defer tick.Stop()
	done := make(chan error, 1)
	go func() { done <- p.Wait(testCtx) }()
	for {
		select {
		case err := <-done:
			return err
		case <-tick.C:
			data, _ := os.ReadFile(p.Log)
			out := string(data)
			failed := strings.Count(out, "• [FAILED]") // a failure's header; its details repeat [FAILED]
			t.Logf("storage suite: %s: %d passed, %d failed so far", time.Since(start).Round(time.Second),
				strings.Count(out, "•")-failed, failed)
		}
	}
}

// storageResult is a ginkgo JSON report, counted.
type storageResult struct {
	Passed int
	Failed []specOutcome
	// Skipped counts the specs the suite skipped at run time, by reason.
	Skipped map[string][]string
	// NotSelected are the External Storage specs our --skip left out.
	NotSelected []string
	// Other counts specs outside External Storage that focus left out.
	Other int
}

type specOutcome struct{ Name, Message string }

// ginkgoSpec is the part of a ginkgo v2 JSON report's spec we read.
type ginkgoSpec struct {
	ContainerHierarchyTexts []string
	LeafNodeType            string
	LeafNodeText            string
	State                   string
	Failure                 struct{ Message string }
}

// parseGinkgoReport counts a ginkgo --json-report. Suite-level nodes
// (BeforeSuite and the like) count only when they fail; a spec that was
// skipped with no message was filtered out, by our skip pattern when its
// name is an External Storage spec the selection does not run, else by
// the binary's own focus.
func parseGinkgoReport(data []byte, selected func(name string) bool) (*storageResult, error) {
	var reports []struct{ SpecReports []ginkgoSpec }
	if err := json.Unmarshal(data, &reports); err != nil {
		return nil, fmt.Errorf("ginkgo report: %w", err)
	}
	if len(reports) == 0 {
		return nil, fmt.Errorf("ginkgo report: no suite")
	}
	res := &storageResult{Skipped: map[string][]string{}}
	for _, r := range reports {
		for _, s := range r.SpecReports {
			name := strings.TrimSpace(strings.Join(append(append([]string{}, s.ContainerHierarchyTexts...), s.LeafNodeText), " "))
			if name == "" {
				name = "[" + s.LeafNodeType + "]"
			}
			switch s.State {
			case "passed":
				if s.LeafNodeType == "It" {
					res.Passed++
				}
			case "skipped":
				switch {
				case s.Failure.Message != "":
					reason := skipReason(s.Failure.Message)
					res.Skipped[reason] = append(res.Skipped[reason], name)
				case strings.Contains(name, "External Storage") && !selected(name):
					res.NotSelected = append(res.NotSelected, name)
				default:
					res.Other++
				}
			case "pending":
				res.Other++
			default: // failed, panicked, interrupted, aborted, timedout
				res.Failed = append(res.Failed, specOutcome{Name: name, Message: s.State + ": " + firstLines(s.Failure.Message, 12)})
			}
		}
	}
	return res, nil
}

// numberRE finds the numbers in skip messages (sizes, counts), so one
// reason reads the same for every spec.
var numberRE = regexp.MustCompile(`\b\d+(\.\d+)?(Gi|Mi|s|ms)?\b`)

// skipReason is a skip message's first line, with numbers blanked so the
// same reason from different specs groups together.
func skipReason(msg string) string {
	line, _, _ := strings.Cut(strings.TrimSpace(msg), "\n")
	return numberRE.ReplaceAllString(line, "N")
}

func firstLines(s string, n int) string {
	lines := strings.Split(strings.TrimSpace(s), "\n")
	if len(lines) > n {
		lines = append(lines[:n], "...")
	}
	return strings.Join(lines, "\n")
}

// markdown is the summary: counts, then every skip reason with its specs,
// then what was not selected and why.
func (r *storageResult) markdown(set string, took time.Duration, leftOut string) string {
	var b strings.Builder
	skipped := 0
	for _, specs := range r.Skipped {
		skipped += len(specs)
	}
	fmt.Fprintf(&b, "## External storage suite (%s set, %s)\n\n", set, took)
	fmt.Fprintf(&b, "| passed | failed | skipped by the suite | not selected |\n|---:|---:|---:|---:|\n| %d | %d | %d | %d |\n\n",
		r.Passed, len(r.Failed), skipped, len(r.NotSelected))
	if len(r.Failed) > 0 {
		b.WriteString("### Failed\n\n")
		for _, f := range r.Failed {
			fmt.Fprintf(&b, "- %s\n", f.Name)
		}
		b.WriteString("\n")
	}
	if skipped > 0 {
		b.WriteString("### Skipped by the suite, by its reason\n\n")
		reasons := make([]string, 0, len(r.Skipped))
		for k := range r.Skipped {
			reasons = append(reasons, k)
		}
		sort.Slice(reasons, func(i, j int) bool { return len(r.Skipped[reasons[i]]) > len(r.Skipped[reasons[j]]) })
		for _, k := range reasons {
			fmt.Fprintf(&b, "- %d: %s\n", len(r.Skipped[k]), k)
		}
		b.WriteString("\n")
	}
	if len(r.NotSelected) > 0 {
		b.WriteString("### Not selected\n\n")
		counted := map[string]int{}
		for _, name := range r.NotSelected {
			why := leftOut
			for _, n := range notApplicable {
				if n.pattern.MatchString(name) {
					why = n.why
					break
				}
			}
			counted[why]++
		}
		whys := make([]string, 0, len(counted))
		for k := range counted {
			whys = append(whys, k)
		}
		sort.Strings(whys)
		for _, k := range whys {
			fmt.Fprintf(&b, "- %d: %s\n", counted[k], k)
		}
	}
	return b.String()
}
