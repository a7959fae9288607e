package server

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/http"
	"net/url"
	"os"
	"strconv"
	"time"

	"connectrpc.com/connect"
	"github.com/spf13/pflag"
	"go.opentelemetry.io/contrib/instrumentation/net/http/otelhttp"
	"go.opentelemetry.io/otel/propagation"

	"beacon.dev/beacon/registry"
	"beacon.dev/beacon/server/internal/acl"
)

// The Consul-compatible HTTP API (docs/interop.md, "Consul API"): the
// endpoints consul/api, consul-template and Prometheus's consul_sd use,
// served on a listener of its own so that Consul's port convention can be
// kept. Each call is translated into the server's own API calls — the same
// validation, ACL checks, write budgets and audit — and reads are answered
// from the in-memory view and KV replica. The files consul_*.go hold the
// endpoints; this one the listener, the query parameters Consul's clients
// send and the headers they read.

// ConsulConfig configures the Consul-compatible API.
type ConsulConfig struct {
	// Addr is its listener (Consul's own port is 8500); empty: off.
	Addr string
	// Datacenter is the one datacenter the API answers for ("dc1", as a
	// Consul dev agent): a query naming another is refused.
	Datacenter string
	// MaxWait caps a blocking query's wait (Consul: 10 minutes); a query
	// without wait waits DefaultConsulWait, or MaxWait when smaller.
	MaxWait time.Duration
	// MaxBlocking bounds the blocking queries waiting at once.
	MaxBlocking int
}

// Defaults of the Consul-compatible API.
const (
	DefaultConsulDatacenter  = "dc1"
	DefaultConsulWait        = 5 * time.Minute
	DefaultConsulMaxWait     = 10 * time.Minute
	DefaultConsulMaxBlocking = 4096
)

func (c *ConsulConfig) bindFlags(fs *pflag.FlagSet) {
	fs.StringVar(&c.Addr, "consul-addr", c.Addr, "serve a Consul-compatible HTTP API here, for consul/api, consul-template and Prometheus consul_sd (e.g. 127.0.0.1:8500; default: off)")
	fs.StringVar(&c.Datacenter, "consul-datacenter", c.Datacenter, "the datacenter name the Consul-compatible API answers for")
	fs.DurationVar(&c.MaxWait, "consul-max-wait", c.MaxWait, "longest wait of a Consul blocking query (a little jitter is added, as Consul does)")
	fs.IntVar(&c.MaxBlocking, "max-consul-blocking", c.MaxBlocking, "Consul blocking queries waiting at once on the server")
}

func (c *ConsulConfig) validate() error {
	if c.Addr == "" {
		return nil
	}
	if _, _, err := net.SplitHostPort(c.Addr); err != nil {
		return fmt.Errorf("server: invalid --consul-addr %q: %w", c.Addr, err)
	}
	if err := registry.ValidateName("consul-datacenter", c.Datacenter); err != nil {
		return fmt.Errorf("server: invalid --consul-datacenter: %w", err)
	}
	if c.MaxWait < time.Second {
		return fmt.Errorf("server: invalid --consul-max-wait %v: must be at least 1s", c.MaxWait)
	}
	if c.MaxBlocking < 1 {
		return fmt.Errorf("server: invalid --max-consul-blocking %d: must be at least 1", c.MaxBlocking)
	}
	return nil
}

// startConsul binds the Consul API's listener, behind the same
// connection limits as the API's, and serves it.
func (s *Server) startConsul() error {
	cfg := s.cfg.Consul
	if cfg.Addr == "" {
		return nil
	}
	ln, err := net.Listen("tcp", cfg.Addr)
	if err != nil {
		return fmt.Errorf("server: listening on --consul-addr %s: %w", cfg.Addr, err)
	}
	lim := s.cfg.Limits
	limited := s.limitListener(ln)
	s.consulLn = limited
	serve := s.tlsListener(limited) // the API's certificate and client CAs
	s.consulKV = newConsulKVState()
	var handler http.Handler = s.consulRoutes()
	if tp := s.cfg.TracerProvider; tp != nil {
		// Named by the route the mux matched (otelhttp names the span again
		// once the request is served), "consul HTTP GET" before: never by
		// a raw path.
		handler = otelhttp.NewHandler(handler, "consul", otelhttp.WithTracerProvider(tp),
			otelhttp.WithPropagators(propagation.TraceContext{}),
			otelhttp.WithSpanNameFormatter(func(_ string, r *http.Request) string {
				if r.Pattern != "" {
					return "consul " + r.Pattern
				}
				return "consul HTTP " + r.Method
			}))
	}
	s.consulSrv = &http.Server{
		Handler:           handler,
		ReadHeaderTimeout: lim.ReadHeaderTimeout,
		IdleTimeout:       lim.IdleTimeout,
		MaxHeaderBytes:    64 << 10,
		BaseContext:       func(net.Listener) context.Context { return s.runCtx },
		ConnContext:       s.connContext,
		ErrorLog:          s.httpSrv.ErrorLog,
	}
	s.wg.Add(1)
	go func() {
		defer s.wg.Done()
		if err := s.consulSrv.Serve(serve); err != nil && !errors.Is(err, http.ErrServerClosed) {
			s.fail(fmt.Errorf("server: serving --consul-addr %s: %w", cfg.Addr, err))
		}
	}()
	return nil
}

// ConsulAddr returns the address the Consul API listens on ("" when off).
func (s *Server) ConsulAddr() string {
	if s.consulLn == nil {
		return ""
	}
	return s.consulLn.Addr().String()
}

func (s *Server) consulRoutes() http.Handler {
	mux := http.NewServeMux()
	h := func(pattern string, f func(http.ResponseWriter, *http.Request, *consulQuery)) {
		mux.Handle(pattern, s.consulToken(s.guardAPI(s.consulReadBody(s.consulHandler(f)))))
	}
	h("GET /v1/agent/self", s.consulAgentSelf)
	h("GET /v1/status/leader", s.consulStatusLeader)
	h("GET /v1/status/peers", s.consulStatusPeers)
	h("GET /v1/catalog/datacenters", s.consulDatacenters)
	h("GET /v1/catalog/services", s.consulCatalogServices)
	h("GET /v1/catalog/service/{name}", s.consulCatalogService)
	h("GET /v1/health/service/{name}", s.consulHealthService)
	h("GET /v1/agent/services", s.consulAgentServices)
	h("GET /v1/agent/service/{id}", s.consulAgentService)
	h("PUT /v1/agent/service/register", s.consulRegister)
	h("PUT /v1/agent/service/deregister/{id}", s.consulDeregister)
	h("PUT /v1/agent/service/maintenance/{id}", s.consulMaintenance)
	h("PUT /v1/agent/check/pass/{id}", s.consulCheckPass)
	h("PUT /v1/agent/check/warn/{id}", s.consulCheckWarn)
	h("PUT /v1/agent/check/fail/{id}", s.consulCheckFail)
	h("PUT /v1/agent/check/update/{id}", s.consulCheckUpdate)
	h("GET /v1/kv/{key...}", s.consulKVGet)
	h("PUT /v1/kv/{key...}", s.consulKVPut)
	h("DELETE /v1/kv/{key...}", s.consulKVDelete)
	h("PUT /v1/txn", s.consulTxn)
	h("PUT /v1/session/create", s.consulSessionCreate)
	h("PUT /v1/session/renew/{id}", s.consulSessionRenew)
	h("PUT /v1/session/destroy/{id}", s.consulSessionDestroy)
	h("GET /v1/session/info/{id}", s.consulSessionInfo)
	mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		http.Error(w, fmt.Sprintf("beacon's Consul-compatible API does not serve %s %s (docs/interop.md lists what it serves)", r.Method, r.URL.Path), http.StatusNotFound)
	})
	return mux
}

// consulToken passes Consul's token forms on as beacon's: the
// X-Consul-Token header or the token query parameter (an Authorization
// header, also sent by Consul clients, is read as it is).
func (s *Server) consulToken(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Header.Get("Authorization") == "" && r.Header.Get("X-Beacon-Token") == "" {
			tok := r.Header.Get("X-Consul-Token")
			if tok == "" {
				tok = r.URL.Query().Get("token")
			}
			if tok != "" {
				r.Header.Set("X-Beacon-Token", tok)
			}
		}
		next.ServeHTTP(w, r)
	})
}

// consulReadBody reads a PUT's body here, within --read-body-timeout and
// at most the larger of --max-request-bytes and --max-kv-value-bytes, so
// that a body trickled byte by byte cannot hold a connection (guardAPI
// does this for the API's POSTs); handlers apply their own bound.
func (s *Server) consulReadBody(next http.Handler) http.Handler {
	lim := s.cfg.Limits
	max := int64(max(lim.MaxRequestBytes, lim.MaxKVValueBytes))
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Method != http.MethodPut || r.Body == nil || r.Body == http.NoBody {
			next.ServeHTTP(w, r)
			return
		}
		if r.ContentLength > max {
			consulError(w, s.limitError("max-request-bytes", "request body of %d bytes, larger than %d", r.ContentLength, max))
			return
		}
		rc := http.NewResponseController(w)
		_ = rc.SetReadDeadline(time.Now().Add(lim.ReadBodyTimeout))
		body, err := io.ReadAll(io.LimitReader(r.Body, max+1))
		_ = rc.SetReadDeadline(time.Time{})
		switch {
		case errors.Is(err, os.ErrDeadlineExceeded):
			s.metrics.limitHits.WithLabelValues("read-body-timeout").Inc()
			http.Error(w, fmt.Sprintf("request body not received within --read-body-timeout %s", lim.ReadBodyTimeout), http.StatusRequestTimeout)
			return
		case err != nil:
			http.Error(w, "reading the request body: "+err.Error(), http.StatusBadRequest)
			return
		case int64(len(body)) > max:
			consulError(w, s.limitError("max-request-bytes", "request body larger than %d bytes", max))
			return
		}
		r.Body = io.NopCloser(bytes.NewReader(body))
		next.ServeHTTP(w, r)
	})
}

// consulQuery holds what a request's query parameters ask, checked.
type consulQuery struct {
	ns         string
	index      uint64 // blocking: answer once the index passes it
	wait       time.Duration
	blocking   bool
	consistent bool
	filter     string
	values     url.Values
}

// consulHandler parses the parameters every endpoint shares, refuses what
// cannot be mapped, and answers errors as Consul does: a status and a
// plain-text reason.
func (s *Server) consulHandler(f func(http.ResponseWriter, *http.Request, *consulQuery)) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		s.metrics.consulRequests.WithLabelValues(r.Pattern).Inc()
		q, err := s.consulParams(r)
		if err != nil {
			consulError(w, err)
			return
		}
		w.Header().Set("X-Consul-KnownLeader", "true")
		w.Header().Set("X-Consul-LastContact", "0")
		if s.acl != nil {
			w.Header().Set("X-Consul-Default-ACL-Policy", "deny")
		} else {
			w.Header().Set("X-Consul-Default-ACL-Policy", "allow")
		}
		f(w, r, q)
	})
}

func (s *Server) consulParams(r *http.Request) (*consulQuery, error) {
	v := r.URL.Query()
	q := &consulQuery{values: v, filter: v.Get("filter")}
	ns, err := namespaceOf(v.Get("ns"))
	if err != nil {
		return nil, connect.NewError(connect.CodeInvalidArgument, fmt.Errorf("ns: %w (a Consul namespace is a beacon namespace)", err))
	}
	q.ns = ns
	if dc := v.Get("dc"); dc != "" && dc != s.cfg.Consul.Datacenter {
		return nil, connect.NewError(connect.CodeInvalidArgument, fmt.Errorf("dc: this server answers for datacenter %q only, not %q (--consul-datacenter)", s.cfg.Consul.Datacenter, dc))
	}
	for _, p := range []string{"node-meta", "near", "hash"} {
		if v.Has(p) {
			return nil, connect.NewError(connect.CodeInvalidArgument, fmt.Errorf("%s: not served (beacon has no nodes to sort by or filter on, and no hash-based blocking); leave %s unset", p, p))
		}
	}
	for _, p := range []string{"partition", "peer", "sampling"} {
		if x := v.Get(p); x != "" && x != "default" {
			return nil, connect.NewError(connect.CodeInvalidArgument, fmt.Errorf("%s=%s: beacon has no Consul admin partitions or peerings; leave %s unset", p, x, p))
		}
	}
	if v.Has("cached") {
		return nil, connect.NewError(connect.CodeInvalidArgument, errors.New("cached: agent caching is not served; every answer comes from the server's current view (leave cached unset)"))
	}
	_, q.consistent = v["consistent"]
	if text := v.Get("index"); text != "" {
		q.index, err = strconv.ParseUint(text, 10, 64)
		if err != nil {
			return nil, connect.NewError(connect.CodeInvalidArgument, fmt.Errorf("index: %q is not an unsigned integer", text))
		}
		q.blocking = q.index > 0
	}
	max := s.cfg.Consul.MaxWait
	q.wait = min(DefaultConsulWait, max)
	if text := v.Get("wait"); text != "" {
		d, err := time.ParseDuration(text)
		if err != nil || d < 0 {
			return nil, connect.NewError(connect.CodeInvalidArgument, fmt.Errorf("wait: %q is not a duration such as 60s or 120000ms", text))
		}
		if d > 0 {
			q.wait = min(d, max)
		}
	}
	// Consul adds up to wait/16 so that watchers started together do not
	// all come back together.
	q.wait += rand.N(q.wait/16 + 1)
	return q, nil
}

// consulError answers err as Consul would: the status its clients act on
// (403 for ACL refusals, 404, 429 with Retry-After) and a plain reason.
func consulError(w http.ResponseWriter, err error) {
	status := http.StatusInternalServerError
	switch connect.CodeOf(err) {
	case connect.CodeInvalidArgument, connect.CodeFailedPrecondition:
		status = http.StatusBadRequest
	case connect.CodePermissionDenied, connect.CodeUnauthenticated:
		status = http.StatusForbidden // consul/api reads 403 as an ACL refusal
	case connect.CodeNotFound:
		status = http.StatusNotFound
	case connect.CodeResourceExhausted:
		status = http.StatusTooManyRequests
	case connect.CodeUnavailable:
		status = http.StatusServiceUnavailable
	case connect.CodeAborted, connect.CodeAlreadyExists:
		status = http.StatusConflict
	}
	var ce *connect.Error
	msg := err.Error()
	if errors.As(err, &ce) {
		for k, v := range ce.Meta() {
			w.Header()[k] = v
		}
		msg = ce.Message()
	}
	http.Error(w, msg, status)
}

// consulJSON answers v with X-Consul-Index (never 0: Consul's clients treat
// 0 as "no index").
func consulJSON(w http.ResponseWriter, index int64, v any) {
	w.Header().Set("Content-Type", "application/json")
	if index >= 0 {
		w.Header().Set("X-Consul-Index", strconv.FormatInt(max(index, 1), 10))
	}
	_ = json.NewEncoder(w).Encode(v)
}

// consulBlock runs a blocking query: wait is called until the answer's
// index passes q.index, the query's wait ends or the client leaves; it
// returns whether the answer may be sent (false: an error was sent).
// Without an index it returns at once.
func (s *Server) consulBlock(w http.ResponseWriter, r *http.Request, q *consulQuery, wait func(ctx context.Context) error) bool {
	if !q.blocking {
		return true
	}
	if n := s.consulBlocking.Add(1); int(n) > s.cfg.Consul.MaxBlocking {
		s.consulBlocking.Add(-1)
		consulError(w, s.limitError("max-consul-blocking", "%d Consul blocking queries wait, at most %d", n-1, s.cfg.Consul.MaxBlocking))
		return false
	}
	defer s.consulBlocking.Add(-1)
	ctx, cancel := context.WithTimeout(r.Context(), q.wait)
	defer cancel()
	if err := wait(ctx); err != nil && ctx.Err() == nil {
		consulError(w, toConnectError(err))
		return false
	}
	if r.Context().Err() != nil {
		// The client left, or the server is closing: a client still there
		// gets a 503 rather than an empty answer it cannot decode.
		http.Error(w, "server: closing", http.StatusServiceUnavailable)
		return false
	}
	return true
}

// consulRead makes a read consistent when asked (?consistent): it waits
// for the view to hold every write etcd acknowledged before it.
func (s *Server) consulRead(ctx context.Context, q *consulQuery) {
	if q.consistent {
		api{s}.catchUp(ctx)
	}
}

// consulMayRead says whether the caller may read a service; a service it
// may not read is left out of answers, as Consul filters by ACL.
func consulMayRead(ctx context.Context, ns, svc string) bool {
	return identityOf(ctx).Authz.Service(ns, svc) >= acl.Read
}

func consulFiltered(w http.ResponseWriter) {
	w.Header().Set("X-Consul-Results-Filtered-By-ACLs", "true")
}

// consulBody decodes a JSON request body of at most --max-request-bytes.
func (s *Server) consulBody(w http.ResponseWriter, r *http.Request, v any) error {
	r.Body = http.MaxBytesReader(w, r.Body, int64(s.cfg.Limits.MaxRequestBytes))
	dec := json.NewDecoder(r.Body)
	if err := dec.Decode(v); err != nil {
		var tooLarge *http.MaxBytesError
		if errors.As(err, &tooLarge) {
			return s.limitError("max-request-bytes", "request body larger than %d bytes", s.cfg.Limits.MaxRequestBytes)
		}
		return connect.NewError(connect.CodeInvalidArgument, fmt.Errorf("request body: %v", err))
	}
	return nil
}

func (s *Server) consulAgentSelf(w http.ResponseWriter, r *http.Request, q *consulQuery) {
	host, _, _ := net.SplitHostPort(s.ConsulAddr())
	consulJSON(w, -1, map[string]any{
		"Config": map[string]any{
			"Datacenter": s.cfg.Consul.Datacenter,
			"NodeName":   s.cfg.Name,
			"NodeID":     "",
			"Server":     true,
			"Revision":   "",
			"Version":    "beacon",
		},
		"Member": map[string]any{"Name": s.cfg.Name, "Addr": host, "Port": 0, "Status": 1, "Tags": map[string]string{"dc": s.cfg.Consul.Datacenter, "role": "consul"}},
		"Meta":   map[string]string{},
	})
}

// The leader is this server's own address: every beacon server answers
// for the registry (etcd has the Raft leader, and it is not a peer a
// Consul client can talk to).
func (s *Server) consulStatusLeader(w http.ResponseWriter, r *http.Request, q *consulQuery) {
	consulJSON(w, -1, s.ConsulAddr())
}

func (s *Server) consulStatusPeers(w http.ResponseWriter, r *http.Request, q *consulQuery) {
	consulJSON(w, -1, []string{s.ConsulAddr()})
}

func (s *Server) consulDatacenters(w http.ResponseWriter, r *http.Request, q *consulQuery) {
	consulJSON(w, -1, []string{s.cfg.Consul.Datacenter})
}
