//go:build !vmtest

package thinpool

import (
	"bytes"
	"context"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/csi-dmthin/csi-dmthin/internal/vmtest"
)

// The power-cut test: the pool on virtual disks in the VM, its records on
// ext4 on another, a random workload through the public API with fsync'd
// writes inside the volumes, and the power cut (qemu killed) at random
// moments. After each cut the VM boots again on the same disks and checks
// the pool against everything the guest acknowledged before the cut (see
// powercut_model_test.go for the log, powercut_kernel_test.go for the
// guest). What a cut does and does not model: vmtest's diskCacheMode.

// Knobs, read on the host: pcEnvCuts, the number of power cuts (default
// pcDefaultCuts; a final clean boot follows them), and pcEnvSeed, which
// fixes the random seed (printed by every run) to replay a run's workload
// and cut delays; where in an operation a cut lands still varies.
const (
	pcEnvCuts     = "CSI_DMTHIN_POWERCUT_CUTS"
	pcDefaultCuts = 20
)

// When the power goes: a random moment of the workload, and now and then
// one while the guest opens, recovers and checks the pool.
const (
	pcCutWorkloadMax = 5 * time.Second
	pcCutEarlyMax    = 3 * time.Second
	pcCutEarlyOneIn  = 5
	pcGuestMaxWork   = time.Minute
)

const (
	pcDataBytes  = 512 << 20
	pcMetaBytes  = 32 << 20
	pcStateBytes = 64 << 20
	pcGuestLog   = "/powercut/log"
)

// TestPowerCut runs the power cuts. A cycle (boot, open and check, work,
// cut) takes about 12 s under TCG, so 20 cuts take about 4 minutes, and
// more than go test's default 10-minute timeout when the VM lock is
// contended:
//
//	go test -count=1 -timeout 30m -run '^TestPowerCut$' -v ./pkg/thinpool
//	CSI_DMTHIN_POWERCUT_CUTS=200 go test -count=1 -timeout 120m -run '^TestPowerCut$' -v ./pkg/thinpool
//
// Like TestVM it fails, not skips, under CI=true when no VM can be had.
func TestPowerCut(t *testing.T) {
	cuts := pcDefaultCuts
	if s := os.Getenv(pcEnvCuts); s != "" {
		n, err := strconv.Atoi(s)
		if err != nil || n < 1 {
			t.Fatalf("%s=%q: want a number of power cuts, at least 1", pcEnvCuts, s)
		}
		cuts = n
	}
	seed := uint64(time.Now().UnixNano())
	if s := os.Getenv(pcEnvSeed); s != "" {
		n, err := strconv.ParseUint(s, 10, 64)
		if err != nil {
			t.Fatalf("%s=%q: %v", pcEnvSeed, s, err)
		}
		seed = n
	}
	mkfs, err := exec.LookPath("mkfs.ext4")
	if err != nil {
		vmtest.Unavailable(t, fmt.Errorf("mkfs.ext4 (e2fsprogs) makes the records' filesystem: %w", err))
	}
	spec := vmtest.PackageTest(t, "^TestPowerCutGuest$", vmtest.WithMemoryMiB(1024))
	ctx := t.Context()
	if d, ok := t.Deadline(); ok {
		var cancel context.CancelFunc
		ctx, cancel = context.WithDeadline(ctx, d.Add(-15*time.Second))
		defer cancel()
	}
	dir := t.TempDir()
	disks, err := pcDisks(ctx, dir, mkfs)
	if err != nil {
		t.Fatal(err)
	}
	spec.Disks = disks
	baseEnv, baseFiles := spec.Env, spec.Files
	thinCheck, _ := exec.LookPath("thin_check")
	rng := rand.New(rand.NewPCG(seed, 0x9c))
	t.Logf("power cuts: %d, seed %s=%d; thin_check after each cut: %v", cuts, pcEnvSeed, seed, thinCheck != "")

	// One VM lock for the whole run: no other process's VM runs between
	// two boots, and the run's time is its own.
	waitStart := time.Now()
	ctx, unlock, err := vmtest.HoldVM(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer unlock()
	if w := time.Since(waitStart); w > time.Second {
		t.Logf("waited %v for the VM lock", w.Round(time.Second))
	}
	run := &pcRun{t: t, model: newPCModel(), writes: map[int]bool{}}
	start := time.Now()
	defer func() { run.summary(cuts, time.Since(start)) }()
	for boot := 0; boot <= cuts; boot++ {
		final := boot == cuts
		logFile := filepath.Join(dir, fmt.Sprintf("log-%d", boot))
		if err := os.WriteFile(logFile, []byte(strings.Join(run.log, "\n")+"\n"), 0o644); err != nil {
			t.Fatal(err)
		}
		spec.Files = map[string]string{pcGuestLog: logFile}
		for g, h := range baseFiles {
			spec.Files[g] = h
		}
		spec.Env = append(append([]string(nil), baseEnv...),
			pcEnvLog+"="+pcGuestLog, pcEnvBoot+"="+strconv.Itoa(boot), pcEnvSeed+"="+strconv.FormatUint(seed, 10),
			pcEnvFinal+"="+map[bool]string{true: "1", false: "0"}[final], pcEnvMaxWork+"="+pcGuestMaxWork.String())
		b := &pcBoot{run: run, n: boot, cut: make(chan struct{})}
		if !final {
			b.armOn, b.delay = pcLinePrefix+"workload", time.Duration(rng.Int64N(int64(pcCutWorkloadMax)))
			if rng.IntN(pcCutEarlyOneIn) == 0 {
				b.armOn, b.delay = pcLinePrefix+"boot ", time.Duration(rng.Int64N(int64(pcCutEarlyMax)))
			}
		}
		spec.Cut, spec.Output = b.cut, b
		res, err := vmtest.Run(ctx, spec)
		b.stop()
		if err != nil {
			b.fail("boot %d: %v", boot, err)
		}
		run.boots++
		run.tcg += res.Total - res.Prepare
		run.toPayload += res.Boot
		b.check(res, final)
		if !final {
			run.cuts++
			// Once a boot has opened the pool, its metadata has a
			// superblock, which every later cut must leave consistent.
			if thinCheck != "" && run.poolMade {
				if out, err := pcRunCmd(ctx, thinCheck, disks[1].Path); err != nil {
					b.fail("the pool's metadata fails thin_check after cut %d: %v\n%s", run.cuts, err, out)
				}
			}
		}
	}
	if out, err := pcRunCmd(ctx, "e2fsck", "-fn", disks[2].Path); err != nil {
		t.Errorf("the records' filesystem fails e2fsck after the final unmount: %v\n%s", err, out)
	}
}

// pcDisks makes the three disk images: sparse data and metadata disks for
// the pool, and an ext4 filesystem for its records.
func pcDisks(ctx context.Context, dir, mkfs string) ([]vmtest.Disk, error) {
	var disks []vmtest.Disk
	for _, d := range []struct {
		serial string
		size   int64
	}{{pcSerialData, pcDataBytes}, {pcSerialMeta, pcMetaBytes}, {pcSerialState, pcStateBytes}} {
		p := filepath.Join(dir, d.serial+".img")
		f, err := os.Create(p)
		if err != nil {
			return nil, err
		}
		err = f.Truncate(d.size)
		if cerr := f.Close(); err == nil {
			err = cerr
		}
		if err != nil {
			return nil, err
		}
		disks = append(disks, vmtest.Disk{Path: p, Serial: d.serial})
	}
	// Initialized in full now, so that no lazy init writes in the guest.
	if out, err := pcRunCmd(ctx, mkfs, "-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0,nodiscard", disks[2].Path); err != nil {
		return nil, fmt.Errorf("mkfs.ext4: %v\n%s", err, out)
	}
	return disks, nil
}

func pcRunCmd(ctx context.Context, name string, args ...string) (string, error) {
	cmd := exec.CommandContext(ctx, name, args...)
	cmd.Env = append(os.Environ(), "LC_ALL=C")
	out, err := cmd.CombinedOutput()
	return string(out), err
}

// pcRun is what the boots of one run share.
type pcRun struct {
	t     *testing.T
	model *pcModel // the log, replayed as the lines come
	log   []string // the acknowledged log, for the next boot

	poolMade              bool // a boot opened the pool, so it exists on the disks
	cuts, boots, verified int
	opsVerified           int          // operations acknowledged or settled done when a boot last verified
	writes                map[int]bool // writes whose pattern a boot read back
	leaks, lost           int
	tcg, toPayload        time.Duration
}

func (r *pcRun) summary(cuts int, total time.Duration) {
	m := r.model
	cycle := time.Duration(0)
	if r.boots > 0 {
		cycle = r.tcg / time.Duration(r.boots)
	}
	r.t.Logf("summary: power cuts %d of %d, boots %d (%d verified), acknowledged operations verified %d (of %d begun; in doubt at a cut and settled: %d done, %d undone, %d torn), writes verified %d, leaks %d, lost %d",
		r.cuts, cuts, r.boots, r.verified, r.opsVerified, m.next-1, m.settledDone, m.settledUndone, m.settledTorn, len(r.writes), r.leaks, r.lost)
	if r.boots > 0 {
		r.t.Logf("time: %v in the VM over %d boots, %v per boot and cut (boot to payload %v); %v in all", r.tcg.Round(time.Second), r.boots, cycle.Round(10*time.Millisecond), (r.toPayload / time.Duration(r.boots)).Round(10*time.Millisecond), total.Round(time.Second))
	}
}

// pcBoot follows one boot's output: it keeps the log lines, arms the cut,
// and notes what the guest reports.
type pcBoot struct {
	run   *pcRun
	n     int
	cut   chan struct{}
	armOn string        // the line after which the power goes ("" for none)
	delay time.Duration // how long after it

	mu       sync.Mutex
	timer    *time.Timer
	cutOnce  sync.Once
	started  bool
	verified bool
	finalOK  bool
	problems []string
	protocol error
	tail     []string
	settled  string // the pending operation and how this boot settled it
	began    int    // operations begun in this boot
	verify   string // what the guest's check took
}

const pcTailLines = 80

// Write gets each guest line as it arrives (vmtest.Spec.Output).
func (b *pcBoot) Write(p []byte) (int, error) {
	l := strings.TrimSuffix(string(p), "\n")
	b.mu.Lock()
	defer b.mu.Unlock()
	r := b.run
	b.tail = append(b.tail, l)
	if len(b.tail) > pcTailLines {
		b.tail = b.tail[len(b.tail)-pcTailLines:]
	}
	switch {
	case isPCLogLine(l):
		r.log = append(r.log, l)
		pending := r.model.pending
		if line, err := pcUnseal(l); err == nil && strings.HasPrefix(line, pcLinePrefix+"settle ") && pending != nil {
			b.settled = fmt.Sprintf("; operation %s in flight at the cut: %s", pending, strings.Join(strings.Fields(line)[3:], " "))
		}
		if strings.HasPrefix(l, pcLinePrefix+"begin ") {
			b.began++
		}
		if err := r.model.feed(l); err != nil && b.protocol == nil {
			b.protocol = fmt.Errorf("log line %q: %w", l, err)
		}
	case strings.HasPrefix(l, pcLinePrefix+"boot "):
		b.started = true
	case strings.HasPrefix(l, pcLinePrefix+"verify ok"):
		b.verified = true
		if _, took, ok := strings.Cut(l, "took="); ok {
			b.verify = took
		}
		r.verified++
		r.opsVerified = r.model.acked + r.model.settledDone + r.model.settledTorn
		for n := range r.model.liveWrites() {
			r.writes[n] = true
		}
	case l == pcLinePrefix+"retry":
		b.settled += ", retried"
	case strings.HasPrefix(l, pcLinePrefix+"open ok"):
		r.poolMade = true
	case l == pcLinePrefix+"final ok":
		b.finalOK = true
	case strings.HasPrefix(l, pcLinePrefix+"LEAK "):
		r.leaks++
		b.problems = append(b.problems, l)
	case strings.HasPrefix(l, pcLinePrefix+"LOST "):
		r.lost++
		b.problems = append(b.problems, l)
	case strings.HasPrefix(l, pcLinePrefix+"FAILED "),
		strings.HasPrefix(l, "--- FAIL"), strings.HasPrefix(l, "--- SKIP"), strings.HasPrefix(l, "panic: "):
		b.problems = append(b.problems, l)
	}
	if b.armOn != "" && strings.HasPrefix(l, b.armOn) && b.timer == nil {
		b.timer = time.AfterFunc(b.delay, func() { b.cutOnce.Do(func() { close(b.cut) }) })
	}
	return len(p), nil
}

func (b *pcBoot) stop() {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.timer != nil {
		b.timer.Stop()
	}
}

// check fails the test unless the boot did what it should: started the
// guest test, reported no problem, and ended in a power cut, or for the
// final boot, in a clean exit after its checks.
func (b *pcBoot) check(res *vmtest.Result, final bool) {
	b.mu.Lock()
	problems, protocol, started, finalOK := b.problems, b.protocol, b.started, b.finalOK
	b.mu.Unlock()
	switch {
	case len(problems) > 0:
		b.fail("boot %d found:\n%s", b.n, strings.Join(problems, "\n"))
	case protocol != nil:
		b.fail("boot %d: %v", b.n, protocol)
	case !started:
		b.fail("boot %d: the guest test did not start (cut %v, exit %d)", b.n, res.Cut, res.ExitCode)
	case !final && !res.Cut:
		b.fail("boot %d ended without a power cut: exit status %d\nkernel console:\n%s", b.n, res.ExitCode, res.Console)
	case final && (res.Cut || res.ExitCode != 0 || !finalOK):
		b.fail("final boot: cut %v, exit status %d, final checks done %v", res.Cut, res.ExitCode, finalOK)
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	verify := "cut before the check was done"
	if b.verified {
		verify = "open and check " + b.verify
	}
	cut := "final"
	if !final {
		cut = fmt.Sprintf("cut %v after %q", b.delay.Round(time.Millisecond), strings.TrimSpace(b.armOn))
	}
	b.run.t.Logf("boot %d: boot %v, %s%s; %d operations begun; %s", b.n, res.Boot.Round(10*time.Millisecond), verify, b.settled, b.began, cut)
}

// fail ends the test with the evidence: the guest's last lines and the end
// of the acknowledged log.
func (b *pcBoot) fail(format string, args ...any) {
	b.mu.Lock()
	tail := strings.Join(b.tail, "\n")
	log := b.run.log
	b.mu.Unlock()
	if len(log) > 40 {
		log = log[len(log)-40:]
	}
	b.run.t.Fatalf("%s\nthe guest's last lines:\n%s\nthe end of the acknowledged log:\n%s", fmt.Sprintf(format, args...), tail, strings.Join(log, "\n"))
}

// TestPowerCutModel checks the log's replay and the judgement of what a
// boot finds, on the host: the power-cut test is only as strict as these.
func TestPowerCutModel(t *testing.T) {
	const mib = 1 << 20
	base := []string{
		"PC begin 1 create v1 8388608", "PC ack 1",
		"PC begin 2 activate v1", "PC ack 2",
		"PC begin 3 write v1 2", "PC ack 3",
		"PC begin 4 snapshot s4 v1", "PC ack 4",
		"PC begin 5 write v1 2", "PC settle 5 torn 0003",
		"PC begin 6 clone c6 s4 12582912", "PC ack 6",
		"PC begin 7 grow v1 16777216", "PC settle 7 undone",
		"PC begin 8 delete s4", "PC settle 8 done",
	}
	seal := func(lines ...string) []string {
		out := make([]string, len(lines))
		for i, l := range lines {
			out[i] = pcSeal(l)
		}
		return out
	}
	base = seal(base...)
	m, err := replayPC(base)
	if err != nil {
		t.Fatal(err)
	}
	v1, c6 := m.vols["v1"], m.vols["c6"]
	if _, ok := m.vols["s4"]; ok || len(m.vols) != 2 {
		t.Fatalf("volumes %v", m.vols)
	}
	if !v1.Active || v1.Size != 8*mib || v1.Kind != KindVolume {
		t.Errorf("v1 %+v", v1)
	}
	slot2 := 2 * pcBlocksPerSlot
	if v1.Blocks[slot2] != 5 || v1.Blocks[slot2+1] != 5 || v1.Blocks[slot2+2] != 3 || v1.Blocks[slot2+15] != 3 || v1.Blocks[0] != 0 {
		t.Errorf("v1 slot 2 after a torn write: %v", v1.Blocks[slot2:slot2+pcBlocksPerSlot])
	}
	if c6.Kind != KindVolume || c6.Source != "s4" || c6.Size != 12*mib || c6.Active || c6.Blocks[slot2] != 3 {
		t.Errorf("c6 (a clone of a snapshot taken before the torn write) %+v", c6)
	}
	if m.acked != 5 || m.settledDone != 1 || m.settledUndone != 1 || m.settledTorn != 1 || m.next != 9 {
		t.Errorf("counts: acked %d, done %d, undone %d, torn %d, next %d", m.acked, m.settledDone, m.settledUndone, m.settledTorn, m.next)
	}
	if live := m.liveWrites(); len(live) != 2 || !live[3] || !live[5] {
		t.Errorf("live writes %v, want 3 and 5", live)
	}

	for _, tc := range []struct {
		name string
		more []string
	}{
		{"begin while pending", []string{"PC begin 9 delete v1", "PC begin 10 delete c6"}},
		{"wrong number", []string{"PC begin 10 delete v1"}},
		{"ack of another", []string{"PC begin 9 delete v1", "PC ack 8"}},
		{"ack with nothing pending", []string{"PC ack 9"}},
		{"create of an existing name, another size", []string{"PC begin 9 create v1 16777216"}},
		{"snapshot of an existing name, another source", []string{"PC begin 9 snapshot c6 v1"}},
		{"grow of a deleted volume", []string{"PC begin 9 grow s4 16777216"}},
		{"write to an inactive volume", []string{"PC begin 9 write c6 0"}},
		{"snapshot of nothing", []string{"PC begin 9 snapshot s9 gone"}},
		{"clone smaller than its source", []string{"PC begin 9 clone c9 c6 8388608"}},
		{"too small", []string{"PC begin 9 create v9 4096"}},
		{"torn non-write", []string{"PC begin 9 delete v1", "PC settle 9 torn 0001"}},
		{"slot out of range", []string{"PC begin 9 write v1 8"}},
		{"unknown verb", []string{"PC begin 9 rename v1"}},
		{"missing field", []string{"PC begin 9 grow v1"}},
		{"not a log line", []string{"begin 9 delete v1"}},
	} {
		if _, err := replayPC(append(append([]string(nil), base...), seal(tc.more...)...)); err == nil {
			t.Errorf("%s: replay accepted %q", tc.name, tc.more)
		}
	}

	// Retries: a create, snapshot or clone that finds what it would make,
	// a delete of what is gone. They change nothing.
	for _, more := range [][]string{
		{"PC begin 9 create v1 8388608", "PC ack 9"},
		{"PC begin 9 delete s4", "PC ack 9"},
		{"PC begin 9 snapshot s9 v1", "PC ack 9", "PC begin 10 snapshot s9 v1", "PC ack 10"},
		{"PC begin 9 clone c9 v1 16777216", "PC ack 9", "PC begin 10 clone c9 v1 16777216", "PC settle 10 done"},
	} {
		r, err := replayPC(append(append([]string(nil), base...), seal(more...)...))
		if err != nil {
			t.Errorf("retry %q: %v", more, err)
			continue
		}
		if want := 2 + len(more)/4; len(r.vols) != want {
			t.Errorf("retry %q: %d volumes, want %d", more, len(r.vols), want)
		}
	}

	// A line damaged on its way, or without its checksum.
	for _, l := range []string{
		strings.Replace(pcSeal("PC begin 9 delete v1"), "v1", "c6", 1),
		strings.Replace(pcSeal("PC begin 9 write v1 2"), "2", "3", 1),
		"PC begin 9 delete v1",
		"PC begin 9 delete v1 ~",
	} {
		if _, err := replayPC(append(append([]string(nil), base...), l)); err == nil || !strings.Contains(err.Error(), "checksum") {
			t.Errorf("replay of %q: %v, want a checksum error", l, err)
		}
	}

	// What a boot may find.
	clone := func(vols map[string]pcVol) map[string]pcVol {
		out := map[string]pcVol{}
		for k, v := range vols {
			out[k] = v
		}
		return out
	}
	if settle, problems := m.judge(clone(m.vols)); settle != "" || len(problems) != 0 {
		t.Errorf("the promised state: settle %q, problems %v", settle, problems)
	}
	extra := clone(m.vols)
	extra["v99"] = pcVol{Kind: KindVolume, Size: 8 * mib}
	if _, problems := m.judge(extra); len(problems) != 1 || problems[0].Kind != "leak" {
		t.Errorf("an extra volume: %v", problems)
	}
	missing := clone(m.vols)
	delete(missing, "c6")
	if _, problems := m.judge(missing); len(problems) != 1 || problems[0].Kind != "lost" {
		t.Errorf("a missing volume: %v", problems)
	}
	for _, change := range []func(*pcVol){
		func(v *pcVol) { v.Size += mib },
		func(v *pcVol) { v.Active = !v.Active },
		func(v *pcVol) { v.Kind = KindSnapshot },
		func(v *pcVol) { v.Blocks[slot2+7] = 0 },
		func(v *pcVol) { v.Blocks[slot2+7] = pcBlockGarbage },
	} {
		got := clone(m.vols)
		v := got["v1"]
		change(&v)
		got["v1"] = v
		if _, problems := m.judge(got); len(problems) != 1 || problems[0].Kind != "lost" {
			t.Errorf("a changed v1 %+v: %v", v, problems)
		}
	}

	// A pending create: before or after, nothing else.
	pc, err := replayPC(append(append([]string(nil), base...), seal("PC begin 9 create v9 16777216")...))
	if err != nil {
		t.Fatal(err)
	}
	if settle, problems := pc.judge(clone(pc.vols)); settle != "PC settle 9 undone" || problems != nil {
		t.Errorf("pending create, not there: %q, %v", settle, problems)
	}
	done := clone(pc.vols)
	done["v9"] = pcVol{Kind: KindVolume, Size: 16 * mib}
	if settle, problems := pc.judge(done); settle != "PC settle 9 done" || problems != nil {
		t.Errorf("pending create, there: %q, %v", settle, problems)
	}
	done["v9"] = pcVol{Kind: KindVolume, Size: 8 * mib}
	if settle, problems := pc.judge(done); settle != "" || len(problems) == 0 {
		t.Errorf("pending create, there with another size: %q, %v", settle, problems)
	}

	// A pending write: each block old or new.
	pw, err := replayPC(append(append([]string(nil), base...), seal("PC begin 9 write v1 2")...))
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		blocks []int // new blocks in the slot
		other  int   // what block 15 holds instead, if not 0
		settle string
	}{
		{nil, 0, "PC settle 9 undone"},
		{[]int{0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15}, 0, "PC settle 9 done"},
		{[]int{0, 4, 15}, 0, "PC settle 9 torn 8011"},
		{[]int{0}, pcBlockGarbage, ""},
		{[]int{0}, 0x7, ""}, // another write's block
	} {
		got := clone(pw.vols)
		v := got["v1"]
		for _, b := range tc.blocks {
			v.Blocks[slot2+b] = 9
		}
		if tc.other != 0 {
			v.Blocks[slot2+15] = tc.other
		}
		got["v1"] = v
		settle, problems := pw.judge(got)
		if settle != tc.settle || (tc.settle == "") != (len(problems) > 0) {
			t.Errorf("pending write, new blocks %v, block 15 %d: settle %q, problems %v; want %q", tc.blocks, tc.other, settle, problems, tc.settle)
		}
	}
}

func TestPowerCutBlocks(t *testing.T) {
	writers := map[int]string{12: "v3"}
	b := pcBlock("v3", 12, 5, 9)
	if len(b) != pcBlockBytes {
		t.Fatalf("%d bytes", len(b))
	}
	if n := pcIdentify(b, 5, 9, writers); n != 12 {
		t.Errorf("identify = %d, want 12", n)
	}
	if n := pcIdentify(make([]byte, pcBlockBytes), 5, 9, writers); n != 0 {
		t.Errorf("zeros identify as %d", n)
	}
	if bytes.Equal(b[2048:], pcBlock("v3", 13, 5, 9)[2048:]) || bytes.Equal(b[2048:], pcBlock("v4", 12, 5, 9)[2048:]) {
		t.Error("the pattern does not depend on the write and the volume")
	}
	for name, c := range map[string]struct {
		b         []byte
		slot, blk int
		writers   map[int]string
	}{
		"a flipped byte":     {flip(b, 3000), 5, 9, writers},
		"a flipped header":   {flip(b, 5), 5, 9, writers},
		"another slot":       {b, 4, 9, writers},
		"another block":      {b, 5, 8, writers},
		"another writer":     {b, 5, 9, map[int]string{12: "v4"}},
		"an unknown write":   {b, 5, 9, map[int]string{}},
		"a half-zeroed one":  {append(append([]byte(nil), b[:2048]...), make([]byte, 2048)...), 5, 9, writers},
		"the last byte zero": {flipTo(b, pcBlockBytes-1, 0), 5, 9, writers},
	} {
		if n := pcIdentify(c.b, c.slot, c.blk, c.writers); n != pcBlockGarbage {
			t.Errorf("%s identifies as %d", name, n)
		}
	}
}

func flip(b []byte, i int) []byte { return flipTo(b, i, b[i]^0x40) }

func flipTo(b []byte, i int, v byte) []byte {
	c := append([]byte(nil), b...)
	c[i] = v
	return c
}
