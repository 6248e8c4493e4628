package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"net/http"
	"os"
	"os/signal"
	"sort"
	"sync"
	"syscall"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"google.golang.org/grpc"
	"k8s.io/klog/v2"

	"github.com/csi-dmthin/csi-dmthin/pkg/csi"
	"github.com/csi-dmthin/csi-dmthin/pkg/kube"
	"github.com/csi-dmthin/csi-dmthin/pkg/thinpool"
)

const (
	defaultStateDir = "/var/lib/csi-dmthin"
	reapInterval    = time.Minute
)

func serve(args []string) error {
	fs := flag.NewFlagSet("serve", flag.ContinueOnError)
	klog.InitFlags(fs)
	endpoint := fs.String("endpoint", "unix:///csi/csi.sock", "CSI endpoint (unix socket)")
	nodeID := fs.String("node-id", os.Getenv("NODE_NAME"), "this node's name (default $NODE_NAME)")
	driverName := fs.String("driver-name", csi.DefaultDriverName, "CSI driver name")
	config := fs.String("config", "/etc/csi-dmthin/pools.yaml", "pools configuration file")
	stateDir := fs.String("state-dir", defaultStateDir, "where pool records live (not on a pool) and admin.sock")
	kubeletDir := fs.String("kubelet-dir", "/var/lib/kubelet", "kubelet's root directory; nothing outside it is mounted over or removed")
	metricsAddr := fs.String("metrics-address", ":9808", "address for /metrics and /healthz; empty turns it off")
	kf := addKubeFlags(fs)
	if err := fs.Parse(args); err != nil {
		return err
	}
	if *nodeID == "" {
		return errors.New("--node-id (or $NODE_NAME) is required")
	}
	cfgs, defPool, err := loadConfig(*config, *stateDir)
	if err != nil {
		return err
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()

	k, err := thinpool.NewHostKernel()
	if err != nil {
		return fmt.Errorf("device-mapper: %w", err)
	}
	pools := map[string]*thinpool.Pool{}
	defer func() {
		for _, p := range pools {
			p.Close()
		}
	}()
	names := make([]string, 0, len(cfgs))
	for n := range cfgs {
		names = append(names, n)
	}
	sort.Strings(names)
	for _, n := range names {
		start := time.Now()
		p, err := thinpool.Open(ctx, cfgs[n], k)
		if err != nil {
			return err
		}
		pools[n] = p
		u, _ := p.Usage()
		klog.InfoS("Opened pool", "pool", n, "duration", time.Since(start), "volumes", u.Volumes, "snapshots", u.Snapshots, "dataUsedBytes", u.DataUsedBytes, "dataBytes", u.DataBytes)
	}

	reg := prometheus.NewRegistry()
	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	m, err := csi.NewMetrics(reg, func() map[string]csi.UsageSource {
		out := map[string]csi.UsageSource{}
		for n, p := range pools {
			out[n] = p
		}
		return out
	})
	if err != nil {
		return err
	}
	ks, err := newKubeSide(ctx, kf, *driverName, *kubeletDir, *nodeID)
	if err != nil {
		return err
	}
	defer ks.stop()
	drvPools := map[string]csi.Pool{}
	for n, p := range pools {
		drvPools[n] = p
	}
	d, err := csi.New(csi.Options{
		Name: *driverName, Version: version, NodeID: *nodeID,
		Pools: drvPools, DefaultPool: defPool, KubeletDir: *kubeletDir,
		FS: csi.NewHostFS(), Interceptors: []grpc.UnaryServerInterceptor{m.UnaryServerInterceptor()},
		Events: ks.eventSink(),
	})
	if err != nil {
		return err
	}

	var wg sync.WaitGroup
	errc := make(chan error, 5)
	admin, err := startAdmin(adminSocket(*stateDir), pools)
	if err != nil {
		return err
	}
	defer admin.Close()
	var metricsSrv *http.Server
	if *metricsAddr != "" {
		mux := http.NewServeMux()
		mux.Handle("/metrics", csi.Handler(reg))
		mux.HandleFunc("/healthz", func(w http.ResponseWriter, r *http.Request) {
			if _, err := d.Probe(r.Context(), nil); err != nil {
				http.Error(w, err.Error(), http.StatusServiceUnavailable)
				return
			}
			if err := ks.healthy(); err != nil {
				http.Error(w, err.Error(), http.StatusServiceUnavailable)
				return
			}
			fmt.Fprintln(w, "ok")
		})
		metricsSrv = &http.Server{Addr: *metricsAddr, Handler: mux, ReadHeaderTimeout: 10 * time.Second}
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := metricsSrv.ListenAndServe(); err != nil && !errors.Is(err, http.ErrServerClosed) {
				errc <- fmt.Errorf("metrics: %w", err)
			}
		}()
	}
	wg.Add(1)
	go func() {
		defer wg.Done()
		if err := d.Serve(*endpoint); err != nil {
			errc <- fmt.Errorf("csi: %w", err)
		}
	}()
	usage := map[string]kube.UsageSource{}
	for n, p := range pools {
		usage[n] = p
	}
	if err := ks.start(ctx, d, usage, errc); err != nil {
		errc <- fmt.Errorf("kubernetes: %w", err) // shut down below like any failure
	}
	go func() {
		// Deletes that waited for a device's last close.
		t := time.NewTicker(reapInterval)
		defer t.Stop()
		for {
			select {
			case <-ctx.Done():
				return
			case <-t.C:
				for n, p := range pools {
					if err := p.Reap(ctx); err != nil {
						klog.ErrorS(err, "Finishing pending deletes failed", "pool", n)
					}
				}
			}
		}
	}()

	select {
	case <-ctx.Done():
		klog.InfoS("Shutting down: mounted volumes stay mounted and working")
	case err = <-errc:
	}
	// Deregister from the kubelet and stop the controllers; stop taking
	// calls, let the ones in progress finish, then close the pools'
	// records. Devices and mounts are left as they are: the next start
	// takes them over.
	ks.stop()
	d.Stop()
	if metricsSrv != nil {
		sctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		_ = metricsSrv.Shutdown(sctx)
		cancel()
	}
	wg.Wait()
	return err
}
