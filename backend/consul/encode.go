package consul

import (
	"fmt"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/hashicorp/consul/api"

	"beacon.dev/beacon/registry"
)

// Meta keys beacon keeps its own fields in. Metadata keys that Consul
// would refuse (anything but letters, digits, '-' and '_'), or that use
// these prefixes, are stored escaped under metaEscaped.
const (
	metaNamespace = "beacon-namespace"
	metaID        = "beacon-id"
	metaZone      = "beacon-zone"
	metaVersion   = "beacon-version"
	metaStatus    = "beacon-status"
	metaSession   = "beacon-session"
	metaEscaped   = "beacon-m-"

	consulMaxMeta       = 64  // pairs
	consulMaxMetaKeyLen = 128 // characters
)

// sessionCheckPrefix names the TTL check that stands for an instance's
// session: the instance counts as gone once it is not passing.
const sessionCheckPrefix = "beacon-session:"

// serviceID is the instance's Consul service ID, unique on the agent:
// namespace and service names cannot hold '.', so it parses back.
func serviceID(k registry.InstanceKey) string { return k.Namespace + "." + k.Service + "." + k.ID }

func consulKeyChar(c byte) bool {
	return c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '-' || c == '_'
}

// metaKey maps a metadata key to one Consul accepts.
func metaKey(k string) string {
	plain := !strings.HasPrefix(k, "beacon-") && !strings.HasPrefix(k, "consul-")
	for i := 0; plain && i < len(k); i++ {
		plain = consulKeyChar(k[i])
	}
	if plain {
		return k
	}
	var b strings.Builder
	b.WriteString(metaEscaped)
	for i := 0; i < len(k); i++ {
		if c := k[i]; consulKeyChar(c) && c != '_' {
			b.WriteByte(c)
		} else {
			fmt.Fprintf(&b, "_%02X", c)
		}
	}
	return b.String()
}

func unescapeMetaKey(k string) (string, bool) {
	var b strings.Builder
	for i := 0; i < len(k); i++ {
		if k[i] != '_' {
			b.WriteByte(k[i])
			continue
		}
		if i+2 >= len(k) {
			return "", false
		}
		n, err := strconv.ParseUint(k[i+1:i+3], 16, 8)
		if err != nil {
			return "", false
		}
		b.WriteByte(byte(n))
		i += 2
	}
	return b.String(), true
}

func fieldErr(field, value, format string, args ...any) error {
	return &registry.FieldError{Field: field, Reason: fmt.Sprintf(format, args...), Value: value}
}

// registration maps a validated instance to a Consul agent registration;
// what Consul cannot hold is refused by field. sessionTTL > 0 adds the
// session's TTL check.
func registration(in *registry.Instance, sessionTTL time.Duration) (*api.AgentServiceRegistration, error) {
	meta := map[string]string{metaNamespace: in.Namespace, metaID: in.ID}
	for k, v := range map[string]string{metaZone: in.Zone, metaVersion: in.Version} {
		if v != "" {
			meta[k] = v
		}
	}
	if in.Status != registry.StatusUp {
		meta[metaStatus] = in.Status.String()
	}
	if in.SessionID != 0 {
		meta[metaSession] = strconv.FormatInt(in.SessionID, 16)
	}
	own := len(meta)
	if len(in.Metadata)+own > consulMaxMeta {
		return nil, fieldErr("metadata", "", "must have at most %d entries on Consul (its %d less the %d beacon keeps there), has %d",
			consulMaxMeta-own, consulMaxMeta, own, len(in.Metadata))
	}
	for k, v := range in.Metadata {
		ck := metaKey(k)
		if len(ck) > consulMaxMetaKeyLen {
			return nil, fieldErr("metadata key", k, "must fit Consul's %d characters once escaped (letters, digits, '-' and '_' are kept, others take 3), needs %d",
				consulMaxMetaKeyLen, len(ck))
		}
		meta[ck] = v
	}
	reg := &api.AgentServiceRegistration{
		ID: serviceID(in.Key()), Name: in.Service, Address: in.Address, Port: in.Port,
		Tags: slices.Clone(in.Tags), Meta: meta, Weights: &api.AgentWeights{Passing: in.Weight, Warning: 1},
	}
	for n := range in.Checks {
		c, err := serviceCheck(in, &in.Checks[n], fmt.Sprintf("checks[%d]", n))
		if err != nil {
			return nil, err
		}
		reg.Checks = append(reg.Checks, c)
	}
	if sessionTTL > 0 {
		reg.Checks = append(reg.Checks, &api.AgentServiceCheck{
			CheckID: sessionCheckPrefix + reg.ID, Name: "beacon session", TTL: sessionTTL.String(), Status: api.HealthPassing,
			Notes: "kept passing by the owning process; once critical the instance counts as gone",
			// Consul's minimum; beacon readers drop the instance at the TTL already.
			DeregisterCriticalServiceAfter: max(time.Minute, 2*sessionTTL).String(),
		})
	}
	return reg, nil
}

// serviceCheck maps a beacon check to a Consul agent check.
func serviceCheck(in *registry.Instance, c *registry.Check, field string) (*api.AgentServiceCheck, error) {
	out := &api.AgentServiceCheck{
		CheckID: serviceID(in.Key()) + ":" + c.Name, Name: c.Name,
		Status:                 consulStatus(c.Status),
		SuccessBeforePassing:   c.SuccessesBeforePassing,
		FailuresBeforeCritical: c.FailuresBeforeCritical,
	}
	if c.DeregisterCriticalAfter > 0 {
		out.DeregisterCriticalServiceAfter = c.DeregisterCriticalAfter.String() // Consul raises it to 1m at least
	}
	if c.Kind != registry.CheckTTL {
		out.Interval, out.Timeout = c.Interval.String(), c.Timeout.String()
	}
	switch c.Kind {
	case registry.CheckHTTP:
		if c.ExpectStatus != "2xx" {
			return nil, fieldErr(field+".expect_status", c.ExpectStatus, "must be 2xx on Consul (its HTTP checks pass on 2xx and warn on 429)")
		}
		if c.BodyContains != "" {
			return nil, fieldErr(field+".body_contains", c.BodyContains, "is not supported by Consul's HTTP checks")
		}
		out.HTTP, out.Method = c.ProbeTarget(in), "GET"
		for k, v := range c.Headers {
			if out.Header == nil {
				out.Header = map[string][]string{}
			}
			out.Header[k] = []string{v}
		}
	case registry.CheckTCP:
		out.TCP = c.ProbeTarget(in)
	case registry.CheckGRPC:
		out.GRPC = c.ProbeTarget(in)
		if c.GRPCService != "" {
			out.GRPC += "/" + c.GRPCService
		}
	case registry.CheckTTL:
		out.TTL = c.Interval.String()
	}
	return out, nil
}

func consulStatus(h registry.Health) string {
	switch h {
	case registry.HealthWarning:
		return api.HealthWarning
	case registry.HealthCritical:
		return api.HealthCritical
	default:
		return api.HealthPassing
	}
}

func beaconHealth(status string) registry.Health {
	switch status {
	case api.HealthPassing:
		return registry.HealthPassing
	case api.HealthWarning:
		return registry.HealthWarning
	default: // critical, maintenance, anything unknown
		return registry.HealthCritical
	}
}

var checkKinds = map[string]registry.CheckKind{"http": registry.CheckHTTP, "tcp": registry.CheckTCP, "grpc": registry.CheckGRPC, "ttl": registry.CheckTTL}

// instance maps a catalog entry to an instance of namespace ns. ok is
// false for entries of another namespace and for session instances whose
// session check is no longer passing (their owner is gone). Entries
// without beacon's keys — registered by anything else that speaks Consul —
// belong to the default namespace, under their Consul service ID.
func instance(e *api.ServiceEntry, ns string) (in *registry.Instance, ok bool) {
	svc := e.Service
	if svc == nil {
		return nil, false
	}
	entryNS := svc.Meta[metaNamespace]
	if entryNS == "" {
		entryNS = registry.DefaultNamespace
	}
	if entryNS != ns {
		return nil, false
	}
	in = &registry.Instance{Namespace: ns, Service: svc.Service, ID: svc.ID, Address: svc.Address, Port: svc.Port,
		Weight: svc.Weights.Passing, Tags: slices.Clone(svc.Tags), Status: registry.StatusUp, Health: registry.HealthPassing,
		Revision: int64(svc.ModifyIndex)}
	if in.Address == "" && e.Node != nil {
		in.Address = e.Node.Address // Consul's rule: no service address means the node's
	}
	if in.Weight <= 0 {
		in.Weight = registry.DefaultWeight
	}
	for k, v := range svc.Meta {
		switch {
		case k == metaNamespace:
		case k == metaID:
			in.ID = v
		case k == metaZone:
			in.Zone = v
		case k == metaVersion:
			in.Version = v
		case k == metaStatus:
			if st, err := registry.ParseStatus(v); err == nil {
				in.Status = st
			}
		case k == metaSession:
			id, _ := strconv.ParseInt(v, 16, 64)
			in.SessionID = id
		case strings.HasPrefix(k, metaEscaped):
			if orig, ok := unescapeMetaKey(strings.TrimPrefix(k, metaEscaped)); ok {
				setMeta(in, orig, v)
			}
		default:
			setMeta(in, k, v)
		}
	}
	worst := registry.HealthPassing
	for _, hc := range e.Checks {
		h := beaconHealth(hc.Status)
		if strings.HasPrefix(hc.CheckID, sessionCheckPrefix) {
			if h != registry.HealthPassing {
				return nil, false
			}
			continue
		}
		worst = max(worst, h)
		if hc.ServiceID == "" {
			continue // a node check (serfHealth): counts for health, is not the instance's
		}
		kind, known := checkKinds[hc.Type]
		if !known {
			continue
		}
		in.Checks = append(in.Checks, registry.Check{Name: hc.Name, Kind: kind, Status: h, Output: hc.Output,
			Interval: hc.Definition.IntervalDuration, Timeout: hc.Definition.TimeoutDuration})
		in.Revision = max(in.Revision, int64(hc.ModifyIndex))
	}
	in.Health = worst
	return in, true
}

func setMeta(in *registry.Instance, k, v string) {
	if in.Metadata == nil {
		in.Metadata = map[string]string{}
	}
	in.Metadata[k] = v
}
