package thinpooltest

import (
	"context"

	"github.com/csi-dmthin/csi-dmthin/pkg/devmapper"
)

// wakeWaiters wakes every WaitEvent. The caller holds f.mu.
func (f *FakeKernel) wakeWaiters() {
	close(f.events)
	f.events = make(chan struct{})
}

// WaitEvent implements thinpool.EventWaiter as *devmapper.Client does: it returns
// the device's info once its event counter differs from eventNr, and
// honours ctx. ENXIO (from Info) when the device is gone.
func (f *FakeKernel) WaitEvent(ctx context.Context, dev devmapper.Dev, eventNr uint32) (devmapper.DeviceInfo, error) {
	for {
		f.mu.Lock()
		wake := f.events
		f.mu.Unlock()
		info, err := f.Info(dev)
		if err != nil {
			return devmapper.DeviceInfo{}, err
		}
		if info.EventNr != eventNr {
			return info, nil
		}
		select {
		case <-ctx.Done():
			return devmapper.DeviceInfo{}, ctx.Err()
		case <-wake:
		}
	}
}
