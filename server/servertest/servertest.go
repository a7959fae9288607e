// Package servertest starts real beacon servers in the test's own process,
// on an embedded etcd and free loopback ports, as net/http/httptest does
// for HTTP servers. Each is closed when the test ends.
package servertest

import (
	"context"
	"errors"
	"fmt"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"

	"beacon.dev/beacon/internal/testutil"
	"beacon.dev/beacon/server"
)

// Config returns a config for a test server: embedded etcd in dir (a fresh
// temp dir when empty), free loopback ports, no fsync. The embedded etcd
// has no TCP client listener (its clients use the socket in dir): a test
// that wants one sets EtcdClientAddr, to testutil.FreeAddr(t) say.
func Config(t testing.TB, dir string) *server.Config {
	t.Helper()
	cfg := server.NewConfig()
	if dir == "" {
		dir = testutil.DataDir(t)
	}
	cfg.DataDir = dir
	cfg.Addr = testutil.FreeAddr(t)
	cfg.EtcdPeerAddr = testutil.FreeAddr(t)
	cfg.EtcdUnsafeNoFsync = true
	cfg.ShutdownTimeout = 2 * time.Second
	return cfg
}

// Start starts a server from cfg, waits until it is ready and closes it
// when the test ends.
func Start(t testing.TB, cfg *server.Config) *server.Server {
	t.Helper()
	s, err := StartErr(cfg)
	if err != nil {
		t.Fatalf("servertest.Start: %v", err)
	}
	t.Cleanup(func() { s.Close() })
	return s
}

// StartErr starts a server and waits for it to be ready; the caller
// closes it.
func StartErr(cfg *server.Config) (*server.Server, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	s, err := server.Start(ctx, cfg)
	if err != nil {
		return nil, err
	}
	select {
	case <-s.Ready():
		return s, nil
	case err := <-s.Err():
		s.Close()
		return nil, err
	case <-ctx.Done():
		s.Close()
		return nil, fmt.Errorf("server not ready: %w", ctx.Err())
	}
}

// EtcdLeader returns the index of the endpoint ("host:port") whose etcd
// member is the Raft leader.
func EtcdLeader(ctx context.Context, endpoints []string) (int, error) {
	for i, ep := range endpoints {
		cli, err := clientv3.New(clientv3.Config{Endpoints: []string{"http://" + ep}, DialTimeout: 2 * time.Second, Logger: zap.NewNop()})
		if err != nil {
			continue
		}
		st, err := cli.Status(ctx, "http://"+ep)
		cli.Close()
		if err == nil && st.Leader == st.Header.MemberId {
			return i, nil
		}
	}
	return -1, errors.New("servertest: no etcd leader among the endpoints")
}

// Leader returns the node (a `beacon server` process) whose etcd member
// leads.
func Leader(ctx context.Context, t testing.TB, ns []*testutil.Node) *testutil.Node {
	t.Helper()
	var eps []string
	for _, nd := range ns {
		eps = append(eps, nd.EtcdClient)
	}
	i, err := EtcdLeader(ctx, eps)
	if err != nil {
		t.Fatal(err)
	}
	return ns[i]
}
