package etcd_test

import (
	"context"
	"fmt"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/goleak"
	"go.uber.org/zap"

	"beacon.dev/beacon/backend"
	"beacon.dev/beacon/backend/backendtest"
	"beacon.dev/beacon/backend/etcd"
	"beacon.dev/beacon/client"
	"beacon.dev/beacon/internal/testutil"
	"beacon.dev/beacon/registry"
	"beacon.dev/beacon/session"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m, testutil.LeakOptions()...) }

func etcdClient(t *testing.T, endpoint string) *clientv3.Client {
	t.Helper()
	cli, err := clientv3.New(clientv3.Config{Endpoints: []string{endpoint}, DialTimeout: 5 * time.Second, Logger: zap.NewNop()})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cli.Close() })
	return cli
}

var prefixes atomic.Int64

// proxies remembers the proxy each conformance backend's etcd client goes
// through, for Freeze.
var proxies sync.Map // backend.Backend → *testutil.Proxy

// harness gives every backend its own key prefix on one etcd.
func harness(endpoint func(t *testing.T) string) backendtest.Harness {
	return backendtest.Harness{
		New: func(t *testing.T) backend.Backend {
			// Through a proxy of its own, which Freeze stops.
			proxy := testutil.NewProxy(t, strings.TrimPrefix(endpoint(t), "http://"))
			cli := etcdClient(t, "http://"+proxy.Addr())
			b, err := etcd.New(cli, "", fmt.Sprintf("/conformance/%d/", prefixes.Add(1)), nil)
			if err != nil {
				t.Fatal(err)
			}
			proxies.Store(b, proxy)
			return b
		},
		Freeze: func(t *testing.T, b backend.Backend) func() {
			p, _ := proxies.Load(b)
			p.(*testutil.Proxy).Freeze(true)
			return func() { p.(*testutil.Proxy).Freeze(false) }
		},
		TTL: 2 * time.Second,
		Expire: func(t *testing.T, _ backend.Backend, id int64) {
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			defer cancel()
			if _, err := etcdClient(t, endpoint(t)).Revoke(ctx, clientv3.LeaseID(id)); err != nil {
				t.Fatal(err)
			}
		},
	}
}

// On the embedded etcd (3.7) of a beacon server.
func TestConformanceEmbeddedEtcd(t *testing.T) {
	nd := testutil.StartBeacon(t)
	backendtest.Run(t, harness(func(*testing.T) string { return "http://" + nd.EtcdClient }))
}

// On Debian's etcd-server 3.4 (installed by the test command).
func TestConformanceDebianEtcd34(t *testing.T) {
	endpoint := testutil.StartDebianEtcd(t)
	backendtest.Run(t, harness(func(*testing.T) string { return endpoint }))
}

// A beacon server and an etcd-direct SDK on the same etcd and prefix see
// the same registry.
func TestInteroperatesWithABeaconServer(t *testing.T) {
	nd := testutil.StartBeacon(t)
	b, err := etcd.New(etcdClient(t, "http://"+nd.EtcdClient), "", "", nil)
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	if _, err := b.Register(ctx, registry.Instance{Service: "orders", ID: "direct-1", Address: "127.0.0.1", Port: 9001}); err != nil {
		t.Fatal(err)
	}
	c, err := client.New([]string{nd.Addr()})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	testutil.Eventually(t, 30*time.Second, "the beacon server lists the instance", func() bool {
		snap, err := c.Instances(ctx, "orders")
		return err == nil && len(snap.Instances) == 1 && snap.Instances[0].ID == "direct-1"
	})
}

// A lease lost while the owner lives (revoked here, as an etcd outage
// longer than the TTL would) is replaced and the instances come back.
func TestLostLeaseIsReplacedAndInstancesRegisteredAgain(t *testing.T) {
	nd := testutil.StartBeacon(t)
	cli := etcdClient(t, "http://"+nd.EtcdClient)
	b, err := etcd.New(cli, "", "/lease-loss/", nil)
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	s, err := b.NewSession(ctx, session.WithTTL(2*time.Second))
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close(ctx)
	if _, err := s.Register(ctx, registry.Instance{Service: "orders", ID: "e-1", Address: "127.0.0.1", Port: 9001}); err != nil {
		t.Fatal(err)
	}
	resp, err := cli.Get(ctx, "/lease-loss/ns/default/svc/orders/inst/e-1")
	if err != nil || len(resp.Kvs) != 1 {
		t.Fatal(resp, err)
	}
	lease := clientv3.LeaseID(resp.Kvs[0].Lease)
	if _, err := cli.Revoke(ctx, lease); err != nil {
		t.Fatal(err)
	}
	testutil.Eventually(t, 30*time.Second, "the instance is back under a new lease", func() bool {
		resp, err := cli.Get(ctx, "/lease-loss/ns/default/svc/orders/inst/e-1")
		return err == nil && len(resp.Kvs) == 1 && clientv3.LeaseID(resp.Kvs[0].Lease) != lease
	})
}
