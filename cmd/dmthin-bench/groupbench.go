package main

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"sync"
	"time"

	"golang.org/x/sys/unix"

	"github.com/csi-dmthin/csi-dmthin/pkg/thinpool"
)

// groupSizes are the group sizes groupBench measures.
var groupSizes = []int{1, 2, 8, 32}

// groupBench measures group snapshots (pkg/thinpool's SnapshotGroup: every
// origin suspended, one create_snap each, one commit, every origin resumed)
// of 1, 2, 8 and 32 active volumes, beside the same volumes snapshotted one
// after the other with Snapshot (a suspend, a commit and a resume each),
// and how long a writer on the first member stalls meanwhile.
//
// The writer does 4 KiB O_DIRECT writes without pause over the first 16 MiB
// of the member's raw device (written once before, so the figure is the
// suspend's and the copy-on-write's, not the first allocation's). A
// sample's stall is the longest write that overlapped the snapshot call;
// the idle row is the longest write in a window of the same length with no
// snapshot, for comparison.
func groupBench(n int, groupSizes []int) error {
	ctx := context.Background()
	k, err := thinpool.NewHostKernel()
	if err != nil {
		return err
	}
	dir, err := os.MkdirTemp("", "groupbench-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(dir)
	cfg := thinpool.Config{
		Name: "groupbench", StateDir: filepath.Join(dir, "state"),
		DataFile: filepath.Join(dir, "group.data"), MetadataFile: filepath.Join(dir, "group.meta"),
		DataFileBytes: 64 << 30, MetadataFileBytes: 256 << 20, OverprovisionRatio: -1,
	}
	p, err := thinpool.Open(ctx, cfg, k)
	if err != nil {
		return err
	}
	defer p.Close()

	type result struct {
		group, single, stall, idle sample
	}
	results := map[int]*result{}
	for _, size := range groupSizes {
		r := &result{}
		results[size] = r
		var names []string
		var node string
		for i := 0; i < size; i++ {
			name := fmt.Sprintf("g%d-v%d", size, i)
			if _, err := p.CreateVolume(ctx, name, 1<<30); err != nil {
				return err
			}
			dev, err := p.Activate(ctx, name)
			if err != nil {
				return err
			}
			if i == 0 {
				node = dev
			}
			names = append(names, name)
		}
		w, err := startWriter(node, 16<<20)
		if err != nil {
			return err
		}
		for i := 0; i <= n; i++ {
			members := make([]thinpool.GroupMember, size)
			for j, name := range names {
				members[j] = thinpool.GroupMember{Name: fmt.Sprintf("%s-g%d", name, i), Source: name}
			}
			t0 := time.Now()
			if _, err := p.SnapshotGroup(ctx, fmt.Sprintf("g%d-%d", size, i), members); err != nil {
				w.stop()
				return err
			}
			t1 := time.Now()
			for _, name := range names {
				if _, err := p.Snapshot(ctx, fmt.Sprintf("%s-s%d", name, i), name); err != nil {
					w.stop()
					return err
				}
			}
			t2 := time.Now()
			// An idle window as long as the group's, after the writer has
			// settled.
			time.Sleep(50 * time.Millisecond)
			t3 := time.Now()
			time.Sleep(t1.Sub(t0))
			t4 := time.Now()
			if i == 0 {
				continue // warm-up
			}
			r.group = append(r.group, t1.Sub(t0))
			r.single = append(r.single, t2.Sub(t1))
			r.stall = append(r.stall, w.longest(t0, t1))
			r.idle = append(r.idle, w.longest(t3, t4))
		}
		if err := w.stop(); err != nil {
			return fmt.Errorf("writer on %s: %w", names[0], err)
		}
	}

	fmt.Printf("\n## Group snapshots (pkg/thinpool, active 1 GiB volumes, a writer on the first)\n\n")
	fmt.Println("| volumes | one group snapshot, median (p90) ms | the same one by one, median (p90) ms | one by one ÷ group | longest write during the group snapshot, median (p90) ms | longest write, idle window, median (p90) ms |")
	fmt.Println("|---:|---:|---:|---:|---:|---:|")
	for _, size := range groupSizes {
		r := results[size]
		fmt.Printf("| %d | %s | %s | %s | %s | %s |\n", size, cell(r.group), cell(r.single), ratio(r.single, r.group), cell(r.stall), cell(r.idle))
	}
	fmt.Println("\nA group snapshot suspends every member (its writes wait) until the one commit; the one-by-one column is what a caller without groups pays, and its copies are of different moments.")
	return nil
}

// writer writes without pause and keeps every write's start and length.
type writer struct {
	mu     sync.Mutex
	starts []time.Time
	lens   []time.Duration
	done   chan struct{}
	err    chan error
}

func startWriter(node string, span int64) (*writer, error) {
	f, err := os.OpenFile(node, os.O_WRONLY|unix.O_DIRECT, 0)
	if err != nil {
		return nil, err
	}
	buf, free, err := directBuffer(4096)
	if err != nil {
		f.Close()
		return nil, err
	}
	for off := int64(0); off < span; off += 4096 {
		if _, err := f.WriteAt(buf, off); err != nil {
			free()
			f.Close()
			return nil, err
		}
	}
	w := &writer{done: make(chan struct{}), err: make(chan error, 1)}
	go func() {
		defer f.Close()
		defer free()
		var off int64
		for {
			select {
			case <-w.done:
				w.err <- nil
				return
			default:
			}
			t0 := time.Now()
			if _, err := f.WriteAt(buf, off); err != nil {
				w.err <- err
				return
			}
			d := time.Since(t0)
			w.mu.Lock()
			w.starts, w.lens = append(w.starts, t0), append(w.lens, d)
			w.mu.Unlock()
			off = (off + 4096) % span
		}
	}()
	return w, nil
}

// longest is the longest write that overlapped [from, to].
func (w *writer) longest(from, to time.Time) time.Duration {
	w.mu.Lock()
	defer w.mu.Unlock()
	var max time.Duration
	for i := len(w.starts) - 1; i >= 0; i-- {
		start, end := w.starts[i], w.starts[i].Add(w.lens[i])
		if end.Before(from) {
			break
		}
		if start.After(to) {
			continue
		}
		if w.lens[i] > max {
			max = w.lens[i]
		}
	}
	return max
}

func (w *writer) stop() error {
	close(w.done)
	return <-w.err
}
