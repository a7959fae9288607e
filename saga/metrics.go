package saga

import "github.com/prometheus/client_golang/prometheus"

var (
	descStarted       = prometheus.NewDesc("beacon_saga_started_total", "Sagas this orchestrator started.", nil, nil)
	descSteps         = prometheus.NewDesc("beacon_saga_steps_total", "Actions this orchestrator recorded done.", nil, nil)
	descCompensations = prometheus.NewDesc("beacon_saga_compensations_total", "Compensations this orchestrator recorded done.", nil, nil)
	descFinished      = prometheus.NewDesc("beacon_saga_finished_total", "Sagas this orchestrator finished, by how.", []string{"status"}, nil)
	descFenced        = prometheus.NewDesc("beacon_saga_fenced_writes_total", "State writes refused because a newer leader led the shard.", nil, nil)
	descLeading       = prometheus.NewDesc("beacon_saga_leading_shards", "Shards this orchestrator leads now.", nil, nil)
)

var _ prometheus.Collector = (*Orchestrator)(nil)

// Describe implements prometheus.Collector: register an Orchestrator with
// a registry to export its Stats.
func (o *Orchestrator) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{descStarted, descSteps, descCompensations, descFinished, descFenced, descLeading} {
		ch <- d
	}
}

// Collect implements prometheus.Collector.
func (o *Orchestrator) Collect(ch chan<- prometheus.Metric) {
	st := o.Stats()
	ch <- prometheus.MustNewConstMetric(descStarted, prometheus.CounterValue, float64(st.Started))
	ch <- prometheus.MustNewConstMetric(descSteps, prometheus.CounterValue, float64(st.Steps))
	ch <- prometheus.MustNewConstMetric(descCompensations, prometheus.CounterValue, float64(st.Compensations))
	ch <- prometheus.MustNewConstMetric(descFinished, prometheus.CounterValue, float64(st.Done), string(Done))
	ch <- prometheus.MustNewConstMetric(descFinished, prometheus.CounterValue, float64(st.Compensated), string(Compensated))
	ch <- prometheus.MustNewConstMetric(descFinished, prometheus.CounterValue, float64(st.Stuck), string(Stuck))
	ch <- prometheus.MustNewConstMetric(descFenced, prometheus.CounterValue, float64(st.Fenced))
	ch <- prometheus.MustNewConstMetric(descLeading, prometheus.GaugeValue, float64(st.Leading))
}
