package store

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"reflect"
	"strconv"
	"strings"
	"time"
	"unique"

	"beacon.dev/beacon/registry"
)

// DefaultPrefix is where beacon keeps its keys in etcd.
const DefaultPrefix = "/beacon/v1/"

// Layout builds and parses keys under one prefix.
type Layout struct{ Prefix string }

// InstanceKey returns the etcd key of an instance.
func (l Layout) InstanceKey(k registry.InstanceKey) string {
	return l.Prefix + "ns/" + k.Namespace + "/svc/" + k.Service + "/inst/" + k.ID
}

// SessionKey returns the etcd key of a session record.
func (l Layout) SessionKey(id int64) string {
	return l.Prefix + "sessions/" + FormatSessionID(id)
}

// NamespacesPrefix is the prefix of every instance key.
func (l Layout) NamespacesPrefix() string { return l.Prefix + "ns/" }

// SessionsPrefix is the prefix of every session key.
func (l Layout) SessionsPrefix() string { return l.Prefix + "sessions/" }

// ServersPrefix is where live beacon servers announce themselves (keys
// bound to each server's lease), for sharing the health checks.
func (l Layout) ServersPrefix() string { return l.Prefix + "servers/" }

// TTLPrefix holds the heartbeat keys of TTL checks, each bound to a lease
// of the check's TTL.
func (l Layout) TTLPrefix() string { return l.Prefix + "ttl/" }

// TTLKey is the heartbeat key of one TTL check.
func (l Layout) TTLKey(k registry.InstanceKey, check string) string {
	return l.TTLPrefix() + k.Namespace + "/" + k.Service + "/" + k.ID + "/" + check
}

// KVPrefix holds the KV config store's current values, and
// KVHistoryPrefix their kept versions (server/internal/kv).
func (l Layout) KVPrefix() string { return l.Prefix + "kv/" }

// KVAppliedPrefix holds the instances' apply reports, one per key and
// session, on the session's lease.
func (l Layout) KVAppliedPrefix() string { return l.Prefix + "kvapplied/" }

// KVRolloutPrefix holds the keys' staged rollouts (a KVRollout in the
// API's JSON), one per key.
func (l Layout) KVRolloutPrefix() string { return l.Prefix + "kvrollout/" }

// KVHistoryPrefix: see KVPrefix.
func (l Layout) KVHistoryPrefix() string { return l.Prefix + "kvhistory/" }

// ConsulKVPrefix holds what the Consul API keeps beside a KV value (its
// flags and lock index), ConsulHoldPrefix the key's lock holder (on the
// holding session's lease), ConsulSessionPrefix a session's Consul
// settings (on its lease). server/consul_kv.go.
func (l Layout) ConsulKVPrefix() string      { return l.Prefix + "kvconsul/" }
func (l Layout) ConsulHoldPrefix() string    { return l.Prefix + "kvhold/" }
func (l Layout) ConsulSessionPrefix() string { return l.Prefix + "consulsession/" }

// LockPrefix holds the locks' queues: one key per session waiting for or
// holding a lock, on the session's lease (server/internal/lock).
func (l Layout) LockPrefix() string { return l.Prefix + "lock/" }

// LockQueue is the prefix of one lock's queue. '@' ends the name: no lock
// name holds one, so no queue's prefix covers another's.
func (l Layout) LockQueue(ns, name string) string { return l.LockPrefix() + ns + "/" + name + "@" }

// LockKey is a session's place in a lock's queue.
func (l Layout) LockKey(ns, name string, session int64) string {
	return l.LockQueue(ns, name) + FormatSessionID(session)
}

// LockReleasedPrefix holds, per lock, the fencing token its last holder
// released (a lock lost with its session is not released: the next holder
// waits the lock delay).
func (l Layout) LockReleasedPrefix() string { return l.Prefix + "lockreleased/" }

// LockHoldPrefix holds, per lock, a key on a lease of the lock delay,
// made when a holder was lost with its session: nobody gets the lock
// while it exists.
func (l Layout) LockHoldPrefix() string { return l.Prefix + "lockhold/" }

// ACLPrefix holds the ACL records (server/internal/acl).
func (l Layout) ACLPrefix() string { return l.Prefix + "acl/" }

// ProbeKey is written to push a revision through the watch, on etcd
// versions whose requested progress notifications cannot be trusted.
func (l Layout) ProbeKey() string { return l.Prefix + "progress-probe" }

// GuardPrefix holds the mass-expiry guard's release marker.
func (l Layout) GuardPrefix() string { return l.Prefix + "guard/" }

// GuardMarkerKey is written to end the guard's expired holds at a new
// revision.
func (l Layout) GuardMarkerKey() string { return l.GuardPrefix() + "release" }

// ServiceConfigPrefix is where per-service settings live.
func (l Layout) ServiceConfigPrefix() string { return l.Prefix + "svcconf/" }

// ServiceConfigKey is a service's settings record.
func (l Layout) ServiceConfigKey(sk registry.ServiceKey) string {
	return l.ServiceConfigPrefix() + sk.Namespace + "/" + sk.Service
}

// ServiceConfig is a service's stored settings.
type ServiceConfig struct {
	ProtectionThreshold float64 `json:"protection_threshold"`
}

// DecodeServiceConfig parses a settings record and its key.
func (l Layout) DecodeServiceConfig(key string, value []byte) (registry.ServiceKey, ServiceConfig, error) {
	var sk registry.ServiceKey
	var cfg ServiceConfig
	rest := strings.TrimPrefix(key, l.ServiceConfigPrefix())
	ns, svc, ok := strings.Cut(rest, "/")
	if !ok || registry.ValidateNamespace(ns) != nil || registry.ValidateName("service", svc) != nil {
		return sk, cfg, fmt.Errorf("store: key %q is not a service settings key", key)
	}
	err := decodeStrict(value, &cfg, func(depth int) []string {
		if depth == 1 {
			return serviceConfigKeys
		}
		return nil
	})
	if err != nil {
		return sk, cfg, fmt.Errorf("store: decoding %q: %w", key, err)
	}
	if err := registry.ValidateProtectionThreshold(cfg.ProtectionThreshold); err != nil {
		return sk, cfg, fmt.Errorf("store: decoding %q: %w", key, err)
	}
	return registry.ServiceKey{Namespace: ns, Service: svc}, cfg, nil
}

// ServicePolicyPrefix is where the services' xDS policies live
// (registry.ServicePolicy), one record per service beside its settings
// record: a record of its own, so that readers of the settings that
// predate policies (older servers during an upgrade, SDKs reading etcd
// directly) keep reading the protection threshold.
func (l Layout) ServicePolicyPrefix() string { return l.Prefix + "svcpolicy/" }

// ServicePolicyKey is a service's policy record.
func (l Layout) ServicePolicyKey(sk registry.ServiceKey) string {
	return l.ServicePolicyPrefix() + sk.Namespace + "/" + sk.Service
}

// policyRecord is the stored form of a registry.ServicePolicy: flat, so
// that decodeStrict checks every key; zero fields (defaults) are left out.
type policyRecord struct {
	LBPolicy         string `json:"lb_policy,omitempty"`
	LBChoiceCount    uint32 `json:"lb_choice_count,omitempty"`
	LBMinRingSize    uint64 `json:"lb_min_ring_size,omitempty"`
	LBMaxRingSize    uint64 `json:"lb_max_ring_size,omitempty"`
	LBHashHeader     string `json:"lb_hash_header,omitempty"`
	RetryOn          string `json:"retry_on,omitempty"` // Envoy's form: "unavailable,internal"
	RetryNum         uint32 `json:"retry_num_retries,omitempty"`
	RetryBaseNS      int64  `json:"retry_base_backoff_ns,omitempty"`
	RetryMaxNS       int64  `json:"retry_max_backoff_ns,omitempty"`
	ODConsecutive    uint32 `json:"outlier_consecutive_failures,omitempty"`
	ODIntervalNS     int64  `json:"outlier_interval_ns,omitempty"`
	ODBaseEjectionNS int64  `json:"outlier_base_ejection_time_ns,omitempty"`
	ODMaxPercent     uint32 `json:"outlier_max_ejection_percent,omitempty"`
	ODFPThreshold    uint32 `json:"outlier_failure_percentage_threshold,omitempty"`
	ODFPMinHosts     uint32 `json:"outlier_failure_percentage_minimum_hosts,omitempty"`
	ODFPVolume       uint32 `json:"outlier_failure_percentage_request_volume,omitempty"`
}

// EncodeServicePolicy returns the stored form of a validated policy.
func EncodeServicePolicy(p registry.ServicePolicy) []byte {
	lb, r, od := p.LoadBalancing, p.Retry, p.OutlierDetection
	rec := policyRecord{
		LBChoiceCount: lb.ChoiceCount, LBMinRingSize: lb.MinRingSize, LBMaxRingSize: lb.MaxRingSize, LBHashHeader: lb.HashHeader,
		RetryOn: r.On.String(), RetryNum: r.NumRetries, RetryBaseNS: int64(r.BaseBackoff), RetryMaxNS: int64(r.MaxBackoff),
		ODConsecutive: od.ConsecutiveFailures, ODIntervalNS: int64(od.Interval), ODBaseEjectionNS: int64(od.BaseEjectionTime),
		ODMaxPercent: od.MaxEjectionPercent, ODFPThreshold: od.FailurePercentageThreshold,
		ODFPMinHosts: od.FailurePercentageMinimumHosts, ODFPVolume: od.FailurePercentageRequestVolume,
	}
	if lb.Policy != registry.LBRoundRobin {
		rec.LBPolicy = lb.Policy.String()
	}
	b, err := json.Marshal(rec)
	if err != nil {
		panic("store: encoding a policy record cannot fail: " + err.Error())
	}
	return b
}

// DecodeServicePolicy parses a policy record and its key. A record that
// does not validate is refused, as a hand-edited one could be.
func (l Layout) DecodeServicePolicy(key string, value []byte) (registry.ServiceKey, registry.ServicePolicy, error) {
	var p registry.ServicePolicy
	rest := strings.TrimPrefix(key, l.ServicePolicyPrefix())
	ns, svc, ok := strings.Cut(rest, "/")
	if !ok || rest == key || registry.ValidateNamespace(ns) != nil || registry.ValidateName("service", svc) != nil {
		return registry.ServiceKey{}, p, fmt.Errorf("store: key %q is not a service policy key", key)
	}
	var rec policyRecord
	err := decodeStrict(value, &rec, func(depth int) []string {
		if depth == 1 {
			return policyKeys
		}
		return nil
	})
	if err == nil && rec.LBPolicy != "" {
		p.LoadBalancing.Policy, err = registry.ParseLBPolicy(rec.LBPolicy)
	}
	if err == nil && rec.RetryOn != "" {
		p.Retry.On, err = registry.ParseRetryOn(strings.Split(rec.RetryOn, ","))
	}
	if err == nil {
		p.LoadBalancing.ChoiceCount, p.LoadBalancing.MinRingSize, p.LoadBalancing.MaxRingSize = rec.LBChoiceCount, rec.LBMinRingSize, rec.LBMaxRingSize
		p.LoadBalancing.HashHeader = rec.LBHashHeader
		p.Retry.NumRetries, p.Retry.BaseBackoff, p.Retry.MaxBackoff = rec.RetryNum, time.Duration(rec.RetryBaseNS), time.Duration(rec.RetryMaxNS)
		p.OutlierDetection = registry.OutlierDetection{
			ConsecutiveFailures: rec.ODConsecutive, Interval: time.Duration(rec.ODIntervalNS), BaseEjectionTime: time.Duration(rec.ODBaseEjectionNS),
			MaxEjectionPercent: rec.ODMaxPercent, FailurePercentageThreshold: rec.ODFPThreshold,
			FailurePercentageMinimumHosts: rec.ODFPMinHosts, FailurePercentageRequestVolume: rec.ODFPVolume,
		}
		err = p.Validate()
	}
	if err != nil {
		return registry.ServiceKey{}, registry.ServicePolicy{}, fmt.Errorf("store: decoding %q: %w", key, err)
	}
	return registry.ServiceKey{Namespace: ns, Service: svc}, p, nil
}

// FormatSessionID renders a session (lease) id as etcdctl does: 16 hex digits.
func FormatSessionID(id int64) string { return fmt.Sprintf("%016x", uint64(id)) }

// ParseSessionID parses what FormatSessionID writes.
func ParseSessionID(s string) (int64, error) {
	u, err := strconv.ParseUint(s, 16, 64)
	if err != nil {
		return 0, fmt.Errorf("store: bad session id %q: %w", s, err)
	}
	return int64(u), nil
}

// ParseInstanceKey splits an instance key. The returned strings share
// memory with key.
func (l Layout) ParseInstanceKey(key string) (registry.InstanceKey, error) {
	rest, ok := strings.CutPrefix(key, l.Prefix+"ns/")
	if !ok {
		return registry.InstanceKey{}, fmt.Errorf("store: key %q is not an instance key", key)
	}
	ns, rest, ok1 := strings.Cut(rest, "/svc/")
	svc, id, ok2 := strings.Cut(rest, "/inst/")
	k := registry.InstanceKey{Namespace: ns, Service: svc, ID: id}
	if !ok1 || !ok2 || registry.ValidateName("namespace", ns) != nil ||
		registry.ValidateName("service", svc) != nil || registry.ValidateID("id", id) != nil {
		return registry.InstanceKey{}, fmt.Errorf("store: key %q is not an instance key", key)
	}
	return k, nil
}

// instanceRecord is the stored JSON form of an instance. Namespace, service
// and id live in the key; the revision is etcd's.
type instanceRecord struct {
	Address  string            `json:"address"`
	Port     int               `json:"port"`
	Weight   int               `json:"weight"`
	Zone     string            `json:"zone,omitempty"`
	Version  string            `json:"version,omitempty"`
	Tags     []string          `json:"tags,omitempty"`
	Metadata map[string]string `json:"metadata,omitempty"`
	Status   string            `json:"status"`
	Health   string            `json:"health"`
	Session  string            `json:"session,omitempty"`
	Checks   []checkRecord     `json:"checks,omitempty"`
}

// checkRecord is a stored check: its spec and the last observation.
type checkRecord struct {
	Name         string            `json:"name"`
	Kind         string            `json:"kind"`
	Target       string            `json:"target,omitempty"`
	Headers      map[string]string `json:"headers,omitempty"`
	ExpectStatus string            `json:"expect_status,omitempty"`
	BodyContains string            `json:"body_contains,omitempty"`
	GRPCService  string            `json:"grpc_service,omitempty"`
	IntervalNS   int64             `json:"interval_ns"`
	TimeoutNS    int64             `json:"timeout_ns"`
	Jitter       float64           `json:"jitter"`
	Failures     int               `json:"failures_before_critical"`
	Successes    int               `json:"successes_before_passing"`
	DeregisterNS int64             `json:"deregister_critical_after_ns,omitempty"`
	Status       string            `json:"status"`
	Output       string            `json:"output,omitempty"`
	SinceUnixNS  int64             `json:"since_unix_ns,omitempty"`
}

// normalize gives "none" one representation in the model: nil. The encoder
// omits empty lists and maps (omitempty), so an empty one read from etcd
// ("tags":[], a hand-written record) would come back as nil after a
// write; decoding makes it nil at once.
func (r *instanceRecord) normalize() {
	if len(r.Tags) == 0 {
		r.Tags = nil
	}
	if len(r.Metadata) == 0 {
		r.Metadata = nil
	}
	if len(r.Checks) == 0 {
		r.Checks = nil
	}
	for i := range r.Checks {
		if len(r.Checks[i].Headers) == 0 {
			r.Checks[i].Headers = nil
		}
	}
}

// Keys of the stored forms, from their struct tags.
var (
	recordKeys        = jsonNames(instanceRecord{})
	checkKeys         = jsonNames(checkRecord{})
	serviceConfigKeys = jsonNames(ServiceConfig{})
	policyKeys        = jsonNames(policyRecord{})
)

func jsonNames(v any) []string {
	t := reflect.TypeOf(v)
	names := make([]string, t.NumField())
	for i := range names {
		names[i], _, _ = strings.Cut(t.Field(i).Tag.Get("json"), ",")
	}
	return names
}

// decodeStrict decodes data, one JSON object and nothing after it, into v
// and then makes sure its keys are spelled exactly as beacon writes them,
// once each. keysAt(depth) lists the keys allowed in the objects at that
// depth of nesting (1: the top object; objects inside arrays count the
// array too), or nil where keys are data (metadata, headers).
//
// encoding/json alone is not strict enough: it matches keys to struct
// fields without regard to case, Unicode folding included ("tAgs", or
// "ſtatus" with a long s, set Status), and lets the last of duplicate keys
// win. A record has one spelling; anything else was not written by beacon
// and is refused rather than half understood. The check is cheap: the
// typed decode proved data is well-formed JSON of the record's shape, so
// one pass over the bytes that tracks depth and string bounds finds every
// key, without allocating (a pre-pass into map[string]json.RawMessage
// took three times as long; walking the object with Decoder.Token and a
// Decode per value twice as long, with five times the allocations). A key
// written with escapes ("t\u0061gs") is refused too: beacon never writes
// one.
func decodeStrict(data []byte, v any, keysAt func(depth int) []string) error {
	if err := json.Unmarshal(data, v); err != nil { // also refuses data after the object
		return err
	}
	if t := bytes.TrimLeft(data, " \t\r\n"); len(t) == 0 || t[0] != '{' { // null decodes into a struct too
		return errors.New("want a JSON object")
	}
	var seen [8]uint32 // by depth: which of keysAt(depth) the current object has had
	depth := 0
	for i := 0; i < len(data); i++ {
		switch data[i] {
		case '{':
			depth++
			if depth < len(seen) {
				seen[depth] = 0
			}
		case '[':
			depth++
		case '}', ']':
			depth--
		case '"':
			j := i + 1
			for data[j] != '"' { // well-formed: the string ends
				if data[j] == '\\' {
					j++
				}
				j++
			}
			raw := data[i+1 : j]
			i = j
			k := j + 1
			for k < len(data) && (data[k] == ' ' || data[k] == '\t' || data[k] == '\r' || data[k] == '\n') {
				k++
			}
			if k == len(data) || data[k] != ':' {
				continue // a value, not a key
			}
			names := keysAt(depth)
			if names == nil {
				continue
			}
			n := 0
			for n < len(names) && names[n] != string(raw) {
				n++
			}
			if n == len(names) {
				return fmt.Errorf("unknown field %q", raw)
			}
			if depth >= len(seen) || seen[depth]&(1<<n) != 0 {
				return fmt.Errorf("duplicate field %q", raw)
			}
			seen[depth] |= 1 << n
		}
	}
	return nil
}

// instanceKeysAt: the record at depth 1, its checks at depth 3 (object,
// "checks" array, check object); metadata (2) and headers (4) hold data.
func instanceKeysAt(depth int) []string {
	switch depth {
	case 1:
		return recordKeys
	case 3:
		return checkKeys
	}
	return nil
}

func encodeChecks(cs []registry.Check) []checkRecord {
	if len(cs) == 0 {
		return nil
	}
	out := make([]checkRecord, len(cs))
	for i, c := range cs {
		out[i] = checkRecord{
			Name: c.Name, Kind: c.Kind.String(), Target: c.Target, Headers: c.Headers,
			ExpectStatus: c.ExpectStatus, BodyContains: c.BodyContains, GRPCService: c.GRPCService,
			IntervalNS: int64(c.Interval), TimeoutNS: int64(c.Timeout), Jitter: c.Jitter,
			Failures: c.FailuresBeforeCritical, Successes: c.SuccessesBeforePassing,
			DeregisterNS: int64(c.DeregisterCriticalAfter), Status: c.Status.String(), Output: c.Output,
		}
		if !c.Since.IsZero() {
			out[i].SinceUnixNS = c.Since.UnixNano()
		}
	}
	return out
}

func decodeChecks(rs []checkRecord) ([]registry.Check, error) {
	if len(rs) == 0 {
		return nil, nil
	}
	out := make([]registry.Check, len(rs))
	for i, r := range rs {
		kind, err := registry.ParseCheckKind(r.Kind)
		if err != nil {
			return nil, err
		}
		status, err := registry.ParseHealth(r.Status)
		if err != nil {
			return nil, err
		}
		out[i] = registry.Check{
			Name: r.Name, Kind: kind, Target: r.Target, Headers: r.Headers, ExpectStatus: r.ExpectStatus,
			BodyContains: r.BodyContains, GRPCService: r.GRPCService, Interval: time.Duration(r.IntervalNS),
			Timeout: time.Duration(r.TimeoutNS), Jitter: r.Jitter, FailuresBeforeCritical: r.Failures,
			SuccessesBeforePassing: r.Successes, DeregisterCriticalAfter: time.Duration(r.DeregisterNS),
			Status: status, Output: r.Output,
		}
		if r.SinceUnixNS != 0 {
			out[i].Since = time.Unix(0, r.SinceUnixNS)
		}
	}
	return out, nil
}

// EncodeInstance returns the stored form of a validated instance.
func EncodeInstance(in *registry.Instance) []byte {
	rec := instanceRecord{
		Address: in.Address, Port: in.Port, Weight: in.Weight, Zone: in.Zone,
		Version: in.Version, Tags: in.Tags, Metadata: in.Metadata,
		Status: in.Status.String(), Health: in.Health.String(),
		Checks: encodeChecks(in.Checks),
	}
	if in.SessionID != 0 {
		rec.Session = FormatSessionID(in.SessionID)
	}
	b, err := json.Marshal(rec)
	if err != nil {
		panic("store: encoding an instance record cannot fail: " + err.Error())
	}
	return b
}

// DecodeInstance parses a stored instance. Records that do not validate are
// rejected, so a hand-edited key cannot poison the view.
func (l Layout) DecodeInstance(key string, value []byte, modRevision int64) (*registry.Instance, error) {
	k, err := l.ParseInstanceKey(key)
	if err != nil {
		return nil, err
	}
	var rec instanceRecord
	if err := decodeStrict(value, &rec, instanceKeysAt); err != nil {
		return nil, fmt.Errorf("store: decoding %q: %w", key, err)
	}
	rec.normalize()
	// The view keeps every instance it decodes for as long as it lives: the
	// key's parts are substrings of the whole key, which a copy of the id
	// lets go (about 50 B per instance), and the names many instances share
	// (namespace, service, zone, version, tags) are kept once.
	for i, t := range rec.Tags {
		rec.Tags[i] = intern(t)
	}
	in := &registry.Instance{
		Namespace: intern(k.Namespace), Service: intern(k.Service), ID: strings.Clone(k.ID),
		Address: rec.Address, Port: rec.Port, Weight: rec.Weight, Zone: intern(rec.Zone),
		Version: intern(rec.Version), Tags: rec.Tags, Metadata: rec.Metadata, Revision: modRevision,
	}
	if in.Status, err = registry.ParseStatus(rec.Status); err != nil {
		return nil, fmt.Errorf("store: decoding %q: %w", key, err)
	}
	if in.Health, err = registry.ParseHealth(rec.Health); err != nil {
		return nil, fmt.Errorf("store: decoding %q: %w", key, err)
	}
	if in.Checks, err = decodeChecks(rec.Checks); err != nil {
		return nil, fmt.Errorf("store: decoding %q: %w", key, err)
	}
	if rec.Session != "" {
		if in.SessionID, err = ParseSessionID(rec.Session); err != nil {
			return nil, fmt.Errorf("store: decoding %q: %w", key, err)
		}
	}
	if err := in.Validate(); err != nil {
		return nil, fmt.Errorf("store: decoding %q: %w", key, err)
	}
	return in, nil
}

// intern returns s in a copy shared by every equal string interned while
// it is in use.
func intern(s string) string {
	if s == "" {
		return ""
	}
	return unique.Make(s).Value()
}

// sessionRecord is the stored JSON form of a session.
type sessionRecord struct {
	Name    string    `json:"name,omitempty"`
	TTL     int64     `json:"ttl_seconds"`
	Created time.Time `json:"created"`
}
