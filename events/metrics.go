package events

import "github.com/prometheus/client_golang/prometheus"

var (
	descHandled      = prometheus.NewDesc("beacon_events_handled_total", "Events whose handler succeeded.", []string{"group"}, nil)
	descRetries      = prometheus.NewDesc("beacon_events_retries_total", "Handler attempts after a failure.", []string{"group"}, nil)
	descDeadLettered = prometheus.NewDesc("beacon_events_dead_lettered_total", "Events sent to a dead-letter topic.", []string{"group"}, nil)
	descCommits      = prometheus.NewDesc("beacon_events_commits_total", "Offset commits made.", []string{"group"}, nil)
	descLag          = prometheus.NewDesc("beacon_events_lag", "Events of this member's partitions waiting on the brokers past what it finished, as of its last round.", []string{"group"}, nil)
)

var _ prometheus.Collector = (*Consumer)(nil)

// Describe implements prometheus.Collector: register a Consumer with a
// registry to export its Stats (label group).
func (c *Consumer) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{descHandled, descRetries, descDeadLettered, descCommits, descLag} {
		ch <- d
	}
}

// Collect implements prometheus.Collector.
func (c *Consumer) Collect(ch chan<- prometheus.Metric) {
	st, g := c.Stats(), c.cfg.Group
	ch <- prometheus.MustNewConstMetric(descHandled, prometheus.CounterValue, float64(st.Handled), g)
	ch <- prometheus.MustNewConstMetric(descRetries, prometheus.CounterValue, float64(st.Retries), g)
	ch <- prometheus.MustNewConstMetric(descDeadLettered, prometheus.CounterValue, float64(st.DeadLettered), g)
	ch <- prometheus.MustNewConstMetric(descCommits, prometheus.CounterValue, float64(st.Committed), g)
	ch <- prometheus.MustNewConstMetric(descLag, prometheus.GaugeValue, float64(st.Lag), g)
}
