package cluster

import (
	"bytes"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// shimBed is a node's shims and unit directories in a temporary directory,
// so the shims run on the host against fake daemons.
type shimBed struct {
	units, run, logs, bin string
	env                   []string
}

// newShimBed writes the shims and makes this test process the reaper of the
// daemons they start (a child subreaper, as tini is on the node), so the
// test can see how each daemon ended.
func newShimBed(t *testing.T) *shimBed {
	t.Helper()
	dir := t.TempDir()
	b := &shimBed{units: filepath.Join(dir, "units"), run: filepath.Join(dir, "run"), logs: filepath.Join(dir, "logs"), bin: filepath.Join(dir, "bin")}
	for _, d := range []string{b.units, b.logs, b.bin} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	for name, script := range nodeShims {
		if err := os.WriteFile(filepath.Join(b.bin, name), []byte(script), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	b.env = []string{
		"PATH=" + b.bin + ":" + os.Getenv("PATH"), "E2E_UNITS=" + b.units, "E2E_RUN=" + b.run,
		"E2E_LOGS=" + b.logs, "E2E_STOP_GRACE=1", "LC_ALL=C",
	}
	if err := unix.Prctl(unix.PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		// Whatever a failed test left running.
		pids, _ := filepath.Glob(filepath.Join(b.run, "*.pid"))
		for _, f := range pids {
			if pid, err := strconv.Atoi(strings.TrimSpace(readFile(f))); err == nil {
				_ = syscall.Kill(pid, syscall.SIGKILL)
				var ws syscall.WaitStatus
				_, _ = syscall.Wait4(pid, &ws, 0, nil)
			}
		}
		_ = unix.Prctl(unix.PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0)
	})
	return b
}

func (b *shimBed) unit(t *testing.T, name, script string) {
	t.Helper()
	if err := os.WriteFile(filepath.Join(b.units, name), []byte(script), 0o644); err != nil {
		t.Fatal(err)
	}
}

// cmd runs a shim with pipes for its output: if a daemon it starts kept
// them, this would not return.
func (b *shimBed) cmd(t *testing.T, shim string, args ...string) (stdout, stderr string, code int) {
	t.Helper()
	cmd := exec.Command(filepath.Join(b.bin, shim), args...)
	cmd.Env = b.env
	var out, errOut bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errOut
	err := cmd.Run()
	var exit *exec.ExitError
	switch {
	case errors.As(err, &exit):
		code = exit.ExitCode()
	case err != nil:
		t.Fatalf("%s %q: %v", shim, args, err)
	}
	return out.String(), errOut.String(), code
}

func (b *shimBed) systemctl(t *testing.T, args ...string) (string, int) {
	t.Helper()
	out, _, code := b.cmd(t, "systemctl", args...)
	return out, code
}

// mainPID is the unit's daemon pid as `systemctl show` gives it.
func (b *shimBed) mainPID(t *testing.T, unit string) int {
	t.Helper()
	out, code := b.systemctl(t, "show", unit, "--property", "MainPID", "--value")
	pid, err := strconv.Atoi(strings.TrimSpace(out))
	if err != nil || code != 0 {
		t.Fatalf("show %s MainPID: %q, exit %d", unit, out, code)
	}
	return pid
}

// reap waits for a daemon this test is the reaper of and returns the
// signal that ended it.
func reap(t *testing.T, pid int) syscall.Signal {
	t.Helper()
	var ws syscall.WaitStatus
	if _, err := syscall.Wait4(pid, &ws, 0, nil); err != nil {
		t.Fatalf("wait for pid %d: %v", pid, err)
	}
	if !ws.Signaled() {
		t.Fatalf("pid %d exited with %d, not by a signal", pid, ws.ExitStatus())
	}
	return ws.Signal()
}

// What the storage suite and the node's init ask of systemctl: start and
// stop are idempotent, restart replaces the daemon, is-active and show
// --property ActiveState --value say whether it runs; the daemon runs in a
// session of its own with the same environment whoever started it, and
// one that ignores SIGTERM is killed.
func TestSystemctlShim(t *testing.T) {
	b := newShimBed(t)
	b.unit(t, "fake", `exec sleep 600 >>"$E2E_LOGS/fake.log" 2>&1`+"\n")

	if out, code := b.systemctl(t, "is-active", "fake"); out != "inactive\n" || code != 3 {
		t.Errorf("is-active before start: %q, exit %d; want inactive, 3", out, code)
	}
	if out, code := b.systemctl(t, "show", "fake", "--property", "ActiveState", "--value"); out != "inactive\n" || code != 0 {
		t.Errorf("show ActiveState before start: %q, exit %d", out, code)
	}
	if _, code := b.systemctl(t, "start", "fake"); code != 0 {
		t.Fatalf("start: exit %d", code)
	}
	first := b.mainPID(t, "fake")
	if cmdline := readFile("/proc/" + strconv.Itoa(first) + "/cmdline"); cmdline != "sleep\x00600\x00" {
		t.Errorf("MainPID %d runs %q, want the unit's daemon", first, cmdline)
	}
	if sid, err := unix.Getsid(first); err != nil || sid != first {
		t.Errorf("daemon %d: session %d (%v), want a session of its own", first, sid, err)
	}
	env := strings.Split(strings.TrimRight(readFile("/proc/"+strconv.Itoa(first)+"/environ"), "\x00"), "\x00")
	slices.Sort(env)
	if want := []string{"E2E_LOGS=" + b.logs, "HOME=/root", "PATH=" + b.bin + ":" + os.Getenv("PATH"), "PWD=/"}; !slices.Equal(env, want) {
		t.Errorf("daemon environment %q, want %q", env, want)
	}
	if _, code := b.systemctl(t, "start", "fake.service"); code != 0 || b.mainPID(t, "fake") != first {
		t.Errorf("a second start: exit %d, MainPID %d; want 0 and the same daemon %d", code, b.mainPID(t, "fake"), first)
	}
	if out, code := b.systemctl(t, "is-active", "fake"); out != "active\n" || code != 0 {
		t.Errorf("is-active: %q, exit %d", out, code)
	}
	if out, _ := b.systemctl(t, "show", "fake", "--property=ActiveState,SubState"); out != "ActiveState=active\nSubState=running\n" {
		t.Errorf("show: %q", out)
	}

	if _, code := b.systemctl(t, "restart", "fake"); code != 0 {
		t.Fatalf("restart: exit %d", code)
	}
	second := b.mainPID(t, "fake")
	if second == first || second == 0 {
		t.Errorf("restart: MainPID %d, want a new daemon", second)
	}
	if sig := reap(t, first); sig != syscall.SIGTERM {
		t.Errorf("restart ended the first daemon by %v, want SIGTERM", sig)
	}

	if _, code := b.systemctl(t, "stop", "fake"); code != 0 {
		t.Fatalf("stop: exit %d", code)
	}
	if sig := reap(t, second); sig != syscall.SIGTERM {
		t.Errorf("stop ended the daemon by %v, want SIGTERM", sig)
	}
	if out, code := b.systemctl(t, "show", "fake", "--property", "ActiveState", "--value"); out != "inactive\n" || code != 0 {
		t.Errorf("show ActiveState after stop: %q, exit %d", out, code)
	}
	if _, code := b.systemctl(t, "stop", "fake"); code != 0 {
		t.Errorf("stop of a stopped unit: exit %d", code)
	}

	b.unit(t, "stubborn", "trap '' TERM\nexec sleep 600\n")
	b.systemctl(t, "start", "stubborn")
	pid := b.mainPID(t, "stubborn")
	if _, code := b.systemctl(t, "stop", "stubborn"); code != 0 {
		t.Errorf("stop stubborn: exit %d", code)
	}
	if sig := reap(t, pid); sig != syscall.SIGKILL {
		t.Errorf("stop ended a daemon that ignores SIGTERM by %v, want SIGKILL", sig)
	}

	if _, stderr, code := b.cmd(t, "systemctl", "start", "nothere"); code != 5 || !strings.Contains(stderr, "nothere.service not found") {
		t.Errorf("start of an unknown unit: %q, exit %d", stderr, code)
	}
	if _, _, code := b.cmd(t, "systemctl", "enable", "fake"); code != 2 {
		t.Errorf("an unknown verb: exit %d, want 2", code)
	}
	log := readFile(filepath.Join(b.logs, "systemctl.log"))
	for _, want := range []string{"start fake: pid " + strconv.Itoa(first), "stop fake: pid " + strconv.Itoa(second) + " ended", "SIGKILL"} {
		if !strings.Contains(log, want) {
			t.Errorf("systemctl.log lacks %q:\n%s", want, log)
		}
	}
}

// A unit with a readiness probe: start returns only once the probe
// succeeds, and fails when the daemon ends first or the probe never does.
func TestSystemctlShimWaitsForReady(t *testing.T) {
	b := newShimBed(t)
	dir := t.TempDir()
	asked, ready := filepath.Join(dir, "asked"), filepath.Join(dir, "ready")
	// The daemon gets ready only once the probe has run: a start that
	// did not wait for the probe would return before it is.
	b.unit(t, "slow", "# ready: touch "+asked+" && [ -e "+ready+" ]\n"+
		"until [ -e "+asked+" ]; do sleep 0.05; done\ntouch "+ready+"\nexec sleep 600\n")
	if _, stderr, code := b.cmd(t, "systemctl", "start", "slow"); code != 0 {
		t.Fatalf("start: exit %d: %s", code, stderr)
	}
	if _, err := os.Stat(ready); err != nil {
		t.Errorf("start returned before the unit was ready: %v", err)
	}
	pid := b.mainPID(t, "slow")
	b.systemctl(t, "stop", "slow")
	reap(t, pid)

	b.unit(t, "dies", "# ready: false\nexit 3\n")
	if _, stderr, code := b.cmd(t, "systemctl", "start", "dies"); code != 1 || !strings.Contains(stderr, "ended before it was ready") {
		t.Errorf("start of a daemon that ends: %q, exit %d", stderr, code)
	}
	b.env = append(b.env, "E2E_READY_TIMEOUT=1")
	b.unit(t, "never", "# ready: false\nexec sleep 600\n")
	_, stderr, code := b.cmd(t, "systemctl", "start", "never")
	if code != 1 || !strings.Contains(stderr, "not ready in 1s") {
		t.Errorf("start of a daemon never ready: %q, exit %d", stderr, code)
	}
	// It was started, and stays until stopped.
	pid = b.mainPID(t, "never")
	b.systemctl(t, "stop", "never")
	reap(t, pid)
}

// The kubelet unit the node's init and the suite both start runs kubelet
// with the node's own address and name and logs to kubelet.log (a fake
// kubelet prints its arguments).
func TestKubeletUnit(t *testing.T) {
	b := newShimBed(t)
	n := NodeSpec(2)
	// The real unit, its healthz probe left out (the fake serves none).
	var unit []string
	for _, l := range strings.Split(nodeUnits(n)["kubelet"], "\n") {
		if !strings.HasPrefix(l, "# ready: ") {
			unit = append(unit, l)
		}
	}
	b.unit(t, "kubelet", strings.Join(unit, "\n"))
	if err := os.WriteFile(filepath.Join(b.bin, "kubelet"), []byte("#!/bin/sh\necho \"kubelet $*\"\nexec sleep 600\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	if _, code := b.systemctl(t, "start", "kubelet"); code != 0 {
		t.Fatalf("start kubelet: exit %d", code)
	}
	pid := b.mainPID(t, "kubelet")
	want := "kubelet --config=/e2e/etc/kubelet.yaml --kubeconfig=/e2e/etc/kubelet.kubeconfig --node-ip=" + n.IP + " --hostname-override=" + n.Name + " --v=2\n"
	// The fake prints once it runs, which may be after start returned.
	var got string
	for deadline := time.Now().Add(time.Minute); time.Now().Before(deadline); time.Sleep(20 * time.Millisecond) {
		if got = readFile(filepath.Join(b.logs, "kubelet.log")); got != "" {
			break
		}
	}
	if got != want {
		t.Errorf("kubelet.log %q, want %q", got, want)
	}
	b.systemctl(t, "stop", "kubelet")
	reap(t, pid)
}

// The suite prefixes its commands with sudo unless `sudo --version` says
// "command not found"; the node's sudo answers and runs them as they are.
func TestSudoShim(t *testing.T) {
	b := newShimBed(t)
	if out, stderr, code := b.cmd(t, "sudo", "--version"); code != 0 || out == "" || strings.Contains(stderr, "command not found") {
		t.Errorf("sudo --version: %q %q, exit %d", out, stderr, code)
	}
	// As the suite writes it: sudo sh -c "...".
	if out, _, code := b.cmd(t, "sudo", "sh", "-c", "echo ran; exit 7"); out != "ran\n" || code != 7 {
		t.Errorf("sudo sh -c: %q, exit %d; want ran, 7", out, code)
	}
	if out, _, code := b.cmd(t, "sudo", "-n", "--", "echo", "ok"); out != "ok\n" || code != 0 {
		t.Errorf("sudo -n -- echo: %q, exit %d", out, code)
	}
	if _, _, code := b.cmd(t, "sudo", "-u", "nobody", "id"); code == 0 {
		t.Error("sudo -u nobody: accepted; it would run as root")
	}
}

// Every unit execs its daemon with its output in the node's logs, and the
// SSH server listens on the node's address only.
func TestNodeUnits(t *testing.T) {
	n := NodeSpec(1)
	units := nodeUnits(n)
	for _, name := range []string{"containerd", "kubelet", "kube-proxy", "e2e-sshd"} {
		script, ok := units[name]
		if !ok {
			t.Errorf("no unit %s", name)
			continue
		}
		if !strings.Contains(script, "exec ") || !strings.Contains(script, `>>"$E2E_LOGS/`+name+`.log" 2>&1`) {
			t.Errorf("unit %s does not exec its daemon with its log:\n%s", name, script)
		}
		if !strings.Contains(nodeInitFor(n, []Node{n}), "systemctl start "+name) {
			t.Errorf("the node's init does not start %s", name)
		}
	}
	if !strings.Contains(units["kubelet"], "\n# ready: "+kubeletReady+"\n") || !strings.Contains(kubeletReady, "127.0.0.1/10248") {
		t.Errorf("start of kubelet does not wait for its healthz:\n%s", units["kubelet"])
	}
	if !strings.Contains(units["e2e-sshd"], "-listen "+n.IP+":22 ") {
		t.Errorf("e2e-sshd does not listen on the node's address:\n%s", units["e2e-sshd"])
	}
}
