package consul_test

import (
	"github.com/hashicorp/consul/api"

	"beacon.dev/beacon/backend/consul"
	"beacon.dev/beacon/discovery"
)

// ExampleNew: the SDK on a Consul agent (docs/sdk.md, "Backends"),
// compiled (not run).
func ExampleNew() {
	consulClient, err := api.NewClient(api.DefaultConfig())
	if err != nil {
		panic(err)
	}
	if err := followConsul(consulClient); err != nil {
		panic(err)
	}
}

func followConsul(consulClient *api.Client) error {
	b, err := consul.New(consul.Config{Client: consulClient})
	if err != nil {
		return err
	}
	defer b.Close() // after the cache's Close
	cache, err := discovery.New(b, discovery.Config{}, "orders")
	if err != nil {
		return err
	}
	defer cache.Close()
	return nil
}
