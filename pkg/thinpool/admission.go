package thinpool

import (
	"fmt"
	"math"
)

// Admission: the one rule for what a pool takes. Every operation that
// commits space (CreateVolume, Snapshot, Clone, CreateTemplate,
// SnapshotGroup, Grow), the capacity the pool reports (Usage.AvailableBytes)
// and the questions asked before anything is made (Pool.Admit) apply it to
// the same snapshot of the pool, a Usage, so they cannot disagree.
//
// A new device of sizeBytes is refused
//   - with ErrPoolUnhealthy when the pool is failed, read-only, needs a
//     check or is fenced;
//   - with ErrNoSpace when the pool is out of data space (whatever the
//     floor, even 0%), when the free data or the free metadata is at or
//     under its floor (free exactly at the floor is refused, one byte above
//     is admitted), when a template is larger than the free data above the
//     floor, or, with an overprovisioning limit, when the sizes of every
//     volume, snapshot and template plus sizeBytes would pass the limit
//     (exactly reaching it is admitted).
//
// Otherwise it is admitted: a thin volume larger than the free data is
// fine while the limits hold, since that is what thin provisioning is for.
// A template is not, because mkfs writes into it in proportion to its size
// before any volume is cloned from it.

// floorBytes is pct percent of totalBytes, the free bytes a floor keeps.
func floorBytes(totalBytes int64, pct float64) int64 {
	return int64(float64(totalBytes) * pct / 100)
}

// freeAboveFloors returns the free data and metadata bytes above the
// floors; zero or less means admission refuses.
func (u Usage) freeAboveFloors() (dataBytes, metaBytes int64) {
	return u.DataBytes - u.DataUsedBytes - floorBytes(u.DataBytes, u.MinFreeDataPercent),
		u.MetadataBytes - u.MetadataUsedBytes - floorBytes(u.MetadataBytes, u.MinFreeMetadataPercent)
}

// headroom is what the overprovisioning limit still allows, templates
// counted: mkfs wrote into them in proportion to their size, and a template
// promises nobody anything, but its blocks are the pool's all the same.
// Meaningless without a limit.
func (u Usage) headroom() int64 {
	limit := int64(math.Min(float64(u.DataBytes)*u.OverprovisionRatio, math.MaxInt64/2))
	return limit - u.ProvisionedBytes - u.TemplateBytes
}

// refusal says why the pool takes no new device of any size, nil when it
// takes some.
func (u Usage) refusal() error {
	freeData, freeMeta := u.freeAboveFloors()
	switch {
	case !u.Healthy():
		why := fmt.Sprintf("mode %s, needs_check %v, failed %v", u.Mode, u.NeedsCheck, u.Failed)
		if u.Fenced != "" {
			why += ", fenced: " + u.Fenced
		}
		return fmt.Errorf("%w: %s", ErrPoolUnhealthy, why)
	case u.Mode == ModeOutOfDataSpace:
		return fmt.Errorf("%w: the pool is out of data space", ErrNoSpace)
	case freeData <= 0:
		return fmt.Errorf("%w: %d of %d data bytes free, at or under the %g%% floor", ErrNoSpace, u.DataBytes-u.DataUsedBytes, u.DataBytes, u.MinFreeDataPercent)
	case freeMeta <= 0:
		return fmt.Errorf("%w: %d of %d metadata bytes free, at or under the %g%% floor", ErrNoSpace, u.MetadataBytes-u.MetadataUsedBytes, u.MetadataBytes, u.MinFreeMetadataPercent)
	}
	return nil
}

// admit applies the rule to a new commitment of sizeBytes for a device of
// kind (for a grow, the growth): nil, or an error wrapping
// ErrPoolUnhealthy or ErrNoSpace that says why.
func (u Usage) admit(sizeBytes int64, kind Kind) error {
	if err := u.refusal(); err != nil {
		return err
	}
	freeData, _ := u.freeAboveFloors()
	switch {
	case kind == KindTemplate && sizeBytes > freeData:
		return fmt.Errorf("%w: a template of %d bytes is larger than the %d data bytes free above the floor", ErrNoSpace, sizeBytes, freeData)
	case u.OverprovisionRatio >= 0 && sizeBytes > u.headroom():
		return fmt.Errorf("%w: %d bytes provisioned (templates included) plus %d would pass %g times the %d-byte pool", ErrNoSpace, u.ProvisionedBytes+u.TemplateBytes, sizeBytes, u.OverprovisionRatio, u.DataBytes)
	}
	return nil
}

// available is Usage.AvailableBytes: 0 when admit refuses every volume,
// else what the limit still allows, or without one the free data above the
// floor.
func (u Usage) available() int64 {
	if u.refusal() != nil {
		return 0
	}
	if u.OverprovisionRatio < 0 {
		freeData, _ := u.freeAboveFloors()
		return freeData
	}
	return max(0, u.headroom())
}

// Admit answers, without changing anything, whether the pool would now
// take a new device of kind and sizeBytes: nil, or an error that names the
// pool and the reason and wraps ErrPoolUnhealthy, ErrNoSpace or ErrClosed.
// It is the rule the pool's own operations apply (admission.go), so a
// volume of Usage.AvailableBytes is admitted and, with an overprovisioning
// limit, one byte more is refused. The answer can be stale by the time the
// caller acts; the operation's own admission decides.
func (p *Pool) Admit(sizeBytes int64, kind Kind) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.closed {
		return fmt.Errorf("pool %s: %w", p.cfg.Name, ErrClosed)
	}
	return p.admit(sizeBytes, kind)
}

// admit is Admit for the pool's own operations. The caller holds p.mu.
func (p *Pool) admit(sizeBytes int64, kind Kind) error {
	u, err := p.usage()
	if err != nil {
		return fmt.Errorf("pool %s: %w", p.cfg.Name, err)
	}
	if err := u.admit(sizeBytes, kind); err != nil {
		return fmt.Errorf("pool %s: %w", p.cfg.Name, err)
	}
	return nil
}

// AdmitData answers, changing nothing, whether the pool's free data above
// its floor now holds n bytes more, the pool taking new devices at all: a
// copy from another node writes its source's mapped bytes into a new
// volume at once, which admission by size (Admit) does not promise, with
// overprovisioning. nil, or an error that names the pool and wraps
// ErrNoSpace, ErrPoolUnhealthy or ErrClosed.
func (p *Pool) AdmitData(n int64) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.closed {
		return fmt.Errorf("pool %s: %w", p.cfg.Name, ErrClosed)
	}
	u, err := p.usage()
	if err != nil {
		return fmt.Errorf("pool %s: %w", p.cfg.Name, err)
	}
	if err := u.admitData(n); err != nil {
		return fmt.Errorf("pool %s: %w", p.cfg.Name, err)
	}
	return nil
}

// admitData is AdmitData's rule.
func (u Usage) admitData(n int64) error {
	if err := u.refusal(); err != nil {
		return err
	}
	if free, _ := u.freeAboveFloors(); n > free {
		return fmt.Errorf("%w: %d bytes to write, %d data bytes free above the %g%% floor", ErrNoSpace, n, free, u.MinFreeDataPercent)
	}
	return nil
}
