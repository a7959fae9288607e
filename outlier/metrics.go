package outlier

import "github.com/prometheus/client_golang/prometheus"

var (
	descEjected    = prometheus.NewDesc("beacon_outlier_ejected_endpoints", "Endpoints ejected by outlier detection now.", []string{"service"}, nil)
	descEjections  = prometheus.NewDesc("beacon_outlier_ejections_total", "Ejections since the detector started.", []string{"service"}, nil)
	descReadmitted = prometheus.NewDesc("beacon_outlier_readmissions_total", "Re-admissions since the detector started.", []string{"service"}, nil)
)

// WithName labels the detector's metrics with a service name.
func WithName(service string) Option { return func(d *Detector) { d.name = service } }

var _ prometheus.Collector = (*Detector)(nil)

// Describe implements prometheus.Collector.
func (d *Detector) Describe(ch chan<- *prometheus.Desc) {
	ch <- descEjected
	ch <- descEjections
	ch <- descReadmitted
}

// Collect implements prometheus.Collector.
func (d *Detector) Collect(ch chan<- prometheus.Metric) {
	st := d.Stats()
	ch <- prometheus.MustNewConstMetric(descEjected, prometheus.GaugeValue, float64(len(st.Ejected)), d.name)
	ch <- prometheus.MustNewConstMetric(descEjections, prometheus.CounterValue, float64(st.Ejections), d.name)
	ch <- prometheus.MustNewConstMetric(descReadmitted, prometheus.CounterValue, float64(st.Readmitted), d.name)
}
