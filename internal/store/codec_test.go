package store

import (
	"encoding/json"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"

	"beacon.dev/beacon/registry"
)

func TestInstanceRoundTrip(t *testing.T) {
	l := Layout{Prefix: DefaultPrefix}
	in := registry.Instance{
		Namespace: "prod", Service: "orders", ID: "orders-1", Address: "10.0.0.1", Port: 9001,
		Weight: 50, Zone: "a", Version: "1.2.3", Tags: []string{"canary"}, Metadata: map[string]string{"k": "v"},
		Status: registry.StatusDraining, Health: registry.HealthCritical, SessionID: -42,
		Checks: []registry.Check{{
			Name: "ready", Kind: registry.CheckHTTP, Target: "https://10.0.0.1:9001/readyz", Headers: map[string]string{"Host": "orders"},
			ExpectStatus: "204", BodyContains: "ok", Interval: time.Second, Timeout: 500 * time.Millisecond, Jitter: 0.2,
			FailuresBeforeCritical: 2, SuccessesBeforePassing: 3, DeregisterCriticalAfter: time.Minute,
			Status: registry.HealthCritical, Output: "HTTP GET: 503", Since: time.Unix(1700000000, 123),
		}, {
			Name: "grpc", Kind: registry.CheckGRPC, GRPCService: "orders.v1.Orders", Interval: 5 * time.Second, Timeout: time.Second,
			Jitter: 0.1, FailuresBeforeCritical: 3, SuccessesBeforePassing: 2, Status: registry.HealthPassing,
		}},
	}
	key := l.InstanceKey(in.Key())
	if want := "/beacon/v1/ns/prod/svc/orders/inst/orders-1"; key != want {
		t.Errorf("InstanceKey() = %q, want %q", key, want)
	}
	got, err := l.DecodeInstance(key, EncodeInstance(&in), 7)
	if err != nil {
		t.Fatal(err)
	}
	in.Revision = 7
	if diff := cmp.Diff(&in, got); diff != "" {
		t.Errorf("DecodeInstance(EncodeInstance()) differs (-want +got):\n%s", diff)
	}
}

// goodCheck is a stored TCP check that decodes.
const goodCheck = `{"name":"tcp","kind":"TCP","interval_ns":1000000000,"timeout_ns":500000000,"jitter":0.1,"failures_before_critical":3,"successes_before_passing":2,"status":"PASSING"}`

func TestDecodeRejects(t *testing.T) {
	l := Layout{Prefix: DefaultPrefix}
	good := `{"address":"127.0.0.1","port":1,"weight":1,"status":"UP","health":"PASSING"}`
	for _, tc := range []struct{ name, key, value string }{
		{"not an instance key", "/beacon/v1/sessions/00", good},
		{"missing id", "/beacon/v1/ns/a/svc/b/inst/", good},
		{"bad service", "/beacon/v1/ns/a/svc/B/inst/x", good},
		{"not json", "/beacon/v1/ns/a/svc/b/inst/x", "{"},
		{"unknown field", "/beacon/v1/ns/a/svc/b/inst/x", strings.Replace(good, `"port"`, `"prot":1,"port"`, 1)},
		{"bad status", "/beacon/v1/ns/a/svc/b/inst/x", strings.Replace(good, "UP", "UPP", 1)},
		{"invalid record", "/beacon/v1/ns/a/svc/b/inst/x", strings.Replace(good, `"port":1`, `"port":0`, 1)},
		{"bad session", "/beacon/v1/ns/a/svc/b/inst/x", strings.Replace(good, `"port"`, `"session":"zz","port"`, 1)},
		{"key in another case", "/beacon/v1/ns/a/svc/b/inst/x", strings.Replace(good, `"port"`, `"tAgs":["t"],"port"`, 1)},
		{"key in upper case", "/beacon/v1/ns/a/svc/b/inst/x", strings.Replace(good, `"port"`, `"PORT"`, 1)},
		{"key with a long s", "/beacon/v1/ns/a/svc/b/inst/x", strings.Replace(good, `"status"`, `"ſtatus"`, 1)}, // folds to "status"
		{"duplicate key", "/beacon/v1/ns/a/svc/b/inst/x", strings.Replace(good, `"port":1`, `"port":1,"port":2`, 1)},
		{"duplicate key in another case", "/beacon/v1/ns/a/svc/b/inst/x", strings.Replace(good, `"port":1`, `"port":1,"Port":2`, 1)},
		{"data after the record", "/beacon/v1/ns/a/svc/b/inst/x", good + ` {}`},
		{"garbage after the record", "/beacon/v1/ns/a/svc/b/inst/x", good + `x`},
		{"null", "/beacon/v1/ns/a/svc/b/inst/x", `null`},
		{"array", "/beacon/v1/ns/a/svc/b/inst/x", `[` + good + `]`},
		{"empty", "/beacon/v1/ns/a/svc/b/inst/x", ``},
		{"check key in another case", "/beacon/v1/ns/a/svc/b/inst/x", strings.Replace(good, `"port"`, `"checks":[`+strings.Replace(goodCheck, `"jitter"`, `"Jitter"`, 1)+`],"port"`, 1)},
		{"check key twice", "/beacon/v1/ns/a/svc/b/inst/x", strings.Replace(good, `"port"`, `"checks":[`+strings.Replace(goodCheck, `"jitter":0.1`, `"jitter":0.1,"jitter":0.2`, 1)+`],"port"`, 1)},
		{"unknown check key", "/beacon/v1/ns/a/svc/b/inst/x", strings.Replace(good, `"port"`, `"checks":[`+strings.Replace(goodCheck, `"jitter"`, `"jitterr":1,"jitter"`, 1)+`],"port"`, 1)},
		{"key with an escape", "/beacon/v1/ns/a/svc/b/inst/x", strings.Replace(good, `"port"`, `"p\u006frt"`, 1)},
		{"metadata key in the record's place", "/beacon/v1/ns/a/svc/b/inst/x", strings.Replace(good, `"port":1`, `"port":1,"metadata":{"k":"v"},"k":"v"`, 1)},
		{"null check", "/beacon/v1/ns/a/svc/b/inst/x", strings.Replace(good, `"port"`, `"checks":[null],"port"`, 1)},
		{"id .", "/beacon/v1/ns/a/svc/b/inst/.", good},
		{"id ..", "/beacon/v1/ns/a/svc/b/inst/..", good},
		{"address not an IP", "/beacon/v1/ns/a/svc/b/inst/x", strings.Replace(good, "127.0.0.1", "999.0.0.1", 1)},
	} {
		if _, err := l.DecodeInstance(tc.key, []byte(tc.value), 1); err == nil {
			t.Errorf("DecodeInstance(%s) succeeded, want an error", tc.name)
		}
	}
}

func TestDecodeAcceptsWhatItShould(t *testing.T) {
	l := Layout{Prefix: DefaultPrefix}
	for _, v := range []string{
		`{"address":"127.0.0.1","port":1,"weight":1,"status":"UP","health":"PASSING"}`,
		` { "health" : "PASSING", "status":"UP", "weight":1, "port":1, "address":"127.0.0.1" } ` + "\n",
		`{"address":"127.0.0.1","port":1,"weight":1,"status":"UP","health":"PASSING","tags":null,"metadata":null,"checks":null}`,
		`{"address":"127.0.0.1","port":1,"weight":1,"status":"UP","health":"PASSING","checks":[` + goodCheck + `]}`,
	} {
		if _, err := l.DecodeInstance("/beacon/v1/ns/a/svc/b/inst/x", []byte(v), 1); err != nil {
			t.Errorf("DecodeInstance(%s) = %v, want it to decode", v, err)
		}
	}
}

// Empty lists and maps decode as nil, as EncodeInstance (omitempty) writes
// them: a record reads the same before and after a round trip.
func TestDecodeNormalizesEmptyToNil(t *testing.T) {
	l := Layout{Prefix: DefaultPrefix}
	v := `{"address":"127.0.0.1","port":1,"weight":1,"status":"UP","health":"PASSING","tags":[],"metadata":{},"checks":[` +
		strings.Replace(goodCheck, `"name"`, `"headers":{},"name"`, 1) + `]}`
	in, err := l.DecodeInstance("/beacon/v1/ns/a/svc/b/inst/x", []byte(v), 1)
	if err != nil {
		t.Fatal(err)
	}
	if in.Tags != nil || in.Metadata != nil || in.Checks[0].Headers != nil {
		t.Errorf("DecodeInstance(empty tags, metadata, headers) = %#v, %#v, %#v; want nil", in.Tags, in.Metadata, in.Checks[0].Headers)
	}
	noChecks := strings.Replace(v, `"checks":[`+strings.Replace(goodCheck, `"name"`, `"headers":{},"name"`, 1)+`]`, `"checks":[]`, 1)
	if in, err := l.DecodeInstance("/beacon/v1/ns/a/svc/b/inst/x", []byte(noChecks), 1); err != nil || in.Checks != nil {
		t.Errorf("DecodeInstance(checks []) = %#v, %v; want nil checks", in, err)
	}
}

func TestDecodeServiceConfigIsStrict(t *testing.T) {
	l := Layout{Prefix: DefaultPrefix}
	key := l.ServiceConfigKey(registry.ServiceKey{Namespace: "default", Service: "orders"})
	if _, cfg, err := l.DecodeServiceConfig(key, []byte(`{"protection_threshold":0.5}`)); err != nil || cfg.ProtectionThreshold != 0.5 {
		t.Errorf("DecodeServiceConfig(0.5) = %v, %v", cfg, err)
	}
	for _, v := range []string{
		`{"Protection_Threshold":0.5}`, `{"protection_threshold":0.5,"protection_threshold":0.7}`,
		`{"protection_threshold":0.5}{}`, `{"protection_threshold":2}`, `{"protection_threshold":"NaN"}`, `{"x":1}`,
	} {
		if _, _, err := l.DecodeServiceConfig(key, []byte(v)); err == nil {
			t.Errorf("DecodeServiceConfig(%s) succeeded, want an error", v)
		}
	}
}

// jsonKeys returns the names in the json tags of a record struct.
func jsonKeys(v any) map[string]bool {
	keys := map[string]bool{}
	t := reflect.TypeOf(v)
	for i := range t.NumField() {
		name, _, _ := strings.Cut(t.Field(i).Tag.Get("json"), ",")
		keys[name] = true
	}
	return keys
}

func BenchmarkDecodeInstance(b *testing.B) {
	l := Layout{Prefix: DefaultPrefix}
	in := registry.Instance{
		Namespace: "prod", Service: "orders", ID: "orders-1", Address: "10.0.0.1", Port: 9001, Weight: 50, Zone: "a",
		Version: "1.2.3", Tags: []string{"canary", "v2"}, Metadata: map[string]string{"k": "v", "team": "shop"},
		Status: registry.StatusUp, Health: registry.HealthPassing, SessionID: 42,
		Checks: []registry.Check{{Name: "tcp", Kind: registry.CheckTCP, Interval: time.Second, Timeout: time.Second,
			Jitter: 0.1, FailuresBeforeCritical: 3, SuccessesBeforePassing: 2, Status: registry.HealthPassing}},
	}
	key, value := l.InstanceKey(in.Key()), EncodeInstance(&in)
	b.ReportAllocs()
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			if _, err := l.DecodeInstance(key, value, 1); err != nil {
				b.Fatal(err)
			}
		}
	})
}

// FuzzDecodeInstance: whatever sits in etcd under our prefix, decoding
// never panics, and what it accepts is valid and encodes back the same.
func FuzzDecodeInstance(f *testing.F) {
	f.Add("/beacon/v1/ns/default/svc/orders/inst/o-1", `{"address":"127.0.0.1","port":9001,"weight":100,"status":"UP","health":"PASSING"}`)
	f.Add("/beacon/v1/ns/default/svc/orders/inst/o-1", `{"address":"::1","port":1,"weight":1,"tags":["a"],"metadata":{"k":"v"},"status":"DRAINING","health":"CRITICAL","session":"00000000000000ff"}`)
	f.Add("/beacon/v1/sessions/1", `{}`)
	f.Add("/beacon/v1/ns/default/svc/web/inst/w-1", `{"address":"127.0.0.1","port":80,"weight":100,"status":"UP","health":"CRITICAL","checks":[{"name":"http","kind":"HTTP","target":"http://127.0.0.1/healthz","expect_status":"2xx","interval_ns":1000000000,"timeout_ns":500000000,"jitter":0.1,"failures_before_critical":3,"successes_before_passing":2,"status":"CRITICAL","output":"refused","since_unix_ns":1700000000000000000}]}`)
	f.Add("/beacon/v1/ns/default/svc/web/inst/w-1", `{"address":"web.internal","port":80,"weight":100,"tags":[],"metadata":{},"status":"UP","health":"PASSING","checks":[{"name":"h","kind":"HTTP","headers":{},"expect_status":"2xx","interval_ns":1000000000,"timeout_ns":500000000,"jitter":0.1,"failures_before_critical":3,"successes_before_passing":2,"status":"PASSING"}]}`)
	f.Add("/beacon/v1/ns/default/svc/web/inst/w-1", `{"address":"127.0.0.1","port":80,"weight":100,"tAgs":["a"],"status":"UP","health":"PASSING"}`)
	l := Layout{Prefix: DefaultPrefix}
	recordKeys, checkKeys := jsonKeys(instanceRecord{}), jsonKeys(checkRecord{})
	f.Fuzz(func(t *testing.T, key, value string) {
		in, err := l.DecodeInstance(key, []byte(value), 1)
		if err != nil {
			return
		}
		if err := in.Validate(); err != nil {
			t.Fatalf("decoded an invalid instance: %v", err)
		}
		// Only the exact keys of the stored form were accepted (checked
		// against the struct tags, not the decoder's own switch).
		var raw struct {
			Record map[string]json.RawMessage
			Checks []map[string]json.RawMessage
		}
		if err := json.Unmarshal([]byte(value), &raw.Record); err != nil {
			t.Fatalf("accepted a value that is not one JSON object: %v", err)
		}
		for k := range raw.Record {
			if !recordKeys[k] {
				t.Fatalf("accepted the key %q", k)
			}
		}
		if c, ok := raw.Record["checks"]; ok {
			_ = json.Unmarshal(c, &raw.Checks)
			for _, m := range raw.Checks {
				for k := range m {
					if !checkKeys[k] {
						t.Fatalf("accepted the check key %q", k)
					}
				}
			}
		}
		again, err := l.DecodeInstance(l.InstanceKey(in.Key()), EncodeInstance(in), 1)
		if err != nil {
			t.Fatalf("re-decoding: %v", err)
		}
		if diff := cmp.Diff(in, again); diff != "" {
			t.Fatalf("round trip differs:\n%s", diff)
		}
	})
}

func TestServicePolicyRoundTrip(t *testing.T) {
	l := Layout{Prefix: DefaultPrefix}
	sk := registry.ServiceKey{Namespace: "prod", Service: "orders"}
	for _, p := range []registry.ServicePolicy{
		{},
		{LoadBalancing: registry.LoadBalancing{Policy: registry.LBLeastRequest, ChoiceCount: 3}},
		{LoadBalancing: registry.LoadBalancing{Policy: registry.LBRingHash, MinRingSize: 64, MaxRingSize: 4096, HashHeader: "x-user"}},
		{Retry: registry.RetryPolicy{On: registry.RetryOnUnavailable | registry.RetryOnCancelled, NumRetries: 3, BaseBackoff: 10 * time.Millisecond, MaxBackoff: time.Second}},
		{OutlierDetection: registry.OutlierDetection{ConsecutiveFailures: 7, Interval: time.Second, BaseEjectionTime: time.Minute, MaxEjectionPercent: 30,
			FailurePercentageThreshold: 40, FailurePercentageMinimumHosts: 2, FailurePercentageRequestVolume: 20}},
	} {
		b := EncodeServicePolicy(p)
		gotSK, got, err := l.DecodeServicePolicy(l.ServicePolicyKey(sk), b)
		if err != nil || got != p || gotSK != sk {
			t.Errorf("DecodeServicePolicy(EncodeServicePolicy(%+v) = %s) = %v, %+v, %v", p, b, gotSK, got, err)
		}
	}
	if b := EncodeServicePolicy(registry.ServicePolicy{}); string(b) != "{}" {
		t.Errorf("EncodeServicePolicy(defaults) = %s, want {}", b)
	}
	if got, want := jsonKeys(policyRecord{}), len(policyKeys); len(got) != want || want > 32 {
		t.Errorf("policy record keys %v: decodeStrict tracks at most 32", got)
	}
}

func TestDecodeServicePolicyIsStrict(t *testing.T) {
	l := Layout{Prefix: DefaultPrefix}
	key := l.ServicePolicyKey(registry.ServiceKey{Namespace: "default", Service: "orders"})
	if _, p, err := l.DecodeServicePolicy(key, []byte(`{"lb_policy":"ring_hash","lb_hash_header":"x-user","retry_on":"unavailable,internal"}`)); err != nil ||
		p.LoadBalancing.Policy != registry.LBRingHash || p.Retry.On != registry.RetryOnUnavailable|registry.RetryOnInternal {
		t.Errorf("DecodeServicePolicy(ring hash, retries) = %+v, %v", p, err)
	}
	for _, v := range []string{
		`{"LB_Policy":"ring_hash","lb_hash_header":"x-user"}`, `{"retry_on":"unavailable","retry_on":"internal"}`, `{"retry_on":"unavailable"}{}`, `null`,
		`{"lb_policy":"random"}`, `{"lb_policy":"least_request","lb_choice_count":11}`, `{"lb_policy":"ring_hash"}`, `{"retry_on":"unavailable,not-found"}`,
		`{"retry_num_retries":2}`, `{"outlier_max_ejection_percent":101}`, `{"outlier_interval_ns":-1}`, `{"x":1}`,
	} {
		if _, _, err := l.DecodeServicePolicy(key, []byte(v)); err == nil {
			t.Errorf("DecodeServicePolicy(%s) succeeded, want an error", v)
		}
	}
	for _, k := range []string{l.ServiceConfigKey(registry.ServiceKey{Namespace: "default", Service: "orders"}), l.ServicePolicyPrefix() + "default", l.ServicePolicyPrefix() + "default/Orders"} {
		if _, _, err := l.DecodeServicePolicy(k, []byte(`{}`)); err == nil {
			t.Errorf("DecodeServicePolicy(key %q) succeeded, want an error", k)
		}
	}
}
