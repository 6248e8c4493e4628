package thinpool

import (
	"context"
	"fmt"
	"os"

	"github.com/csi-dmthin/csi-dmthin/pkg/devmapper"
)

// GrowData grows the pool onto a larger data device: after the operator grew
// the device under DataDevice (an LV, a disk), or, for a loop-file pool, to
// dataFileBytes (the file is extended here). The pool's table is reloaded
// with the new length; the kernel extends its free space map on resume. A
// full pool accepts writes and new volumes again once the free space is back
// above the floors. Growing to the current size or less does nothing; the
// metadata device does not grow.
func (p *Pool) GrowData(ctx context.Context, dataFileBytes int64) (Usage, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if err := p.usable(); err != nil {
		return Usage{}, err
	}
	if err := ctx.Err(); err != nil {
		return Usage{}, err
	}
	if p.cfg.DataFile != "" && dataFileBytes > 0 {
		fi, err := os.Stat(p.cfg.DataFile)
		if err != nil {
			return Usage{}, err
		}
		if dataFileBytes > fi.Size() {
			if err := os.Truncate(p.cfg.DataFile, dataFileBytes); err != nil {
				return Usage{}, fmt.Errorf("grow data file: %w", err)
			}
		}
	}
	tbl, err := p.k.Table(p.dev)
	if err != nil {
		return Usage{}, err
	}
	params, err := devmapper.ParseThinPoolParams(tbl[0].Params)
	if err != nil {
		return Usage{}, err
	}
	if err := p.k.RefreshSize(params.DataDev); err != nil {
		return Usage{}, err
	}
	var size int64
	if p.cfg.DataFile != "" {
		fi, err := os.Stat(p.cfg.DataFile)
		if err != nil {
			return Usage{}, err
		}
		size = fi.Size()
	} else if _, size, err = p.k.BlockDevice(p.cfg.DataDevice); err != nil {
		return Usage{}, err
	}
	block := uint64(p.rec.BlockSectors)
	sectors := uint64(size) / devmapper.SectorSize / block * block
	if sectors > tbl[0].LengthSectors {
		p.step("grow-data:refreshed")
		if err := p.k.Load(p.dev, []devmapper.Target{devmapper.NewTarget(0, sectors, params)}); err != nil {
			return Usage{}, fmt.Errorf("reload the pool table: %w", err)
		}
		if err := p.k.Resume(p.dev); err != nil {
			// Suspended with its old table, or with the new one: either way
			// the volumes' I/O waits until the recovery resumes it.
			return Usage{}, p.failed(fmt.Errorf("resume the grown pool: %w", err))
		}
		p.step("grow-data:resumed")
		rec := p.rec
		rec.DataBytes = int64(sectors * devmapper.SectorSize)
		if err := p.st.apply(change{pool: &rec}); err != nil {
			// The kernel has the larger table; Open takes the larger of
			// the device and the record, so nothing is lost.
			return Usage{}, p.failed(p.recordsFailed(err))
		}
		p.rec = rec
	}
	return p.usage()
}
