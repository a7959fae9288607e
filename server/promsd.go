package server

import (
	"encoding/json"
	"fmt"
	"maps"
	"net"
	"net/http"
	"net/url"
	"slices"
	"strconv"
	"strings"

	"connectrpc.com/connect"

	"beacon.dev/beacon/registry"
	"beacon.dev/beacon/server/internal/acl"
)

// Prometheus HTTP service discovery (http_sd_configs, docs/interop.md):
//
//	GET /v1/sd/prometheus?namespace=prod&service=orders&service=payments&tag=metrics
//
// answers the instances as Prometheus target groups,
// [{"targets":["host:port"],"labels":{"__meta_beacon_…":"…"}}], one group
// per instance (each instance has its own labels), ordered by service and
// then instance id: Prometheus names a group by its index in the array, so
// a stable order keeps a change from churning every group after it.
//
// Every instance is listed, routable or not, with its health and status
// as labels (as Prometheus's consul_sd does): a draining or failing
// instance is still a process whose metrics someone wants, and a
// relabel rule that keeps only __meta_beacon_routable="true" is one line.
//
// It is served from the server's view, never from etcd: Prometheus polls
// every refresh_interval, and an answer a few milliseconds behind etcd is
// as good as any. With ACLs the token (Authorization: Bearer, which
// Prometheus's authorization config sends) needs service:read; the
// services it may not read are left out, as ListServices leaves them out,
// and the header Beacon-Results-Filtered says so.

// promSDPath is where the discovery is served, on the API port.
const promSDPath = "/v1/sd/prometheus"

// promSDMetricsPortKey is the metadata key whose value, a port, is the
// port Prometheus scrapes instead of the instance's own.
const promSDMetricsPortKey = "metrics_port"

// promSDLabelPrefix starts every label the discovery sets; Prometheus
// drops labels starting with "__" after relabeling.
const promSDLabelPrefix = "__meta_beacon_"

// promSDParams are the query parameters the endpoint reads; any other is
// refused, so that a misspelt one ("services=") fails loudly instead of
// widening the answer to the whole namespace.
var promSDParams = []string{"namespace", "service", "tag"}

// promSDGroup is one target group of Prometheus's http_sd format.
type promSDGroup struct {
	Targets []string          `json:"targets"`
	Labels  map[string]string `json:"labels"`
}

// handlePromSD serves GET /v1/sd/prometheus. guardAPI has already
// checked readiness and the token.
func (s *Server) handlePromSD(w http.ResponseWriter, r *http.Request) {
	q, err := promSDQueryOf(r.URL.Query())
	if err != nil {
		writeConnectErrorAsHTTP(w, toConnectError(err))
		return
	}
	groups, filtered, err := s.promSDGroups(identityOf(r.Context()), q)
	if err != nil {
		writeConnectErrorAsHTTP(w, err)
		return
	}
	body, err := json.Marshal(groups)
	if err != nil { // cannot happen: strings only
		http.Error(w, "server: encoding the target groups: "+err.Error(), http.StatusInternalServerError)
		return
	}
	h := w.Header()
	h.Set("Content-Type", "application/json")
	h.Set("Content-Length", strconv.Itoa(len(body)+1))
	if filtered {
		h.Set("Beacon-Results-Filtered", "true")
	}
	w.WriteHeader(http.StatusOK)
	w.Write(append(body, '\n'))
}

// promSDQuery is a validated discovery query.
type promSDQuery struct {
	namespace string
	services  []string // sorted, without duplicates; none: every service
	tags      []string // an instance must carry every one
}

func promSDQueryOf(v url.Values) (promSDQuery, error) {
	for k := range v {
		if !slices.Contains(promSDParams, k) {
			return promSDQuery{}, &registry.FieldError{Field: "query parameter", Reason: "must be one of namespace, service, tag", Value: k}
		}
	}
	if n := len(v["namespace"]); n > 1 {
		return promSDQuery{}, &registry.FieldError{Field: "namespace", Reason: fmt.Sprintf("must be given at most once, is given %d times", n)}
	}
	ns, err := namespaceOf(v.Get("namespace"))
	if err != nil {
		return promSDQuery{}, err
	}
	q := promSDQuery{namespace: ns, tags: v["tag"]}
	for _, svc := range v["service"] {
		if err := registry.ValidateName("service", svc); err != nil {
			return promSDQuery{}, err
		}
		q.services = append(q.services, svc)
	}
	slices.Sort(q.services)
	q.services = slices.Compact(q.services)
	for _, tag := range q.tags {
		if tag == "" {
			return promSDQuery{}, &registry.FieldError{Field: "tag", Reason: "must not be empty"}
		}
		if len(tag) > registry.MaxTagLen {
			// No instance can carry it: say so rather than answer [].
			return promSDQuery{}, &registry.FieldError{Field: "tag", Reason: fmt.Sprintf("must be at most %d bytes, has %d", registry.MaxTagLen, len(tag))}
		}
	}
	return q, nil
}

// promSDGroups builds the answer to q for who, from the view. filtered
// says that services who may not read were left out. An answer of more
// than --max-sd-targets targets is refused rather than cut: a cut list
// would silently stop the scraping of the instances left out.
func (s *Server) promSDGroups(who acl.Identity, q promSDQuery) (groups []promSDGroup, filtered bool, err error) {
	var snaps []*registry.Snapshot
	if len(q.services) == 0 {
		snaps = s.view.Services(q.namespace)
	} else {
		for _, svc := range q.services {
			snaps = append(snaps, s.view.Snapshot(registry.ServiceKey{Namespace: q.namespace, Service: svc}))
		}
	}
	groups = []promSDGroup{} // "[]", never "null"
	limit := s.cfg.Limits.MaxSDTargets
	for _, snap := range snaps {
		if who.Authz.Service(q.namespace, snap.Service) < acl.Read {
			filtered = true
			continue
		}
		for _, in := range snap.Instances {
			if !hasTags(in, q.tags) {
				continue
			}
			if len(groups) == limit {
				s.metrics.limitHits.WithLabelValues("max-sd-targets").Inc()
				return nil, false, connect.NewError(connect.CodeInvalidArgument, fmt.Errorf(
					"server: the query matches more than %d targets (limit --max-sd-targets); split it between scrape configs with service= or tag=", limit))
			}
			groups = append(groups, promSDGroupOf(in))
		}
	}
	return groups, filtered, nil
}

func hasTags(in *registry.Instance, tags []string) bool {
	for _, t := range tags {
		if !slices.Contains(in.Tags, t) {
			return false
		}
	}
	return true
}

// promSDGroupOf is an instance's target group: its metrics address and
// its labels.
func promSDGroupOf(in *registry.Instance) promSDGroup {
	port := in.Port
	if p, err := strconv.Atoi(in.Metadata[promSDMetricsPortKey]); err == nil && p >= registry.MinPort && p <= registry.MaxPort {
		port = p
	} // else (absent or not a port): the instance's port; the metadata label shows the bad value
	l := make(map[string]string, 13+len(in.Metadata))
	l[promSDLabelPrefix+"namespace"] = in.Namespace
	l[promSDLabelPrefix+"service"] = in.Service
	l[promSDLabelPrefix+"id"] = in.ID
	l[promSDLabelPrefix+"address"] = in.Address
	l[promSDLabelPrefix+"port"] = strconv.Itoa(in.Port)
	l[promSDLabelPrefix+"zone"] = in.Zone
	l[promSDLabelPrefix+"version"] = in.Version
	// Prometheus's convention (__meta_consul_tags): the separator around
	// the list too, so that a relabel regex .*,web,.* finds any tag.
	l[promSDLabelPrefix+"tags"] = "," + strings.Join(in.Tags, ",") + ","
	l[promSDLabelPrefix+"weight"] = strconv.Itoa(in.Weight)
	l[promSDLabelPrefix+"health"] = strings.ToLower(in.Health.String())
	l[promSDLabelPrefix+"status"] = in.Status.String()
	l[promSDLabelPrefix+"routable"] = strconv.FormatBool(in.Routable())
	// Metadata keys are any printable text, label names are not: keys
	// that differ only in what sanitizing replaces share a label, which
	// goes to the key that is a label name already, else to the first key
	// in byte order — the same answer every time.
	for _, k := range slices.Sorted(maps.Keys(in.Metadata)) {
		name, exact := promSDLabelName(k)
		name = promSDLabelPrefix + "metadata_" + name
		if _, taken := l[name]; taken && !exact {
			continue
		}
		l[name] = in.Metadata[k]
	}
	return promSDGroup{
		Targets: []string{net.JoinHostPort(in.Address, strconv.Itoa(port))},
		Labels:  l,
	}
}

// promSDLabelName turns a metadata key into the tail of a label name:
// every character but ASCII letters, digits and '_' becomes '_' (as
// Prometheus's own discoveries do). exact says nothing was replaced.
func promSDLabelName(k string) (name string, exact bool) {
	var b strings.Builder
	exact = true
	for _, r := range k {
		if r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' || r == '_' {
			b.WriteRune(r)
			continue
		}
		b.WriteByte('_')
		exact = false
	}
	return b.String(), exact
}
