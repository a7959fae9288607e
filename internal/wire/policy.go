package wire

import (
	"fmt"
	"time"

	"google.golang.org/protobuf/types/known/durationpb"

	beaconv1 "beacon.dev/beacon/api/beacon/v1"
	"beacon.dev/beacon/registry"
)

// A service's policy (registry.ServicePolicy) on the wire: three
// messages, each converted and validated on its own, so that a request
// may set one and leave the others.

var lbPolicyProto = [...]beaconv1.LoadBalancingPolicy{
	registry.LBRoundRobin:   beaconv1.LoadBalancingPolicy_LOAD_BALANCING_POLICY_ROUND_ROBIN,
	registry.LBLeastRequest: beaconv1.LoadBalancingPolicy_LOAD_BALANCING_POLICY_LEAST_REQUEST,
	registry.LBRingHash:     beaconv1.LoadBalancingPolicy_LOAD_BALANCING_POLICY_RING_HASH,
}

// LoadBalancingFromProto converts and validates (nil: round robin).
func LoadBalancingFromProto(m *beaconv1.LoadBalancing) (registry.LoadBalancing, error) {
	lb := registry.LoadBalancing{ChoiceCount: m.GetChoiceCount(), MinRingSize: m.GetMinRingSize(), MaxRingSize: m.GetMaxRingSize(), HashHeader: m.GetHashHeader()}
	switch m.GetPolicy() {
	case beaconv1.LoadBalancingPolicy_LOAD_BALANCING_POLICY_UNSPECIFIED, beaconv1.LoadBalancingPolicy_LOAD_BALANCING_POLICY_ROUND_ROBIN:
		lb.Policy = registry.LBRoundRobin
	case beaconv1.LoadBalancingPolicy_LOAD_BALANCING_POLICY_LEAST_REQUEST:
		lb.Policy = registry.LBLeastRequest
	case beaconv1.LoadBalancingPolicy_LOAD_BALANCING_POLICY_RING_HASH:
		lb.Policy = registry.LBRingHash
	default:
		return registry.LoadBalancing{}, &registry.FieldError{Field: "load_balancing.policy", Reason: "must be ROUND_ROBIN, LEAST_REQUEST or RING_HASH", Value: m.GetPolicy().String()}
	}
	if err := lb.Validate(); err != nil {
		return registry.LoadBalancing{}, err
	}
	return lb, nil
}

// LoadBalancingToProto converts.
func LoadBalancingToProto(lb registry.LoadBalancing) *beaconv1.LoadBalancing {
	m := &beaconv1.LoadBalancing{ChoiceCount: lb.ChoiceCount, MinRingSize: lb.MinRingSize, MaxRingSize: lb.MaxRingSize, HashHeader: lb.HashHeader}
	if int(lb.Policy) < len(lbPolicyProto) {
		m.Policy = lbPolicyProto[lb.Policy]
	}
	return m
}

// RetryPolicyFromProto converts and validates (nil, or no codes and
// nothing else: no retries).
func RetryPolicyFromProto(m *beaconv1.RetryPolicy) (registry.RetryPolicy, error) {
	on, err := registry.ParseRetryOn(m.GetRetryOn())
	if err != nil {
		return registry.RetryPolicy{}, err
	}
	r := registry.RetryPolicy{On: on, NumRetries: m.GetNumRetries()}
	if r.BaseBackoff, err = policyDuration("retry_policy.base_backoff", m.GetBaseBackoff()); err != nil {
		return registry.RetryPolicy{}, err
	}
	if r.MaxBackoff, err = policyDuration("retry_policy.max_backoff", m.GetMaxBackoff()); err != nil {
		return registry.RetryPolicy{}, err
	}
	if err := r.Validate(); err != nil {
		return registry.RetryPolicy{}, err
	}
	return r, nil
}

// RetryPolicyToProto converts; nil when r retries nothing.
func RetryPolicyToProto(r registry.RetryPolicy) *beaconv1.RetryPolicy {
	if r.On == 0 {
		return nil
	}
	return &beaconv1.RetryPolicy{RetryOn: r.On.Names(), NumRetries: r.NumRetries, BaseBackoff: durationOrNil(r.BaseBackoff), MaxBackoff: durationOrNil(r.MaxBackoff)}
}

// OutlierDetectionFromProto converts and validates (nil: the defaults).
func OutlierDetectionFromProto(m *beaconv1.OutlierDetection) (registry.OutlierDetection, error) {
	od := registry.OutlierDetection{
		ConsecutiveFailures: m.GetConsecutiveFailures(), MaxEjectionPercent: m.GetMaxEjectionPercent(),
		FailurePercentageThreshold: m.GetFailurePercentageThreshold(), FailurePercentageMinimumHosts: m.GetFailurePercentageMinimumHosts(),
		FailurePercentageRequestVolume: m.GetFailurePercentageRequestVolume(),
	}
	var err error
	if od.Interval, err = policyDuration("outlier_detection.interval", m.GetInterval()); err != nil {
		return registry.OutlierDetection{}, err
	}
	if od.BaseEjectionTime, err = policyDuration("outlier_detection.base_ejection_time", m.GetBaseEjectionTime()); err != nil {
		return registry.OutlierDetection{}, err
	}
	if err := od.Validate(); err != nil {
		return registry.OutlierDetection{}, err
	}
	return od, nil
}

// OutlierDetectionToProto converts.
func OutlierDetectionToProto(od registry.OutlierDetection) *beaconv1.OutlierDetection {
	return &beaconv1.OutlierDetection{
		ConsecutiveFailures: od.ConsecutiveFailures, Interval: durationOrNil(od.Interval), BaseEjectionTime: durationOrNil(od.BaseEjectionTime),
		MaxEjectionPercent: od.MaxEjectionPercent, FailurePercentageThreshold: od.FailurePercentageThreshold,
		FailurePercentageMinimumHosts: od.FailurePercentageMinimumHosts, FailurePercentageRequestVolume: od.FailurePercentageRequestVolume,
	}
}

// ServicePolicyFromProto reads the policy of a ServiceConfig.
func ServicePolicyFromProto(c *beaconv1.ServiceConfig) (registry.ServicePolicy, error) {
	var p registry.ServicePolicy
	var err error
	if p.LoadBalancing, err = LoadBalancingFromProto(c.GetLoadBalancing()); err != nil {
		return registry.ServicePolicy{}, err
	}
	if p.Retry, err = RetryPolicyFromProto(c.GetRetryPolicy()); err != nil {
		return registry.ServicePolicy{}, err
	}
	if p.OutlierDetection, err = OutlierDetectionFromProto(c.GetOutlierDetection()); err != nil {
		return registry.ServicePolicy{}, err
	}
	return p, nil
}

// policyDuration reads an optional duration of a policy (unset: 0, the
// default); its bounds are the policy's Validate's.
func policyDuration(field string, d *durationpb.Duration) (time.Duration, error) {
	if d == nil {
		return 0, nil
	}
	if err := d.CheckValid(); err != nil {
		return 0, &registry.FieldError{Field: field, Reason: err.Error()}
	}
	v := d.AsDuration()
	if v < 0 {
		return 0, &registry.FieldError{Field: field, Reason: "must not be negative", Value: fmt.Sprint(v)}
	}
	return v, nil
}

func durationOrNil(d time.Duration) *durationpb.Duration {
	if d == 0 {
		return nil
	}
	return durationpb.New(d)
}
