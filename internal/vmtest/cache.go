package vmtest

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"time"
)

// CacheDir returns the directory that holds downloaded kernels and built
// initramfs archives: $CSI_DMTHIN_CACHE if set, else
// $XDG_CACHE_HOME/csi-dmthin, else ~/.cache/csi-dmthin. It does not create it.
func CacheDir() (string, error) {
	if d := os.Getenv("CSI_DMTHIN_CACHE"); d != "" {
		return filepath.Abs(d)
	}
	if d := os.Getenv("XDG_CACHE_HOME"); d != "" {
		return filepath.Join(d, "csi-dmthin"), nil
	}
	home, err := os.UserHomeDir()
	if err != nil {
		return "", fmt.Errorf("vmtest: no cache directory: set CSI_DMTHIN_CACHE: %w", err)
	}
	return filepath.Join(home, ".cache", "csi-dmthin"), nil
}

// lockPollInterval is how often a waiter retries a held lock. flock(2) cannot
// be interrupted by a context, so waiters poll with LOCK_NB instead of
// blocking in a call that would outlive a cancelled test.
const lockPollInterval = 50 * time.Millisecond

// lockFile takes an exclusive flock on path (creating it), waiting until it
// is free or ctx is done. waiting, if not nil, is called once if the lock is
// held by someone else. Locks held by other processes and by other
// goroutines of this one exclude each other, since each call opens its own
// file description. The lock is released by the returned function, or by the
// kernel when the process dies, so a crashed test never wedges the next run.
func lockFile(ctx context.Context, path string, waiting func()) (unlock func(), err error) {
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return nil, fmt.Errorf("vmtest: lock %s: %w", path, err)
	}
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o644)
	if err != nil {
		return nil, fmt.Errorf("vmtest: lock %s: %w", path, err)
	}
	for {
		err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB)
		if err == nil {
			return func() { _ = f.Close() }, nil // closing the file drops the lock
		}
		if !errors.Is(err, syscall.EWOULDBLOCK) && !errors.Is(err, syscall.EINTR) {
			_ = f.Close()
			return nil, fmt.Errorf("vmtest: flock %s: %w", path, err)
		}
		if waiting != nil {
			waiting()
			waiting = nil
		}
		select {
		case <-ctx.Done():
			_ = f.Close()
			return nil, fmt.Errorf("vmtest: waiting for lock %s: %w", path, context.Cause(ctx))
		case <-time.After(lockPollInterval):
		}
	}
}

// runCmd runs a host program with an argument array (never through a shell),
// LC_ALL=C so its messages are stable, bound to ctx. The error names the
// command and carries the tail of its stderr.
func runCmd(ctx context.Context, dir string, name string, args ...string) ([]byte, error) {
	return execCmd(ctx, dir, nil, name, args...)
}

// runCmdStdin is runCmd with stdin.
func runCmdStdin(ctx context.Context, stdin []byte, name string, args ...string) ([]byte, error) {
	return execCmd(ctx, "", stdin, name, args...)
}

func execCmd(ctx context.Context, dir string, stdin []byte, name string, args ...string) ([]byte, error) {
	cmd := exec.CommandContext(ctx, name, args...)
	cmd.Dir = dir
	if stdin != nil {
		cmd.Stdin = bytes.NewReader(stdin)
	}
	cmd.Env = append(os.Environ(), "LC_ALL=C")
	var stdout, stderr bytes.Buffer
	cmd.Stdout = &stdout
	cmd.Stderr = &stderr
	if err := cmd.Run(); err != nil {
		return stdout.Bytes(), &cmdError{cmd: name + " " + strings.Join(args, " "), err: err, stderr: tailLines(stderr.String(), 20)}
	}
	return stdout.Bytes(), nil
}

// cmdError reports a failed host command with the end of its stderr.
type cmdError struct {
	cmd    string
	err    error
	stderr string
}

func (e *cmdError) Error() string {
	if e.stderr == "" {
		return fmt.Sprintf("%s: %v", e.cmd, e.err)
	}
	return fmt.Sprintf("%s: %v; stderr:\n%s", e.cmd, e.err, e.stderr)
}

func (e *cmdError) Unwrap() error { return e.err }

// tailLines returns the last n lines of s, without a trailing newline.
func tailLines(s string, n int) string {
	s = strings.TrimRight(s, "\n")
	if s == "" {
		return ""
	}
	lines := strings.Split(s, "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

// writeFileAtomic writes data produced by fill to path through a temporary
// file in the same directory and a rename, so readers in other processes see
// either nothing or the whole file.
func writeFileAtomic(path string, fill func(*os.File) error) error {
	tmp, err := os.CreateTemp(filepath.Dir(path), ".tmp-"+filepath.Base(path)+"-*")
	if err != nil {
		return err
	}
	defer func() { _ = os.Remove(tmp.Name()) }() // a no-op once renamed
	if err := fill(tmp); err != nil {
		_ = tmp.Close()
		return err
	}
	if err := tmp.Chmod(0o644); err != nil { // CreateTemp makes it 0600
		_ = tmp.Close()
		return err
	}
	if err := tmp.Sync(); err != nil {
		_ = tmp.Close()
		return err
	}
	if err := tmp.Close(); err != nil {
		return err
	}
	return os.Rename(tmp.Name(), path)
}
