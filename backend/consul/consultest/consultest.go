// Package consultest is an HTTP server that speaks the part of Consul's
// HTTP API the beacon Consul backend uses, with the behaviour Consul
// documents for it, so the backend can be tested where no Consul binary
// can be installed. It is one agent in dev mode: a single node whose
// catalog is its own local state.
//
// What it follows (https://developer.hashicorp.com/consul/api-docs):
//   - PUT /v1/agent/service/register (Check or Checks; check IDs default to
//     "service:ID" or "service:ID:N"; checks start critical unless Status
//     says otherwise; a re-registration replaces the checks),
//     PUT /v1/agent/service/deregister/:id (404 "Unknown service ID"),
//     GET /v1/agent/service/:id (404 "unknown service ID"; not blocking —
//     Consul's hash-based blocking is not used by the backend).
//   - PUT /v1/agent/check/update/:id and the older pass/warn/fail forms;
//     an unknown or non-TTL check answers 500 "CheckID … does not have
//     associated TTL", as Consul does. A TTL check not updated within its
//     TTL turns critical ("TTL expired").
//   - HTTP (2xx passing, 429 warning, anything else critical), TCP and gRPC
//     checks run by the server at their interval, with
//     SuccessBeforePassing / FailuresBeforeCritical.
//   - DeregisterCriticalServiceAfter, with Consul's minimum of one minute
//     and its 30 s reaper (both configurable for tests).
//   - GET /v1/health/service/:name (passing filter, node check serfHealth
//     included) and GET /v1/catalog/services, both blocking queries:
//     index and wait (default 5 m, at most 10 m, plus up to wait/16 of
//     jitter); the answer comes once the index passes the one asked for,
//     or at the end of the wait with the same index. X-Consul-Index is
//     never 0.
//   - Only status changes move a service's index: output-only changes are
//     not synced (Consul defers them by check_update_interval).
//
// Test controls: Pause/Resume cut the listener (connection refused) and
// bring it back on the same address with the state kept; Restart is a
// dev agent restarted: every registration lost and the index starting
// again from a low number — the index "goes backwards".
package consultest

import (
	"context"
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"net"
	"net/http"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/hashicorp/consul/api"
)

// Options tune the server; zero values are Consul's.
type Options struct {
	// MinDeregisterCriticalAfter is the smallest DeregisterCriticalServiceAfter
	// honoured (Consul: 1 minute).
	MinDeregisterCriticalAfter time.Duration
	// ReapInterval is how often critical services are reaped (Consul: 30 s).
	ReapInterval time.Duration
}

// Server is a running test agent. Close stops it.
type Server struct {
	opts Options
	addr string
	ctx  context.Context
	stop context.CancelFunc
	wg   sync.WaitGroup

	mu       sync.Mutex
	srv      *http.Server                  // guarded by mu; nil while paused
	index    uint64                        // guarded by mu; the Raft index
	changed  chan struct{}                 // guarded by mu; closed and replaced on each change
	services map[string]*service           // guarded by mu; by service ID
	checks   map[string]*check             // guarded by mu; by check ID
	gone     map[string]uint64             // guarded by mu; service name → index its last instance went at
	svcIndex uint64                        // guarded by mu; index of the last register/deregister
	nodeChk  api.HealthCheck               // guarded by mu; serfHealth
	queries  map[string]int                // guarded by mu; requests by endpoint, for tests
	probes   map[string]context.CancelFunc // guarded by mu; running active checks by check ID
}

type service struct {
	reg         api.AgentService
	checkIDs    []string
	createIndex uint64
	modifyIndex uint64
}

type check struct {
	hc            api.HealthCheck
	ttl           time.Duration // TTL checks
	deadline      time.Time     // TTL checks: critical after this
	reapAfter     time.Duration // 0: never
	criticalSince time.Time
	spec          api.AgentServiceCheck
	successes     int // in a row, active checks
	failures      int
}

// Node is the name of the test agent's node.
const Node = "consultest"

// New starts a server on a free loopback port.
func New(opts Options) (*Server, error) {
	if opts.MinDeregisterCriticalAfter == 0 {
		opts.MinDeregisterCriticalAfter = time.Minute
	}
	if opts.ReapInterval == 0 {
		opts.ReapInterval = 30 * time.Second
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	ctx, stop := context.WithCancel(context.Background())
	s := &Server{opts: opts, addr: ln.Addr().String(), ctx: ctx, stop: stop, queries: map[string]int{}}
	s.reset(10)
	s.serve(ln)
	s.wg.Add(1)
	go s.tick() // owned: ends with Close
	return s, nil
}

// reset empties the agent; its index starts again at start.
func (s *Server) reset(start uint64) {
	for _, cancel := range s.probes {
		cancel()
	}
	s.index, s.svcIndex = start, start
	s.changed = make(chan struct{})
	s.services, s.checks, s.gone = map[string]*service{}, map[string]*check{}, map[string]uint64{}
	s.probes = map[string]context.CancelFunc{}
	s.nodeChk = api.HealthCheck{Node: Node, CheckID: "serfHealth", Name: "Serf Health Status", Status: api.HealthPassing,
		Output: "Agent alive and reachable", Type: "", CreateIndex: start, ModifyIndex: start}
}

func (s *Server) serve(ln net.Listener) {
	mux := http.NewServeMux()
	mux.HandleFunc("PUT /v1/agent/service/register", s.register)
	mux.HandleFunc("PUT /v1/agent/service/deregister/{id}", s.deregister)
	mux.HandleFunc("GET /v1/agent/service/{id}", s.agentService)
	mux.HandleFunc("PUT /v1/agent/check/update/{id}", s.updateCheck)
	for _, verb := range []string{"pass", "warn", "fail"} {
		mux.HandleFunc("PUT /v1/agent/check/"+verb+"/{id}", s.updateCheck)
	}
	mux.HandleFunc("GET /v1/health/service/{name}", s.healthService)
	mux.HandleFunc("GET /v1/catalog/services", s.catalogServices)
	srv := &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second}
	s.mu.Lock()
	s.srv = srv
	s.mu.Unlock()
	s.wg.Add(1)
	go func() { // owned: ends when srv is closed (Pause, Restart, Close)
		defer s.wg.Done()
		_ = srv.Serve(ln)
	}()
}

// Addr is the server's host:port, for api.Config.Address.
func (s *Server) Addr() string { return s.addr }

// Pause closes the listener and every connection: clients get connection
// refused until Resume.
func (s *Server) Pause() {
	s.mu.Lock()
	srv := s.srv
	s.srv = nil
	s.mu.Unlock()
	if srv != nil {
		_ = srv.Close()
	}
}

// Resume listens again on the same address, with the state kept.
func (s *Server) Resume() error {
	ln, err := net.Listen("tcp", s.addr)
	if err != nil {
		return err
	}
	s.serve(ln)
	return nil
}

// Restart is a dev-mode agent restarted: connections cut, every service
// and check forgotten, and the index starting again at a low value.
func (s *Server) Restart() error {
	s.Pause()
	s.mu.Lock()
	s.reset(3)
	s.mu.Unlock()
	return s.Resume()
}

// Close stops the server and its checks.
func (s *Server) Close() {
	s.Pause()
	s.stop()
	s.mu.Lock()
	for _, cancel := range s.probes {
		cancel()
	}
	s.mu.Unlock()
	s.wg.Wait()
}

// Queries returns how many requests each endpoint ("health", "catalog")
// has answered; "health/<service>" counts one service's health queries.
func (s *Server) Queries(endpoint string) int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.queries[endpoint]
}

// SetCheck sets a check's status as an operator or a probe would
// (test control; for TTL checks use the agent API).
func (s *Server) SetCheck(checkID, status, output string) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	c, ok := s.checks[checkID]
	if !ok {
		return fmt.Errorf("consultest: no check %q", checkID)
	}
	s.setStatusLocked(c, status, output)
	return nil
}

// bumpLocked moves the index on and wakes blocked queries.
func (s *Server) bumpLocked() uint64 {
	s.index++
	close(s.changed)
	s.changed = make(chan struct{})
	return s.index
}

func (s *Server) setStatusLocked(c *check, status, output string) {
	c.hc.Output = output
	if c.hc.Status == status {
		return // output-only: not synced
	}
	c.hc.Status = status
	c.hc.ModifyIndex = s.bumpLocked()
	if status == api.HealthCritical {
		c.criticalSince = time.Now()
	}
}

func httpError(w http.ResponseWriter, code int, format string, args ...any) {
	http.Error(w, fmt.Sprintf(format, args...), code)
}

func parseDuration(field, v string) (time.Duration, error) {
	if v == "" {
		return 0, nil
	}
	d, err := time.ParseDuration(v)
	if err != nil {
		return 0, fmt.Errorf("Invalid %s %q: %v", field, v, err)
	}
	return d, nil
}

func (s *Server) register(w http.ResponseWriter, r *http.Request) {
	var reg api.AgentServiceRegistration
	if err := json.NewDecoder(r.Body).Decode(&reg); err != nil {
		httpError(w, http.StatusBadRequest, "Request decode failed: %v", err)
		return
	}
	if reg.Name == "" {
		httpError(w, http.StatusBadRequest, "Missing service name")
		return
	}
	if reg.ID == "" {
		reg.ID = reg.Name
	}
	if reg.Port < 0 || reg.Port > 65535 {
		httpError(w, http.StatusBadRequest, "Invalid port %d", reg.Port)
		return
	}
	for k := range reg.Meta {
		if err := validMetaKey(k); err != nil {
			httpError(w, http.StatusBadRequest, "Invalid Service Meta: %v", err)
			return
		}
	}
	specs := reg.Checks
	if reg.Check != nil {
		specs = append(api.AgentServiceChecks{reg.Check}, specs...)
	}
	var checks []*check
	for i, spec := range specs {
		c, err := s.newCheck(&reg, spec, i, len(specs))
		if err != nil {
			httpError(w, http.StatusBadRequest, "Invalid check: %v", err)
			return
		}
		checks = append(checks, c)
	}
	weights := api.AgentWeights{Passing: 1, Warning: 1}
	if reg.Weights != nil {
		weights = *reg.Weights
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	idx := s.bumpLocked()
	svc := &service{createIndex: idx}
	if old, ok := s.services[reg.ID]; ok {
		svc.createIndex = old.createIndex
		s.dropChecksLocked(old)
	}
	svc.modifyIndex = idx
	svc.reg = api.AgentService{ID: reg.ID, Service: reg.Name, Tags: slices.Clone(reg.Tags), Address: reg.Address,
		Port: reg.Port, Meta: reg.Meta, Weights: weights, CreateIndex: svc.createIndex, ModifyIndex: idx}
	for _, c := range checks {
		c.hc.ServiceID, c.hc.ServiceName, c.hc.ServiceTags = reg.ID, reg.Name, svc.reg.Tags
		c.hc.CreateIndex, c.hc.ModifyIndex = idx, idx
		if c.hc.Status == api.HealthCritical {
			c.criticalSince = time.Now()
		}
		s.checks[c.hc.CheckID] = c
		svc.checkIDs = append(svc.checkIDs, c.hc.CheckID)
		if c.ttl == 0 {
			s.startProbeLocked(c)
		}
	}
	s.services[reg.ID] = svc
	s.svcIndex = idx
}

func (s *Server) newCheck(reg *api.AgentServiceRegistration, spec *api.AgentServiceCheck, i, n int) (*check, error) {
	c := &check{spec: *spec}
	id := spec.CheckID
	if id == "" {
		id = "service:" + reg.ID
		if n > 1 {
			id = fmt.Sprintf("service:%s:%d", reg.ID, i+1)
		}
	}
	name := spec.Name
	if name == "" {
		name = fmt.Sprintf("Service '%s' check", reg.Name)
	}
	status := spec.Status
	if status == "" {
		status = api.HealthCritical
	}
	switch status {
	case api.HealthPassing, api.HealthWarning, api.HealthCritical:
	default:
		return nil, fmt.Errorf("Status %q must be passing, warning or critical", status)
	}
	ttl, err := parseDuration("TTL", spec.TTL)
	if err != nil {
		return nil, err
	}
	interval, err := parseDuration("Interval", spec.Interval)
	if err != nil {
		return nil, err
	}
	reap, err := parseDuration("DeregisterCriticalServiceAfter", spec.DeregisterCriticalServiceAfter)
	if err != nil {
		return nil, err
	}
	kinds := 0
	for _, set := range []bool{ttl > 0, spec.HTTP != "", spec.TCP != "", spec.GRPC != ""} {
		if set {
			kinds++
		}
	}
	switch {
	case kinds != 1:
		return nil, fmt.Errorf("exactly one of TTL, HTTP, TCP or GRPC must be set (this server runs no other kind)")
	case ttl == 0 && interval <= 0:
		return nil, fmt.Errorf("Interval must be > 0 for Script, HTTP, H2PING, TCP or UDP checks")
	}
	typ := "ttl"
	switch {
	case spec.HTTP != "":
		typ = "http"
	case spec.TCP != "":
		typ = "tcp"
	case spec.GRPC != "":
		typ = "grpc"
	}
	if reap > 0 {
		reap = max(reap, s.opts.MinDeregisterCriticalAfter)
	}
	c.ttl, c.reapAfter = ttl, reap
	c.deadline = time.Now().Add(ttl)
	c.hc = api.HealthCheck{Node: Node, CheckID: id, Name: name, Status: status, Notes: spec.Notes, Type: typ,
		Definition: api.HealthCheckDefinition{HTTP: spec.HTTP, Header: spec.Header, Method: spec.Method, TCP: spec.TCP, GRPC: spec.GRPC,
			IntervalDuration: interval, DeregisterCriticalServiceAfterDuration: reap}}
	return c, nil
}

// validMetaKey is Consul's rule for Meta keys.
func validMetaKey(k string) error {
	if k == "" || len(k) > 128 {
		return fmt.Errorf("key %q must be 1 to 128 characters", k)
	}
	if strings.HasPrefix(k, "consul-") {
		return fmt.Errorf("key %q uses the reserved prefix consul-", k)
	}
	for _, c := range k {
		if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '-' || c == '_') {
			return fmt.Errorf("key %q may only contain alphanumeric, -, or _ characters", k)
		}
	}
	return nil
}

func (s *Server) dropChecksLocked(svc *service) {
	for _, id := range svc.checkIDs {
		if cancel, ok := s.probes[id]; ok {
			cancel()
			delete(s.probes, id)
		}
		delete(s.checks, id)
	}
}

func (s *Server) deregisterLocked(id string) {
	svc := s.services[id]
	s.dropChecksLocked(svc)
	delete(s.services, id)
	idx := s.bumpLocked()
	s.gone[svc.reg.Service], s.svcIndex = idx, idx
}

func (s *Server) deregister(w http.ResponseWriter, r *http.Request) {
	id := r.PathValue("id")
	s.mu.Lock()
	defer s.mu.Unlock()
	if _, ok := s.services[id]; !ok {
		httpError(w, http.StatusNotFound, "Unknown service ID %q. Ensure that the service ID is passed, not the service name.", id)
		return
	}
	s.deregisterLocked(id)
}

func (s *Server) agentService(w http.ResponseWriter, r *http.Request) {
	id := r.PathValue("id")
	s.mu.Lock()
	svc, ok := s.services[id]
	var reg api.AgentService
	if ok {
		reg = svc.reg
		reg.Tags, reg.Meta = slices.Clone(reg.Tags), cloneMap(reg.Meta)
	}
	s.mu.Unlock()
	if !ok {
		httpError(w, http.StatusNotFound, "unknown service ID: %s", id)
		return
	}
	w.Header().Set("Content-Type", "application/json")
	_ = json.NewEncoder(w).Encode(&reg)
}

func (s *Server) updateCheck(w http.ResponseWriter, r *http.Request) {
	id := r.PathValue("id")
	var status, output string
	switch verb := strings.Split(strings.TrimPrefix(r.URL.Path, "/v1/agent/check/"), "/")[0]; verb {
	case "update":
		var body struct{ Status, Output string }
		if err := json.NewDecoder(r.Body).Decode(&body); err != nil {
			httpError(w, http.StatusBadRequest, "Request decode failed: %v", err)
			return
		}
		status, output = body.Status, body.Output
		switch status {
		case api.HealthPassing, api.HealthWarning, api.HealthCritical:
		default:
			httpError(w, http.StatusBadRequest, "Invalid check status: %q", status)
			return
		}
	default:
		status = map[string]string{"pass": api.HealthPassing, "warn": api.HealthWarning, "fail": api.HealthCritical}[verb]
		output = r.URL.Query().Get("note")
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	c, ok := s.checks[id]
	if !ok || c.ttl == 0 {
		httpError(w, http.StatusInternalServerError, "CheckID %q does not have associated TTL", id)
		return
	}
	c.deadline = time.Now().Add(c.ttl)
	s.setStatusLocked(c, status, output)
}

// tick expires TTL checks and reaps long-critical services.
func (s *Server) tick() {
	defer s.wg.Done()
	t := time.NewTicker(20 * time.Millisecond)
	defer t.Stop()
	lastReap := time.Now()
	for {
		select {
		case <-s.ctx.Done():
			return
		case now := <-t.C:
			s.mu.Lock()
			for _, c := range s.checks {
				if c.ttl > 0 && now.After(c.deadline) && c.hc.Status != api.HealthCritical {
					s.setStatusLocked(c, api.HealthCritical, "TTL expired")
				}
			}
			if now.Sub(lastReap) >= s.opts.ReapInterval {
				lastReap = now
				for id, svc := range s.services {
					for _, cid := range svc.checkIDs {
						c := s.checks[cid]
						if c.reapAfter > 0 && c.hc.Status == api.HealthCritical && now.Sub(c.criticalSince) >= c.reapAfter {
							s.deregisterLocked(id)
							break
						}
					}
				}
			}
			s.mu.Unlock()
		}
	}
}

// blockingParams reads index and wait as Consul does.
func blockingParams(r *http.Request) (index uint64, wait time.Duration, err error) {
	q := r.URL.Query()
	if v := q.Get("index"); v != "" {
		if index, err = strconv.ParseUint(v, 10, 64); err != nil {
			return 0, 0, fmt.Errorf("Invalid index %q", v)
		}
	}
	wait = 5 * time.Minute
	if v := q.Get("wait"); v != "" {
		if wait, err = time.ParseDuration(v); err != nil {
			return 0, 0, fmt.Errorf("Invalid wait time %q", v)
		}
	}
	wait = min(wait, 10*time.Minute)
	wait += rand.N(wait/16 + 1)
	return index, wait, nil
}

// block answers once read's index passes the one asked for or the wait
// ends; read runs under the lock.
func (s *Server) block(w http.ResponseWriter, r *http.Request, endpoint string, read func() (uint64, any)) {
	minIndex, wait, err := blockingParams(r)
	if err != nil {
		httpError(w, http.StatusBadRequest, "%v", err)
		return
	}
	timer := time.NewTimer(wait)
	defer timer.Stop()
	for {
		s.mu.Lock()
		idx, body := read()
		changed := s.changed
		s.mu.Unlock()
		idx = max(idx, 1) // never 0: a 0 would make every later query return at once
		if minIndex == 0 || idx > minIndex {
			s.answer(w, endpoint, idx, body)
			return
		}
		select {
		case <-changed:
		case <-timer.C:
			s.answer(w, endpoint, idx, body)
			return
		case <-r.Context().Done():
			return
		case <-s.ctx.Done():
			return
		}
	}
}

func (s *Server) answer(w http.ResponseWriter, endpoint string, idx uint64, body any) {
	s.mu.Lock()
	s.queries[endpoint]++
	if base, _, ok := strings.Cut(endpoint, "/"); ok {
		s.queries[base]++ // "health/orders" is a "health" query too
	}
	s.mu.Unlock()
	h := w.Header()
	h.Set("Content-Type", "application/json")
	h.Set("X-Consul-Index", strconv.FormatUint(idx, 10))
	h.Set("X-Consul-KnownLeader", "true")
	h.Set("X-Consul-LastContact", "0")
	_ = json.NewEncoder(w).Encode(body)
}

func (s *Server) healthService(w http.ResponseWriter, r *http.Request) {
	name := r.PathValue("name")
	q := r.URL.Query()
	if q.Has("filter") || q.Has("near") {
		httpError(w, http.StatusBadRequest, "consultest: filter and near are not supported")
		return
	}
	passingOnly := q.Has("passing") && q.Get("passing") != "false" && q.Get("passing") != "0"
	tags := q["tag"]
	s.block(w, r, "health/"+name, func() (uint64, any) {
		idx := max(s.gone[name], s.nodeChk.ModifyIndex)
		entries := []*api.ServiceEntry{}
		for _, svc := range s.services {
			if svc.reg.Service != name {
				continue
			}
			idx = max(idx, svc.modifyIndex)
			e := &api.ServiceEntry{Node: &api.Node{Node: Node, Address: "127.0.0.1", Datacenter: "dc1"}}
			reg := svc.reg
			reg.Tags, reg.Meta = slices.Clone(reg.Tags), cloneMap(reg.Meta)
			e.Service = &reg
			node := s.nodeChk
			e.Checks = api.HealthChecks{&node}
			passing := node.Status == api.HealthPassing
			for _, id := range svc.checkIDs {
				hc := s.checks[id].hc
				idx = max(idx, hc.ModifyIndex)
				passing = passing && hc.Status == api.HealthPassing
				e.Checks = append(e.Checks, &hc)
			}
			hasTags := true
			for _, t := range tags {
				hasTags = hasTags && slices.Contains(reg.Tags, t)
			}
			if (!passingOnly || passing) && hasTags {
				entries = append(entries, e)
			}
		}
		if idx == 0 {
			idx = s.svcIndex
		}
		slices.SortFunc(entries, func(a, b *api.ServiceEntry) int { return strings.Compare(a.Service.ID, b.Service.ID) })
		return idx, entries
	})
}

func (s *Server) catalogServices(w http.ResponseWriter, r *http.Request) {
	s.block(w, r, "catalog", func() (uint64, any) {
		out := map[string][]string{"consul": {}}
		for _, svc := range s.services {
			tags := out[svc.reg.Service]
			for _, t := range svc.reg.Tags {
				if !slices.Contains(tags, t) {
					tags = append(tags, t)
				}
			}
			if tags == nil {
				tags = []string{}
			}
			out[svc.reg.Service] = tags
		}
		return s.svcIndex, out
	})
}

func cloneMap(m map[string]string) map[string]string {
	if m == nil {
		return nil
	}
	c := make(map[string]string, len(m))
	for k, v := range m {
		c[k] = v
	}
	return c
}
