package blockcopy

import "github.com/prometheus/client_golang/prometheus"

// Roles and results, the values of the metrics' labels.
const (
	roleSource = "source"
	roleTarget = "target"

	resultDone         = "done"
	resultFailed       = "failed"
	resultCancelled    = "cancelled"
	resultVerifyFailed = "verify_failed"
)

// Metrics are the copy's Prometheus collectors. The package registers
// nothing itself: the caller passes Collectors to its registry. A nil
// *Metrics records nothing.
type Metrics struct {
	sentBytes     prometheus.Counter
	receivedBytes prometheus.Counter
	inProgress    *prometheus.GaugeVec
	finished      *prometheus.CounterVec
	authRefusals  *prometheus.CounterVec
}

// NewMetrics returns unregistered collectors named <namespace>_copy_*
// (csi-dmthin's: csi_dmthin_copy_*).
func NewMetrics(namespace string) *Metrics {
	m := &Metrics{
		sentBytes: prometheus.NewCounter(prometheus.CounterOpts{
			Namespace: namespace, Subsystem: "copy", Name: "sent_bytes_total",
			Help: "Bytes of mapped extents the source node sent in data frames.",
		}),
		receivedBytes: prometheus.NewCounter(prometheus.CounterOpts{
			Namespace: namespace, Subsystem: "copy", Name: "received_bytes_total",
			Help: "Bytes of mapped extents the target node received and wrote.",
		}),
		inProgress: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Namespace: namespace, Subsystem: "copy", Name: "copies_in_progress",
			Help: "Copies open on this node: role source counts open sources, role target running Copy calls.",
		}, []string{"role"}),
		finished: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: namespace, Subsystem: "copy", Name: "copies_finished_total",
			Help: "Copy calls that ended on the target node, by result (done, failed, cancelled, verify_failed).",
		}, []string{"result"}),
		authRefusals: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: namespace, Subsystem: "copy", Name: "auth_refusals_total",
			Help: "Requests the source node refused, by reason (missing_token, token_refused, user_not_allowed).",
		}, []string{"reason"}),
	}
	// Expose every label value from the start, so a dashboard shows 0
	// rather than no series.
	for _, r := range []string{roleSource, roleTarget} {
		m.inProgress.WithLabelValues(r)
	}
	for _, r := range []string{resultDone, resultFailed, resultCancelled, resultVerifyFailed} {
		m.finished.WithLabelValues(r)
	}
	for _, r := range []string{reasonMissingToken, reasonTokenRefused, reasonUserNotAllowed} {
		m.authRefusals.WithLabelValues(r)
	}
	return m
}

// Collectors returns the collectors to register.
func (m *Metrics) Collectors() []prometheus.Collector {
	return []prometheus.Collector{m.sentBytes, m.receivedBytes, m.inProgress, m.finished, m.authRefusals}
}

func (m *Metrics) addSent(n int64) {
	if m != nil {
		m.sentBytes.Add(float64(n))
	}
}

func (m *Metrics) addReceived(n int64) {
	if m != nil {
		m.receivedBytes.Add(float64(n))
	}
}

func (m *Metrics) inProgressAdd(role string, d float64) {
	if m != nil {
		m.inProgress.WithLabelValues(role).Add(d)
	}
}

func (m *Metrics) finish(result string) {
	if m != nil {
		m.finished.WithLabelValues(result).Inc()
	}
}

func (m *Metrics) refuse(reason string) {
	if m != nil {
		m.authRefusals.WithLabelValues(reason).Inc()
	}
}
