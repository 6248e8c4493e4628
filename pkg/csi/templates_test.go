package csi

import (
	"slices"
	"strings"
	"testing"
	"time"

	csipb "github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc/codes"

	"github.com/csi-dmthin/csi-dmthin/pkg/thinpool"
)

// waitTemplates waits (bounded; not a timing assertion) until pool holds
// exactly the sealed templates named and no build is in progress.
func waitTemplates(t *testing.T, e *driverEnv, want ...string) {
	t.Helper()
	want = slices.Sorted(slices.Values(want))
	deadline := time.Now().Add(20 * time.Second)
	for {
		var have []string
		for _, v := range e.pools[testPool].List() {
			if v.Kind == thinpool.KindTemplate && v.Sealed {
				have = append(have, v.Name)
			}
		}
		e.d.templates.mu.Lock()
		busy := len(e.d.templates.building)
		e.d.templates.mu.Unlock()
		if busy == 0 && strings.Join(have, ",") == strings.Join(want, ",") {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("templates %v (%d building), want %v", have, busy, want)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func volID(name string) string { return testPool + "/" + name }

func createFS(t *testing.T, e *driverEnv, name string, sizeBytes int64, c *csipb.VolumeCapability) *thinpool.Volume {
	t.Helper()
	resp, err := e.d.CreateVolume(t.Context(), &csipb.CreateVolumeRequest{
		Name: name, CapacityRange: &csipb.CapacityRange{RequiredBytes: sizeBytes},
		VolumeCapabilities: []*csipb.VolumeCapability{c},
	})
	if err != nil {
		t.Fatal(err)
	}
	id, _ := parseID(resp.GetVolume().GetVolumeId())
	v, err := e.pools[id.pool].Get(id.name)
	if err != nil {
		t.Fatal(err)
	}
	return v
}

func TestTemplates(t *testing.T) {
	e := newDriverEnvTemplates(t, 2)
	const size = testVolBytes
	tmpl := templateName("ext4", size)

	// The first volume of a size is empty and starts the template's build.
	first := createFS(t, e, "first", size, fsCap)
	if first.Source != "" {
		t.Fatalf("first volume of its size came from %q", first.Source)
	}
	waitTemplates(t, e, tmpl)
	if n := e.fs.mkfs["ext4"]; n != 1 {
		t.Fatalf("%d mkfs for the template, want 1", n)
	}

	// The next one is its clone and needs no mkfs at stage.
	second := createFS(t, e, "second", size, fsCap)
	if second.Source != tmpl {
		t.Fatalf("second volume came from %q, want the template", second.Source)
	}
	mustOK(t, "stage second", e.stage(volID("second"), e.path("staging", "second"), fsCap, nil))
	if n := e.fs.mkfs["ext4"]; n != 1 {
		t.Fatalf("staging a clone of the template ran mkfs (%d in all)", n)
	}
	if m := e.fs.mountTable()[e.path("staging", "second")]; m.FSType != "ext4" {
		t.Fatalf("clone staged as %+v", m)
	}
	mustOK(t, "stage first", e.stage(volID("first"), e.path("staging", "first"), fsCap, nil))
	if n := e.fs.mkfs["ext4"]; n != 2 {
		t.Fatalf("staging the empty first volume: %d mkfs in all, want 2", n)
	}

	// Repeating the request returns the clone; the template is no source
	// a caller asked for.
	again := createFS(t, e, "second", size, fsCap)
	if again.DeviceID != second.DeviceID {
		t.Fatalf("repeated CreateVolume made %+v", again)
	}

	// Neither ListVolumes nor a volume call sees templates.
	list, err := e.d.ListVolumes(t.Context(), &csipb.ListVolumesRequest{})
	if err != nil {
		t.Fatal(err)
	}
	for _, entry := range list.GetEntries() {
		if strings.Contains(entry.GetVolume().GetVolumeId(), templatePrefix) {
			t.Errorf("ListVolumes shows template %s", entry.GetVolume().GetVolumeId())
		}
	}
	if len(list.GetEntries()) != 2 {
		t.Errorf("ListVolumes: %d entries, want 2", len(list.GetEntries()))
	}
	wantCode(t, e.stage(volID(tmpl), e.path("staging", "t"), fsCap, nil), codes.NotFound, "template")
	// A CSI name that looks like a template's is hashed.
	if dn := deviceName(tmpl); dn == tmpl || !strings.HasPrefix(dn, hashedPrefix) {
		t.Errorf("deviceName(%q) = %q", tmpl, dn)
	}

	// A raw block volume is never a template's clone.
	if b := createFS(t, e, "raw", size, blockCap(rwo)); b.Source != "" {
		t.Errorf("block volume came from %q", b.Source)
	}

	// Two templates at most: a third size evicts the least recently used.
	createFS(t, e, "other-size", 2*size, fsCap)
	waitTemplates(t, e, templateName("ext4", 2*size), tmpl)
	time.Sleep(2 * time.Millisecond)
	createFS(t, e, "uses-first", size, fsCap) // tmpl is now the most recent
	createFS(t, e, "third-size", 3*size, fsCap)
	waitTemplates(t, e, tmpl, templateName("ext4", 3*size))

	// Deleting every volume leaves the templates, which are not volumes.
	for _, name := range []string{"second", "first"} {
		mustOK(t, "unstage "+name, e.unstage(volID(name), e.path("staging", name)))
	}
	for _, name := range []string{"first", "second", "raw", "other-size", "uses-first", "third-size"} {
		if _, err := e.d.DeleteVolume(t.Context(), &csipb.DeleteVolumeRequest{VolumeId: volID(name)}); err != nil {
			t.Fatal(err)
		}
	}
	if left := leftovers(e.d, e.pools[testPool]); len(left) != 0 {
		t.Errorf("left: %v", left)
	}
	u, err := e.pools[testPool].Usage()
	if err != nil || u.Volumes != 0 || u.Templates != 2 || u.ProvisionedBytes != 0 {
		t.Errorf("usage %+v, %v", u, err)
	}
}

func TestTemplatesOff(t *testing.T) {
	e := newDriverEnvTemplates(t, -1)
	createFS(t, e, "a", testVolBytes, fsCap)
	if v := createFS(t, e, "b", testVolBytes, fsCap); v.Source != "" {
		t.Fatalf("volume came from %q with templates off", v.Source)
	}
	for _, v := range e.pools[testPool].List() {
		if v.Kind == thinpool.KindTemplate {
			t.Fatalf("template %s made with templates off", v.Name)
		}
	}
}

// A template is built only for a size a volume was admitted for: a
// CreateVolume the pool refuses for lack of space (a petabyte, say) starts
// no build, leaves no template and evicts none, however full the
// templates are.
func TestTemplatesAfterAdmission(t *testing.T) {
	e := newDriverEnvTemplates(t, 2)
	a, b := templateName("ext4", testVolBytes), templateName("ext4", 2*testVolBytes)
	createFS(t, e, "a", testVolBytes, fsCap)
	createFS(t, e, "b", 2*testVolBytes, fsCap)
	waitTemplates(t, e, a, b)
	before := e.pools[testPool].List()
	for _, size := range []int64{1 << 50, 100 * testPoolBytes} {
		for _, c := range []*csipb.VolumeCapability{fsCap, mountCap("xfs", rwo)} {
			_, err := e.d.CreateVolume(t.Context(), &csipb.CreateVolumeRequest{
				Name: "huge", CapacityRange: &csipb.CapacityRange{RequiredBytes: size},
				VolumeCapabilities: []*csipb.VolumeCapability{c},
			})
			wantCode(t, err, codes.ResourceExhausted)
		}
	}
	waitTemplates(t, e, a, b) // and for any build the refusals started
	if after := e.pools[testPool].List(); !slices.Equal(after, before) {
		t.Errorf("refused CreateVolumes changed the pool:\nbefore %+v\nafter  %+v", before, after)
	}
	if n := e.fs.mkfs["ext4"] + e.fs.mkfs["xfs"]; n != 2 {
		t.Errorf("%d mkfs in all, want the 2 for the admitted sizes", n)
	}
}

// A template pinned between its lookup and the Clone of it is never
// evicted: a build that needs its place gives up instead, and takes it once
// the Clone is done.
func TestTemplatePinned(t *testing.T) {
	e := newDriverEnvTemplates(t, 1)
	a, b := templateName("ext4", testVolBytes), templateName("ext4", 2*testVolBytes)
	createFS(t, e, "a", testVolBytes, fsCap)
	waitTemplates(t, e, a)
	got, release := e.d.templates.lookup(e.pools[testPool], "ext4", testVolBytes)
	if got != a {
		t.Fatalf("lookup = %q, want %s", got, a)
	}
	createFS(t, e, "b", 2*testVolBytes, fsCap) // builds b, which needs a's place
	waitTemplates(t, e, a)
	for _, v := range e.pools[testPool].List() {
		if v.Name == b {
			t.Errorf("the build that found no room left %+v", v)
		}
	}
	// Cloned while pinned: still there.
	if v, err := e.pools[testPool].Clone(t.Context(), "clone", a, testVolBytes); err != nil || v.Source != a {
		t.Fatalf("Clone of the pinned template: %+v, %v", v, err)
	}
	release()
	release() // twice is once
	createFS(t, e, "b2", 2*testVolBytes, fsCap)
	waitTemplates(t, e, b)
}
