package main

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	csipb "github.com/container-storage-interface/spec/lib/go/csi"
	"golang.org/x/sys/unix"
	"google.golang.org/grpc"
	"google.golang.org/grpc/backoff"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"

	"github.com/csi-dmthin/csi-dmthin/pkg/thinpool"
)

// The streams part runs the real driver (`csi-dmthin serve`) as its own
// process in the guest, on a pool of sparse files on tmpfs, and talks CSI
// to it over gRPC on its unix socket, as the kubelet and the sidecars do:
// throughput at 1, 8 and 32 concurrent streams, the calls' latency with
// 1,000 and 10,000 volumes in the pool, start-up time, and the process's
// resident memory.
const (
	// streamsVolumes is how many volumes each level of concurrency makes
	// (1, 8 and 32 streams all divide it).
	streamsVolumes = 96
	// streamsScale are the pool sizes of the scale table, in volumes.
	streamsIdle, streamsFull = 1000, 10000
	// streamsFillStreams make the scale table's volumes; streamsFillBudget
	// bounds the time filling to streamsFull may take: the table then says
	// how many it reached.
	streamsFillStreams = 8
	streamsFillBudget  = 7 * time.Minute
	// streamsCalls is how many times each scale call is timed.
	streamsCalls = 20
	// streamsPage is ListVolumes' max_entries, as the external
	// health monitor would page.
	streamsPage = 500
	// streamsCallTimeout bounds one call: a call that passes it is an
	// error of the table, not a hang of the run.
	streamsCallTimeout = 2 * time.Minute
	// streamsRSSTarget is issue 14's memory target with 1,000 volumes.
	streamsRSSTarget = 64 << 20
	streamsPool      = "streams"
)

// streamLevels are the numbers of concurrent streams.
var streamLevels = []int{1, 8, 32}

func streamsBench(a partArgs) (err error) {
	if a.driver == "" {
		return errors.New("needs the csi-dmthin binary in the guest: build it beside dmthin-bench (make bench does)")
	}
	partStart := time.Now()
	dir, err := os.MkdirTemp("", "streams-")
	if err != nil {
		return err
	}
	d := &driverProc{
		bin: a.driver, dir: dir, sock: filepath.Join(dir, "csi.sock"), config: filepath.Join(dir, "pools.yaml"),
		stateDir: filepath.Join(dir, "state"), kubelet: filepath.Join(dir, "kubelet"), logPath: filepath.Join(dir, "serve.log"),
	}
	defer func() {
		if err != nil {
			fmt.Fprintf(os.Stderr, "dmthin-bench: streams: the driver's log, last lines (%s):\n%s\n", d.logPath, tailFile(d.logPath, 40))
		}
		if cerr := d.cleanUp(); cerr != nil {
			err = errors.Join(err, fmt.Errorf("clean up: %w", cerr))
		}
	}()
	// 16 GiB of data: the throughput volumes' mounts write a few blocks
	// each. The overprovisioning check is off: 10,000 volumes of 1 GiB.
	pools := fmt.Sprintf("defaultPool: %[1]s\npools:\n- name: %[1]s\n  dataFile: %[2]s\n  dataFileSize: 16Gi\n  metadataFileSize: 256Mi\n  overprovisionRatio: -1\n",
		streamsPool, filepath.Join(dir, streamsPool+".data"))
	if err := os.WriteFile(d.config, []byte(pools), 0o600); err != nil {
		return err
	}
	if err := d.start(); err != nil {
		return err
	}
	if _, err := d.waitReady(); err != nil {
		return err
	}

	// The first filesystem volume of a size is formatted at stage and
	// starts its template's build: made before the timed runs, which then
	// clone the template as every later volume does.
	if _, err := d.readyVolume(context.Background(), "pvc-warmup"); err != nil {
		return fmt.Errorf("the first volume: %w", err)
	}
	if err := d.waitLog(`"Built formatted template"`, 2*time.Minute); err != nil {
		return err
	}

	// Throughput: each level makes its own volumes, then snapshots them.
	var levels []streamLevel
	var peakRSS, peakHWM int64
	active := 1 // the warm-up volume
	for _, n := range streamLevels {
		var stopMem func() int64
		if n == streamLevels[len(streamLevels)-1] {
			stopMem = sampleRSS(d.pid(), 20*time.Millisecond)
		}
		settle()
		l := runLevel(d.pid(), n, streamsVolumes, func(ctx context.Context, i int) ([]time.Duration, string, error) {
			name := fmt.Sprintf("pvc-s%d-%03d", n, i)
			steps, err := d.readyVolume(ctx, name)
			return steps, streamsPool + "/" + name, err
		})
		if stopMem != nil {
			peakRSS = stopMem()
			if _, hwm, err := procMemory(d.pid()); err == nil {
				peakHWM = hwm
			}
		}
		l.op = "CreateVolume + NodeStageVolume + NodePublishVolume"
		active += len(l.made)
		levels = append(levels, l)
	}
	var snaps []streamLevel
	for li, n := range streamLevels {
		vols := levels[li].made
		settle()
		l := runLevel(d.pid(), n, len(vols), func(ctx context.Context, i int) ([]time.Duration, string, error) {
			return d.snapshot(ctx, fmt.Sprintf("snap-s%d-%03d", n, i), vols[i])
		})
		l.op = "CreateSnapshot, each stream of its own active volumes"
		snaps = append(snaps, l)
	}
	// The same one: the driver's per-ID lock answers a second call on a
	// source in progress with Aborted (the CO retries), so these count as
	// errors, by code.
	same := levels[0].made
	if len(same) > 0 {
		n := streamLevels[len(streamLevels)-1]
		settle()
		l := runLevel(d.pid(), n, streamsVolumes, func(ctx context.Context, i int) ([]time.Duration, string, error) {
			return d.snapshot(ctx, fmt.Sprintf("snap-same-%03d", i), same[0])
		})
		l.op = "CreateSnapshot, every stream of one active volume"
		snaps = append(snaps, l)
	}
	throughputDone := time.Now()
	if err := printThroughput(levels, snaps); err != nil {
		return err
	}

	// Scale: the pool filled to 1,000 and to 10,000 volumes (CreateVolume
	// in parallel streams: clones of the formatted template, not
	// activated).
	var points []scalePoint
	made := active
	for _, target := range []int{streamsIdle, streamsFull} {
		settle()
		t0 := time.Now()
		reached, marks, fillErrs := d.fill(made, target, time.Now().Add(streamsFillBudget))
		fill := time.Since(t0)
		if len(fillErrs) > 0 {
			return fmt.Errorf("filling the pool to %d volumes: %d calls failed, the first: %w", target, len(fillErrs), fillErrs[0])
		}
		p, err := d.scaleAt(a.n, reached)
		if err != nil {
			return fmt.Errorf("with %d volumes: %w", reached, err)
		}
		p.target, p.fillRate, p.fillStart, p.fillMarks = target, float64(reached-made)/fill.Seconds(), made, marks
		made = reached + streamsCalls
		points = append(points, p)
	}
	if err := printScale(points); err != nil {
		return err
	}
	printMemory(points, peakRSS, peakHWM)
	fmt.Printf("\nThe part took %v in the VM: throughput %v, scale and memory %v.\n",
		time.Since(partStart).Round(time.Second), throughputDone.Sub(partStart).Round(time.Second), time.Since(throughputDone).Round(time.Second))
	return nil
}

// driverProc is `csi-dmthin serve` as its own process, and a CSI client of
// it over its unix socket.
type driverProc struct {
	bin, dir, sock, config, stateDir, kubelet, logPath string

	cmd     *exec.Cmd
	exited  chan struct{}
	started time.Time
	conn    *grpc.ClientConn
	ident   csipb.IdentityClient
	ctl     csipb.ControllerClient
	node    csipb.NodeClient
}

// start starts serve, its stderr appended to the log file, and connects.
func (d *driverProc) start() error {
	log, err := os.OpenFile(d.logPath, os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o600)
	if err != nil {
		return err
	}
	defer log.Close() // the child has its own descriptor
	// -v=2, as the Helm chart runs it: a line per call done.
	d.cmd = exec.Command(d.bin, "serve", "--node-id=bench", "--endpoint=unix://"+d.sock, "--config="+d.config,
		"--state-dir="+d.stateDir, "--kubelet-dir="+d.kubelet, "--metrics-address=", "-v=2")
	d.cmd.Stdout, d.cmd.Stderr = log, log
	d.cmd.Env = append(os.Environ(), "LC_ALL=C")
	d.started = time.Now()
	if err := d.cmd.Start(); err != nil {
		return err
	}
	d.exited = make(chan struct{})
	go func(cmd *exec.Cmd, exited chan struct{}) {
		_ = cmd.Wait()
		close(exited)
	}(d.cmd, d.exited)
	// A short reconnect backoff: the socket is refused until the server
	// is up, and the default backoff would wait a second after that.
	d.conn, err = grpc.NewClient("unix://"+d.sock, grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithConnectParams(grpc.ConnectParams{Backoff: backoff.Config{BaseDelay: 5 * time.Millisecond, Multiplier: 1.5, MaxDelay: 50 * time.Millisecond}, MinConnectTimeout: 5 * time.Second}))
	if err != nil {
		return err
	}
	d.ident, d.ctl, d.node = csipb.NewIdentityClient(d.conn), csipb.NewControllerClient(d.conn), csipb.NewNodeClient(d.conn)
	return nil
}

func (d *driverProc) pid() int { return d.cmd.Process.Pid }

// waitReady returns the time from the process's start until Probe answers
// ready.
func (d *driverProc) waitReady() (time.Duration, error) {
	deadline := time.Now().Add(2 * time.Minute)
	for {
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		r, err := d.ident.Probe(ctx, &csipb.ProbeRequest{})
		cancel()
		if err == nil && (r.GetReady() == nil || r.GetReady().GetValue()) {
			return time.Since(d.started), nil
		}
		select {
		case <-d.exited:
			return 0, fmt.Errorf("the driver exited before it was ready: %v", d.cmd.ProcessState)
		default:
		}
		if time.Now().After(deadline) {
			return 0, fmt.Errorf("the driver is not ready after 2 minutes: %v", err)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// stop SIGTERMs the driver and returns how long it took to exit.
func (d *driverProc) stop() (time.Duration, error) {
	if d.cmd == nil {
		return 0, nil
	}
	defer func() { d.cmd = nil }()
	if d.conn != nil {
		_ = d.conn.Close()
	}
	t0 := time.Now()
	if err := d.cmd.Process.Signal(syscall.SIGTERM); err != nil && !errors.Is(err, os.ErrProcessDone) {
		return 0, err
	}
	select {
	case <-d.exited:
	case <-time.After(40 * time.Second):
		_ = d.cmd.Process.Kill()
		<-d.exited
		return 0, errors.New("the driver still ran 40 s after SIGTERM: killed")
	}
	took := time.Since(t0)
	if !d.cmd.ProcessState.Success() {
		return took, fmt.Errorf("the driver after SIGTERM: %v", d.cmd.ProcessState)
	}
	return took, nil
}

// waitLog waits until the driver's log holds s.
func (d *driverProc) waitLog(s string, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	for time.Now().Before(deadline) {
		b, err := os.ReadFile(d.logPath)
		if err != nil {
			return err
		}
		if bytes.Contains(b, []byte(s)) {
			return nil
		}
		time.Sleep(20 * time.Millisecond)
	}
	return fmt.Errorf("no %s in the driver's log after %v", s, timeout)
}

var (
	streamsMount = &csipb.VolumeCapability{
		AccessType: &csipb.VolumeCapability_Mount{Mount: &csipb.VolumeCapability_MountVolume{FsType: "ext4"}},
		AccessMode: &csipb.VolumeCapability_AccessMode{Mode: csipb.VolumeCapability_AccessMode_SINGLE_NODE_WRITER},
	}
	streamsGiB = &csipb.CapacityRange{RequiredBytes: volumeBytes}
)

func (d *driverProc) create(ctx context.Context, name string) (string, error) {
	r, err := d.ctl.CreateVolume(ctx, &csipb.CreateVolumeRequest{Name: name, CapacityRange: streamsGiB, VolumeCapabilities: []*csipb.VolumeCapability{streamsMount}})
	return r.GetVolume().GetVolumeId(), err
}

// readySteps are readyVolume's calls, in order.
var readySteps = []string{"CreateVolume", "NodeStageVolume", "NodePublishVolume"}

// readyVolume makes a volume ready for a pod as the CO does: CreateVolume,
// NodeStageVolume, NodePublishVolume; it returns each call's time.
func (d *driverProc) readyVolume(ctx context.Context, name string) ([]time.Duration, error) {
	t0 := time.Now()
	id, err := d.create(ctx, name)
	if err != nil {
		return nil, fmt.Errorf("CreateVolume %s: %w", name, err)
	}
	t1 := time.Now()
	staging := filepath.Join(d.kubelet, "plugins", "staging", name)
	if _, err := d.node.NodeStageVolume(ctx, &csipb.NodeStageVolumeRequest{VolumeId: id, StagingTargetPath: staging, VolumeCapability: streamsMount}); err != nil {
		return nil, fmt.Errorf("NodeStageVolume %s: %w", id, err)
	}
	t2 := time.Now()
	target := filepath.Join(d.kubelet, "pods", name, "mount")
	if _, err := d.node.NodePublishVolume(ctx, &csipb.NodePublishVolumeRequest{VolumeId: id, StagingTargetPath: staging, TargetPath: target, VolumeCapability: streamsMount}); err != nil {
		return nil, fmt.Errorf("NodePublishVolume %s: %w", id, err)
	}
	t3 := time.Now()
	return []time.Duration{t1.Sub(t0), t2.Sub(t1), t3.Sub(t2)}, nil
}

func (d *driverProc) snapshot(ctx context.Context, name, source string) ([]time.Duration, string, error) {
	t0 := time.Now()
	_, err := d.ctl.CreateSnapshot(ctx, &csipb.CreateSnapshotRequest{Name: name, SourceVolumeId: source})
	if err != nil {
		return nil, "", fmt.Errorf("CreateSnapshot %s of %s: %w", name, source, err)
	}
	return []time.Duration{time.Since(t0)}, name, nil
}

// streamLevel is one row of the throughput table.
type streamLevel struct {
	op                    string
	streams               int
	wall                  time.Duration
	seq                   sample   // each successful sequence, whole
	steps                 []sample // and by call
	made                  []string // what the successful ones made (volume IDs)
	errs                  []error  // the failed ones'
	errByCode             map[string]int
	busy                  float64       // the guest's CPUs busy, a share of all of them
	driverUser, driverSys time.Duration // the driver process's CPU time
}

// runLevel runs total sequences on n concurrent streams, stream s doing
// sequences s, s+n, s+2n, ...; do returns each call's time. A failed
// sequence is recorded, not fatal.
func runLevel(pid, n, total int, do func(ctx context.Context, i int) ([]time.Duration, string, error)) streamLevel {
	l := streamLevel{streams: n, errByCode: map[string]int{}}
	var mu sync.Mutex
	var wg sync.WaitGroup
	cpu0, drv0 := guestCPU(), procCPUOf(pid)
	t0 := time.Now()
	for s := range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := s; i < total; i += n {
				ctx, cancel := context.WithTimeout(context.Background(), streamsCallTimeout)
				c0 := time.Now()
				steps, made, err := do(ctx, i)
				took := time.Since(c0)
				cancel()
				mu.Lock()
				if err != nil {
					l.errs = append(l.errs, err)
					l.errByCode[status.Code(err).String()]++
				} else {
					l.seq = append(l.seq, took)
					for len(l.steps) < len(steps) {
						l.steps = append(l.steps, nil)
					}
					for k, st := range steps {
						l.steps[k] = append(l.steps[k], st)
					}
					l.made = append(l.made, made)
				}
				mu.Unlock()
			}
		}()
	}
	wg.Wait()
	l.wall = time.Since(t0)
	cpu1, drv1 := guestCPU(), procCPUOf(pid)
	l.busy = cpu1.busyShare(cpu0)
	l.driverUser, l.driverSys = drv1.user-drv0.user, drv1.sys-drv0.sys
	sort.Strings(l.made)
	return l
}

func (l streamLevel) perSecond() float64 { return float64(len(l.seq)) / l.wall.Seconds() }

// errors is the errors cell: their count, by gRPC code.
func (l streamLevel) errorsCell() string {
	if len(l.errs) == 0 {
		return "0"
	}
	var codes []string
	for c, k := range l.errByCode {
		codes = append(codes, fmt.Sprintf("%s %d", c, k))
	}
	sort.Strings(codes)
	return fmt.Sprintf("%d (%s)", len(l.errs), strings.Join(codes, ", "))
}

// p5099 is a p50 / p99 cell in milliseconds.
func p5099(s sample) string {
	if len(s) == 0 {
		return "–"
	}
	return fmt.Sprintf("%s / %s", ms(s.quantile(.5)), ms(s.quantile(.99)))
}

func printThroughput(levels, snaps []streamLevel) error {
	fmt.Printf("\n## The driver as its own process: concurrent streams over gRPC\n\n")
	fmt.Println("`csi-dmthin serve` (-v=2, its log to a file on tmpfs) on one pool of sparse files on the guest's tmpfs (16 GiB data, 64 KiB blocks, zeroing on, 8 formatted templates), called over its unix socket through one gRPC connection by 1, 8 and 32 goroutines at once (the streams), as the kubelet and the sidecars would call it. Volumes of 1 GiB, ext4, SINGLE_NODE_WRITER; each a clone of the pool's formatted template (made once before the runs).")
	fmt.Printf("A level's %d volumes are shared out evenly among its streams; latency is one sequence's whole time (p50 / p99, milliseconds; the p99 of %d samples is %s); volumes per second are the successful sequences over the level's wall time. An error is counted, not fatal. ", streamsVolumes, streamsVolumes, p99Rank(streamsVolumes))
	fmt.Printf("Each level starts once the guest is idle (under 15%% of its CPUs busy over half a second, or after 15 s), so that the last level's mounts and writeback do not run into it. CPU: the guest's %d vCPUs busy over the level (/proc/stat), and the driver process's user + system time (/proc/<pid>/stat) over the sequences started.\n\n", runtime.NumCPU())
	fmt.Println("| sequence | streams | done | wall (s) | per second | latency p50 / p99 (ms) | p99 ÷ p50 | errors | guest CPUs busy | driver CPU per sequence, user + system (ms) |")
	fmt.Println("|---|---:|---:|---:|---:|---:|---:|---|---:|---:|")
	for _, l := range append(slices.Clone(levels), snaps...) {
		perSeq := "–"
		if done := time.Duration(len(l.seq) + len(l.errs)); done > 0 {
			perSeq = ms(l.driverUser/done) + " + " + ms(l.driverSys/done)
		}
		fmt.Printf("| %s | %d | %d | %.1f | %.1f | %s | %s | %s | %.0f%% | %s |\n", l.op, l.streams, len(l.seq), l.wall.Seconds(), l.perSecond(), p5099(l.seq), spread(l.seq), l.errorsCell(), 100*l.busy, perSeq)
		methods := map[string]sample{"sequence": l.seq}
		if len(l.steps) == len(readySteps) {
			for k, s := range l.steps {
				methods[readySteps[k]] = s
			}
		}
		if err := emitSamples("streams", fmt.Sprintf("%s, %d streams", l.op, l.streams), methods); err != nil {
			return err
		}
	}
	fmt.Println()
	for _, l := range levels {
		if len(l.steps) == 3 {
			fmt.Printf("- %d streams, by call (p50 / p99 ms): CreateVolume %s, NodeStageVolume %s, NodePublishVolume %s.\n", l.streams, p5099(l.steps[0]), p5099(l.steps[1]), p5099(l.steps[2]))
		}
	}
	fmt.Println("- CreateSnapshot: each stream snapshots the volumes its level's create row made, once each (distinct sources, all active and mounted; the origin is suspended for each). The last row has every stream snapshot the same volume: the driver's per-ID lock answers a call whose source is busy with Aborted at once, which the CO retries.")
	for _, l := range append(slices.Clone(levels), snaps...) {
		if len(l.errs) > 0 {
			fmt.Printf("- %s, %d streams, first error: %v\n", l.op, l.streams, l.errs[0])
		}
	}
	fmt.Println()
	target := func(what string, one, top streamLevel) {
		noErrs := len(top.errs) == 0
		faster := top.perSecond() > one.perSecond()
		tight := len(top.seq) > 0 && top.seq.quantile(.99) <= 5*top.seq.quantile(.5)
		fmt.Printf("Target, %s: %d streams: no errors (%d: %s), more volumes per second than 1 stream (%.1f against %.1f: %s), p99 <= 5x p50 (%s: %s): %s.\n",
			what, top.streams, len(top.errs), metOrMissed(noErrs), top.perSecond(), one.perSecond(), metOrMissed(faster), spread(top.seq), metOrMissed(tight), metOrMissed(noErrs && faster && tight))
	}
	target("create + stage + publish", levels[0], levels[len(levels)-1])
	target("CreateSnapshot of distinct volumes", snaps[0], snaps[len(streamLevels)-1])
	return nil
}

func spread(s sample) string {
	if len(s) == 0 || s.quantile(.5) == 0 {
		return "–"
	}
	return fmt.Sprintf("%.1fx", float64(s.quantile(.99))/float64(s.quantile(.5)))
}

// fill makes volumes from..target-1 with streamsFillStreams streams, each
// taking the next number, until target or the deadline; it returns the
// count reached (the pool's volumes, from ListVolumes), the time each
// thousandth volume was made, and the failures.
func (d *driverProc) fill(from, target int, deadline time.Time) (int, []fillMark, []error) {
	var next, done atomic.Int64
	next.Store(int64(from))
	done.Store(int64(from))
	var mu sync.Mutex
	var errs []error
	marks := []fillMark{{vols: from, at: time.Now()}}
	var wg sync.WaitGroup
	for range streamsFillStreams {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for time.Now().Before(deadline) {
				i := next.Add(1) - 1
				if i >= int64(target) {
					return
				}
				ctx, cancel := context.WithTimeout(context.Background(), streamsCallTimeout)
				_, err := d.create(ctx, fmt.Sprintf("pvc-n%05d", i))
				cancel()
				k := done.Add(1)
				mu.Lock()
				if err != nil {
					errs = append(errs, err)
				}
				if k%1000 == 0 {
					marks = append(marks, fillMark{vols: int(k), at: time.Now()})
				}
				mu.Unlock()
			}
		}()
	}
	wg.Wait()
	if k := int(done.Load()); k%1000 != 0 {
		marks = append(marks, fillMark{vols: k, at: time.Now()})
	}
	n, _, err := d.listAll(context.Background())
	if err != nil {
		errs = append(errs, err)
	}
	return n, marks, errs
}

// fillMark is when the pool held vols volumes while filling.
type fillMark struct {
	vols int
	at   time.Time
}

// listAll walks ListVolumes in pages of streamsPage; it returns the
// entries and the pages.
func (d *driverProc) listAll(ctx context.Context) (entries, pages int, err error) {
	token := ""
	for {
		r, err := d.ctl.ListVolumes(ctx, &csipb.ListVolumesRequest{MaxEntries: streamsPage, StartingToken: token})
		if err != nil {
			return entries, pages, fmt.Errorf("ListVolumes page %d: %w", pages+1, err)
		}
		entries += len(r.GetEntries())
		pages++
		if token = r.GetNextToken(); token == "" {
			return entries, pages, nil
		}
	}
}

// scalePoint is what was measured with vols volumes in the pool.
type scalePoint struct {
	target, vols, fillStart int
	fillRate                float64
	fillMarks               []fillMark
	create, page, walk, cap sample
	shutdown, ready, listed sample
	idleRSS, idleHWM        int64   // after the last start, idle
	idleCPU                 float64 // the driver's CPU time then, a share of one CPU
	afterRSS, afterHWM      int64   // after the calls
}

// scaleAt restarts the driver n times with vols volumes in the pool (timing
// the shutdown, the start until Probe is ready and until ListVolumes
// returns them all), reads its idle memory after the last start, then times
// the calls.
func (d *driverProc) scaleAt(n, vols int) (scalePoint, error) {
	p := scalePoint{vols: vols}
	ctx := context.Background()
	for range n {
		took, err := d.stop()
		if err != nil {
			return p, err
		}
		p.shutdown = append(p.shutdown, took)
		if err := d.start(); err != nil {
			return p, err
		}
		ready, err := d.waitReady()
		if err != nil {
			return p, err
		}
		got, _, err := d.listAll(ctx)
		if err != nil {
			return p, err
		}
		if got != vols {
			return p, fmt.Errorf("after a restart ListVolumes returned %d volumes, not %d", got, vols)
		}
		p.ready, p.listed = append(p.ready, ready), append(p.listed, time.Since(d.started))
	}
	// Idle: what the process keeps, and spends, once started and asked
	// nothing more.
	c0, t0 := procCPUOf(d.pid()), time.Now()
	time.Sleep(2 * time.Second)
	c1 := procCPUOf(d.pid())
	p.idleCPU = float64(c1.user+c1.sys-c0.user-c0.sys) / float64(time.Since(t0))
	var err error
	if p.idleRSS, p.idleHWM, err = procMemory(d.pid()); err != nil {
		return p, err
	}
	for i := range streamsCalls {
		t0 := time.Now()
		if _, err := d.create(ctx, fmt.Sprintf("pvc-at%d-%02d", vols, i)); err != nil {
			return p, err
		}
		p.create = append(p.create, time.Since(t0))
	}
	for range streamsCalls {
		t0 := time.Now()
		r, err := d.ctl.ListVolumes(ctx, &csipb.ListVolumesRequest{MaxEntries: streamsPage})
		if err != nil {
			return p, err
		}
		if len(r.GetEntries()) != min(streamsPage, vols+streamsCalls) {
			return p, fmt.Errorf("a ListVolumes page of %d held %d", streamsPage, len(r.GetEntries()))
		}
		p.page = append(p.page, time.Since(t0))
	}
	for range n {
		t0 := time.Now()
		got, _, err := d.listAll(ctx)
		if err != nil {
			return p, err
		}
		if got != vols+streamsCalls {
			return p, fmt.Errorf("ListVolumes returned %d volumes, not %d", got, vols+streamsCalls)
		}
		p.walk = append(p.walk, time.Since(t0))
	}
	for range streamsCalls {
		t0 := time.Now()
		if _, err := d.ctl.GetCapacity(ctx, &csipb.GetCapacityRequest{VolumeCapabilities: []*csipb.VolumeCapability{streamsMount}}); err != nil {
			return p, err
		}
		p.cap = append(p.cap, time.Since(t0))
	}
	if p.afterRSS, p.afterHWM, err = procMemory(d.pid()); err != nil {
		return p, err
	}
	return p, nil
}

func printScale(points []scalePoint) error {
	fmt.Printf("\n## The driver with many volumes in its pool\n\n")
	fmt.Printf("The same driver and pool. The pool filled by CreateVolume on %d streams (1 GiB ext4 volumes, clones of the formatted template, not activated; %d of them active and mounted, the throughput table's; snapshots not counted). ", streamsFillStreams, points[0].fillStart)
	fmt.Printf("Start-up: SIGTERM, then the time from exec until Probe answers ready, and until a ListVolumes walk in pages of %d has returned every volume. Then, one call at a time: CreateVolume %d times, the first ListVolumes page %d times, a whole walk and GetCapacity. p50 / p99 in milliseconds (the p99 of %d samples is %s).\n\n", streamsPage, streamsCalls, streamsCalls, streamsCalls, p99Rank(streamsCalls))
	fmt.Print("| operation |")
	for _, p := range points {
		fmt.Printf(" %d volumes |", p.vols)
	}
	fmt.Print("\n|---|")
	for range points {
		fmt.Print("---:|")
	}
	fmt.Println()
	rows := []struct {
		op  string
		get func(p scalePoint) string
	}{
		{fmt.Sprintf("filling the pool (volumes per second, %d streams)", streamsFillStreams), func(p scalePoint) string { return fmt.Sprintf("%.1f", p.fillRate) }},
		{"shutdown on SIGTERM", func(p scalePoint) string { return p5099(p.shutdown) }},
		{"start-up until Probe is ready", func(p scalePoint) string { return p5099(p.ready) }},
		{"start-up until ListVolumes has returned every volume", func(p scalePoint) string { return p5099(p.listed) }},
		{"CreateVolume 1 GiB ext4", func(p scalePoint) string { return p5099(p.create) }},
		{fmt.Sprintf("ListVolumes, one page of %d", streamsPage), func(p scalePoint) string { return p5099(p.page) }},
		{fmt.Sprintf("ListVolumes, a whole walk in pages of %d", streamsPage), func(p scalePoint) string { return p5099(p.walk) }},
		{"GetCapacity", func(p scalePoint) string { return p5099(p.cap) }},
		{"the driver's CPU use while idle after the start (2 s, 10 ms ticks)", func(p scalePoint) string { return fmt.Sprintf("%.0f%% of a CPU", 100*p.idleCPU) }},
	}
	for _, r := range rows {
		fmt.Printf("| %s |", r.op)
		for _, p := range points {
			fmt.Printf(" %s |", r.get(p))
		}
		fmt.Println()
	}
	var rates []string
	for _, p := range points {
		for i := 1; i < len(p.fillMarks); i++ {
			a, b := p.fillMarks[i-1], p.fillMarks[i]
			rates = append(rates, fmt.Sprintf("%d–%d: %.1f", a.vols, b.vols, float64(b.vols-a.vols)/b.at.Sub(a.at).Seconds()))
		}
	}
	fmt.Printf("\nFilling, volumes per second by the pool's size: %s.\n", strings.Join(rates, ", "))
	for _, p := range points {
		if p.vols < p.target {
			fmt.Printf("\nThe pool reached %d volumes, not %d: filling stopped after %v.\n", p.vols, p.target, streamsFillBudget)
		}
		for _, r := range []struct {
			op string
			s  sample
		}{{"shutdown", p.shutdown}, {"start-up until ready", p.ready}, {"start-up until listed", p.listed},
			{"CreateVolume", p.create}, {"ListVolumes page", p.page}, {"ListVolumes walk", p.walk}, {"GetCapacity", p.cap}} {
			if err := emitSamples("streams-scale", fmt.Sprintf("%s, %d volumes", r.op, p.vols), map[string]sample{"driver": r.s}); err != nil {
				return err
			}
		}
	}
	return nil
}

func printMemory(points []scalePoint, peakRSS, peakHWM int64) {
	fmt.Printf("\n## The driver's resident memory\n\n")
	fmt.Println("From /proc/<pid>/status: VmRSS (resident now) and VmHWM (the most it has been resident since it started), MiB.")
	fmt.Println()
	fmt.Println("| when | VmRSS | VmHWM |")
	fmt.Println("|---|---:|---:|")
	last := streamLevels[len(streamLevels)-1]
	fmt.Printf("| during the %d-stream create + stage + publish run (VmRSS: the most of samples every 20 ms) | %s | %s |\n", last, mib(peakRSS), mib(peakHWM))
	for _, p := range points {
		fmt.Printf("| idle, 2 s after a start with %d volumes | %s | %s |\n", p.vols, mib(p.idleRSS), mib(p.idleHWM))
		fmt.Printf("| after the scale calls with %d volumes | %s | %s |\n", p.vols+streamsCalls, mib(p.afterRSS), mib(p.afterHWM))
	}
	for _, p := range points {
		if p.target == streamsIdle {
			// Judged on the most the driver held with these volumes: the
			// high-water mark after the scale calls, not the idle moment
			// after a start, which is its lowest.
			fmt.Printf("\nTarget: RSS < %d MiB with %d volumes: %s (VmHWM %s MiB after the scale calls; VmRSS %s MiB idle after a start).\n",
				streamsRSSTarget>>20, p.vols, metOrMissed(p.afterHWM < streamsRSSTarget), mib(p.afterHWM), mib(p.idleRSS))
		}
	}
}

func mib(b int64) string { return strconv.FormatFloat(float64(b)/(1<<20), 'f', 1, 64) }

// procMemory reads VmRSS and VmHWM, in bytes, from /proc/<pid>/status.
func procMemory(pid int) (rss, hwm int64, err error) {
	f, err := os.Open(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0, 0, err
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		k, v, ok := strings.Cut(sc.Text(), ":")
		if !ok || (k != "VmRSS" && k != "VmHWM") {
			continue
		}
		kb, err := strconv.ParseInt(strings.TrimSuffix(strings.TrimSpace(v), " kB"), 10, 64)
		if err != nil {
			return 0, 0, fmt.Errorf("/proc/%d/status: %s: %w", pid, sc.Text(), err)
		}
		if k == "VmRSS" {
			rss = kb << 10
		} else {
			hwm = kb << 10
		}
	}
	if rss == 0 || hwm == 0 {
		return 0, 0, fmt.Errorf("/proc/%d/status: no VmRSS or VmHWM", pid)
	}
	return rss, hwm, sc.Err()
}

// sampleRSS reads pid's VmRSS every interval until the returned func is
// called, which returns the most it saw.
func sampleRSS(pid int, every time.Duration) func() int64 {
	done := make(chan struct{})
	var peak atomic.Int64
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		t := time.NewTicker(every)
		defer t.Stop()
		for {
			if rss, _, err := procMemory(pid); err == nil && rss > peak.Load() {
				peak.Store(rss)
			}
			select {
			case <-done:
				return
			case <-t.C:
			}
		}
	}()
	return func() int64 {
		close(done)
		wg.Wait()
		return peak.Load()
	}
}

// cleanUp stops the driver, unmounts what it mounted (deepest first),
// removes its pool's dm devices (the loop devices clear themselves) and
// the files.
func (d *driverProc) cleanUp() error {
	var errs []error
	if _, err := d.stop(); err != nil {
		errs = append(errs, err)
	}
	mounts := mountsBeneath(d.kubelet)
	sort.Slice(mounts, func(i, j int) bool { return len(mounts[i]) > len(mounts[j]) })
	for _, m := range mounts {
		if err := unix.Unmount(m, 0); err != nil {
			errs = append(errs, fmt.Errorf("unmount %s: %w", m, err))
		}
	}
	k, err := thinpool.NewHostKernel()
	if err != nil {
		return errors.Join(append(errs, err)...)
	}
	defer k.Close()
	list, err := k.List()
	if err != nil {
		return errors.Join(append(errs, err)...)
	}
	pool := "dmthin-" + streamsPool
	for _, dev := range list {
		if strings.HasPrefix(dev.Name, pool+"-") {
			if err := k.Remove(dev.Dev, false); err != nil {
				errs = append(errs, fmt.Errorf("remove %s: %w", dev.Name, err))
			}
		}
	}
	for _, dev := range list {
		if dev.Name == pool {
			if err := k.Remove(dev.Dev, false); err != nil {
				errs = append(errs, fmt.Errorf("remove %s: %w", dev.Name, err))
			}
		}
	}
	if len(errs) == 0 {
		errs = append(errs, os.RemoveAll(d.dir))
	}
	return errors.Join(errs...)
}

// mountsBeneath lists the mount points beneath dir.
func mountsBeneath(dir string) []string {
	b, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		return nil
	}
	var out []string
	for _, line := range strings.Split(string(b), "\n") {
		f := strings.Fields(line)
		if len(f) > 4 && strings.HasPrefix(f[4], dir+"/") {
			out = append(out, f[4])
		}
	}
	return out
}

// tailFile returns the last lines of a file.
func tailFile(path string, lines int) string {
	b, err := os.ReadFile(path)
	if err != nil {
		return err.Error()
	}
	all := strings.Split(strings.TrimRight(string(b), "\n"), "\n")
	return strings.Join(all[max(0, len(all)-lines):], "\n")
}

// p99Rank says which sample the p99 of n samples is.
func p99Rank(n int) string {
	i := int(.99*float64(n-1) + .5)
	if i == n-1 {
		return "the largest"
	}
	return fmt.Sprintf("the largest but %d", n-1-i)
}

// cpuTimes are /proc/stat's first line: jiffies spent by all CPUs.
type cpuTimes struct{ busy, total uint64 }

// guestCPU reads the guest's CPU time, busy and in all (idle and iowait
// count as not busy).
func guestCPU() cpuTimes {
	b, err := os.ReadFile("/proc/stat")
	if err != nil {
		return cpuTimes{}
	}
	line, _, _ := strings.Cut(string(b), "\n")
	var t cpuTimes
	// user nice system idle iowait irq softirq steal (guest and guest_nice,
	// after them, are counted in user and nice already).
	for i, v := range strings.Fields(line)[1:] {
		if i >= 8 {
			break
		}
		n, _ := strconv.ParseUint(v, 10, 64)
		t.total += n
		if i != 3 && i != 4 {
			t.busy += n
		}
	}
	return t
}

// busyShare is the share of CPU time busy between before and t.
func (t cpuTimes) busyShare(before cpuTimes) float64 {
	if t.total <= before.total {
		return 0
	}
	return float64(t.busy-before.busy) / float64(t.total-before.total)
}

// procCPU is a process's CPU time.
type procCPU struct{ user, sys time.Duration }

// procCPUOf reads a process's CPU time from /proc/<pid>/stat.
func procCPUOf(pid int) procCPU {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return procCPU{}
	}
	// pid (comm) state ppid ...: utime and stime are the 14th and 15th
	// fields, the 12th and 13th after comm.
	f := strings.Fields(string(b[bytes.LastIndexByte(b, ')')+1:]))
	if len(f) < 13 {
		return procCPU{}
	}
	u, _ := strconv.ParseInt(f[11], 10, 64)
	s, _ := strconv.ParseInt(f[12], 10, 64)
	return procCPU{user: time.Duration(u) * time.Second / clockTicks, sys: time.Duration(s) * time.Second / clockTicks}
}

// clockTicks is USER_HZ, the unit of /proc's CPU times: 100 on every
// architecture Linux runs the guest on.
const clockTicks = 100

// settle waits until the guest is idle: under 15% of its CPUs busy over
// half a second, for at most 15 s.
func settle() {
	deadline := time.Now().Add(15 * time.Second)
	for time.Now().Before(deadline) {
		t0 := guestCPU()
		time.Sleep(500 * time.Millisecond)
		if guestCPU().busyShare(t0) < .15 {
			return
		}
	}
}
