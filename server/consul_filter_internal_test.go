package server

import "testing"

func TestConsulFilterSubset(t *testing.T) {
	e := &consulEntry{
		Node:    consulNode{Node: "10.0.0.1", Address: "10.0.0.1", Datacenter: "dc1", Meta: map[string]string{"zone": "a"}},
		Service: consulService{ID: "web1", Service: "web", Address: "10.0.0.1", Port: 80, Tags: []string{"v1", "blue"}, Meta: map[string]string{"team": "shop"}},
	}
	for expr, want := range map[string]bool{
		`Service.ID == web1`:                                     true,
		`Service.ID != "web1"`:                                   false,
		`"blue" in Service.Tags`:                                 true,
		`Service.Tags contains "green"`:                          false,
		`Service.Tags not contains green and Service.Port == 80`: true,
		`not (Service.Meta.team == shop) or Node.Meta.zone == a`: true,
		`"team" not in Service.Meta`:                             false,
		`Service.Meta.missing is empty`:                          true,
		`Node.Meta is not empty`:                                 true,
		`Node.Datacenter == dc2 or (Service.Address == "10.0.0.1" and Service.Service == web)`: true,
	} {
		f, err := parseConsulFilter(expr)
		if err != nil {
			t.Errorf("parse %q: %v", expr, err)
			continue
		}
		if got := f.match(e); got != want {
			t.Errorf("%q matched %v, want %v", expr, got, want)
		}
	}
	for _, bad := range []string{`Checks.Status == passing`, `Service.ID ==`, `(Service.ID == a`, `Service.Tags == x`, `Service.ID contains x`, `"x" in Service.ID`, `Service.ID = x`} {
		if _, err := parseConsulFilter(bad); err == nil {
			t.Errorf("parse %q: no error", bad)
		}
	}
}

// FuzzConsulFilter: any filter text is refused or parsed, never a panic,
// and a parsed one evaluates.
func FuzzConsulFilter(f *testing.F) {
	for _, s := range []string{`Service.ID == web1`, `"a" in Service.Tags and not (Node.Meta.z != b)`, `((((`, `Service.Meta.k is not empty or x`} {
		f.Add(s)
	}
	e := &consulEntry{Service: consulService{Tags: []string{"a"}, Meta: map[string]string{"k": "v"}}}
	f.Fuzz(func(t *testing.T, s string) {
		flt, err := parseConsulFilter(s)
		if err == nil && flt != nil {
			flt.match(e)
		}
	})
}
