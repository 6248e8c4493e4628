package main

import (
	"bytes"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"time"
)

// results takes the guest's output (an io.Writer, one line per Write):
// lines of raw samples go to samples.json, the rest to the terminal and to
// table.md, which opens with when, where and at what load the run was
// taken, and closes with the load at its end.
type results struct {
	tablePath, samplesPath string
	table                  *os.File
	mu                     sync.Mutex
	samples                []json.RawMessage
	start                  time.Time
}

func newResults(dir string) (*results, error) {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, err
	}
	r := &results{tablePath: filepath.Join(dir, "table.md"), samplesPath: filepath.Join(dir, "samples.json"), start: time.Now()}
	f, err := os.Create(r.tablePath)
	if err != nil {
		return nil, err
	}
	r.table = f
	fmt.Fprintf(f, "# dmthin-bench, %s\n\n", r.start.UTC().Format(time.RFC3339))
	fmt.Fprintf(f, "Host: %s, %d CPUs, Go %s; load average at the start %s.\n", cpuModel(), runtime.NumCPU(), runtime.Version(), loadAvg())
	return r, nil
}

func (r *results) Write(p []byte) (int, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if rest, ok := bytes.CutPrefix(p, []byte(samplePrefix)); ok {
		line := bytes.TrimSpace(rest)
		if !json.Valid(line) {
			return 0, fmt.Errorf("bad samples line %q", line)
		}
		r.samples = append(r.samples, json.RawMessage(bytes.Clone(line)))
		return len(p), nil
	}
	if _, err := os.Stdout.Write(p); err != nil {
		return 0, err
	}
	return r.table.Write(p)
}

// finish writes the load at the end and samples.json.
func (r *results) finish() error {
	r.mu.Lock()
	defer r.mu.Unlock()
	fmt.Fprintf(r.table, "\nLoad average at the end %s; the run took %v.\n", loadAvg(), time.Since(r.start).Round(time.Second))
	b, err := json.MarshalIndent(r.samples, "", " ")
	if err != nil {
		return err
	}
	return os.WriteFile(r.samplesPath, append(b, '\n'), 0o644)
}

func (r *results) close() { r.table.Close() }

func cpuModel() string {
	b, _ := os.ReadFile("/proc/cpuinfo")
	for _, line := range strings.Split(string(b), "\n") {
		if k, v, ok := strings.Cut(line, ":"); ok && strings.TrimSpace(k) == "model name" {
			return strings.TrimSpace(v)
		}
	}
	return runtime.GOARCH
}

// loadAvg is /proc/loadavg's 1, 5 and 15 minute figures.
func loadAvg() string {
	b, _ := os.ReadFile("/proc/loadavg")
	f := strings.Fields(string(b))
	if len(f) < 3 {
		return "unknown"
	}
	return strings.Join(f[:3], ", ")
}
