package saga

import "github.com/prometheus/client_golang/prometheus"

// orchestratorMetrics are an Orchestrator's metric descriptions, with its
// prefix as a constant label: orchestrators of several prefixes register
// side by side.
type orchestratorMetrics struct {
	started, steps, compensations, finished, fenced, leading *prometheus.Desc
}

func newOrchestratorMetrics(prefix string) orchestratorMetrics {
	l := prometheus.Labels{"prefix": prefix}
	return orchestratorMetrics{
		started:       prometheus.NewDesc("beacon_saga_started_total", "Sagas this orchestrator started.", nil, l),
		steps:         prometheus.NewDesc("beacon_saga_steps_total", "Actions this orchestrator recorded done.", nil, l),
		compensations: prometheus.NewDesc("beacon_saga_compensations_total", "Compensations this orchestrator recorded done.", nil, l),
		finished:      prometheus.NewDesc("beacon_saga_finished_total", "Sagas this orchestrator finished, by how.", []string{"status"}, l),
		fenced:        prometheus.NewDesc("beacon_saga_fenced_writes_total", "State writes refused because a newer leader led the shard.", nil, l),
		leading:       prometheus.NewDesc("beacon_saga_leading_shards", "Shards this orchestrator leads now.", nil, l),
	}
}

var _ prometheus.Collector = (*Orchestrator)(nil)

// Describe implements prometheus.Collector: register an Orchestrator with
// a registry to export its Stats (constant label prefix).
func (o *Orchestrator) Describe(ch chan<- *prometheus.Desc) {
	m := o.metrics
	for _, d := range []*prometheus.Desc{m.started, m.steps, m.compensations, m.finished, m.fenced, m.leading} {
		ch <- d
	}
}

// Collect implements prometheus.Collector.
func (o *Orchestrator) Collect(ch chan<- prometheus.Metric) {
	st, m := o.Stats(), o.metrics
	ch <- prometheus.MustNewConstMetric(m.started, prometheus.CounterValue, float64(st.Started))
	ch <- prometheus.MustNewConstMetric(m.steps, prometheus.CounterValue, float64(st.Steps))
	ch <- prometheus.MustNewConstMetric(m.compensations, prometheus.CounterValue, float64(st.Compensations))
	ch <- prometheus.MustNewConstMetric(m.finished, prometheus.CounterValue, float64(st.Done), string(Done))
	ch <- prometheus.MustNewConstMetric(m.finished, prometheus.CounterValue, float64(st.Compensated), string(Compensated))
	ch <- prometheus.MustNewConstMetric(m.finished, prometheus.CounterValue, float64(st.Stuck), string(Stuck))
	ch <- prometheus.MustNewConstMetric(m.fenced, prometheus.CounterValue, float64(st.Fenced))
	ch <- prometheus.MustNewConstMetric(m.leading, prometheus.GaugeValue, float64(st.Leading))
}
