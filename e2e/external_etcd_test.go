package e2e

import (
	"context"
	"fmt"
	"strings"
	"syscall"
	"testing"
	"time"

	"beacon.dev/beacon/internal/testutil"
	"beacon.dev/beacon/registry"
	"beacon.dev/beacon/server/servertest"
)

// `beacon server --etcd-endpoints` against Debian's etcd 3.4: no embedded
// etcd, and the registry behaves the same.
func TestExternalEtcd34(t *testing.T) {
	endpoint := testutil.StartDebianEtcd(t)
	addr := testutil.FreeAddr(t)
	args := []string{"server", "--addr", addr, "--etcd-endpoints", endpoint, "--log-level", "warn", "--console-addr", "off"}
	srv := &serverProc{t: t, addr: addr, args: args}
	srv.start()
	if line := srv.current.waitLine(30*time.Second, "ready"); !strings.Contains(line, "etcd at") {
		t.Errorf("server says %q, want it to name the external etcd", line)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	c := newClient(t, addr)
	w := watch(ctx, t, c, "orders")
	if _, err := c.Register(ctx, registry.Instance{Service: "orders", ID: "persistent", Address: "127.0.0.1", Port: 1}); err != nil {
		t.Fatal(err)
	}
	p := registerProc(t, addr, "ephemeral")
	waitInstances(ctx, t, w, "orders", "ephemeral", "persistent")
	killAndExpectExpiry(ctx, t, p, w, "persistent")
	// Restart the server: everything lives in etcd.
	srv.stop(syscall.SIGTERM)
	srv.start()
	waitInstances(ctx, t, w, "orders", "persistent")
	snap, err := c.Instances(ctx, "orders")
	if err != nil || len(snap.Instances) != 1 {
		t.Fatalf("Instances after restart = %v, %v", snap, err)
	}
}

// Reads after writes on etcd 3.4.23, whose requested progress
// notifications can run ahead of its events (etcd #15220): every
// registration is in the very next list.
func TestReadYourWritesOnEtcd34(t *testing.T) {
	endpoint := testutil.StartDebianEtcd(t)
	cfg := servertest.Config(t, "")
	cfg.EtcdEndpoints = []string{endpoint}
	srv := servertest.Start(t, cfg)
	c := newClient(t, srv.Addr())
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	for i := range 100 {
		id := fmt.Sprint("r-", i)
		if _, err := c.Register(ctx, registry.Instance{Service: "ryw", ID: id, Address: "127.0.0.1", Port: 1000 + i}); err != nil {
			t.Fatal(err)
		}
		snap, err := c.Instances(ctx, "ryw")
		if err != nil {
			t.Fatal(err)
		}
		if len(snap.Instances) != i+1 {
			t.Fatalf("after registering %s the list has %d instances, want %d", id, len(snap.Instances), i+1)
		}
	}
}
