package csi

import (
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/csi-dmthin/csi-dmthin/pkg/thinpool"
)

// The metrics operators alert on beyond space: read-only and failed pools,
// kernel events, growth, and which build runs.
func TestMetricsOperations(t *testing.T) {
	readOnly := healthyUsage
	readOnly.Mode = thinpool.ModeReadOnly
	failed := thinpool.Usage{OverprovisionRatio: -1, Failed: true}
	reg, m := newTestMetrics(t, staticPools(map[string]UsageSource{
		"ro": fakeUsage{u: readOnly}, "dead": fakeUsage{u: failed}, "fast": fakeUsage{u: healthyUsage},
	}))
	if err := testutil.GatherAndCompare(reg, strings.NewReader(`
# HELP csi_dmthin_pool_read_only 1 when the pool is in read-only mode (out of metadata space, or after a metadata error; with needs_check 1 it needs thin_check), else 0.
# TYPE csi_dmthin_pool_read_only gauge
csi_dmthin_pool_read_only{pool="dead"} 0
csi_dmthin_pool_read_only{pool="fast"} 0
csi_dmthin_pool_read_only{pool="ro"} 1
# HELP csi_dmthin_pool_failed 1 when the pool has failed (no I/O to its volumes at all), else 0.
# TYPE csi_dmthin_pool_failed gauge
csi_dmthin_pool_failed{pool="dead"} 1
csi_dmthin_pool_failed{pool="fast"} 0
csi_dmthin_pool_failed{pool="ro"} 0
`), "csi_dmthin_pool_read_only", "csi_dmthin_pool_failed"); err != nil {
		t.Error(err)
	}

	m.PoolEvent("fast", time.Unix(1700000000, 500000000))
	m.PoolEvent("fast", time.Unix(1700000010, 0))
	m.PoolGrown("fast", GrowTriggerAdmin)
	m.PoolGrown("fast", GrowTriggerAutoExtend)
	m.PoolGrown("fast", GrowTriggerAutoExtend)
	if err := testutil.GatherAndCompare(reg, strings.NewReader(`
# HELP csi_dmthin_pool_events_total Events the pool's kernel raised (low water mark passed, metadata threshold passed, mode changed), as the driver saw them.
# TYPE csi_dmthin_pool_events_total counter
csi_dmthin_pool_events_total{pool="fast"} 2
# HELP csi_dmthin_pool_last_event_timestamp_seconds Unix time at which the driver saw the pool's last kernel event.
# TYPE csi_dmthin_pool_last_event_timestamp_seconds gauge
csi_dmthin_pool_last_event_timestamp_seconds{pool="fast"} 1.70000001e+09
# HELP csi_dmthin_pool_grown_total Times the pool grew, by what grew it: admin (csi-dmthin pool grow), startup, autoextend.
# TYPE csi_dmthin_pool_grown_total counter
csi_dmthin_pool_grown_total{pool="fast",trigger="admin"} 1
csi_dmthin_pool_grown_total{pool="fast",trigger="autoextend"} 2
`), "csi_dmthin_pool_events_total", "csi_dmthin_pool_last_event_timestamp_seconds", "csi_dmthin_pool_grown_total"); err != nil {
		t.Error(err)
	}

	if err := RegisterBuildInfo(reg, "1.2.3"); err != nil {
		t.Fatal(err)
	}
	if err := testutil.GatherAndCompare(reg, strings.NewReader(`
# HELP csi_dmthin_build_info Always 1; the labels say which csi-dmthin version runs, built with which Go.
# TYPE csi_dmthin_build_info gauge
csi_dmthin_build_info{goversion="`+runtime.Version()+`",version="1.2.3"} 1
`), "csi_dmthin_build_info"); err != nil {
		t.Error(err)
	}
	if err := RegisterBuildInfo(reg, "1.2.3"); err == nil {
		t.Error("build_info registered twice on one registry")
	}
}
