package thinpool

import (
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
	// MinFreeDataPercent and MinFreeMetadataPercent are the configured
	// floors: with them, a Usage holds everything admission (admission.go)
	// decides on.
	MinFreeDataPercent     float64
	MinFreeMetadataPercent float64
	// AvailableBytes is the capacity to report to a scheduler, by the same
	// rule as admission: 0 whenever admission refuses every new volume.
	// With an overprovisioning limit it is the largest volume admission
	// takes (what the limit still allows: a thin volume may be larger than
	// the free data, which is what the limit is for); one byte more is
	// refused. Without one it is the free data above the floor, and
	// admission takes a larger volume too.
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
	u := Usage{
		OverprovisionRatio: p.cfg.OverprovisionRatio, MinFreeDataPercent: p.cfg.MinFreeDataPercent, MinFreeMetadataPercent: p.cfg.MinFreeMetadataPercent,
		Failed: ps.Fail || ps.Error, TransactionID: ps.TransactionID, Mode: Mode(ps.Mode), NeedsCheck: ps.NeedsCheck,
	}
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

	u.AvailableBytes = u.available()
	return u, nil
}
