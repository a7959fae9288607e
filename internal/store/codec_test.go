package store

import (
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
	} {
		if _, err := l.DecodeInstance(tc.key, []byte(tc.value), 1); err == nil {
			t.Errorf("DecodeInstance(%s) succeeded, want an error", tc.name)
		}
	}
}

// FuzzDecodeInstance: whatever sits in etcd under our prefix, decoding
// never panics, and what it accepts is valid and encodes back the same.
func FuzzDecodeInstance(f *testing.F) {
	f.Add("/beacon/v1/ns/default/svc/orders/inst/o-1", `{"address":"127.0.0.1","port":9001,"weight":100,"status":"UP","health":"PASSING"}`)
	f.Add("/beacon/v1/ns/default/svc/orders/inst/o-1", `{"address":"::1","port":1,"weight":1,"tags":["a"],"metadata":{"k":"v"},"status":"DRAINING","health":"CRITICAL","session":"00000000000000ff"}`)
	f.Add("/beacon/v1/sessions/1", `{}`)
	f.Add("/beacon/v1/ns/default/svc/web/inst/w-1", `{"address":"127.0.0.1","port":80,"weight":100,"status":"UP","health":"CRITICAL","checks":[{"name":"http","kind":"HTTP","target":"http://127.0.0.1/healthz","expect_status":"2xx","interval_ns":1000000000,"timeout_ns":500000000,"jitter":0.1,"failures_before_critical":3,"successes_before_passing":2,"status":"CRITICAL","output":"refused","since_unix_ns":1700000000000000000}]}`)
	l := Layout{Prefix: DefaultPrefix}
	f.Fuzz(func(t *testing.T, key, value string) {
		in, err := l.DecodeInstance(key, []byte(value), 1)
		if err != nil {
			return
		}
		if err := in.Validate(); err != nil {
			t.Fatalf("decoded an invalid instance: %v", err)
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
