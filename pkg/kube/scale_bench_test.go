package kube

import (
	"context"
	"fmt"
	"strings"
	"testing"
	"text/tabwriter"
	"time"

	"k8s.io/klog/v2"
)

// What csi-dmthin costs at the scale of issue 12, measured in one run on
// one seeded cluster: one node's side (the same on every node), the
// cluster's controller (once for the cluster) and how fast it places
// restores, with the sidecars' informers counted beside them. Every
// request is served by in-process fakes: the counts and the heap are
// real, the times carry no network or API server latency.
//
//	make bench-scale   # go test -run '^$' -bench 'Scale' -benchtime 1x ./pkg/kube

const (
	scaleNodes       = 1000
	scalePVCsPerNode = 10
	scaleRestores    = 100
	// scaleResync is cmd/csi-dmthin's controllerResync.
	scaleResync = 10 * time.Minute
	// scaleWait bounds each wait for a measurement to settle: one that
	// has not by then is broken, not slow.
	scaleWait = 5 * time.Minute
)

// scaleFigures are one run's measurements.
type scaleFigures struct {
	node   *nodeFootprint
	ctl    *controllerFootprint
	placed *placementTimes
}

// measureScale measures, on s, the first node's side, then the
// controller, then the placement of restores restores made at once with
// that controller running. The last node's side runs first, to warm the
// process's one-time caches (JSON's and the fakes' type information, a
// few hundred KiB), which would otherwise be charged to the first node's.
func measureScale(ctx context.Context, tb testing.TB, s *bigCluster, m *apiMeter, restores int) *scaleFigures {
	tb.Helper()
	measureNodeSide(ctx, tb, s, m, s.nodes[len(s.nodes)-1])
	f := &scaleFigures{node: measureNodeSide(ctx, tb, s, m, s.nodes[0])}
	stop, ctl := measureController(ctx, tb, s, m)
	defer stop()
	f.ctl = ctl
	f.placed = measurePlacement(tb, s, m, restores)
	return f
}

func BenchmarkScale(b *testing.B) {
	s := scaleCluster(b, scaleNodes, scalePVCsPerNode)
	m := newAPIMeter(s)
	// Before any restore is added: the cluster as seeded.
	seeded := s.seededSummary()
	sidecarObjects, err := sidecarsOn(s, s.nodes[0])
	if err != nil {
		b.Fatal(err)
	}
	sidecars := sidecarTable(s, s.nodes[0])
	// A thousand lines of the controllers' logs would bury the tables.
	ctx := klog.NewContext(context.Background(), klog.Logger{})
	var f *scaleFigures
	b.ResetTimer()
	for range b.N {
		f = measureScale(ctx, b, s, m, scaleRestores)
	}
	b.StopTimer()
	ctlWatches, _, ctlHeld, _ := f.ctl.totals()
	b.ReportMetric(float64(f.node.count("watch")), "node-watches")
	b.ReportMetric(float64(f.node.count("list")), "node-lists")
	b.ReportMetric(float64(f.node.heapBytes)/(1<<10), "node-heap-KiB")
	b.ReportMetric(float64(ctlWatches), "ctl-watches")
	b.ReportMetric(float64(ctlHeld), "ctl-objects")
	b.ReportMetric(mib(f.ctl.heapBytes), "ctl-heap-MiB")
	b.ReportMetric(msOf(f.placed.percentile(50)), "p50-ms")
	b.ReportMetric(msOf(f.placed.percentile(90)), "p90-ms")
	b.ReportMetric(msOf(f.placed.each[len(f.placed.each)-1]), "max-ms")
	b.ReportMetric(msOf(f.placed.all), "all-placed-ms")

	// Once, to stdout: a benchmark's log is cut at ten lines.
	fmt.Printf("cluster: %d nodes, %d claims per node; seeded %s\n\n", len(s.nodes), scalePVCsPerNode, seeded)
	fmt.Printf("issue 12's figures, one run (in-process fake API server: no network, no API server latency)\n%s\n\n", f.summary(len(s.nodes), sidecarObjects))
	fmt.Printf("node %s's side, as kubeSide.start builds it (two pools, beta over its 90%% mark), requests by step:\n%s\n\n", f.node.node, f.node.table())
	fmt.Printf("the controller, once for the cluster, as `csi-dmthin controller` runs it when it leads (%d workers):\n%s\n\n", scaleWorkers, f.ctl.table())
	fmt.Printf("restore placement: %d restores of snapshots on %d nodes, created at once with the controller running; from each Create's return to its selected-node update (the fake has no network or API server latency: a real cluster adds both to each request)\n%s\n\n",
		len(f.placed.each), len(f.placed.each), f.placed.table())
	fmt.Printf("the sidecars beside the driver on node %s, not run: each informer counted as a list with its scope:\n%s\n", s.nodes[0], sidecars)
}

// summary is issue 12's figures in one table.
func (f *scaleFigures) summary(nodes, sidecarObjects int) string {
	var sb strings.Builder
	w := tabwriter.NewWriter(&sb, 0, 4, 2, ' ', 0)
	fmt.Fprintln(w, "part\truns\twatches\tlists\tobjects cached\theap kept\twatches, whole cluster")
	nw, nl := f.node.count("watch"), f.node.count("list")
	fmt.Fprintf(w, "csi-dmthin node side\tevery node\t%d\t%d (own node's)\t0\t%.0f KiB\t%d\n", nw, nl, float64(f.node.heapBytes)/(1<<10), nw*nodes)
	cw, cl, held, _ := f.ctl.totals()
	fmt.Fprintf(w, "csi-dmthin controller\tonce\t%d\t%d\t%d\t%.1f MiB\t%d\n", cw, cl, held, mib(f.ctl.heapBytes), cw)
	sw := sidecarWatches()
	fmt.Fprintf(w, "sidecars (counted, not run)\tevery node\t%d\t%d\t%d\tnot measured\t%d\n", sw, sw, sidecarObjects, sw*nodes)
	w.Flush()
	p := f.placed
	fmt.Fprintf(&sb, "restore placement, %d restores at once, %d workers: p50 %v, p90 %v, max %v; all placed %v after the first create (no network or API server latency)",
		len(p.each), scaleWorkers, ms(p.percentile(50)), ms(p.percentile(90)), ms(p.each[len(p.each)-1]), ms(p.all))
	return sb.String()
}

func msOf(d time.Duration) float64 { return float64(d) / float64(time.Millisecond) }

// TestScaleFootprint runs the measurements on a three-node cluster, so that
// plain `go test` keeps them working. Their checks are the test: the node
// side opens no watch and lists only its own node's objects, the
// controller's informers hold what they list, and each restore is placed
// on its snapshot's node. Nothing is timed.
func TestScaleFootprint(t *testing.T) {
	s := scaleCluster(t, 3, scaleRestoreOf)
	if _, err := sidecarsOn(s, s.nodes[0]); err != nil {
		t.Fatal(err)
	}
	f := measureScale(context.Background(), t, s, newAPIMeter(s), len(s.nodes))
	if len(f.ctl.held) == 0 {
		t.Fatal("the controller watched nothing")
	}
	t.Logf("\n%s\n\n%s", f.node.table(), f.ctl.table())
}
