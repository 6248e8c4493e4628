package e2e

import (
	"os"
	"path/filepath"
	"reflect"
	"regexp"
	"slices"
	"strings"
	"testing"

	"sigs.k8s.io/yaml"

	"github.com/csi-dmthin/csi-dmthin/pkg/csi"
)

// suiteCapabilities are the capability names Kubernetes v1.37's storage
// framework knows (test/e2e/storage/framework/testdriver.go). The suite
// ignores a name it does not know, so a typo would silently turn specs off.
var suiteCapabilities = []string{
	"persistence", "block", "fsGroup", "volumeMountGroup", "exec", "snapshotDataSource",
	"snapshotMetadata", "groupSnapshot", "pvcDataSource", "multipods", "RWX",
	"controllerExpansion", "nodeExpansion", "offlineExpansion", "onlineExpansion",
	"volumeLimits", "singleNodeVolume", "topology", "capacity",
	"FSResizeFromSourceNotSupported", "readWriteOncePod", "multiplePVsSameID",
	"capReadOnlyMany", "seLinuxMount",
}

// testDriverFile is the part of the suite's driver definition we write; the
// strict decode below refuses any key not declared here.
type testDriverFile struct {
	StorageClass       struct{ FromExistingClassName string }
	SnapshotClass      struct{ FromExistingClassName string }
	GroupSnapshotClass struct{ FromExistingClassName string }
	DriverInfo         struct {
		Name               string
		SupportedSizeRange struct{ Min, Max string }
		SupportedFsType    map[string]struct{}
		// SupportedMountOption are StorageClass mountOptions the suite
		// checks reach the pod's mount.
		SupportedMountOption map[string]struct{}
		TopologyKeys         []string
		// NumAllowedTopologies is how many topology segments a volume may
		// have: one, its node.
		NumAllowedTopologies            int
		Capabilities                    map[string]bool
		StressTestOptions               struct{ NumPods, NumRestarts int }
		VolumeSnapshotStressTestOptions struct{ NumPods, NumSnapshots int }
	}
	Timeouts map[string]string
}

// The driver definition names what the chart installs and only capability
// names the suite knows, and declares the features csi-dmthin has.
func TestTestDriverFile(t *testing.T) {
	data, err := os.ReadFile(filepath.Join("testdata", "testdriver.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	var d testDriverFile
	if err := yaml.UnmarshalStrict(data, &d); err != nil {
		t.Fatalf("testdata/testdriver.yaml: %v", err)
	}
	values, err := os.ReadFile(filepath.Join("..", "..", "charts", "csi-dmthin", "values.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	var chart struct {
		DriverName                 string
		StorageClasses             []struct{ Name, FsType string }
		VolumeSnapshotClasses      []struct{ Name string }
		VolumeGroupSnapshotClasses []struct{ Name string }
	}
	if err := yaml.Unmarshal(values, &chart); err != nil {
		t.Fatal(err)
	}
	if d.DriverInfo.Name != chart.DriverName || d.DriverInfo.Name != driverName {
		t.Errorf("DriverInfo.Name %q, chart's driverName %q, the tests' %q", d.DriverInfo.Name, chart.DriverName, driverName)
	}
	if len(chart.StorageClasses) == 0 || d.StorageClass.FromExistingClassName != chart.StorageClasses[0].Name {
		t.Errorf("StorageClass.FromExistingClassName %q is not the chart's first class %+v", d.StorageClass.FromExistingClassName, chart.StorageClasses)
	}
	if len(chart.VolumeSnapshotClasses) == 0 || d.SnapshotClass.FromExistingClassName != chart.VolumeSnapshotClasses[0].Name {
		t.Errorf("SnapshotClass.FromExistingClassName %q is not the chart's first class %+v", d.SnapshotClass.FromExistingClassName, chart.VolumeSnapshotClasses)
	}
	if len(chart.VolumeGroupSnapshotClasses) == 0 || d.GroupSnapshotClass.FromExistingClassName != chart.VolumeGroupSnapshotClasses[0].Name {
		t.Errorf("GroupSnapshotClass.FromExistingClassName %q is not the chart's first class %+v", d.GroupSnapshotClass.FromExistingClassName, chart.VolumeGroupSnapshotClasses)
	}
	if !reflect.DeepEqual(d.DriverInfo.TopologyKeys, []string{csi.TopologyKey}) || d.DriverInfo.NumAllowedTopologies != 1 {
		t.Errorf("topology %v x%d, want [%s] x1", d.DriverInfo.TopologyKeys, d.DriverInfo.NumAllowedTopologies, csi.TopologyKey)
	}
	for c := range d.DriverInfo.Capabilities {
		if !slices.Contains(suiteCapabilities, c) {
			t.Errorf("capability %q is not one the suite knows", c)
		}
	}
	// What csi-dmthin does, declared; what it does not, left out.
	for _, c := range []string{"persistence", "block", "fsGroup", "exec", "snapshotDataSource", "pvcDataSource",
		"multipods", "controllerExpansion", "nodeExpansion", "onlineExpansion", "offlineExpansion",
		"topology", "singleNodeVolume", "capacity", "readWriteOncePod", "groupSnapshot"} {
		if !d.DriverInfo.Capabilities[c] {
			t.Errorf("capability %s is not declared", c)
		}
	}
	for _, c := range []string{"RWX", "capReadOnlyMany", "volumeMountGroup", "snapshotMetadata", "FSResizeFromSourceNotSupported"} {
		if d.DriverInfo.Capabilities[c] {
			t.Errorf("capability %s is declared, but csi-dmthin does not have it", c)
		}
	}
	for _, fs := range []string{"", "ext4", "xfs"} {
		if _, ok := d.DriverInfo.SupportedFsType[fs]; !ok {
			t.Errorf("fs type %q not declared", fs)
		}
	}
}

// The report parser counts passes, runtime skips by reason, failures of
// specs and of suite nodes, and tells our not-selected specs from the rest.
func TestParseGinkgoReport(t *testing.T) {
	report := `[{"SpecReports": [
 {"ContainerHierarchyTexts": ["External Storage [Driver: d]", "[Testpattern: Dynamic PV (ext4)] volumes"], "LeafNodeType": "It", "LeafNodeText": "should store data", "State": "passed"},
 {"ContainerHierarchyTexts": ["External Storage [Driver: d]", "[Testpattern: Dynamic PV (xfs)] volumes"], "LeafNodeType": "It", "LeafNodeText": "should store data", "State": "passed"},
 {"ContainerHierarchyTexts": ["External Storage [Driver: d]", "[Testpattern: Dynamic PV (ext4)] multiVolume [Slow]"], "LeafNodeType": "It", "LeafNodeText": "should access on different node", "State": "skipped", "Failure": {"Message": "Driver d doesn't support 2 nodes -- skipping\nmore"}},
 {"ContainerHierarchyTexts": ["External Storage [Driver: d]", "[Testpattern: Dynamic PV (xfs)] multiVolume [Slow]"], "LeafNodeType": "It", "LeafNodeText": "should access on different node", "State": "skipped", "Failure": {"Message": "Driver d doesn't support 3 nodes -- skipping"}},
 {"ContainerHierarchyTexts": ["External Storage [Driver: d]", "[Testpattern: Dynamic PV (ext4)] disruptive"], "LeafNodeType": "It", "LeafNodeText": "should mount [Feature:SELinux] [Disruptive]", "State": "skipped"},
 {"ContainerHierarchyTexts": ["[sig-node] Pods"], "LeafNodeType": "It", "LeafNodeText": "should run", "State": "skipped"},
 {"ContainerHierarchyTexts": ["External Storage [Driver: d]", "[Testpattern: Dynamic PV (ext4)] volume-expand"], "LeafNodeType": "It", "LeafNodeText": "should resize", "State": "failed", "Failure": {"Message": "timed out waiting for the condition"}},
 {"LeafNodeType": "SynchronizedBeforeSuite", "State": "passed"},
 {"LeafNodeType": "ReportAfterSuite", "State": "timedout", "Failure": {"Message": "suite timeout"}}
]}]`
	res, err := parseGinkgoReport([]byte(report), func(name string) bool { return !strings.Contains(name, "[Feature:SELinux]") })
	if err != nil {
		t.Fatal(err)
	}
	if res.Passed != 2 {
		t.Errorf("passed %d, want 2", res.Passed)
	}
	if len(res.Failed) != 2 || !strings.Contains(res.Failed[0].Name, "should resize") || !strings.HasPrefix(res.Failed[1].Message, "timedout: suite timeout") {
		t.Errorf("failed %+v, want the expansion spec and the timed-out suite node", res.Failed)
	}
	if want := map[string][]string{"Driver d doesn't support N nodes -- skipping": {
		"External Storage [Driver: d] [Testpattern: Dynamic PV (ext4)] multiVolume [Slow] should access on different node",
		"External Storage [Driver: d] [Testpattern: Dynamic PV (xfs)] multiVolume [Slow] should access on different node",
	}}; !reflect.DeepEqual(res.Skipped, want) {
		t.Errorf("skipped %q, want %q", res.Skipped, want)
	}
	if len(res.NotSelected) != 1 || res.Other != 1 {
		t.Errorf("not selected %q, other %d; want the SELinux spec and 1", res.NotSelected, res.Other)
	}
	md := res.markdown("fast", 0, "left out")
	for _, want := range []string{"| 2 | 2 | 2 | 1 |", "- 2: Driver d doesn't support N nodes", "- 1: needs a node that enforces SELinux"} {
		if !strings.Contains(md, want) {
			t.Errorf("summary lacks %q:\n%s", want, md)
		}
	}
	if _, err := parseGinkgoReport([]byte(`[]`), func(string) bool { return true }); err == nil {
		t.Error("an empty report parsed")
	}
}

// The selections skip what is not applicable, and the parallel one also
// what is Slow or Serial.
func TestStorageSelections(t *testing.T) {
	fast := regexp.MustCompile(storageSelections["parallel"].skipPattern())
	full := regexp.MustCompile(storageSelections["full"].skipPattern())
	for name, want := range map[string][2]bool{ // skipped by fast, by full
		"External Storage [Driver: d] [Testpattern: Dynamic PV (ext4)] volumes should store data":                                     {false, false},
		"External Storage [Driver: d] [Testpattern: Dynamic PV (xfs)] multiVolume should access [Slow]":                               {true, false},
		"External Storage [Driver: d] [Testpattern: Dynamic PV (default fs)] capacity provides storage capacity information [Serial]": {true, false},
		"External Storage [Driver: d] [Testpattern: Dynamic PV (ext4)] disruptive should unmount [Disruptive] [Slow]":                 {true, true},
		"External Storage [Driver: d] volume-modify [Feature:VolumeAttributesClass] should modify":                                    {true, true},
		"External Storage [Driver: d] snapshottable [Feature:VolumeSnapshotDataSource] should restore":                                {false, false},
		"External Storage [Driver: d] seLinux [Feature:SELinux] should mount":                                                         {true, true},
		"External Storage [Driver: d] [Testpattern:  (delete policy)] volumegroupsnapshottable [Feature:volumegroupsnapshot] should":  {true, true},
	} {
		if got := [2]bool{fast.MatchString(name), full.MatchString(name)}; got != want {
			t.Errorf("%s: skipped by parallel, full = %v, want %v", name, got, want)
		}
	}
}

// A selection that names suites runs only those, and still skips what its
// skip pattern and the not applicable ones say.
func TestStorageSelectionSuites(t *testing.T) {
	sel := storageSelection{suites: []string{"provisioning", "topology"}, skip: `\[Slow\]`}
	for name, want := range map[string]bool{
		"External Storage [Driver: d] [Testpattern: Dynamic PV (ext4)] provisioning should provision storage with pvc data source":        true,
		"External Storage [Driver: d] [Testpattern: Dynamic PV (delayed binding)] topology should provision a volume and schedule a pod":  true,
		"External Storage [Driver: d] [Testpattern: Dynamic PV (ext4)] provisioning should provision storage with pvc data source [Slow]": false,
		"External Storage [Driver: d] [Testpattern: Dynamic PV (ext4)] volumes should store data":                                         false,
		"External Storage [Driver: d] [Testpattern: Dynamic PV (ext4)] subPath should support existing directory provisioning":            false,
		"External Storage [Driver: d] [Testpattern: Dynamic PV (ext4)] disruptive [Disruptive] topology should":                           false,
	} {
		if got := sel.selected(name); got != want {
			t.Errorf("%s: selected %v, want %v", name, got, want)
		}
	}
}

// The group set runs the group snapshot suite alone, on one schedulable
// node; the parallel and full sets leave it to it.
func TestGroupStorageSet(t *testing.T) {
	group := storageSelections["group"]
	if !group.oneNode {
		t.Errorf("group %+v: not on one node", group)
	}
	for name, want := range map[string]bool{
		"External Storage [Driver: d] [Testpattern:  (delete policy)] volumegroupsnapshottable [Feature:volumegroupsnapshot] VolumeGroupSnapshottable  should create snapshots": true,
		"External Storage [Driver: d] [Testpattern: Pre-provisioned VolumeGroupSnapshot (retain policy)] volumegroupsnapshottable [Feature:volumegroupsnapshot] should":         true,
		"External Storage [Driver: d] [Testpattern: Dynamic PV (ext4)] volumes should store data":                                                                               false,
		"External Storage [Driver: d] [Testpattern: Dynamic Snapshot (delete policy)] snapshottable [Feature:VolumeSnapshotDataSource] should":                                  false,
	} {
		if got := group.selected(name); got != want {
			t.Errorf("%s: selected %v, want %v", name, got, want)
		}
	}
}

// make test's set runs the topology and capacity suites, nothing else.
func TestFastStorageSet(t *testing.T) {
	fast := storageSelections["fast"]
	for name, want := range map[string]bool{
		"External Storage [Driver: d] [Testpattern: Dynamic PV (delayed binding)] topology should provision a volume and schedule a pod with AllowedTopologies": true,
		"External Storage [Driver: d] [Testpattern: Dynamic PV (default fs)] capacity provides storage capacity information":                                    true,
		"External Storage [Driver: d] [Testpattern: Dynamic PV (default fs)] provisioning should provision storage with pvc data source":                        false,
		"External Storage [Driver: d] [Testpattern: Dynamic PV (ext4)] volumes should store data":                                                               false,
		"External Storage [Driver: d] [Testpattern: Dynamic PV (delayed binding)] topology should fail to schedule a pod [Slow]":                                false,
	} {
		if got := fast.selected(name); got != want {
			t.Errorf("%s: selected %v, want %v", name, got, want)
		}
	}
}

// A set names one selection or several joined by "+", none twice.
func TestStorageRuns(t *testing.T) {
	for set, want := range map[string][]string{
		"fast":       {"fast"},
		"full":       {"full", "disruptive"},
		"disruptive": {"disruptive"},
		"fast+group": {"fast", "group"},
		"full+group": {"full", "disruptive", "group"},
		"group":      {"group"},
	} {
		if got, err := storageRuns(set); err != nil || !slices.Equal(got, want) {
			t.Errorf("%s: %v, %v; want %v", set, got, err, want)
		}
	}
	for _, bad := range []string{"fastest", "fast+", "+group", "fast+fast", "full+disruptive", "disruptive+full"} {
		if _, err := storageRuns(bad); err == nil {
			t.Errorf("%s accepted", bad)
		}
	}
}

// The Disruptive specs run in a selection of their own, one at a time,
// with the SSH checks: all of them but the SELinux ones (not applicable),
// nothing else.
func TestDisruptiveStorageSet(t *testing.T) {
	sel := storageSelections["disruptive"]
	if sel.procs != 1 || !sel.disruptive {
		t.Errorf("disruptive %+v: want one process and the SSH checks", sel)
	}
	for name, want := range map[string]bool{
		"External Storage [Driver: d] [Testpattern: Dynamic PV (block volmode)] disruptive [LinuxOnly] [Provider:gce,aws,local,azure] Should test that pv written before kubelet restart is readable after restart. [Disruptive]":                                                                                                   true,
		"External Storage [Driver: d] [Testpattern: Dynamic PV (default fs)] subPath should unmount if pod is force deleted while kubelet is down [LinuxOnly] [Disruptive] [Slow]":                                                                                                                                                  true,
		"External Storage [Driver: d] [Testpattern: Dynamic PV (filesystem volmode)] disruptive [LinuxOnly] [Provider:gce,aws,local,azure] Should test that pv used in a pod that is deleted while the kubelet is down is usable by a new pod with a different SELinux context when kubelet returns [Feature:SELinux] [Disruptive]": false,
		"External Storage [Driver: d] [Testpattern: Dynamic PV (ext4)] volumes should store data":                                 false,
		"External Storage [Driver: d] [Testpattern: Dynamic PV (default fs)] subPath should support restarting containers [Slow]": false,
	} {
		if got := sel.selected(name); got != want {
			t.Errorf("%s: selected %v, want %v", name, got, want)
		}
	}
}

// Each applicable spec runs in exactly one part of the full set, the group
// suite's in none (the group set's); make test's set runs no Disruptive spec.
func TestFullStorageSetRunsEachSpecOnce(t *testing.T) {
	parts, err := storageRuns("full")
	if err != nil {
		t.Fatal(err)
	}
	for name, want := range map[string]int{
		"External Storage [Driver: d] [Testpattern: Dynamic PV (ext4)] volumes should store data":                                                                                                  1,
		"External Storage [Driver: d] [Testpattern: Dynamic PV (xfs)] multiVolume should access [Slow]":                                                                                            1,
		"External Storage [Driver: d] [Testpattern: Dynamic PV (default fs)] subPath should unmount if pod is force deleted while kubelet is down [LinuxOnly] [Disruptive] [Slow]":                 1,
		"External Storage [Driver: d] [Testpattern: Dynamic PV (block volmode)] disruptive [LinuxOnly] Should test that pv written before kubelet restart is readable after restart. [Disruptive]": 1,
		"External Storage [Driver: d] seLinux [Feature:SELinux] should mount":                                                                                                                      0,
		"External Storage [Driver: d] [Testpattern:  (delete policy)] volumegroupsnapshottable [Feature:volumegroupsnapshot] should":                                                               0,
	} {
		got := 0
		for _, p := range parts {
			if storageSelections[p].selected(name) {
				got++
			}
		}
		if got != want {
			t.Errorf("%s: run by %d parts of the full set, want %d", name, got, want)
		}
	}
	for _, set := range []string{"fast", "parallel"} {
		name := "External Storage [Driver: d] [Testpattern: Dynamic PV (block volmode)] disruptive [LinuxOnly] Should test that pv written before kubelet restart is readable after restart. [Disruptive]"
		if storageSelections[set].selected(name) {
			t.Errorf("the %s set runs a Disruptive spec beside others", set)
		}
	}
}

// CSI_DMTHIN_E2E_ONLY narrows a selection and keeps its own narrowing.
func TestNarrowedSelection(t *testing.T) {
	block := "External Storage [Driver: dmthin.csi.dmthin.io] [Testpattern: Dynamic PV (block volmode)] multiVolume [Slow] should access to two volumes with the same volume mode and retain data across pod recreation on the same node"
	fs := strings.Replace(block, "(block volmode)", "(default fs)", 1)
	kubelet := "External Storage [Driver: dmthin.csi.dmthin.io] [Testpattern: Dynamic PV (block volmode)] disruptive [Disruptive] [LinuxOnly] Should test that pv used in a pod that is deleted while the kubelet is down cleans up when the kubelet returns."
	full, err := narrowed(storageSelections["full"], `block volmode.*multiVolume.*same volume mode and retain`)
	if err != nil {
		t.Fatal(err)
	}
	if !full.selected(block) || full.selected(fs) || full.selected(kubelet) {
		t.Errorf("full narrowed to the block multiVolume spec: block %v, fs %v, kubelet %v", full.selected(block), full.selected(fs), full.selected(kubelet))
	}
	dis, err := narrowed(storageSelections["disruptive"], `block volmode`)
	if err != nil {
		t.Fatal(err)
	}
	if !dis.selected(kubelet) || dis.selected(block) {
		t.Errorf("disruptive narrowed to block: kubelet spec %v, multiVolume spec %v", dis.selected(kubelet), dis.selected(block))
	}
	if same, _ := narrowed(storageSelections["full"], ""); same.focusPattern() != storageSelections["full"].focusPattern() {
		t.Error("an empty pattern changed the selection")
	}
	if _, err := narrowed(storageSelections["full"], "("); err == nil || !strings.Contains(err.Error(), onlyEnv) {
		t.Errorf("a bad pattern: %v", err)
	}
}
