package csi

import (
	"context"
	"errors"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/csi-dmthin/csi-dmthin/pkg/thinpool"
)

// fakeUsage is a pool whose Usage returns a fixed value or error.
type fakeUsage struct {
	u   thinpool.Usage
	err error
}

func (f fakeUsage) Usage() (thinpool.Usage, error) { return f.u, f.err }

// fakePools is a pool set the test can change between scrapes.
type fakePools struct {
	mu    sync.Mutex
	pools map[string]UsageSource
}

func (p *fakePools) set(pools map[string]UsageSource) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.pools = pools
}

func (p *fakePools) get() map[string]UsageSource {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.pools
}

const (
	gib = int64(1) << 30
	mib = int64(1) << 20
)

// healthyUsage is a 10 GiB pool holding 25 GiB of thin volumes under a
// limit of 5.
var healthyUsage = thinpool.Usage{
	DataBytes:          10 * gib,
	DataUsedBytes:      4 * gib,
	MetadataBytes:      64 * mib,
	MetadataUsedBytes:  8 * mib,
	ProvisionedBytes:   25 * gib,
	OverprovisionRatio: 5,
	AvailableBytes:     5 * gib,
	Volumes:            3,
	Snapshots:          1,
	TransactionID:      7,
	Mode:               thinpool.ModeReadWrite,
}

var poolMetricNames = []string{
	"csi_dmthin_pool_data_size_bytes",
	"csi_dmthin_pool_data_used_bytes",
	"csi_dmthin_pool_metadata_size_bytes",
	"csi_dmthin_pool_metadata_used_bytes",
	"csi_dmthin_pool_provisioned_bytes",
	"csi_dmthin_pool_overprovisioning_ratio",
	"csi_dmthin_pool_overprovisioning_limit_ratio",
	"csi_dmthin_pool_available_bytes",
	"csi_dmthin_pool_volumes",
	"csi_dmthin_pool_snapshots",
	"csi_dmthin_pool_healthy",
	"csi_dmthin_pool_needs_check",
	"csi_dmthin_pool_out_of_data_space",
	"csi_dmthin_pool_fenced",
	"csi_dmthin_pool_usage_errors_total",
}

const healthyExposition = `
# HELP csi_dmthin_pool_data_size_bytes Size in bytes of the thin-pool's data device.
# TYPE csi_dmthin_pool_data_size_bytes gauge
csi_dmthin_pool_data_size_bytes{pool="fast"} 1.073741824e+10
# HELP csi_dmthin_pool_data_used_bytes Bytes of the thin-pool's data device allocated to thin devices.
# TYPE csi_dmthin_pool_data_used_bytes gauge
csi_dmthin_pool_data_used_bytes{pool="fast"} 4.294967296e+09
# HELP csi_dmthin_pool_metadata_size_bytes Size in bytes of the thin-pool's metadata device.
# TYPE csi_dmthin_pool_metadata_size_bytes gauge
csi_dmthin_pool_metadata_size_bytes{pool="fast"} 6.7108864e+07
# HELP csi_dmthin_pool_metadata_used_bytes Bytes of the thin-pool's metadata device in use.
# TYPE csi_dmthin_pool_metadata_used_bytes gauge
csi_dmthin_pool_metadata_used_bytes{pool="fast"} 8.388608e+06
# HELP csi_dmthin_pool_provisioned_bytes Sum in bytes of the sizes of the pool's volumes and snapshots.
# TYPE csi_dmthin_pool_provisioned_bytes gauge
csi_dmthin_pool_provisioned_bytes{pool="fast"} 2.68435456e+10
# HELP csi_dmthin_pool_overprovisioning_ratio Provisioned bytes divided by the data device's size; 0 when that size is 0.
# TYPE csi_dmthin_pool_overprovisioning_ratio gauge
csi_dmthin_pool_overprovisioning_ratio{pool="fast"} 2.5
# HELP csi_dmthin_pool_overprovisioning_limit_ratio Configured limit on provisioned bytes divided by the data device's size; absent when there is no limit.
# TYPE csi_dmthin_pool_overprovisioning_limit_ratio gauge
csi_dmthin_pool_overprovisioning_limit_ratio{pool="fast"} 5
# HELP csi_dmthin_pool_available_bytes Bytes a new volume may still take under the free-space floors and the overprovisioning limit; 0 when the pool refuses new volumes.
# TYPE csi_dmthin_pool_available_bytes gauge
csi_dmthin_pool_available_bytes{pool="fast"} 5.36870912e+09
# HELP csi_dmthin_pool_volumes Number of volumes in the pool, snapshots not included.
# TYPE csi_dmthin_pool_volumes gauge
csi_dmthin_pool_volumes{pool="fast"} 3
# HELP csi_dmthin_pool_snapshots Number of snapshots in the pool.
# TYPE csi_dmthin_pool_snapshots gauge
csi_dmthin_pool_snapshots{pool="fast"} 1
# HELP csi_dmthin_pool_healthy 1 when the pool's status could be read and it accepts changes (not failed, not needing a check, not read-only), else 0.
# TYPE csi_dmthin_pool_healthy gauge
csi_dmthin_pool_healthy{pool="fast"} 1
# HELP csi_dmthin_pool_needs_check 1 when the kernel has flagged the pool's metadata as needing thin_check, else 0.
# TYPE csi_dmthin_pool_needs_check gauge
csi_dmthin_pool_needs_check{pool="fast"} 0
# HELP csi_dmthin_pool_out_of_data_space 1 when the pool is in out_of_data_space mode (writes to unallocated blocks are queued or fail), else 0.
# TYPE csi_dmthin_pool_out_of_data_space gauge
csi_dmthin_pool_out_of_data_space{pool="fast"} 0
# HELP csi_dmthin_pool_fenced 1 when a failed step left the pool refusing changes until it recovers (each later call retries the recovery), else 0.
# TYPE csi_dmthin_pool_fenced gauge
csi_dmthin_pool_fenced{pool="fast"} 0
`

const failingExposition = `
# HELP csi_dmthin_pool_healthy 1 when the pool's status could be read and it accepts changes (not failed, not needing a check, not read-only), else 0.
# TYPE csi_dmthin_pool_healthy gauge
csi_dmthin_pool_healthy{pool="broken"} 0
# HELP csi_dmthin_pool_usage_errors_total Scrapes at which reading the pool's usage failed; the pool then reports only healthy 0.
# TYPE csi_dmthin_pool_usage_errors_total counter
csi_dmthin_pool_usage_errors_total{pool="broken"} 1
`

func newTestMetrics(t *testing.T, pools func() map[string]UsageSource) (*prometheus.Registry, *Metrics) {
	t.Helper()
	reg := prometheus.NewPedanticRegistry()
	m, err := NewMetrics(reg, pools)
	if err != nil {
		t.Fatalf("NewMetrics: %v", err)
	}
	return reg, m
}

func staticPools(pools map[string]UsageSource) func() map[string]UsageSource {
	return func() map[string]UsageSource { return pools }
}

func TestMetricsPoolExposition(t *testing.T) {
	outOfSpace := healthyUsage
	outOfSpace.Mode = thinpool.ModeOutOfDataSpace
	outOfSpace.AvailableBytes = 0
	outOfSpace.DataUsedBytes = outOfSpace.DataBytes

	needsCheck := healthyUsage
	needsCheck.Mode = thinpool.ModeReadOnly
	needsCheck.NeedsCheck = true
	needsCheck.AvailableBytes = 0

	fenced := healthyUsage
	fenced.Fenced = "commit: input/output error"
	fenced.AvailableBytes = 0

	// Failed: the kernel gave no block counts, so thinpool left them 0.
	failed := thinpool.Usage{ProvisionedBytes: 25 * gib, OverprovisionRatio: -1, Volumes: 3, Snapshots: 1, Failed: true}

	emptyUnlimited := thinpool.Usage{OverprovisionRatio: -1, Mode: thinpool.ModeReadWrite}

	tests := []struct {
		name  string
		pools map[string]UsageSource
		want  string
		// names are the families compared; nil: every pool family, so
		// that a sample that should be absent is caught too.
		names []string
	}{
		{
			name:  "healthy",
			pools: map[string]UsageSource{"fast": fakeUsage{u: healthyUsage}},
			want:  healthyExposition,
		},
		{
			name:  "usage fails",
			pools: map[string]UsageSource{"broken": fakeUsage{err: thinpool.ErrClosed}},
			want:  failingExposition,
		},
		{
			name:  "out of data space",
			pools: map[string]UsageSource{"fast": fakeUsage{u: outOfSpace}},
			names: []string{"csi_dmthin_pool_available_bytes", "csi_dmthin_pool_healthy", "csi_dmthin_pool_needs_check", "csi_dmthin_pool_out_of_data_space"},
			want: `
# HELP csi_dmthin_pool_available_bytes Bytes a new volume may still take under the free-space floors and the overprovisioning limit; 0 when the pool refuses new volumes.
# TYPE csi_dmthin_pool_available_bytes gauge
csi_dmthin_pool_available_bytes{pool="fast"} 0
# HELP csi_dmthin_pool_healthy 1 when the pool's status could be read and it accepts changes (not failed, not needing a check, not read-only), else 0.
# TYPE csi_dmthin_pool_healthy gauge
csi_dmthin_pool_healthy{pool="fast"} 1
# HELP csi_dmthin_pool_needs_check 1 when the kernel has flagged the pool's metadata as needing thin_check, else 0.
# TYPE csi_dmthin_pool_needs_check gauge
csi_dmthin_pool_needs_check{pool="fast"} 0
# HELP csi_dmthin_pool_out_of_data_space 1 when the pool is in out_of_data_space mode (writes to unallocated blocks are queued or fail), else 0.
# TYPE csi_dmthin_pool_out_of_data_space gauge
csi_dmthin_pool_out_of_data_space{pool="fast"} 1
`,
		},
		{
			name:  "needs check",
			pools: map[string]UsageSource{"fast": fakeUsage{u: needsCheck}},
			names: []string{"csi_dmthin_pool_healthy", "csi_dmthin_pool_needs_check", "csi_dmthin_pool_out_of_data_space"},
			want: `
# HELP csi_dmthin_pool_healthy 1 when the pool's status could be read and it accepts changes (not failed, not needing a check, not read-only), else 0.
# TYPE csi_dmthin_pool_healthy gauge
csi_dmthin_pool_healthy{pool="fast"} 0
# HELP csi_dmthin_pool_needs_check 1 when the kernel has flagged the pool's metadata as needing thin_check, else 0.
# TYPE csi_dmthin_pool_needs_check gauge
csi_dmthin_pool_needs_check{pool="fast"} 1
# HELP csi_dmthin_pool_out_of_data_space 1 when the pool is in out_of_data_space mode (writes to unallocated blocks are queued or fail), else 0.
# TYPE csi_dmthin_pool_out_of_data_space gauge
csi_dmthin_pool_out_of_data_space{pool="fast"} 0
`,
		},
		{
			name:  "fenced",
			pools: map[string]UsageSource{"fast": fakeUsage{u: fenced}},
			names: []string{"csi_dmthin_pool_healthy", "csi_dmthin_pool_fenced"},
			want: `
# HELP csi_dmthin_pool_healthy 1 when the pool's status could be read and it accepts changes (not failed, not needing a check, not read-only), else 0.
# TYPE csi_dmthin_pool_healthy gauge
csi_dmthin_pool_healthy{pool="fast"} 0
# HELP csi_dmthin_pool_fenced 1 when a failed step left the pool refusing changes until it recovers (each later call retries the recovery), else 0.
# TYPE csi_dmthin_pool_fenced gauge
csi_dmthin_pool_fenced{pool="fast"} 1
`,
		},
		{
			// No space gauges (the kernel reported none), no limit.
			name:  "failed pool",
			pools: map[string]UsageSource{"fast": fakeUsage{u: failed}},
			want: `
# HELP csi_dmthin_pool_provisioned_bytes Sum in bytes of the sizes of the pool's volumes and snapshots.
# TYPE csi_dmthin_pool_provisioned_bytes gauge
csi_dmthin_pool_provisioned_bytes{pool="fast"} 2.68435456e+10
# HELP csi_dmthin_pool_available_bytes Bytes a new volume may still take under the free-space floors and the overprovisioning limit; 0 when the pool refuses new volumes.
# TYPE csi_dmthin_pool_available_bytes gauge
csi_dmthin_pool_available_bytes{pool="fast"} 0
# HELP csi_dmthin_pool_volumes Number of volumes in the pool, snapshots not included.
# TYPE csi_dmthin_pool_volumes gauge
csi_dmthin_pool_volumes{pool="fast"} 3
# HELP csi_dmthin_pool_snapshots Number of snapshots in the pool.
# TYPE csi_dmthin_pool_snapshots gauge
csi_dmthin_pool_snapshots{pool="fast"} 1
# HELP csi_dmthin_pool_healthy 1 when the pool's status could be read and it accepts changes (not failed, not needing a check, not read-only), else 0.
# TYPE csi_dmthin_pool_healthy gauge
csi_dmthin_pool_healthy{pool="fast"} 0
# HELP csi_dmthin_pool_fenced 1 when a failed step left the pool refusing changes until it recovers (each later call retries the recovery), else 0.
# TYPE csi_dmthin_pool_fenced gauge
csi_dmthin_pool_fenced{pool="fast"} 0
# HELP csi_dmthin_pool_needs_check 1 when the kernel has flagged the pool's metadata as needing thin_check, else 0.
# TYPE csi_dmthin_pool_needs_check gauge
csi_dmthin_pool_needs_check{pool="fast"} 0
# HELP csi_dmthin_pool_out_of_data_space 1 when the pool is in out_of_data_space mode (writes to unallocated blocks are queued or fail), else 0.
# TYPE csi_dmthin_pool_out_of_data_space gauge
csi_dmthin_pool_out_of_data_space{pool="fast"} 0
`,
		},
		{
			// A 0-byte data size gives ratio 0, not NaN; no limit, no sample.
			name:  "empty pool without limit",
			pools: map[string]UsageSource{"fast": fakeUsage{u: emptyUnlimited}},
			want: `
# HELP csi_dmthin_pool_data_size_bytes Size in bytes of the thin-pool's data device.
# TYPE csi_dmthin_pool_data_size_bytes gauge
csi_dmthin_pool_data_size_bytes{pool="fast"} 0
# HELP csi_dmthin_pool_data_used_bytes Bytes of the thin-pool's data device allocated to thin devices.
# TYPE csi_dmthin_pool_data_used_bytes gauge
csi_dmthin_pool_data_used_bytes{pool="fast"} 0
# HELP csi_dmthin_pool_metadata_size_bytes Size in bytes of the thin-pool's metadata device.
# TYPE csi_dmthin_pool_metadata_size_bytes gauge
csi_dmthin_pool_metadata_size_bytes{pool="fast"} 0
# HELP csi_dmthin_pool_metadata_used_bytes Bytes of the thin-pool's metadata device in use.
# TYPE csi_dmthin_pool_metadata_used_bytes gauge
csi_dmthin_pool_metadata_used_bytes{pool="fast"} 0
# HELP csi_dmthin_pool_provisioned_bytes Sum in bytes of the sizes of the pool's volumes and snapshots.
# TYPE csi_dmthin_pool_provisioned_bytes gauge
csi_dmthin_pool_provisioned_bytes{pool="fast"} 0
# HELP csi_dmthin_pool_overprovisioning_ratio Provisioned bytes divided by the data device's size; 0 when that size is 0.
# TYPE csi_dmthin_pool_overprovisioning_ratio gauge
csi_dmthin_pool_overprovisioning_ratio{pool="fast"} 0
# HELP csi_dmthin_pool_available_bytes Bytes a new volume may still take under the free-space floors and the overprovisioning limit; 0 when the pool refuses new volumes.
# TYPE csi_dmthin_pool_available_bytes gauge
csi_dmthin_pool_available_bytes{pool="fast"} 0
# HELP csi_dmthin_pool_volumes Number of volumes in the pool, snapshots not included.
# TYPE csi_dmthin_pool_volumes gauge
csi_dmthin_pool_volumes{pool="fast"} 0
# HELP csi_dmthin_pool_snapshots Number of snapshots in the pool.
# TYPE csi_dmthin_pool_snapshots gauge
csi_dmthin_pool_snapshots{pool="fast"} 0
# HELP csi_dmthin_pool_fenced 1 when a failed step left the pool refusing changes until it recovers (each later call retries the recovery), else 0.
# TYPE csi_dmthin_pool_fenced gauge
csi_dmthin_pool_fenced{pool="fast"} 0
# HELP csi_dmthin_pool_healthy 1 when the pool's status could be read and it accepts changes (not failed, not needing a check, not read-only), else 0.
# TYPE csi_dmthin_pool_healthy gauge
csi_dmthin_pool_healthy{pool="fast"} 1
# HELP csi_dmthin_pool_needs_check 1 when the kernel has flagged the pool's metadata as needing thin_check, else 0.
# TYPE csi_dmthin_pool_needs_check gauge
csi_dmthin_pool_needs_check{pool="fast"} 0
# HELP csi_dmthin_pool_out_of_data_space 1 when the pool is in out_of_data_space mode (writes to unallocated blocks are queued or fail), else 0.
# TYPE csi_dmthin_pool_out_of_data_space gauge
csi_dmthin_pool_out_of_data_space{pool="fast"} 0
`,
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			reg, _ := newTestMetrics(t, staticPools(tt.pools))
			names := tt.names
			if names == nil {
				names = poolMetricNames
			}
			if err := testutil.GatherAndCompare(reg, strings.NewReader(tt.want), names...); err != nil {
				t.Error(err)
			}
		})
	}
}

// TestMetricsPoolsReadAtScrape checks that every scrape calls pools() and
// Usage() afresh: a pool added, changed or gone shows at the next scrape,
// and the error counter counts failing scrapes.
func TestMetricsPoolsReadAtScrape(t *testing.T) {
	var pools fakePools
	reg, _ := newTestMetrics(t, pools.get)

	if n, err := testutil.GatherAndCount(reg, poolMetricNames...); err != nil || n != 0 {
		t.Fatalf("no pools: got %d samples, err %v; want 0", n, err)
	}

	broken := fakeUsage{err: errors.New("dmsetup status: no such device")}
	pools.set(map[string]UsageSource{"fast": fakeUsage{u: healthyUsage}, "broken": broken})
	// 14 gauges for fast (limit set), healthy + error count for broken.
	if n, err := testutil.GatherAndCount(reg, poolMetricNames...); err != nil || n != 16 {
		t.Fatalf("two pools: got %d samples, err %v; want 16", n, err)
	}
	if err := testutil.GatherAndCompare(reg, strings.NewReader(`
# HELP csi_dmthin_pool_usage_errors_total Scrapes at which reading the pool's usage failed; the pool then reports only healthy 0.
# TYPE csi_dmthin_pool_usage_errors_total counter
csi_dmthin_pool_usage_errors_total{pool="broken"} 2
`), "csi_dmthin_pool_usage_errors_total"); err != nil {
		t.Errorf("second failing scrape: %v", err)
	}

	grown := healthyUsage
	grown.DataBytes = 20 * gib
	pools.set(map[string]UsageSource{"fast": fakeUsage{u: grown}})
	if err := testutil.GatherAndCompare(reg, strings.NewReader(`
# HELP csi_dmthin_pool_data_size_bytes Size in bytes of the thin-pool's data device.
# TYPE csi_dmthin_pool_data_size_bytes gauge
csi_dmthin_pool_data_size_bytes{pool="fast"} 2.147483648e+10
# HELP csi_dmthin_pool_healthy 1 when the pool's status could be read and it accepts changes (not failed, not needing a check, not read-only), else 0.
# TYPE csi_dmthin_pool_healthy gauge
csi_dmthin_pool_healthy{pool="fast"} 1
# HELP csi_dmthin_pool_overprovisioning_ratio Provisioned bytes divided by the data device's size; 0 when that size is 0.
# TYPE csi_dmthin_pool_overprovisioning_ratio gauge
csi_dmthin_pool_overprovisioning_ratio{pool="fast"} 1.25
`), "csi_dmthin_pool_data_size_bytes", "csi_dmthin_pool_healthy", "csi_dmthin_pool_overprovisioning_ratio"); err != nil {
		t.Errorf("after broken pool removed and fast grown: %v", err)
	}
}

// TestMetricsInvalidPoolName checks that a pool name that is not a valid
// label value makes the scrape report an error rather than panic, and that
// the other pools are still gathered.
func TestMetricsInvalidPoolName(t *testing.T) {
	reg, _ := newTestMetrics(t, staticPools(map[string]UsageSource{
		"fast":         fakeUsage{u: healthyUsage},
		"bad\xffbytes": fakeUsage{u: healthyUsage},
	}))
	mfs, err := reg.Gather()
	if err == nil {
		t.Fatal("Gather: no error for a non-UTF-8 pool name")
	}
	for _, mf := range mfs {
		if mf.GetName() == "csi_dmthin_pool_healthy" && len(mf.GetMetric()) == 1 {
			return
		}
	}
	t.Errorf("Gather: healthy sample of the valid pool missing: %v", mfs)
}

func TestMetricsNewMetricsErrors(t *testing.T) {
	pools := staticPools(nil)
	if _, err := NewMetrics(prometheus.NewRegistry(), nil); err == nil {
		t.Error("NewMetrics(nil pools): no error")
	}
	if _, err := NewMetrics(nil, pools); err == nil {
		t.Error("NewMetrics(nil registerer): no error")
	}

	reg := prometheus.NewRegistry()
	// Take the third collector's place, with the same descriptor (a
	// registry remembers a name's labels and help even after Unregister).
	taken := prometheus.NewGaugeVec(prometheus.GaugeOpts{
		Name: "csi_dmthin_operations_in_flight",
		Help: "CSI calls being served now, by CSI method.",
	}, []string{"method"})
	reg.MustRegister(taken)
	_, err := NewMetrics(reg, pools)
	if err == nil {
		t.Fatal("NewMetrics on a registry holding one of its names: no error")
	}
	// The two collectors registered before the failure were taken back:
	// once the place is free, a second attempt succeeds.
	reg.Unregister(taken)
	if _, err := NewMetrics(reg, pools); err != nil {
		t.Errorf("NewMetrics after the conflict is gone: %v", err)
	}
	if _, err := NewMetrics(reg, pools); !errors.As(err, new(prometheus.AlreadyRegisteredError)) {
		t.Errorf("NewMetrics twice on one registry: err %v, want AlreadyRegisteredError", err)
	}
}

func TestMetricsInterceptor(t *testing.T) {
	reg, m := newTestMetrics(t, staticPools(nil))
	intercept := m.UnaryServerInterceptor()
	const create = "/csi.v1.Controller/CreateVolume"

	tests := []struct {
		name     string
		method   string
		err      error
		wantCode codes.Code
	}{
		{name: "ok", method: create, wantCode: codes.OK},
		{name: "ok again", method: create, wantCode: codes.OK},
		{name: "no space", method: create, err: status.Error(codes.ResourceExhausted, "pool fast: no space"), wantCode: codes.ResourceExhausted},
		{name: "bare error", method: "/csi.v1.Node/NodePublishVolume", err: errors.New("bare"), wantCode: codes.Unknown},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			short := tt.method[strings.LastIndex(tt.method, "/")+1:]
			var inFlightDuring float64
			handler := func(ctx context.Context, req any) (any, error) {
				inFlightDuring = testutil.ToFloat64(m.inFlight.WithLabelValues(short))
				if tt.err != nil {
					return nil, tt.err
				}
				return "response", nil
			}
			resp, err := intercept(context.Background(), "request", &grpc.UnaryServerInfo{FullMethod: tt.method}, handler)
			if !errors.Is(err, tt.err) {
				t.Errorf("err = %v, want the handler's %v", err, tt.err)
			}
			if tt.err == nil && resp != "response" {
				t.Errorf("resp = %v, want the handler's", resp)
			}
			if got := status.Code(err); got != tt.wantCode {
				t.Errorf("code = %v, want %v", got, tt.wantCode)
			}
			if inFlightDuring != 1 {
				t.Errorf("in flight during the call = %v, want 1", inFlightDuring)
			}
			if got := testutil.ToFloat64(m.inFlight.WithLabelValues(short)); got != 0 {
				t.Errorf("in flight after the call = %v, want 0", got)
			}
		})
	}

	for _, c := range []struct {
		method, code string
		want         float64
	}{
		{"CreateVolume", "OK", 2},
		{"CreateVolume", "ResourceExhausted", 1},
		{"NodePublishVolume", "Unknown", 1},
	} {
		if got := testutil.ToFloat64(m.operations.WithLabelValues(c.method, c.code)); got != c.want {
			t.Errorf("operations_total{method=%q,code=%q} = %v, want %v", c.method, c.code, got, c.want)
		}
	}
	if n := testutil.CollectAndCount(m.operations); n != 3 {
		t.Errorf("operations_total has %d series, want 3", n)
	}
	if n := testutil.CollectAndCount(m.duration); n != 2 {
		t.Errorf("operation_duration_seconds has %d series, want 2", n)
	}
	wantCounts := map[string]uint64{"CreateVolume": 3, "NodePublishVolume": 1}
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatalf("Gather: %v", err)
	}
	seen := 0
	for _, mf := range mfs {
		if mf.GetName() != "csi_dmthin_operation_duration_seconds" {
			continue
		}
		for _, s := range mf.GetMetric() {
			method := s.GetLabel()[0].GetValue()
			h := s.GetHistogram()
			if h.GetSampleCount() != wantCounts[method] {
				t.Errorf("duration histogram for %s counted %d calls, want %d", method, h.GetSampleCount(), wantCounts[method])
			}
			if n := len(h.GetBucket()); n != len(operationBuckets) {
				t.Errorf("duration histogram has %d buckets, want %d", n, len(operationBuckets))
			}
			seen++
		}
	}
	if seen != len(wantCounts) {
		t.Errorf("duration histogram has %d methods, want %d", seen, len(wantCounts))
	}
}

// TestMetricsInterceptorPanic checks that a panicking handler does not stay
// counted as in flight.
func TestMetricsInterceptorPanic(t *testing.T) {
	_, m := newTestMetrics(t, staticPools(nil))
	func() {
		defer func() {
			if recover() == nil {
				t.Error("the handler's panic did not reach the caller")
			}
		}()
		_, _ = m.UnaryServerInterceptor()(context.Background(), nil, &grpc.UnaryServerInfo{FullMethod: "/csi.v1.Node/NodeStageVolume"},
			func(context.Context, any) (any, error) { panic("boom") })
	}()
	if got := testutil.ToFloat64(m.inFlight.WithLabelValues("NodeStageVolume")); got != 0 {
		t.Errorf("in flight after a panic = %v, want 0", got)
	}
}

func TestMetricsHandler(t *testing.T) {
	reg, m := newTestMetrics(t, staticPools(map[string]UsageSource{
		"fast":   fakeUsage{u: healthyUsage},
		"broken": fakeUsage{err: thinpool.ErrClosed},
	}))
	_, err := m.UnaryServerInterceptor()(context.Background(), nil, &grpc.UnaryServerInfo{FullMethod: "/csi.v1.Identity/Probe"},
		func(context.Context, any) (any, error) { return nil, nil })
	if err != nil {
		t.Fatalf("Probe: %v", err)
	}

	srv := httptest.NewServer(Handler(reg))
	defer srv.Close()
	resp, err := http.Get(srv.URL)
	if err != nil {
		t.Fatalf("GET: %v", err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatalf("read body: %v", err)
	}
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("status %d, body %s", resp.StatusCode, body)
	}
	if ct := resp.Header.Get("Content-Type"); !strings.HasPrefix(ct, "text/plain") {
		t.Errorf("Content-Type = %q, want text/plain", ct)
	}
	want := append([]string{
		`csi_dmthin_operations_total{code="OK",method="Probe"} 1`,
		`csi_dmthin_operation_duration_seconds_bucket{method="Probe",le="60"} 1`,
		`csi_dmthin_operations_in_flight{method="Probe"} 0`,
		`csi_dmthin_pool_healthy{pool="broken"} 0`,
		`csi_dmthin_pool_healthy{pool="fast"} 1`,
	}, poolMetricNames...)
	for _, s := range want {
		if !strings.Contains(string(body), s) {
			t.Errorf("response lacks %q:\n%s", s, body)
		}
	}
}

// TestMetricsConcurrentScrapes runs scrapes and calls at once, for -race.
func TestMetricsConcurrentScrapes(t *testing.T) {
	reg, m := newTestMetrics(t, staticPools(map[string]UsageSource{
		"fast":   fakeUsage{u: healthyUsage},
		"broken": fakeUsage{err: thinpool.ErrClosed},
	}))
	intercept := m.UnaryServerInterceptor()
	var wg sync.WaitGroup
	for range 4 {
		wg.Go(func() {
			for range 20 {
				if _, err := reg.Gather(); err != nil {
					t.Errorf("Gather: %v", err)
				}
			}
		})
		wg.Go(func() {
			for range 20 {
				_, _ = intercept(context.Background(), nil, &grpc.UnaryServerInfo{FullMethod: "/csi.v1.Controller/DeleteVolume"},
					func(context.Context, any) (any, error) { return nil, nil })
			}
		})
	}
	wg.Wait()
	if got := testutil.ToFloat64(m.operations.WithLabelValues("DeleteVolume", "OK")); got != 80 {
		t.Errorf("operations_total = %v, want 80", got)
	}
	if got := testutil.ToFloat64(m.pools.usageErrors.WithLabelValues("broken")); got != 80 {
		t.Errorf("usage_errors_total = %v, want 80", got)
	}
}
