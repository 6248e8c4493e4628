package cluster

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"syscall"
	"time"
)

// Procs tracks every process the harness starts, so that each is stopped by
// its own pid, in reverse order of start, also when a test fails half-way.
type Procs struct {
	logDir string
	mu     sync.Mutex
	procs  []*Proc
}

// Proc is one started process.
type Proc struct {
	Name string
	Cmd  *exec.Cmd
	Log  string // its stdout and stderr
	done chan struct{}
	err  error // valid once done is closed
}

// Exited reports whether the process has exited, and its error.
func (p *Proc) Exited() (bool, error) {
	select {
	case <-p.done:
		return true, p.err
	default:
		return false, nil
	}
}

// Wait waits for the process to exit, or for ctx to end.
func (p *Proc) Wait(ctx context.Context) error {
	select {
	case <-p.done:
		return p.err
	case <-ctx.Done():
		return ctx.Err()
	}
}

// NewProcs returns an empty set logging under logDir.
func NewProcs(logDir string) (*Procs, error) {
	if err := os.MkdirAll(logDir, 0o755); err != nil {
		return nil, err
	}
	return &Procs{logDir: logDir}, nil
}

// Start starts name (its log is <logDir>/<name>.log) with an argument array.
func (ps *Procs) Start(name string, path string, args ...string) (*Proc, error) {
	return ps.StartEnv(name, nil, path, args...)
}

// StartEnv is Start with env ("KEY=value") added to the environment.
func (ps *Procs) StartEnv(name string, env []string, path string, args ...string) (*Proc, error) {
	logPath := filepath.Join(ps.logDir, name+".log")
	f, err := os.OpenFile(logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return nil, err
	}
	cmd := exec.Command(path, args...)
	cmd.Stdout, cmd.Stderr = f, f
	cmd.Env = append(append(os.Environ(), "LC_ALL=C"), env...)
	// Its own process group, so a ^C to the test reaches the harness only
	// and the harness stops each process in order.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		_ = f.Close()
		return nil, fmt.Errorf("cluster: start %s: %w", name, err)
	}
	p := &Proc{Name: name, Cmd: cmd, Log: logPath, done: make(chan struct{})}
	go func() {
		p.err = cmd.Wait()
		_ = f.Close()
		close(p.done)
	}()
	ps.mu.Lock()
	ps.procs = append(ps.procs, p)
	ps.mu.Unlock()
	fmt.Fprintf(f, "e2e: started pid %d: %s %s\n", cmd.Process.Pid, path, strings.Join(args, " "))
	return p, nil
}

// StopAll stops every process still running, newest first: SIGTERM to its
// pid, then SIGKILL to the same pid after grace. It returns one line per
// process saying how it ended.
func (ps *Procs) StopAll(grace time.Duration) []string {
	ps.mu.Lock()
	procs := append([]*Proc(nil), ps.procs...)
	ps.mu.Unlock()
	var report []string
	for i := len(procs) - 1; i >= 0; i-- {
		p := procs[i]
		pid := p.Cmd.Process.Pid
		// Whatever it started and left behind shares its process group
		// (ginkgo's parallel test processes, say): killed after it.
		reapGroup := func() { _ = syscall.Kill(-pid, syscall.SIGKILL) }
		if done, err := p.Exited(); done {
			reapGroup()
			report = append(report, fmt.Sprintf("%s (pid %d) had exited: %v", p.Name, pid, err))
			continue
		}
		_ = syscall.Kill(pid, syscall.SIGTERM)
		select {
		case <-p.done:
			report = append(report, fmt.Sprintf("%s (pid %d) stopped by SIGTERM", p.Name, pid))
		case <-time.After(grace):
			_ = syscall.Kill(pid, syscall.SIGKILL)
			<-p.done
			report = append(report, fmt.Sprintf("%s (pid %d) killed after %s", p.Name, pid, grace))
		}
		reapGroup()
	}
	return report
}

// TailLogs writes the last n lines of every .log file under dir (recursively)
// to w, for a failed run.
func TailLogs(w io.Writer, dir string, n int) {
	var logs []string
	_ = filepath.Walk(dir, func(path string, fi os.FileInfo, err error) error {
		if err == nil && !fi.IsDir() && strings.HasSuffix(path, ".log") {
			logs = append(logs, path)
		}
		return nil
	})
	sort.Strings(logs)
	for _, l := range logs {
		data, err := os.ReadFile(l)
		if err != nil && !errors.Is(err, os.ErrNotExist) {
			continue
		}
		fmt.Fprintf(w, "===== %s (last %d lines) =====\n%s\n", l, n, tail(string(data), n))
	}
}

// Output runs a short-lived host program (argument array, LC_ALL=C, bound to
// ctx) and returns its stdout; the error carries the end of its stderr.
func Output(ctx context.Context, name string, args ...string) ([]byte, error) {
	return output(ctx, "", name, args...)
}

// CombinedOutput is Output returning stdout and stderr together; for
// programs (like flag's -h) that print on stderr and exit non-zero.
func CombinedOutput(ctx context.Context, name string, args ...string) ([]byte, error) {
	cmd := exec.CommandContext(ctx, name, args...)
	cmd.Env = append(os.Environ(), "LC_ALL=C")
	return cmd.CombinedOutput()
}
