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
	if p.closed {
		return Usage{}, ErrClosed
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
			return Usage{}, fmt.Errorf("resume the grown pool: %w", err)
		}
		p.rec.DataBytes = int64(sectors * devmapper.SectorSize)
		if err := p.st.apply(change{pool: &p.rec}); err != nil {
			return Usage{}, err
		}
	}
	return p.usage()
}
