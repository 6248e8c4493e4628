package thinpool

import (
	"fmt"
	"math"

	"github.com/csi-dmthin/csi-dmthin/pkg/devmapper"
)

// Usage is the pool's use of space and what it can still take.
type Usage struct {
	DataBytes         int64
	DataUsedBytes     int64
	MetadataBytes     int64
	MetadataUsedBytes int64
	// ProvisionedBytes is the sum of every volume's and snapshot's size
	// (templates are not counted).
	ProvisionedBytes int64
	// OverprovisionRatio is the configured limit (negative: none).
	OverprovisionRatio float64
	// AvailableBytes is the capacity to report to a scheduler: the smaller
	// of the free data above the floor and what the overprovisioning limit
	// still allows; 0 whenever admission would refuse a new volume.
	AvailableBytes int64
	Volumes        int
	Snapshots      int
	Templates      int

	TransactionID uint64
	Mode          devmapper.PoolMode
	NeedsCheck    bool
	Failed        bool
}

// Healthy reports whether the pool accepts changes.
func (u Usage) Healthy() bool {
	return !u.Failed && !u.NeedsCheck && u.Mode != devmapper.PoolReadOnly
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
	u := Usage{OverprovisionRatio: p.cfg.OverprovisionRatio, Failed: ps.Fail || ps.Error, TransactionID: ps.TransactionID, Mode: ps.Mode, NeedsCheck: ps.NeedsCheck}
	for _, v := range p.vols {
		switch v.Kind {
		case KindTemplate:
			u.Templates++
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

	dataFloor := int64(float64(u.DataBytes) * p.cfg.MinFreeDataPercent / 100)
	metaFloor := int64(float64(u.MetadataBytes) * p.cfg.MinFreeMetadataPercent / 100)
	freeData := u.DataBytes - u.DataUsedBytes - dataFloor
	freeMeta := u.MetadataBytes - u.MetadataUsedBytes - metaFloor
	switch {
	case !u.Healthy() || ps.Mode == devmapper.PoolOutOfDataSpace || freeData <= 0 || freeMeta <= 0:
		u.AvailableBytes = 0
	case p.cfg.OverprovisionRatio < 0:
		u.AvailableBytes = freeData
	default:
		headroom := int64(math.Min(float64(u.DataBytes)*p.cfg.OverprovisionRatio, math.MaxInt64/2)) - u.ProvisionedBytes
		u.AvailableBytes = max(0, min(freeData, headroom))
	}
	return u, nil
}

// admit refuses a new commitment of sizeBytes with ErrNoSpace when the pool
// is under a free-space floor, or when the overprovisioning limit would be
// passed. A thin volume larger than the free data is admitted while the
// limits hold: that is what thin provisioning is for. The caller holds p.mu.
func (p *Pool) admit(sizeBytes int64) error {
	u, err := p.usage()
	if err != nil {
		return err
	}
	if !u.Healthy() {
		return fmt.Errorf("%w: mode %s, needs_check %v, failed %v", ErrPoolUnhealthy, u.Mode, u.NeedsCheck, u.Failed)
	}
	freeData := u.DataBytes - u.DataUsedBytes
	freeMeta := u.MetadataBytes - u.MetadataUsedBytes
	if float64(freeData) < float64(u.DataBytes)*p.cfg.MinFreeDataPercent/100 {
		return fmt.Errorf("%w: %d of %d data bytes free, under the %.0f%% floor", ErrNoSpace, freeData, u.DataBytes, p.cfg.MinFreeDataPercent)
	}
	if float64(freeMeta) < float64(u.MetadataBytes)*p.cfg.MinFreeMetadataPercent/100 {
		return fmt.Errorf("%w: %d of %d metadata bytes free, under the %.0f%% floor", ErrNoSpace, freeMeta, u.MetadataBytes, p.cfg.MinFreeMetadataPercent)
	}
	if p.cfg.OverprovisionRatio >= 0 && float64(u.ProvisionedBytes+sizeBytes) > float64(u.DataBytes)*p.cfg.OverprovisionRatio {
		return fmt.Errorf("%w: %d bytes provisioned plus %d would pass %.1f times the %d-byte pool", ErrNoSpace, u.ProvisionedBytes, sizeBytes, p.cfg.OverprovisionRatio, u.DataBytes)
	}
	return nil
}
