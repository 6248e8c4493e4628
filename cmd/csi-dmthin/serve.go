package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"net"
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
	// defaultShutdownTimeout is how long calls in progress get at SIGTERM;
	// it must stay under the pod's terminationGracePeriodSeconds (the
	// chart's 30), which also has to cover the rest of the shutdown.
	defaultShutdownTimeout = 20 * time.Second
)

// serveFlags are serve's flags.
type serveFlags struct {
	endpoint, nodeID, driverName, config, stateDir, kubeletDir, metricsAddr *string
	templates                                                               *int
	shutdownTimeout                                                         *time.Duration
	kube                                                                    *kubeFlags
	copy                                                                    *copyFlags
}

// newServeFlags defines serve's flags (klog's included) on a new set.
func newServeFlags() (*flag.FlagSet, *serveFlags) {
	fs := flag.NewFlagSet("serve", flag.ContinueOnError)
	klog.InitFlags(fs)
	return fs, &serveFlags{
		endpoint:        fs.String("endpoint", "unix:///csi/csi.sock", "CSI endpoint (unix socket)"),
		nodeID:          fs.String("node-id", os.Getenv("NODE_NAME"), "this node's name (default $NODE_NAME)"),
		driverName:      fs.String("driver-name", csi.DefaultDriverName, "CSI driver name"),
		config:          fs.String("config", "/etc/csi-dmthin/pools.yaml", "pools configuration file"),
		stateDir:        fs.String("state-dir", defaultStateDir, "where pool records live (not on a pool), admin.sock and the lock that keeps a second driver off the node"),
		kubeletDir:      fs.String("kubelet-dir", "/var/lib/kubelet", "kubelet's root directory; nothing outside it is mounted over or removed"),
		metricsAddr:     fs.String("metrics-address", ":9808", "address for /metrics, /livez and /healthz; empty turns it off"),
		templates:       fs.Int("templates-per-pool", csi.DefaultTemplates, "formatted templates each pool keeps, so new filesystem volumes need no mkfs; 0 turns them off"),
		shutdownTimeout: fs.Duration("shutdown-timeout", defaultShutdownTimeout, "at SIGTERM, how long calls in progress may take before they are cancelled; keep it well under the pod's terminationGracePeriodSeconds"),
		kube:            addKubeFlags(fs),
		copy:            addCopyFlags(fs),
	}
}

// servedPool is what serve needs of an open pool; *thinpool.Pool is one.
type servedPool interface {
	csi.Pool
	adminPool
	monitoredPool
	ConfiguredGrowth() thinpool.GrowRequest
	Reap(ctx context.Context) error
	Close() error
}

var _ servedPool = (*thinpool.Pool)(nil)

// serveEnv is what serve takes from the host: the real kernel, pools and
// filesystem tools; host tests give it a fake kernel.
type serveEnv struct {
	kernel       func() (thinpool.Kernel, error)
	openPool     func(ctx context.Context, cfg thinpool.Config, k thinpool.Kernel) (servedPool, error)
	fs           csi.FS
	reapInterval time.Duration
	interceptors []grpc.UnaryServerInterceptor // after the metrics one
	serving      func()                        // called once everything runs
}

func hostServeEnv() serveEnv {
	return serveEnv{
		kernel: func() (thinpool.Kernel, error) {
			k, err := thinpool.NewHostKernel()
			if err != nil {
				return nil, err
			}
			return k, nil
		},
		openPool: func(ctx context.Context, cfg thinpool.Config, k thinpool.Kernel) (servedPool, error) {
			p, err := thinpool.Open(ctx, cfg, k)
			if err != nil {
				return nil, err
			}
			return p, nil
		},
		fs:           csi.NewHostFS(),
		reapInterval: reapInterval,
	}
}

func serve(args []string) error {
	fs, f := newServeFlags()
	if err := fs.Parse(args); err != nil {
		return err
	}
	if fs.NArg() != 0 {
		return fmt.Errorf("serve takes flags only, not %q", fs.Args())
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	return run(ctx, f, hostServeEnv())
}

// run serves until ctx is done (SIGTERM) or a part fails, then shuts down
// in this order: no new calls (the kubelet registration goes, the CSI
// server stops accepting); the calls in progress get --shutdown-timeout,
// then are cancelled and awaited; then everything in the background is
// cancelled and joined (the reaper, the Kubernetes side, the metrics and
// admin servers; Shutdown joined the template builds); then the pools
// close; the state directory's lock goes last. Devices and mounts are left
// as they are: the next start takes them over.
func run(ctx context.Context, f *serveFlags, env serveEnv) (err error) {
	if *f.nodeID == "" {
		return errors.New("--node-id (or $NODE_NAME) is required")
	}
	if *f.shutdownTimeout <= 0 {
		return fmt.Errorf("--shutdown-timeout=%v: want a positive duration", *f.shutdownTimeout)
	}
	// The pools file first, every problem at once (as `config check`
	// reports them), before anything on the host is opened.
	nc, err := loadNodeConfig(*f.config, *f.stateDir)
	if err != nil {
		return err
	}
	defaultLowWater(nc, f.kube.poolFullPercent)
	cfgs, defPool := nc.pools, nc.defaultPool
	// Before anything on the host is touched (sockets, /dev/mapper/control,
	// pools): a second driver on this node stops here.
	lock, err := lockStateDir(*f.stateDir)
	if err != nil {
		return err
	}
	defer lock.release() // last of all

	recorded, err := recordedPools(*f.stateDir)
	if err != nil {
		return err
	}
	for _, n := range recorded {
		if _, ok := cfgs[n]; !ok {
			klog.InfoS("A pool recorded on this node is not configured: deletes of its volumes and snapshots are refused until it is", "pool", n)
		}
	}
	k, err := env.kernel()
	if err != nil {
		return fmt.Errorf("device-mapper: %w", err)
	}
	pools := map[string]servedPool{}
	// Deferred before anything that uses the pools starts: it runs after
	// the shutdown below has joined all of it.
	defer closePools(pools)
	names := make([]string, 0, len(cfgs))
	for n := range cfgs {
		names = append(names, n)
	}
	sort.Strings(names)
	var grewAtStart []string
	for _, n := range names {
		start := time.Now()
		p, err := env.openPool(ctx, cfgs[n], k)
		if err != nil {
			return err
		}
		pools[n] = p
		u, _ := p.Usage()
		klog.InfoS("Opened pool", "pool", n, "duration", time.Since(start), "volumes", u.Volumes, "snapshots", u.Snapshots, "dataUsedBytes", u.DataUsedBytes, "dataBytes", u.DataBytes)
		if growAtStart(ctx, n, p) {
			grewAtStart = append(grewAtStart, n)
		}
	}

	// What runs in the background uses bg, not ctx: at SIGTERM it must
	// keep working (Events for the calls that finish) until the CSI server
	// has stopped.
	bg, cancelBG := context.WithCancel(context.Background())
	defer cancelBG()

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
	if err := csi.RegisterBuildInfo(reg, version); err != nil {
		return err
	}
	for _, n := range grewAtStart {
		m.PoolGrown(n, csi.GrowTriggerStartup)
	}
	monPools := map[string]monitoredPool{}
	for n, p := range pools {
		monPools[n] = p
	}
	mon := newPoolMonitor(monPools, nc.autoExtend, f.kube.poolCheckInterval)
	mon.grown = func(pool string) { m.PoolGrown(pool, csi.GrowTriggerAutoExtend) }
	mon.listen(func(pool string, kernelEvent bool) {
		if kernelEvent {
			m.PoolEvent(pool, time.Now())
		}
	})
	ks, err := newKubeSide(bg, f.kube, *f.driverName, *f.kubeletDir, *f.nodeID)
	if err != nil {
		return err
	}
	defer ks.stop() // on the way out of a failed start; a no-op after the shutdown
	cs, copyOpts, err := newCopySide(f.copy, *f.stateDir, ks, reg)
	if err != nil {
		return err
	}
	if cs != nil {
		defer cs.l.Close() // on the way out of a failed start
	}
	drvPools := map[string]csi.Pool{}
	adminPools := map[string]adminPool{}
	usage := map[string]kube.UsageSource{}
	for n, p := range pools {
		drvPools[n], adminPools[n], usage[n] = p, p, p
	}
	d, err := csi.New(csi.Options{
		Name: *f.driverName, Version: version, NodeID: *f.nodeID,
		Pools: drvPools, DefaultPool: defPool, RecordedPools: recorded, KubeletDir: *f.kubeletDir,
		FS: env.fs, Interceptors: append([]grpc.UnaryServerInterceptor{m.UnaryServerInterceptor()}, env.interceptors...),
		Templates: templatesOption(*f.templates),
		Events:    ks.eventSink(),
		Copy:      copyOpts,
	})
	if err != nil {
		return err
	}
	admin, err := listenAdmin(adminSocket(*f.stateDir), adminPools, func(pool string, grew bool) {
		if grew {
			m.PoolGrown(pool, csi.GrowTriggerAdmin)
		}
		mon.changed(pool, false)
	})
	if err != nil {
		return err
	}
	defer admin.shutdown() // likewise
	admin.copies = d.Copies
	var metricsSrv *http.Server
	var metricsL net.Listener
	var metricsCalls gate
	if *f.metricsAddr != "" {
		if metricsL, err = net.Listen("tcp", *f.metricsAddr); err != nil {
			return fmt.Errorf("metrics: %w", err)
		}
		defer metricsL.Close()
		metricsSrv = &http.Server{Handler: metricsCalls.wrap(metricsMux(reg, d, ks)), ReadHeaderTimeout: 10 * time.Second}
	}

	// Nothing below fails before the shutdown; a part that fails later
	// reports to fail, and the first report shuts everything down.
	failc := make(chan error, 1)
	fail := func(err error) {
		select {
		case failc <- err:
		default:
			klog.ErrorS(err, "Failed while shutting down")
		}
	}
	var wg sync.WaitGroup
	goJoined := func(f func()) {
		wg.Add(1)
		go func() {
			defer wg.Done()
			f()
		}()
	}
	goJoined(admin.serve)
	if metricsSrv != nil {
		goJoined(func() {
			if err := metricsSrv.Serve(metricsL); err != nil && !errors.Is(err, http.ErrServerClosed) {
				fail(fmt.Errorf("metrics: %w", err))
			}
		})
	}
	goJoined(func() {
		if err := d.Serve(*f.endpoint); err != nil {
			fail(fmt.Errorf("csi: %w", err))
		}
	})
	if err := ks.start(bg, d, usage, recorded, mon, fail); err != nil {
		fail(fmt.Errorf("kubernetes: %w", err)) // shut down below like any failure
	}
	if cs != nil {
		goJoined(func() {
			if err := cs.serve(d); err != nil {
				fail(fmt.Errorf("copy server: %w", err))
			}
		})
		goJoined(func() { reapCopiesPeriodically(bg, env.reapInterval, d) })
	}
	goJoined(func() { reapPeriodically(bg, env.reapInterval, pools) })
	goJoined(func() { mon.run(bg) })
	if env.serving != nil {
		env.serving()
	}

	select {
	case <-ctx.Done():
		klog.InfoS("Shutting down: mounted volumes stay mounted and working", "shutdownTimeout", *f.shutdownTimeout)
	case err = <-failc:
		klog.ErrorS(err, "Shutting down after a failure")
	}
	start := time.Now()
	ks.deregister()
	sctx, cancel := context.WithTimeout(context.Background(), *f.shutdownTimeout)
	d.Shutdown(sctx)
	cs.shutdown(sctx)
	cancel()
	cancelBG()
	ks.stop()
	admin.shutdown()
	if metricsSrv != nil {
		stopHTTP(metricsSrv, &metricsCalls)
	}
	wg.Wait()
	klog.InfoS("Stopped; closing the pools' records", "duration", time.Since(start))
	return err
}

// metricsMux serves /metrics, /livez and /healthz.
func metricsMux(reg *prometheus.Registry, d *csi.Driver, ks *kubeSide) *http.ServeMux {
	mux := http.NewServeMux()
	mux.Handle("/metrics", csi.Handler(reg))
	// /livez is for the kubelet's liveness probe: the process serves.
	// A restart would not mend an unhealthy pool (it needs thin_check
	// or more space), so /healthz, which reports one, is for readiness
	// and for people, not for restarting the driver.
	mux.HandleFunc("/livez", func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprintln(w, "ok")
	})
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
	return mux
}

// every runs f every interval until ctx is done.
func every(ctx context.Context, interval time.Duration, f func()) {
	t := time.NewTicker(interval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			f()
		}
	}
}

// reapPeriodically finishes, every interval until ctx is done, the deletes
// that waited for a device's last close.
func reapPeriodically(ctx context.Context, interval time.Duration, pools map[string]servedPool) {
	every(ctx, interval, func() {
		for n, p := range pools {
			if ctx.Err() != nil {
				return
			}
			if err := p.Reap(ctx); err != nil && ctx.Err() == nil {
				klog.ErrorS(err, "Finishing pending deletes failed", "pool", n)
			}
		}
	})
}

// reapCopiesPeriodically removes, every interval until ctx is done, the
// copies nobody will use.
func reapCopiesPeriodically(ctx context.Context, interval time.Duration, d *csi.Driver) {
	every(ctx, interval, func() {
		if err := d.ReapCopies(ctx); err != nil && ctx.Err() == nil {
			klog.ErrorS(err, "Removing copies nobody will use failed")
		}
	})
}

// closePools closes the pools' records.
func closePools(pools map[string]servedPool) {
	for n, p := range pools {
		if err := p.Close(); err != nil {
			klog.ErrorS(err, "Closing the pool's records failed", "pool", n)
		}
	}
}

// templatesOption maps the flag, where 0 means none, onto csi.Options,
// where 0 means the default.
func templatesOption(n int) int {
	if n <= 0 {
		return -1
	}
	return n
}

// growAtStart grows a pool whose devices are larger than its table (grown
// while the driver was away: the kernel keeps the old table over a driver
// restart) or whose pools file now gives its loop files larger sizes. A
// failure is logged, not fatal: the pool serves at its old size.
func growAtStart(ctx context.Context, name string, p servedPool) bool {
	start := time.Now()
	g, err := p.GrowPool(ctx, p.ConfiguredGrowth())
	if err != nil {
		klog.ErrorS(err, "Growing the pool to its devices' or configured size failed; it serves at its old size", "pool", name)
		return false
	}
	if g.Deferred != "" {
		klog.InfoS("Part of the pool's growth is deferred", "pool", name, "reason", g.Deferred)
	}
	if !g.Grew() {
		return false
	}
	klog.InfoS("Grew pool at start-up", "pool", name, "dataBytesBefore", g.DataBytesBefore, "dataBytes", g.DataBytes,
		"metadataBytesBefore", g.MetadataBytesBefore, "metadataBytes", g.MetadataBytes, "duration", time.Since(start))
	return true
}
