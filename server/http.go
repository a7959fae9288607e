package server

import (
	"context"
	"errors"
	"net/http"
	"strings"
	"time"

	"connectrpc.com/connect"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"go.opentelemetry.io/contrib/instrumentation/net/http/otelhttp"
	"go.opentelemetry.io/otel/propagation"
	"google.golang.org/protobuf/encoding/protojson"

	beaconv1 "beacon.dev/beacon/api/beacon/v1"
	"beacon.dev/beacon/api/beacon/v1/beaconv1connect"
)

func (s *Server) routes() http.Handler {
	mux := http.NewServeMux()
	// Every API service: the same codecs, body limits and interceptors,
	// behind the same guard.
	opts := []connect.HandlerOption{
		connect.WithCodec(strictJSON{"json"}),
		connect.WithCodec(strictJSON{"json; charset=utf-8"}),
		connect.WithReadMaxBytes(s.cfg.Limits.MaxRequestBytes),
		gzipOption(s.cfg.Limits.MaxRequestBytes),
		connect.WithInterceptors(s.metrics.interceptor(), auditInterceptor{s.audit}, limitsInterceptor{s}, ownDeadlineInterceptor{}),
	}
	mux.Handle(s.guarded(beaconv1connect.NewRegistryServiceHandler(api{s}, opts...)))
	mux.Handle(s.guarded(beaconv1connect.NewAclServiceHandler(aclAPI{s}, opts...)))
	mux.Handle(s.guarded(beaconv1connect.NewKVServiceHandler(kvAPI{s}, opts...)))
	mux.Handle(s.guarded(beaconv1connect.NewLockServiceHandler(lockAPI{s}, opts...)))
	mux.HandleFunc("GET /livez", func(w http.ResponseWriter, _ *http.Request) { w.Write([]byte("ok\n")) })
	mux.HandleFunc("GET /readyz", s.handleReady)
	mux.HandleFunc("GET /healthz", s.handleHealth)
	mux.Handle("GET /metrics", promhttp.HandlerFor(s.metrics.reg, promhttp.HandlerOpts{}))
	mux.Handle("GET /v1/watch", s.guardAPI(http.HandlerFunc(s.handleWatchNDJSON)))
	mux.Handle("GET "+promSDPath, s.guardAPI(http.HandlerFunc(s.handlePromSD)))
	if tp := s.cfg.TracerProvider; tp != nil {
		return otelhttp.NewHandler(mux, "beacon", otelhttp.WithTracerProvider(tp),
			otelhttp.WithPropagators(propagation.TraceContext{}), otelhttp.WithSpanNameFormatter(spanName))
	}
	return mux
}

// spanName names an API request's span by what it calls, from a bounded
// set: the procedure (beacon.v1.RegistryService/Register), one of the
// fixed paths, or the method alone — never a raw path a client chose.
func spanName(_ string, r *http.Request) string {
	p := r.URL.Path
	switch {
	case strings.HasPrefix(p, "/beacon.v1.") && strings.Count(p, "/") == 2 && len(p) <= 128:
		return p[1:]
	case p == "/v1/watch", p == promSDPath, p == "/livez", p == "/readyz", p == "/healthz", p == "/metrics":
		return r.Method + " " + p
	default:
		return "HTTP " + r.Method
	}
}

// guarded puts an API service's handler behind guardAPI.
func (s *Server) guarded(path string, h http.Handler) (string, http.Handler) {
	return path, s.guardAPI(h)
}

// handleReady is 503 until the view has loaded, and while etcd has an
// alarm raised (NOSPACE: every write is refused), with the reason.
func (s *Server) handleReady(w http.ResponseWriter, _ *http.Request) {
	select {
	case <-s.ready:
	default:
		http.Error(w, "not ready", http.StatusServiceUnavailable)
		return
	}
	if reason := s.space.alarmReason(); reason != "" {
		http.Error(w, "not ready: "+reason, http.StatusServiceUnavailable)
		return
	}
	w.Write([]byte("ready\n"))
}

// handleHealth is readiness (etcd alarms included) plus a live round trip
// to etcd.
func (s *Server) handleHealth(w http.ResponseWriter, r *http.Request) {
	select {
	case <-s.ready:
	default:
		http.Error(w, "not ready", http.StatusServiceUnavailable)
		return
	}
	if reason := s.space.alarmReason(); reason != "" {
		http.Error(w, "unhealthy: "+reason, http.StatusServiceUnavailable)
		return
	}
	ctx, cancel := context.WithTimeout(r.Context(), 2*time.Second)
	defer cancel()
	if _, err := s.store.CurrentRevision(ctx); err != nil {
		http.Error(w, "etcd unreachable: "+err.Error(), http.StatusServiceUnavailable)
		return
	}
	w.Write([]byte("ok\n"))
}

// handleWatchNDJSON serves a watch as newline-delimited JSON for curl:
// GET /v1/watch?namespace=default&service=orders&service=payments.
// Each line is a WatchResponse in the API's JSON form.
func (s *Server) handleWatchNDJSON(w http.ResponseWriter, r *http.Request) {
	q := r.URL.Query()
	msg := &beaconv1.WatchRequest{Namespace: q.Get("namespace"), Services: q["service"]}
	w2, release, err := api{s}.subscribe(r.Context(), msg)
	if err != nil {
		writeConnectErrorAsHTTP(w, err)
		return
	}
	defer release()
	s.metrics.watchStreams.Inc()
	defer s.metrics.watchStreams.Dec()
	w.Header().Set("Content-Type", "application/x-ndjson")
	w.WriteHeader(http.StatusOK)
	rc := http.NewResponseController(w)
	var buf []byte
	valid := recheck(r.Context())
	recheckTimer := time.NewTimer(time.Minute)
	defer recheckTimer.Stop()
	for {
		pending, synced, err := nextMessage(r.Context(), w2, recheckTimer)
		recheckTimer.Reset(time.Minute)
		if valid() != nil {
			return // the token is gone: so is its stream
		}
		if errors.Is(err, context.DeadlineExceeded) && r.Context().Err() == nil {
			continue // a quiet minute: check the token again
		}
		if err != nil {
			return
		}
		resp := &beaconv1.WatchResponse{Synced: synced, ResultsFiltered: w2.hidden()}
		for _, p := range pending {
			resp.Snapshots = append(resp.Snapshots, w2.snapshot(p))
		}
		line, _ := protojson.MarshalOptions{Multiline: false}.MarshalAppend(buf[:0], resp)
		line = append(line, '\n')
		// Keep the buffer for the next message unless one large snapshot
		// grew it: a stalled watcher holds at most one message.
		if cap(line) <= 2*maxWatchMessageBytes {
			buf = line
		}
		if _, err := w.Write(line); err != nil {
			return
		}
		if err := rc.Flush(); err != nil {
			return
		}
		s.metrics.observeSent(pending)
	}
}

func writeConnectErrorAsHTTP(w http.ResponseWriter, err error) {
	code := connect.CodeOf(err)
	status := http.StatusInternalServerError
	switch code {
	case connect.CodeInvalidArgument:
		status = http.StatusBadRequest
	case connect.CodeUnavailable:
		status = http.StatusServiceUnavailable
	case connect.CodeNotFound:
		status = http.StatusNotFound
	case connect.CodeResourceExhausted:
		status = http.StatusTooManyRequests
	case connect.CodeUnauthenticated:
		status = http.StatusUnauthorized
	case connect.CodePermissionDenied:
		status = http.StatusForbidden
	}
	var ce *connect.Error
	if errors.As(err, &ce) {
		for k, v := range ce.Meta() {
			w.Header()[k] = v
		}
	}
	http.Error(w, err.Error(), status)
}
