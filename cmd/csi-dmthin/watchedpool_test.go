package main

import (
	"context"
	"fmt"
	"slices"
	"sync"
	"time"

	"github.com/csi-dmthin/csi-dmthin/pkg/thinpool"
)

// watchedPool records how serve uses a pool: every call in progress, and
// any call during or after Close. Its Reap waits for its context and then
// takes a moment, like an operation finishing its step.
type watchedPool struct {
	*thinpool.Pool
	log *eventLog

	mu       sync.Mutex
	inFlight map[string]int
	closed   bool
}

// eventLog is the order of what happened, across pools and calls.
type eventLog struct {
	mu     sync.Mutex
	events []string
	bad    []string
}

func (l *eventLog) add(e string) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.events = append(l.events, e)
}

func (l *eventLog) violation(e string) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.bad = append(l.bad, e)
}

func (l *eventLog) snapshot() (events, bad []string) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return slices.Clone(l.events), slices.Clone(l.bad)
}

func (w *watchedPool) use(what string) func() {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.closed {
		w.log.violation(what + " on pool " + w.Name() + " after Close")
	}
	w.inFlight[what]++
	return func() {
		w.mu.Lock()
		defer w.mu.Unlock()
		w.inFlight[what]--
	}
}

func (w *watchedPool) Close() error {
	w.mu.Lock()
	for what, n := range w.inFlight {
		if n > 0 {
			w.log.violation(fmt.Sprintf("Close of pool %s with %d %s in progress", w.Name(), n, what))
		}
	}
	w.closed = true
	w.mu.Unlock()
	w.log.add("close " + w.Name())
	return w.Pool.Close()
}

func (w *watchedPool) Reap(ctx context.Context) error {
	defer w.use("Reap")()
	<-ctx.Done()
	w.log.add("reap cancelled " + w.Name())
	time.Sleep(100 * time.Millisecond)
	return w.Pool.Reap(ctx)
}

func (w *watchedPool) CreateVolume(ctx context.Context, name string, sizeBytes int64) (*thinpool.Volume, error) {
	defer w.use("CreateVolume")()
	return w.Pool.CreateVolume(ctx, name, sizeBytes)
}

func (w *watchedPool) CreateTemplate(ctx context.Context, name string, sizeBytes int64) (*thinpool.Volume, error) {
	defer w.use("CreateTemplate")()
	return w.Pool.CreateTemplate(ctx, name, sizeBytes)
}

func (w *watchedPool) SealTemplate(ctx context.Context, name string) error {
	defer w.use("SealTemplate")()
	return w.Pool.SealTemplate(ctx, name)
}

func (w *watchedPool) Snapshot(ctx context.Context, name, source string) (*thinpool.Volume, error) {
	defer w.use("Snapshot")()
	return w.Pool.Snapshot(ctx, name, source)
}

func (w *watchedPool) Clone(ctx context.Context, name, source string, sizeBytes int64) (*thinpool.Volume, error) {
	defer w.use("Clone")()
	return w.Pool.Clone(ctx, name, source, sizeBytes)
}

func (w *watchedPool) Delete(ctx context.Context, name string) error {
	defer w.use("Delete")()
	return w.Pool.Delete(ctx, name)
}

func (w *watchedPool) Grow(ctx context.Context, name string, sizeBytes int64) (*thinpool.Volume, error) {
	defer w.use("Grow")()
	return w.Pool.Grow(ctx, name, sizeBytes)
}

func (w *watchedPool) Activate(ctx context.Context, name string) (string, error) {
	defer w.use("Activate")()
	return w.Pool.Activate(ctx, name)
}

func (w *watchedPool) Deactivate(ctx context.Context, name string) error {
	defer w.use("Deactivate")()
	return w.Pool.Deactivate(ctx, name)
}

func (w *watchedPool) DevicePath(name string) (string, error) {
	defer w.use("DevicePath")()
	return w.Pool.DevicePath(name)
}

func (w *watchedPool) Get(name string) (*thinpool.Volume, error) {
	defer w.use("Get")()
	return w.Pool.Get(name)
}

func (w *watchedPool) List() []thinpool.Volume {
	defer w.use("List")()
	return w.Pool.List()
}

func (w *watchedPool) Usage() (thinpool.Usage, error) {
	defer w.use("Usage")()
	return w.Pool.Usage()
}

func (w *watchedPool) Admit(sizeBytes int64, kind thinpool.Kind) error {
	defer w.use("Admit")()
	return w.Pool.Admit(sizeBytes, kind)
}

var _ servedPool = (*watchedPool)(nil)
