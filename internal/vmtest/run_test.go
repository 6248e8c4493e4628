package vmtest

import (
	"bytes"
	"context"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// These tests boot real VMs (about 5 s each when the cache is warm).

var (
	payloadOnce sync.Once
	payloadPath string
	payloadErr  error
	payloadDir  string
)

func TestMain(m *testing.M) {
	if os.Getenv(fakeQEMUEnv) != "" {
		fakeQEMU()
		return
	}
	code := m.Run()
	if payloadDir != "" {
		_ = os.RemoveAll(payloadDir)
	}
	os.Exit(code)
}

// requireVM skips (or, with CI=true, fails) t when no VM can be booted, with
// the same rule and message as RunPackageTests, and returns the payload
// built from testdata/payload.
func requireVM(t *testing.T) string {
	t.Helper()
	if InGuest() {
		t.Skip("no nested VMs")
	}
	if err := checkPrerequisites(t.Context()); err != nil {
		unavailable(t, err)
	}
	payloadOnce.Do(func() {
		payloadDir, payloadErr = os.MkdirTemp("", "vmtest-payload-")
		if payloadErr != nil {
			return
		}
		payloadPath = filepath.Join(payloadDir, "payload")
		cmd := exec.Command("go", "build", "-o", payloadPath, "./testdata/payload")
		cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
		if out, err := cmd.CombinedOutput(); err != nil {
			payloadErr = errors.New(err.Error() + "\n" + string(out))
		}
	})
	if payloadErr != nil {
		t.Fatalf("build testdata/payload: %v", payloadErr)
	}
	return payloadPath
}

// runTimeout bounds a test's Runs, which take seconds: a guest that hangs
// fails its test with the console's last lines instead of running into the
// test binary's timeout, which says nothing of the guest and holds the VM
// lock, and so every other package's VM, until then.
const runTimeout = 10 * time.Minute

// runContext takes the machine's VM lock for the rest of t (waiting as
// long as other packages' VMs take) and returns t's context, ended
// runTimeout later: the bound is on t's own VMs, not on the wait. One call
// per test; its Runs go one after the other.
func runContext(t *testing.T) context.Context {
	ctx, unlock, err := HoldVM(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(unlock)
	ctx, cancel := context.WithTimeout(ctx, runTimeout)
	t.Cleanup(cancel)
	return ctx
}

// lineRecorder collects Output lines, checking that each Write is one line.
type lineRecorder struct {
	t      *testing.T
	mu     sync.Mutex
	lines  []string
	onLine func(string)
}

func (r *lineRecorder) Write(p []byte) (int, error) {
	s := string(p)
	if !strings.HasSuffix(s, "\n") || strings.Count(s, "\n") != 1 {
		r.t.Errorf("Output.Write(%q) is not exactly one line", s)
	}
	s = strings.TrimSuffix(s, "\n")
	r.mu.Lock()
	r.lines = append(r.lines, s)
	r.mu.Unlock()
	if r.onLine != nil {
		r.onLine(s)
	}
	return len(p), nil
}

func (r *lineRecorder) get() []string {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]string(nil), r.lines...)
}

func TestRunExitCode(t *testing.T) {
	payload := requireVM(t)
	rec := &lineRecorder{t: t}
	res, err := Run(runContext(t), Spec{Payload: payload, Args: []string{"exit", "3"}, Output: rec})
	if err != nil {
		t.Fatal(err)
	}
	if res.ExitCode != 3 {
		t.Errorf("ExitCode = %d, want 3", res.ExitCode)
	}
	want := []string{"line one", "line two on stderr", "--- FAIL: NotReallyATest (0.00s)", "last line without newline"}
	if got := rec.get(); strings.Join(got, "\n") != strings.Join(want, "\n") {
		t.Errorf("streamed lines = %q, want %q", got, want)
	}
	if res.Boot <= 0 || res.Total < res.Boot {
		t.Errorf("timings: boot %v, total %v", res.Boot, res.Total)
	}
	t.Logf("prepare %v, boot %v, total %v", res.Prepare, res.Boot, res.Total)
}

// TestRunDeviceMapper proves the default modules, dm-thin-pool with its
// dependencies, load: /dev/mapper/control and /proc/misc's device-mapper.
//
// When the host has them, it also runs dmsetup (dynamically linked: tests
// Tools' libraries) and lvm through its lvcreate link (tests that links
// survive), against the guest's device-mapper.
func TestRunDeviceMapper(t *testing.T) {
	payload := requireVM(t)
	args := []string{"dmcheck"}
	var tools []string
	if _, err := exec.LookPath("dmsetup"); err == nil {
		tools = append(tools, "dmsetup")
		args = append(args, "dmsetup version", "dmsetup targets")
	}
	if _, err := exec.LookPath("lvcreate"); err == nil {
		tools = append(tools, "lvcreate")
		args = append(args, "lvcreate --version")
	}
	rec := &lineRecorder{t: t}
	res, err := Run(runContext(t), Spec{Payload: payload, Args: args, Tools: tools, Output: rec})
	if err != nil {
		t.Fatal(err)
	}
	if res.ExitCode != 0 {
		t.Errorf("dmcheck exit %d; output:\n%s\nconsole:\n%s", res.ExitCode, strings.Join(rec.get(), "\n"), res.Console)
	}
	out := strings.Join(rec.get(), "\n")
	if strings.Contains(out, "insmod") {
		t.Errorf("module load failure reported:\n%s", out)
	}
	if len(tools) > 0 && !strings.Contains(out, "thin-pool") {
		t.Errorf("dmsetup targets lists no thin-pool:\n%s", out)
	}
	t.Logf("tools %v; output:\n%s", tools, out)
}

// TestRunSpec checks arguments, environment, working directory, extra
// files and the guest's own variables.
func TestRunSpec(t *testing.T) {
	payload := requireVM(t)
	extra := filepath.Join(t.TempDir(), "extra")
	if err := os.WriteFile(extra, []byte("x"), 0o644); err != nil {
		t.Fatal(err)
	}
	rec := &lineRecorder{t: t}
	res, err := Run(runContext(t), Spec{
		Payload: payload,
		Args:    []string{"env", "a b", "it's", "$HOME"},
		Env:     []string{"FOO=bar baz"},
		Dir:     "/etc",
		Modules: []string{}, // none: the payload does not need them
		Files:   map[string]string{"/srv/extra": extra},
		Output:  rec,
	})
	if err != nil {
		t.Fatal(err)
	}
	if res.ExitCode != 0 {
		t.Fatalf("exit %d: %q", res.ExitCode, rec.get())
	}
	out := strings.Join(rec.get(), "\n")
	for _, want := range []string{`wd=/etc`, `arg="a b"`, `arg="it's"`, `arg="$HOME"`, "env=FOO=bar baz", "env=CSI_DMTHIN_VM=1", "env=HOME=/tmp"} {
		if !strings.Contains(out, want) {
			t.Errorf("output lacks %q:\n%s", want, out)
		}
	}
}

// TestRunOrphanChild leaves processes holding the payload port open: the
// exit marker must still arrive and the guest power off.
func TestRunOrphanChild(t *testing.T) {
	payload := requireVM(t)
	rec := &lineRecorder{t: t}
	res, err := Run(runContext(t), Spec{Payload: payload, Args: []string{"orphan"}, Modules: []string{}, Output: rec})
	if err != nil {
		t.Fatal(err)
	}
	if res.ExitCode != 0 || len(rec.get()) != 1 || !strings.HasPrefix(rec.get()[0], "orphaned ") {
		t.Errorf("exit %d, output %q", res.ExitCode, rec.get())
	}
}

// TestRunCancelKillsQEMU cancels a run whose payload hangs: Run must return
// an error that carries the console, and qemu must be gone.
func TestRunCancelKillsQEMU(t *testing.T) {
	payload := requireVM(t)
	ctx, cancel := context.WithTimeout(runContext(t), 3*time.Minute)
	defer cancel()
	var pid int
	rec := &lineRecorder{t: t, onLine: func(l string) {
		if l == "hanging" {
			cancel()
		}
	}}
	start := time.Now()
	_, err := run(ctx, Spec{Payload: payload, Args: []string{"hang"}, Output: rec}, &runHooks{started: func(p int) { pid = p }})
	if err == nil {
		t.Fatal("Run of a hanging payload returned no error")
	}
	t.Logf("error, as expected: %v", err)
	if !strings.Contains(err.Error(), "stopped before the payload finished") || !strings.Contains(err.Error(), "last console lines") {
		t.Errorf("error = %v", err)
	}
	if pid == 0 {
		t.Fatal("qemu never started")
	}
	if err := syscall.Kill(pid, 0); !errors.Is(err, syscall.ESRCH) {
		t.Errorf("qemu (pid %d) still exists after Run returned: kill 0 = %v", pid, err)
	}
	if d := time.Since(start); d > 2*time.Minute {
		t.Errorf("cancel took effect after %v", d)
	}
}

// TestRunBootTimeout: a guest that has not started the payload within the
// boot timeout is killed and booted once more, and a second such boot is
// ErrBootTimeout, with both qemus gone.
func TestRunBootTimeout(t *testing.T) {
	payload := requireVM(t)
	var pids []int
	hooks := &runHooks{started: func(p int) { pids = append(pids, p) }, bootTimeout: time.Millisecond}
	_, err := run(runContext(t), Spec{Payload: payload, Args: []string{"exit", "0"}, Modules: []string{}}, hooks)
	if !errors.Is(err, ErrBootTimeout) || !errors.Is(err, errNotStarted) {
		t.Fatalf("err = %v, want ErrBootTimeout, the payload not started", err)
	}
	t.Logf("error, as expected: %v", err)
	if !strings.Contains(err.Error(), "last console lines") {
		t.Errorf("the error carries no console: %v", err)
	}
	if len(pids) != 2 {
		t.Fatalf("qemu started %d times, want 2 (the boot and one more)", len(pids))
	}
	for _, pid := range pids {
		if err := syscall.Kill(pid, 0); !errors.Is(err, syscall.ESRCH) {
			t.Errorf("qemu (pid %d) still exists after Run returned: kill 0 = %v", pid, err)
		}
	}
}

// TestRunKernelPanic crashes the guest kernel: no exit marker, so an error
// with the panic in its console lines.
func TestRunKernelPanic(t *testing.T) {
	payload := requireVM(t)
	rec := &lineRecorder{t: t}
	_, err := Run(runContext(t), Spec{Payload: payload, Args: []string{"panic"}, Modules: []string{}, Output: rec})
	if err == nil {
		t.Fatal("no error from a run whose kernel panicked")
	}
	t.Logf("error, as expected: %v", err)
	if !strings.Contains(err.Error(), "without the payload's exit marker") || !strings.Contains(err.Error(), "Kernel panic") {
		t.Errorf("error = %v", err)
	}
}

// TestRunPowerCut writes to a disk, fsyncs, has the power cut on the line
// that says so, and boots again on the same disk: the fsync'd data is
// there, what was only in the guest's page cache is not, the disks came in
// the Spec's order with their serials, and the cut is a Result, not an
// error.
func TestRunPowerCut(t *testing.T) {
	payload := requireVM(t)
	dir := t.TempDir()
	var disks []Disk
	for _, name := range []string{"first", "second"} {
		p := filepath.Join(dir, name+".img")
		if err := os.WriteFile(p, nil, 0o644); err != nil {
			t.Fatal(err)
		}
		if err := os.Truncate(p, 4<<20); err != nil {
			t.Fatal(err)
		}
		disks = append(disks, Disk{Path: p, Serial: "vmtest-" + name})
	}
	cut := make(chan struct{})
	rec := &lineRecorder{t: t, onLine: func(l string) {
		if strings.HasPrefix(l, "synced ") {
			close(cut)
		}
	}}
	ctx := runContext(t) // both boots
	res, err := Run(ctx, Spec{Payload: payload, Args: []string{"disk-write", "vmtest-second"}, Modules: []string{}, Disks: disks, Cut: cut, Output: rec})
	if err != nil {
		t.Fatal(err)
	}
	got := rec.get()
	want := []string{"disk vda=vmtest-first", "disk vdb=vmtest-second", "synced /dev/vdb"}
	if !res.Cut || !reflect.DeepEqual(got, want) {
		t.Fatalf("cut %v, lines %q; want a cut after %q\nconsole:\n%s", res.Cut, got, want, res.Console)
	}
	t.Logf("cut after boot %v, total %v", res.Boot, res.Total)

	rec = &lineRecorder{t: t}
	res, err = Run(ctx, Spec{Payload: payload, Args: []string{"disk-read", "vmtest-second"}, Modules: []string{}, Disks: disks, Output: rec})
	if err != nil {
		t.Fatal(err)
	}
	if res.Cut || res.ExitCode != 0 {
		t.Errorf("read back: cut %v, exit %d, output %q", res.Cut, res.ExitCode, rec.get())
	}
	// The first disk was never written.
	b, err := os.ReadFile(disks[0].Path)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(b, make([]byte, len(b))) {
		t.Error("the disk nobody wrote to is not all zeros")
	}
}
