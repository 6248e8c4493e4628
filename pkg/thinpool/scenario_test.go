package thinpool

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/csi-dmthin/csi-dmthin/pkg/devmapper"
)

// env is a kernel to run the scenarios and the kernel contract
// (kernelcontract_test.go) on: the fake kernel on the host
// (env_fake_test.go), the real one in the VM (env_kernel_test.go). The same
// tests on both keep the fake honest.
type env interface {
	kernel() Kernel
	// disk returns a new block device of sizeBytes that reads as zeros and
	// lasts until the test ends: a loop device on a sparse file in the VM,
	// a fake disk on the host.
	disk(t *testing.T, sizeBytes int64) Dev
	// writeDev and readDev go through the block device dev, as a program
	// using its node does (with O_DIRECT in the VM: offsets and lengths in
	// whole sectors). readDev fails the test on an error.
	writeDev(t *testing.T, dev Dev, off int64, b []byte) error
	readDev(t *testing.T, dev Dev, off int64, n int) []byte
	// holdDev opens dev, as a mount would, until release.
	holdDev(t *testing.T, dev Dev) (release func())
	// write and read go through the volume's active block device.
	write(t *testing.T, p *Pool, vol string, off int64, b []byte) error
	read(t *testing.T, p *Pool, vol string, off int64, n int) []byte
	// hold opens the volume's device (as a mount would) until release.
	hold(t *testing.T, p *Pool, vol string) (release func())
	// reboot removes every dm device (and, for real, lets the loop devices
	// go), as a reboot does; pool metadata and records stay.
	reboot(t *testing.T, p *Pool)
	// swapFiles swaps the content of two files backing loop devices, as
	// renaming them would; neither may be attached.
	swapFiles(t *testing.T, a, b string)
	// writeFile writes b at off into a file that will back a loop device.
	writeFile(t *testing.T, path string, off int64, b []byte)
}

var ctx = context.Background()

func testConfig(t *testing.T, name string, dataBytes int64) Config {
	dir := t.TempDir()
	return Config{
		Name: name, StateDir: filepath.Join(dir, "state"),
		DataFile: filepath.Join(dir, "data"), MetadataFile: filepath.Join(dir, "meta"),
		DataFileBytes: dataBytes, MetadataFileBytes: 16 << 20,
	}
}

func openPool(t *testing.T, e env, cfg Config, opts ...Option) *Pool {
	t.Helper()
	p, err := Open(ctx, cfg, e.kernel(), opts...)
	if err != nil {
		t.Fatal(err)
	}
	return p
}

// teardown deletes everything in the pool and removes its dm device, so the
// next test starts clean on the same kernel.
func teardown(t *testing.T, e env, p *Pool) {
	t.Helper()
	for _, v := range p.List() {
		if err := p.Delete(ctx, v.Name); err != nil {
			t.Errorf("teardown: delete %s: %v", v.Name, err)
		}
	}
	p.Close()
	if err := e.kernel().Remove(p.dev, false); err != nil && !errors.Is(err, unix.ENXIO) {
		t.Errorf("teardown: remove pool: %v", err)
	}
}

func pattern(seed byte, n int) []byte {
	b := make([]byte, n)
	for i := range b {
		b[i] = seed + byte(i%251)
	}
	return b
}

// checkInvariants verifies, after a crash and reopen, that the records and
// the kernel agree: no thin id in the pool that no record owns (below the
// allocator's high-water mark), no dm device of ours without a record, and
// every record's device present in the pool.
func checkInvariants(t *testing.T, e env, p *Pool) {
	t.Helper()
	k := e.kernel()
	p.mu.Lock()
	defer p.mu.Unlock()
	owned := map[uint32]string{}
	for _, v := range p.vols {
		owned[v.DeviceID] = v.Name
	}
	// The sums Usage reads without the lock are the records'.
	if got, want := p.sums, sumsOf(p.vols); got != want {
		t.Errorf("the kept sums %+v differ from the records' %+v", got, want)
	}
	if got, want := *p.view.Load(), *p.currentView(); got != want {
		t.Errorf("the published view %+v is not the pool's %+v", got, want)
	}
	// Suspects are ids found taken that no record owns: recorded, and
	// deleted by the next Open, so not leaked.
	suspect := map[uint32]bool{}
	for _, id := range p.suspects {
		suspect[id] = true
	}
	// A delete of an unowned id must find nothing (ENODATA): anything else
	// is a leaked thin device. Owned ids must exist: create_thin on them
	// must say EEXIST. Both probes leave the pool as it was.
	for id := uint32(1); id < p.nextID+2; id++ {
		if name, ok := owned[id]; ok {
			if err := k.Message(p.dev, devmapper.CreateThin{DeviceID: id}); !errors.Is(err, unix.EEXIST) {
				t.Errorf("volume %s (thin id %d) missing from the pool: create_thin said %v", name, id, err)
			}
			continue
		}
		if suspect[id] {
			continue
		}
		if err := k.Message(p.dev, devmapper.Delete{DeviceID: id}); !errors.Is(err, unix.ENODATA) {
			t.Errorf("thin id %d leaked (no record owns it): delete said %v", id, err)
		}
	}
	if p.rec.Marker {
		if err := k.Message(p.dev, devmapper.CreateThin{DeviceID: markerDeviceID}); !errors.Is(err, unix.EEXIST) {
			t.Errorf("the pool's marker (thin id %d) is missing: create_thin said %v", markerDeviceID, err)
		}
	}
	list, err := k.List()
	if err != nil {
		t.Fatal(err)
	}
	for _, d := range list {
		if !strings.HasPrefix(d.UUID, p.uuidPrefix()) || d.UUID == p.uuidPrefix()+"pool" {
			continue
		}
		found := false
		for _, v := range p.vols {
			if d.Name == p.volDMName(v.Name) && d.UUID == p.volUUID(v.DeviceID) {
				found = true
			}
		}
		if !found {
			t.Errorf("dm device %s (%s) leaked", d.Name, d.UUID)
		}
		if info, err := k.Info(d.Dev); err == nil && info.Suspended {
			t.Errorf("dm device %s left suspended", d.Name)
		}
	}
	ps, err := p.poolStatus()
	if err != nil {
		t.Fatal(err)
	}
	if ps.TransactionID != p.tid {
		t.Errorf("pool transaction id %d, records %d", ps.TransactionID, p.tid)
	}
}

func runScenarios(t *testing.T, newEnv func(t *testing.T) env) {
	t.Run("CreateActivateWriteDelete", func(t *testing.T) {
		e := newEnv(t)
		p := openPool(t, e, testConfig(t, "basic", 256<<20))
		defer teardown(t, e, p)
		v, err := p.CreateVolume(ctx, "vol-a", 32<<20+1)
		if err != nil {
			t.Fatal(err)
		}
		if v.SizeBytes != 32<<20+4096 || v.Kind != KindVolume || v.DeviceID == 0 {
			t.Fatalf("volume %+v", v)
		}
		again, err := p.CreateVolume(ctx, "vol-a", 32<<20+1)
		if err != nil || again.DeviceID != v.DeviceID {
			t.Fatalf("idempotent create: %+v, %v", again, err)
		}
		if _, err := p.CreateVolume(ctx, "vol-a", 64<<20); !errors.Is(err, ErrAlreadyExists) {
			t.Fatalf("create with another size: %v", err)
		}
		data := pattern(1, 192<<10)
		if err := e.write(t, p, "vol-a", 4096, data); err != nil {
			t.Fatal(err)
		}
		if got := e.read(t, p, "vol-a", 4096, len(data)); !bytes.Equal(got, data) {
			t.Fatal("read back differs")
		}
		u, err := p.Usage()
		if err != nil || u.Volumes != 1 || u.ProvisionedBytes != v.SizeBytes || u.DataUsedBytes < int64(len(data)) || u.AvailableBytes <= 0 {
			t.Fatalf("usage %+v, %v", u, err)
		}
		// Busy: an open device is neither deactivated nor deleted at once.
		release := e.hold(t, p, "vol-a")
		if err := p.Deactivate(ctx, "vol-a"); !errors.Is(err, ErrBusy) {
			t.Fatalf("deactivate while open: %v", err)
		}
		if err := p.Delete(ctx, "vol-a"); err != nil {
			t.Fatalf("delete while open: %v", err)
		}
		if _, err := p.Get("vol-a"); !errors.Is(err, ErrNotFound) {
			t.Fatalf("get of a pending delete: %v", err)
		}
		release()
		// Open (or any later operation, or Reap) finishes the delete once
		// the kernel has removed the device after its last close.
		p.Close()
		p = openPool(t, e, p.cfg)
		deadline := time.Now().Add(10 * time.Second)
		for len(p.vols) != 0 && time.Now().Before(deadline) {
			time.Sleep(20 * time.Millisecond)
			if err := p.Reap(ctx); err != nil {
				t.Fatal(err)
			}
		}
		if n := len(p.vols); n != 0 {
			t.Fatalf("%d records after the deferred delete", n)
		}
		checkInvariants(t, e, p)
		if err := p.Delete(ctx, "vol-a"); err != nil {
			t.Fatalf("deleting what is gone: %v", err)
		}
	})

	t.Run("SnapshotAndClone", func(t *testing.T) {
		e := newEnv(t)
		p := openPool(t, e, testConfig(t, "snap", 256<<20))
		defer teardown(t, e, p)
		if _, err := p.CreateVolume(ctx, "origin", 16<<20); err != nil {
			t.Fatal(err)
		}
		a := pattern(7, 128<<10)
		if err := e.write(t, p, "origin", 0, a); err != nil {
			t.Fatal(err)
		}
		s, err := p.Snapshot(ctx, "snap-1", "origin")
		if err != nil {
			t.Fatal(err)
		}
		if s.Kind != KindSnapshot || s.Source != "origin" || s.SizeBytes != 16<<20 {
			t.Fatalf("snapshot %+v", s)
		}
		if err := e.write(t, p, "origin", 0, pattern(9, len(a))); err != nil {
			t.Fatal(err)
		}
		if got := e.read(t, p, "snap-1", 0, len(a)); !bytes.Equal(got, a) {
			t.Fatal("snapshot does not hold the origin's data at snapshot time")
		}
		c, err := p.Clone(ctx, "clone-1", "snap-1", 32<<20)
		if err != nil {
			t.Fatal(err)
		}
		if c.Kind != KindVolume || c.SizeBytes != 32<<20 {
			t.Fatalf("clone %+v", c)
		}
		if got := e.read(t, p, "clone-1", 0, len(a)); !bytes.Equal(got, a) {
			t.Fatal("clone does not hold the snapshot's data")
		}
		if _, err := p.Clone(ctx, "small", "origin", 4<<20); !errors.Is(err, ErrInvalid) {
			t.Fatalf("clone smaller than its source: %v", err)
		}
		if _, err := p.Snapshot(ctx, "snap-2", "missing"); !errors.Is(err, ErrNotFound) {
			t.Fatalf("snapshot of a missing volume: %v", err)
		}
		// The origin can go; its snapshot and clone stay whole.
		if err := p.Deactivate(ctx, "origin"); err != nil {
			t.Fatal(err)
		}
		if err := p.Delete(ctx, "origin"); err != nil {
			t.Fatal(err)
		}
		if got := e.read(t, p, "clone-1", 0, len(a)); !bytes.Equal(got, a) {
			t.Fatal("clone lost data when the origin was deleted")
		}
		checkInvariants(t, e, p)
	})

	t.Run("Templates", func(t *testing.T) {
		e := newEnv(t)
		cfg := testConfig(t, "tmpl", 64<<20)
		cfg.OverprovisionRatio = 2
		p := openPool(t, e, cfg)
		defer func() { teardown(t, e, p) }()
		// mkfs writes into a template in proportion to its size before
		// anything is cloned from it: one larger than the free data above
		// the 10% floor is refused, and nothing is left of it.
		if _, err := p.CreateTemplate(ctx, "t-huge", 60<<20); !errors.Is(err, ErrNoSpace) {
			t.Fatalf("a template larger than the free data above the floor: %v", err)
		}
		if _, err := p.Get("t-huge"); !errors.Is(err, ErrNotFound) {
			t.Fatalf("a refused template was recorded: %v", err)
		}
		tm, err := p.CreateTemplate(ctx, "t-base", 48<<20)
		if err != nil {
			t.Fatal(err)
		}
		if tm.Kind != KindTemplate || tm.Sealed {
			t.Fatalf("new template %+v", tm)
		}
		data := pattern(7, 128<<10)
		if err := e.write(t, p, "t-base", 8192, data); err != nil {
			t.Fatal(err)
		}
		if _, err := p.Clone(ctx, "early", "t-base", 0); !errors.Is(err, ErrInvalid) {
			t.Fatalf("clone of an unsealed template: %v", err)
		}
		if err := p.SealTemplate(ctx, "t-base"); !errors.Is(err, ErrBusy) {
			t.Fatalf("seal while active: %v", err)
		}
		if err := p.Deactivate(ctx, "t-base"); err != nil {
			t.Fatal(err)
		}
		if err := p.SealTemplate(ctx, "t-base"); err != nil {
			t.Fatal(err)
		}
		if err := p.SealTemplate(ctx, "t-base"); err != nil {
			t.Fatalf("sealing again: %v", err)
		}
		if _, err := p.Snapshot(ctx, "t-snap", "t-base"); !errors.Is(err, ErrInvalid) {
			t.Fatalf("snapshot of a template: %v", err)
		}
		v, err := p.Clone(ctx, "from-t", "t-base", 0)
		if err != nil {
			t.Fatal(err)
		}
		// The overprovisioning limit (2x of 64 MiB) counts the template's
		// 48 MiB and the clone's 48 MiB: 32 MiB more fit, 33 do not.
		if _, err := p.CreateVolume(ctx, "fits", 32<<20); err != nil {
			t.Fatalf("a volume within the limit, templates counted: %v", err)
		}
		if err := p.Delete(ctx, "fits"); err != nil {
			t.Fatal(err)
		}
		if _, err := p.CreateVolume(ctx, "too-big", 33<<20); !errors.Is(err, ErrNoSpace) {
			t.Fatalf("a volume past the overprovisioning limit, templates counted: %v", err)
		}
		if v.Kind != KindVolume || v.SizeBytes != 48<<20 || v.Source != "t-base" {
			t.Fatalf("clone of a template: %+v", v)
		}
		if got := e.read(t, p, "from-t", 8192, len(data)); !bytes.Equal(got, data) {
			t.Fatal("clone of a template does not hold its content")
		}
		u, err := p.Usage()
		if err != nil || u.Templates != 1 || u.Volumes != 1 || u.ProvisionedBytes != 48<<20 || u.TemplateBytes != 48<<20 {
			t.Fatalf("usage %+v, %v", u, err)
		}
		if err := p.SealTemplate(ctx, "from-t"); !errors.Is(err, ErrNotFound) {
			t.Fatalf("sealing a volume: %v", err)
		}
		// A template left unsealed (a crash while it was written) is
		// deleted at Open; a sealed one and its clones stay.
		if _, err := p.CreateTemplate(ctx, "t-half", 8<<20); err != nil {
			t.Fatal(err)
		}
		if err := e.write(t, p, "t-half", 0, data); err != nil {
			t.Fatal(err)
		}
		p.Close()
		e.reboot(t, p)
		p = openPool(t, e, cfg)
		if _, err := p.Get("t-half"); !errors.Is(err, ErrNotFound) {
			t.Fatalf("unsealed template after Open: %v", err)
		}
		if tm, err := p.Get("t-base"); err != nil || !tm.Sealed {
			t.Fatalf("sealed template after Open: %+v, %v", tm, err)
		}
		if got := e.read(t, p, "from-t", 8192, len(data)); !bytes.Equal(got, data) {
			t.Fatal("clone lost its content over a reboot")
		}
		// A template deleted under its clones leaves them whole.
		if err := p.Delete(ctx, "t-base"); err != nil {
			t.Fatal(err)
		}
		if got := e.read(t, p, "from-t", 8192, len(data)); !bytes.Equal(got, data) {
			t.Fatal("clone lost its content with its template")
		}
		checkInvariants(t, e, p)
	})

	t.Run("GroupSnapshot", func(t *testing.T) {
		e := newEnv(t)
		cfg := testConfig(t, "group", 256<<20)
		p := openPool(t, e, cfg)
		defer func() { teardown(t, e, p) }()
		var members []GroupMember
		for i := range 8 {
			name := fmt.Sprintf("db-%d", i)
			if _, err := p.CreateVolume(ctx, name, 8<<20); err != nil {
				t.Fatal(err)
			}
			if err := e.write(t, p, name, 0, pattern(byte(i), 64<<10)); err != nil {
				t.Fatal(err)
			}
			members = append(members, GroupMember{Name: name + "-snap", Source: name})
		}
		// Half of them inactive: a group mixes both.
		for i := 0; i < 8; i += 2 {
			if err := p.Deactivate(ctx, fmt.Sprintf("db-%d", i)); err != nil {
				t.Fatal(err)
			}
		}
		got, err := p.SnapshotGroup(ctx, "g", members)
		if err != nil || len(got) != 8 {
			t.Fatalf("group snapshot: %d, %v", len(got), err)
		}
		for i := range 8 {
			if err := e.write(t, p, fmt.Sprintf("db-%d", i), 0, pattern(byte(100+i), 64<<10)); err != nil {
				t.Fatal(err)
			}
		}
		for i, m := range members {
			if got := e.read(t, p, m.Name, 0, 64<<10); !bytes.Equal(got, pattern(byte(i), 64<<10)) {
				t.Fatalf("%s does not hold its source's data of the group's moment", m.Name)
			}
		}
		// Repeated: the same group. Overlapping another way: refused.
		if again, err := p.SnapshotGroup(ctx, "g", members); err != nil || len(again) != 8 || again[3].DeviceID != got[3].DeviceID {
			t.Fatalf("repeated group snapshot: %v", err)
		}
		if _, err := p.SnapshotGroup(ctx, "g", members[:3]); err != nil {
			t.Fatalf("a repeated request naming some of the group's members: %v", err)
		}
		if _, err := p.SnapshotGroup(ctx, "other", members[:2]); !errors.Is(err, ErrAlreadyExists) {
			t.Fatalf("a group taking another group's snapshot names: %v", err)
		}
		if _, err := p.SnapshotGroup(ctx, "g2", []GroupMember{{"n1", "db-0"}, {members[1].Name, "db-1"}}); !errors.Is(err, ErrAlreadyExists) {
			t.Fatalf("a group half of whose names are taken: %v", err)
		}
		if _, err := p.Get("n1"); !errors.Is(err, ErrNotFound) {
			t.Fatalf("a refused group left a member: %v", err)
		}
		for _, bad := range [][]GroupMember{
			nil,
			{{"a", "db-0"}, {"a", "db-1"}},
			{{"a", "db-0"}, {"b", "db-0"}},
			{{"a", "db-0"}, {"db-0", "db-1"}},
			{{"a/b", "db-0"}},
		} {
			if _, err := p.SnapshotGroup(ctx, "bad", bad); !errors.Is(err, ErrInvalid) {
				t.Errorf("group %v: %v", bad, err)
			}
		}
		if _, err := p.SnapshotGroup(ctx, "bad", []GroupMember{{"a", "missing"}}); !errors.Is(err, ErrNotFound) {
			t.Errorf("a group of a missing volume: %v", err)
		}
		if _, err := p.SnapshotGroup(ctx, "bad", []GroupMember{{"a", members[0].Name}}); !errors.Is(err, ErrNotFound) {
			t.Errorf("a group of a snapshot: %v", err)
		}
		list, err := p.GroupSnapshots("g")
		if err != nil || len(list) != 8 {
			t.Fatalf("GroupSnapshots: %d, %v", len(list), err)
		}
		if _, err := p.GroupSnapshots("none"); !errors.Is(err, ErrNotFound) {
			t.Fatalf("GroupSnapshots of no group: %v", err)
		}
		checkInvariants(t, e, p)
	})

	t.Run("GroupSnapshotAdmission", func(t *testing.T) {
		e := newEnv(t)
		cfg := testConfig(t, "gadmit", 64<<20)
		cfg.OverprovisionRatio = 1
		p := openPool(t, e, cfg)
		defer teardown(t, e, p)
		for _, n := range []string{"a", "b"} {
			if _, err := p.CreateVolume(ctx, n, 24<<20); err != nil {
				t.Fatal(err)
			}
		}
		// 48 MiB provisioned of a 64 MiB limit: a group of both would add
		// 48 more. Refused whole, nothing made.
		if _, err := p.SnapshotGroup(ctx, "g", []GroupMember{{"a-s", "a"}, {"b-s", "b"}}); !errors.Is(err, ErrNoSpace) {
			t.Fatalf("a group past the limit: %v", err)
		}
		if n := len(p.List()); n != 2 {
			t.Fatalf("%d devices after a refused group", n)
		}
		checkInvariants(t, e, p)
	})

	t.Run("Grow", func(t *testing.T) {
		e := newEnv(t)
		p := openPool(t, e, testConfig(t, "grow", 256<<20))
		defer teardown(t, e, p)
		if _, err := p.CreateVolume(ctx, "g", 8<<20); err != nil {
			t.Fatal(err)
		}
		if _, err := p.Activate(ctx, "g"); err != nil {
			t.Fatal(err)
		}
		v, err := p.Grow(ctx, "g", 24<<20)
		if err != nil || v.SizeBytes != 24<<20 {
			t.Fatalf("grow: %+v, %v", v, err)
		}
		tail := pattern(3, 4096)
		if err := e.write(t, p, "g", 24<<20-4096, tail); err != nil {
			t.Fatalf("write past the old end: %v", err)
		}
		if v, err := p.Grow(ctx, "g", 8<<20); err != nil || v.SizeBytes != 24<<20 {
			t.Fatalf("grow to less: %+v, %v", v, err)
		}
		if _, err := p.Grow(ctx, "nope", 8<<20); !errors.Is(err, ErrNotFound) {
			t.Fatalf("grow of a missing volume: %v", err)
		}
	})

	t.Run("BadInput", func(t *testing.T) {
		e := newEnv(t)
		p := openPool(t, e, testConfig(t, "bad", 64<<20))
		defer teardown(t, e, p)
		for _, name := range []string{"", "-x", "a/b", "a b", strings.Repeat("x", 81), "../etc"} {
			if _, err := p.CreateVolume(ctx, name, 1<<20); !errors.Is(err, ErrInvalid) {
				t.Errorf("create %q: %v", name, err)
			}
		}
		for _, size := range []int64{0, -1, 1 << 61} {
			if _, err := p.CreateVolume(ctx, "v", size); !errors.Is(err, ErrInvalid) {
				t.Errorf("create of %d bytes: %v", size, err)
			}
		}
		if _, err := p.Clone(ctx, "v", "v", 0); !errors.Is(err, ErrInvalid) {
			t.Errorf("self clone: %v", err)
		}
		if n := len(p.List()); n != 0 {
			t.Fatalf("bad input created %d volumes", n)
		}
		checkInvariants(t, e, p)
	})

	t.Run("Admission", func(t *testing.T) {
		e := newEnv(t)
		cfg := testConfig(t, "admit", 64<<20)
		cfg.OverprovisionRatio = 2
		p := openPool(t, e, cfg)
		defer teardown(t, e, p)
		u, err := p.Usage()
		if err != nil {
			t.Fatal(err)
		}
		// What the ratio allows, more than the free data: a thin volume
		// may be larger than the pool while the limit holds.
		if u.AvailableBytes != 2*u.DataBytes-u.ProvisionedBytes-u.TemplateBytes {
			t.Fatalf("capacity %+v, want twice the data less what is provisioned", u)
		}
		if _, err := p.CreateVolume(ctx, "big", 100<<20); err != nil {
			t.Fatalf("overprovisioned within the ratio: %v", err)
		}
		if _, err := p.CreateVolume(ctx, "too-big", 100<<20); !errors.Is(err, ErrNoSpace) {
			t.Fatalf("past the ratio: %v", err)
		}
		if _, err := p.Get("too-big"); !errors.Is(err, ErrNotFound) {
			t.Fatal("a refused volume was recorded")
		}
		u2, _ := p.Usage()
		if u2.AvailableBytes != u.AvailableBytes-100<<20 {
			t.Errorf("capacity %d then %d, want it 100 MiB less", u.AvailableBytes, u2.AvailableBytes)
		}
		// The largest volume reported is one admission takes, and one byte
		// more is refused, by Admit (which changes nothing) as by
		// CreateVolume; both name the pool.
		if err := p.Admit(u2.AvailableBytes+1, KindVolume); !errors.Is(err, ErrNoSpace) || !strings.HasPrefix(err.Error(), "pool admit: ") {
			t.Errorf("Admit one byte past the reported capacity: %v", err)
		}
		if err := p.Admit(u2.AvailableBytes, KindVolume); err != nil {
			t.Errorf("Admit of the reported capacity: %v", err)
		}
		if _, err := p.CreateVolume(ctx, "too-big", u2.AvailableBytes+1); !errors.Is(err, ErrNoSpace) || !strings.Contains(err.Error(), "pool admit: ") {
			t.Errorf("one byte past the reported capacity: %v", err)
		}
		if _, err := p.CreateVolume(ctx, "just-fits", u2.AvailableBytes); err != nil {
			t.Errorf("the reported capacity: %v", err)
		}
		checkInvariants(t, e, p)
	})

	t.Run("PoolFull", func(t *testing.T) {
		e := newEnv(t)
		cfg := testConfig(t, "full", 4<<20) // 64 blocks
		cfg.OverprovisionRatio = -1
		p := openPool(t, e, cfg)
		defer teardown(t, e, p)
		if _, err := p.CreateVolume(ctx, "hog", 64<<20); err != nil {
			t.Fatal(err)
		}
		keep := pattern(11, 64<<10)
		if err := e.write(t, p, "hog", 0, keep); err != nil {
			t.Fatal(err)
		}
		var werr error
		for off := int64(64 << 10); off < 64<<20 && werr == nil; off += 64 << 10 {
			werr = e.write(t, p, "hog", off, pattern(1, 64<<10))
		}
		if !errors.Is(werr, unix.ENOSPC) && !errors.Is(werr, unix.EIO) {
			t.Fatalf("writing past a full pool: %v", werr)
		}
		if _, err := p.CreateVolume(ctx, "more", 1<<20); !errors.Is(err, ErrNoSpace) {
			t.Fatalf("new volume on a full pool: %v", err)
		}
		if u, _ := p.Usage(); u.AvailableBytes != 0 {
			t.Errorf("a full pool reports %d bytes available", u.AvailableBytes)
		}
		if got := e.read(t, p, "hog", 0, len(keep)); !bytes.Equal(got, keep) {
			t.Fatal("data written before the pool filled is damaged")
		}
		// Growing the data device brings the pool back.
		u, err := p.GrowData(ctx, 64<<20)
		if err != nil {
			t.Fatal(err)
		}
		if u.DataBytes != 64<<20 || u.AvailableBytes <= 0 || u.Mode != ModeReadWrite {
			t.Fatalf("after growing the data device: %+v", u)
		}
		if err := e.write(t, p, "hog", 32<<20, pattern(2, 64<<10)); err != nil {
			t.Fatalf("write after growing: %v", err)
		}
		if _, err := p.CreateVolume(ctx, "more", 1<<20); err != nil {
			t.Fatalf("new volume after growing: %v", err)
		}
		if got := e.read(t, p, "hog", 0, len(keep)); !bytes.Equal(got, keep) {
			t.Fatal("data damaged by growing")
		}
		if err := p.Deactivate(ctx, "hog"); err != nil {
			t.Fatal(err)
		}
		if err := p.Delete(ctx, "hog"); err != nil {
			t.Fatal(err)
		}
		checkInvariants(t, e, p)
	})

	t.Run("RestartAndReboot", func(t *testing.T) {
		e := newEnv(t)
		cfg := testConfig(t, "reboot", 128<<20)
		p := openPool(t, e, cfg)
		if _, err := p.CreateVolume(ctx, "keep", 8<<20); err != nil {
			t.Fatal(err)
		}
		data := pattern(5, 64<<10)
		if err := e.write(t, p, "keep", 0, data); err != nil {
			t.Fatal(err)
		}
		if _, err := p.Snapshot(ctx, "keep-snap", "keep"); err != nil {
			t.Fatal(err)
		}
		if err := p.Deactivate(ctx, "keep-snap"); err != nil {
			t.Fatal(err)
		}
		// A driver restart: close and reopen with everything still there.
		p.Close()
		p = openPool(t, e, cfg)
		checkInvariants(t, e, p)
		// A reboot: every dm device gone.
		e.reboot(t, p)
		p.Close()
		p = openPool(t, e, cfg)
		defer func() { teardown(t, e, p) }()
		if _, err := p.DevicePath("keep"); err != nil {
			t.Fatalf("an active volume did not come back after the reboot: %v", err)
		}
		if _, err := p.DevicePath("keep-snap"); err == nil {
			t.Fatal("an inactive snapshot was activated")
		}
		if got := e.read(t, p, "keep", 0, len(data)); !bytes.Equal(got, data) {
			t.Fatal("data lost over the reboot")
		}
		if got := e.read(t, p, "keep-snap", 0, len(data)); !bytes.Equal(got, data) {
			t.Fatal("snapshot data lost over the reboot")
		}
		checkInvariants(t, e, p)
		// The configuration cannot change the pool's shape.
		p.Close()
		bad := cfg
		bad.BlockSectors = 256
		if _, err := Open(ctx, bad, e.kernel()); !errors.Is(err, ErrMismatch) || !strings.Contains(err.Error(), "blockSectors") {
			t.Fatalf("open with another block size: %v", err)
		}
		p = openPool(t, e, cfg)
	})

	t.Run("ForeignChange", func(t *testing.T) {
		e := newEnv(t)
		cfg := testConfig(t, "foreign", 64<<20)
		p := openPool(t, e, cfg)
		tid := p.tid
		p.Close()
		if err := e.kernel().Message(p.dev, devmapper.SetTransactionID{Current: tid, New: tid + 5}); err != nil {
			t.Fatal(err)
		}
		if _, err := Open(ctx, cfg, e.kernel()); !errors.Is(err, ErrForeignChange) {
			t.Fatalf("open after an outside change: %v", err)
		}
		if err := e.kernel().Message(p.dev, devmapper.SetTransactionID{Current: tid + 5, New: tid}); err != nil {
			t.Fatal(err)
		}
		p = openPool(t, e, cfg)
		teardown(t, e, p)
	})

	t.Run("Thousand", func(t *testing.T) {
		e := newEnv(t)
		cfg := testConfig(t, "thousand", 256<<20)
		cfg.OverprovisionRatio = -1
		p := openPool(t, e, cfg)
		for i := 0; i < 500; i++ {
			name := fmt.Sprintf("v%04d", i)
			if _, err := p.CreateVolume(ctx, name, 1<<30); err != nil {
				t.Fatal(err)
			}
			if _, err := p.Snapshot(ctx, name+"-s", name); err != nil {
				t.Fatal(err)
			}
		}
		if n := len(p.List()); n != 1000 {
			t.Fatalf("%d volumes, want 1000", n)
		}
		p.Close()
		start := time.Now()
		p = openPool(t, e, cfg)
		t.Logf("reopened a pool of 1000 devices in %v", time.Since(start))
		defer func() { teardown(t, e, p) }()
		if u, err := p.Usage(); err != nil || u.Volumes != 500 || u.Snapshots != 500 {
			t.Fatalf("usage %+v, %v", u, err)
		}
		checkInvariants(t, e, p)
	})

	t.Run("Concurrent", func(t *testing.T) {
		e := newEnv(t)
		cfg := testConfig(t, "conc", 256<<20)
		cfg.OverprovisionRatio = -1
		p := openPool(t, e, cfg)
		defer teardown(t, e, p)
		const workers, each = 4, 12
		var wg sync.WaitGroup
		errs := make(chan error, workers*each*4)
		for w := 0; w < workers; w++ {
			wg.Add(1)
			go func() {
				defer wg.Done()
				for i := 0; i < each; i++ {
					name := fmt.Sprintf("w%d-v%d", w, i)
					if _, err := p.CreateVolume(ctx, name, 4<<20); err != nil {
						errs <- err
						continue
					}
					if _, err := p.Activate(ctx, name); err != nil {
						errs <- err
					}
					if _, err := p.Snapshot(ctx, name+"-s", name); err != nil {
						errs <- err
					}
					if i%2 == 0 {
						if err := p.Deactivate(ctx, name); err != nil {
							errs <- err
						}
						if err := p.Delete(ctx, name); err != nil {
							errs <- err
						}
					}
				}
			}()
		}
		wg.Wait()
		close(errs)
		for err := range errs {
			t.Error(err)
		}
		if got, want := len(p.List()), workers*each*3/2; got != want {
			t.Errorf("%d volumes, want %d", got, want)
		}
		checkInvariants(t, e, p)
	})
	// A configured device path that names a file, not a block device: the
	// kernel says ENOTBLK, the pool ErrInvalid (a configuration mistake).
	t.Run("DeviceIsAFile", func(t *testing.T) {
		e := newEnv(t)
		dir := t.TempDir()
		data, meta := filepath.Join(dir, "data"), filepath.Join(dir, "meta")
		e.writeFile(t, data, 0, make([]byte, 4096))
		e.writeFile(t, meta, 0, make([]byte, 4096))
		cfg := Config{Name: "file", StateDir: filepath.Join(dir, "state"), DataDevice: data, MetadataDevice: meta}
		if p, err := Open(ctx, cfg, e.kernel()); !errors.Is(err, ErrInvalid) || !errors.Is(err, unix.ENOTBLK) {
			if err == nil {
				teardown(t, e, p)
			}
			t.Fatalf("open on files: %v, want ErrInvalid and ENOTBLK", err)
		}
	})
}
