package csi

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"runtime"
	"strings"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"google.golang.org/grpc"
	"google.golang.org/grpc/status"
	"k8s.io/klog/v2"

	"github.com/csi-dmthin/csi-dmthin/pkg/thinpool"
)

// metricsNamespace prefixes every metric the driver exports.
const metricsNamespace = "csi_dmthin"

// UsageSource is what metrics read from a pool at scrape time
// (*thinpool.Pool implements it). Usage must be safe to call concurrently:
// two scrapes may overlap.
type UsageSource interface {
	Usage() (thinpool.Usage, error)
}

var _ UsageSource = (*thinpool.Pool)(nil)

// operationBuckets are the upper bounds, in seconds, of the operation
// duration histogram: from a 1 ms identity or lookup call to a minute-long
// mkfs or first activation of a large volume.
var operationBuckets = []float64{0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60}

// Metrics is the driver's Prometheus instrumentation: per-pool space and
// health read at scrape time, and per-method counts and durations of CSI
// calls.
type Metrics struct {
	operations *prometheus.CounterVec   // method, code
	duration   *prometheus.HistogramVec // method
	inFlight   *prometheus.GaugeVec     // method
	pools      *poolCollector
	events     *prometheus.CounterVec // pool
	lastEvent  *prometheus.GaugeVec   // pool
	grown      *prometheus.CounterVec // pool, trigger
}

// Triggers of a pool's growth (csi_dmthin_pool_grown_total's label).
const (
	GrowTriggerAdmin      = "admin"      // csi-dmthin pool grow
	GrowTriggerStartup    = "startup"    // serve found larger devices or configured sizes
	GrowTriggerAutoExtend = "autoextend" // a loop-file pool's autoExtend
)

// NewMetrics registers the driver's collectors on reg. pools is called at
// every scrape and returns the node's pools by name (it may return
// different pools over time). It fails, with nothing left registered, when
// pools is nil or reg refuses a collector (for example because the
// driver's metrics are already registered on it).
func NewMetrics(reg prometheus.Registerer, pools func() map[string]UsageSource) (*Metrics, error) {
	if reg == nil {
		return nil, errors.New("metrics: nil registerer")
	}
	if pools == nil {
		return nil, errors.New("metrics: nil pools function")
	}
	m := &Metrics{
		operations: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: metricsNamespace,
			Name:      "operations_total",
			Help:      "CSI calls completed, by CSI method and gRPC status code.",
		}, []string{"method", "code"}),
		duration: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Namespace: metricsNamespace,
			Name:      "operation_duration_seconds",
			Help:      "Time in seconds to serve a CSI call, by CSI method, whatever its result.",
			Buckets:   operationBuckets,
		}, []string{"method"}),
		inFlight: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Namespace: metricsNamespace,
			Name:      "operations_in_flight",
			Help:      "CSI calls being served now, by CSI method.",
		}, []string{"method"}),
		pools: newPoolCollector(pools),
		events: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: metricsNamespace,
			Subsystem: "pool",
			Name:      "events_total",
			Help:      "Events the pool's kernel raised (low water mark passed, metadata threshold passed, mode changed), as the driver saw them.",
		}, []string{"pool"}),
		lastEvent: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Namespace: metricsNamespace,
			Subsystem: "pool",
			Name:      "last_event_timestamp_seconds",
			Help:      "Unix time at which the driver saw the pool's last kernel event.",
		}, []string{"pool"}),
		grown: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: metricsNamespace,
			Subsystem: "pool",
			Name:      "grown_total",
			Help:      "Times the pool grew, by what grew it: admin (csi-dmthin pool grow), startup, autoextend.",
		}, []string{"pool", "trigger"}),
	}
	var done []prometheus.Collector
	for _, c := range []prometheus.Collector{m.operations, m.duration, m.inFlight, m.pools, m.events, m.lastEvent, m.grown} {
		if err := reg.Register(c); err != nil {
			// Leave reg as it was, so a caller can retry or use another.
			for _, d := range done {
				reg.Unregister(d)
			}
			return nil, fmt.Errorf("metrics: register: %w", err)
		}
		done = append(done, c)
	}
	return m, nil
}

// PoolEvent counts a kernel event of pool, seen at t.
func (m *Metrics) PoolEvent(pool string, t time.Time) {
	m.events.WithLabelValues(pool).Inc()
	m.lastEvent.WithLabelValues(pool).Set(float64(t.UnixNano()) / 1e9)
}

// PoolGrown counts a growth of pool; trigger is one of the GrowTrigger
// values.
func (m *Metrics) PoolGrown(pool, trigger string) {
	m.grown.WithLabelValues(pool, trigger).Inc()
}

// RegisterBuildInfo registers csi_dmthin_build_info: 1, labelled with the
// driver's version and the Go version it was built with, so a dashboard
// can show what runs where and an alert can tell two versions apart.
func RegisterBuildInfo(reg prometheus.Registerer, version string) error {
	g := prometheus.NewGauge(prometheus.GaugeOpts{
		Namespace:   metricsNamespace,
		Name:        "build_info",
		Help:        "Always 1; the labels say which csi-dmthin version runs, built with which Go.",
		ConstLabels: prometheus.Labels{"version": version, "goversion": runtime.Version()},
	})
	g.Set(1)
	if err := reg.Register(g); err != nil {
		return fmt.Errorf("metrics: register build_info: %w", err)
	}
	return nil
}

// UnaryServerInterceptor times every CSI call and counts it by method and
// gRPC code. The method label is the short CSI method name
// ("CreateVolume"); a handler error that is not a gRPC status counts as
// "Unknown", which is how the caller receives it.
func (m *Metrics) UnaryServerInterceptor() grpc.UnaryServerInterceptor {
	return func(ctx context.Context, req any, info *grpc.UnaryServerInfo, handler grpc.UnaryHandler) (any, error) {
		method := info.FullMethod[strings.LastIndex(info.FullMethod, "/")+1:]
		inFlight := m.inFlight.WithLabelValues(method)
		inFlight.Inc()
		// Deferred so that a panicking handler (which a recovery
		// interceptor further out may turn into a status) is not left
		// counted as in flight for ever.
		defer inFlight.Dec()
		start := time.Now()
		resp, err := handler(ctx, req)
		m.duration.WithLabelValues(method).Observe(time.Since(start).Seconds())
		m.operations.WithLabelValues(method, status.Code(err).String()).Inc()
		return resp, err
	}
}

// Handler serves the registry's metrics (promhttp) for reg, given as a
// Gatherer. A collector that fails does not hide the others: the response
// carries what could be gathered.
func Handler(g prometheus.Gatherer) http.Handler {
	return promhttp.HandlerFor(g, promhttp.HandlerOpts{ErrorHandling: promhttp.ContinueOnError})
}

// poolCollector reads every pool's Usage when scraped, so the numbers are
// never older than the scrape and a pool that goes away stops being
// reported.
type poolCollector struct {
	pools func() map[string]UsageSource

	dataSize, dataUsed, metadataSize, metadataUsed *prometheus.Desc
	provisioned, overprovisioning, limit           *prometheus.Desc
	available, volumes, snapshots                  *prometheus.Desc
	healthy, needsCheck, outOfDataSpace, fenced    *prometheus.Desc
	readOnly, failed, templates                    *prometheus.Desc

	// usageErrors lives in the collector, not beside it, so a scrape that
	// sees a failure also reports the incremented count.
	usageErrors *prometheus.CounterVec
}

var _ prometheus.Collector = (*poolCollector)(nil)

func newPoolCollector(pools func() map[string]UsageSource) *poolCollector {
	desc := func(name, help string) *prometheus.Desc {
		return prometheus.NewDesc(prometheus.BuildFQName(metricsNamespace, "pool", name), help, []string{"pool"}, nil)
	}
	return &poolCollector{
		pools:            pools,
		dataSize:         desc("data_size_bytes", "Size in bytes of the thin-pool's data device."),
		dataUsed:         desc("data_used_bytes", "Bytes of the thin-pool's data device allocated to thin devices."),
		metadataSize:     desc("metadata_size_bytes", "Size in bytes of the thin-pool's metadata device."),
		metadataUsed:     desc("metadata_used_bytes", "Bytes of the thin-pool's metadata device in use."),
		provisioned:      desc("provisioned_bytes", "Sum in bytes of the sizes of the pool's volumes and snapshots."),
		overprovisioning: desc("overprovisioning_ratio", "Provisioned bytes divided by the data device's size; 0 when that size is 0."),
		limit:            desc("overprovisioning_limit_ratio", "Configured limit on provisioned bytes divided by the data device's size; absent when there is no limit."),
		available:        desc("available_bytes", "Bytes a new volume may still take under the free-space floors and the overprovisioning limit; 0 when the pool refuses new volumes."),
		volumes:          desc("volumes", "Number of volumes in the pool, snapshots not included."),
		snapshots:        desc("snapshots", "Number of snapshots in the pool."),
		healthy:          desc("healthy", "1 when the pool's status could be read and it accepts changes (not failed, not needing a check, not read-only), else 0."),
		needsCheck:       desc("needs_check", "1 when the kernel has flagged the pool's metadata as needing thin_check, else 0."),
		outOfDataSpace:   desc("out_of_data_space", "1 when the pool is in out_of_data_space mode (writes to unallocated blocks are queued or fail), else 0."),
		fenced:           desc("fenced", "1 when a failed step left the pool refusing changes until it recovers (each later call retries the recovery), else 0."),
		readOnly:         desc("read_only", "1 when the pool is in read-only mode (out of metadata space, or after a metadata error; with needs_check 1 it needs thin_check), else 0."),
		failed:           desc("failed", "1 when the pool has failed (no I/O to its volumes at all), else 0."),
		templates:        desc("templates", "Number of formatted templates in the pool (not counted as volumes)."),
		usageErrors: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: metricsNamespace,
			Subsystem: "pool",
			Name:      "usage_errors_total",
			Help:      "Scrapes at which reading the pool's usage failed; the pool then reports only healthy 0.",
		}, []string{"pool"}),
	}
}

// Describe sends every descriptor the collector can emit.
func (c *poolCollector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{
		c.dataSize, c.dataUsed, c.metadataSize, c.metadataUsed,
		c.provisioned, c.overprovisioning, c.limit,
		c.available, c.volumes, c.snapshots,
		c.healthy, c.needsCheck, c.outOfDataSpace, c.fenced,
		c.readOnly, c.failed, c.templates,
	} {
		ch <- d
	}
	c.usageErrors.Describe(ch)
}

// Collect reads each pool's usage and sends its samples. A pool whose
// usage cannot be read reports healthy 0 and nothing else, and its error
// count goes up.
func (c *poolCollector) Collect(ch chan<- prometheus.Metric) {
	for name, src := range c.pools() {
		u, err := src.Usage()
		if err != nil {
			c.usageErrors.WithLabelValues(name).Inc()
			// Collect has no request context; the counter is the signal,
			// the log says why.
			klog.Background().V(2).Info("Reading pool usage for metrics failed", "pool", name, "err", err)
			c.gauge(ch, c.healthy, 0, name)
			continue
		}
		c.collectUsage(ch, name, u)
	}
	c.usageErrors.Collect(ch)
}

func (c *poolCollector) collectUsage(ch chan<- prometheus.Metric, name string, u thinpool.Usage) {
	// A failed pool's status carries no block counts (thinpool leaves them
	// 0); reporting a 0-byte pool would be false, so the space gauges are
	// left out rather than dropping to 0 on a dashboard.
	if !u.Failed {
		c.gauge(ch, c.dataSize, float64(u.DataBytes), name)
		c.gauge(ch, c.dataUsed, float64(u.DataUsedBytes), name)
		c.gauge(ch, c.metadataSize, float64(u.MetadataBytes), name)
		c.gauge(ch, c.metadataUsed, float64(u.MetadataUsedBytes), name)
		ratio := 0.0
		if u.DataBytes > 0 {
			ratio = float64(u.ProvisionedBytes) / float64(u.DataBytes)
		}
		c.gauge(ch, c.overprovisioning, ratio, name)
	}
	c.gauge(ch, c.provisioned, float64(u.ProvisionedBytes), name)
	if u.OverprovisionRatio >= 0 {
		c.gauge(ch, c.limit, u.OverprovisionRatio, name)
	}
	c.gauge(ch, c.available, float64(u.AvailableBytes), name)
	c.gauge(ch, c.volumes, float64(u.Volumes), name)
	c.gauge(ch, c.snapshots, float64(u.Snapshots), name)
	c.gauge(ch, c.healthy, boolValue(u.Healthy()), name)
	c.gauge(ch, c.needsCheck, boolValue(u.NeedsCheck), name)
	c.gauge(ch, c.outOfDataSpace, boolValue(u.Mode == thinpool.ModeOutOfDataSpace), name)
	c.gauge(ch, c.fenced, boolValue(u.Fenced != ""), name)
	c.gauge(ch, c.readOnly, boolValue(!u.Failed && u.Mode == thinpool.ModeReadOnly), name)
	c.gauge(ch, c.failed, boolValue(u.Failed), name)
	c.gauge(ch, c.templates, float64(u.Templates), name)
}

// gauge sends one gauge sample for pool. A pool name that is not a valid
// label value (not UTF-8) becomes an invalid metric, which the registry
// reports as a gather error, instead of a panic in the scrape.
func (c *poolCollector) gauge(ch chan<- prometheus.Metric, d *prometheus.Desc, v float64, pool string) {
	m, err := prometheus.NewConstMetric(d, prometheus.GaugeValue, v, pool)
	if err != nil {
		m = prometheus.NewInvalidMetric(d, err)
	}
	ch <- m
}

func boolValue(b bool) float64 {
	if b {
		return 1
	}
	return 0
}
