package main

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"sort"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

// The state directory is the node's, not a pod's: every DaemonSet of the
// chart mounts the host's /var/lib/csi-dmthin. Two drivers on one node (two
// nodePools entries that select it) would each replace the other's sockets
// and open pools behind each other's back, so serve takes a lock there
// before it touches anything else on the host.

// lockFileName is the lock's file in the state directory.
const lockFileName = "serve.lock"

// stateLock is a held lock on a state directory: an flock on its lock
// file, which the kernel drops when the process ends, however it ends.
type stateLock struct {
	f *os.File // referenced until release, or a finalizer would close it
}

// lockStateDir takes the state directory's lock, making the directory if
// needed, or fails at once naming the lock file and what its holder wrote
// there (pid, host, start time).
func lockStateDir(dir string) (*stateLock, error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("state directory: %w", err)
	}
	path := filepath.Join(dir, lockFileName)
	// Opened without O_TRUNC: while another process holds the lock, what it
	// wrote stays readable.
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return nil, fmt.Errorf("state directory lock: %w", err)
	}
	if err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB); err != nil {
		holder := "holder unknown"
		if b, rerr := os.ReadFile(path); rerr == nil && len(strings.TrimSpace(string(b))) > 0 {
			holder = "held by " + strings.TrimSpace(string(b))
		}
		f.Close()
		if errors.Is(err, unix.EWOULDBLOCK) {
			return nil, fmt.Errorf("another csi-dmthin serve is running on this node: %s is locked (%s); one driver serves all of a node's pools, so check that no two nodePools entries select this node", path, holder)
		}
		return nil, fmt.Errorf("lock %s: %w", path, err)
	}
	host, _ := os.Hostname() // in a pod: the pod's name
	if err := writeHolder(f, fmt.Sprintf("pid %d on %s since %s\n", os.Getpid(), host, time.Now().UTC().Format(time.RFC3339))); err != nil {
		f.Close()
		return nil, fmt.Errorf("lock %s: %w", path, err)
	}
	return &stateLock{f: f}, nil
}

func writeHolder(f *os.File, s string) error {
	if err := f.Truncate(0); err != nil {
		return err
	}
	_, err := f.WriteAt([]byte(s), 0)
	return err
}

// release drops the lock. The file stays: removing it would let a process
// that opened it before the removal lock an unlinked file while another
// locks a new one.
func (l *stateLock) release() {
	if l == nil || l.f == nil {
		return
	}
	_ = writeHolder(l.f, "")
	_ = l.f.Close()
	l.f = nil
}

// poolNameRE is a pool's name (thinpool.Config.Name).
var poolNameRE = regexp.MustCompile(`^[a-z][a-z0-9-]{0,31}$`)

// recordedPools lists the pools whose records are in the state directory:
// every pool created on this node keeps a <name>.db there (thinpool.Open),
// configured now or not.
func recordedPools(dir string) ([]string, error) {
	entries, err := os.ReadDir(dir)
	if err != nil {
		return nil, fmt.Errorf("state directory: %w", err)
	}
	var names []string
	for _, e := range entries {
		name, ok := strings.CutSuffix(e.Name(), ".db")
		if ok && e.Type().IsRegular() && poolNameRE.MatchString(name) {
			names = append(names, name)
		}
	}
	sort.Strings(names)
	return names, nil
}
