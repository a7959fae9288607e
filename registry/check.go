package registry

import (
	"fmt"
	"maps"
	"net/url"
	"slices"
	"strconv"
	"strings"
	"time"
)

// CheckKind is how a check probes an instance.
type CheckKind int8

const (
	CheckUnspecified CheckKind = iota
	CheckHTTP                  // GET a URL; a status in the expected class passes
	CheckTCP                   // connect
	CheckGRPC                  // grpc.health.v1 Check
	CheckTTL                   // pushed: PASSING/WARNING/CRITICAL, CRITICAL when no push comes within Interval
)

var checkKindNames = [...]string{"UNSPECIFIED", "HTTP", "TCP", "GRPC", "TTL"}

func (k CheckKind) String() string {
	if k >= 0 && int(k) < len(checkKindNames) {
		return checkKindNames[k]
	}
	return fmt.Sprintf("CheckKind(%d)", int8(k))
}

// ParseCheckKind parses "http", "tcp" or "grpc" (any case).
func ParseCheckKind(s string) (CheckKind, error) {
	for i, n := range checkKindNames {
		if i > 0 && strings.EqualFold(s, n) {
			return CheckKind(i), nil
		}
	}
	return 0, &FieldError{Field: "kind", Reason: "must be one of HTTP, TCP, GRPC, TTL", Value: s}
}

// Limits and defaults of checks.
const (
	MaxChecks            = 8
	MinCheckInterval     = 100 * time.Millisecond
	MaxCheckInterval     = time.Hour
	DefaultCheckInterval = 10 * time.Second
	DefaultCheckTimeout  = 2 * time.Second
	DefaultCheckJitter   = 0.1
	MaxCheckJitter       = 0.5
	DefaultFailures      = 3 // failures in a row before CRITICAL
	DefaultSuccesses     = 2 // successes in a row before PASSING again
	MaxCheckThreshold    = 100
	MaxCheckHeaders      = 16
	MaxCheckHeaderLen    = 256
	MaxCheckBodyMatchLen = 256
	MaxCheckOutputLen    = 256
	MaxCheckTargetLen    = 512
)

// Check is a probe the registry runs against an instance. The spec is set
// at registration; Status, Output and Since are the registry's
// observation (output only, written on transitions).
type Check struct {
	Name string // unique within the instance; default: the kind in lower case
	Kind CheckKind
	// Target: for HTTP a URL (default http://ADDRESS:PORT/healthz); for TCP
	// and gRPC host:port (default the instance's address and port).
	Target string
	// HTTP only.
	Headers      map[string]string
	ExpectStatus string // "2xx" (default), a class like "3xx", or a code like "204"
	BodyContains string // the response body must contain it
	// gRPC only: the service name asked of grpc.health.v1 ("" = server).
	GRPCService string

	Interval time.Duration
	Timeout  time.Duration
	Jitter   float64 // fraction of Interval each run may move by, [0, 0.5]
	// Hysteresis: this many failures in a row make the check CRITICAL, and
	// this many successes in a row make it PASSING again.
	FailuresBeforeCritical int
	SuccessesBeforePassing int
	// DeregisterCriticalAfter removes the instance once the check has been
	// CRITICAL this long; 0 never does.
	DeregisterCriticalAfter time.Duration

	Status Health
	Output string
	Since  time.Time
}

// ApplyDefaults fills the spec fields left empty.
func (c *Check) ApplyDefaults() {
	if c.Name == "" {
		c.Name = strings.ToLower(c.Kind.String())
	}
	if c.Interval == 0 {
		c.Interval = DefaultCheckInterval
	}
	if c.Timeout == 0 {
		c.Timeout = min(DefaultCheckTimeout, c.Interval)
	}
	if c.Jitter == 0 {
		c.Jitter = DefaultCheckJitter
	}
	if c.FailuresBeforeCritical == 0 {
		c.FailuresBeforeCritical = DefaultFailures
		if c.Kind == CheckTTL {
			c.FailuresBeforeCritical = 1 // the TTL itself is the grace
		}
	}
	if c.SuccessesBeforePassing == 0 {
		c.SuccessesBeforePassing = DefaultSuccesses
	}
	if c.Kind == CheckHTTP && c.ExpectStatus == "" {
		c.ExpectStatus = "2xx"
	}
	if c.Status == HealthUnspecified {
		c.Status = HealthPassing
		if c.Kind == CheckTTL { // not routable before its first update, as in Consul
			c.Status, c.Output = HealthCritical, "no update yet"
		}
	}
}

// SameSpec reports whether two checks probe the same way (state aside).
func (c *Check) SameSpec(o *Check) bool {
	a, b := *c, *o
	a.Status, a.Output, a.Since = 0, "", time.Time{}
	b.Status, b.Output, b.Since = 0, "", time.Time{}
	return a.Name == b.Name && a.Kind == b.Kind && a.Target == b.Target && a.ExpectStatus == b.ExpectStatus &&
		a.BodyContains == b.BodyContains && a.GRPCService == b.GRPCService && a.Interval == b.Interval &&
		a.Timeout == b.Timeout && a.Jitter == b.Jitter && a.FailuresBeforeCritical == b.FailuresBeforeCritical &&
		a.SuccessesBeforePassing == b.SuccessesBeforePassing && a.DeregisterCriticalAfter == b.DeregisterCriticalAfter &&
		maps.Equal(a.Headers, b.Headers)
}

// StatusMatches reports whether an HTTP status passes ExpectStatus.
func (c *Check) StatusMatches(code int) bool {
	exp := c.ExpectStatus
	if exp == "" {
		exp = "2xx"
	}
	if len(exp) == 3 && strings.HasSuffix(exp, "xx") {
		return code/100 == int(exp[0]-'0')
	}
	n, err := strconv.Atoi(exp)
	return err == nil && n == code
}

// validate checks a spec whose defaults are applied; field is its name in
// errors, e.g. "checks[0]".
func (c *Check) validate(field string, in *Instance) error {
	f := func(name string) string { return field + "." + name }
	if err := ValidateName(f("name"), c.Name); err != nil {
		return err
	}
	switch c.Kind {
	case CheckHTTP:
		if c.Target != "" {
			if len(c.Target) > MaxCheckTargetLen {
				return fieldErr(f("target"), c.Target, "must be at most %d characters", MaxCheckTargetLen)
			}
			u, err := url.Parse(c.Target)
			if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
				return fieldErr(f("target"), c.Target, "must be an http:// or https:// URL")
			}
		}
		if !validExpect(c.ExpectStatus) {
			return fieldErr(f("expect_status"), c.ExpectStatus, "must be a class such as 2xx or a status code between 100 and 599")
		}
		if len(c.Headers) > MaxCheckHeaders {
			return fieldErr(f("headers"), "", "must have at most %d entries, has %d", MaxCheckHeaders, len(c.Headers))
		}
		for k, v := range c.Headers {
			if k == "" || len(k)+len(v) > MaxCheckHeaderLen || strings.ContainsAny(k+v, "\r\n") {
				return fieldErr(f("headers"), k, "names must be non-empty, name and value at most %d characters, no line breaks", MaxCheckHeaderLen)
			}
		}
		for k := range c.Headers {
			if refusedCheckHeaders[strings.ToLower(k)] {
				return fieldErr(f("headers"), k, "may not be set: metadata-service and connection-level headers are refused (a check must not open a cloud metadata service or steer the connection)")
			}
		}
		if len(c.BodyContains) > MaxCheckBodyMatchLen {
			return fieldErr(f("body_contains"), c.BodyContains, "must be at most %d characters", MaxCheckBodyMatchLen)
		}
	case CheckTCP, CheckGRPC:
		if c.Target != "" {
			host, port, err := splitHostPort(c.Target)
			if err != nil || host == "" || port < MinPort || port > MaxPort {
				return fieldErr(f("target"), c.Target, "must be host:port")
			}
		}
		if c.Kind == CheckGRPC {
			if err := validatePrintable(f("grpc_service"), c.GRPCService, MaxCheckTargetLen); err != nil {
				return err
			}
		}
	case CheckTTL:
		if c.Target != "" {
			return fieldErr(f("target"), c.Target, "must be empty for a TTL check (the instance pushes its status)")
		}
	default:
		return fieldErr(f("kind"), c.Kind.String(), "must be one of HTTP, TCP, GRPC, TTL")
	}
	if c.Interval < MinCheckInterval || c.Interval > MaxCheckInterval {
		return fieldErr(f("interval"), c.Interval.String(), "must be between %v and %v", MinCheckInterval, MaxCheckInterval)
	}
	if c.Timeout <= 0 || c.Timeout > c.Interval {
		return fieldErr(f("timeout"), c.Timeout.String(), "must be positive and at most the interval (%v)", c.Interval)
	}
	if err := ValidateFloat(f("jitter"), c.Jitter, 0, MaxCheckJitter); err != nil { // NaN passed "< 0 || > max"
		return err
	}
	if c.FailuresBeforeCritical < 1 || c.FailuresBeforeCritical > MaxCheckThreshold {
		return fieldErr(f("failures_before_critical"), fmt.Sprint(c.FailuresBeforeCritical), "must be between 1 and %d", MaxCheckThreshold)
	}
	if c.SuccessesBeforePassing < 1 || c.SuccessesBeforePassing > MaxCheckThreshold {
		return fieldErr(f("successes_before_passing"), fmt.Sprint(c.SuccessesBeforePassing), "must be between 1 and %d", MaxCheckThreshold)
	}
	if c.DeregisterCriticalAfter < 0 || c.DeregisterCriticalAfter > 0 && c.DeregisterCriticalAfter < c.Interval {
		return fieldErr(f("deregister_critical_after"), c.DeregisterCriticalAfter.String(), "must be 0 (never) or at least the interval (%v)", c.Interval)
	}
	if len(c.Output) > MaxCheckOutputLen {
		return fieldErr(f("output"), c.Output, "must be at most %d characters", MaxCheckOutputLen)
	}
	// The store keeps Since in Unix nanoseconds, 0 for unset: a time that
	// does not fit (before 1970 or after 2262) would read back as another.
	if !c.Since.IsZero() {
		if ns := c.Since.UnixNano(); ns <= 0 || !time.Unix(0, ns).Equal(c.Since) {
			return fieldErr(f("since"), c.Since.UTC().Format(time.RFC3339Nano), "must be unset or after 1970-01-01 and before 2262-04-11")
		}
	}
	return nil
}

func validExpect(s string) bool {
	if len(s) == 3 && s[1:] == "xx" {
		return s[0] >= '1' && s[0] <= '5'
	}
	n, err := strconv.Atoi(s)
	return err == nil && n >= 100 && n <= 599
}

func splitHostPort(s string) (string, int, error) {
	i := strings.LastIndexByte(s, ':')
	if i < 0 {
		return "", 0, fmt.Errorf("no port")
	}
	host := strings.TrimSuffix(strings.TrimPrefix(s[:i], "["), "]")
	p, err := strconv.Atoi(s[i+1:])
	return host, p, err
}

// validateChecks validates an instance's checks (defaults applied).
func (i *Instance) validateChecks() error {
	if len(i.Checks) > MaxChecks {
		return fieldErr("checks", "", "must be at most %d checks, has %d", MaxChecks, len(i.Checks))
	}
	for n := range i.Checks {
		c := &i.Checks[n]
		if err := c.validate(fmt.Sprintf("checks[%d]", n), i); err != nil {
			return err
		}
		for m := range n {
			if i.Checks[m].Name == c.Name {
				return fieldErr(fmt.Sprintf("checks[%d].name", n), c.Name, "must be unique within the instance")
			}
		}
	}
	return nil
}

// ProbeTarget returns where a check probes: its Target or the default.
func (c *Check) ProbeTarget(in *Instance) string {
	if c.Target != "" {
		return c.Target
	}
	if c.Kind == CheckHTTP {
		return "http://" + in.HostPort() + "/healthz"
	}
	return in.HostPort()
}

// CheckedHealth is the health the checks give: the worst of their
// statuses, or the declared Health for an instance without checks.
func (i *Instance) CheckedHealth() Health {
	if len(i.Checks) == 0 {
		return i.Health
	}
	worst := HealthPassing
	for _, c := range i.Checks {
		if c.Status > worst {
			worst = c.Status
		}
	}
	return worst
}

// CloneChecks returns a deep copy of checks.
func CloneChecks(cs []Check) []Check {
	out := slices.Clone(cs)
	for n := range out {
		if cs[n].Headers != nil {
			out[n].Headers = make(map[string]string, len(cs[n].Headers))
			for k, v := range cs[n].Headers {
				out[n].Headers[k] = v
			}
		}
	}
	return out
}

// refusedCheckHeaders are headers an HTTP check may not send: those a
// cloud metadata service requires (so that a check cannot read it) and
// those that steer the connection rather than describe the request.
var refusedCheckHeaders = map[string]bool{
	"metadata-flavor": true, "x-google-metadata-request": true, "metadata": true,
	"x-aws-ec2-metadata-token": true, "x-aws-ec2-metadata-token-ttl-seconds": true,
	"connection": true, "keep-alive": true, "proxy-authorization": true, "proxy-connection": true,
	"te": true, "trailer": true, "transfer-encoding": true, "upgrade": true,
}
