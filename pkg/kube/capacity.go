package kube

import (
	"context"
	"errors"
	"time"

	storagev1 "k8s.io/api/storage/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/client-go/kubernetes"
	"k8s.io/klog/v2"

	"github.com/csi-dmthin/csi-dmthin/pkg/csi"
)

// The CSIStorageCapacity objects of this node are the external-provisioner's:
// it polls GetCapacity every --capacity-poll-interval (a minute) and writes
// what changed. A pool that fills, fails or grows between two polls would
// go on attracting (or repelling) new volumes for up to that long, so when
// a pool's kernel raises an event the driver writes the new capacity into
// the same objects at once. The provisioner takes the new revision as its
// own (it compares values, not writers) and writes nothing at its next poll
// when it reads the same capacity; the objects' labels and owners stay as
// it made them.

// Labels the external-provisioner puts on its CSIStorageCapacity objects.
const (
	capacityDriverLabel    = "csi.storage.k8s.io/drivername"
	capacityManagedByLabel = "csi.storage.k8s.io/managed-by"
)

// capacityMinInterval is the least time between two refreshes.
const capacityMinInterval = time.Second

// CapacitySource answers GetCapacity for a StorageClass's parameters on
// this node: the available bytes, and the largest volume (nil: no limit).
type CapacitySource interface {
	Capacity(ctx context.Context, params map[string]string) (available int64, maximum *int64, err error)
}

// CapacityRefresher rewrites this node's CSIStorageCapacity objects when
// Wake is called.
type CapacityRefresher struct {
	client                  kubernetes.Interface
	namespace, driver, node string
	src                     CapacitySource
	wake                    *waker
	last                    time.Time
	now                     func() time.Time
	refreshed               func(updated int) // test hook; may be nil
}

// NewCapacityRefresher refreshes the objects the node's external-provisioner
// keeps in namespace for driver.
func NewCapacityRefresher(client kubernetes.Interface, namespace, driver, node string, src CapacitySource) (*CapacityRefresher, error) {
	if client == nil || namespace == "" || driver == "" || node == "" || src == nil {
		return nil, errors.New("capacity refresher: a client, namespace, driver, node and source are required")
	}
	return &CapacityRefresher{client: client, namespace: namespace, driver: driver, node: node, src: src, wake: newWaker(), now: time.Now}, nil
}

// Wake asks for a refresh: a pool's capacity changed. It never blocks;
// wakes close together make one refresh.
func (r *CapacityRefresher) Wake(pool string) { r.wake.wake(pool) }

// Run refreshes after each Wake, at most once a second, until ctx is done.
func (r *CapacityRefresher) Run(ctx context.Context) {
	logger := klog.FromContext(ctx).WithValues("controller", "capacity")
	ctx = klog.NewContext(ctx, logger)
	for {
		select {
		case <-ctx.Done():
			return
		case <-r.wake.c:
		}
		if wait := capacityMinInterval - r.now().Sub(r.last); wait > 0 {
			select {
			case <-ctx.Done():
				return
			case <-time.After(wait):
			}
		}
		pools := r.wake.take()
		r.last = r.now()
		n, err := r.Refresh(ctx)
		if err != nil && ctx.Err() == nil {
			logger.Error(err, "Refreshing this node's CSIStorageCapacity objects failed; the provisioner's next poll will", "pools", pools)
		} else if n > 0 {
			logger.V(2).Info("Refreshed CSIStorageCapacity after a pool event", "updated", n, "pools", pools)
		}
		if r.refreshed != nil {
			r.refreshed(n)
		}
	}
}

// Refresh writes the current capacity into this node's objects whose value
// differs, and returns how many it updated.
func (r *CapacityRefresher) Refresh(ctx context.Context) (int, error) {
	sel := labels.Set{capacityDriverLabel: r.driver}
	// The provisioner's own label for this node, when it is the plain
	// form: the list then holds this node's objects only.
	if id := "external-provisioner-" + r.node; len(id) <= 63 {
		sel[capacityManagedByLabel] = id
	}
	list, err := r.client.StorageV1().CSIStorageCapacities(r.namespace).List(ctx, metav1.ListOptions{LabelSelector: sel.String()})
	if err != nil {
		return 0, err
	}
	classes := map[string]*storagev1.StorageClass{}
	updated := 0
	var errs []error
	for i := range list.Items {
		c := &list.Items[i]
		if !r.ours(c) {
			continue
		}
		sc, ok := classes[c.StorageClassName]
		if !ok {
			sc, err = r.client.StorageV1().StorageClasses().Get(ctx, c.StorageClassName, metav1.GetOptions{})
			if apierrors.IsNotFound(err) {
				sc = nil // the provisioner deletes the object
			} else if err != nil {
				errs = append(errs, err)
				continue
			}
			classes[c.StorageClassName] = sc
		}
		if sc == nil {
			continue
		}
		avail, maxSize, err := r.src.Capacity(ctx, sc.Parameters)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		want := resource.NewQuantity(avail, resource.BinarySI)
		var wantMax *resource.Quantity
		if maxSize != nil {
			wantMax = resource.NewQuantity(*maxSize, resource.BinarySI)
		}
		if c.Capacity != nil && c.Capacity.Value() == avail && sameQuantity(c.MaximumVolumeSize, wantMax) {
			continue
		}
		u := c.DeepCopy()
		u.Capacity, u.MaximumVolumeSize = want, wantMax
		_, err = r.client.StorageV1().CSIStorageCapacities(r.namespace).Update(ctx, u, metav1.UpdateOptions{FieldManager: Component})
		switch {
		case apierrors.IsConflict(err), apierrors.IsNotFound(err):
			// The provisioner wrote or removed it meanwhile: its value is
			// as new as ours.
		case err != nil:
			errs = append(errs, err)
		default:
			updated++
		}
	}
	return updated, errors.Join(errs...)
}

// ours reports an object for this node's topology segment.
func (r *CapacityRefresher) ours(c *storagev1.CSIStorageCapacity) bool {
	t := c.NodeTopology
	return t != nil && len(t.MatchExpressions) == 0 && len(t.MatchLabels) == 1 && t.MatchLabels[csi.TopologyKey] == r.node
}

func sameQuantity(a, b *resource.Quantity) bool {
	if a == nil || b == nil {
		return a == b
	}
	return a.Cmp(*b) == 0
}
