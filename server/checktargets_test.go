package server_test

import (
	"context"
	"errors"
	"net"
	"strings"
	"testing"
	"time"

	"beacon.dev/beacon/client"
	"beacon.dev/beacon/internal/testutil"
	"beacon.dev/beacon/registry"
	"beacon.dev/beacon/server/servertest"
)

// A check may probe its instance's own address and what the operator
// allows, nothing else: the server is not a proxy into its network.
func TestChecksProbeOnlyTheirOwnInstanceOrAllowedTargets(t *testing.T) {
	cfg := servertest.Config(t, "")
	cfg.CheckAllowTargets = []string{"10.1.0.0/16", "status.internal"}
	srv := servertest.Start(t, cfg)
	c, err := client.New([]string{srv.Addr()})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	reg := func(id, addr string, chk registry.Check) error {
		chk.Interval = time.Hour // registered, never run within the test
		_, err := c.Register(ctx, registry.Instance{Service: "web", ID: id, Address: addr, Port: 8080, Checks: []registry.Check{chk}})
		return err
	}
	for _, tc := range []struct {
		name, addr string
		check      registry.Check
		allowed    bool
	}{
		{"own address", "127.0.0.1", registry.Check{Kind: registry.CheckHTTP, Target: "http://127.0.0.1:9999/health"}, true},
		{"another host", "127.0.0.1", registry.Check{Kind: registry.CheckHTTP, Target: "http://10.9.9.9/secret"}, false},
		{"metadata by IP", "127.0.0.1", registry.Check{Kind: registry.CheckHTTP, Target: "http://169.254.169.254/computeMetadata/v1/"}, false},
		{"port scan", "127.0.0.1", registry.Check{Kind: registry.CheckTCP, Target: "10.9.9.9:22"}, false},
		{"allowed network", "127.0.0.1", registry.Check{Kind: registry.CheckTCP, Target: "10.1.2.3:5432"}, true},
		{"allowed host", "127.0.0.1", registry.Check{Kind: registry.CheckHTTP, Target: "https://status.internal/web"}, true},
		{"own host name", "web-1.internal", registry.Check{Kind: registry.CheckGRPC, Target: "web-1.internal:9000"}, true},
	} {
		err := reg(strings.ReplaceAll(tc.name, " ", "-"), tc.addr, tc.check)
		if tc.allowed && err != nil {
			t.Errorf("%s: %v", tc.name, err)
		}
		if !tc.allowed && (!errors.Is(err, registry.ErrInvalid) || !strings.Contains(err.Error(), "checks[0].target") || !strings.Contains(err.Error(), "--check-allow-targets")) {
			t.Errorf("%s: %v, want an invalid checks[0].target naming --check-allow-targets", tc.name, err)
		}
	}
	snap, err := c.Instances(ctx, "web", client.All())
	if err != nil || len(snap.Instances) != 4 {
		t.Errorf("stored %v (%v), want only the 4 allowed", snap, err)
	}

	// Headers a metadata service wants are refused by name.
	err = reg("headers", "127.0.0.1", registry.Check{Kind: registry.CheckHTTP, Headers: map[string]string{"Metadata-Flavor": "Google"}})
	if !errors.Is(err, registry.ErrInvalid) || !strings.Contains(err.Error(), "checks[0].headers") {
		t.Errorf("Metadata-Flavor header: %v, want refused", err)
	}
}

// An instance registered at a metadata address (so that its default
// check would reach it) is never dialled: the probe is refused at connect
// time, after name resolution.
func TestChecksNeverDialMetadataAddresses(t *testing.T) {
	srv := servertest.Start(t, servertest.Config(t, ""))
	c, err := client.New([]string{srv.Addr()})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	in := registry.Instance{Service: "meta", ID: "m-1", Address: "169.254.169.254", Port: 80,
		Checks: []registry.Check{{Kind: registry.CheckHTTP, Interval: time.Second, Timeout: time.Second, FailuresBeforeCritical: 1}}}
	if _, err := c.Register(ctx, in); err != nil {
		t.Fatal(err)
	}
	testutil.Eventually(t, 60*time.Second, "the check refused as a metadata address", func() bool {
		snap, err := c.Instances(ctx, "meta", client.All())
		return err == nil && len(snap.Instances) == 1 && len(snap.Instances[0].Checks) == 1 &&
			snap.Instances[0].Checks[0].Status == registry.HealthCritical &&
			strings.Contains(snap.Instances[0].Checks[0].Output, "link-local or metadata address")
	})
	if _, err := net.ResolveTCPAddr("tcp", "169.254.169.254:80"); err != nil {
		t.Fatal(err) // the address itself is fine to parse: the refusal is the server's
	}
}
