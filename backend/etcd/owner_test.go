package etcd_test

import (
	"context"
	"testing"
	"time"

	"beacon.dev/beacon/backend/etcd"
	"beacon.dev/beacon/internal/testutil"
	"beacon.dev/beacon/registry"
	"beacon.dev/beacon/session"
)

// A session's Deregister (lifecycle.Run calls it on the way out) leaves an
// instance that someone else registered again since.
func TestSessionDeregisterLeavesAnotherOwnersInstance(t *testing.T) {
	nd := testutil.StartBeacon(t)
	b, err := etcd.New(etcdClient(t, "http://"+nd.EtcdClient), "", "/owner-test/", nil)
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	// A TTL no loaded machine can outrun: a lapse would have the session
	// put its own orders-9 back while the test looks.
	sess, err := b.NewSession(ctx, session.WithTTL(time.Minute))
	if err != nil {
		t.Fatal(err)
	}
	defer sess.Close(ctx)
	if _, err := sess.Register(ctx, registry.Instance{Service: "orders", ID: "orders-9", Address: "127.0.0.1", Port: 9001}); err != nil {
		t.Fatal(err)
	}
	if _, err := b.Register(ctx, registry.Instance{Service: "orders", ID: "orders-9", Address: "127.0.0.1", Port: 9002}); err != nil {
		t.Fatal(err)
	}
	if found, err := sess.Deregister(ctx, "orders", "orders-9"); err != nil || found {
		t.Errorf("session Deregister(orders-9) = %v, %v; want false (taken over), nil", found, err)
	}
	if err := sess.Close(ctx); err != nil {
		t.Fatal(err)
	}
	snap, err := b.Instances(ctx, "orders")
	if err != nil {
		t.Fatal(err)
	}
	if len(snap.Instances) != 1 || snap.Instances[0].Port != 9002 {
		t.Errorf("Instances(orders) = %+v, want the persistent orders-9 on port 9002", snap.Instances)
	}
}
