//go:build vmtest

package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"math/rand"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	csipb "github.com/container-storage-interface/spec/lib/go/csi"
	"golang.org/x/sys/unix"
	"google.golang.org/grpc"
	"google.golang.org/grpc/backoff"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"

	"github.com/csi-dmthin/csi-dmthin/internal/vmtest"
	"github.com/csi-dmthin/csi-dmthin/pkg/devmapper"
	"github.com/csi-dmthin/csi-dmthin/pkg/thinpool"
)

// The real `csi-dmthin serve` on the real kernel, SIGKILLed at random
// moments while a client drives it, and restarted, over and over: two pools
// on loop files, formatted templates on or off at each start, ext4 and
// XFS. After each restart, everything that answered OK before a kill is
// still true (objects, sizes, sources, staged mounts and what was written
// in them, nothing deleted comes back, nothing unasked appears); then every
// interrupted call is retried and must succeed. At the end everything is
// unstaged and deleted through the driver, which stops on SIGTERM; then the
// kernel, not the driver's records, must show no thin device left in the
// pools and their space back at the empty pools' level.
//
// The kill is of the server's process group, as a container runtime's is of
// the container: an mkfs or mount the driver runs dies with it rather than
// finishing behind the next server's back.

const (
	// killNode is the node ID the killed servers run with.
	killNode     = "kill-node"
	defaultKills = 30
	workers      = 3
	// maxRunBeforeKill bounds how long the client drives a server before
	// it is killed (twice that with templates on); the kill comes at a
	// uniformly random moment in it.
	maxRunBeforeKill = 1500 * time.Millisecond
	// startupKillOneIn: one start in this many is killed before it is
	// ready (opening and recovering the pools, reconciling devices).
	startupKillOneIn   = 8
	maxStartupKillWait = time.Second
	callTimeout        = 3 * time.Minute
	readyTimeout       = 2 * time.Minute
	// killPoolBytes: the pools' loop files live on the guest's /tmp, a
	// tmpfs of half its memory (2 GiB of 4). dm-thin hands out blocks it
	// has never used before it reuses freed ones, so over a long run each
	// file fills to its full size whatever the volumes hold; two pools
	// larger than the tmpfs ran it out of space at about 75 kills, and
	// every thin device then failed its writes with EIO.
	killPoolBytes = 768 << 20
)

func TestKillServeKernel(t *testing.T) {
	vmtest.RequireGuest(t)
	k, err := thinpool.NewHostKernel()
	if err != nil {
		t.Fatal(err)
	}
	kills := defaultKills
	if v := os.Getenv(killsEnv); v != "" {
		if kills, err = strconv.Atoi(v); err != nil || kills < 1 {
			t.Fatalf("%s=%q: want a positive number", killsEnv, v)
		}
	}
	seed := time.Now().UnixNano()
	if v := os.Getenv(killSeedEnv); v != "" {
		if seed, err = strconv.ParseInt(v, 10, 64); err != nil {
			t.Fatalf("%s=%q: want a number", killSeedEnv, v)
		}
	}
	t.Logf("%d kills, seed %d (%s=%d repeats the choices; the timing differs)", kills, seed, killSeedEnv, seed)
	r := newKillRun(t, k, seed)
	r.run(kills)
}

type killRun struct {
	t                                               *testing.T
	k                                               *thinpool.HostKernel
	dir, stateDir, kubeletDir, sock, config, logLoc string
	pools                                           []string
	m                                               *model
	rng                                             *rand.Rand // kill timing and templates; the model has its own
	starts                                          int
	empty                                           map[string]devmapper.ThinPoolStatus

	failedMu                          sync.Mutex
	failedNames                       []string // of the objects of failed calls
	inFlight                          atomic.Int64
	byKindMu                          sync.Mutex
	byKind                            map[string]*[2]int // call kind: OK, interrupted
	calls, interrupted, retried       atomic.Int64
	kills, startupKills, killsMidCall int
	checks                            int
	readyTotal                        time.Duration
	readyCount                        int
}

func newKillRun(t *testing.T, k *thinpool.HostKernel, seed int64) *killRun {
	dir := t.TempDir()
	r := &killRun{
		t: t, k: k, dir: dir, stateDir: filepath.Join(dir, "state"), kubeletDir: filepath.Join(dir, "kubelet"),
		sock: filepath.Join(dir, "csi.sock"), config: filepath.Join(dir, "pools.yaml"), logLoc: filepath.Join(dir, "serve.log"),
		pools: []string{"kill-a", "kill-b"}, rng: rand.New(rand.NewSource(seed)), empty: map[string]devmapper.ThinPoolStatus{},
		byKind: map[string]*[2]int{},
	}
	r.m = &model{kubeletDir: r.kubeletDir, pools: r.pools, rng: rand.New(rand.NewSource(seed + 1))}
	var b strings.Builder
	b.WriteString("pools:\n")
	for _, p := range r.pools {
		fmt.Fprintf(&b, "- name: %s\n  dataFile: %s\n  dataFileSize: %d\n", p, filepath.Join(dir, p+".data"), killPoolBytes)
	}
	if err := os.WriteFile(r.config, []byte(b.String()), 0o600); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if t.Failed() {
			r.failedMu.Lock()
			names := r.failedNames
			r.failedMu.Unlock()
			t.Logf("the server's log: its starts, failed calls and lines on %s:\n%s\nits last lines:\n%s", names, grepLog(r.logLoc, names, 400), tail(r.logLoc, 40))
		}
		// A failed run leaves volumes staged, maybe suspended by a killed
		// snapshot: resume and unmount them, or their devices cannot go.
		if list, err := k.List(); err == nil {
			for _, d := range list {
				if info, err := k.Info(d.Dev); err == nil && info.Suspended && strings.HasPrefix(d.Name, "dmthin-kill-") {
					_ = k.Resume(d.Dev)
				}
			}
		}
		for _, p := range mountsUnder(r.kubeletDir) {
			if err := unix.Unmount(p, 0); err != nil {
				t.Errorf("unmount %s: %v", p, err)
			}
		}
		for _, p := range r.pools {
			removePool(t, k, p)
		}
	})
	return r
}

func (r *killRun) run(kills int) {
	t := r.t
	start := time.Now()
	for r.kills < kills && !t.Failed() {
		s := r.start()
		if r.starts > 1 && r.rng.Intn(startupKillOneIn) == 0 {
			time.Sleep(time.Duration(r.rng.Int63n(int64(maxStartupKillWait))))
			r.kill(s)
			r.kills++
			r.startupKills++
			continue
		}
		if !r.ready(s) {
			return
		}
		if r.starts == 1 {
			r.recordEmpty()
		}
		r.check(s, "after a restart")
		r.retryInterrupted(s)
		r.check(s, "after the retries")
		if t.Failed() {
			r.kill(s)
			return
		}
		stop := make(chan struct{})
		var wg sync.WaitGroup
		for range workers {
			wg.Add(1)
			go func() {
				defer wg.Done()
				r.work(s, stop)
			}()
		}
		window := maxRunBeforeKill
		if s.templates > 0 {
			// Longer, so templates get built (an mkfs each) and cloned.
			window *= 2
		}
		time.Sleep(time.Duration(r.rng.Int63n(int64(window))))
		close(stop)
		if r.inFlight.Load() > 0 {
			r.killsMidCall++
		}
		r.killOnly(s)
		wg.Wait()
		_ = s.conn.Close()
		r.kills++
		if r.kills%10 == 0 {
			t.Logf("%d kills, %d calls, %v", r.kills, r.calls.Load(), time.Since(start).Round(time.Second))
		}
	}
	if t.Failed() {
		return
	}
	s := r.start()
	if !r.ready(s) {
		return
	}
	r.check(s, "after the last restart")
	r.retryInterrupted(s)
	r.check(s, "after the last retries")
	r.deleteAll(s)
	r.stop(s)
	took := time.Since(start)
	r.checkKernelEmpty()
	avgReady := time.Duration(0)
	if r.readyCount > 0 {
		avgReady = r.readyTotal / time.Duration(r.readyCount)
	}
	t.Logf("SIGKILL test: %d kills (%d with calls in flight, %d during start-up), %d calls (%d interrupted, %d retried), %d checks, %d starts (ready in %v on average), %v",
		r.kills, r.killsMidCall, r.startupKills, r.calls.Load(), r.interrupted.Load(), r.retried.Load(), r.checks, r.starts, avgReady.Round(time.Millisecond), took.Round(time.Second))
	var kinds []string
	for k, n := range r.byKind {
		kinds = append(kinds, fmt.Sprintf("%s %d/%d", k, n[0], n[1]))
	}
	sort.Strings(kinds)
	log, _ := os.ReadFile(r.logLoc)
	t.Logf("calls by kind (OK/interrupted): %s; the server's log: %d volumes cloned from a template, %d templates built",
		strings.Join(kinds, ", "), bytes.Count(log, []byte("template=true")),
		bytes.Count(log, []byte(`"Built formatted template"`)))
	if r.killsMidCall < r.kills/2 {
		t.Errorf("only %d of %d kills came with calls in flight: the test hardly interrupts anything", r.killsMidCall, r.kills)
	}
}

// killServer is one serve process and a client connected to it.
type killServer struct {
	cmd       *exec.Cmd
	conn      *grpc.ClientConn
	c         killClient
	exited    chan struct{}
	killed    atomic.Bool
	templates int
	started   time.Time
}

// start starts serve with formatted templates off or on (a random number).
func (r *killRun) start() *killServer {
	t := r.t
	t.Helper()
	r.starts++
	templates := []int{0, 2, 8}[r.rng.Intn(3)]
	args, err := json.Marshal([]string{
		"--node-id=" + killNode, "--config=" + r.config, "--endpoint=unix://" + r.sock, "--state-dir=" + r.stateDir,
		"--kubelet-dir=" + r.kubeletDir, "--metrics-address=", "--templates-per-pool=" + strconv.Itoa(templates),
		"--shutdown-timeout=20s", "-v=2",
	})
	if err != nil {
		t.Fatal(err)
	}
	log, err := os.OpenFile(r.logLoc, os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	defer log.Close() // the child has its own descriptor
	fmt.Fprintf(log, "=== start %d, --templates-per-pool=%d\n", r.starts, templates)
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(exe)
	cmd.Env = append(os.Environ(), childRoleEnv+"=serve", childArgsEnv+"="+string(args))
	cmd.Stdout, cmd.Stderr = log, log
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	s := &killServer{cmd: cmd, exited: make(chan struct{}), templates: templates, started: time.Now()}
	go func() {
		_ = cmd.Wait()
		close(s.exited)
	}()
	// Short reconnect backoff: the socket is refused until the new server
	// is up, and the default backoff would wait seconds after that.
	s.conn, err = grpc.NewClient("unix://"+r.sock, grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithConnectParams(grpc.ConnectParams{Backoff: backoff.Config{BaseDelay: 20 * time.Millisecond, Multiplier: 1.5, MaxDelay: 200 * time.Millisecond}, MinConnectTimeout: 5 * time.Second}))
	if err != nil {
		t.Fatal(err)
	}
	s.c = killClient{csipb.NewIdentityClient(s.conn), csipb.NewControllerClient(s.conn), csipb.NewNodeClient(s.conn)}
	return s
}

// ready waits until s answers; false (the test failed) if it exits first.
func (r *killRun) ready(s *killServer) bool {
	deadline := time.Now().Add(readyTimeout)
	for {
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		_, err := s.c.Probe(ctx, &csipb.ProbeRequest{})
		cancel()
		if err == nil {
			r.readyTotal += time.Since(s.started)
			r.readyCount++
			return true
		}
		select {
		case <-s.exited:
			r.t.Errorf("serve (start %d) exited before it was ready: %v", r.starts, s.cmd.ProcessState)
			return false
		default:
		}
		if time.Now().After(deadline) {
			r.t.Errorf("serve (start %d) not ready in %v: %v", r.starts, readyTimeout, err)
			r.kill(s)
			return false
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// kill SIGKILLs s's process group and waits until every process of it is
// gone: none may hold a device or a mount when the next server starts. The
// client connection stays open until the calls in flight have seen the
// kill (Unavailable), then closes.
func (r *killRun) kill(s *killServer) {
	r.killOnly(s)
	_ = s.conn.Close()
}

func (r *killRun) killOnly(s *killServer) {
	s.killed.Store(true)
	pgid := s.cmd.Process.Pid
	if err := syscall.Kill(-pgid, syscall.SIGKILL); err != nil && !errors.Is(err, syscall.ESRCH) {
		r.t.Fatalf("kill: %v", err)
	}
	<-s.exited
	deadline := time.Now().Add(30 * time.Second)
	for groupAlive(pgid) {
		if time.Now().After(deadline) {
			r.t.Fatalf("processes of group %d still run 30 s after SIGKILL", pgid)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// groupAlive reports whether a process of group pgid (other than a zombie,
// which holds nothing open) exists.
func groupAlive(pgid int) bool {
	entries, _ := os.ReadDir("/proc")
	for _, e := range entries {
		if _, err := strconv.Atoi(e.Name()); err != nil {
			continue
		}
		b, err := os.ReadFile(filepath.Join("/proc", e.Name(), "stat"))
		if err != nil {
			continue
		}
		// pid (comm) state ppid pgrp ...; comm may hold spaces.
		f := strings.Fields(string(b[bytes.LastIndexByte(b, ')')+1:]))
		if len(f) > 2 && f[0] != "Z" && f[2] == strconv.Itoa(pgid) {
			return true
		}
	}
	return false
}

// stop SIGTERMs s and expects a clean exit within its shutdown timeout.
func (r *killRun) stop(s *killServer) {
	start := time.Now()
	if err := s.cmd.Process.Signal(syscall.SIGTERM); err != nil {
		r.t.Fatal(err)
	}
	select {
	case <-s.exited:
		if !s.cmd.ProcessState.Success() {
			r.t.Errorf("serve after SIGTERM: %v", s.cmd.ProcessState)
		}
		r.t.Logf("serve stopped on SIGTERM in %v", time.Since(start).Round(time.Millisecond))
	case <-time.After(40 * time.Second):
		r.t.Errorf("serve still runs 40 s after SIGTERM")
		r.kill(s)
	}
	_ = s.conn.Close()
}

// work makes calls on s until stop. A call that fails with Unavailable once
// s is killed was interrupted: it waits for its retry. Any other failure
// fails the test.
func (r *killRun) work(s *killServer, stop <-chan struct{}) {
	for {
		select {
		case <-stop:
			return
		default:
		}
		op := r.m.pick()
		if op == nil {
			time.Sleep(10 * time.Millisecond)
			continue
		}
		r.inFlight.Add(1)
		ctx, cancel := context.WithTimeout(context.Background(), callTimeout)
		err := op.call(ctx, s.c)
		cancel()
		r.inFlight.Add(-1)
		r.calls.Add(1)
		outcome := "OK"
		if err != nil {
			outcome = err.Error()
		}
		r.m.note(op, r.starts, outcome)
		switch {
		case err == nil:
			r.count(op, 0)
			r.m.done(op)
		case s.killed.Load() && status.Code(err) == codes.Unavailable:
			r.count(op, 1)
			r.interrupted.Add(1)
			r.m.interrupted(op)
		default:
			r.t.Errorf("%s (start %d, --templates-per-pool=%d): %v%s", op.what, r.starts, s.templates, err, r.diagnose(op))
			r.m.done(op)
			return
		}
	}
}

// count notes a call's outcome (0: OK, 1: interrupted) by its kind.
func (r *killRun) count(op *kOp, outcome int) {
	kind, _, _ := strings.Cut(op.what, " ")
	if strings.Contains(op.what, " from ") {
		kind += "(source)"
	}
	r.byKindMu.Lock()
	defer r.byKindMu.Unlock()
	if r.byKind[kind] == nil {
		r.byKind[kind] = &[2]int{}
	}
	r.byKind[kind][outcome]++
}

// retryInterrupted retries every interrupted call once, in order; each
// must succeed, as the CSI spec's idempotency asks.
func (r *killRun) retryInterrupted(s *killServer) {
	for _, op := range r.m.takePending() {
		ctx, cancel := context.WithTimeout(context.Background(), callTimeout)
		err := op.call(ctx, s.c)
		cancel()
		r.calls.Add(1)
		r.retried.Add(1)
		outcome := "retry OK"
		if err != nil {
			outcome = "retry: " + err.Error()
		}
		r.m.note(op, r.starts, outcome)
		if err != nil {
			r.t.Errorf("retry of the interrupted %s (start %d, --templates-per-pool=%d): %v%s", op.what, r.starts, s.templates, err, r.diagnose(op))
		}
		r.m.done(op)
	}
}

// deleteAll unstages and deletes everything through the driver.
func (r *killRun) deleteAll(s *killServer) {
	r.m.mu.Lock()
	var ops []*kOp
	for _, o := range r.m.objs {
		if o.state == live && o.staged {
			ops = append(ops, r.m.unstage(o))
		}
	}
	for _, o := range r.m.objs {
		if o.state != deleted {
			ops = append(ops, r.m.deleteObj(o))
		}
	}
	r.m.mu.Unlock()
	for _, op := range ops {
		ctx, cancel := context.WithTimeout(context.Background(), callTimeout)
		err := op.call(ctx, s.c)
		cancel()
		r.calls.Add(1)
		if err != nil {
			r.t.Errorf("clean-up: %s: %v", op.what, err)
		}
	}
	r.check(s, "after deleting everything")
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	if vols, err := s.c.ListVolumes(ctx, &csipb.ListVolumesRequest{}); err != nil || len(vols.GetEntries()) != 0 {
		r.t.Errorf("ListVolumes after deleting everything: %v, %v", vols.GetEntries(), err)
	}
	if snaps, err := s.c.ListSnapshots(ctx, &csipb.ListSnapshotsRequest{}); err != nil || len(snaps.GetEntries()) != 0 {
		r.t.Errorf("ListSnapshots after deleting everything: %v, %v", snaps.GetEntries(), err)
	}
	if m := mountsUnder(r.kubeletDir); len(m) != 0 {
		r.t.Errorf("mounts left: %v", m)
	}
}
