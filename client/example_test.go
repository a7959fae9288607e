package client_test

import (
	"context"
	"fmt"
	"time"

	"beacon.dev/beacon/client"
	"beacon.dev/beacon/internal/testutil"
	"beacon.dev/beacon/registry"
)

// Register an instance through a session, read it back, watch the service
// and see the instance leave when the session closes.
func Example() {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()

	addr, stop := testutil.ExampleServer() // in real life: `beacon server`
	defer stop()

	c, _ := client.New([]string{addr})
	defer c.Close()
	w, _ := c.Watch(ctx, []string{"orders"})
	defer w.Close()

	sess, _ := c.NewSession(ctx, client.WithTTL(10*time.Second))
	sess.Register(ctx, registry.Instance{Service: "orders", ID: "orders-1", Address: "127.0.0.1", Port: 9001})

	snap, _ := c.Instances(ctx, "orders")
	fmt.Println("routable:", snap.Instances[0].ID, snap.Instances[0].HostPort())

	sess.Close(ctx) // ends the lease: the instance leaves at once
	for {
		snaps, err := w.Next(ctx)
		if err != nil { // ctx ended: the watch has nothing more to say
			fmt.Println("watch:", err)
			return
		}
		if len(snaps) > 0 && len(snaps[0].Instances) == 0 {
			fmt.Println("watch: orders has no instances left")
			return
		}
	}
	// Output:
	// routable: orders-1 127.0.0.1:9001
	// watch: orders has no instances left
}
