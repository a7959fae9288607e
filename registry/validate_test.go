package registry_test

import (
	"errors"
	"fmt"
	"math"
	"strings"
	"testing"
	"time"

	"beacon.dev/beacon/registry"
)

func valid() registry.Instance {
	in := registry.Instance{Service: "orders", ID: "orders-1", Address: "127.0.0.1", Port: 9001}
	in.ApplyDefaults()
	return in
}

func TestValidate(t *testing.T) {
	for _, tc := range []struct {
		name   string
		modify func(*registry.Instance)
		field  string // "" when valid
	}{
		{"valid", func(*registry.Instance) {}, ""},
		{"ipv6 address", func(i *registry.Instance) { i.Address = "::1" }, ""},
		{"dns address", func(i *registry.Instance) { i.Address = "orders.svc.cluster.local" }, ""},
		{"id with colon and dot", func(i *registry.Instance) { i.ID = "host-1.example:9001" }, ""},
		{"63-char service", func(i *registry.Instance) { i.Service = strings.Repeat("a", 63) }, ""},
		{"empty service", func(i *registry.Instance) { i.Service = "" }, "service"},
		{"64-char service", func(i *registry.Instance) { i.Service = strings.Repeat("a", 64) }, "service"},
		{"uppercase service", func(i *registry.Instance) { i.Service = "Orders" }, "service"},
		{"leading dash", func(i *registry.Instance) { i.Service = "-orders" }, "service"},
		{"trailing dash", func(i *registry.Instance) { i.Service = "orders-" }, "service"},
		{"bad namespace", func(i *registry.Instance) { i.Namespace = "a_b" }, "namespace"},
		{"empty id", func(i *registry.Instance) { i.ID = "" }, "id"},
		{"slash in id", func(i *registry.Instance) { i.ID = "a/b" }, "id"},
		{"empty address", func(i *registry.Instance) { i.Address = "" }, "address"},
		{"address with space", func(i *registry.Instance) { i.Address = "a b" }, "address"},
		{"port 0", func(i *registry.Instance) { i.Port = 0 }, "port"},
		{"port 65536", func(i *registry.Instance) { i.Port = 65536 }, "port"},
		{"weight 10001", func(i *registry.Instance) { i.Weight = 10001 }, "weight"},
		{"bad zone", func(i *registry.Instance) { i.Zone = "Zone A" }, "zone"},
		{"long version", func(i *registry.Instance) { i.Version = strings.Repeat("1", 65) }, "version"},
		{"empty tag", func(i *registry.Instance) { i.Tags = []string{""} }, "tags[0]"},
		{"33 tags", func(i *registry.Instance) { i.Tags = make([]string, 33) }, "tags"},
		{"invalid utf8 tag", func(i *registry.Instance) { i.Tags = []string{"\xff"} }, "tags[0]"},
		{"empty metadata key", func(i *registry.Instance) { i.Metadata = map[string]string{"": "v"} }, "metadata key"},
		{"big metadata value", func(i *registry.Instance) { i.Metadata = map[string]string{"k": strings.Repeat("v", 513)} }, `metadata["k"]`},
		{"unknown status", func(i *registry.Instance) { i.Status = 9 }, "status"},
		{"unknown health", func(i *registry.Instance) { i.Health = -1 }, "health"},
		{"id .", func(i *registry.Instance) { i.ID = "." }, "id"},
		{"id ..", func(i *registry.Instance) { i.ID = ".." }, "id"},
		{"id ...", func(i *registry.Instance) { i.ID = "..." }, ""},
		{"id .hidden", func(i *registry.Instance) { i.ID = ".hidden" }, ""},
		{"jitter NaN", func(i *registry.Instance) { i.Checks = []registry.Check{tcpCheck(math.NaN())} }, "checks[0].jitter"},
		{"jitter +Inf", func(i *registry.Instance) { i.Checks = []registry.Check{tcpCheck(math.Inf(1))} }, "checks[0].jitter"},
		{"jitter -Inf", func(i *registry.Instance) { i.Checks = []registry.Check{tcpCheck(math.Inf(-1))} }, "checks[0].jitter"},
		{"jitter negative", func(i *registry.Instance) { i.Checks = []registry.Check{tcpCheck(-0.1)} }, "checks[0].jitter"},
		{"jitter 0.6", func(i *registry.Instance) { i.Checks = []registry.Check{tcpCheck(0.6)} }, "checks[0].jitter"},
		{"jitter 0.5", func(i *registry.Instance) { i.Checks = []registry.Check{tcpCheck(0.5)} }, ""},
		{"check since 1970-01-01", func(i *registry.Instance) {
			i.Checks = []registry.Check{tcpCheck(0.1)}
			i.Checks[0].Since = time.Unix(0, 0)
		}, "checks[0].since"},
		{"check since year 1", func(i *registry.Instance) {
			i.Checks = []registry.Check{tcpCheck(0.1)}
			i.Checks[0].Since = time.Date(1, 1, 1, 0, 0, 1, 0, time.UTC)
		}, "checks[0].since"},
		{"check since year 3000", func(i *registry.Instance) {
			i.Checks = []registry.Check{tcpCheck(0.1)}
			i.Checks[0].Since = time.Date(3000, 1, 1, 0, 0, 0, 0, time.UTC)
		}, "checks[0].since"},
		{"check since now", func(i *registry.Instance) {
			i.Checks = []registry.Check{tcpCheck(0.1)}
			i.Checks[0].Since = time.Date(2026, 12, 5, 15, 0, 0, 1, time.UTC)
		}, ""},
		{"second check's jitter NaN", func(i *registry.Instance) {
			c := tcpCheck(math.NaN())
			c.Name = "b"
			i.Checks = []registry.Check{tcpCheck(0.1), c}
		}, "checks[1].jitter"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			in := valid()
			tc.modify(&in)
			err := in.Validate()
			if tc.field == "" {
				if err != nil {
					t.Fatalf("Validate() = %v, want nil", err)
				}
				return
			}
			var fe *registry.FieldError
			if !errors.As(err, &fe) || fe.Field != tc.field {
				t.Fatalf("Validate() = %v, want a FieldError on %q", err, tc.field)
			}
			if !errors.Is(err, registry.ErrInvalid) {
				t.Errorf("errors.Is(%v, ErrInvalid) = false", err)
			}
		})
	}
}

// tcpCheck is a valid TCP check with the given jitter.
func tcpCheck(jitter float64) registry.Check {
	c := registry.Check{Kind: registry.CheckTCP, Jitter: jitter}
	c.ApplyDefaults()
	return c
}

func TestValidateAddress(t *testing.T) {
	for _, tc := range []struct {
		addr string
		ok   bool
	}{
		{"127.0.0.1", true},
		{"0.0.0.0", true},
		{"255.255.255.255", true},
		{"::1", true},
		{"2001:db8::1", true},
		{"::ffff:10.0.0.1", true},
		{"localhost", true},
		{"orders", true},
		{"orders.svc.cluster.local", true},
		{"orders.svc.cluster.local.", true}, // fully qualified
		{"ORDERS.Example.COM", true},
		{"a-b.c-d", true},
		{"my_service_1", true}, // Docker Compose names; Go's resolver takes '_'
		{"1a.example", true},
		{"123.example", true},     // numeric labels are fine but for the last
		{"10.0.0.1.nip.io", true}, // ditto
		{"x.0xg", true},           // not hex
		{"ip-10-0-0-1.internal", true},
		{strings.Repeat("a", 63) + ".b", true},
		{strings.Repeat("a.", 126) + "a", true},  // 253 characters
		{strings.Repeat("a.", 126) + "a.", true}, // and the final dot
		{"", false},
		{"999.1.1.1", false},
		{"256.0.0.1", false},
		{"1.2.3", false},
		{"1.2.3.4.5", false},
		{"01.2.3.4", false},
		{"1", false},
		{"1.", false},
		{"10.0.0.0x1", false},
		{"0x7f000001", false},
		{"example.0X1F", false},
		{"-a-.b", false},
		{"-a.b", false},
		{"a-.b", false},
		{"a.-b", false},
		{"-", false},
		{"a..b", false},
		{".a", false},
		{".", false},
		{"a b", false},
		{"a/b", false},
		{"a\x00b", false},
		{"[::1]", false},
		{"fe80::1%eth0", false}, // a zone means something on one host only
		{"1.2.3.4:80", false},
		{"ü.example", false},
		{strings.Repeat("a", 64) + ".b", false},
		{strings.Repeat("a.", 126) + "ab", false}, // 254 characters
		{strings.Repeat("a.", 127) + ".", false},
	} {
		in := valid()
		in.Address = tc.addr
		err := in.Validate()
		if tc.ok {
			if err != nil {
				t.Errorf("Validate(address %q) = %v, want nil", tc.addr, err)
			}
			continue
		}
		var fe *registry.FieldError
		if !errors.As(err, &fe) || fe.Field != "address" {
			t.Errorf("Validate(address %q) = %v, want a FieldError on address", tc.addr, err)
		}
	}
}

func TestValidateID(t *testing.T) {
	for _, tc := range []struct {
		id string
		ok bool
	}{
		{"orders-1", true},
		{"host-1.example:9001", true},
		{"A_b.C-d:1", true},
		{"...", true},
		{".a", true},
		{"a.", true},
		{strings.Repeat("x", 128), true},
		{"", false},
		{".", false},
		{"..", false},
		{"a/b", false},
		{"../x", false},
		{"a b", false},
		{"a\x00", false},
		{"ü", false},
		{strings.Repeat("x", 129), false},
	} {
		err := registry.ValidateID("id", tc.id)
		if tc.ok {
			if err != nil {
				t.Errorf("ValidateID(%q) = %v, want nil", tc.id, err)
			}
			continue
		}
		var fe *registry.FieldError
		if !errors.As(err, &fe) || fe.Field != "id" || !errors.Is(err, registry.ErrInvalid) {
			t.Errorf("ValidateID(%q) = %v, want a FieldError on id", tc.id, err)
		}
	}
}

func TestValidateSessionName(t *testing.T) {
	for _, tc := range []struct {
		name string
		ok   bool
	}{
		{"", true},
		{"host-1 pid 4242", true},
		{"beacon/etcd", true},
		{"café ☕ 東京", true},
		{strings.Repeat("n", registry.MaxSessionNameLen), true},
		{strings.Repeat("n", registry.MaxSessionNameLen+1), false},
		{"a\x00b", false},
		{"line\nbreak", false},
		{"tab\there", false},
		{"del\x7f", false},
		{"c1\u0085", false},       // NEL, a C1 control
		{"bidi\u202eevil", false}, // RIGHT-TO-LEFT OVERRIDE
		{"zero\u200bwidth", false},
		{"\xff", false},
		{"half\xe2\x82", false},
	} {
		err := registry.ValidateSessionName(tc.name)
		if tc.ok {
			if err != nil {
				t.Errorf("ValidateSessionName(%q) = %v, want nil", tc.name, err)
			}
			continue
		}
		var fe *registry.FieldError
		if !errors.As(err, &fe) || fe.Field != "name" || !errors.Is(err, registry.ErrInvalid) {
			t.Errorf("ValidateSessionName(%q) = %v, want a FieldError on name", tc.name, err)
		}
	}
}

func TestValidateFloats(t *testing.T) {
	nan, inf := math.NaN(), math.Inf(1)
	for _, tc := range []struct {
		f  float64
		ok bool
	}{{0, true}, {0.5, true}, {1, true}, {-0.0, true}, {nan, false}, {inf, false}, {-inf, false}, {-0.01, false}, {1.01, false}} {
		if err := registry.ValidateProtectionThreshold(tc.f); (err == nil) != tc.ok {
			t.Errorf("ValidateProtectionThreshold(%v) = %v, want ok=%v", tc.f, err, tc.ok)
		} else if err != nil && !strings.Contains(err.Error(), "protection_threshold") {
			t.Errorf("ValidateProtectionThreshold(%v) = %v, want it to name protection_threshold", tc.f, err)
		}
		err := registry.ValidateFloat("share", tc.f, 0, 1)
		if (err == nil) != tc.ok {
			t.Errorf("ValidateFloat(%v) = %v, want ok=%v", tc.f, err, tc.ok)
		}
		var fe *registry.FieldError
		if err != nil && (!errors.As(err, &fe) || fe.Field != "share" || !strings.Contains(fe.Reason, "between 0 and 1")) {
			t.Errorf("ValidateFloat(%v) = %v, want a FieldError on share naming the limits", tc.f, err)
		}
	}
}

func TestValidateSessionTTL(t *testing.T) {
	for _, tc := range []struct {
		ttl time.Duration
		ok  bool
	}{
		{0, true}, {2 * time.Second, true}, {time.Hour, true},
		{time.Second, false}, {time.Hour + time.Second, false}, {2500 * time.Millisecond, false},
	} {
		if err := registry.ValidateSessionTTL(tc.ttl); (err == nil) != tc.ok {
			t.Errorf("ValidateSessionTTL(%s) = %v, want ok=%v", tc.ttl, err, tc.ok)
		}
	}
}

func TestRoutable(t *testing.T) {
	for _, tc := range []struct {
		status registry.Status
		health registry.Health
		want   bool
	}{
		{registry.StatusUp, registry.HealthPassing, true},
		{registry.StatusUp, registry.HealthWarning, true},
		{registry.StatusUp, registry.HealthCritical, false},
		{registry.StatusStarting, registry.HealthPassing, false},
		{registry.StatusDraining, registry.HealthPassing, false},
		{registry.StatusOutOfService, registry.HealthPassing, false},
	} {
		in := registry.Instance{Status: tc.status, Health: tc.health}
		if got := in.Routable(); got != tc.want {
			t.Errorf("Routable(%s, %s) = %v, want %v", tc.status, tc.health, got, tc.want)
		}
	}
}

func TestParseStatusAndHealth(t *testing.T) {
	for _, s := range []string{"STARTING", "up", "Draining", "OUT_OF_SERVICE"} {
		st, err := registry.ParseStatus(s)
		if err != nil || !strings.EqualFold(st.String(), s) {
			t.Errorf("ParseStatus(%q) = %v, %v", s, st, err)
		}
	}
	for _, s := range []string{"", "UNSPECIFIED", "bogus"} {
		if _, err := registry.ParseStatus(s); err == nil {
			t.Errorf("ParseStatus(%q) succeeded, want an error", s)
		}
		if _, err := registry.ParseHealth(s); err == nil {
			t.Errorf("ParseHealth(%q) succeeded, want an error", s)
		}
	}
}

func ExampleInstance_Validate() {
	in := registry.Instance{Service: "orders", ID: "orders-1", Address: "127.0.0.1", Port: 70000}
	in.ApplyDefaults()
	fmt.Println(in.Validate())
	// Output: invalid port: must be between 1 and 65535 (got "70000")
}
