package registry

import (
	"fmt"
	"slices"
	"strings"
)

// DefaultNamespace is used when a call names no namespace.
const DefaultNamespace = "default"

// DefaultWeight is the weight of an instance registered without one.
const DefaultWeight = 100

// Status is declared by an instance or an operator.
type Status int8

const (
	StatusUnspecified Status = iota
	StatusStarting
	StatusUp
	StatusDraining
	StatusOutOfService
)

var statusNames = [...]string{"UNSPECIFIED", "STARTING", "UP", "DRAINING", "OUT_OF_SERVICE"}

func (s Status) String() string {
	if int(s) < len(statusNames) && s >= 0 {
		return statusNames[s]
	}
	return fmt.Sprintf("Status(%d)", int8(s))
}

// ParseStatus parses a status name such as "UP" (case-insensitive).
func ParseStatus(s string) (Status, error) {
	for i, n := range statusNames {
		if strings.EqualFold(s, n) && i > 0 {
			return Status(i), nil
		}
	}
	return 0, &FieldError{Field: "status", Reason: "must be one of STARTING, UP, DRAINING, OUT_OF_SERVICE", Value: s}
}

// Health is observed by checks.
type Health int8

const (
	HealthUnspecified Health = iota
	HealthPassing
	HealthWarning
	HealthCritical
)

var healthNames = [...]string{"UNSPECIFIED", "PASSING", "WARNING", "CRITICAL"}

func (h Health) String() string {
	if int(h) < len(healthNames) && h >= 0 {
		return healthNames[h]
	}
	return fmt.Sprintf("Health(%d)", int8(h))
}

// ParseHealth parses a health name such as "PASSING" (case-insensitive).
func ParseHealth(s string) (Health, error) {
	for i, n := range healthNames {
		if strings.EqualFold(s, n) && i > 0 {
			return Health(i), nil
		}
	}
	return 0, &FieldError{Field: "health", Reason: "must be one of PASSING, WARNING, CRITICAL", Value: s}
}

// Instance is one registered endpoint of a service.
type Instance struct {
	Namespace string
	Service   string
	ID        string
	Address   string
	Port      int
	Weight    int
	Zone      string
	Version   string
	Tags      []string
	Metadata  map[string]string
	Status    Status
	// Health is the worst status of Checks, or declared by the instance
	// when it has none.
	Health Health
	// Checks the registry runs against the instance (see Check).
	Checks []Check
	// SessionID owns an ephemeral instance; 0 marks a persistent one.
	SessionID int64
	// Revision is the etcd revision of the instance's last change.
	Revision int64
	// Suspect (output only, never stored): the instance's session expired
	// with many others at once, which looks like the registry's own
	// trouble, so the server keeps serving it for a grace period (see
	// docs/health.md, "mass-expiry guard").
	Suspect bool
}

// Ephemeral reports whether the instance lives only as long as its session.
func (i *Instance) Ephemeral() bool { return i.SessionID != 0 }

// Routable reports whether callers should send traffic to the instance —
// the one routability rule (docs/health.md): declared UP (not STARTING,
// DRAINING or OUT_OF_SERVICE) and not CRITICAL by its checks (or by its
// own word when it has none). Session liveness needs no test here: an
// instance whose session ended is gone from the registry.
func (i *Instance) Routable() bool {
	return i.Status == StatusUp && i.Health != HealthCritical
}

// HostPort returns "address:port", bracketing IPv6 addresses.
func (i *Instance) HostPort() string {
	if strings.Contains(i.Address, ":") {
		return fmt.Sprintf("[%s]:%d", i.Address, i.Port)
	}
	return fmt.Sprintf("%s:%d", i.Address, i.Port)
}

// Key identifies an instance within the whole registry.
func (i *Instance) Key() InstanceKey {
	return InstanceKey{Namespace: i.Namespace, Service: i.Service, ID: i.ID}
}

// ApplyDefaults fills the fields a caller may leave empty.
func (i *Instance) ApplyDefaults() {
	if i.Namespace == "" {
		i.Namespace = DefaultNamespace
	}
	if i.Weight == 0 {
		i.Weight = DefaultWeight
	}
	if i.Status == StatusUnspecified {
		i.Status = StatusUp
	}
	if i.Health == HealthUnspecified {
		i.Health = HealthPassing
	}
	for n := range i.Checks {
		i.Checks[n].ApplyDefaults()
	}
	i.Health = i.CheckedHealth()
}

// Clone returns a deep copy.
func (i *Instance) Clone() Instance {
	c := *i
	c.Tags = slices.Clone(i.Tags)
	c.Checks = CloneChecks(i.Checks)
	if i.Metadata != nil {
		c.Metadata = make(map[string]string, len(i.Metadata))
		for k, v := range i.Metadata {
			c.Metadata[k] = v
		}
	}
	return c
}

// InstanceKey names an instance.
type InstanceKey struct{ Namespace, Service, ID string }

// ServiceKey names a service.
type ServiceKey struct{ Namespace, Service string }

// Snapshot is the full state of one service at a revision. Instances are
// sorted by ID and include non-routable ones; use Routable to filter.
type Snapshot struct {
	Namespace string
	Service   string
	Revision  int64
	Instances []*Instance
	// ProtectionThreshold, in [0, 1], is the service's protection
	// threshold (its own or the server's default; 0: off). See Available.
	ProtectionThreshold float64
	// Filtered, with ACLs on: the caller's token may not read the service
	// (Instances is empty for that reason, not because it has none), or
	// the instances' session ids were blanked. Set by listings.
	Filtered bool
}

// Available returns the instances callers should use. Normally that is
// Routable. When the routable share of the instances declared UP falls
// below ProtectionThreshold, it returns every instance declared UP,
// unhealthy ones included (their Health says which), and protected is
// true: a registry-side mishap or a probe gone wrong must not leave the
// survivors with all the load, or the callers with nothing.
func (s *Snapshot) Available() (instances []*Instance, protected bool) {
	routable := s.Routable()
	if s.ProtectionThreshold <= 0 {
		return routable, false
	}
	var up []*Instance
	for _, in := range s.Instances {
		if in.Status == StatusUp {
			up = append(up, in)
		}
	}
	if len(up) == 0 || float64(len(routable)) >= s.ProtectionThreshold*float64(len(up)) {
		return routable, false
	}
	return up, true
}

// Routable returns the instances that should receive traffic.
func (s *Snapshot) Routable() []*Instance {
	out := make([]*Instance, 0, len(s.Instances))
	for _, in := range s.Instances {
		if in.Routable() {
			out = append(out, in)
		}
	}
	return out
}
