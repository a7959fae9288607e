package server

import (
	"context"
	"fmt"
	"hash/fnv"
	"maps"
	"net"
	"net/http"
	"slices"
	"strconv"
	"strings"
	"time"

	"connectrpc.com/connect"

	beaconv1 "beacon.dev/beacon/api/beacon/v1"
	"beacon.dev/beacon/api/beacon/v1/beaconv1connect"
	"beacon.dev/beacon/internal/wire"
	"beacon.dev/beacon/registry"
)

// The catalog, health and agent endpoints of the Consul API. A beacon
// instance is a Consul service instance on a node named after its
// address (beacon has no nodes: each address is one); its checks are
// Consul checks, its declared status other than UP is Consul's service
// maintenance, and each node has a passing serfHealth check, so that
// Consul's clients read the health beacon routes by.

// Consul's JSON shapes, as its clients decode them.
type (
	consulNode struct {
		ID, Node, Address, Datacenter string
		TaggedAddresses               map[string]string
		Meta                          map[string]string
		CreateIndex, ModifyIndex      int64
	}
	consulWeights struct{ Passing, Warning int }
	consulService struct {
		ID, Service              string
		Tags                     []string
		Address                  string
		Meta                     map[string]string
		Port                     int
		Weights                  consulWeights
		EnableTagOverride        bool
		CreateIndex, ModifyIndex int64
		Namespace, Datacenter    string
	}
	consulCheck struct {
		Node, CheckID, Name, Status, Notes, Output, ServiceID, ServiceName string
		ServiceTags                                                        []string
		Type                                                               string
		Namespace                                                          string
		CreateIndex, ModifyIndex                                           int64
	}
	consulEntry struct {
		Node    consulNode
		Service consulService
		Checks  []consulCheck
	}
	consulCatalogEntry struct {
		ID, Node, Address, Datacenter string
		TaggedAddresses               map[string]string
		NodeMeta                      map[string]string
		ServiceID, ServiceName        string
		ServiceAddress                string
		ServiceTags                   []string
		ServiceMeta                   map[string]string
		ServicePort                   int
		ServiceWeights                consulWeights
		ServiceEnableTagOverride      bool
		CreateIndex, ModifyIndex      int64
		Namespace                     string
	}
)

// consulCheckIDMeta prefixes the metadata key that keeps a Consul CheckID
// that is not a beacon check name, under the name it was given
// (consulCheckName); Consul's clients never see these keys in Meta.
const consulCheckIDMeta = "consul-check-id."

// consulCheckName is the beacon check name of a Consul CheckID: the id
// itself when it is a valid name, else "consul-" and a hash of it.
func consulCheckName(checkID string) string {
	if registry.ValidateName("check", checkID) == nil {
		return checkID
	}
	h := fnv.New32a()
	h.Write([]byte(checkID))
	return fmt.Sprintf("consul-%08x", h.Sum32())
}

// consulCheckID is the Consul check id of an instance's check: beacon's
// "service" and "service-N" are Consul's default ids "service:ID" and
// "service:ID:N"; a CheckID kept in metadata is itself; any other name is
// its own id.
func consulCheckID(in *registry.Instance, name string) string {
	if id, ok := in.Metadata[consulCheckIDMeta+name]; ok {
		return id
	}
	if name == "service" {
		return "service:" + in.ID
	}
	if n, ok := strings.CutPrefix(name, "service-"); ok {
		if _, err := strconv.Atoi(n); err == nil {
			return "service:" + in.ID + ":" + n
		}
	}
	return name
}

func consulStatus(h registry.Health) string {
	switch h {
	case registry.HealthPassing:
		return "passing"
	case registry.HealthWarning:
		return "warning"
	}
	return "critical"
}

func (s *Server) consulEntryOf(in *registry.Instance) consulEntry {
	dc := s.cfg.Consul.Datacenter
	node := consulNode{ID: "", Node: in.Address, Address: in.Address, Datacenter: dc,
		TaggedAddresses: map[string]string{"lan": in.Address}, Meta: map[string]string{},
		CreateIndex: in.Revision, ModifyIndex: in.Revision}
	if in.Zone != "" {
		node.Meta["zone"] = in.Zone
	}
	meta := make(map[string]string, len(in.Metadata))
	for k, v := range in.Metadata {
		if !strings.HasPrefix(k, consulCheckIDMeta) {
			meta[k] = v
		}
	}
	tags := in.Tags
	if tags == nil {
		tags = []string{}
	}
	svc := consulService{ID: in.ID, Service: in.Service, Tags: tags, Address: in.Address, Meta: meta, Port: in.Port,
		Weights: consulWeights{Passing: in.Weight, Warning: 1}, CreateIndex: in.Revision, ModifyIndex: in.Revision,
		Namespace: in.Namespace, Datacenter: dc}
	check := func(id, name, status, notes, output, typ string) consulCheck {
		return consulCheck{Node: in.Address, CheckID: id, Name: name, Status: status, Notes: notes, Output: output,
			ServiceID: in.ID, ServiceName: in.Service, ServiceTags: tags, Type: typ, Namespace: in.Namespace,
			CreateIndex: in.Revision, ModifyIndex: in.Revision}
	}
	checks := []consulCheck{{Node: in.Address, CheckID: "serfHealth", Name: "Serf Health Status", Status: "passing",
		Output: "beacon has no nodes: the instance's own checks say how it is", Type: "serf", ServiceTags: []string{},
		Namespace: in.Namespace, CreateIndex: in.Revision, ModifyIndex: in.Revision}}
	if in.Status != registry.StatusUp {
		checks = append(checks, check("_service_maintenance:"+in.ID, "Service Maintenance Mode", "critical",
			"beacon status "+in.Status.String(), "declared "+in.Status.String()+": not routable", "maintenance"))
	}
	for n := range in.Checks {
		c := &in.Checks[n]
		checks = append(checks, check(consulCheckID(in, c.Name), c.Name, consulStatus(c.Status), "", c.Output, strings.ToLower(c.Kind.String())))
	}
	if len(in.Checks) == 0 && in.Health != registry.HealthPassing {
		checks = append(checks, check("beacon:health", "declared health", consulStatus(in.Health), "", "declared by the instance", "beacon"))
	}
	return consulEntry{Node: node, Service: svc, Checks: checks}
}

// consulServiceIndex is the X-Consul-Index of one service's answers: the
// revision of the service's last change, so that a blocked query wakes
// only when its own answer changed.
func (s *Server) consulServiceIndex(sk registry.ServiceKey) int64 {
	return max(s.view.Snapshot(sk).Revision, 1)
}

// consulWaitService blocks until the service's index passes after.
func (s *Server) consulWaitService(ctx context.Context, sk registry.ServiceKey, after uint64) error {
	sub := s.view.Subscribe(sk.Namespace, []string{sk.Service}, nil)
	defer sub.Close()
	for uint64(s.consulServiceIndex(sk)) <= after {
		if _, _, err := sub.Next(ctx); err != nil {
			return nil // the wait ended: answer with what there is
		}
	}
	return nil
}

// consulEntries answers a service's instances for the health and catalog
// endpoints: tag (repeatable, all must match), passing, filter.
func (s *Server) consulEntries(w http.ResponseWriter, r *http.Request, q *consulQuery) ([]consulEntry, int64, bool) {
	name := r.PathValue("name")
	if err := registry.ValidateName("service", name); err != nil {
		consulError(w, toConnectError(err))
		return nil, 0, false
	}
	filter, err := parseConsulFilter(q.filter)
	if err != nil {
		consulError(w, connect.NewError(connect.CodeInvalidArgument, err))
		return nil, 0, false
	}
	sk := registry.ServiceKey{Namespace: q.ns, Service: name}
	if !consulMayRead(r.Context(), q.ns, name) {
		// As if empty; a blocking query waits out its wait (answering at
		// once would make its client ask again at once, for ever).
		if s.consulBlock(w, r, q, func(ctx context.Context) error { <-ctx.Done(); return nil }) {
			consulFiltered(w)
			consulJSON(w, 1, []consulEntry{})
		}
		return nil, 0, false
	}
	s.consulRead(r.Context(), q)
	if !s.consulBlock(w, r, q, func(ctx context.Context) error { return s.consulWaitService(ctx, sk, q.index) }) {
		return nil, 0, false
	}
	snap := s.view.Snapshot(sk)
	_, passing := q.values["passing"]
	if v := q.values["passing"]; len(v) > 0 && (v[0] == "false" || v[0] == "0") {
		passing = false
	}
	tags := q.values["tag"]
	out := []consulEntry{}
	for _, in := range snap.Instances {
		if !consulHasTags(in, tags) {
			continue
		}
		e := s.consulEntryOf(in)
		if passing && !allPassing(e.Checks) {
			continue
		}
		if filter != nil && !filter.match(&e) {
			continue
		}
		out = append(out, e)
	}
	return out, max(snap.Revision, 1), true
}

func consulHasTags(in *registry.Instance, tags []string) bool {
	for _, t := range tags {
		if !slices.Contains(in.Tags, t) {
			return false
		}
	}
	return true
}

func allPassing(checks []consulCheck) bool {
	for _, c := range checks {
		if c.Status != "passing" {
			return false
		}
	}
	return true
}

func (s *Server) consulHealthService(w http.ResponseWriter, r *http.Request, q *consulQuery) {
	entries, index, ok := s.consulEntries(w, r, q)
	if ok {
		consulJSON(w, index, entries)
	}
}

func (s *Server) consulCatalogService(w http.ResponseWriter, r *http.Request, q *consulQuery) {
	entries, index, ok := s.consulEntries(w, r, q)
	if !ok {
		return
	}
	out := make([]consulCatalogEntry, 0, len(entries))
	for _, e := range entries {
		out = append(out, consulCatalogEntry{
			ID: e.Node.ID, Node: e.Node.Node, Address: e.Node.Address, Datacenter: e.Node.Datacenter,
			TaggedAddresses: e.Node.TaggedAddresses, NodeMeta: e.Node.Meta,
			ServiceID: e.Service.ID, ServiceName: e.Service.Service, ServiceAddress: e.Service.Address,
			ServiceTags: e.Service.Tags, ServiceMeta: e.Service.Meta, ServicePort: e.Service.Port,
			ServiceWeights: e.Service.Weights, CreateIndex: e.Service.CreateIndex, ModifyIndex: e.Service.ModifyIndex,
			Namespace: e.Service.Namespace,
		})
	}
	consulJSON(w, index, out)
}

// consulCatalogServices answers every service of the namespace with the
// tags its instances carry. Its index is the newest revision among the
// namespace's services (emptied ones included, so it never goes back).
func (s *Server) consulCatalogServices(w http.ResponseWriter, r *http.Request, q *consulQuery) {
	if q.filter != "" {
		consulError(w, connect.NewError(connect.CodeInvalidArgument, fmt.Errorf("filter: not served on /v1/catalog/services (it is on /v1/health/service and /v1/catalog/service)")))
		return
	}
	s.consulRead(r.Context(), q)
	ok := s.consulBlock(w, r, q, func(ctx context.Context) error {
		sub := s.view.Subscribe(q.ns, nil, nil)
		defer sub.Close()
		for uint64(max(s.view.NamespaceRevision(q.ns), 1)) <= q.index {
			if _, _, err := sub.Next(ctx); err != nil {
				return nil
			}
		}
		return nil
	})
	if !ok {
		return
	}
	index := s.view.NamespaceRevision(q.ns)
	out := map[string][]string{}
	filtered := false
	for _, snap := range s.view.Services(q.ns) {
		if !consulMayRead(r.Context(), q.ns, snap.Service) {
			filtered = true
			continue
		}
		tags := []string{}
		for _, in := range snap.Instances {
			for _, t := range in.Tags {
				if !slices.Contains(tags, t) {
					tags = append(tags, t)
				}
			}
		}
		slices.Sort(tags)
		out[snap.Service] = tags
	}
	if filtered {
		consulFiltered(w)
	}
	consulJSON(w, index, out)
}

// consulAgentService is Consul's shape of an agent's service.
type consulAgentService struct {
	ID, Service       string
	Tags              []string
	Meta              map[string]string
	Port              int
	Address           string
	Weights           consulWeights
	EnableTagOverride bool
	Datacenter        string
	Namespace         string
	ContentHash       string `json:",omitempty"`
}

func (s *Server) agentServiceOf(in *registry.Instance) consulAgentService {
	e := s.consulEntryOf(in)
	return consulAgentService{ID: in.ID, Service: in.Service, Tags: e.Service.Tags, Meta: e.Service.Meta, Port: in.Port,
		Address: in.Address, Weights: e.Service.Weights, Datacenter: s.cfg.Consul.Datacenter, Namespace: in.Namespace}
}

// consulAgentServices answers the namespace's persistent instances: those
// registered as a Consul agent registers them (beacon's session-bound
// instances belong to their client process, not to an agent).
func (s *Server) consulAgentServices(w http.ResponseWriter, r *http.Request, q *consulQuery) {
	if q.filter != "" {
		consulError(w, connect.NewError(connect.CodeInvalidArgument, fmt.Errorf("filter: not served on /v1/agent/services")))
		return
	}
	out := map[string]consulAgentService{}
	for _, snap := range s.view.Services(q.ns) {
		if !consulMayRead(r.Context(), q.ns, snap.Service) {
			consulFiltered(w)
			continue
		}
		for _, in := range snap.Instances {
			if !in.Ephemeral() {
				out[in.ID] = s.agentServiceOf(in)
			}
		}
	}
	consulJSON(w, -1, out)
}

func (s *Server) consulAgentService(w http.ResponseWriter, r *http.Request, q *consulQuery) {
	in, err := s.consulFindInstance(r.Context(), q.ns, r.PathValue("id"))
	if err != nil {
		consulError(w, err)
		return
	}
	consulJSON(w, -1, s.agentServiceOf(in))
}

// consulFindInstance finds the instance a Consul service id names: Consul
// ids are unique on an agent, beacon's within a service, so the id must
// name one instance of the namespace the caller may read.
func (s *Server) consulFindInstance(ctx context.Context, ns, id string) (*registry.Instance, error) {
	if err := registry.ValidateID("service id", id); err != nil {
		return nil, toConnectError(err)
	}
	var found []*registry.Instance
	for _, snap := range s.view.Services(ns) {
		if !consulMayRead(ctx, ns, snap.Service) {
			continue
		}
		i, ok := slices.BinarySearchFunc(snap.Instances, id, func(in *registry.Instance, id string) int { return strings.Compare(in.ID, id) })
		if ok {
			found = append(found, snap.Instances[i])
		}
	}
	switch len(found) {
	case 0:
		return nil, connect.NewError(connect.CodeNotFound, fmt.Errorf("unknown service ID %q in namespace %s", id, ns))
	case 1:
		return found[0], nil
	}
	return nil, connect.NewError(connect.CodeFailedPrecondition, fmt.Errorf("service ID %q names instances of %d services in namespace %s (%s, %s, …): beacon ids are unique within a service only; use beacon's API", id, len(found), ns, found[0].Service, found[1].Service))
}

// consulRegistration is Consul's AgentServiceRegistration, the fields
// beacon maps; the others are refused when set (consulRegistration.refuse).
type consulRegistration struct {
	ID, Name          string
	Tags              []string
	Port              int
	Address           string
	Meta              map[string]string
	Weights           *consulWeights
	EnableTagOverride bool
	Namespace         string
	Check             *consulCheckDef
	Checks            []*consulCheckDef
	Kind              string
	Proxy             any
	Connect           any
	SocketPath        string
	TaggedAddresses   map[string]any
	Partition         string
	Locality          any
}

type consulCheckDef struct {
	CheckID, Name, Notes, Status                      string
	Interval, Timeout, TTL                            string
	HTTP, Method, Body, TCP, GRPC, UDP, H2PING        string
	Header                                            map[string][]string
	TLSSkipVerify, GRPCUseTLS, TLSServerName          any
	DeregisterCriticalServiceAfter                    string
	SuccessBeforePassing, FailuresBeforeCritical      int
	FailuresBeforeWarning                             int
	Args                                              []string
	DockerContainerID, Shell, AliasNode, AliasService string
	OSService                                         string
	ServiceID                                         string
}

func refused(field, why string) error {
	return connect.NewError(connect.CodeInvalidArgument, fmt.Errorf("%s: %s", field, why))
}

// instance maps a registration onto a persistent beacon instance; addr is
// the caller's address, used when the registration names none (a Consul
// agent uses its node's).
func (c *consulRegistration) instance(ns, addr string) (*registry.Instance, error) {
	switch {
	case c.Kind != "" && c.Kind != "typical":
		return nil, refused("Kind", fmt.Sprintf("%q: beacon has no Connect proxies or gateways; register a typical service", c.Kind))
	case c.Proxy != nil || c.Connect != nil:
		return nil, refused("Proxy/Connect", "Consul Connect is not served")
	case c.SocketPath != "":
		return nil, refused("SocketPath", "beacon instances have an address and a port")
	case len(c.TaggedAddresses) > 0:
		return nil, refused("TaggedAddresses", "beacon instances have one address; set Address")
	case c.Partition != "" && c.Partition != "default":
		return nil, refused("Partition", "beacon has no admin partitions")
	case c.Locality != nil:
		return nil, refused("Locality", "set the zone through beacon's API")
	}
	if c.Namespace != "" {
		ns = c.Namespace
	}
	id := c.ID
	if id == "" {
		id = c.Name
	}
	in := &registry.Instance{Namespace: ns, Service: c.Name, ID: id, Address: c.Address, Port: c.Port,
		Tags: c.Tags, Metadata: maps.Clone(c.Meta), Status: registry.StatusUp}
	if in.Address == "" {
		in.Address = addr
	}
	if c.Weights != nil {
		in.Weight = c.Weights.Passing
	}
	defs := c.Checks
	if c.Check != nil {
		defs = append([]*consulCheckDef{c.Check}, defs...)
	}
	for n, d := range defs {
		if d == nil {
			continue
		}
		chk, err := d.check(n, len(defs))
		if err != nil {
			return nil, err
		}
		if d.CheckID != "" && chk.Name != d.CheckID {
			if in.Metadata == nil {
				in.Metadata = map[string]string{}
			}
			in.Metadata[consulCheckIDMeta+chk.Name] = d.CheckID
		}
		in.Checks = append(in.Checks, chk)
	}
	in.ApplyDefaults()
	if err := in.Validate(); err != nil {
		return nil, toConnectError(err)
	}
	return in, nil
}

// check maps Consul check n of total onto a beacon check.
func (d *consulCheckDef) check(n, total int) (registry.Check, error) {
	field := fmt.Sprintf("Checks[%d]", n)
	f := func(name string) string { return field + "." + name }
	var c registry.Check
	switch {
	case len(d.Args) > 0 || d.Shell != "" || d.DockerContainerID != "":
		return c, refused(f("Args"), "script and Docker checks are not run by beacon (use HTTP, TCP, gRPC or TTL)")
	case d.AliasNode != "" || d.AliasService != "" || d.UDP != "" || d.H2PING != "" || d.OSService != "":
		return c, refused(field, "alias, UDP, H2PING and OS service checks are not served (use HTTP, TCP, gRPC or TTL)")
	case d.Body != "":
		return c, refused(f("Body"), "beacon's HTTP checks send no body")
	case d.Method != "" && d.Method != http.MethodGet:
		return c, refused(f("Method"), "beacon's HTTP checks use GET")
	case d.TLSSkipVerify != nil && d.TLSSkipVerify != false, d.GRPCUseTLS != nil && d.GRPCUseTLS != false,
		d.TLSServerName != nil && d.TLSServerName != "":
		return c, refused(field, "TLSSkipVerify, GRPCUseTLS and TLSServerName are not served")
	case d.FailuresBeforeWarning != 0:
		return c, refused(f("FailuresBeforeWarning"), "beacon checks go from passing to critical")
	case d.ServiceID != "":
		return c, refused(f("ServiceID"), "register checks with their service")
	}
	dur := func(name, text string) (time.Duration, error) {
		if text == "" {
			return 0, nil
		}
		v, err := time.ParseDuration(text)
		if err != nil || v < 0 {
			return 0, refused(f(name), fmt.Sprintf("%q is not a duration such as 10s", text))
		}
		return v, nil
	}
	var err error
	if c.Interval, err = dur("Interval", d.Interval); err != nil {
		return c, err
	}
	if c.Timeout, err = dur("Timeout", d.Timeout); err != nil {
		return c, err
	}
	if c.DeregisterCriticalAfter, err = dur("DeregisterCriticalServiceAfter", d.DeregisterCriticalServiceAfter); err != nil {
		return c, err
	}
	switch {
	case d.TTL != "":
		c.Kind = registry.CheckTTL
		if c.Interval, err = dur("TTL", d.TTL); err != nil {
			return c, err
		}
	case d.HTTP != "":
		c.Kind, c.Target = registry.CheckHTTP, d.HTTP
		for k, v := range d.Header {
			if len(v) != 1 {
				return c, refused(f("Header."+k), "beacon's HTTP checks send one value per header")
			}
			if c.Headers == nil {
				c.Headers = map[string]string{}
			}
			c.Headers[k] = v[0]
		}
	case d.TCP != "":
		c.Kind, c.Target = registry.CheckTCP, d.TCP
	case d.GRPC != "":
		c.Kind = registry.CheckGRPC
		c.Target, c.GRPCService, _ = strings.Cut(d.GRPC, "/")
	default:
		return c, refused(field, "names no check: set TTL, HTTP, TCP or GRPC")
	}
	// Consul starts counting at once: 0 means the first result decides.
	c.SuccessesBeforePassing = max(d.SuccessBeforePassing, 1)
	c.FailuresBeforeCritical = max(d.FailuresBeforeCritical, 1)
	switch d.CheckID {
	case "":
		c.Name = "service"
		if total > 1 {
			c.Name = "service-" + strconv.Itoa(n+1)
		}
	default:
		if len(d.CheckID) > registry.MaxMetadataValueLen {
			return c, refused(f("CheckID"), fmt.Sprintf("%d bytes, at most %d", len(d.CheckID), registry.MaxMetadataValueLen))
		}
		c.Name = consulCheckName(d.CheckID)
	}
	c.Status = registry.HealthCritical // Consul starts every check critical
	if d.Status != "" {
		h, err := registry.ParseHealth(d.Status)
		if err != nil {
			return c, refused(f("Status"), "must be passing, warning or critical")
		}
		c.Status = h
	}
	return c, nil
}

// consulCall runs one of the server's own API calls for the Consul API,
// with what its interceptors would do around it: the write budgets and
// the audit record.
func consulCall[Req, Resp any](s *Server, ctx context.Context, procedure string, msg *Req, h func(context.Context, *connect.Request[Req]) (*connect.Response[Resp], error)) (*Resp, error) {
	if writeProcedures[procedure] {
		if err := s.spendWrites(ctx, connOf(ctx), 1, time.Now()); err != nil {
			s.audit.record(ctx, procedure, msg, nil, err)
			return nil, err
		}
	}
	resp, err := h(ctx, connect.NewRequest(msg))
	var out *Resp
	var anyResp any
	if err == nil {
		out = resp.Msg
		anyResp = out
	}
	s.audit.record(ctx, procedure, msg, anyResp, err)
	return out, err
}

func remoteHost(r *http.Request) string {
	host, _, err := net.SplitHostPort(r.RemoteAddr)
	if err != nil {
		return r.RemoteAddr
	}
	return host
}

func (s *Server) consulRegister(w http.ResponseWriter, r *http.Request, q *consulQuery) {
	var reg consulRegistration
	if err := s.consulBody(w, r, &reg); err != nil {
		consulError(w, err)
		return
	}
	in, err := reg.instance(q.ns, remoteHost(r))
	if err != nil {
		consulError(w, err)
		return
	}
	resp, err := consulCall(s, r.Context(), beaconv1connect.RegistryServiceRegisterProcedure,
		&beaconv1.RegisterRequest{Instance: wire.InstanceToProto(in)}, api{s}.Register)
	if err != nil {
		consulError(w, err)
		return
	}
	s.consulSettle(r.Context(), resp.GetRevision())
	w.WriteHeader(http.StatusOK)
}

func (s *Server) consulDeregister(w http.ResponseWriter, r *http.Request, q *consulQuery) {
	in, err := s.consulFindInstance(r.Context(), q.ns, r.PathValue("id"))
	if err == nil {
		var resp *beaconv1.DeregisterResponse
		resp, err = consulCall(s, r.Context(), beaconv1connect.RegistryServiceDeregisterProcedure,
			&beaconv1.DeregisterRequest{Namespace: in.Namespace, Service: in.Service, Id: in.ID}, api{s}.Deregister)
		s.consulSettle(r.Context(), resp.GetRevision())
	}
	if err != nil {
		consulError(w, err)
		return
	}
	w.WriteHeader(http.StatusOK)
}

// consulSettle returns once this server's view holds a write (bounded),
// so that a Consul client reads what it just wrote, as from its agent.
func (s *Server) consulSettle(ctx context.Context, rev int64) {
	if rev == 0 {
		return
	}
	ctx, cancel := context.WithTimeout(ctx, readTimeout)
	defer cancel()
	_ = s.view.WaitRevision(ctx, rev)
}

// consulMaintenance is Consul's service maintenance mode: enable=true
// declares the instance OUT_OF_SERVICE, enable=false UP.
func (s *Server) consulMaintenance(w http.ResponseWriter, r *http.Request, q *consulQuery) {
	enable, err := strconv.ParseBool(q.values.Get("enable"))
	if err != nil {
		consulError(w, refused("enable", "must be true or false"))
		return
	}
	in, err := s.consulFindInstance(r.Context(), q.ns, r.PathValue("id"))
	if err == nil {
		status := beaconv1.Status_STATUS_UP
		if enable {
			status = beaconv1.Status_STATUS_OUT_OF_SERVICE
		}
		var resp *beaconv1.SetStatusResponse
		resp, err = consulCall(s, r.Context(), beaconv1connect.RegistryServiceSetStatusProcedure,
			&beaconv1.SetStatusRequest{Namespace: in.Namespace, Service: in.Service, Id: in.ID, Status: status}, api{s}.SetStatus)
		s.consulSettle(r.Context(), resp.GetRevision())
	}
	if err != nil {
		consulError(w, err)
		return
	}
	w.WriteHeader(http.StatusOK)
}

func (s *Server) consulCheckPass(w http.ResponseWriter, r *http.Request, q *consulQuery) {
	s.consulCheckSet(w, r, q, registry.HealthPassing, q.values.Get("note"))
}

func (s *Server) consulCheckWarn(w http.ResponseWriter, r *http.Request, q *consulQuery) {
	s.consulCheckSet(w, r, q, registry.HealthWarning, q.values.Get("note"))
}

func (s *Server) consulCheckFail(w http.ResponseWriter, r *http.Request, q *consulQuery) {
	s.consulCheckSet(w, r, q, registry.HealthCritical, q.values.Get("note"))
}

// consulCheckUpdate takes {"Status": "passing|warning|critical", "Output": "…"}.
func (s *Server) consulCheckUpdate(w http.ResponseWriter, r *http.Request, q *consulQuery) {
	var body struct{ Status, Output string }
	if err := s.consulBody(w, r, &body); err != nil {
		consulError(w, err)
		return
	}
	h, err := registry.ParseHealth(body.Status)
	if err != nil {
		consulError(w, refused("Status", "must be passing, warning or critical"))
		return
	}
	s.consulCheckSet(w, r, q, h, body.Output)
}

// consulCheckSet updates a TTL check named by its Consul id: "service:ID"
// or "service:ID:N" (Consul's defaults), or a CheckID given at
// registration — which must then name a check of one instance only.
func (s *Server) consulCheckSet(w http.ResponseWriter, r *http.Request, q *consulQuery, h registry.Health, output string) {
	in, name, err := s.consulFindCheck(r.Context(), q.ns, r.PathValue("id"))
	if err == nil {
		if len(output) > registry.MaxCheckOutputLen {
			output = output[:registry.MaxCheckOutputLen] // Consul truncates long outputs too
		}
		var resp *beaconv1.UpdateCheckResponse
		resp, err = consulCall(s, r.Context(), beaconv1connect.RegistryServiceUpdateCheckProcedure,
			&beaconv1.UpdateCheckRequest{Namespace: in.Namespace, Service: in.Service, Id: in.ID, Check: name,
				Status: beaconv1.Health(h), Output: output}, api{s}.UpdateCheck)
		s.consulSettle(r.Context(), resp.GetRevision())
	}
	if err != nil {
		consulError(w, err)
		return
	}
	w.WriteHeader(http.StatusOK)
}

func (s *Server) consulFindCheck(ctx context.Context, ns, checkID string) (*registry.Instance, string, error) {
	// Consul's default ids name their instance: look at it first.
	if rest, ok := strings.CutPrefix(checkID, "service:"); ok {
		ids := []string{rest}
		if i := strings.LastIndexByte(rest, ':'); i > 0 {
			ids = append(ids, rest[:i])
		}
		for _, id := range ids {
			if in, err := s.consulFindInstance(ctx, ns, id); err == nil {
				for _, c := range in.Checks {
					if consulCheckID(in, c.Name) == checkID {
						return in, c.Name, nil
					}
				}
			}
		}
	}
	// Any other id: the checks of every instance the caller may read.
	var found []*registry.Instance
	var name string
	for _, snap := range s.view.Services(ns) {
		if !consulMayRead(ctx, ns, snap.Service) {
			continue
		}
		for _, in := range snap.Instances {
			for _, c := range in.Checks {
				if consulCheckID(in, c.Name) == checkID {
					found, name = append(found, in), c.Name
				}
			}
		}
	}
	switch len(found) {
	case 0:
		return nil, "", connect.NewError(connect.CodeNotFound, fmt.Errorf("CheckID %q does not have associated TTL: no instance of namespace %s has it", checkID, ns))
	case 1:
		return found[0], name, nil
	}
	return nil, "", connect.NewError(connect.CodeFailedPrecondition, fmt.Errorf("CheckID %q names checks of %d instances in namespace %s: beacon check names are unique within an instance only; use service:ID, or beacon's API", checkID, len(found), ns))
}
