package server_test

import (
	"context"
	"testing"
	"time"

	"beacon.dev/beacon/client"
	"beacon.dev/beacon/internal/store"
	"beacon.dev/beacon/registry"
	"beacon.dev/beacon/server/servertest"
)

// An operator's OUT_OF_SERVICE written to etcd by someone else (another
// server, a tool) survives a registration through a server whose view may
// not hold it yet: the server merges with etcd's record, not its view's.
func TestRegisterKeepsOutOfServiceTheViewHasNotSeen(t *testing.T) {
	cfg := servertest.Config(t, "")
	srv := servertest.Start(t, cfg)
	c, err := client.New([]string{srv.Addr()})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	st := store.New(srv.EtcdClient(), cfg.EtcdPrefix)
	defer st.Close()
	for i := range 20 {
		in := registry.Instance{Service: "web", ID: "web-1", Address: "127.0.0.1", Port: 8000 + i}
		if _, err := c.Register(ctx, in); err != nil {
			t.Fatal(err)
		}
		// Straight to etcd, and at once register again through the server.
		if _, err := st.Update(ctx, registry.InstanceKey{Namespace: registry.DefaultNamespace, Service: "web", ID: "web-1"}, func(in *registry.Instance) bool {
			in.Status = registry.StatusOutOfService
			return true
		}); err != nil {
			t.Fatal(err)
		}
		in.Port++
		if _, err := c.Register(ctx, in); err != nil {
			t.Fatal(err)
		}
		snap, err := c.Instances(ctx, "web", client.All())
		if err != nil || len(snap.Instances) != 1 {
			t.Fatalf("Instances(web) = %v, %v", snap, err)
		}
		if got := snap.Instances[0]; got.Status != registry.StatusOutOfService || got.Port != in.Port {
			t.Fatalf("try %d: web-1 = status %v port %d, want OUT_OF_SERVICE (the operator's) and %d (the registration)", i, got.Status, got.Port, in.Port)
		}
		if _, err := c.SetStatus(ctx, "web", "web-1", registry.StatusUp); err != nil {
			t.Fatal(err)
		}
	}
}
