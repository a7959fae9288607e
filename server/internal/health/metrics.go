package health

import (
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"beacon.dev/beacon/registry"
)

// Metrics are the checker's Prometheus metrics.
type Metrics struct {
	probes       *prometheus.CounterVec
	lateness     prometheus.Histogram
	transitions  *prometheus.CounterVec
	skipped      prometheus.Counter
	owned        prometheus.Gauge
	writeErrors  prometheus.Counter
	reconciled   prometheus.Counter
	deregistered prometheus.Counter
	conns        prometheus.GaugeFunc
	refused      prometheus.Counter
	all          []prometheus.Collector
}

func newMetrics(conns *connLimiter) *Metrics {
	m := &Metrics{
		probes: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "beacon_check_probes_total", Help: "Probes run by this server, by kind and result (pass, fail).",
		}, []string{"kind", "result"}),
		lateness: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name: "beacon_check_lateness_seconds", Help: "How late probes started after their scheduled time.",
			Buckets: prometheus.ExponentialBuckets(0.0001, 2, 16),
		}),
		transitions: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "beacon_check_transitions_total", Help: "Check status changes written to etcd, by new status.",
		}, []string{"to"}),
		skipped: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "beacon_check_skipped_total", Help: "Probe runs skipped because the previous one was still running or the probe pool was full.",
		}),
		owned: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "beacon_checks_owned", Help: "Checks this server runs.",
		}),
		writeErrors: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "beacon_check_write_errors_total", Help: "Failed writes of check transitions (retried).",
		}),
		reconciled: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "beacon_check_reconciled_total", Help: "Check statuses rewritten because the stored one disagreed with the owner's.",
		}),
		deregistered: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "beacon_check_deregistered_total", Help: "Instances removed after being critical longer than their check allows.",
		}),
		conns: prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Name: "beacon_check_conns", Help: "Probe connections open or being dialed (at most --check-max-conns).",
		}, func() float64 { return float64(conns.inUse()) }),
		refused: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "beacon_check_probes_refused_total", Help: "Probes given no verdict because the probe connections were at the limit (--check-max-conns).",
		}),
	}
	m.all = []prometheus.Collector{m.probes, m.lateness, m.transitions, m.skipped, m.owned, m.writeErrors, m.reconciled, m.deregistered, m.conns, m.refused}
	return m
}

func (m *Metrics) observeProbe(kind registry.CheckKind, ok bool, lateness time.Duration) {
	res := "fail"
	if ok {
		res = "pass"
	}
	m.probes.WithLabelValues(kind.String(), res).Inc()
	m.lateness.Observe(lateness.Seconds())
}

func (m *Metrics) observeRefused(lateness time.Duration) {
	m.refused.Inc()
	m.lateness.Observe(lateness.Seconds())
}

// Describe implements prometheus.Collector.
func (m *Metrics) Describe(ch chan<- *prometheus.Desc) {
	for _, c := range m.all {
		c.Describe(ch)
	}
}

// Collect implements prometheus.Collector.
func (m *Metrics) Collect(ch chan<- prometheus.Metric) {
	for _, c := range m.all {
		c.Collect(ch)
	}
}
