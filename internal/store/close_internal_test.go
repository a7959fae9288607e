package store

import (
	"context"
	"net"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"beacon.dev/beacon/registry"
)

// With etcd unreachable, clientv3 waits for a connection: closing the
// batcher must cancel the commit in flight, answer its caller with an
// error and return, and a later put must fail at once.
func TestCloseCancelsACommitWaitingForEtcd(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close() // nothing listens: every connection is refused
	cli, err := clientv3.New(clientv3.Config{Endpoints: []string{addr}})
	if err != nil {
		t.Fatal(err)
	}
	defer cli.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()

	b := newBatcher(cli, Layout{Prefix: "/unreachable/"})
	in := registry.Instance{Service: "orders", ID: "o-1", Address: "127.0.0.1", Port: 9001}
	in.ApplyDefaults()
	r := &putReq{key: "/unreachable/ns/default/svc/orders/inst/o-1", in: &in, merge: KeepObservations, done: make(chan putResult, 1)}
	b.reqs <- r
	for len(b.reqs) > 0 { // until a worker holds it: its commit waits for etcd
		select {
		case <-ctx.Done():
			t.Fatal("no worker took the registration")
		case <-time.After(time.Millisecond):
		}
	}
	closed := make(chan struct{})
	go func() {
		b.close()
		close(closed)
	}()
	select {
	case <-closed:
	case <-ctx.Done():
		t.Fatal("close did not return while a commit waited for an unreachable etcd")
	}
	select {
	case res := <-r.done:
		if res.err == nil {
			t.Error("the commit in flight at close succeeded on an unreachable etcd, want an error")
		}
	default:
		t.Error("the commit in flight at close was not answered")
	}
	if _, err := b.put(ctx, r.key, &in, KeepObservations, nil); err == nil {
		t.Error("put after close = nil, want an error")
	}
}
