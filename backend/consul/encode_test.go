package consul

import (
	"testing"

	"github.com/hashicorp/consul/api"

	"beacon.dev/beacon/registry"
)

// Any metadata key maps to one Consul accepts and back to itself, and any
// Meta read from Consul decodes without harm.
func FuzzMetaKeyRoundTrip(f *testing.F) {
	for _, k := range []string{"team", "app.kubernetes.io/name", "beacon-zone", "consul-x", "a_b", "_", "ü", ""} {
		f.Add(k, "v")
	}
	f.Fuzz(func(t *testing.T, k, v string) {
		ck := metaKey(k)
		for i := 0; i < len(ck); i++ {
			if !consulKeyChar(ck[i]) {
				t.Fatalf("metaKey(%q) = %q holds %q", k, ck, ck[i])
			}
		}
		in := &registry.Instance{Namespace: "default", Service: "s", ID: "i", Address: "127.0.0.1", Port: 1, Weight: 1,
			Metadata: map[string]string{k: v}}
		reg, err := registration(in, 0)
		if err != nil {
			return // refused by field: fine
		}
		e := &api.ServiceEntry{Service: &api.AgentService{ID: reg.ID, Service: reg.Name, Address: reg.Address, Port: reg.Port, Meta: reg.Meta,
			Weights: *reg.Weights}}
		back, ok := instance(e, "default")
		if !ok || back.Metadata[k] != v || len(back.Metadata) != 1 || back.ID != "i" {
			t.Fatalf("key %q value %q came back as %+v (ok %v)", k, v, back, ok)
		}
		// Raw Meta, as anything speaking Consul may have written it.
		raw := &api.ServiceEntry{Service: &api.AgentService{ID: "x", Service: "s", Meta: map[string]string{k: v, ck: v, metaEscaped + k: v}},
			Checks: api.HealthChecks{{CheckID: k, Status: v, Type: v, ServiceID: "x"}}}
		instance(raw, "default")
	})
}
