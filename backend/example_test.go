package backend_test

import (
	"beacon.dev/beacon/backend"
	beaconbackend "beacon.dev/beacon/backend/beacon"
	"beacon.dev/beacon/backend/memory"
	"beacon.dev/beacon/client"
	"beacon.dev/beacon/discovery"
)

// ExampleBackend is docs/sdk.md's "Backends", compiled (not run).
func ExampleBackend() {
	c, err := client.New([]string{"127.0.0.1:8970"})
	if err != nil {
		panic(err)
	}
	defer c.Close()
	if err := follow(c); err != nil {
		panic(err)
	}
}

func follow(c *client.Client) error {
	var b backend.Backend = beaconbackend.New(c) // beacon servers (backend/beacon)
	b = memory.New("")                           // this process (backend/memory), for tests
	cache, err := discovery.New(b, discovery.Config{}, "orders")
	if err != nil {
		return err
	}
	defer cache.Close()
	return nil
}
