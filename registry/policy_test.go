package registry_test

import (
	"errors"
	"slices"
	"testing"
	"time"

	"beacon.dev/beacon/registry"
)

func TestServicePolicyValidate(t *testing.T) {
	ring := registry.LoadBalancing{Policy: registry.LBRingHash, HashHeader: "x-user"}
	retry := registry.RetryPolicy{On: registry.RetryOnUnavailable}
	fp := registry.OutlierDetection{FailurePercentageThreshold: 50}
	for _, tc := range []struct {
		name  string
		p     registry.ServicePolicy
		field string // "" when valid
	}{
		{"defaults", registry.ServicePolicy{}, ""},
		{"least request, 10 choices", registry.ServicePolicy{LoadBalancing: registry.LoadBalancing{Policy: registry.LBLeastRequest, ChoiceCount: 10}}, ""},
		{"ring hash", registry.ServicePolicy{LoadBalancing: ring}, ""},
		{"ring of 1 to 8M", registry.ServicePolicy{LoadBalancing: registry.LoadBalancing{Policy: registry.LBRingHash, HashHeader: "x.id_2", MinRingSize: 1, MaxRingSize: 8 << 20}}, ""},
		{"retries", registry.ServicePolicy{Retry: registry.RetryPolicy{On: registry.RetryOnUnavailable | registry.RetryOnInternal, NumRetries: 4, BaseBackoff: time.Millisecond, MaxBackoff: 5 * time.Minute}}, ""},
		{"failure percentage", registry.ServicePolicy{OutlierDetection: registry.OutlierDetection{FailurePercentageThreshold: 100, FailurePercentageMinimumHosts: 1, FailurePercentageRequestVolume: 1, Interval: 100 * time.Millisecond}}, ""},
		{"unknown policy", registry.ServicePolicy{LoadBalancing: registry.LoadBalancing{Policy: 3}}, "load_balancing.policy"},
		{"one choice", registry.ServicePolicy{LoadBalancing: registry.LoadBalancing{Policy: registry.LBLeastRequest, ChoiceCount: 1}}, "load_balancing.choice_count"},
		{"11 choices", registry.ServicePolicy{LoadBalancing: registry.LoadBalancing{Policy: registry.LBLeastRequest, ChoiceCount: 11}}, "load_balancing.choice_count"},
		{"choices for ring hash", registry.ServicePolicy{LoadBalancing: registry.LoadBalancing{Policy: registry.LBRingHash, HashHeader: "x", ChoiceCount: 2}}, "load_balancing.choice_count"},
		{"ring size for round robin", registry.ServicePolicy{LoadBalancing: registry.LoadBalancing{MinRingSize: 10}}, "load_balancing.min_ring_size"},
		{"ring over 8M", registry.ServicePolicy{LoadBalancing: registry.LoadBalancing{Policy: registry.LBRingHash, HashHeader: "x", MaxRingSize: 8<<20 + 1}}, "load_balancing.max_ring_size"},
		{"min over the default max", registry.ServicePolicy{LoadBalancing: registry.LoadBalancing{Policy: registry.LBRingHash, HashHeader: "x", MinRingSize: 8 << 20, MaxRingSize: 4096}}, "load_balancing.min_ring_size"},
		{"ring hash without a header", registry.ServicePolicy{LoadBalancing: registry.LoadBalancing{Policy: registry.LBRingHash}}, "load_balancing.hash_header"},
		{"header for round robin", registry.ServicePolicy{LoadBalancing: registry.LoadBalancing{HashHeader: "x-user"}}, "load_balancing.hash_header"},
		{"upper-case header", registry.ServicePolicy{LoadBalancing: registry.LoadBalancing{Policy: registry.LBRingHash, HashHeader: "X-User"}}, "load_balancing.hash_header"},
		{"binary header", registry.ServicePolicy{LoadBalancing: registry.LoadBalancing{Policy: registry.LBRingHash, HashHeader: "x-id-bin"}}, "load_balancing.hash_header"},
		{"grpc header", registry.ServicePolicy{LoadBalancing: registry.LoadBalancing{Policy: registry.LBRingHash, HashHeader: "grpc-timeout"}}, "load_balancing.hash_header"},
		{"retries without codes", registry.ServicePolicy{Retry: registry.RetryPolicy{NumRetries: 2}}, "retry_policy.retry_on"},
		{"unknown code", registry.ServicePolicy{Retry: registry.RetryPolicy{On: 1 << 5}}, "retry_policy.retry_on"},
		{"5 retries", registry.ServicePolicy{Retry: registry.RetryPolicy{On: registry.RetryOnInternal, NumRetries: 5}}, "retry_policy.num_retries"},
		{"backoff under 1ms", registry.ServicePolicy{Retry: registry.RetryPolicy{On: registry.RetryOnInternal, BaseBackoff: time.Microsecond}}, "retry_policy.base_backoff"},
		{"max backoff under the default base", registry.ServicePolicy{Retry: registry.RetryPolicy{On: registry.RetryOnInternal, MaxBackoff: 10 * time.Millisecond}}, "retry_policy.max_backoff"},
		{"max backoff over 5m", registry.ServicePolicy{Retry: registry.RetryPolicy{On: registry.RetryOnInternal, MaxBackoff: 6 * time.Minute}}, "retry_policy.max_backoff"},
		{"interval under 100ms", registry.ServicePolicy{OutlierDetection: registry.OutlierDetection{Interval: time.Millisecond}}, "outlier_detection.interval"},
		{"negative ejection", registry.ServicePolicy{OutlierDetection: registry.OutlierDetection{BaseEjectionTime: -time.Second}}, "outlier_detection.base_ejection_time"},
		{"101 %", registry.ServicePolicy{OutlierDetection: registry.OutlierDetection{MaxEjectionPercent: 101}}, "outlier_detection.max_ejection_percent"},
		{"1001 in a row", registry.ServicePolicy{OutlierDetection: registry.OutlierDetection{ConsecutiveFailures: 1001}}, "outlier_detection.consecutive_failures"},
		{"hosts without a threshold", registry.ServicePolicy{OutlierDetection: registry.OutlierDetection{FailurePercentageRequestVolume: 10}}, "outlier_detection.failure_percentage_request_volume"},
		{"threshold over 100", registry.ServicePolicy{OutlierDetection: registry.OutlierDetection{FailurePercentageThreshold: 101}}, "outlier_detection.failure_percentage_threshold"},
		{"good and bad parts", registry.ServicePolicy{LoadBalancing: ring, Retry: retry, OutlierDetection: registry.OutlierDetection{FailurePercentageThreshold: 50, FailurePercentageMinimumHosts: 1001}}, "outlier_detection.failure_percentage_minimum_hosts"},
		{"every part", registry.ServicePolicy{LoadBalancing: ring, Retry: retry, OutlierDetection: fp}, ""},
	} {
		err := tc.p.Validate()
		var fe *registry.FieldError
		switch {
		case tc.field == "" && err != nil:
			t.Errorf("%s: Validate() = %v, want nil", tc.name, err)
		case tc.field != "" && (!errors.As(err, &fe) || fe.Field != tc.field || !errors.Is(err, registry.ErrInvalid)):
			t.Errorf("%s: Validate() = %v, want a FieldError on %s", tc.name, err, tc.field)
		}
	}
}

func TestParseRetryOn(t *testing.T) {
	all := []string{"cancelled", "deadline-exceeded", "internal", "resource-exhausted", "unavailable"}
	on, err := registry.ParseRetryOn([]string{"unavailable", "cancelled", "internal", "deadline-exceeded", "resource-exhausted"})
	if err != nil || !slices.Equal(on.Names(), all) || on.String() != "cancelled,deadline-exceeded,internal,resource-exhausted,unavailable" {
		t.Errorf("ParseRetryOn(all) = %v (%q), %v; want every code in order", on.Names(), on, err)
	}
	for _, bad := range [][]string{{"UNAVAILABLE"}, {"not-found"}, {""}, {"internal", "internal"}} {
		if _, err := registry.ParseRetryOn(bad); err == nil {
			t.Errorf("ParseRetryOn(%q) succeeded", bad)
		}
	}
}

// Effective fills in the defaults the zero fields stand for, and only
// those of the policy in use.
func TestServicePolicyEffective(t *testing.T) {
	if got := (registry.ServicePolicy{}).Effective(); got.LoadBalancing != (registry.LoadBalancing{}) || got.Retry != (registry.RetryPolicy{}) || got.OutlierDetection != registry.DefaultOutlierDetection {
		t.Errorf("defaults: %+v", got)
	}
	lr := registry.LoadBalancing{Policy: registry.LBLeastRequest}.Effective()
	rh := registry.LoadBalancing{Policy: registry.LBRingHash, HashHeader: "x"}.Effective()
	if lr.ChoiceCount != 2 || lr.MinRingSize != 0 || rh.MinRingSize != 1024 || rh.MaxRingSize != 8<<20 || rh.ChoiceCount != 0 {
		t.Errorf("Effective: least request %+v, ring hash %+v", lr, rh)
	}
	r := registry.RetryPolicy{On: registry.RetryOnUnavailable, BaseBackoff: 10 * time.Millisecond}.Effective()
	if r.NumRetries != 1 || r.MaxBackoff != 100*time.Millisecond {
		t.Errorf("Effective retries: %+v, want 1 retry, at most 100ms", r)
	}
	od := registry.OutlierDetection{FailurePercentageThreshold: 10}.Effective()
	if od.FailurePercentageMinimumHosts != 5 || od.FailurePercentageRequestVolume != 50 || od.Interval != 10*time.Second {
		t.Errorf("Effective outlier detection: %+v", od)
	}
}
