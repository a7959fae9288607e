package server_test

import (
	"context"
	"crypto/tls"
	"fmt"
	"net"
	"net/http"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"connectrpc.com/connect"
	clientv3 "go.etcd.io/etcd/client/v3"
	"golang.org/x/net/http2"
	"google.golang.org/protobuf/types/known/durationpb"

	beaconv1 "beacon.dev/beacon/api/beacon/v1"
	"beacon.dev/beacon/api/beacon/v1/beaconv1connect"
	"beacon.dev/beacon/client"
	"beacon.dev/beacon/internal/testutil"
	"beacon.dev/beacon/server/servertest"
)

// rawH2CClient is a raw HTTP/2 cleartext client on its own connections.
func rawH2CClient() *http.Client {
	return &http.Client{Transport: &http2.Transport{
		AllowHTTP: true,
		DialTLSContext: func(ctx context.Context, network, addr string, _ *tls.Config) (net.Conn, error) {
			return (&net.Dialer{}).DialContext(ctx, network, addr)
		},
	}}
}

// flood pipelines batches of maxBatch bogus session ids on KeepAliveStream
// and never reads an answer, opening a new stream whenever the server cuts
// one, until ctx ends. It counts the batches sent.
type flood struct {
	sent   atomic.Int64
	cancel context.CancelFunc
	wg     sync.WaitGroup
	hc     *http.Client
}

func startFlood(addr string) *flood {
	ctx, cancel := context.WithCancel(context.Background())
	f := &flood{cancel: cancel, hc: rawH2CClient()}
	rpc := beaconv1connect.NewRegistryServiceClient(f.hc, "http://"+addr, connect.WithGRPC())
	ids := make([]int64, 10000)
	for i := range ids {
		ids[i] = 1<<40 + int64(i) // no such sessions
	}
	f.wg.Add(1)
	go func() {
		defer f.wg.Done()
		for ctx.Err() == nil {
			stream := rpc.KeepAliveStream(ctx)
			for ctx.Err() == nil {
				if err := stream.Send(&beaconv1.KeepAliveBatch{SessionIds: ids}); err != nil {
					break
				}
				f.sent.Add(1)
			}
			_ = stream.CloseRequest()
			_ = stream.CloseResponse()
		}
	}()
	return f
}

func (f *flood) stop() {
	f.cancel()
	f.wg.Wait()
	f.hc.CloseIdleConnections()
}

// heartbeater renews one session with unary KeepAlive calls, one every
// tick, each given up after timeout, and counts the outcomes.
type heartbeater struct {
	ok, failed, expired atomic.Int64
	cancel              context.CancelFunc
	wg                  sync.WaitGroup
}

func startHeartbeats(rpc beaconv1connect.RegistryServiceClient, id int64, every, timeout time.Duration) *heartbeater {
	ctx, cancel := context.WithCancel(context.Background())
	h := &heartbeater{cancel: cancel}
	h.wg.Add(1)
	go func() {
		defer h.wg.Done()
		t := time.NewTicker(every)
		defer t.Stop()
		for {
			cctx, ccancel := context.WithTimeout(ctx, timeout)
			_, err := rpc.KeepAlive(cctx, connect.NewRequest(&beaconv1.KeepAliveRequest{SessionId: id}))
			ccancel()
			switch {
			case ctx.Err() != nil:
				return
			case err == nil:
				h.ok.Add(1)
			case connect.CodeOf(err) == connect.CodeNotFound:
				h.expired.Add(1)
			default:
				h.failed.Add(1)
			}
			select {
			case <-ctx.Done():
				return
			case <-t.C:
			}
		}
	}()
	return h
}

func (h *heartbeater) stop() {
	h.cancel()
	h.wg.Wait()
}

// Finding A: a client that pipelines huge batches of bogus ids on
// KeepAliveStream and never reads the answers must slow only its own
// stream. Before the fix the server's shared etcd keepalive stream
// deadlocked (a send under the lock the reply reader needs): every
// keepalive on the server hung, live sessions expired and Close hung.
func TestKeepAliveFloodDoesNotStarveOtherSessions(t *testing.T) {
	cfg := servertest.Config(t, "")
	srv, err := servertest.StartErr(cfg)
	if err != nil {
		t.Fatal(err)
	}
	closed := false
	defer func() {
		if !closed {
			srv.Close()
		}
	}()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()

	normal := rawH2CClient()
	defer normal.CloseIdleConnections()
	rpc := beaconv1connect.NewRegistryServiceClient(normal, "http://"+srv.Addr(), connect.WithGRPC())
	// Long enough that a busy machine does not lapse it between two
	// renewals; the flood used to stall renewals for good.
	const ttl = 30 * time.Second
	cs, err := rpc.CreateSession(ctx, connect.NewRequest(&beaconv1.CreateSessionRequest{Ttl: durationpb.New(ttl), Name: "normal"}))
	if err != nil {
		t.Fatal(err)
	}
	id := cs.Msg.GetSessionId()
	if _, err := rpc.Register(ctx, connect.NewRequest(&beaconv1.RegisterRequest{SessionId: id,
		Instance: &beaconv1.Instance{Service: "orders", Id: "o-1", Address: "127.0.0.1", Port: 9001}})); err != nil {
		t.Fatal(err)
	}
	hb := startHeartbeats(rpc, id, time.Second, ttl/3)
	defer hb.stop()

	// And a session of the SDK, which heartbeats on KeepAliveStream.
	var sdkExpired atomic.Int64
	c, err := client.New([]string{srv.Addr()})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	sess, err := c.NewSession(ctx, client.WithTTL(ttl), client.WithEvents(func(ev client.SessionEvent) {
		if ev.Kind == client.SessionExpired {
			sdkExpired.Add(1)
		}
	}))
	if err != nil {
		t.Fatal(err)
	}
	defer sess.Close(ctx)

	f := startFlood(srv.Addr())
	defer f.stop()
	testutil.Eventually(t, time.Minute, "the flood to send 8 batches", func() bool { return f.sent.Load() >= 8 })
	ok0 := hb.ok.Load()
	// Successful heartbeats on a 1 s tick, counted, not timed: more than a
	// TTL's worth, so that the flood lasts longer than a session renewed
	// by nothing would live (the SDK's included).
	const beats = int64(ttl/time.Second) + 5
	testutil.Eventually(t, 3*time.Minute, fmt.Sprintf("%d successful keepalives during the flood", beats), func() bool {
		return hb.ok.Load() >= ok0+beats || hb.expired.Load() > 0
	})
	t.Logf("during the flood: %d keepalives ok, %d failed, %d batches of 10000 bogus ids sent",
		hb.ok.Load()-ok0, hb.failed.Load(), f.sent.Load())
	if n := hb.expired.Load(); n > 0 {
		t.Fatalf("KeepAlive answered NotFound %d times: the session expired while its owner kept calling", n)
	}
	if n := sdkExpired.Load(); n > 0 {
		t.Errorf("the SDK's session expired %d times during the flood", n)
	}
	ttlResp, err := srv.EtcdClient().TimeToLive(ctx, clientv3.LeaseID(id))
	if err != nil || ttlResp.TTL <= 0 {
		t.Errorf("TimeToLive(session) = %v, %v; want the session alive", ttlResp, err)
	}

	// Close must return while the flood is on.
	done := make(chan struct{})
	go func() {
		srv.Close()
		close(done)
	}()
	closed = true
	select {
	case <-done:
	case <-time.After(60 * time.Second):
		t.Fatal("Close did not return within 60s during a keepalive flood")
	}
}

// Finding B: with an external etcd that stops answering while calls are
// in flight — frozen (a peer that accepts and says nothing) or unreachable
// (connections cut and refused, so clientv3 waits for a connection) —
// Close must still return, and leave no goroutine behind (goleak in
// TestMain).
func TestCloseReturnsWhenExternalEtcdStopsAnswering(t *testing.T) {
	for _, mode := range []string{"frozen", "unreachable"} {
		t.Run(mode, func(t *testing.T) { testCloseWithEtcdGone(t, mode) })
	}
}

func testCloseWithEtcdGone(t *testing.T, mode string) {
	etcdCfg := servertest.Config(t, "") // the embedded etcd we borrow, over TCP for the proxy
	etcdCfg.EtcdClientAddr = testutil.FreeAddr(t)
	servertest.Start(t, etcdCfg)
	proxy := testutil.NewProxy(t, etcdCfg.EtcdClientAddr)

	cfg := servertest.Config(t, "")
	cfg.DataDir = ""
	cfg.EtcdEndpoints = []string{"http://" + proxy.Addr()}
	cfg.EtcdPrefix = "/gone/"
	srv, err := servertest.StartErr(cfg)
	if err != nil {
		t.Fatal(err)
	}
	closed := false
	defer func() {
		if !closed {
			srv.Close()
		}
	}()
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	hc := rawH2CClient()
	defer hc.CloseIdleConnections()
	rpc := beaconv1connect.NewRegistryServiceClient(hc, "http://"+srv.Addr(), connect.WithGRPC())
	cs, err := rpc.CreateSession(ctx, connect.NewRequest(&beaconv1.CreateSessionRequest{Ttl: durationpb.New(10 * time.Second)}))
	if err != nil {
		t.Fatal(err)
	}
	id := cs.Msg.GetSessionId()
	if _, err := rpc.KeepAlive(ctx, connect.NewRequest(&beaconv1.KeepAliveRequest{SessionId: id})); err != nil {
		t.Fatal(err)
	}

	if mode == "frozen" {
		proxy.Freeze(true)
	} else {
		proxy.SetDown(true)
	}
	// Calls of every kind in flight against the silent etcd: unary and
	// streamed keepalives, registrations (group commit), session grants.
	var inFlight sync.WaitGroup
	var started, returned atomic.Int64
	callCtx, stopCalls := context.WithCancel(ctx)
	defer stopCalls()
	call := func(f func()) {
		inFlight.Add(1)
		go func() {
			defer inFlight.Done()
			defer returned.Add(1)
			started.Add(1)
			f()
		}()
	}
	for i := range 4 {
		call(func() { _, _ = rpc.KeepAlive(callCtx, connect.NewRequest(&beaconv1.KeepAliveRequest{SessionId: id})) })
		call(func() {
			_, _ = rpc.Register(callCtx, connect.NewRequest(&beaconv1.RegisterRequest{SessionId: id,
				Instance: &beaconv1.Instance{Service: "orders", Id: fmt.Sprintf("o-%d", i), Address: "127.0.0.1", Port: 9001}}))
		})
		call(func() { _, _ = rpc.CreateSession(callCtx, connect.NewRequest(&beaconv1.CreateSessionRequest{})) })
		call(func() {
			stream := rpc.KeepAliveStream(callCtx)
			if stream.Send(&beaconv1.KeepAliveBatch{SessionIds: []int64{id}}) == nil {
				_, _ = stream.Receive()
			}
			_ = stream.CloseRequest()
			_ = stream.CloseResponse()
		})
	}
	testutil.Eventually(t, time.Minute, "the calls to start", func() bool { return started.Load() == 16 })
	// A call the view answers from memory, on the same connection: once it
	// is back, the server has taken up the calls opened before it.
	if _, err := rpc.ListInstances(ctx, connect.NewRequest(&beaconv1.ListInstancesRequest{Service: "orders"})); err != nil {
		t.Fatalf("ListInstances = %v", err)
	}
	t.Logf("calls in flight when Close starts: %d of 16", 16-returned.Load())

	done := make(chan struct{})
	go func() {
		srv.Close()
		close(done)
	}()
	closed = true
	select {
	case <-done:
	case <-time.After(60 * time.Second):
		t.Fatalf("Close did not return within 60s with its etcd %s", mode)
	}
	stopCalls()
	inFlight.Wait()
	proxy.Freeze(false)
}
