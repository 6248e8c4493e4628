package thinpool

import (
	"fmt"
	"math"

	"github.com/csi-dmthin/csi-dmthin/pkg/devmapper"
)

// Mode is the pool's operating mode as the kernel reports it in the pool's
// status. It is pkg/thinpool's own type so that callers read a pool's mode
// without importing pkg/devmapper; the values are the kernel's words.
type Mode string

const (
	ModeReadWrite Mode = Mode(devmapper.PoolReadWrite)
	// ModeReadOnly: metadata problems (out of metadata space, an error,
	// needs_check), or the pool was made read-only.
	ModeReadOnly Mode = Mode(devmapper.PoolReadOnly)
	// ModeOutOfDataSpace: writes to unallocated blocks fail (or queue)
	// until the pool grows or blocks are freed.
	ModeOutOfDataSpace Mode = Mode(devmapper.PoolOutOfDataSpace)
)

// Usage is the pool's use of space and what it can still take.
type Usage struct {
	DataBytes         int64
	DataUsedBytes     int64
	MetadataBytes     int64
	MetadataUsedBytes int64
	// ProvisionedBytes is the sum of every volume's and snapshot's size.
	ProvisionedBytes int64
	// TemplateBytes is the sum of the templates' sizes. The
	// overprovisioning limit counts them with ProvisionedBytes: a template
	// promises nobody anything, but mkfs wrote into it in proportion to it.
	TemplateBytes int64
	// OverprovisionRatio is the configured limit (negative: none).
	OverprovisionRatio float64
	// AvailableBytes is the capacity to report to a scheduler: the largest
	// volume admission takes now. With an overprovisioning limit that is
	// what the limit still allows (a thin volume may be larger than the
	// free data: that is what the limit is for); without one, the free
	// data above the floor. 0 whenever admission would refuse any volume.
	AvailableBytes int64
	Volumes        int
	Snapshots      int
	Templates      int

	TransactionID uint64
	Mode          Mode
	NeedsCheck    bool
	Failed        bool
	// Fenced, when not empty, says why the pool refuses changes until it
	// has recovered from a failed step (ErrFenced).
	Fenced string
}

// Healthy reports whether the pool accepts changes.
func (u Usage) Healthy() bool {
	return !u.Failed && !u.NeedsCheck && u.Mode != ModeReadOnly && u.Fenced == ""
}

// Usage reads the pool's status (without forcing a metadata commit) and
// the records.
func (p *Pool) Usage() (Usage, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.closed {
		return Usage{}, ErrClosed
	}
	return p.usage()
}

func (p *Pool) usage() (Usage, error) {
	ps, err := p.poolStatus()
	if err != nil {
		return Usage{}, err
	}
	u := Usage{OverprovisionRatio: p.cfg.OverprovisionRatio, Failed: ps.Fail || ps.Error, TransactionID: ps.TransactionID, Mode: Mode(ps.Mode), NeedsCheck: ps.NeedsCheck}
	if p.fenced != nil {
		u.Fenced = p.fenced.Error()
	}
	for _, v := range p.vols {
		switch v.Kind {
		case KindTemplate:
			u.Templates++
			u.TemplateBytes += v.SizeBytes
			continue
		case KindSnapshot:
			u.Snapshots++
		default:
			u.Volumes++
		}
		u.ProvisionedBytes += v.SizeBytes
	}
	if u.Failed {
		return u, nil
	}
	block := int64(p.rec.BlockSectors) * devmapper.SectorSize
	u.DataBytes, u.DataUsedBytes = int64(ps.TotalDataBlocks)*block, int64(ps.UsedDataBlocks)*block
	meta := int64(devmapper.MetadataBlockSectors) * devmapper.SectorSize
	u.MetadataBytes, u.MetadataUsedBytes = int64(ps.TotalMetadataBlocks)*meta, int64(ps.UsedMetadataBlocks)*meta

	freeData, freeMeta := p.freeAboveFloors(u)
	switch {
	case !u.Healthy() || u.Mode == ModeOutOfDataSpace || freeData <= 0 || freeMeta <= 0:
		u.AvailableBytes = 0
	case p.cfg.OverprovisionRatio < 0:
		u.AvailableBytes = freeData
	default:
		u.AvailableBytes = max(0, p.headroom(u))
	}
	return u, nil
}

// freeAboveFloors returns the free data and metadata bytes above the
// configured floors; zero or less means admission refuses.
func (p *Pool) freeAboveFloors(u Usage) (data, meta int64) {
	dataFloor := int64(float64(u.DataBytes) * p.cfg.MinFreeDataPercent / 100)
	metaFloor := int64(float64(u.MetadataBytes) * p.cfg.MinFreeMetadataPercent / 100)
	return u.DataBytes - u.DataUsedBytes - dataFloor, u.MetadataBytes - u.MetadataUsedBytes - metaFloor
}

// headroom is what the overprovisioning limit still allows.
func (p *Pool) headroom(u Usage) int64 {
	return int64(math.Min(float64(u.DataBytes)*p.cfg.OverprovisionRatio, math.MaxInt64/2)) - u.ProvisionedBytes - u.TemplateBytes
}

// admit refuses a new commitment of sizeBytes for a device of kind with
// ErrNoSpace when the pool is at or under a free-space floor or out of data
// space, or when the overprovisioning limit would be passed; exactly when
// Usage reports no available bytes, a new device is refused. A thin volume
// larger than the free data is admitted while the limits hold: that is what
// thin provisioning is for. A template is not: mkfs writes into it in
// proportion to its size before any volume is cloned from it, so it must
// fit in the free data above the floor. The caller holds p.mu.
func (p *Pool) admit(sizeBytes int64, kind Kind) error {
	u, err := p.usage()
	if err != nil {
		return err
	}
	if !u.Healthy() {
		return fmt.Errorf("%w: mode %s, needs_check %v, failed %v", ErrPoolUnhealthy, u.Mode, u.NeedsCheck, u.Failed)
	}
	freeData, freeMeta := p.freeAboveFloors(u)
	switch {
	case u.Mode == ModeOutOfDataSpace:
		return fmt.Errorf("%w: the pool is out of data space", ErrNoSpace)
	case freeData <= 0:
		return fmt.Errorf("%w: %d of %d data bytes free, at or under the %.0f%% floor", ErrNoSpace, u.DataBytes-u.DataUsedBytes, u.DataBytes, p.cfg.MinFreeDataPercent)
	case freeMeta <= 0:
		return fmt.Errorf("%w: %d of %d metadata bytes free, at or under the %.0f%% floor", ErrNoSpace, u.MetadataBytes-u.MetadataUsedBytes, u.MetadataBytes, p.cfg.MinFreeMetadataPercent)
	case kind == KindTemplate && sizeBytes > freeData:
		return fmt.Errorf("%w: a template of %d bytes is larger than the %d data bytes free above the floor", ErrNoSpace, sizeBytes, freeData)
	case p.cfg.OverprovisionRatio >= 0 && sizeBytes > p.headroom(u):
		return fmt.Errorf("%w: %d bytes provisioned (templates included) plus %d would pass %.1f times the %d-byte pool", ErrNoSpace, u.ProvisionedBytes+u.TemplateBytes, sizeBytes, p.cfg.OverprovisionRatio, u.DataBytes)
	}
	return nil
}
