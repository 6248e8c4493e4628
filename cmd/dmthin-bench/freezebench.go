package main

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"sync"
	"time"

	csipb "github.com/container-storage-interface/spec/lib/go/csi"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"k8s.io/klog/v2"

	"github.com/csi-dmthin/csi-dmthin/pkg/csi"
	"github.com/csi-dmthin/csi-dmthin/pkg/devmapper"
	"github.com/csi-dmthin/csi-dmthin/pkg/thinpool"
)

// freezeGap is the pause between two measured events of the freeze table,
// so that one's after-effects (the writer's blocked writes, copy-on-write
// of the blocks it shares with a new snapshot) are mostly over before the
// next one.
const freezeGap = 150 * time.Millisecond

// freezeBench measures what a snapshot of an active volume costs the
// application writing to it, and what it costs the pollers (a /metrics
// scrape, GetCapacity) that read the pool meanwhile.
//
// One pkg/thinpool pool (files on the guest's tmpfs) with one active 1 GiB
// volume, and groupbench's writer on it for the whole run: 4 KiB O_DIRECT
// writes back-to-back (no fixed rate) over the first 16 MiB, each write's
// start and length kept.
//
// The freeze: 4n times, one after the other with freezeGap between them,
// an idle window as long as the last snapshot, a bare suspend + resume of
// the volume's dm device (pkg/devmapper, no snapshot), a Pool.Snapshot of
// it and a CSI CreateSnapshot of it (in-process). An event's stall is the
// longest write that overlapped its window (writer.longest).
//
// The pollers: each poller in turn, a few milliseconds apart, first idle,
// then while another goroutine takes CSI snapshots of the volume
// back-to-back. Beside the two the target is about, Pool.Usage (what both
// read) and the pool's status ioctl alone (what Usage asks the kernel),
// to tell waiting for the kernel from the rest; and a Kernel wrapper
// (traceKernel) times, for every snapshot, how long the origin stays
// suspended, step by step, and each set_transaction_id.
func freezeBench(n int) error {
	// The driver's log lines would interleave with the tables.
	klog.SetOutput(io.Discard)
	klog.LogToStderr(false)
	began := time.Now()
	ctx := context.Background()
	host, err := thinpool.NewHostKernel()
	if err != nil {
		return err
	}
	defer host.Close()
	k := &traceKernel{Kernel: host}
	dir, err := os.MkdirTemp("", "freezebench-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(dir)
	const poolName = "freezebench"
	p, err := thinpool.Open(ctx, thinpool.Config{
		Name: poolName, StateDir: filepath.Join(dir, "state"),
		DataFile: filepath.Join(dir, "data"), MetadataFile: filepath.Join(dir, "meta"),
		DataFileBytes: poolDataBytes, MetadataFileBytes: poolMetaBytes, BlockSectors: blockSectors,
		OverprovisionRatio: -1,
	}, k)
	if err != nil {
		return err
	}
	// Offline removes the pool's dm devices and detaches its loop devices;
	// the writer, deferred later, has closed the volume by then.
	defer func() { _ = p.Offline(ctx); _ = p.Close() }()
	d, err := csi.New(csi.Options{NodeID: "bench", Pools: map[string]csi.Pool{poolName: p},
		KubeletDir: filepath.Join(dir, "kubelet"), FS: csi.NewHostFS(), Templates: -1})
	if err != nil {
		return err
	}
	const vol = "frz"
	volID := poolName + "/" + vol
	if _, err := p.CreateVolume(ctx, vol, volumeBytes); err != nil {
		return err
	}
	node, err := p.Activate(ctx, vol)
	if err != nil {
		return err
	}
	dev, _, err := host.BlockDevice(node)
	if err != nil {
		return err
	}
	w, err := startWriter(node, 16<<20)
	if err != nil {
		return err
	}
	writerStopped := false
	stopWriter := func() error {
		if writerStopped {
			return nil
		}
		writerStopped = true
		if err := w.stop(); err != nil {
			return fmt.Errorf("writer on %s: %w", vol, err)
		}
		return nil
	}
	defer func() { _ = stopWriter() }()

	// The freeze.
	var snapDur, idle, bare, snap, csiSnap sample
	last := 100 * time.Millisecond // the idle window before the first snapshot
	for i := 0; i <= 4*n; i++ {
		t0 := time.Now()
		time.Sleep(last)
		t1 := time.Now()
		time.Sleep(freezeGap)
		t2 := time.Now()
		if err := host.Suspend(dev, 0); err != nil {
			return err
		}
		if err := host.Resume(dev); err != nil {
			return err
		}
		t3 := time.Now()
		time.Sleep(freezeGap)
		t4 := time.Now()
		if _, err := p.Snapshot(ctx, fmt.Sprintf("frz-s%d", i), vol); err != nil {
			return err
		}
		t5 := time.Now()
		time.Sleep(freezeGap)
		t6 := time.Now()
		if _, err := d.CreateSnapshot(ctx, &csipb.CreateSnapshotRequest{Name: fmt.Sprintf("frz-csi-%d", i), SourceVolumeId: volID}); err != nil {
			return err
		}
		t7 := time.Now()
		// The last write a window blocked completes after it: look once
		// it has.
		time.Sleep(freezeGap)
		last = t5.Sub(t4)
		if i == 0 {
			k.take() // the set-up's and the warm-up's
			continue
		}
		idle = append(idle, w.longest(t0, t1))
		bare = append(bare, w.longest(t2, t3))
		snap = append(snap, w.longest(t4, t5))
		csiSnap = append(csiSnap, w.longest(t6, t7))
		snapDur = append(snapDur, t5.Sub(t4))
	}
	freezeTr := k.take()

	// The pollers.
	reg := prometheus.NewRegistry()
	// As serve builds it: the Go and process collectors, the driver's.
	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	if _, err := csi.NewMetrics(reg, func() map[string]csi.UsageSource { return map[string]csi.UsageSource{poolName: p} }); err != nil {
		return err
	}
	metrics := csi.Handler(reg)
	poolDev, err := host.InfoByName("dmthin-" + poolName)
	if err != nil {
		return fmt.Errorf("the pool's dm device: %w", err)
	}
	// The first two are the target's.
	pollers := []poller{
		{name: "/metrics scrape", call: func() error {
			rec := httptest.NewRecorder()
			metrics.ServeHTTP(rec, httptest.NewRequest(http.MethodGet, "/metrics", nil))
			if rec.Code != http.StatusOK {
				return fmt.Errorf("/metrics: status %d", rec.Code)
			}
			return nil
		}},
		{name: "CSI GetCapacity", call: func() error {
			_, err := d.GetCapacity(ctx, &csipb.GetCapacityRequest{Parameters: map[string]string{csi.ParamPool: poolName}})
			return err
		}},
		{name: "Pool.Usage (what both read)", call: func() error { _, err := p.Usage(); return err }},
		{name: "pool status ioctl, no commit, no lock (what Usage asks the kernel)", call: func() error {
			_, err := host.Status(poolDev.Dev, true)
			return err
		}},
	}
	rounds := min(max(20*n, 200), 1000)
	idlePolls, err := pollRounds(pollers, rounds)
	if err != nil {
		return err
	}
	k.take() // the idle phase's own: none
	snapsDone := make(chan struct{})
	snapsErr := make(chan error, 1)
	snapCount := 0
	go func() {
		for i := 0; ; i++ {
			select {
			case <-snapsDone:
				snapCount = i
				snapsErr <- nil
				return
			default:
			}
			if _, err := d.CreateSnapshot(ctx, &csipb.CreateSnapshotRequest{Name: fmt.Sprintf("poll-%d", i), SourceVolumeId: volID}); err != nil {
				snapsErr <- err
				return
			}
		}
	}()
	busyPolls, err := pollRounds(pollers, rounds)
	close(snapsDone)
	if serr := <-snapsErr; err == nil {
		err = serr
	}
	if err != nil {
		return err
	}
	pollTr := k.take()
	if err := stopWriter(); err != nil {
		return err
	}

	// The tables.
	freezeSetTID, freezeSetTIDIn := freezeTr.setTIDs()
	pollSetTID, pollSetTIDIn := pollTr.setTIDs()
	for _, s := range []struct {
		op string
		by map[string]sample
	}{
		{"stall", map[string]sample{"idle": idle, "suspend+resume": bare, "Pool.Snapshot": snap, "CSI CreateSnapshot": csiSnap}},
		{"Pool.Snapshot duration", map[string]sample{"Pool.Snapshot": snapDur}},
		{"origin suspended, from the suspend's return to the resume's call", map[string]sample{"freeze": freezeTr.suspended(), "pollers": pollTr.suspended()}},
		{"set_transaction_id", map[string]sample{"freeze": freezeSetTID, "pollers": pollSetTID}},
	} {
		if err := emitSamples("freeze", s.op, s.by); err != nil {
			return err
		}
	}
	for i, pl := range pollers {
		if err := emitSamples("freeze-pollers", pl.name, map[string]sample{"idle": idlePolls[i].durations(), "during snapshots": busyPolls[i].durations()}); err != nil {
			return err
		}
	}

	fmt.Printf("\n## Application freeze under a snapshot (pkg/thinpool, an active 1 GiB volume, a writer on it)\n\n")
	fmt.Printf("A writer does 4 KiB O_DIRECT writes back-to-back over the volume's first 16 MiB. An event's stall is the longest write that overlapped it; %d of each event, one after the other, %v apart. Milliseconds.\n\n", len(snap), freezeGap)
	fmt.Println("| event | stall p50 | stall p99 | stall max | event's own duration, median |")
	fmt.Println("|---|---:|---:|---:|---:|")
	stallRow := func(what string, s sample, dur string) {
		fmt.Printf("| %s | %s | %s | %s | %s |\n", what, ms(s.quantile(.5)), ms(s.quantile(.99)), ms(s.quantile(1)), dur)
	}
	stallRow("idle window, as long as the last snapshot", idle, ms(snapDur.quantile(.5)))
	stallRow("bare suspend + resume of the volume's dm device (pkg/devmapper)", bare, "–")
	stallRow("Pool.Snapshot", snap, ms(snapDur.quantile(.5)))
	stallRow("CSI CreateSnapshot (in-process)", csiSnap, "–")
	fmt.Println()
	for _, s := range []struct {
		what string
		s    sample
	}{{"Pool.Snapshot", snap}, {"CSI CreateSnapshot", csiSnap}} {
		got, limit := s.s.quantile(.99), 2*bare.quantile(.99)
		fmt.Printf("Target: snapshot freeze p99 <= 2x a bare suspend + resume of the same device. %s: %s ms against 2 x %s = %s ms (%.1fx): %s. At p50: %.1fx.\n",
			s.what, ms(got), ms(bare.quantile(.99)), ms(limit), float64(got)/float64(bare.quantile(.99)), metOrMissed(got <= limit),
			float64(s.s.quantile(.5))/float64(bare.quantile(.5)))
	}
	fh := freezeTr.suspended()
	fmt.Printf("Inside both snapshot calls the origin stays suspended from the suspend's return to the resume's call, for the pool's lock p.mu taken, the checks, the intent recorded (bbolt, fsync'd, on tmpfs), create_snap (the kernel commits the metadata after a message), set_transaction_id (another commit) and the result recorded: %d windows, p50 %s ms, p99 %s ms; medians: %s.\n",
		len(fh), quantileOr(fh, .5), quantileOr(fh, .99), freezeTr.parts())
	fmt.Printf("set_transaction_id alone: %d times, p50 %s ms, p99 %s ms, %d of them inside a suspended window.\n",
		len(freezeSetTID), quantileOr(freezeSetTID, .5), quantileOr(freezeSetTID, .99), freezeSetTIDIn)

	fmt.Printf("\n## Pollers during snapshots (the same pool and volume, the writer still on)\n\n")
	fmt.Printf("Each poller in turn, %v apart, %d rounds idle, then %d rounds while another goroutine takes CSI snapshots of the volume back-to-back (%d taken). /metrics: the promhttp handler called in-process with a GET, on a registry built as serve builds it (Go and process collectors, csi.NewMetrics for the pool). Milliseconds.\n\n",
		pollPause, rounds, rounds, snapCount)
	fmt.Println("| poller | idle p50 | idle p99 | during snapshots p50 | during snapshots p99 | p99 during ÷ idle | calls during snapshots that overlapped a suspended window, their p50 / the others' p50 | calls during snapshots that overlapped a create_snap or set_transaction_id, their p50 / the others' p50 |")
	fmt.Println("|---|---:|---:|---:|---:|---:|---|---|")
	for i, pl := range pollers {
		a, b := idlePolls[i].durations(), busyPolls[i].durations()
		win, notWin := busyPolls[i].split(pollTr.windowSpans())
		msg, notMsg := busyPolls[i].split(pollTr.msgSpans())
		fmt.Printf("| %s | %s | %s | %s | %s | %.2fx | %d of %d, %s / %s | %d of %d, %s / %s |\n", pl.name, ms(a.quantile(.5)), ms(a.quantile(.99)), ms(b.quantile(.5)), ms(b.quantile(.99)),
			float64(b.quantile(.99))/float64(a.quantile(.99)),
			len(win), len(b), quantileOr(win, .5), quantileOr(notWin, .5), len(msg), len(b), quantileOr(msg, .5), quantileOr(notMsg, .5))
	}
	fmt.Println()
	for i, pl := range pollers[:2] {
		a, b := idlePolls[i].durations().quantile(.99), busyPolls[i].durations().quantile(.99)
		fmt.Printf("Target: %s p99 during snapshots within 20%% of idle: %s ms against %s ms (%+.0f%%): %s.\n",
			pl.name, ms(b), ms(a), 100*(float64(b)/float64(a)-1), metOrMissed(float64(b) <= 1.2*float64(a)))
	}
	ph := pollTr.suspended()
	fmt.Printf("Suspended windows while the pollers ran (from the suspend's return to the resume's call): %d, p50 %s ms, p99 %s ms, max %s ms; medians: %s. set_transaction_id alone: %d times, p50 %s ms, p99 %s ms, %d of them inside a suspended window.\n",
		len(ph), quantileOr(ph, .5), quantileOr(ph, .99), quantileOr(ph, 1), pollTr.parts(), len(pollSetTID), quantileOr(pollSetTID, .5), quantileOr(pollSetTID, .99), pollSetTIDIn)
	fmt.Println("Pool.Usage takes no lock of the pool: it reads the records' sums as of the last change recorded and asks the kernel for the pool's status without a commit. What it can still wait for is the kernel: dm-thin reads the pool's status under its metadata's root_lock, which create_snap and set_transaction_id, and the commit after each, take for writing; the last column parts the calls by whether one of those messages was under way.")
	fmt.Printf("\nThis part took %v in the VM.\n", time.Since(began).Round(time.Second))
	return nil
}

// pollPause is the pause between two pollers' calls.
const pollPause = 2 * time.Millisecond

// poller is one reader of the pool's state.
type poller struct {
	name string
	call func() error
}

// call is one poller call's start and duration.
type call struct {
	start time.Time
	d     time.Duration
}

type calls []call

func (cs calls) durations() sample {
	s := make(sample, len(cs))
	for i, c := range cs {
		s[i] = c.d
	}
	return s
}

// span is one stretch of time traced: a suspended window or a message.
type span struct{ start, end time.Time }

// split parts the calls into those that overlapped one of the spans and
// the others.
func (cs calls) split(spans []span) (in, out sample) {
	for _, c := range cs {
		end := c.start.Add(c.d)
		overlap := false
		for _, sp := range spans {
			if c.start.Before(sp.end) && end.After(sp.start) {
				overlap = true
				break
			}
		}
		if overlap {
			in = append(in, c.d)
		} else {
			out = append(out, c.d)
		}
	}
	return in, out
}

func quantileOr(s sample, q float64) string {
	if len(s) == 0 {
		return "–"
	}
	return ms(s.quantile(q))
}

// pollRounds calls every poller in turn, rounds times, pollPause apart,
// and returns each one's calls.
func pollRounds(pollers []poller, rounds int) ([]calls, error) {
	out := make([]calls, len(pollers))
	for range rounds {
		for i, pl := range pollers {
			t0 := time.Now()
			if err := pl.call(); err != nil {
				return nil, fmt.Errorf("%s: %w", pl.name, err)
			}
			out[i] = append(out[i], call{start: t0, d: time.Since(t0)})
			time.Sleep(pollPause)
		}
	}
	return out, nil
}

// traceKernel is the host kernel, timing what a snapshot of an active
// origin does with it (newDevice and createLocked in pkg/thinpool): the
// origin's suspend; the pool's lock p.mu taken, the checks and the intent
// recorded; create_snap; set_transaction_id and the result recorded, p.mu
// released; the origin's resume.
//
// It keeps each suspended window, from the suspend's return to the
// resume's call, split by step, and every create_snap and
// set_transaction_id, inside a window or not. One window at a time: the
// bench never runs two snapshots at once, nor a group.
type traceKernel struct {
	thinpool.Kernel

	mu  sync.Mutex
	cur window // the window open; zero start outside one
	tr  traces
}

// window is one origin's suspended window.
type window struct {
	start, end time.Time // the suspend's return, the resume's call
	// The steps: from the suspend's return to create_snap's call (p.mu
	// taken, the checks, the intent recorded), create_snap, and from
	// create_snap's return to the resume's call (set_transaction_id, the
	// result recorded, p.mu released).
	lockChecksIntent, createSnap, toResume time.Duration
	snapEnd                                time.Time // create_snap's return
}

// msgTrace is one create_snap or set_transaction_id sent to the pool.
type msgTrace struct {
	setTID   bool // set_transaction_id, else create_snap
	start    time.Time
	d        time.Duration
	inWindow bool // sent while an origin was suspended
}

// traces is what traceKernel kept since it was last asked.
type traces struct {
	windows []window
	msgs    []msgTrace
}

// suspended is each window's length.
func (tr traces) suspended() sample {
	var s sample
	for _, w := range tr.windows {
		s = append(s, w.end.Sub(w.start))
	}
	return s
}

// parts is the median of each step of the windows, for the notes.
func (tr traces) parts() string {
	var lock, snap, rest sample
	for _, w := range tr.windows {
		lock, snap, rest = append(lock, w.lockChecksIntent), append(snap, w.createSnap), append(rest, w.toResume)
	}
	return fmt.Sprintf("lock, checks and intent %s, create_snap %s, create_snap's return to the resume's call (set_transaction_id, the result recorded, p.mu released) %s",
		quantileOr(lock, .5), quantileOr(snap, .5), quantileOr(rest, .5))
}

// setTIDs is each set_transaction_id's duration, and how many of them
// were sent inside a suspended window.
func (tr traces) setTIDs() (s sample, inWindow int) {
	for _, m := range tr.msgs {
		if !m.setTID {
			continue
		}
		s = append(s, m.d)
		if m.inWindow {
			inWindow++
		}
	}
	return s, inWindow
}

func (tr traces) windowSpans() []span {
	var out []span
	for _, w := range tr.windows {
		out = append(out, span{w.start, w.end})
	}
	return out
}

func (tr traces) msgSpans() []span {
	var out []span
	for _, m := range tr.msgs {
		out = append(out, span{m.start, m.start.Add(m.d)})
	}
	return out
}

func (t *traceKernel) Suspend(dev devmapper.Dev, flags devmapper.SuspendFlags) error {
	err := t.Kernel.Suspend(dev, flags)
	t.mu.Lock()
	t.cur = window{start: time.Now()}
	t.mu.Unlock()
	return err
}

func (t *traceKernel) Message(dev devmapper.Dev, m devmapper.Message) error {
	t0 := time.Now()
	err := t.Kernel.Message(dev, m)
	end := time.Now()
	t.mu.Lock()
	defer t.mu.Unlock()
	open := !t.cur.start.IsZero()
	switch m.(type) {
	case devmapper.CreateSnap:
		if open {
			if t.cur.snapEnd.IsZero() {
				t.cur.lockChecksIntent = t0.Sub(t.cur.start)
			}
			// A retry after an id found taken adds to the first.
			t.cur.createSnap += end.Sub(t0)
			t.cur.snapEnd = end
		}
		t.tr.msgs = append(t.tr.msgs, msgTrace{start: t0, d: end.Sub(t0), inWindow: open})
	case devmapper.SetTransactionID:
		t.tr.msgs = append(t.tr.msgs, msgTrace{setTID: true, start: t0, d: end.Sub(t0), inWindow: open})
	}
	return err
}

func (t *traceKernel) Resume(dev devmapper.Dev) error {
	t.mu.Lock()
	if !t.cur.start.IsZero() {
		t.cur.end = time.Now()
		if !t.cur.snapEnd.IsZero() {
			t.cur.toResume = t.cur.end.Sub(t.cur.snapEnd)
		}
		t.tr.windows = append(t.tr.windows, t.cur)
		t.cur = window{}
	}
	t.mu.Unlock()
	return t.Kernel.Resume(dev)
}

// take returns what was traced so far and forgets it.
func (t *traceKernel) take() traces {
	t.mu.Lock()
	defer t.mu.Unlock()
	tr := t.tr
	t.tr = traces{}
	return tr
}
