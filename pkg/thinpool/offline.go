package thinpool

import (
	"context"
	"fmt"
	"sort"
	"strings"
)

// Offline takes the pool away from this process and from the kernel, so
// that thin_check or thin_repair can work on its metadata device: it
// refuses (ErrBusy, naming them) while any of the pool's volumes is open
// (mounted, or used raw by a pod), removes the pool's dm devices (the
// volumes', then the pool's; a loop-file pool's loop devices detach with
// it) and closes the records. Every later call on the Pool returns
// ErrClosed.
//
// The records are left as they are: they still say which volumes should
// be active, so the next Open (the driver's restart) loads the pool and
// reactivates them, as after a reboot, once the metadata checks clean.
func (p *Pool) Offline(ctx context.Context) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.closed {
		return ErrClosed
	}
	if err := ctx.Err(); err != nil {
		return err
	}
	list, err := p.k.List()
	if err != nil {
		return err
	}
	var busy []string
	for _, e := range list {
		if !strings.HasPrefix(e.UUID, p.uuidPrefix()) || e.UUID == p.uuidPrefix()+"pool" {
			continue
		}
		info, err := p.k.Info(e.Dev)
		if err != nil {
			continue // gone meanwhile
		}
		if info.OpenCount > 0 {
			busy = append(busy, fmt.Sprintf("%s (open count %d)", e.Name, info.OpenCount))
		}
	}
	if len(busy) > 0 {
		sort.Strings(busy)
		return fmt.Errorf("%w: pool %s: volumes still open: %s; stop the pods that use them (drain the node) first", ErrBusy, p.cfg.Name, strings.Join(busy, ", "))
	}
	// From here Usage, which takes no lock, says closed rather than ask
	// the kernel about devices on their way out; a removal that fails
	// leaves the pool open again.
	closing := p.currentView()
	closing.closed = true
	p.view.Store(closing)
	defer func() {
		if !p.closed {
			p.publish()
		}
	}()
	for _, e := range list {
		if !strings.HasPrefix(e.UUID, p.uuidPrefix()) || e.UUID == p.uuidPrefix()+"pool" {
			continue
		}
		if info, err := p.k.Info(e.Dev); err == nil && info.Suspended {
			_ = p.k.Resume(e.Dev)
		}
		if err := p.k.Remove(e.Dev, false); err != nil && !isENXIO(err) {
			return fmt.Errorf("pool %s: remove %s: %w", p.cfg.Name, e.Name, err)
		}
	}
	p.step("offline:volumes-removed")
	if err := p.k.Remove(p.dev, false); err != nil && !isENXIO(err) {
		return fmt.Errorf("pool %s: remove the pool's device: %w", p.cfg.Name, err)
	}
	p.step("offline:pool-removed")
	p.closed = true
	p.publish()
	return p.st.close()
}
