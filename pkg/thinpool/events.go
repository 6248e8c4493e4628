package thinpool

import (
	"context"
	"errors"
	"fmt"

	"github.com/csi-dmthin/csi-dmthin/pkg/devmapper"
)

// The kernel counts the events a thin pool raises (its dm device's event
// number): when free data blocks fall to the low water mark (once, until
// the next resume), when free metadata falls under its threshold, and at
// every change of mode (out of data space, read-only, fail, and back). A
// watcher that waits for the count to change learns of each at once,
// instead of at its next poll.

// EventWaiter is a Kernel that can wait for a dm device's events:
// *devmapper.Client's WaitEvent, which HostKernel has, and the fake
// kernel's (thinpooltest.FakeKernel).
type EventWaiter interface {
	// WaitEvent returns the device's info once its event number differs
	// from eventNr; it honours ctx.
	WaitEvent(ctx context.Context, dev devmapper.Dev, eventNr uint32) (devmapper.DeviceInfo, error)
}

var _ EventWaiter = (*HostKernel)(nil)

// ErrNoEvents: the pool's Kernel cannot wait for events; poll Usage
// instead.
var ErrNoEvents = errors.New("the kernel interface cannot wait for events")

// EventNumber returns the pool's event number now, to pass to WaitEvent.
func (p *Pool) EventNumber() (uint32, error) {
	p.mu.Lock()
	closed := p.closed
	p.mu.Unlock()
	if closed {
		return 0, ErrClosed
	}
	info, err := p.k.Info(p.dev)
	if err != nil {
		return 0, fmt.Errorf("pool %s: %w", p.cfg.Name, err)
	}
	return info.EventNr, nil
}

// WaitEvent blocks until the pool has raised an event since the one
// numbered seen (from EventNumber or an earlier WaitEvent), and returns
// the new number. Several events may have happened: the caller reads
// Usage for what they mean. It does not hold the pool's lock while it
// waits, so it never delays an operation, and it honours ctx. ErrNoEvents
// when the Kernel cannot wait.
func (p *Pool) WaitEvent(ctx context.Context, seen uint32) (uint32, error) {
	w, ok := p.k.(EventWaiter)
	if !ok {
		return 0, ErrNoEvents
	}
	p.mu.Lock()
	closed := p.closed
	p.mu.Unlock()
	if closed {
		return 0, ErrClosed
	}
	info, err := w.WaitEvent(ctx, p.dev, seen)
	if err != nil {
		return 0, fmt.Errorf("pool %s: wait for an event: %w", p.cfg.Name, err)
	}
	return info.EventNr, nil
}
