package proxy

import (
	"strconv"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// metrics are the proxy's Prometheus metrics. Labels are bounded by the
// configuration: route, service and listener names, and status classes.
type metrics struct {
	requests    *prometheus.CounterVec
	duration    *prometheus.HistogramVec
	attempts    *prometheus.CounterVec
	retries     *prometheus.CounterVec
	unrouted    prometheus.Counter
	conns       *prometheus.GaugeVec
	rejected    *prometheus.CounterVec
	reloads     prometheus.Counter
	reloadFails prometheus.Counter
	tcp         *prometheus.CounterVec
	handoffs    *prometheus.CounterVec
	all         []prometheus.Collector
}

func newMetrics(reg *prometheus.Registry) *metrics {
	m := &metrics{
		requests: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "beacon_proxy_requests_total",
			Help: "HTTP requests by route, upstream service and status class (1xx..5xx)."}, []string{"route", "service", "code"}),
		duration: prometheus.NewHistogramVec(prometheus.HistogramOpts{Name: "beacon_proxy_request_duration_seconds",
			Help:    "Time from a request's arrival to the end of its response, retries included.",
			Buckets: []float64{.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30}}, []string{"route", "service"}),
		attempts: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "beacon_proxy_upstream_attempts_total",
			Help: "Requests sent to an upstream instance: first tries, retries and hedges."}, []string{"route", "service"}),
		retries: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "beacon_proxy_retries_total",
			Help: "Attempts beyond each request's first (retries and hedges)."}, []string{"route", "service"}),
		unrouted: prometheus.NewCounter(prometheus.CounterOpts{Name: "beacon_proxy_unrouted_requests_total",
			Help: "Requests no route matched (answered 404)."}),
		conns: prometheus.NewGaugeVec(prometheus.GaugeOpts{Name: "beacon_proxy_connections",
			Help: "Open client connections per listener."}, []string{"listener"}),
		rejected: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "beacon_proxy_connections_rejected_total",
			Help: "Connections closed at once because the listener had maxConnections open."}, []string{"listener"}),
		reloads: prometheus.NewCounter(prometheus.CounterOpts{Name: "beacon_proxy_config_reloads_total",
			Help: "Configurations applied by a reload."}),
		reloadFails: prometheus.NewCounter(prometheus.CounterOpts{Name: "beacon_proxy_config_reload_failures_total",
			Help: "Reloads refused (invalid file, or a change that needs a restart); the old configuration stayed."}),
		tcp: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "beacon_proxy_tcp_connections_total",
			Help: "TCP connections by route, service and result (proxied, failed)."}, []string{"route", "service", "result"}),
		handoffs: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "beacon_proxy_handoffs_total",
			Help: "Connections the HTTP/1.1 fast path handed to net/http, by the reason of the request that did not suit it (docs/proxy.md)."}, []string{"reason"}),
	}
	m.all = []prometheus.Collector{m.requests, m.duration, m.attempts, m.retries, m.unrouted, m.conns, m.rejected, m.reloads, m.reloadFails, m.tcp, m.handoffs}
	reg.MustRegister(m)
	return m
}

// Describe implements prometheus.Collector.
func (m *metrics) Describe(ch chan<- *prometheus.Desc) {
	for _, c := range m.all {
		c.Describe(ch)
	}
}

// Collect implements prometheus.Collector.
func (m *metrics) Collect(ch chan<- prometheus.Metric) {
	for _, c := range m.all {
		c.Collect(ch)
	}
}

// routeMetrics are one route's series, resolved once.
type routeMetrics struct {
	codes    [6]prometheus.Counter // by status class; [0]: other
	duration prometheus.Observer
	attempts prometheus.Counter
	retries  prometheus.Counter
}

func (m *metrics) forRoute(route, service string) routeMetrics {
	rm := routeMetrics{
		duration: m.duration.WithLabelValues(route, service),
		attempts: m.attempts.WithLabelValues(route, service),
		retries:  m.retries.WithLabelValues(route, service),
	}
	rm.codes[0] = m.requests.WithLabelValues(route, service, "other")
	for i := 1; i <= 5; i++ {
		rm.codes[i] = m.requests.WithLabelValues(route, service, strconv.Itoa(i)+"xx")
	}
	return rm
}

func (rm routeMetrics) done(code int, d time.Duration, attempts int) {
	class := code / 100
	if class < 1 || class > 5 {
		class = 0
	}
	rm.codes[class].Inc()
	rm.duration.Observe(d.Seconds())
	if attempts > 0 {
		rm.attempts.Add(float64(attempts))
	}
	if attempts > 1 {
		rm.retries.Add(float64(attempts - 1))
	}
}
