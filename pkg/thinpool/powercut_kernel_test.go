//go:build vmtest

package thinpool

import (
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/csi-dmthin/csi-dmthin/internal/vmtest"
	"github.com/csi-dmthin/csi-dmthin/pkg/devmapper"
)

// The guest side of the power-cut test (powercut_test.go boots it, and
// powercut_model_test.go describes the log). Each boot opens the pool on
// the virtual disks, checks what it finds against the acknowledged log,
// and runs a random workload until the host cuts the power; the last boot
// checks and tears everything down.

// pcMountDir is where the records' ext4 disk is mounted.
const pcMountDir = "/mnt/pc-state"

func TestPowerCutGuest(t *testing.T) {
	logPath := os.Getenv(pcEnvLog)
	if logPath == "" {
		t.Skip("run by TestPowerCut on the host, which boots the VM once per power cut; the package's TestVM run does not")
	}
	if !vmtest.InGuest() {
		t.Fatalf("%s is set, but this is not the vmtest VM", pcEnvLog)
	}
	boot, err := strconv.Atoi(os.Getenv(pcEnvBoot))
	if err != nil {
		t.Fatalf("%s: %v", pcEnvBoot, err)
	}
	seed, err := strconv.ParseUint(os.Getenv(pcEnvSeed), 10, 64)
	if err != nil {
		t.Fatalf("%s: %v", pcEnvSeed, err)
	}
	maxWork, err := time.ParseDuration(os.Getenv(pcEnvMaxWork))
	if err != nil {
		t.Fatalf("%s: %v", pcEnvMaxWork, err)
	}
	final := os.Getenv(pcEnvFinal) == "1"
	raw, err := os.ReadFile(logPath)
	if err != nil {
		t.Fatal(err)
	}
	var lines []string
	for _, l := range strings.Split(string(raw), "\n") {
		if l != "" {
			lines = append(lines, l)
		}
	}
	m, err := replayPC(lines)
	if err != nil {
		t.Fatalf("the acknowledged log: %v", err)
	}
	start := time.Now()
	emit(t, "%sboot %d final=%v log=%d", pcLinePrefix, boot, final, len(lines))

	cfg, err := pcMount()
	if err != nil {
		t.Fatal(err)
	}
	k, err := NewHostKernel()
	if err != nil {
		t.Fatal(err)
	}
	p, err := Open(ctx, cfg, k)
	if err != nil {
		emit(t, "%sLOST the pool does not open: %v", pcLinePrefix, err)
		t.Fatalf("open: %v", err)
	}
	opened := time.Now()
	emit(t, "%sopen ok took=%v", pcLinePrefix, opened.Sub(start).Round(time.Millisecond))

	got, problems := pcObserve(t, p, k, m.writers)
	settle, diff := m.judge(got)
	problems = append(problems, diff...)
	if len(problems) > 0 {
		for _, pr := range problems {
			emit(t, "%s%s %s", pcLinePrefix, strings.ToUpper(pr.Kind), pr.What)
			t.Error(pr)
		}
		t.FailNow()
	}
	// Half the time the operation in flight at the cut (not a write) is
	// retried first, as a CO retries a call it got no answer to: done or
	// not, the retry must succeed and end in the state it promises.
	rng := rand.New(rand.NewPCG(seed, uint64(boot)))
	var retry *pcOp
	if m.pending != nil && m.pending.Verb != "write" && rng.IntN(2) == 0 {
		r := *m.pending
		retry = &r
	}
	if settle != "" {
		settle = pcSeal(settle)
		emit(t, "%s", settle)
		if err := m.feed(settle); err != nil {
			t.Fatal(err)
		}
	}
	emit(t, "%sverify ok volumes=%d acked=%d took=%v (open %v)", pcLinePrefix, len(got), m.acked+m.settledDone+m.settledTorn, time.Since(start).Round(time.Millisecond), opened.Sub(start).Round(time.Millisecond))

	if final {
		pcTeardown(t, p, k)
		emit(t, "%sfinal ok", pcLinePrefix)
		return
	}
	emit(t, "%sworkload", pcLinePrefix)
	deadline := time.Now().Add(maxWork)
	// Now and then the workload holds an active volume open, as a mount
	// would: deactivating it is then refused, and deleting it leaves a
	// tombstone until the last close (the next operation, or Open after a
	// cut, finishes the delete).
	var held *os.File
	heldName := ""
	defer func() {
		if held != nil {
			held.Close()
		}
	}()
	for time.Now().Before(deadline) {
		var o pcOp
		switch {
		case retry != nil:
			o, retry = *retry, nil
			o.N = m.next
			emit(t, "%sretry", pcLinePrefix)
		case held != nil && rng.IntN(8) == 0:
			held.Close()
			held, heldName = nil, ""
			emit(t, "%srelease", pcLinePrefix)
		case held == nil && rng.IntN(8) == 0:
			if n := pcPickActive(m, rng); n != "" {
				node, err := p.DevicePath(n)
				if err != nil {
					t.Fatalf("hold %s: %v", n, err)
				}
				if held, err = os.Open(node); err != nil {
					t.Fatalf("hold %s: %v", n, err)
				}
				heldName = n
				emit(t, "%shold %s", pcLinePrefix, n)
			}
		}
		if o.Verb == "" {
			o = pcChoose(m, rng, heldName)
		}
		begin := pcSeal(o.beginLine())
		emit(t, "%s", begin)
		if err := m.feed(begin); err != nil {
			t.Fatal(err)
		}
		if err := pcDo(p, m, o); err != nil {
			emit(t, "%sFAILED %s: %v", pcLinePrefix, o, err)
			t.Fatalf("operation %s: %v", o, err)
		}
		ack := pcSeal(fmt.Sprintf("%sack %d", pcLinePrefix, o.N))
		emit(t, "%s", ack)
		if err := m.feed(ack); err != nil {
			t.Fatal(err)
		}
	}
	t.Fatalf("no power cut came in %v of workload", maxWork)
}

// emit prints a line the host must have before the guest goes on.
func emit(t *testing.T, format string, args ...any) {
	t.Helper()
	if err := vmtest.Emit(fmt.Sprintf(format, args...)); err != nil {
		t.Fatalf("emit: %v", err)
	}
}

// pcMount finds the disks by serial, mounts the records' filesystem (ext4
// replays its journal after a cut) and returns the pool's configuration.
func pcMount() (Config, error) {
	var dev [3]string
	for i, s := range []string{pcSerialData, pcSerialMeta, pcSerialState} {
		d, err := vmtest.DiskBySerial(s)
		if err != nil {
			return Config{}, err
		}
		dev[i] = d
	}
	if err := os.MkdirAll(pcMountDir, 0o755); err != nil {
		return Config{}, err
	}
	if err := unix.Mount(dev[2], pcMountDir, "ext4", 0, ""); err != nil {
		return Config{}, fmt.Errorf("mount %s (the records' ext4) on %s: %w", dev[2], pcMountDir, err)
	}
	return Config{
		Name: "pc", StateDir: filepath.Join(pcMountDir, "records"),
		DataDevice: dev[0], MetadataDevice: dev[1],
		OverprovisionRatio: -1,
	}, nil
}

// pcObserve reads what the pool holds after Open: every record, whether
// its dm device is there, its slots' content, and what must never be
// there: thin ids no record owns, dm devices no record owns, suspended
// devices, a pending intent or delete, a transaction id the records do not
// have.
func pcObserve(t *testing.T, p *Pool, k *HostKernel, writers map[int]string) (map[string]pcVol, []pcProblem) {
	t.Helper()
	var problems []pcProblem
	bad := func(kind, format string, args ...any) {
		problems = append(problems, pcProblem{kind, fmt.Sprintf(format, args...)})
	}
	p.mu.Lock()
	vols := map[string]Volume{}
	owned := map[uint32]string{}
	for n, v := range p.vols {
		vols[n] = *v
		owned[v.DeviceID] = n
		if v.Deleting {
			bad("leak", "%s (thin id %d) is still being deleted", n, v.DeviceID)
		}
		if v.Kind == KindTemplate {
			bad("leak", "%s is a template, which the workload never makes", n)
		}
	}
	nextID, tid := p.nextID, p.tid
	p.mu.Unlock()

	st, err := p.st.load()
	if err != nil {
		t.Fatal(err)
	}
	if st.intent != nil {
		bad("leak", "an intent is left in the records after Open: %s of %s at %d", st.intent.Op, st.intent.Vol.Name, st.intent.TID)
	}
	if len(st.suspects) > 0 {
		bad("leak", "suspect thin ids left after Open: %v", st.suspects)
	}
	ps, err := p.poolStatus()
	if err != nil {
		t.Fatal(err)
	}
	if ps.TransactionID != tid || st.tid != tid {
		bad("lost", "the pool's transaction id is %d, the records' %d (in memory %d)", ps.TransactionID, st.tid, tid)
	}
	if ps.Fail || ps.Error || ps.NeedsCheck || ps.Mode != devmapper.PoolReadWrite {
		bad("lost", "the pool is not healthy: %+v", ps)
	}

	// Thin ids, probed as checkInvariants does: a delete of an id no record
	// owns must find nothing, a create_thin of an owned one must find it
	// taken. Past nextID too, in case the allocator went backwards.
	for id := uint32(1); id < nextID+8; id++ {
		if name, ok := owned[id]; ok {
			if err := k.Message(p.dev, devmapper.CreateThin{DeviceID: id}); !errors.Is(err, unix.EEXIST) {
				bad("lost", "%s (thin id %d) is not in the pool: create_thin said %v", name, id, err)
			}
			continue
		}
		if err := k.Message(p.dev, devmapper.Delete{DeviceID: id}); !errors.Is(err, unix.ENODATA) {
			bad("leak", "thin id %d is in the pool and no record owns it: delete said %v", id, err)
		}
	}

	// dm devices: ours only for active records, none suspended.
	list, err := k.List()
	if err != nil {
		t.Fatal(err)
	}
	present := map[string]devmapper.Dev{}
	for _, d := range list {
		ours := strings.HasPrefix(d.UUID, p.uuidPrefix()) || strings.HasPrefix(d.Name, p.poolDMName())
		if !ours {
			continue
		}
		if info, err := k.Info(d.Dev); err == nil && info.Suspended {
			bad("leak", "dm device %s is left suspended", d.Name)
		}
		if d.Name == p.poolDMName() {
			continue
		}
		name := strings.TrimPrefix(d.Name, p.poolDMName()+"-")
		v, ok := vols[name]
		if !ok || d.UUID != p.volUUID(v.DeviceID) {
			bad("leak", "dm device %s (%s) has no record", d.Name, d.UUID)
			continue
		}
		present[name] = d.Dev
	}

	got := map[string]pcVol{}
	buf, free, err := alignedBuf(pcSlotBytes)
	if err != nil {
		t.Fatal(err)
	}
	defer free()
	names := make([]string, 0, len(vols))
	for n := range vols {
		names = append(names, n)
	}
	sort.Strings(names)
	for _, n := range names {
		v := vols[n]
		if v.Deleting || v.Kind == KindTemplate {
			continue
		}
		g := pcVol{Kind: v.Kind, Source: v.Source, Size: v.SizeBytes, Active: v.Active}
		_, dmThere := present[n]
		if dmThere != v.Active {
			bad("lost", "%s: the record says active=%v but its dm device is there=%v", n, v.Active, dmThere)
		}
		node, err := p.DevicePath(n)
		temp := false
		if err != nil {
			// Inactive: a dm device for reading only, which no record
			// mentions and which goes again below.
			if node, _, err = p.activateDM(&v); err != nil {
				t.Fatalf("activate %s to read it: %v", n, err)
			}
			temp = true
		} else if _, size, err := k.BlockDevice(node); err != nil || size != v.SizeBytes {
			bad("lost", "%s: its active device has %d bytes (%v), the record %d", n, size, err, v.SizeBytes)
		}
		if err := pcReadSlots(node, buf, func(slot int, data []byte) {
			for b := 0; b < pcBlocksPerSlot; b++ {
				g.Blocks[slot*pcBlocksPerSlot+b] = pcIdentify(data[b*pcBlockBytes:(b+1)*pcBlockBytes], slot, b, writers)
			}
		}); err != nil {
			t.Fatalf("read %s: %v", n, err)
		}
		if temp {
			if err := p.removeDM(n, false); err != nil {
				t.Fatalf("remove the reading device of %s: %v", n, err)
			}
		}
		got[n] = g
	}
	return got, problems
}

// pcPickActive picks an active volume, or "" if there is none.
func pcPickActive(m *pcModel, rng *rand.Rand) string {
	var active []string
	for n, v := range m.vols {
		if v.Active {
			active = append(active, n)
		}
	}
	if len(active) == 0 {
		return ""
	}
	sort.Strings(active)
	return active[rng.IntN(len(active))]
}

// pcReadSlots reads every slot of the device at node with O_DIRECT (what
// is on the disk, not in the page cache) into buf, an aligned buffer, and
// hands each to got.
func pcReadSlots(node string, buf []byte, got func(slot int, data []byte)) error {
	f, err := os.OpenFile(node, os.O_RDONLY|unix.O_DIRECT, 0)
	if err != nil {
		return err
	}
	defer f.Close()
	for slot := 0; slot < pcSlots; slot++ {
		if _, err := f.ReadAt(buf, int64(slot)*pcSlotStride); err != nil {
			return fmt.Errorf("slot %d: %w", slot, err)
		}
		got(slot, buf)
	}
	return nil
}

// pcChoose picks the next operation, at random among those that fit the
// promised state. held is a volume held open, which is not deactivated.
func pcChoose(m *pcModel, rng *rand.Rand, held string) pcOp {
	if _, ok := m.vols[held]; !ok {
		held = "" // deleted while held: a tombstone until it is released
	}
	var names, active, deactivatable, inactive, growable []string
	for n, v := range m.vols {
		names = append(names, n)
		if v.Active {
			active = append(active, n)
			if n != held {
				deactivatable = append(deactivatable, n)
			}
		} else {
			inactive = append(inactive, n)
		}
		if v.Size < pcMaxVolBytes {
			growable = append(growable, n)
		}
	}
	for _, s := range [][]string{names, active, deactivatable, inactive, growable} {
		sort.Strings(s)
	}
	pick := func(s []string) string { return s[rng.IntN(len(s))] }
	w := map[string]int{}
	if len(names) < pcMaxVols {
		w["create"] = 3
		if len(names) > 0 {
			w["snapshot"], w["clone"] = 2, 2
		}
	}
	if len(names) > 0 {
		w["delete"] = 2
		if len(names) > pcMaxVols*2/3 {
			w["delete"] = 6
		}
	}
	if len(inactive) > 0 {
		w["activate"] = 3
	}
	if len(active) > 0 {
		w["write"] = 8
	}
	if len(deactivatable) > 0 {
		w["deactivate"] = 1
	}
	if held != "" {
		w["delete"]++ // of the held one, now and then
	}
	if len(growable) > 0 {
		w["grow"] = 1
	}
	verbs := []string{"create", "snapshot", "clone", "delete", "activate", "deactivate", "grow", "write"}
	total := 0
	for _, v := range verbs {
		total += w[v]
	}
	r := rng.IntN(total)
	verb := ""
	for _, v := range verbs {
		if r < w[v] {
			verb = v
			break
		}
		r -= w[v]
	}
	o := pcOp{N: m.next, Verb: verb}
	mib := int64(1 << 20)
	switch verb {
	case "create":
		o.Name, o.Size = fmt.Sprintf("v%d", o.N), pcMinVolBytes*int64(1+rng.IntN(2))
	case "snapshot":
		o.Name, o.Source = fmt.Sprintf("s%d", o.N), pick(names)
	case "clone":
		o.Name, o.Source = fmt.Sprintf("c%d", o.N), pick(names)
		o.Size = m.vols[o.Source].Size + 4*mib*int64(rng.IntN(2))
	case "delete":
		o.Name = pick(names)
		if held != "" && rng.IntN(3) == 0 {
			o.Name = held
		}
	case "activate":
		o.Name = pick(inactive)
	case "deactivate":
		o.Name = pick(deactivatable)
	case "grow":
		o.Name = pick(growable)
		o.Size = m.vols[o.Name].Size + 4*mib
	case "write":
		o.Name, o.Slot = pick(active), rng.IntN(pcSlots)
	}
	return o
}

const (
	pcMaxVols     = 18
	pcMaxVolBytes = 32 << 20
)

// pcDo runs one operation through the pool's public API and checks what it
// returns.
func pcDo(p *Pool, m *pcModel, o pcOp) error {
	var (
		v   *Volume
		err error
	)
	switch o.Verb {
	case "create":
		v, err = p.CreateVolume(ctx, o.Name, o.Size)
	case "snapshot":
		v, err = p.Snapshot(ctx, o.Name, o.Source)
	case "clone":
		v, err = p.Clone(ctx, o.Name, o.Source, o.Size)
	case "delete":
		return p.Delete(ctx, o.Name)
	case "activate":
		_, err = p.Activate(ctx, o.Name)
		return err
	case "deactivate":
		return p.Deactivate(ctx, o.Name)
	case "grow":
		v, err = p.Grow(ctx, o.Name, o.Size)
	case "write":
		return pcWrite(p, o)
	}
	if err != nil {
		return err
	}
	after, aerr := m.apply(o, m.vols, 0)
	if aerr != nil {
		return aerr
	}
	want := after[o.Name]
	if v.Name != o.Name || v.SizeBytes != want.Size || v.Kind != want.Kind || v.Source != want.Source {
		return fmt.Errorf("returned %+v, want a %s of %d bytes from %q", *v, want.Kind, want.Size, want.Source)
	}
	return nil
}

// pcWrite writes the slot's pattern through the page cache and fsyncs it.
func pcWrite(p *Pool, o pcOp) error {
	node, err := p.DevicePath(o.Name)
	if err != nil {
		return err
	}
	f, err := os.OpenFile(node, os.O_RDWR, 0)
	if err != nil {
		return err
	}
	defer f.Close()
	data := make([]byte, 0, pcSlotBytes)
	for b := 0; b < pcBlocksPerSlot; b++ {
		data = append(data, pcBlock(o.Name, o.N, o.Slot, b)...)
	}
	if _, err := f.WriteAt(data, int64(o.Slot)*pcSlotStride); err != nil {
		return err
	}
	if err := f.Sync(); err != nil {
		return fmt.Errorf("fsync: %w", err)
	}
	return f.Close()
}

// pcTeardown deletes everything, checks the pool is then empty, and
// removes the pool's device and unmounts the records.
func pcTeardown(t *testing.T, p *Pool, k *HostKernel) {
	t.Helper()
	for _, v := range p.List() {
		if err := p.Delete(ctx, v.Name); err != nil {
			t.Fatalf("teardown: delete %s: %v", v.Name, err)
		}
	}
	p.mu.Lock()
	left, nextID, tid := len(p.vols), p.nextID, p.tid
	p.mu.Unlock()
	if left != 0 {
		t.Errorf("teardown: %d records left", left)
	}
	for id := uint32(1); id < nextID+8; id++ {
		if err := k.Message(p.dev, devmapper.Delete{DeviceID: id}); !errors.Is(err, unix.ENODATA) {
			t.Errorf("teardown: thin id %d is still in the pool: delete said %v", id, err)
		}
	}
	ps, err := p.poolStatus()
	if err != nil || ps.TransactionID != tid {
		t.Errorf("teardown: pool status %+v, %v; records' transaction id %d", ps, err, tid)
	}
	dev := p.dev
	if err := p.Close(); err != nil {
		t.Error(err)
	}
	if err := k.Remove(dev, false); err != nil {
		t.Errorf("teardown: remove the pool: %v", err)
	}
	if err := unix.Unmount(pcMountDir, 0); err != nil {
		t.Errorf("teardown: unmount the records: %v", err)
	}
}
