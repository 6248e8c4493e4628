package e2e

import (
	"strings"
	"testing"
	"time"
)

func TestPercentile(t *testing.T) {
	var twenty []time.Duration
	for i := 20; i >= 1; i-- { // unsorted on purpose
		twenty = append(twenty, time.Duration(i)*time.Second)
	}
	for _, c := range []struct {
		samples []time.Duration
		p       float64
		want    time.Duration
	}{
		{twenty, 50, 10 * time.Second},
		{twenty, 99, 20 * time.Second},
		{twenty, 95, 19 * time.Second},
		{twenty, 0, time.Second},
		{[]time.Duration{3 * time.Second}, 50, 3 * time.Second},
		{nil, 50, 0},
	} {
		if got := percentile(c.samples, c.p); got != c.want {
			t.Errorf("p%v of %d samples: %v, want %v", c.p, len(c.samples), got, c.want)
		}
	}
}

// The verdict is computed from the p50s: met at or under the target, missed
// over it.
func TestPodStartReportVerdict(t *testing.T) {
	side := func(name string, d time.Duration) podStartSide {
		s := podStartSide{name: name, byNode: map[string][]time.Duration{}}
		for i := range 20 {
			s.running = append(s.running, d+time.Duration(i)*time.Millisecond)
			s.scheduled = append(s.scheduled, d/2)
			s.byNode["n"] = append(s.byNode["n"], d)
		}
		return s
	}
	for _, c := range []struct {
		claim time.Duration
		want  string
	}{
		{14 * time.Second, "**met** (1.40x)"},
		{16 * time.Second, "**missed** (1.60x)"},
	} {
		r := podStartReport(side("emptydir", 10*time.Second), side("pvc", c.claim), 2, "n present")
		if !strings.Contains(r, c.want) {
			t.Errorf("PVC at %v: report lacks %q:\n%s", c.claim, c.want, r)
		}
	}
}
