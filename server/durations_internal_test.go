package server

import (
	"strings"
	"testing"
	"time"

	beaconv1 "beacon.dev/beacon/api/beacon/v1"
)

// Durations in a JSON request: protobuf's form and the Go way both work,
// nested ones included; anything else names the accepted forms.
func TestJSONDurationsTakeTheGoFormToo(t *testing.T) {
	codec := strictJSON{"json"}
	for body, want := range map[string]time.Duration{
		`{"ttl":"30s"}`:    30 * time.Second,
		`{"ttl":"0.010s"}`: 10 * time.Millisecond,
		`{"ttl":"10ms"}`:   10 * time.Millisecond,
		`{"ttl":"1m30s"}`:  90 * time.Second,
	} {
		var req beaconv1.CreateSessionRequest
		if err := codec.Unmarshal([]byte(body), &req); err != nil || req.GetTtl().AsDuration() != want {
			t.Errorf("%s: ttl %v, %v; want %v", body, req.GetTtl().AsDuration(), err, want)
		}
	}
	var reg beaconv1.RegisterRequest
	body := `{"instance":{"service":"web","checks":[{"kind":"CHECK_KIND_HTTP","interval":"250ms","timeout":"1s"}]}}`
	if err := codec.Unmarshal([]byte(body), &reg); err != nil {
		t.Fatal(err)
	}
	if c := reg.GetInstance().GetChecks()[0]; c.GetInterval().AsDuration() != 250*time.Millisecond || c.GetTimeout().AsDuration() != time.Second || reg.GetInstance().GetService() != "web" {
		t.Errorf("nested durations = %v, %v (service %q)", c.GetInterval().AsDuration(), c.GetTimeout().AsDuration(), reg.GetInstance().GetService())
	}
	var bad beaconv1.CreateSessionRequest
	err := codec.Unmarshal([]byte(`{"ttl":"banana"}`), &bad)
	if err == nil || !strings.Contains(err.Error(), `"10ms"`) {
		t.Errorf(`ttl "banana": %v, want an error showing the accepted forms`, err)
	}
	// Unknown fields stay refused on the second pass too.
	if err := codec.Unmarshal([]byte(`{"ttl":"10ms","wat":1}`), &bad); err == nil {
		t.Error(`{"ttl":"10ms","wat":1} accepted`)
	}
}
