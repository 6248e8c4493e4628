package main

import (
	"context"
	"errors"
	"sort"
	"sync"
	"time"

	"k8s.io/klog/v2"

	"github.com/csi-dmthin/csi-dmthin/pkg/thinpool"
)

// The pool monitor wakes everything that reports on the pools the moment a
// pool's kernel raises an event (its low water mark passed, its metadata
// threshold passed, its mode changed), instead of at their next poll: the
// Node's Events, the ThinPool status, this node's CSIStorageCapacity and
// a loop-file pool's autoExtend. Each of them still polls on its own as a
// fallback, for what raises no event (a slow fill above the mark).

// monitoredPool is what the monitor needs of a pool; *thinpool.Pool is one.
type monitoredPool interface {
	Usage() (thinpool.Usage, error)
	EventNumber() (uint32, error)
	WaitEvent(ctx context.Context, seen uint32) (uint32, error)
	GrowPool(ctx context.Context, req thinpool.GrowRequest) (thinpool.Growth, error)
}

var _ monitoredPool = (*thinpool.Pool)(nil)

// poolListener is told that a pool changed: kernelEvent when its kernel
// raised an event, else because it grew or an admin call changed it. It
// must not block.
type poolListener func(pool string, kernelEvent bool)

// eventRetry is how long the monitor waits before it waits for a pool's
// events again after the wait failed.
const eventRetry = 5 * time.Second

type poolMonitor struct {
	pools      map[string]monitoredPool
	autoExtend map[string]autoExtend
	interval   time.Duration // autoExtend's poll

	mu        sync.Mutex
	listeners []poolListener
	// grown is told of every growth autoExtend makes (metrics).
	grown func(pool string)
	// atMax: pools whose autoExtend reached its maximum while over the
	// threshold, so that it is said once.
	atMax map[string]bool
	wake  chan string
	// ready is closed once run has read every pool's event number: an
	// event after that wakes the listeners.
	ready chan struct{}
}

func newPoolMonitor(pools map[string]monitoredPool, ae map[string]autoExtend, interval time.Duration) *poolMonitor {
	return &poolMonitor{pools: pools, autoExtend: ae, interval: interval, atMax: map[string]bool{}, wake: make(chan string, 64), ready: make(chan struct{})}
}

// listen adds a listener; call it before run.
func (m *poolMonitor) listen(l poolListener) {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.listeners = append(m.listeners, l)
}

// changed tells every listener that pool changed, and autoExtend to look.
func (m *poolMonitor) changed(pool string, kernelEvent bool) {
	m.mu.Lock()
	ls := append([]poolListener(nil), m.listeners...)
	m.mu.Unlock()
	for _, l := range ls {
		l(pool, kernelEvent)
	}
	if _, ok := m.autoExtend[pool]; ok {
		select {
		case m.wake <- pool:
		default: // the poll catches it
		}
	}
}

// run waits for every pool's events and runs autoExtend until ctx is done;
// it returns once everything it started has returned.
func (m *poolMonitor) run(ctx context.Context) {
	var wg sync.WaitGroup
	names := make([]string, 0, len(m.pools))
	for n := range m.pools {
		names = append(names, n)
	}
	sort.Strings(names)
	for _, n := range names {
		p := m.pools[n]
		seen, err := p.EventNumber()
		wg.Add(1)
		go func() {
			defer wg.Done()
			m.waitEvents(ctx, n, p, seen, err)
		}()
	}
	close(m.ready)
	if len(m.autoExtend) > 0 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			m.runAutoExtend(ctx)
		}()
	}
	wg.Wait()
}

// waitEvents tells the listeners of each event pool p raises after the
// one numbered seen (err: reading that number failed).
func (m *poolMonitor) waitEvents(ctx context.Context, name string, p monitoredPool, seen uint32, err error) {
	logger := klog.FromContext(ctx).WithValues("pool", name)
	lastErr := ""
	for ctx.Err() == nil {
		if err == nil {
			var n uint32
			if n, err = p.WaitEvent(ctx, seen); err == nil {
				seen = n
				logger.V(2).Info("Pool event", "eventNumber", n)
				m.changed(name, true)
				continue
			}
		}
		switch {
		case ctx.Err() != nil:
			return
		case errors.Is(err, thinpool.ErrNoEvents), errors.Is(err, thinpool.ErrClosed):
			logger.V(2).Info("Not waiting for the pool's events; the polls go on", "reason", err)
			return
		}
		if msg := err.Error(); msg != lastErr {
			logger.Error(err, "Waiting for the pool's events failed; the polls go on, and the wait is retried", "retryIn", eventRetry)
			lastErr = msg
		}
		select {
		case <-ctx.Done():
			return
		case <-time.After(eventRetry):
		}
		// Events in between are missed by the wait, not by the polls.
		seen, err = p.EventNumber()
	}
}

// runAutoExtend checks the pools with autoExtend at every interval and
// whenever one changes.
func (m *poolMonitor) runAutoExtend(ctx context.Context) {
	t := time.NewTicker(m.interval)
	defer t.Stop()
	check := func(names ...string) {
		for _, n := range names {
			if ctx.Err() != nil {
				return
			}
			if grew := m.autoExtendPool(ctx, n); grew {
				m.changed(n, false)
			}
		}
	}
	all := make([]string, 0, len(m.autoExtend))
	for n := range m.autoExtend {
		all = append(all, n)
	}
	sort.Strings(all)
	check(all...)
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			check(all...)
		case n := <-m.wake:
			check(n)
		}
	}
}

// autoExtendPool grows a loop-file pool whose data or metadata use reached
// its threshold, by its step, up to its maximum; it reports whether it
// grew.
func (m *poolMonitor) autoExtendPool(ctx context.Context, name string) bool {
	a, ok := m.autoExtend[name]
	p := m.pools[name]
	if !ok || p == nil {
		return false
	}
	logger := klog.FromContext(ctx).WithValues("pool", name)
	u, err := p.Usage()
	if err != nil || u.Failed || u.NeedsCheck || u.DataBytes == 0 || u.MetadataBytes == 0 {
		return false
	}
	req, over := autoExtendRequest(a, u)
	if !over {
		m.setAtMax(name, false)
		return false
	}
	if req == (thinpool.GrowRequest{}) {
		if !m.setAtMax(name, true) {
			logger.Error(nil, "Pool over its autoExtend threshold and at its maximum: grow it by hand or free space",
				"dataUsedPercent", percent(u.DataUsedBytes, u.DataBytes), "metadataUsedPercent", percent(u.MetadataUsedBytes, u.MetadataBytes), "maxDataFileSize", a.maxDataBytes)
		}
		return false
	}
	start := time.Now()
	g, err := p.GrowPool(ctx, req)
	if err != nil {
		logger.Error(err, "AutoExtend failed to grow the pool", "dataFileBytes", req.DataFileBytes, "metadataFileBytes", req.MetadataFileBytes)
		return false
	}
	if !g.Grew() {
		return false
	}
	logger.Info("AutoExtend grew the pool", "dataBytesBefore", g.DataBytesBefore, "dataBytes", g.DataBytes,
		"metadataBytesBefore", g.MetadataBytesBefore, "metadataBytes", g.MetadataBytes, "duration", time.Since(start))
	m.mu.Lock()
	grown := m.grown
	m.mu.Unlock()
	if grown != nil {
		grown(name)
	}
	return true
}

// setAtMax records whether a pool is stuck at its maximum and reports the
// previous value.
func (m *poolMonitor) setAtMax(name string, v bool) bool {
	m.mu.Lock()
	defer m.mu.Unlock()
	was := m.atMax[name]
	m.atMax[name] = v
	return was
}

// autoExtendRequest is the growth autoExtend wants for a pool's usage:
// over tells whether data or metadata use reached the threshold; the
// request is zero when the pool is over it but cannot grow (at its
// maximum).
func autoExtendRequest(a autoExtend, u thinpool.Usage) (req thinpool.GrowRequest, over bool) {
	dataPct := percent(u.DataUsedBytes, u.DataBytes)
	metaPct := percent(u.MetadataUsedBytes, u.MetadataBytes)
	if dataPct < a.thresholdPercent && metaPct < a.thresholdPercent {
		return req, false
	}
	step := func(b int64) int64 {
		n := int64(float64(b) * (1 + a.stepPercent/100))
		return (n + 1<<20 - 1) &^ (1<<20 - 1) // whole MiB
	}
	if dataPct >= a.thresholdPercent && u.DataBytes < a.maxDataBytes {
		req.DataFileBytes = min(step(u.DataBytes), a.maxDataBytes)
	}
	if metaPct >= a.thresholdPercent && u.MetadataBytes < maxMetadataFileBytes {
		req.MetadataFileBytes = min(step(u.MetadataBytes), maxMetadataFileBytes)
	}
	return req, true
}

// maxMetadataFileBytes is the most of a metadata device the kernel uses,
// rounded up (MetadataBytesFor's cap).
const maxMetadataFileBytes = 16 << 30

func percent(a, b int64) float64 {
	if b <= 0 {
		return 0
	}
	return 100 * float64(a) / float64(b)
}
