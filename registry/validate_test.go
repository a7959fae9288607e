package registry_test

import (
	"errors"
	"fmt"
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
