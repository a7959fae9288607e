package store

import (
	"bytes"
	"encoding/json"
	"fmt"
	"strconv"
	"strings"
	"time"

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
}

// EncodeInstance returns the stored form of a validated instance.
func EncodeInstance(in *registry.Instance) []byte {
	rec := instanceRecord{
		Address: in.Address, Port: in.Port, Weight: in.Weight, Zone: in.Zone,
		Version: in.Version, Tags: in.Tags, Metadata: in.Metadata,
		Status: in.Status.String(), Health: in.Health.String(),
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
	dec := json.NewDecoder(bytes.NewReader(value))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&rec); err != nil {
		return nil, fmt.Errorf("store: decoding %q: %w", key, err)
	}
	in := &registry.Instance{
		Namespace: k.Namespace, Service: k.Service, ID: k.ID,
		Address: rec.Address, Port: rec.Port, Weight: rec.Weight, Zone: rec.Zone,
		Version: rec.Version, Tags: rec.Tags, Metadata: rec.Metadata, Revision: modRevision,
	}
	if in.Status, err = registry.ParseStatus(rec.Status); err != nil {
		return nil, fmt.Errorf("store: decoding %q: %w", key, err)
	}
	if in.Health, err = registry.ParseHealth(rec.Health); err != nil {
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

// sessionRecord is the stored JSON form of a session.
type sessionRecord struct {
	Name    string    `json:"name,omitempty"`
	TTL     int64     `json:"ttl_seconds"`
	Created time.Time `json:"created"`
}
