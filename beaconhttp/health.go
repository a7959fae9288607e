package beaconhttp

import (
	"encoding/json"
	"fmt"
	"net/http"
	"sync/atomic"
)

// State is where a service is in its lifecycle.
type State int32

const (
	Starting State = iota // listening, not ready for traffic
	Serving               // ready
	Draining              // finishing in-flight requests, taking no new callers
	Stopped
)

var stateNames = [...]string{"STARTING", "SERVING", "DRAINING", "STOPPED"}

func (s State) String() string {
	if s >= 0 && int(s) < len(stateNames) {
		return stateNames[s]
	}
	return fmt.Sprintf("State(%d)", int32(s))
}

// Health tracks a server's lifecycle state and requests in flight, and
// serves the probes. The zero value is Starting. Safe for concurrent use.
type Health struct {
	state    atomic.Int32
	inflight atomic.Int64
}

// Set moves to a state.
func (h *Health) Set(s State) { h.state.Store(int32(s)) }

// State returns the current state.
func (h *Health) State() State { return State(h.state.Load()) }

// Inflight returns the requests the middleware is serving.
func (h *Health) Inflight() int64 { return h.inflight.Load() }

// Middleware counts requests in flight and, once draining, asks clients
// to close their connections so that keep-alive connections move to other
// instances.
func (h *Health) Middleware(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		h.inflight.Add(1)
		defer h.inflight.Add(-1)
		if h.State() >= Draining {
			w.Header().Set("Connection", "close")
		}
		next.ServeHTTP(w, r)
	})
}

// Handler serves /livez (200 until Stopped: the process works), /readyz
// (200 only while Serving: send traffic) and /healthz (the same as /readyz,
// with the state and in-flight count as JSON).
func (h *Health) Handler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /livez", func(w http.ResponseWriter, r *http.Request) {
		h.write(w, h.State() != Stopped)
	})
	mux.HandleFunc("GET /readyz", func(w http.ResponseWriter, r *http.Request) {
		h.write(w, h.State() == Serving)
	})
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, r *http.Request) {
		h.write(w, h.State() == Serving)
	})
	return mux
}

// Wrap serves the probes (GET /livez, /readyz, /healthz) and passes every
// other request to next through Middleware: one call wires a server.
func (h *Health) Wrap(next http.Handler) http.Handler {
	probes, counted := h.Handler(), h.Middleware(next)
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Method == http.MethodGet {
			switch r.URL.Path {
			case "/livez", "/readyz", "/healthz":
				probes.ServeHTTP(w, r)
				return
			}
		}
		counted.ServeHTTP(w, r)
	})
}

func (h *Health) write(w http.ResponseWriter, ok bool) {
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Cache-Control", "no-store")
	if !ok {
		w.WriteHeader(http.StatusServiceUnavailable)
	}
	_ = json.NewEncoder(w).Encode(struct {
		State    string `json:"state"`
		Inflight int64  `json:"inflight"`
	}{h.State().String(), h.Inflight()})
}
