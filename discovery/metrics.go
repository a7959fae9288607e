package discovery

import "github.com/prometheus/client_golang/prometheus"

var (
	descStale     = prometheus.NewDesc("beacon_discovery_stale_seconds", "How long the registry has not confirmed the cached data (0 while the watch is connected).", nil, nil)
	descFromDisk  = prometheus.NewDesc("beacon_discovery_from_disk", "1 while some sets come from the on-disk snapshot.", nil, nil)
	descEndpoints = prometheus.NewDesc("beacon_discovery_endpoints", "Endpoints in a service's set, suspects included.", []string{"service"}, nil)
	descSuspects  = prometheus.NewDesc("beacon_discovery_suspect_endpoints", "Endpoints kept after a mass loss, per service.", []string{"service"}, nil)
)

var _ prometheus.Collector = (*Cache)(nil)

// Describe implements prometheus.Collector; register the Cache with a
// registry to export its state.
func (c *Cache) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{descStale, descFromDisk, descEndpoints, descSuspects} {
		ch <- d
	}
}

// Collect implements prometheus.Collector.
func (c *Cache) Collect(ch chan<- prometheus.Metric) {
	st := c.Status()
	fromDisk := 0.0
	if st.FromDisk {
		fromDisk = 1
	}
	ch <- prometheus.MustNewConstMetric(descStale, prometheus.GaugeValue, st.Stale.Seconds())
	ch <- prometheus.MustNewConstMetric(descFromDisk, prometheus.GaugeValue, fromDisk)
	c.mu.Lock()
	defer c.mu.Unlock()
	for name, e := range c.services {
		ch <- prometheus.MustNewConstMetric(descEndpoints, prometheus.GaugeValue, float64(len(e.set.Endpoints)), name)
		ch <- prometheus.MustNewConstMetric(descSuspects, prometheus.GaugeValue, float64(len(e.held)), name)
	}
}
