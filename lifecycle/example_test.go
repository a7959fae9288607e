package lifecycle_test

import (
	"context"
	"database/sql"
	"log"
	"net"
	"time"

	"google.golang.org/grpc"

	"beacon.dev/beacon/client"
	"beacon.dev/beacon/lifecycle"
	"beacon.dev/beacon/registry"
)

// ExampleRun is docs/sdk.md's lifecycle section, compiled (not run: it
// needs a beacon server and a database).
func ExampleRun() {
	var db *sql.DB // the service's own dependency
	if err := runOrders(db); err != nil {
		log.Fatal(err)
	}
}

func runOrders(db *sql.DB) error {
	c, err := client.New([]string{"127.0.0.1:8970"})
	if err != nil {
		return err
	}
	defer c.Close()
	grpcLn, err := net.Listen("tcp", "10.0.0.5:9000")
	if err != nil {
		return err
	}
	s := grpc.NewServer()
	// ... register your services on s ...
	rep, err := lifecycle.Run(context.Background(), lifecycle.Config{
		Client:       c,
		Instance:     registry.Instance{Service: "orders", Zone: "eu-1"}, // address and port from the listener
		GRPC:         s,
		GRPCListener: grpcLn,
		Ready:        db.PingContext,   // polled until nil; nothing is registered before
		AckTimeout:   5 * time.Second,  // wait for watchers to drop this instance
		StopTimeout:  10 * time.Second, // in-flight requests
	})
	log.Printf("stopped in %v; %d/%d watchers acknowledged", rep.Stopping, rep.Acks.Acknowledged, rep.Acks.Watchers)
	return err
}
