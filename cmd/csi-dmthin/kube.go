package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"time"

	csipb "github.com/container-storage-interface/spec/lib/go/csi"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"
	"k8s.io/client-go/tools/record"
	"k8s.io/klog/v2"

	"github.com/csi-dmthin/csi-dmthin/pkg/blockcopy"
	"github.com/csi-dmthin/csi-dmthin/pkg/csi"
	"github.com/csi-dmthin/csi-dmthin/pkg/kube"
	"github.com/csi-dmthin/csi-dmthin/pkg/kube/registration"
)

// kubeFlags are the serve flags of the Kubernetes side. The Helm chart
// passes them by these names.
type kubeFlags struct {
	registrationDir   string
	kubeletEndpoint   string
	kubeAPI           bool
	kubeconfig        string
	poolFullPercent   float64
	poolCheckInterval time.Duration
	thinPools         bool
	thinPoolInterval  time.Duration
	capacityNamespace string
}

func addKubeFlags(fs *flag.FlagSet) *kubeFlags {
	k := &kubeFlags{}
	fs.StringVar(&k.registrationDir, "registration-dir", "", "the kubelet's plugin registration directory (such as /var/lib/kubelet/plugins_registry); when set, the driver registers itself with the kubelet there; empty turns it off")
	fs.StringVar(&k.kubeletEndpoint, "kubelet-endpoint", "", "the CSI socket's path as the kubelet sees it, told to the kubelet at registration (default <kubelet-dir>/plugins/<driver-name>/csi.sock)")
	fs.BoolVar(&k.kubeAPI, "kube-api", false, "talk to the Kubernetes API: Events, ThinPool objects and this node's CSIStorageCapacity values (the cluster-level decisions are `csi-dmthin controller`'s)")
	fs.StringVar(&k.kubeconfig, "kubeconfig", "", "kubeconfig file for --kube-api (default: the in-cluster service account)")
	fs.Float64Var(&k.poolFullPercent, "pool-full-percent", 90, "with --kube-api, warn on the Node when a pool's data or metadata use reaches this percentage")
	fs.DurationVar(&k.poolCheckInterval, "pool-check-interval", 30*time.Second, "how often pools are checked (Events, ThinPool status, autoExtend) besides at once on the kernel's events")
	fs.BoolVar(&k.thinPools, "thinpools", true, "with --kube-api, keep a ThinPool object per pool (kubectl get thinpools) when its CRD (dmthin.io/v1alpha1) is installed")
	fs.DurationVar(&k.thinPoolInterval, "thinpool-min-interval", time.Minute, "with --thinpools, the least time between two writes of a pool's ThinPool status when only its use changed; state changes are written at once")
	fs.StringVar(&k.capacityNamespace, "capacity-namespace", os.Getenv("NAMESPACE"), "with --kube-api, the namespace of this node's CSIStorageCapacity objects (the provisioner's NAMESPACE): they are rewritten at once when a pool's kernel raises an event; empty turns it off (default $NAMESPACE)")
	return k
}

// kubeSide is what runs beside the CSI server for Kubernetes: the kubelet
// registration socket and, with --kube-api, what reports on this node's
// pools (Events, ThinPools, capacity) and the no-space Events on PVCs. It
// reads and writes only objects of this node, and watches nothing: the
// cluster-level decisions are the controller's (controller.go).
type kubeSide struct {
	flags            *kubeFlags
	driverName, node string

	reg *registration.Server // nil: not registering

	// With --kube-api:
	client       kubernetes.Interface
	dyn          dynamic.Interface // nil without the ThinPool API or --thinpools
	recorder     record.EventRecorder
	stopRecorder func()
	sink         *kube.PVCEvents
	// copyEndpoint, when set before start, is published in the ThinPools.
	copyEndpoint *blockcopy.Endpoint

	cancel   context.CancelFunc
	wg       sync.WaitGroup
	stopOnce sync.Once
}

// newKubeSide checks the flags and, with --kube-api, connects. Nothing
// runs until start.
func newKubeSide(ctx context.Context, f *kubeFlags, driverName, kubeletDir, node string) (*kubeSide, error) {
	if f.poolFullPercent <= 0 || f.poolFullPercent > 100 {
		return nil, fmt.Errorf("--pool-full-percent=%v: want more than 0 and at most 100", f.poolFullPercent)
	}
	if f.poolCheckInterval <= 0 {
		return nil, fmt.Errorf("--pool-check-interval=%v: want a positive duration", f.poolCheckInterval)
	}
	if f.thinPoolInterval < 0 {
		return nil, fmt.Errorf("--thinpool-min-interval=%v: want a positive duration", f.thinPoolInterval)
	}
	if f.kubeconfig != "" && !f.kubeAPI {
		return nil, errors.New("--kubeconfig needs --kube-api")
	}
	if f.kubeletEndpoint == "" {
		f.kubeletEndpoint = filepath.Join(kubeletDir, "plugins", driverName, "csi.sock")
	}
	k := &kubeSide{flags: f, driverName: driverName, node: node}
	if f.registrationDir != "" {
		reg, err := registration.New(driverName, f.kubeletEndpoint)
		if err != nil {
			return nil, err
		}
		k.reg = reg
	}
	if !f.kubeAPI {
		return k, nil
	}
	cfg, err := restConfig(f.kubeconfig)
	if err != nil {
		return nil, err
	}
	cfg.UserAgent = "csi-dmthin/" + version
	if k.client, err = kubernetes.NewForConfig(cfg); err != nil {
		return nil, fmt.Errorf("kubernetes client: %w", err)
	}
	if f.thinPools {
		if k.dyn, err = thinPoolClient(cfg, k.client, "no ThinPool objects are kept until the driver restarts after it is"); err != nil {
			return nil, err
		}
	}
	k.recorder, k.stopRecorder = kube.NewRecorder(ctx, k.client, kube.Component, node)
	k.sink = kube.NewPVCEvents(k.recorder, k.client)
	return k, nil
}

func restConfig(kubeconfig string) (*rest.Config, error) {
	if kubeconfig != "" {
		cfg, err := clientcmd.BuildConfigFromFlags("", kubeconfig)
		if err != nil {
			return nil, fmt.Errorf("--kubeconfig: %w", err)
		}
		return cfg, nil
	}
	cfg, err := rest.InClusterConfig()
	if err != nil {
		return nil, fmt.Errorf("--kube-api without --kubeconfig needs to run in a pod: %w", err)
	}
	return cfg, nil
}

// hasSnapshotAPI reports whether the VolumeSnapshot CRDs are installed: the
// informers would wait forever for a resource that does not exist.
func hasSnapshotAPI(client kubernetes.Interface) (bool, error) {
	return hasAPI(client, "snapshot.storage.k8s.io/v1", "volumesnapshots", "volumesnapshotcontents")
}

// hasAPI reports whether the API server serves every one of resources in
// groupVersion.
func hasAPI(client kubernetes.Interface, groupVersion string, resources ...string) (bool, error) {
	rl, err := client.Discovery().ServerResourcesForGroupVersion(groupVersion)
	if apierrors.IsNotFound(err) {
		return false, nil
	}
	if err != nil {
		return false, fmt.Errorf("looking for the %s API: %w", groupVersion, err)
	}
	var names []string
	for _, r := range rl.APIResources {
		names = append(names, r.Name)
	}
	for _, r := range resources {
		if !slices.Contains(names, r) {
			return false, nil
		}
	}
	return true, nil
}

// thinPoolClient returns a dynamic client for the ThinPool resource, or nil
// (and logs what is lost, without) when its CRD is not installed.
func thinPoolClient(cfg *rest.Config, client kubernetes.Interface, without string) (dynamic.Interface, error) {
	has, err := hasAPI(client, kube.ThinPoolGVR.GroupVersion().String(), kube.ThinPoolGVR.Resource)
	if err != nil || !has {
		if err == nil {
			klog.InfoS("The ThinPool API (" + kube.ThinPoolGVR.GroupVersion().String() + ") is not installed: " + without)
		}
		return nil, err
	}
	dyn, err := dynamic.NewForConfig(cfg)
	if err != nil {
		return nil, fmt.Errorf("dynamic client: %w", err)
	}
	return dyn, nil
}

// driverCapacity is the driver's GetCapacity as kube.CapacitySource.
type driverCapacity struct {
	d    *csi.Driver
	node string
}

func (c driverCapacity) Capacity(ctx context.Context, params map[string]string) (int64, *int64, error) {
	resp, err := c.d.GetCapacity(ctx, &csipb.GetCapacityRequest{
		Parameters:         params,
		AccessibleTopology: &csipb.Topology{Segments: map[string]string{csi.TopologyKey: c.node}},
	})
	if err != nil {
		return 0, nil, err
	}
	var maxSize *int64
	if m := resp.GetMaximumVolumeSize(); m != nil {
		v := m.GetValue()
		maxSize = &v
	}
	return resp.GetAvailableCapacity(), maxSize, nil
}

// eventSink is the driver's csi.EventSink: nil (a nil interface, not a nil
// pointer in one) without --kube-api.
func (k *kubeSide) eventSink() csi.EventSink {
	if k.sink == nil {
		return nil
	}
	return k.sink
}

// start runs everything in the background until stop; a failure that
// should end the process goes to fail. What reports on the pools listens
// to mon, which wakes it on the pools' kernel events.
func (k *kubeSide) start(ctx context.Context, d *csi.Driver, pools map[string]kube.UsageSource, recorded []string, mon *poolMonitor, fail func(error)) error {
	ctx, k.cancel = context.WithCancel(ctx)
	if k.reg != nil {
		k.wg.Add(1)
		go func() {
			defer k.wg.Done()
			if err := k.reg.Serve(k.flags.registrationDir); err != nil {
				fail(fmt.Errorf("kubelet registration: %w", err))
			}
		}()
	}
	if k.client == nil {
		return nil
	}
	watcher := kube.NewPoolWatcher(k.node, pools, k.flags.poolFullPercent, k.recorder)
	mon.listen(func(pool string, _ bool) { watcher.Wake(pool) })
	k.wg.Add(1)
	go func() {
		defer k.wg.Done()
		watcher.Run(ctx, k.flags.poolCheckInterval)
	}()
	if k.dyn != nil {
		var unconfigured []string
		for _, n := range recorded {
			if _, ok := pools[n]; !ok {
				unconfigured = append(unconfigured, n)
			}
		}
		w, err := kube.NewThinPoolWriter(kube.ThinPoolWriterOptions{
			Client: k.dyn, Core: k.client, Driver: k.driverName, Node: k.node, Version: version,
			Pools: pools, Unconfigured: unconfigured, MinInterval: k.flags.thinPoolInterval,
			CopyEndpoint: k.copyEndpoint,
		})
		if err != nil {
			return err
		}
		mon.listen(w.Wake)
		k.wg.Add(1)
		go func() {
			defer k.wg.Done()
			w.Run(ctx, k.flags.poolCheckInterval)
		}()
	}
	if k.flags.capacityNamespace != "" {
		r, err := kube.NewCapacityRefresher(k.client, k.flags.capacityNamespace, k.driverName, k.node, driverCapacity{d: d, node: k.node})
		if err != nil {
			return err
		}
		mon.listen(func(pool string, _ bool) { r.Wake(pool) })
		k.wg.Add(1)
		go func() {
			defer k.wg.Done()
			r.Run(ctx)
		}()
	}
	return nil
}

// healthy fails when the kubelet refused our registration.
func (k *kubeSide) healthy() error {
	if k == nil || k.reg == nil {
		return nil
	}
	return k.reg.Healthy()
}

// deregister removes the registration socket, so the kubelet stops
// calling the driver. Safe to call more than once, and before start.
func (k *kubeSide) deregister() {
	if k != nil && k.reg != nil {
		k.reg.Stop()
	}
}

// stop removes the registration socket (the kubelet then deregisters the
// driver), stops the controllers and flushes what it can. Safe to call
// more than once, and before start.
func (k *kubeSide) stop() {
	if k == nil {
		return
	}
	k.stopOnce.Do(func() {
		if k.reg != nil {
			k.reg.Stop()
		}
		if k.cancel != nil {
			k.cancel()
		}
		k.wg.Wait()
		if k.stopRecorder != nil {
			k.stopRecorder()
		}
	})
}
