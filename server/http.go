package server

import (
	"context"
	"net/http"
	"time"

	"connectrpc.com/connect"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"google.golang.org/protobuf/encoding/protojson"

	beaconv1 "beacon.dev/beacon/api/beacon/v1"
	"beacon.dev/beacon/api/beacon/v1/beaconv1connect"
	"beacon.dev/beacon/internal/wire"
)

// maxRequestBytes bounds one API request; an instance record is far smaller.
const maxRequestBytes = 1 << 20

func (s *Server) routes() http.Handler {
	mux := http.NewServeMux()
	path, h := beaconv1connect.NewRegistryServiceHandler(api{s},
		connect.WithCodec(strictJSON{"json"}),
		connect.WithCodec(strictJSON{"json; charset=utf-8"}),
		connect.WithReadMaxBytes(maxRequestBytes),
		connect.WithInterceptors(s.metrics.interceptor()),
	)
	mux.Handle(path, h)
	mux.HandleFunc("GET /livez", func(w http.ResponseWriter, _ *http.Request) { w.Write([]byte("ok\n")) })
	mux.HandleFunc("GET /readyz", s.handleReady)
	mux.HandleFunc("GET /healthz", s.handleHealth)
	mux.Handle("GET /metrics", promhttp.HandlerFor(s.metrics.reg, promhttp.HandlerOpts{}))
	mux.HandleFunc("GET /v1/watch", s.handleWatchNDJSON)
	return mux
}

func (s *Server) handleReady(w http.ResponseWriter, _ *http.Request) {
	select {
	case <-s.ready:
		w.Write([]byte("ready\n"))
	default:
		http.Error(w, "not ready", http.StatusServiceUnavailable)
	}
}

// handleHealth is readiness plus a live round trip to etcd.
func (s *Server) handleHealth(w http.ResponseWriter, r *http.Request) {
	select {
	case <-s.ready:
	default:
		http.Error(w, "not ready", http.StatusServiceUnavailable)
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
	sub, err := api{s}.subscribe(r.Context(), msg)
	if err != nil {
		writeConnectErrorAsHTTP(w, err)
		return
	}
	defer sub.Close()
	s.metrics.watchStreams.Inc()
	defer s.metrics.watchStreams.Dec()
	w.Header().Set("Content-Type", "application/x-ndjson")
	w.WriteHeader(http.StatusOK)
	rc := http.NewResponseController(w)
	for {
		pending, first, err := sub.Next(r.Context())
		if err != nil {
			return
		}
		resp := &beaconv1.WatchResponse{Synced: first}
		for _, p := range pending {
			resp.Snapshots = append(resp.Snapshots, wire.SnapshotToProto(p.Snap))
		}
		line, _ := protojson.MarshalOptions{Multiline: false}.Marshal(resp)
		if _, err := w.Write(append(line, '\n')); err != nil {
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
	}
	http.Error(w, err.Error(), status)
}
