package kube

import (
	"context"
	"errors"
	"sync"
	"testing"
	"time"

	storagev1 "k8s.io/api/storage/v1"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes/fake"

	"github.com/csi-dmthin/csi-dmthin/pkg/csi"
)

// capacities answers GetCapacity by the StorageClass's pool parameter.
type capacities struct {
	mu    sync.Mutex
	bytes map[string]int64
	calls int
}

func (c *capacities) Capacity(_ context.Context, params map[string]string) (int64, *int64, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.calls++
	b, ok := c.bytes[params["pool"]]
	if !ok {
		return 0, nil, errors.New("no such pool")
	}
	return b, &b, nil
}

func (c *capacities) set(pool string, b int64) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.bytes[pool] = b
}

// csc is an object as the external-provisioner on node makes it.
func csc(name, class, node string, bytes int64) *storagev1.CSIStorageCapacity {
	q := resource.NewQuantity(bytes, resource.BinarySI)
	return &storagev1.CSIStorageCapacity{
		ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: "kube-system", Labels: map[string]string{
			capacityDriverLabel: driverName, capacityManagedByLabel: "external-provisioner-" + node,
		}},
		StorageClassName: class,
		NodeTopology:     &metav1.LabelSelector{MatchLabels: map[string]string{csi.TopologyKey: node}},
		Capacity:         q, MaximumVolumeSize: q,
	}
}

func TestCapacityRefresher(t *testing.T) {
	ctx := context.Background()
	client := fake.NewClientset(
		&storagev1.StorageClass{ObjectMeta: metav1.ObjectMeta{Name: "fast"}, Provisioner: driverName, Parameters: map[string]string{"pool": "fast"}},
		&storagev1.StorageClass{ObjectMeta: metav1.ObjectMeta{Name: "slow"}, Provisioner: driverName, Parameters: map[string]string{"pool": "slow"}},
		csc("csisc-1", "fast", nodeA, 10<<30),
		csc("csisc-2", "slow", nodeA, 5<<30),
		csc("csisc-3", "fast", nodeB, 10<<30), // another node's
		csc("csisc-4", "gone", nodeA, 1<<30),  // a class that is gone
	)
	src := &capacities{bytes: map[string]int64{"fast": 10 << 30, "slow": 5 << 30}}
	r, err := NewCapacityRefresher(client, "kube-system", driverName, nodeA, src)
	if err != nil {
		t.Fatal(err)
	}
	get := func(name string) *storagev1.CSIStorageCapacity {
		c, err := client.StorageV1().CSIStorageCapacities("kube-system").Get(ctx, name, metav1.GetOptions{})
		if err != nil {
			t.Fatal(err)
		}
		return c
	}
	// Nothing changed: nothing written.
	if n, err := r.Refresh(ctx); err != nil || n != 0 {
		t.Fatalf("refresh with nothing changed: %d updated, %v", n, err)
	}
	src.set("fast", 0) // the pool filled
	if n, err := r.Refresh(ctx); err != nil || n != 1 {
		t.Fatalf("refresh after the pool filled: %d updated, %v", n, err)
	}
	if c := get("csisc-1"); c.Capacity.Value() != 0 || c.MaximumVolumeSize.Value() != 0 || c.Labels[capacityManagedByLabel] != "external-provisioner-"+nodeA {
		t.Errorf("this node's object: %+v", c)
	}
	if c := get("csisc-3"); c.Capacity.Value() != 10<<30 {
		t.Errorf("another node's object was changed: %v", c.Capacity)
	}
	if c := get("csisc-2"); c.Capacity.Value() != 5<<30 {
		t.Errorf("an unchanged pool's object: %v", c.Capacity)
	}

	// Run refreshes on Wake, at once.
	refreshed := make(chan int, 4)
	r.refreshed = func(n int) { refreshed <- n }
	runCtx, cancel := context.WithCancel(ctx)
	done := make(chan struct{})
	go func() { r.Run(runCtx); close(done) }()
	src.set("fast", 20<<30) // grown
	start := time.Now()
	r.Wake("fast")
	select {
	case n := <-refreshed:
		if n != 1 || get("csisc-1").Capacity.Value() != 20<<30 {
			t.Fatalf("after the wake: %d updated, %v", n, get("csisc-1").Capacity)
		}
		t.Logf("CSIStorageCapacity refreshed %v after the wake", time.Since(start))
	case <-time.After(5 * time.Second):
		t.Fatal("no refresh after the wake")
	}
	cancel()
	<-done
}
