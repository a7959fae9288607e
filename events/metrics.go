package events

import "github.com/prometheus/client_golang/prometheus"

// consumerMetrics are a Consumer's metric descriptions, with its group as
// a constant label: consumers of several groups register side by side.
type consumerMetrics struct {
	handled, retries, deadLettered, commits, lag *prometheus.Desc
}

func newConsumerMetrics(group string) consumerMetrics {
	l := prometheus.Labels{"group": group}
	return consumerMetrics{
		handled:      prometheus.NewDesc("beacon_events_handled_total", "Events whose handler succeeded.", nil, l),
		retries:      prometheus.NewDesc("beacon_events_retries_total", "Handler attempts after a failure.", nil, l),
		deadLettered: prometheus.NewDesc("beacon_events_dead_lettered_total", "Events sent to a dead-letter topic.", nil, l),
		commits:      prometheus.NewDesc("beacon_events_commits_total", "Offset commits made.", nil, l),
		lag:          prometheus.NewDesc("beacon_events_lag", "Events of this member's partitions waiting on the brokers past what it finished, as of its last round.", nil, l),
	}
}

var _ prometheus.Collector = (*Consumer)(nil)

// Describe implements prometheus.Collector: register a Consumer with a
// registry to export its Stats (constant label group).
func (c *Consumer) Describe(ch chan<- *prometheus.Desc) {
	m := c.metrics
	for _, d := range []*prometheus.Desc{m.handled, m.retries, m.deadLettered, m.commits, m.lag} {
		ch <- d
	}
}

// Collect implements prometheus.Collector.
func (c *Consumer) Collect(ch chan<- prometheus.Metric) {
	st, m := c.Stats(), c.metrics
	ch <- prometheus.MustNewConstMetric(m.handled, prometheus.CounterValue, float64(st.Handled))
	ch <- prometheus.MustNewConstMetric(m.retries, prometheus.CounterValue, float64(st.Retries))
	ch <- prometheus.MustNewConstMetric(m.deadLettered, prometheus.CounterValue, float64(st.DeadLettered))
	ch <- prometheus.MustNewConstMetric(m.commits, prometheus.CounterValue, float64(st.Committed))
	ch <- prometheus.MustNewConstMetric(m.lag, prometheus.GaugeValue, float64(st.Lag))
}
