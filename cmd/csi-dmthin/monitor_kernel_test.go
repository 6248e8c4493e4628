//go:build vmtest

package main

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"golang.org/x/sys/unix"
	storagev1 "k8s.io/api/storage/v1"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
	dynfake "k8s.io/client-go/dynamic/fake"
	"k8s.io/client-go/kubernetes/fake"
	k8stesting "k8s.io/client-go/testing"

	"github.com/csi-dmthin/csi-dmthin/pkg/csi"
	"github.com/csi-dmthin/csi-dmthin/pkg/kube"
	"github.com/csi-dmthin/csi-dmthin/pkg/thinpool"
)

// stamped is a record.EventRecorder that notes when each reason came.
type stamped struct {
	mu  sync.Mutex
	got map[string]time.Time
}

func (s *stamped) Event(_ runtime.Object, _, reason, _ string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if _, ok := s.got[reason]; !ok {
		s.got[reason] = time.Now()
	}
}
func (s *stamped) Eventf(o runtime.Object, t, reason, _ string, _ ...any) { s.Event(o, t, reason, "") }
func (s *stamped) AnnotatedEventf(o runtime.Object, _ map[string]string, t, reason, _ string, _ ...any) {
	s.Event(o, t, reason, "")
}

func (s *stamped) at(reason string) (time.Time, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	t, ok := s.got[reason]
	return t, ok
}

// poolCapacity answers GetCapacity from the pool's usage.
type poolCapacity struct{ p *thinpool.Pool }

func (c poolCapacity) Capacity(context.Context, map[string]string) (int64, *int64, error) {
	u, err := c.p.Usage()
	return u.AvailableBytes, &u.AvailableBytes, err
}

// On the real kernel: a pool passes its low water mark (set, as serve sets
// it by default, where the Node's nearly-full warning is), and the kernel's
// event reaches the metrics, the Node's Event, the ThinPool status and the
// node's CSIStorageCapacity without waiting for a poll (the poll here is an
// hour). Then the pool fills, a write fails, `pool grow` goes through the
// admin socket, and the write succeeds again. The test logs each delay.
func TestMonitorEventsKernel(t *testing.T) {
	k, err := thinpool.NewHostKernel()
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	nc := &nodeConfig{pools: map[string]thinpool.Config{"ev": {
		Name: "ev", StateDir: filepath.Join(dir, "state"),
		DataFile: filepath.Join(dir, "ev.data"), MetadataFile: filepath.Join(dir, "ev.meta"),
		DataFileBytes: 64 << 20, OverprovisionRatio: -1,
	}}}
	defaultLowWater(nc, 90)
	if c := nc.pools["ev"]; c.LowWaterPercent != 10 {
		t.Fatalf("default low water mark %v%%, want 10%%", c.LowWaterPercent)
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	p, err := thinpool.Open(ctx, nc.pools["ev"], k)
	if err != nil {
		t.Fatal(err)
	}
	defer func() {
		for _, v := range p.List() {
			_ = p.Deactivate(context.Background(), v.Name)
			_ = p.Delete(context.Background(), v.Name)
		}
		_ = p.Offline(context.Background())
	}()

	// Everything that listens, as serve wires it.
	mon := newPoolMonitor(map[string]monitoredPool{"ev": p}, nil, time.Hour)
	reg := prometheus.NewRegistry()
	m, err := csi.NewMetrics(reg, func() map[string]csi.UsageSource { return map[string]csi.UsageSource{"ev": p} })
	if err != nil {
		t.Fatal(err)
	}
	var metricAt time.Time
	var mu sync.Mutex
	mon.listen(func(pool string, ev bool) {
		if ev {
			m.PoolEvent(pool, time.Now())
			mu.Lock()
			if metricAt.IsZero() {
				metricAt = time.Now()
			}
			mu.Unlock()
		}
	})
	rec := &stamped{got: map[string]time.Time{}}
	watcher := kube.NewPoolWatcher("node-a", map[string]kube.UsageSource{"ev": p}, 90, rec)
	mon.listen(func(pool string, _ bool) { watcher.Wake(pool) })
	dyn := dynfake.NewSimpleDynamicClientWithCustomListKinds(runtime.NewScheme(), map[schema.GroupVersionResource]string{kube.ThinPoolGVR: "ThinPoolList"})
	var thinPoolEventAt time.Time
	dyn.PrependReactor("patch", "thinpools", func(a k8stesting.Action) (bool, runtime.Object, error) {
		if strings.Contains(string(a.(k8stesting.PatchAction).GetPatch()), `"lastEvent"`) {
			mu.Lock()
			if thinPoolEventAt.IsZero() {
				thinPoolEventAt = time.Now()
			}
			mu.Unlock()
		}
		return false, nil, nil
	})
	w, err := kube.NewThinPoolWriter(kube.ThinPoolWriterOptions{Client: dyn, Driver: csi.DefaultDriverName, Node: "node-a", Pools: map[string]kube.UsageSource{"ev": p}})
	if err != nil {
		t.Fatal(err)
	}
	mon.listen(w.Wake)
	q := resource.MustParse("64Mi")
	core := fake.NewClientset(
		&storagev1.StorageClass{ObjectMeta: metav1.ObjectMeta{Name: "sc"}, Provisioner: csi.DefaultDriverName},
		&storagev1.CSIStorageCapacity{
			ObjectMeta:       metav1.ObjectMeta{Name: "csisc-1", Namespace: "ns", Labels: map[string]string{"csi.storage.k8s.io/drivername": csi.DefaultDriverName, "csi.storage.k8s.io/managed-by": "external-provisioner-node-a"}},
			StorageClassName: "sc", NodeTopology: &metav1.LabelSelector{MatchLabels: map[string]string{csi.TopologyKey: "node-a"}}, Capacity: &q,
		})
	var capacityAt time.Time
	core.PrependReactor("update", "csistoragecapacities", func(k8stesting.Action) (bool, runtime.Object, error) {
		mu.Lock()
		if capacityAt.IsZero() {
			capacityAt = time.Now()
		}
		mu.Unlock()
		return false, nil, nil
	})
	cr, err := kube.NewCapacityRefresher(core, "ns", csi.DefaultDriverName, "node-a", poolCapacity{p})
	if err != nil {
		t.Fatal(err)
	}
	mon.listen(func(pool string, _ bool) { cr.Wake(pool) })
	var wg sync.WaitGroup
	for _, run := range []func(){
		func() { mon.run(ctx) },
		func() { watcher.Run(ctx, time.Hour) },
		func() { w.Run(ctx, time.Hour) },
		func() { cr.Run(ctx) },
	} {
		wg.Add(1)
		go func() { defer wg.Done(); run() }()
	}
	defer func() { cancel(); wg.Wait() }()
	<-mon.ready
	time.Sleep(200 * time.Millisecond) // the first looks, at start

	// Fill to the mark, one 64 KiB block at a time.
	if _, err := p.CreateVolume(ctx, "v", 256<<20); err != nil {
		t.Fatal(err)
	}
	node, err := p.Activate(ctx, "v")
	if err != nil {
		t.Fatal(err)
	}
	f, err := os.OpenFile(node, os.O_WRONLY|unix.O_DIRECT, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	buf, err := unix.Mmap(-1, 0, 64<<10, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_ANON|unix.MAP_PRIVATE)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Munmap(buf)
	for i := range buf {
		buf[i] = byte(i)
	}
	var crossed time.Time
	off := int64(0)
	for ; off < 256<<20; off += int64(len(buf)) {
		if _, err := f.WriteAt(buf, off); err != nil {
			t.Fatalf("write at %d: %v", off, err)
		}
		u, err := p.Usage()
		if err != nil {
			t.Fatal(err)
		}
		// The kernel raises the event in the allocation that finds the
		// free blocks at or under the mark (10% of 1024 blocks: 102),
		// leaving one fewer.
		const block = 64 << 10
		if free, mark := (u.DataBytes-u.DataUsedBytes)/block, u.DataBytes/block*10/100; free < mark {
			crossed = time.Now()
			off += int64(len(buf))
			break
		}
	}
	deadline := time.Now().Add(10 * time.Second)
	for {
		mu.Lock()
		done := !metricAt.IsZero() && !thinPoolEventAt.IsZero() && !capacityAt.IsZero()
		mu.Unlock()
		_, evOK := rec.at(kube.ReasonPoolNearlyFull)
		if done && evOK {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("not everything was told within 10 s: metric %v, ThinPool %v, capacity %v, Event %v", metricAt, thinPoolEventAt, capacityAt, evOK)
		}
		time.Sleep(5 * time.Millisecond)
	}
	evAt, _ := rec.at(kube.ReasonPoolNearlyFull)
	mu.Lock()
	lag := func(at time.Time) time.Duration { return max(at.Sub(crossed), 0) }
	t.Logf("after the write that passed the low water mark (90%% used) returned: metric %v, Node Event %v, ThinPool status %v, CSIStorageCapacity %v",
		lag(metricAt), lag(evAt), lag(thinPoolEventAt), lag(capacityAt))
	for what, at := range map[string]time.Time{"metric": metricAt, "Event": evAt, "ThinPool": thinPoolEventAt, "capacity": capacityAt} {
		if lag(at) > 2*time.Second {
			t.Errorf("the %s followed %v after the event; want within a second or two", what, lag(at))
		}
	}
	mu.Unlock()

	// Fill it; a write fails; pool grow through the admin socket; the
	// write succeeds.
	var failedAt int64 = -1
	for ; off < 256<<20; off += int64(len(buf)) {
		if _, err := f.WriteAt(buf, off); err != nil {
			failedAt = off
			break
		}
	}
	if failedAt < 0 {
		t.Fatal("the pool did not fill")
	}
	sock := adminSocket(filepath.Join(dir, "state"))
	srv, err := listenAdmin(sock, map[string]adminPool{"ev": p}, func(pool string, _ bool) { mon.changed(pool, false) })
	if err != nil {
		t.Fatal(err)
	}
	go srv.serve()
	defer srv.shutdown()
	start := time.Now()
	var g thinpool.Growth
	if err := adminPost(sock, "/pools/ev/grow", growRequest{DataFileSize: "128Mi"}, &g); err != nil {
		t.Fatal(err)
	}
	grown := time.Since(start)
	if _, err := f.WriteAt(buf, failedAt); err != nil {
		t.Fatalf("the write that failed, after pool grow: %v", err)
	}
	t.Logf("pool grow through the admin socket took %v; the write that had failed succeeded %v after it was asked for (data %d -> %d)",
		grown, time.Since(start), g.DataBytesBefore, g.DataBytes)
}
