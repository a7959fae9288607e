package etcd_test

import (
	"log/slog"

	clientv3 "go.etcd.io/etcd/client/v3"

	"beacon.dev/beacon/backend/etcd"
	"beacon.dev/beacon/discovery"
)

// ExampleNew: the SDK directly on etcd (docs/sdk.md, "Backends"), compiled
// (not run).
func ExampleNew() {
	cli, err := clientv3.New(clientv3.Config{Endpoints: []string{"http://127.0.0.1:2379"}})
	if err != nil {
		panic(err)
	}
	defer cli.Close()
	if err := followEtcd(cli, slog.Default()); err != nil {
		panic(err)
	}
}

func followEtcd(etcdClient *clientv3.Client, logger *slog.Logger) error {
	b, err := etcd.New(etcdClient, "", "", logger) // namespace "default", prefix /beacon/v1/
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
