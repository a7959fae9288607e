package server

import (
	"context"
	"errors"
	"time"

	"connectrpc.com/connect"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"

	"beacon.dev/beacon/api/beacon/v1/beaconv1connect"
	"beacon.dev/beacon/internal/store"
	"beacon.dev/beacon/server/internal/view"
)

// metrics are the server's Prometheus metrics. Names are stable; labels
// carry only bounded values (procedure names, codes, results).
type metrics struct {
	reg          *prometheus.Registry
	requests     *prometheus.CounterVec
	duration     *prometheus.HistogramVec
	keepalives   *prometheus.CounterVec
	sent         prometheus.Counter
	coalesced    prometheus.Counter
	fanout       prometheus.Histogram
	relists      *prometheus.CounterVec
	badRecords   prometheus.Counter
	watchStreams prometheus.Gauge

	guardTriggered prometheus.Counter

	limitHits      *prometheus.CounterVec
	consulRequests *prometheus.CounterVec
	lockAcquires   *prometheus.CounterVec
	lockWait       prometheus.Histogram
	fenced         prometheus.Counter
	auditErrors    prometheus.Counter
	writeTimeouts  func()
}

func newMetrics(s *Server) *metrics {
	m := &metrics{reg: prometheus.NewRegistry()}
	m.requests = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "beacon_requests_total", Help: "API calls by procedure and result code.",
	}, []string{"procedure", "code"})
	m.duration = prometheus.NewHistogramVec(prometheus.HistogramOpts{
		Name: "beacon_request_duration_seconds", Help: "Unary API call latency by procedure.",
		Buckets: prometheus.ExponentialBuckets(0.0001, 2, 16),
	}, []string{"procedure"})
	m.keepalives = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "beacon_session_keepalives_total", Help: "Session keepalives by result (ok, expired, error).",
	}, []string{"result"})
	m.sent = prometheus.NewCounter(prometheus.CounterOpts{
		Name: "beacon_watch_snapshots_sent_total", Help: "Service snapshots sent to watchers.",
	})
	m.coalesced = prometheus.NewCounter(prometheus.CounterOpts{
		Name: "beacon_watch_snapshots_coalesced_total", Help: "Snapshots replaced by a newer one before a slow watcher read them.",
	})
	m.fanout = prometheus.NewHistogram(prometheus.HistogramOpts{
		Name: "beacon_watch_propagation_seconds", Help: "Time from a change reaching the server's view to its snapshot being written to a watcher.",
		Buckets: prometheus.ExponentialBuckets(0.00005, 2, 18),
	})
	m.relists = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "beacon_view_relists_total", Help: "Full listings of the registry by reason (start, compacted, watch_ended).",
	}, []string{"reason"})
	m.badRecords = prometheus.NewCounter(prometheus.CounterOpts{
		Name: "beacon_view_bad_records_total", Help: "Records in etcd that could not be decoded and were ignored.",
	})
	m.watchStreams = prometheus.NewGauge(prometheus.GaugeOpts{
		Name: "beacon_watchers", Help: "Open watch streams.",
	})
	m.auditErrors = prometheus.NewCounter(prometheus.CounterOpts{
		Name: "beacon_audit_errors_total", Help: "Audit log lines that could not be written (the calls went on).",
	})
	m.reg.MustRegister(m.auditErrors)
	m.lockAcquires = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "beacon_lock_acquisitions_total", Help: "Lock Acquire calls by result (acquired, busy: not in the time asked, error).",
	}, []string{"result"})
	m.lockWait = prometheus.NewHistogram(prometheus.HistogramOpts{
		Name: "beacon_lock_wait_seconds", Help: "Time an Acquire call that got its lock waited for it (contention).",
		Buckets: prometheus.ExponentialBuckets(0.001, 4, 10),
	})
	m.fenced = prometheus.NewCounter(prometheus.CounterOpts{
		Name: "beacon_kv_fenced_writes_total", Help: "KV writes refused by their fence: the lock was no longer held with their token.",
	})
	m.reg.MustRegister(m.lockAcquires, m.lockWait, m.fenced,
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "beacon_lock_waits_in_flight", Help: "Acquire calls waiting for a lock (at most --max-lock-waits)."},
			func() float64 { return float64(s.lockWaits.Load()) }))
	m.consulRequests = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "beacon_consul_requests_total", Help: "Requests to the Consul-compatible API (--consul-addr), by endpoint.",
	}, []string{"endpoint"})
	m.reg.MustRegister(m.consulRequests,
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "beacon_consul_blocking_queries", Help: "Consul blocking queries waiting (at most --max-consul-blocking)."},
			func() float64 { return float64(s.consulBlocking.Load()) }))
	m.limitHits = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "beacon_limit_refusals_total", Help: "Requests and connections refused because they reached a limit, by the limit's flag.",
	}, []string{"limit"})
	timeouts := prometheus.NewCounter(prometheus.CounterOpts{
		Name: "beacon_write_timeouts_total", Help: "Calls and watch streams cut because their client did not read a response for --write-timeout.",
	})
	m.writeTimeouts = timeouts.Inc
	m.reg.MustRegister(m.limitHits, timeouts,
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "beacon_client_connections", Help: "Open client connections (at most --max-conns)."},
			func() float64 { return float64(s.conns.Open()) }),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "beacon_awaits_in_flight", Help: "AwaitWatchers calls waiting (at most --max-awaits)."},
			func() float64 { return float64(s.awaits.Load()) }))
	stat := func(f func(view.Stats) int) func() float64 {
		return func() float64 {
			if !s.isReady() {
				return 0
			}
			return float64(f(s.view.Stats()))
		}
	}
	m.guardTriggered = prometheus.NewCounter(prometheus.CounterOpts{
		Name: "beacon_guard_triggered_total", Help: "Times the mass-expiry guard held back the instances of expired sessions.",
	})
	m.reg.MustRegister(m.guardTriggered, m.requests, m.duration, m.keepalives, m.sent, m.coalesced, m.fanout,
		m.relists, m.badRecords, m.watchStreams,
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "beacon_sessions", Help: "Live sessions."},
			stat(func(st view.Stats) int { return st.Sessions })),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "beacon_instances", Help: "Registered instances."},
			stat(func(st view.Stats) int { return st.Instances })),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "beacon_services", Help: "Services with at least one instance."},
			stat(func(st view.Stats) int { return st.Services })),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "beacon_watch_pending_snapshots", Help: "Snapshots queued for watchers and not yet sent (at most one per watcher and service)."},
			stat(func(st view.Stats) int { return st.Pending })),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "beacon_view_revision", Help: "etcd revision the server's view has applied."},
			func() float64 {
				if !s.isReady() {
					return 0
				}
				return float64(s.view.Revision())
			}),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "beacon_guard_held_instances", Help: "Instances of expired sessions the mass-expiry guard keeps as suspects."},
			func() float64 {
				if !s.isReady() {
					return 0
				}
				return float64(s.view.HeldCount())
			}),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "beacon_acknowledging_watchers", Help: "Open watch streams whose clients acknowledge applied revisions."},
			func() float64 { return float64(s.acks.count()) }),
		collectors.NewGoCollector(),
		collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}),
	)
	m.reg.MustRegister(&s.space) // beacon_etcd_*: space.go
	return m
}

func (m *metrics) viewHooks() view.Hooks {
	started := false
	return view.Hooks{
		Relisted: func(compacted bool) {
			reason := "watch_ended"
			switch {
			case !started:
				reason, started = "start", true
			case compacted:
				reason = "compacted"
			}
			m.relists.WithLabelValues(reason).Inc()
		},
		BadRecord: func(string, error) { m.badRecords.Inc() },
	}
}

func (m *metrics) countKeepAlive(err error) {
	switch {
	case err == nil:
		m.keepalives.WithLabelValues("ok").Inc()
	case errors.Is(err, store.ErrSessionNotFound):
		m.keepalives.WithLabelValues("expired").Inc()
	default:
		m.keepalives.WithLabelValues("error").Inc()
	}
}

// interceptor counts every call and times unary ones.
func (m *metrics) interceptor() connect.Interceptor { return metricsInterceptor{m} }

type metricsInterceptor struct{ m *metrics }

func (i metricsInterceptor) WrapUnary(next connect.UnaryFunc) connect.UnaryFunc {
	return func(ctx context.Context, req connect.AnyRequest) (connect.AnyResponse, error) {
		start := time.Now()
		resp, err := next(ctx, req)
		proc := req.Spec().Procedure
		i.m.duration.WithLabelValues(proc).Observe(time.Since(start).Seconds())
		i.m.requests.WithLabelValues(proc, codeOf(err)).Inc()
		return resp, err
	}
}

func (i metricsInterceptor) WrapStreamingClient(next connect.StreamingClientFunc) connect.StreamingClientFunc {
	return next
}

func (i metricsInterceptor) WrapStreamingHandler(next connect.StreamingHandlerFunc) connect.StreamingHandlerFunc {
	return func(ctx context.Context, conn connect.StreamingHandlerConn) error {
		if conn.Spec().Procedure == beaconv1connect.RegistryServiceWatchProcedure {
			i.m.watchStreams.Inc()
			defer i.m.watchStreams.Dec()
		}
		err := next(ctx, conn)
		i.m.requests.WithLabelValues(conn.Spec().Procedure, codeOf(err)).Inc()
		return err
	}
}

func codeOf(err error) string {
	if err == nil {
		return "ok"
	}
	var ce *connect.Error
	if errors.As(err, &ce) {
		return ce.Code().String()
	}
	return connect.CodeUnknown.String()
}
