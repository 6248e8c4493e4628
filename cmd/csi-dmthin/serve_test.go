package main

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	csipb "github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"

	"github.com/csi-dmthin/csi-dmthin/pkg/csi"
	"github.com/csi-dmthin/csi-dmthin/pkg/kube/registration"
	"github.com/csi-dmthin/csi-dmthin/pkg/thinpool"
	"github.com/csi-dmthin/csi-dmthin/pkg/thinpool/thinpooltest"
)

// serve on the host: the real run, its sockets, servers and shutdown, over
// pools on a fake kernel.

// serveSetup is one node: a state directory, a kubelet directory and a
// fake kernel that outlive the serve runs of a test.
type serveSetup struct {
	t                                          *testing.T
	dir, stateDir, kubeletDir, regDir, csiSock string
	k                                          *thinpooltest.FakeKernel
}

func newServeSetup(t *testing.T) *serveSetup {
	dir := t.TempDir()
	s := &serveSetup{t: t, dir: dir, stateDir: filepath.Join(dir, "state"), kubeletDir: filepath.Join(dir, "kubelet"),
		regDir: filepath.Join(dir, "registry"), csiSock: filepath.Join(dir, "csi", "csi.sock"), k: thinpooltest.NewFakeKernel()}
	if err := os.MkdirAll(s.regDir, 0o700); err != nil {
		t.Fatal(err)
	}
	return s
}

// flags writes a pools file with loop-file pools of these names and
// returns serve's parsed flags for it, plus extra.
func (s *serveSetup) flags(pools []string, extra ...string) *serveFlags {
	s.t.Helper()
	var b strings.Builder
	b.WriteString("pools:\n")
	for _, p := range pools {
		fmt.Fprintf(&b, "- name: %s\n  dataFile: %s\n  dataFileSize: 64Mi\n", p, filepath.Join(s.dir, p+".data"))
	}
	cfg := filepath.Join(s.dir, "pools-"+strings.Join(pools, "-")+".yaml")
	if err := os.WriteFile(cfg, []byte(b.String()), 0o600); err != nil {
		s.t.Fatal(err)
	}
	fs, f := newServeFlags()
	args := append([]string{
		"--node-id=node-a", "--config=" + cfg, "--state-dir=" + s.stateDir, "--kubelet-dir=" + s.kubeletDir,
		"--endpoint=unix://" + s.csiSock, "--metrics-address=", "--registration-dir=" + s.regDir, "--templates-per-pool=0",
	}, extra...)
	if err := fs.Parse(args); err != nil {
		s.t.Fatal(err)
	}
	return f
}

// env is the host's serve environment with s's fake kernel.
func (s *serveSetup) env() serveEnv {
	env := hostServeEnv()
	env.kernel = func() (thinpool.Kernel, error) { return s.k, nil }
	return env
}

// serving is a run in the background.
type serving struct {
	stop func()        // SIGTERM, as far as run can tell
	done chan error    // run's result
	c    kernelClients // over the CSI socket
}

type kernelClients struct {
	csipb.IdentityClient
	csipb.ControllerClient
}

// start runs serve in the background until it is up, and stops it at the
// end of the test if the test did not.
func (s *serveSetup) start(f *serveFlags, env serveEnv) *serving {
	s.t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	up := make(chan struct{})
	env.serving = func() { close(up) }
	r := &serving{stop: cancel, done: make(chan error, 1)}
	go func() { r.done <- run(ctx, f, env) }()
	select {
	case <-up:
	case err := <-r.done:
		cancel()
		s.t.Fatalf("serve did not start: %v", err)
	case <-time.After(30 * time.Second):
		s.t.Fatal("serve did not start in 30 s")
	}
	s.t.Cleanup(func() {
		cancel()
		select {
		case <-r.done:
		case <-time.After(60 * time.Second):
			s.t.Error("serve did not stop")
		}
	})
	r.c = s.dial()
	// The sockets come up in the background: wait for the CSI one to answer
	// and the registration one to be there.
	regSock := registration.SocketPath(s.regDir, csi.DefaultDriverName)
	deadline := time.Now().Add(30 * time.Second)
	for {
		_, err := r.c.GetPluginInfo(s.t.Context(), &csipb.GetPluginInfoRequest{})
		_, regErr := os.Stat(regSock)
		if err == nil && regErr == nil {
			break
		}
		if time.Now().After(deadline) {
			s.t.Fatalf("serve does not answer: %v, %v", err, regErr)
		}
		time.Sleep(10 * time.Millisecond)
	}
	return r
}

// wait stops r and returns run's result.
func (r *serving) wait(t *testing.T) error {
	t.Helper()
	r.stop()
	select {
	case err := <-r.done:
		r.done <- err // for the cleanup
		return err
	case <-time.After(60 * time.Second):
		t.Fatal("serve did not stop in 60 s")
		return nil
	}
}

func (s *serveSetup) dial() kernelClients {
	s.t.Helper()
	conn, err := grpc.NewClient("unix://"+s.csiSock, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		s.t.Fatal(err)
	}
	s.t.Cleanup(func() { _ = conn.Close() })
	return kernelClients{csipb.NewIdentityClient(conn), csipb.NewControllerClient(conn)}
}

// A second serve on the node, even with the same sockets, fails before it
// touches anything: the first one's sockets stay and keep serving.
func TestServeSecondInstanceRefused(t *testing.T) {
	s := newServeSetup(t)
	first := s.start(s.flags([]string{"fast"}), s.env())
	regSock := registration.SocketPath(s.regDir, csi.DefaultDriverName)
	inodes := func() map[string]uint64 {
		out := map[string]uint64{}
		for _, p := range []string{s.csiSock, regSock, adminSocket(s.stateDir)} {
			fi, err := os.Stat(p)
			if err != nil {
				t.Fatalf("%s: %v", p, err)
			}
			out[p] = fi.Sys().(*syscall.Stat_t).Ino
		}
		return out
	}
	before := inodes()

	var kernelOpened atomic.Bool
	env := s.env()
	env.kernel = func() (thinpool.Kernel, error) { kernelOpened.Store(true); return s.k, nil }
	start := time.Now()
	err := run(t.Context(), s.flags([]string{"slow"}), env)
	if err == nil {
		t.Fatal("a second serve on the same state directory started")
	}
	if took := time.Since(start); took > 5*time.Second {
		t.Errorf("the second serve took %v to fail", took)
	}
	lockPath := filepath.Join(s.stateDir, lockFileName)
	for _, w := range []string{lockPath, "pid " + strconv.Itoa(os.Getpid()), "nodePools"} {
		if !strings.Contains(err.Error(), w) {
			t.Errorf("error %q does not name %q", err, w)
		}
	}
	if kernelOpened.Load() {
		t.Error("the second serve opened the kernel")
	}
	if _, err := os.Stat(filepath.Join(s.stateDir, "slow.db")); err == nil {
		t.Error("the second serve made its pool's records")
	}
	if after := inodes(); !mapsEqual(before, after) {
		t.Errorf("the second serve replaced sockets: before %v, after %v", before, after)
	}
	if _, err := first.c.GetPluginInfo(t.Context(), &csipb.GetPluginInfoRequest{}); err != nil {
		t.Errorf("the first serve after the second's attempt: %v", err)
	}

	// Once the first has stopped, a new one starts.
	if err := first.wait(t); err != nil {
		t.Fatalf("first serve: %v", err)
	}
	s.start(s.flags([]string{"fast"}), s.env())
}

func mapsEqual[K comparable, V comparable](a, b map[K]V) bool {
	if len(a) != len(b) {
		return false
	}
	for k, v := range a {
		if w, ok := b[k]; !ok || w != v {
			return false
		}
	}
	return true
}

// The lock held by another process: serve names that process, and starts
// once the kernel has dropped the lock of the process that died.
func TestServeLockHeldByAnotherProcess(t *testing.T) {
	s := newServeSetup(t)
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), childRoleEnv+"=hold-lock", childArgsEnv+"="+s.stateDir)
	stdin, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { _ = stdin.Close(); _ = cmd.Process.Kill(); _ = cmd.Wait() }()
	line, err := bufio.NewReader(stdout).ReadString('\n')
	if err != nil || line != "locked\n" {
		t.Fatalf("child said %q, %v", line, err)
	}
	err = run(t.Context(), s.flags([]string{"fast"}), s.env())
	if err == nil {
		t.Fatal("serve started while another process held the lock")
	}
	if w := fmt.Sprintf("pid %d ", cmd.Process.Pid); !strings.Contains(err.Error(), w) {
		t.Errorf("error %q does not name the holder (%q)", err, w)
	}
	if _, err := os.Stat(s.csiSock); err == nil {
		t.Error("serve made its CSI socket without the lock")
	}
	// SIGKILL: the holder gets no chance to release anything.
	if err := cmd.Process.Kill(); err != nil {
		t.Fatal(err)
	}
	_ = cmd.Wait()
	s.start(s.flags([]string{"fast"}), s.env())
}

// A pool recorded on the node but no longer configured refuses deletes;
// a pool never on the node deletes nothing, successfully; configured again,
// the pool's volume deletes.
func TestServeRecordedPoolRefusesDeletes(t *testing.T) {
	s := newServeSetup(t)
	both := s.flags([]string{"fast", "old"})
	r := s.start(both, s.env())
	vol, err := r.c.CreateVolume(t.Context(), &csipb.CreateVolumeRequest{
		Name: "pvc-1", Parameters: map[string]string{csi.ParamPool: "old"}, CapacityRange: &csipb.CapacityRange{RequiredBytes: 8 << 20},
		VolumeCapabilities: []*csipb.VolumeCapability{{
			AccessType: &csipb.VolumeCapability_Block{Block: &csipb.VolumeCapability_BlockVolume{}},
			AccessMode: &csipb.VolumeCapability_AccessMode{Mode: csipb.VolumeCapability_AccessMode_SINGLE_NODE_WRITER},
		}},
	})
	if err != nil {
		t.Fatal(err)
	}
	id := vol.GetVolume().GetVolumeId()
	snap, err := r.c.CreateSnapshot(t.Context(), &csipb.CreateSnapshotRequest{Name: "snap-1", SourceVolumeId: id})
	if err != nil {
		t.Fatal(err)
	}
	if err := r.wait(t); err != nil {
		t.Fatal(err)
	}

	r = s.start(s.flags([]string{"fast"}), s.env())
	_, err = r.c.DeleteVolume(t.Context(), &csipb.DeleteVolumeRequest{VolumeId: id})
	wantStatus(t, err, codes.FailedPrecondition, "volume_id "+id, "pool old is recorded on node node-a but not configured")
	_, err = r.c.DeleteSnapshot(t.Context(), &csipb.DeleteSnapshotRequest{SnapshotId: snap.GetSnapshot().GetSnapshotId()})
	wantStatus(t, err, codes.FailedPrecondition, "snapshot_id "+snap.GetSnapshot().GetSnapshotId(), "pool old is recorded")
	_, err = r.c.DeleteVolume(t.Context(), &csipb.DeleteVolumeRequest{VolumeId: "never/pvc-1"})
	wantStatus(t, err, codes.OK)
	_, err = r.c.DeleteVolume(t.Context(), &csipb.DeleteVolumeRequest{VolumeId: "fast/pvc-1"})
	wantStatus(t, err, codes.OK)
	if err := r.wait(t); err != nil {
		t.Fatal(err)
	}

	r = s.start(both, s.env())
	if _, err := r.c.DeleteSnapshot(t.Context(), &csipb.DeleteSnapshotRequest{SnapshotId: snap.GetSnapshot().GetSnapshotId()}); err != nil {
		t.Fatal(err)
	}
	if _, err := r.c.DeleteVolume(t.Context(), &csipb.DeleteVolumeRequest{VolumeId: id}); err != nil {
		t.Fatal(err)
	}
	list, err := r.c.ListVolumes(t.Context(), &csipb.ListVolumesRequest{})
	if err != nil || len(list.GetEntries()) != 0 {
		t.Errorf("volumes after the deletes: %v, %v", list.GetEntries(), err)
	}
}

func wantStatus(t *testing.T, err error, code codes.Code, words ...string) {
	t.Helper()
	if got := status.Code(err); got != code {
		t.Errorf("code %v (%v), want %v", got, err, code)
		return
	}
	for _, w := range words {
		if !strings.Contains(status.Convert(err).Message(), w) {
			t.Errorf("message %q does not say %q", status.Convert(err).Message(), w)
		}
	}
}

// At SIGTERM: the call in progress gets --shutdown-timeout and is then
// cancelled; only after its handler has returned is the background
// cancelled (the reaper sees it); the pools close after everything that
// uses them has stopped, with metrics and admin requests arriving
// throughout; the sockets go and the lock is free at the end.
func TestServeShutdownOrder(t *testing.T) {
	s := newServeSetup(t)
	log := &eventLog{}
	env := s.env()
	env.reapInterval = time.Millisecond
	env.openPool = func(ctx context.Context, cfg thinpool.Config, k thinpool.Kernel) (servedPool, error) {
		p, err := thinpool.Open(ctx, cfg, k)
		if err != nil {
			return nil, err
		}
		return &watchedPool{Pool: p, log: log, inFlight: map[string]int{}}, nil
	}
	entered := make(chan struct{})
	env.interceptors = []grpc.UnaryServerInterceptor{func(ctx context.Context, req any, info *grpc.UnaryServerInfo, h grpc.UnaryHandler) (any, error) {
		if info.FullMethod != csipb.Controller_ListVolumes_FullMethodName {
			return h(ctx, req)
		}
		close(entered)
		<-ctx.Done()
		time.Sleep(100 * time.Millisecond) // a handler finishing its step
		resp, err := h(context.WithoutCancel(ctx), req)
		log.add("call returned")
		return resp, err
	}}
	metricsAddr := freeTCPAddr(t)
	const shutdownTimeout = 500 * time.Millisecond
	r := s.start(s.flags([]string{"fast", "slow"}, "--metrics-address="+metricsAddr, "--shutdown-timeout="+shutdownTimeout.String()), env)

	called := make(chan error, 1)
	go func() {
		_, err := r.c.ListVolumes(context.Background(), &csipb.ListVolumesRequest{})
		called <- err
	}()
	<-entered
	// Readers of the pools from outside, until serve has returned.
	stopReaders := make(chan struct{})
	var readers sync.WaitGroup
	var reads atomic.Int64
	for _, get := range []func() error{
		func() error { return httpGet("http://"+metricsAddr+"/metrics", nil) },
		func() error { return httpGet("http://"+metricsAddr+"/healthz", nil) },
		func() error { var p []poolReport; return adminGet(adminSocket(s.stateDir), "/pools", &p) },
		func() error { var v []volumeReport; return adminGet(adminSocket(s.stateDir), "/volumes", &v) },
	} {
		readers.Add(1)
		go func() {
			defer readers.Done()
			for {
				select {
				case <-stopReaders:
					return
				default:
				}
				if get() == nil {
					reads.Add(1)
				}
			}
		}()
	}
	time.Sleep(50 * time.Millisecond)

	start := time.Now()
	err := r.wait(t)
	took := time.Since(start)
	close(stopReaders)
	readers.Wait()
	if err != nil {
		t.Fatalf("serve: %v", err)
	}
	if err := <-called; status.Code(err) == codes.OK {
		t.Error("the call still in progress at the shutdown deadline succeeded")
	}
	if took < shutdownTimeout {
		t.Errorf("serve stopped in %v: the call in progress did not get its %v", took, shutdownTimeout)
	}
	if took > shutdownTimeout+2*httpShutdownTimeout {
		t.Errorf("serve took %v to stop", took)
	}
	if reads.Load() == 0 {
		t.Error("no metrics or admin request was answered: the test checked nothing")
	}
	events, bad := log.snapshot()
	for _, b := range bad {
		t.Error(b)
	}
	// The call, then the background (both reapers), then both pools.
	order := func(prefix string) (first, last int) {
		first, last = -1, -1
		for i, e := range events {
			if strings.HasPrefix(e, prefix) {
				if first < 0 {
					first = i
				}
				last = i
			}
		}
		return first, last
	}
	callFirst, _ := order("call returned")
	reapFirst, reapLast := order("reap cancelled")
	closeFirst, _ := order("close")
	if callFirst < 0 || reapFirst < 0 || closeFirst < 0 || !(callFirst < reapFirst && reapLast < closeFirst) {
		t.Errorf("shutdown order %q: want the call returned, then the reapers cancelled, then the pools closed", events)
	}
	if n := strings.Count(strings.Join(events, "\n"), "close "); n != 2 {
		t.Errorf("%d pools closed, want 2: %q", n, events)
	}
	for _, p := range []string{s.csiSock, adminSocket(s.stateDir), registration.SocketPath(s.regDir, csi.DefaultDriverName)} {
		if _, err := os.Stat(p); err == nil {
			t.Errorf("%s is left after the shutdown", p)
		}
	}
	l, err := lockStateDir(s.stateDir)
	if err != nil {
		t.Fatalf("the lock after the shutdown: %v", err)
	}
	l.release()
}

func freeTCPAddr(t *testing.T) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().String()
}

func httpGet(url string, into io.Writer) error {
	c := &http.Client{Timeout: 5 * time.Second}
	resp, err := c.Get(url)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if into == nil {
		into = io.Discard
	}
	if _, err := io.Copy(into, resp.Body); err != nil {
		return err
	}
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("%s: %s", url, resp.Status)
	}
	return nil
}
