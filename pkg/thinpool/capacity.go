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
// the records' sums. It takes no lock of the pool: a change in progress
// holds p.mu across its kernel messages and commits (a snapshot's while
// its origin is suspended), and the metrics and GetCapacity that ask this
// must not wait for it. The sums are those of the last change recorded,
// the status the kernel's at the call; the two may straddle one change.
func (p *Pool) Usage() (Usage, error) {
	v := p.view.Load()
	if v == nil || v.closed {
		return Usage{}, ErrClosed
	}
	return p.usageOf(v)
}

// usage is Usage for a caller that holds p.mu.
func (p *Pool) usage() (Usage, error) { return p.usageOf(p.currentView()) }

// usageView is what a Usage reads besides the kernel's status.
type usageView struct {
	sums         recSums
	fenced       string
	closed       bool
	blockSectors uint32
}

// currentView is the view of the pool as memory has it now. The caller
// holds p.mu.
func (p *Pool) currentView() *usageView {
	v := &usageView{sums: p.sums, closed: p.closed, blockSectors: p.rec.BlockSectors}
	if p.fenced != nil {
		v.fenced = p.fenced.Error()
	}
	return v
}

// publish makes the current view Usage's, after a change of the records'
// sums, the fence or the pool's closing; during a recovery, unfence
// publishes its outcome instead. The caller holds p.mu.
func (p *Pool) publish() {
	if !p.recovering {
		p.view.Store(p.currentView())
	}
}

// recSums are the records' counts and sizes that Usage reports.
type recSums struct {
	volumes, snapshots, templates   int
	provisionedBytes, templateBytes int64
}

// add counts v in (sign 1) or out (sign -1).
func (s *recSums) add(v *Volume, sign int) {
	switch v.Kind {
	case KindTemplate:
		s.templates += sign
		s.templateBytes += int64(sign) * v.SizeBytes
		return
	case KindSnapshot:
		s.snapshots += sign
	default:
		s.volumes += sign
	}
	s.provisionedBytes += int64(sign) * v.SizeBytes
}

func sumsOf(vols map[string]*Volume) recSums {
	var s recSums
	for _, v := range vols {
		s.add(v, 1)
	}
	return s
}

// putVol sets a volume's record in memory (after the records have it).
// The caller holds p.mu, as for removeVol and setVols.
func (p *Pool) putVol(v *Volume) {
	if old := p.vols[v.Name]; old != nil {
		p.sums.add(old, -1)
	}
	p.vols[v.Name] = v
	p.sums.add(v, 1)
	p.publish()
}

func (p *Pool) removeVol(name string) {
	if old := p.vols[name]; old != nil {
		p.sums.add(old, -1)
		delete(p.vols, name)
		p.publish()
	}
}

func (p *Pool) setVols(vols map[string]*Volume) {
	p.vols, p.sums = vols, sumsOf(vols)
	p.publish()
}

func (p *Pool) usageOf(view *usageView) (Usage, error) {
	ps, err := p.poolStatus()
	if err != nil {
		return Usage{}, err
	}
	s := view.sums
	u := Usage{
		OverprovisionRatio: p.cfg.OverprovisionRatio, MinFreeDataPercent: p.cfg.MinFreeDataPercent, MinFreeMetadataPercent: p.cfg.MinFreeMetadataPercent,
		Failed: ps.Fail || ps.Error, TransactionID: ps.TransactionID, Mode: Mode(ps.Mode), NeedsCheck: ps.NeedsCheck,
		Fenced:  view.fenced,
		Volumes: s.volumes, Snapshots: s.snapshots, Templates: s.templates,
		ProvisionedBytes: s.provisionedBytes, TemplateBytes: s.templateBytes,
	}
	if u.Failed {
		return u, nil
	}
	block := int64(view.blockSectors) * devmapper.SectorSize
	u.DataBytes, u.DataUsedBytes = int64(ps.TotalDataBlocks)*block, int64(ps.UsedDataBlocks)*block
	meta := int64(devmapper.MetadataBlockSectors) * devmapper.SectorSize
	u.MetadataBytes, u.MetadataUsedBytes = int64(ps.TotalMetadataBlocks)*meta, int64(ps.UsedMetadataBlocks)*meta

	u.AvailableBytes = u.available()
	return u, nil
}
