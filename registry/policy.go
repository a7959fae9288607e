package registry

import (
	"fmt"
	"strings"
	"time"
)

// ServicePolicy is how clients that take their configuration from beacon
// (xDS clients: docs/xds.md) balance, retry and eject a service's
// instances, as an operator set it (SetServicePolicy). The zero value is
// beacon's defaults: round robin, no retries, outlier detection as
// DefaultOutlierDetection. In every field, 0 means the default its comment
// names. ServicePolicy is comparable (==), plain data, and safe for
// concurrent reads.
type ServicePolicy struct {
	LoadBalancing    LoadBalancing
	Retry            RetryPolicy
	OutlierDetection OutlierDetection
}

// LBPolicy names a load-balancing policy.
type LBPolicy uint8

const (
	LBRoundRobin   LBPolicy = iota // weighted round robin (beacon weights steer it)
	LBLeastRequest                 // the least loaded of ChoiceCount random endpoints
	LBRingHash                     // consistent hashing of a request header
)

var lbPolicyNames = [...]string{"round_robin", "least_request", "ring_hash"}

func (p LBPolicy) String() string {
	if int(p) < len(lbPolicyNames) {
		return lbPolicyNames[p]
	}
	return fmt.Sprintf("LBPolicy(%d)", p)
}

// ParseLBPolicy parses what LBPolicy.String returns.
func ParseLBPolicy(s string) (LBPolicy, error) {
	for i, n := range lbPolicyNames {
		if s == n {
			return LBPolicy(i), nil
		}
	}
	return 0, fieldErr("load_balancing.policy", s, "must be one of %s", strings.Join(lbPolicyNames[:], ", "))
}

// Limits of a ServicePolicy. They are those gRPC's xDS clients accept
// (grpc-go NACKs a resource beyond them) or, where gRPC has none, bounds
// that keep a typo from doing harm.
const (
	MinLeastRequestChoiceCount = 2  // gRFC A48
	MaxLeastRequestChoiceCount = 10 // gRPC clamps larger counts to 10
	MaxRingSize                = 8 << 20
	MaxHashHeaderLen           = 128
	MaxRetries                 = 4 // gRPC makes at most 5 attempts
	MinRetryBackoff            = time.Millisecond
	MaxRetryBaseBackoff        = 30 * time.Second
	MaxRetryMaxBackoff         = 5 * time.Minute
	MaxOutlierConsecutive      = 1000
	MinOutlierInterval         = 100 * time.Millisecond
	MaxOutlierInterval         = time.Hour
	MinOutlierEjectionTime     = 100 * time.Millisecond
	MaxOutlierEjectionTime     = time.Hour
	MaxOutlierMinimumHosts     = 1000
	MaxOutlierRequestVolume    = 1000000
)

// Defaults a zero field of a ServicePolicy stands for.
const (
	DefaultLeastRequestChoiceCount        = 2
	DefaultMinRingSize                    = 1024
	DefaultMaxRingSize                    = 8 << 20 // grpc-go caps it at 4096 (GRPC_RING_HASH_CAP)
	DefaultRetries                        = 1
	DefaultRetryBaseBackoff               = 25 * time.Millisecond // the maximum: 10 times the base
	DefaultFailurePercentageMinimumHosts  = 5
	DefaultFailurePercentageRequestVolume = 50
)

// DefaultOutlierDetection is what a zero OutlierDetection stands for:
// the SDK's ejection defaults (5 consecutive failures eject for 30 s, at
// most half of the endpoints), checked every 10 s, and no failure
// percentage ejection.
var DefaultOutlierDetection = OutlierDetection{
	ConsecutiveFailures: 5,
	Interval:            10 * time.Second,
	BaseEjectionTime:    30 * time.Second,
	MaxEjectionPercent:  50,
}

// LoadBalancing is how a client picks an instance for each call.
type LoadBalancing struct {
	Policy LBPolicy
	// ChoiceCount is least request's number of endpoints sampled per
	// pick: 2 to 10; 0: 2. Only with LBLeastRequest.
	ChoiceCount uint32
	// MinRingSize and MaxRingSize bound ring hash's ring: 1 to 8M
	// entries, min ≤ max; 0: 1024 and 8M (grpc-go caps both at 4096).
	// Only with LBRingHash.
	MinRingSize, MaxRingSize uint64
	// HashHeader is the request header (gRPC metadata key) whose value
	// picks the endpoint: calls with the same value go to the same
	// instance while the set of instances stays the same. Required with
	// LBRingHash, and only there.
	HashHeader string
}

// RetryOn is a set of gRPC status codes to retry a call on.
type RetryOn uint8

const (
	RetryOnCancelled RetryOn = 1 << iota
	RetryOnDeadlineExceeded
	RetryOnInternal
	RetryOnResourceExhausted
	RetryOnUnavailable
)

// retryOnNames are Envoy's retry_on names of the codes, in RetryOn's bit
// order: the ones gRPC's xDS clients honour.
var retryOnNames = [...]string{"cancelled", "deadline-exceeded", "internal", "resource-exhausted", "unavailable"}

// Names lists the codes in the set, by their Envoy retry_on names.
func (r RetryOn) Names() []string {
	var out []string
	for i, n := range retryOnNames {
		if r&(1<<i) != 0 {
			out = append(out, n)
		}
	}
	return out
}

// String is Envoy's retry_on: the names joined by commas.
func (r RetryOn) String() string { return strings.Join(r.Names(), ",") }

// ParseRetryOn parses status code names (cancelled, deadline-exceeded,
// internal, resource-exhausted, unavailable), each once.
func ParseRetryOn(names []string) (RetryOn, error) {
	var r RetryOn
	for _, s := range names {
		i := 0
		for i < len(retryOnNames) && retryOnNames[i] != s {
			i++
		}
		if i == len(retryOnNames) {
			return 0, fieldErr("retry_policy.retry_on", s, "must name gRPC status codes among %s", strings.Join(retryOnNames[:], ", "))
		}
		if r&(1<<i) != 0 {
			return 0, fieldErr("retry_policy.retry_on", s, "names a code twice")
		}
		r |= 1 << i
	}
	return r, nil
}

// RetryPolicy says which failed calls a client tries again, on another
// instance where it can. Its zero value is no retries.
type RetryPolicy struct {
	// On are the status codes retried; none: no retries (and every other
	// field must be zero).
	On RetryOn
	// NumRetries is how many times a call is retried at most: 1 to 4;
	// 0: 1.
	NumRetries uint32
	// BaseBackoff is the first retry's backoff bound (then doubled up to
	// MaxBackoff, with jitter): 1ms to 30s; 0: 25ms.
	BaseBackoff time.Duration
	// MaxBackoff caps the backoff: BaseBackoff to 5m; 0: 10 times
	// BaseBackoff.
	MaxBackoff time.Duration
}

// OutlierDetection says when a client stops sending calls to an instance
// that fails them (passive health checking), and for how long.
type OutlierDetection struct {
	// ConsecutiveFailures ejects an instance after that many failures in
	// a row: 1 to 1000; 0: 5. Envoy honours it; gRPC clients do not (they
	// implement success-rate and failure-percentage ejection only).
	ConsecutiveFailures uint32
	// Interval is how often ejections are decided: 100ms to 1h; 0: 10s.
	Interval time.Duration
	// BaseEjectionTime is the first ejection's length, multiplied by the
	// number of times the instance was ejected: 100ms to 1h; 0: 30s.
	BaseEjectionTime time.Duration
	// MaxEjectionPercent caps the share of the endpoints ejected at
	// once: 1 to 100; 0: 50.
	MaxEjectionPercent uint32
	// FailurePercentageThreshold ejects an instance whose share of
	// failed calls in an interval exceeds it: 1 to 100; 0: off.
	FailurePercentageThreshold uint32
	// FailurePercentageMinimumHosts is how many instances must have had
	// FailurePercentageRequestVolume calls in the interval for failure
	// percentage ejection to apply: 1 to 1000; 0: 5.
	FailurePercentageMinimumHosts uint32
	// FailurePercentageRequestVolume is how many calls an instance needs
	// in an interval to be judged: 1 to 1000000; 0: 50.
	FailurePercentageRequestVolume uint32
}

// Validate checks every field against its limit and returns a
// *FieldError naming the first one that is out of bounds.
func (p ServicePolicy) Validate() error {
	if err := p.LoadBalancing.Validate(); err != nil {
		return err
	}
	if err := p.Retry.Validate(); err != nil {
		return err
	}
	return p.OutlierDetection.Validate()
}

// Validate checks a LoadBalancing (see ServicePolicy.Validate).
func (lb LoadBalancing) Validate() error {
	const f = "load_balancing."
	if int(lb.Policy) >= len(lbPolicyNames) {
		return fieldErr(f+"policy", lb.Policy.String(), "must be one of %s", strings.Join(lbPolicyNames[:], ", "))
	}
	if lb.ChoiceCount != 0 {
		if lb.Policy != LBLeastRequest {
			return fieldErr(f+"choice_count", fmt.Sprint(lb.ChoiceCount), "applies to least_request only (policy is %s)", lb.Policy)
		}
		if lb.ChoiceCount < MinLeastRequestChoiceCount || lb.ChoiceCount > MaxLeastRequestChoiceCount {
			return fieldErr(f+"choice_count", fmt.Sprint(lb.ChoiceCount), "must be between %d and %d", MinLeastRequestChoiceCount, MaxLeastRequestChoiceCount)
		}
	}
	for _, r := range []struct {
		name string
		v    uint64
	}{{"min_ring_size", lb.MinRingSize}, {"max_ring_size", lb.MaxRingSize}} {
		if r.v == 0 {
			continue
		}
		if lb.Policy != LBRingHash {
			return fieldErr(f+r.name, fmt.Sprint(r.v), "applies to ring_hash only (policy is %s)", lb.Policy)
		}
		if r.v > MaxRingSize {
			return fieldErr(f+r.name, fmt.Sprint(r.v), "must be between 1 and %d", MaxRingSize)
		}
	}
	if lo, hi := lb.effectiveRing(); lo > hi {
		return fieldErr(f+"min_ring_size", fmt.Sprint(lo), "must be at most max_ring_size (%d)", hi)
	}
	switch {
	case lb.Policy == LBRingHash && lb.HashHeader == "":
		return fieldErr(f+"hash_header", "", "is required with ring_hash: the request header whose value picks the instance")
	case lb.Policy != LBRingHash && lb.HashHeader != "":
		return fieldErr(f+"hash_header", lb.HashHeader, "applies to ring_hash only (policy is %s)", lb.Policy)
	case lb.HashHeader != "":
		return validateHashHeader(f+"hash_header", lb.HashHeader)
	}
	return nil
}

func (lb LoadBalancing) effectiveRing() (lo, hi uint64) {
	lo, hi = lb.MinRingSize, lb.MaxRingSize
	if lo == 0 {
		lo = DefaultMinRingSize
	}
	if hi == 0 {
		hi = DefaultMaxRingSize
	}
	return lo, hi
}

// validateHashHeader: a gRPC metadata key (lowercase letters, digits, '-',
// '_', '.'), not binary ("-bin"), not one of gRPC's own ("grpc-").
func validateHashHeader(field, h string) error {
	if len(h) > MaxHashHeaderLen {
		return fieldErr(field, h, "must be at most %d bytes, has %d", MaxHashHeaderLen, len(h))
	}
	for i := 0; i < len(h); i++ {
		c := h[i]
		if !(c >= 'a' && c <= 'z' || c >= '0' && c <= '9' || c == '-' || c == '_' || c == '.') {
			return fieldErr(field, h, "must be a gRPC metadata key: lowercase letters, digits, '-', '_' and '.'")
		}
	}
	if strings.HasSuffix(h, "-bin") || strings.HasPrefix(h, "grpc-") {
		return fieldErr(field, h, "must not be a binary (-bin) or gRPC-reserved (grpc-) header")
	}
	return nil
}

// Validate checks a RetryPolicy (see ServicePolicy.Validate).
func (r RetryPolicy) Validate() error {
	const f = "retry_policy."
	if r.On >= 1<<len(retryOnNames) {
		return fieldErr(f+"retry_on", fmt.Sprint(uint8(r.On)), "names an unknown status code")
	}
	if r.On == 0 {
		if r != (RetryPolicy{}) {
			return fieldErr(f+"retry_on", "", "is required: name the status codes to retry on (%s)", strings.Join(retryOnNames[:], ", "))
		}
		return nil
	}
	if r.NumRetries > MaxRetries {
		return fieldErr(f+"num_retries", fmt.Sprint(r.NumRetries), "must be between 1 and %d (gRPC makes at most %d attempts)", MaxRetries, MaxRetries+1)
	}
	if r.BaseBackoff != 0 && (r.BaseBackoff < MinRetryBackoff || r.BaseBackoff > MaxRetryBaseBackoff) {
		return fieldErr(f+"base_backoff", r.BaseBackoff.String(), "must be between %v and %v", MinRetryBackoff, MaxRetryBaseBackoff)
	}
	if r.MaxBackoff != 0 {
		base := r.Effective().BaseBackoff
		if r.MaxBackoff < base || r.MaxBackoff > MaxRetryMaxBackoff {
			return fieldErr(f+"max_backoff", r.MaxBackoff.String(), "must be between base_backoff (%v) and %v", base, MaxRetryMaxBackoff)
		}
	}
	return nil
}

// Validate checks an OutlierDetection (see ServicePolicy.Validate).
func (o OutlierDetection) Validate() error {
	const f = "outlier_detection."
	counts := []struct {
		name    string
		v, max  uint32
		needsFP bool
	}{
		{"consecutive_failures", o.ConsecutiveFailures, MaxOutlierConsecutive, false},
		{"max_ejection_percent", o.MaxEjectionPercent, 100, false},
		{"failure_percentage_threshold", o.FailurePercentageThreshold, 100, false},
		{"failure_percentage_minimum_hosts", o.FailurePercentageMinimumHosts, MaxOutlierMinimumHosts, true},
		{"failure_percentage_request_volume", o.FailurePercentageRequestVolume, MaxOutlierRequestVolume, true},
	}
	for _, c := range counts {
		if c.v > c.max {
			return fieldErr(f+c.name, fmt.Sprint(c.v), "must be between 1 and %d", c.max)
		}
		if c.v != 0 && c.needsFP && o.FailurePercentageThreshold == 0 {
			return fieldErr(f+c.name, fmt.Sprint(c.v), "applies only with failure_percentage_threshold")
		}
	}
	durations := []struct {
		name     string
		v        time.Duration
		min, max time.Duration
	}{
		{"interval", o.Interval, MinOutlierInterval, MaxOutlierInterval},
		{"base_ejection_time", o.BaseEjectionTime, MinOutlierEjectionTime, MaxOutlierEjectionTime},
	}
	for _, d := range durations {
		if d.v != 0 && (d.v < d.min || d.v > d.max) {
			return fieldErr(f+d.name, d.v.String(), "must be between %v and %v", d.min, d.max)
		}
	}
	return nil
}

// Effective returns lb with every default filled in.
func (lb LoadBalancing) Effective() LoadBalancing {
	switch lb.Policy {
	case LBLeastRequest:
		if lb.ChoiceCount == 0 {
			lb.ChoiceCount = DefaultLeastRequestChoiceCount
		}
	case LBRingHash:
		lb.MinRingSize, lb.MaxRingSize = lb.effectiveRing()
	}
	return lb
}

// Effective returns r with every default filled in (none when r retries
// nothing).
func (r RetryPolicy) Effective() RetryPolicy {
	if r.On == 0 {
		return r
	}
	if r.NumRetries == 0 {
		r.NumRetries = DefaultRetries
	}
	if r.BaseBackoff == 0 {
		r.BaseBackoff = DefaultRetryBaseBackoff
	}
	if r.MaxBackoff == 0 {
		r.MaxBackoff = 10 * r.BaseBackoff
	}
	return r
}

// Effective returns o with every default filled in
// (DefaultOutlierDetection's).
func (o OutlierDetection) Effective() OutlierDetection {
	d := DefaultOutlierDetection
	if o.ConsecutiveFailures == 0 {
		o.ConsecutiveFailures = d.ConsecutiveFailures
	}
	if o.Interval == 0 {
		o.Interval = d.Interval
	}
	if o.BaseEjectionTime == 0 {
		o.BaseEjectionTime = d.BaseEjectionTime
	}
	if o.MaxEjectionPercent == 0 {
		o.MaxEjectionPercent = d.MaxEjectionPercent
	}
	if o.FailurePercentageThreshold != 0 {
		if o.FailurePercentageMinimumHosts == 0 {
			o.FailurePercentageMinimumHosts = DefaultFailurePercentageMinimumHosts
		}
		if o.FailurePercentageRequestVolume == 0 {
			o.FailurePercentageRequestVolume = DefaultFailurePercentageRequestVolume
		}
	}
	return o
}

// Effective returns p with every default filled in.
func (p ServicePolicy) Effective() ServicePolicy {
	return ServicePolicy{LoadBalancing: p.LoadBalancing.Effective(), Retry: p.Retry.Effective(), OutlierDetection: p.OutlierDetection.Effective()}
}
