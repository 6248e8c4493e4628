package main

import (
	"context"
	"errors"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/csi-dmthin/csi-dmthin/pkg/thinpool"
	"github.com/csi-dmthin/csi-dmthin/pkg/thinpool/thinpooltest"
)

// fakePool opens a loop-file pool on a fake kernel.
func fakePool(t *testing.T, k *thinpooltest.FakeKernel, name string, dataBytes int64, mod func(*thinpool.Config)) *thinpool.Pool {
	t.Helper()
	dir := t.TempDir()
	cfg := thinpool.Config{
		Name: name, StateDir: filepath.Join(dir, "state"),
		DataFile: filepath.Join(dir, "data"), MetadataFile: filepath.Join(dir, "meta"),
		DataFileBytes: dataBytes, OverprovisionRatio: -1,
	}
	if mod != nil {
		mod(&cfg)
	}
	p, err := thinpool.Open(context.Background(), cfg, k)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { p.Close() })
	return p
}

// fill writes n bytes to a new volume of p through the fake kernel.
func fill(t *testing.T, k *thinpooltest.FakeKernel, p *thinpool.Pool, vol string, off, n int64) {
	t.Helper()
	if _, err := p.Get(vol); errors.Is(err, thinpool.ErrNotFound) {
		if _, err := p.CreateVolume(context.Background(), vol, 1<<30); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := p.Activate(context.Background(), vol); err != nil {
		t.Fatal(err)
	}
	info, err := k.InfoByName("dmthin-" + p.Name() + "-" + vol)
	if err != nil {
		t.Fatal(err)
	}
	if err := k.Write(info.Dev, off, n); err != nil {
		t.Fatal(err)
	}
}

type heard struct {
	pool  string
	event bool
	at    time.Time
}

// A pool's kernel event reaches every listener at once, without a poll.
func TestMonitorWakesOnKernelEvents(t *testing.T) {
	k := thinpooltest.NewFakeKernel()
	p := fakePool(t, k, "ev", 16<<20, func(c *thinpool.Config) { c.LowWaterPercent = 50 })
	quiet := fakePool(t, k, "quiet", 16<<20, nil)
	m := newPoolMonitor(map[string]monitoredPool{"ev": p, "quiet": quiet}, nil, time.Hour)
	got := make(chan heard, 16)
	m.listen(func(pool string, ev bool) { got <- heard{pool, ev, time.Now()} })
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { m.run(ctx); close(done) }()
	<-m.ready

	select {
	case h := <-got:
		t.Fatalf("a listener was told of %+v before anything happened", h)
	case <-time.After(100 * time.Millisecond):
	}
	fill(t, k, p, "v", 0, 4<<20) // 25%: above the mark
	select {
	case h := <-got:
		t.Fatalf("told of %+v before the pool passed its mark", h)
	case <-time.After(100 * time.Millisecond):
	}
	crossed := time.Now()
	fill(t, k, p, "v", 4<<20, 6<<20) // 62%: under half free
	select {
	case h := <-got:
		if h.pool != "ev" || !h.event {
			t.Fatalf("told %+v", h)
		}
		t.Logf("listener told %v after the write that passed the mark", h.at.Sub(crossed))
	case <-time.After(5 * time.Second):
		t.Fatal("no listener was told of the low-water event")
	}
	cancel()
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		t.Fatal("the monitor did not stop with its context")
	}
}

// A loop-file pool with autoExtend grows by its step when its use passes
// the threshold, the listeners are told, and it stops at its maximum.
func TestMonitorAutoExtend(t *testing.T) {
	k := thinpooltest.NewFakeKernel()
	p := fakePool(t, k, "auto", 16<<20, func(c *thinpool.Config) { c.LowWaterPercent = 50 })
	ae := map[string]autoExtend{"auto": {thresholdPercent: 50, stepPercent: 100, maxDataBytes: 48 << 20}}
	m := newPoolMonitor(map[string]monitoredPool{"auto": p}, ae, time.Hour)
	var mu sync.Mutex
	var grown []string
	m.grown = func(pool string) { mu.Lock(); grown = append(grown, pool); mu.Unlock() }
	got := make(chan heard, 16)
	m.listen(func(pool string, ev bool) { got <- heard{pool, ev, time.Now()} })
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go m.run(ctx)
	<-m.ready

	waitSize := func(want int64) {
		t.Helper()
		deadline := time.Now().Add(5 * time.Second)
		for {
			u, err := p.Usage()
			if err != nil {
				t.Fatal(err)
			}
			if u.DataBytes == want {
				return
			}
			if time.Now().After(deadline) {
				t.Fatalf("data size %d, want %d", u.DataBytes, want)
			}
			time.Sleep(10 * time.Millisecond)
		}
	}
	fill(t, k, p, "v", 0, 10<<20) // 62% of 16 MiB
	waitSize(32 << 20)
	told := false
	for !told {
		select {
		case h := <-got:
			told = h.pool == "auto" && !h.event
		case <-time.After(5 * time.Second):
			t.Fatal("the listeners were not told of the growth")
		}
	}
	// The low-water mark follows the new size: the next crossing wakes
	// it again, and it grows to its maximum, not past it.
	fill(t, k, p, "v", 10<<20, 10<<20) // 62% of 32 MiB
	waitSize(48 << 20)
	fill(t, k, p, "v", 20<<20, 20<<20) // 83% of 48 MiB
	time.Sleep(200 * time.Millisecond)
	if ok := m.autoExtendPool(ctx, "auto"); ok {
		t.Error("grew past its maximum")
	}
	waitSize(48 << 20)
	mu.Lock()
	defer mu.Unlock()
	if len(grown) != 2 {
		t.Errorf("grown told %q, want two growths", grown)
	}
}

func TestAutoExtendRequest(t *testing.T) {
	a := autoExtend{thresholdPercent: 80, stepPercent: 20, maxDataBytes: 110 << 20}
	u := thinpool.Usage{DataBytes: 100 << 20, DataUsedBytes: 79 << 20, MetadataBytes: 4 << 20, MetadataUsedBytes: 1 << 20}
	if req, over := autoExtendRequest(a, u); over || req != (thinpool.GrowRequest{}) {
		t.Errorf("under the threshold: %+v, %v", req, over)
	}
	u.DataUsedBytes = 80 << 20
	if req, over := autoExtendRequest(a, u); !over || req.DataFileBytes != 110<<20 || req.MetadataFileBytes != 0 {
		t.Errorf("data at the threshold, the step capped at the maximum: %+v, %v", req, over)
	}
	u.DataBytes, u.DataUsedBytes = 110<<20, 100<<20
	if req, over := autoExtendRequest(a, u); !over || req != (thinpool.GrowRequest{}) {
		t.Errorf("at the maximum: %+v, %v", req, over)
	}
	u.DataUsedBytes, u.MetadataUsedBytes = 0, 4<<20*9/10
	if req, over := autoExtendRequest(a, u); !over || req.DataFileBytes != 0 || req.MetadataFileBytes != 5<<20 {
		t.Errorf("metadata over the threshold: %+v, %v", req, over)
	}
}
