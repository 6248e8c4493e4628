package kube

import (
	"context"
	"errors"
	"slices"
	"sync"
	"time"

	snapclient "github.com/kubernetes-csi/external-snapshotter/client/v8/clientset/versioned"
	snapinformers "github.com/kubernetes-csi/external-snapshotter/client/v8/informers/externalversions"
	"k8s.io/apimachinery/pkg/api/meta"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/dynamic/dynamicinformer"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/cache"
	"k8s.io/client-go/tools/record"
	"k8s.io/client-go/util/workqueue"
)

// ControllerOptions configure a Controller.
type ControllerOptions struct {
	DriverName string
	Client     kubernetes.Interface
	// Snapshots is nil when the snapshot API is not installed: then only
	// clones are steered, and no content is adopted.
	Snapshots snapclient.Interface
	// GroupSnapshots: the groupsnapshot.storage.k8s.io/v1 API is served.
	GroupSnapshots bool
	// ThinPools is nil when the ThinPool resource is not installed: then
	// room is left to the nodes' own admission.
	ThinPools dynamic.Interface
	Recorder  record.EventRecorder
	// Resync re-delivers every object now and then (so a PVC whose
	// StorageClass appeared after it is looked at again); 0 never does.
	Resync time.Duration
	// RateLimiter paces retries; default exponential, 1s to 5m.
	RateLimiter func() workqueue.TypedRateLimiter[string]
	// CopyAcrossNodes lets a restore whose snapshot's node cannot take it
	// be made on the node the scheduler picks, by a copy
	// (PlacementOptions).
	CopyAcrossNodes bool
}

// Controller makes the cluster-level decisions, once for the cluster (the
// leader of `csi-dmthin controller`'s replicas runs it): placement of
// restores and clones, and the adoption of snapshot and group snapshot
// contents for the node that holds them. Its informers are the only
// cluster-wide ones csi-dmthin keeps; a node's driver keeps none.
type Controller struct {
	core      informers.SharedInformerFactory
	snaps     snapinformers.SharedInformerFactory // nil without the snapshot API
	pools     dynamicinformer.DynamicSharedInformerFactory
	View      *View
	Placement *Placement
	adopter   *Adopter      // nil without the snapshot API
	groups    *GroupAdopter // nil without the group API
}

// NewController sets up the informers and the controllers; Run starts them.
func NewController(o ControllerOptions) (*Controller, error) {
	if o.DriverName == "" || o.Client == nil || o.Recorder == nil {
		return nil, errors.New("kube: the controller needs a driver name, client and recorder")
	}
	if o.GroupSnapshots && o.Snapshots == nil {
		return nil, errors.New("kube: group snapshots need the snapshot client")
	}
	rl := func() workqueue.TypedRateLimiter[string] {
		if o.RateLimiter == nil {
			return nil
		}
		return o.RateLimiter()
	}
	c := &Controller{core: informers.NewSharedInformerFactoryWithOptions(o.Client, o.Resync, informers.WithTransform(dropManagedFields))}
	vo := ViewOptions{DriverName: o.DriverName, Informers: c.core, GroupSnapshots: o.GroupSnapshots}
	if o.Snapshots != nil {
		c.snaps = snapinformers.NewSharedInformerFactoryWithOptions(o.Snapshots, o.Resync, snapinformers.WithTransform(dropManagedFields))
		vo.SnapshotInformers = c.snaps
	}
	if o.ThinPools != nil {
		c.pools = dynamicinformer.NewDynamicSharedInformerFactory(o.ThinPools, o.Resync)
		vo.ThinPools = c.pools
	}
	var err error
	if c.View, err = NewView(vo); err != nil {
		return nil, err
	}
	if c.pools != nil {
		// The dynamic factory takes no transform; its one informer does.
		if err := c.pools.ForResource(ThinPoolGVR).Informer().SetTransform(dropManagedFields); err != nil {
			return nil, err
		}
	}
	if c.Placement, err = NewPlacement(PlacementOptions{DriverName: o.DriverName, Client: o.Client, Recorder: o.Recorder, View: c.View, RateLimiter: rl(), CopyAcrossNodes: o.CopyAcrossNodes}); err != nil {
		return nil, err
	}
	if o.Snapshots != nil {
		if c.adopter, err = NewAdopter(AdopterOptions{DriverName: o.DriverName, Client: o.Snapshots, Recorder: o.Recorder, View: c.View, RateLimiter: rl()}); err != nil {
			return nil, err
		}
	}
	if o.GroupSnapshots {
		if c.groups, err = NewGroupAdopter(GroupAdopterOptions{DriverName: o.DriverName, Client: o.Snapshots, Recorder: o.Recorder, View: c.View, RateLimiter: rl()}); err != nil {
			return nil, err
		}
	}
	return c, nil
}

// dropManagedFields is every informer's transform: it drops an object's
// managedFields before the cache keeps it. No controller reads them, yet
// they are about 30% of a PVC's or PV's bytes as the API server serves
// them (more of a snapshot's), and the caches keep every PVC, PV, snapshot
// and content of the cluster for the controller's life: at 10,000 claims
// the controller keeps 99 MiB instead of 150 (make bench-scale). Placement writes a cached PVC back whole (an
// update) without them, which leaves them as they were: the API server
// resets managedFields only when an update sets them to one empty entry,
// never when it omits them.
func dropManagedFields(obj any) (any, error) {
	if m, err := meta.Accessor(obj); err == nil {
		m.SetManagedFields(nil)
	}
	return obj, nil
}

// Run starts the informers and runs the controllers until ctx is done or
// one fails; placement gets workers goroutines, the adopters one each.
func (c *Controller) Run(ctx context.Context, workers int) error {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	c.start(ctx)
	defer func() {
		cancel()
		c.core.Shutdown()
		if c.snaps != nil {
			c.snaps.Shutdown()
		}
		if c.pools != nil {
			c.pools.Shutdown()
		}
	}()
	var (
		wg    sync.WaitGroup
		mu    sync.Mutex
		first error
	)
	run := func(f func(context.Context, int) error, n int) {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := f(ctx, n); err != nil && ctx.Err() == nil {
				mu.Lock()
				first = errors.Join(first, err)
				mu.Unlock()
				cancel()
			}
		}()
	}
	run(c.Placement.Run, workers)
	if c.adopter != nil {
		run(c.adopter.Run, 1)
	}
	if c.groups != nil {
		run(c.groups.Run, 1)
	}
	wg.Wait()
	return first
}

// start starts the informers (again: a started one is left running).
func (c *Controller) start(ctx context.Context) {
	c.core.Start(ctx.Done())
	if c.snaps != nil {
		c.snaps.Start(ctx.Done())
	}
	if c.pools != nil {
		c.pools.Start(ctx.Done())
	}
}

// synced is every informer's HasSynced.
func (c *Controller) synced() []cache.InformerSynced {
	out := slices.Clone(c.Placement.synced)
	if c.adopter != nil {
		out = append(out, c.adopter.synced...)
	}
	if c.groups != nil {
		out = append(out, c.groups.synced...)
	}
	return out
}
