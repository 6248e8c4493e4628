package csi

import (
	"context"

	csipb "github.com/container-storage-interface/spec/lib/go/csi"

	"github.com/csi-dmthin/csi-dmthin/pkg/thinpool"
)

// A thin volume's health is its pool's: the pool failing, turning read-only
// (needs_check) or running out of data space is what can go wrong with it.
// CSI 1.13 reports this through the volume-health RPCs.

func entry(s csipb.VolumeHealthErrorType, reason, msg string) *csipb.VolumeHealth_VolumeHealthEntry {
	return &csipb.VolumeHealth_VolumeHealthEntry{Status: s, Reason: reason, Message: msg}
}

// poolHealth returns the health entries every volume of the pool shares;
// none when all is well.
func poolHealth(p Pool) []*csipb.VolumeHealth_VolumeHealthEntry {
	u, err := p.Usage()
	switch {
	case err != nil:
		return []*csipb.VolumeHealth_VolumeHealthEntry{entry(csipb.VolumeHealthErrorType_INACCESSIBLE, "PoolStatusUnreadable", err.Error())}
	case u.Fenced != "":
		return []*csipb.VolumeHealth_VolumeHealthEntry{entry(csipb.VolumeHealthErrorType_DEGRADED, "PoolFenced", "a step of a change failed and the pool refuses changes until it has recovered (each later call retries): "+u.Fenced)}
	case u.Failed:
		return []*csipb.VolumeHealth_VolumeHealthEntry{entry(csipb.VolumeHealthErrorType_INACCESSIBLE, "PoolFailed", "the thin pool has failed; repair it with thin_check/thin_repair")}
	case u.NeedsCheck:
		return []*csipb.VolumeHealth_VolumeHealthEntry{entry(csipb.VolumeHealthErrorType_DEGRADED, "PoolNeedsCheck", "the thin pool's metadata needs a check (thin_check); the pool is read-only")}
	case u.Mode == thinpool.ModeReadOnly:
		return []*csipb.VolumeHealth_VolumeHealthEntry{entry(csipb.VolumeHealthErrorType_DEGRADED, "PoolReadOnly", "the thin pool is read-only")}
	case u.Mode == thinpool.ModeOutOfDataSpace:
		return []*csipb.VolumeHealth_VolumeHealthEntry{entry(csipb.VolumeHealthErrorType_DEGRADED, "PoolOutOfDataSpace", "the thin pool is out of data space: writes to unallocated blocks fail")}
	}
	return nil
}

func (d *Driver) ControllerGetVolumeHealth(ctx context.Context, req *csipb.ControllerGetVolumeHealthRequest) (*csipb.ControllerGetVolumeHealthResponse, error) {
	id, err := d.mustParseID("volume_id", req.GetVolumeId())
	if err != nil {
		return nil, err
	}
	if _, err := d.getVolume(id); err != nil {
		return nil, err
	}
	pool, _ := d.pool(id.pool)
	return &csipb.ControllerGetVolumeHealthResponse{VolumeHealth: &csipb.VolumeHealth{VolumeId: id.String(), HealthStatuses: poolHealth(pool)}}, nil
}

func (d *Driver) ControllerListVolumeHealth(ctx context.Context, req *csipb.ControllerListVolumeHealthRequest) (*csipb.ControllerListVolumeHealthResponse, error) {
	items, next, err := page(d.all("volume"), req.GetStartingToken(), req.GetMaxEntries())
	if err != nil {
		return nil, err
	}
	resp := &csipb.ControllerListVolumeHealthResponse{NextToken: next}
	health := map[string][]*csipb.VolumeHealth_VolumeHealthEntry{}
	for _, it := range items {
		h, ok := health[it.pool.Name()]
		if !ok {
			h = poolHealth(it.pool)
			health[it.pool.Name()] = h
		}
		resp.Entries = append(resp.Entries, &csipb.VolumeHealth{VolumeId: objectID{pool: it.pool.Name(), name: it.v.Name}.String(), HealthStatuses: h})
	}
	return resp, nil
}
