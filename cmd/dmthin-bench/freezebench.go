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
// read) and the pool's status ioctl without the pool's lock (what Usage
// asks the kernel), to tell waiting for the kernel from waiting for the
// lock; and a Kernel wrapper times, for every snapshot, how long the
// origin stays suspended with the pool's lock taken.
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
			continue // warm-up
		}
		idle = append(idle, w.longest(t0, t1))
		bare = append(bare, w.longest(t2, t3))
		snap = append(snap, w.longest(t4, t5))
		csiSnap = append(csiSnap, w.longest(t6, t7))
		snapDur = append(snapDur, t5.Sub(t4))
	}
	freezeHolds := k.takeHolds()

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
	// The first two are the target's; usagePoller is Pool.Usage.
	const usagePoller = 2
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
	k.takeHolds() // the idle phase's own: none
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
	pollHolds := k.takeHolds()
	if err := stopWriter(); err != nil {
		return err
	}

	// The tables.
	for _, s := range []struct {
		op string
		by map[string]sample
	}{
		{"stall", map[string]sample{"idle": idle, "suspend+resume": bare, "Pool.Snapshot": snap, "CSI CreateSnapshot": csiSnap}},
		{"Pool.Snapshot duration", map[string]sample{"Pool.Snapshot": snapDur}},
		{"origin suspended with the pool's lock taken", map[string]sample{"freeze": freezeHolds.held(), "pollers": pollHolds.held()}},
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
	fh := freezeHolds.held()
	fmt.Printf("Inside both snapshot calls the origin stays suspended from the suspend's return to the resume's call, the pool's lock taken for the checks, the intent, create_snap (the kernel commits the metadata after a message), set_transaction_id (another commit) and the result recorded (bbolt, fsync'd on tmpfs): p50 %s ms, p99 %s ms; medians: %s.\n",
		ms(fh.quantile(.5)), ms(fh.quantile(.99)), freezeHolds.parts())

	fmt.Printf("\n## Pollers during snapshots (the same pool and volume, the writer still on)\n\n")
	fmt.Printf("Each poller in turn, %v apart, %d rounds idle, then %d rounds while another goroutine takes CSI snapshots of the volume back-to-back (%d taken). /metrics: the promhttp handler called in-process with a GET, on a registry built as serve builds it (Go and process collectors, csi.NewMetrics for the pool). Milliseconds.\n\n",
		pollPause, rounds, rounds, snapCount)
	fmt.Println("| poller | idle p50 | idle p99 | during snapshots p50 | during snapshots p99 | p99 during ÷ idle | calls during snapshots that overlapped a lock-held window, their p50 / the others' p50 |")
	fmt.Println("|---|---:|---:|---:|---:|---:|---|")
	for i, pl := range pollers {
		a, b := idlePolls[i].durations(), busyPolls[i].durations()
		in, out := busyPolls[i].split(pollHolds)
		fmt.Printf("| %s | %s | %s | %s | %s | %.2fx | %d of %d, %s / %s |\n", pl.name, ms(a.quantile(.5)), ms(a.quantile(.99)), ms(b.quantile(.5)), ms(b.quantile(.99)),
			float64(b.quantile(.99))/float64(a.quantile(.99)), len(in), len(b), quantileOr(in, .5), quantileOr(out, .5))
	}
	fmt.Println()
	for i, pl := range pollers[:2] {
		a, b := idlePolls[i].durations().quantile(.99), busyPolls[i].durations().quantile(.99)
		fmt.Printf("Target: %s p99 during snapshots within 20%% of idle: %s ms against %s ms (%+.0f%%): %s.\n",
			pl.name, ms(b), ms(a), 100*(float64(b)/float64(a)-1), metOrMissed(float64(b) <= 1.2*float64(a)))
	}
	ph := pollHolds.held()
	fmt.Printf("Lock-held windows while the pollers ran (origin suspended, the pool's lock p.mu taken; Pool.Usage takes p.mu for all of its call, the status ioctl included): %d, p50 %s ms, p99 %s ms, max %s ms; medians: %s.\n",
		len(ph), ms(ph.quantile(.5)), ms(ph.quantile(.99)), ms(ph.quantile(1)), pollHolds.parts())
	after, dur := busyPolls[usagePoller].endsAfter(pollHolds)
	fmt.Printf("Pool.Usage calls that began inside a window: %d; they returned a median %s ms after the window's end (the lock is released just before it), having taken a median %s ms.\n",
		len(after), quantileOr(after, .5), quantileOr(dur, .5))
	fmt.Println("The status ioctl, which takes no lock of ours, waits too, for less: dm-thin reads the pool's status under its metadata's root_lock, which create_snap and the commits take for writing.")
	fmt.Printf("\nThis part took %v in the VM.\n", time.Since(began).Round(time.Second))
	return nil
}

func metOrMissed(ok bool) string {
	if ok {
		return "met"
	}
	return "missed"
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

// split parts the calls into those that overlapped a window of holds and
// the others.
func (cs calls) split(holds snapTraces) (in, out sample) {
	for _, c := range cs {
		end := c.start.Add(c.d)
		overlap := false
		for _, h := range holds {
			if c.start.Before(h.end) && end.After(h.start) {
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

// traceKernel is the host kernel, timing what Pool.Snapshot does with
// an active origin: suspend, create_snap, set_transaction_id, resume.
// Between the suspend's return and the resume's call Pool.Snapshot holds
// the pool's lock for all but the lock's taking (newDevice: the intent,
// the messages and the commit, under p.mu; the resume after it).
type traceKernel struct {
	thinpool.Kernel

	mu    sync.Mutex
	cur   snapTrace // the snapshot under way; zero start outside one
	holds snapTraces
}

// snapTrace is one snapshot's window, from the origin's suspend's return to
// its resume's call, and the two messages sent meanwhile.
type snapTrace struct {
	start, end         time.Time
	createSnap, setTID time.Duration
	// From the suspend's return to create_snap's call (the pool's lock
	// taken, the checks, the intent recorded), and from set_transaction_id's
	// return to the resume's call (the result recorded, the lock released).
	before, after time.Duration
	lastMsgEnd    time.Time
}

type snapTraces []snapTrace

func (ts snapTraces) held() sample {
	var s sample
	for _, t := range ts {
		s = append(s, t.end.Sub(t.start))
	}
	return s
}

// parts is the median of each part of the windows, for the notes.
func (ts snapTraces) parts() string {
	var before, createSnap, setTID, after sample
	for _, t := range ts {
		before, createSnap = append(before, t.before), append(createSnap, t.createSnap)
		setTID, after = append(setTID, t.setTID), append(after, t.after)
	}
	return fmt.Sprintf("lock, checks and intent %s, create_snap %s, set_transaction_id %s, result recorded and lock released %s",
		quantileOr(before, .5), quantileOr(createSnap, .5), quantileOr(setTID, .5), quantileOr(after, .5))
}

// endsAfter is, for the calls that began inside a window, how long after
// the window's end each one returned: about 0 for a call that waited for
// what the window held.
func (cs calls) endsAfter(holds snapTraces) (after, dur sample) {
	for _, c := range cs {
		for _, h := range holds {
			if !c.start.Before(h.start) && c.start.Before(h.end) {
				after, dur = append(after, c.start.Add(c.d).Sub(h.end)), append(dur, c.d)
				break
			}
		}
	}
	return after, dur
}

func (t *traceKernel) Suspend(dev devmapper.Dev, flags devmapper.SuspendFlags) error {
	err := t.Kernel.Suspend(dev, flags)
	t.mu.Lock()
	t.cur = snapTrace{start: time.Now()}
	t.mu.Unlock()
	return err
}

func (t *traceKernel) Message(dev devmapper.Dev, m devmapper.Message) error {
	t0 := time.Now()
	err := t.Kernel.Message(dev, m)
	d := time.Since(t0)
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.cur.start.IsZero() {
		return err
	}
	switch m.(type) {
	case devmapper.CreateSnap:
		t.cur.createSnap, t.cur.before = d, t0.Sub(t.cur.start)
	case devmapper.SetTransactionID:
		t.cur.setTID = d
	}
	t.cur.lastMsgEnd = t0.Add(d)
	return err
}

func (t *traceKernel) Resume(dev devmapper.Dev) error {
	t.mu.Lock()
	if !t.cur.start.IsZero() {
		t.cur.end = time.Now()
		if !t.cur.lastMsgEnd.IsZero() {
			t.cur.after = t.cur.end.Sub(t.cur.lastMsgEnd)
		}
		t.holds = append(t.holds, t.cur)
		t.cur = snapTrace{}
	}
	t.mu.Unlock()
	return t.Kernel.Resume(dev)
}

// takeHolds returns the windows traced so far and forgets them.
func (t *traceKernel) takeHolds() snapTraces {
	t.mu.Lock()
	defer t.mu.Unlock()
	h := t.holds
	t.holds = nil
	return h
}
