package server_test

import (
	"context"
	"errors"
	"strings"
	"testing"
	"time"

	"connectrpc.com/connect"
	"google.golang.org/protobuf/types/known/durationpb"

	beaconv1 "beacon.dev/beacon/api/beacon/v1"
	"beacon.dev/beacon/api/beacon/v1/beaconv1connect"
	"beacon.dev/beacon/internal/testutil"
	"beacon.dev/beacon/server"
	"beacon.dev/beacon/server/servertest"
)

func lockClient(srv *server.Server) beaconv1connect.LockServiceClient {
	return beaconv1connect.NewLockServiceClient(h2c(), "http://"+srv.Addr(), connect.WithGRPC())
}

func newSession(t *testing.T, srv *server.Server) int64 {
	t.Helper()
	resp, err := regClient(srv, "", connect.WithGRPC()).CreateSession(context.Background(), connect.NewRequest(&beaconv1.CreateSessionRequest{Ttl: durationpb.New(time.Minute)}))
	if err != nil {
		t.Fatal(err)
	}
	return resp.Msg.GetSessionId()
}

func acquire(ctx context.Context, lc beaconv1connect.LockServiceClient, session int64, wait time.Duration) (*beaconv1.AcquireLockResponse, error) {
	resp, err := lc.Acquire(ctx, connect.NewRequest(&beaconv1.AcquireLockRequest{Name: "inventory/sku-1", SessionId: session, Wait: durationpb.New(wait)}))
	if err != nil {
		return nil, err
	}
	return resp.Msg, nil
}

func fencedPut(ctx context.Context, c beaconv1connect.KVServiceClient, value string, session, token int64) error {
	_, err := c.Put(ctx, connect.NewRequest(&beaconv1.KVPutRequest{Key: "inventory/sku-1/stock", Value: []byte(value),
		Fence: &beaconv1.Fence{Lock: "inventory/sku-1", SessionId: session, FencingToken: token}}))
	return err
}

// A lock goes to one session at a time, to waiters in the order they
// came, with a growing fencing token; a KV write fenced with a token
// that no longer holds the lock is refused by the store and changes
// nothing.
func TestLockFIFOAndFencedWrites(t *testing.T) {
	srv := startServer(t)
	lc, kc := lockClient(srv), kvClient(srv)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	s1, s2, s3 := newSession(t, srv), newSession(t, srv), newSession(t, srv)
	a1, err := acquire(ctx, lc, s1, 0)
	if err != nil || !a1.GetAcquired() {
		t.Fatalf("first acquire = %v, %v", a1, err)
	}
	if try, err := acquire(ctx, lc, s2, 0); err != nil || try.GetAcquired() || try.GetFencingToken() != a1.GetFencingToken() {
		t.Fatalf("try while held = %v, %v; want not acquired, naming the holder's token", try, err)
	}
	if err := fencedPut(ctx, kc, "10", s1, a1.GetFencingToken()); err != nil {
		t.Fatalf("the holder's fenced write: %v", err)
	}
	type result struct {
		who  int64
		resp *beaconv1.AcquireLockResponse
		err  error
	}
	got := make(chan result, 2)
	waitFor := func(s int64) {
		go func() {
			r, err := acquire(ctx, lc, s, 50*time.Second)
			got <- result{s, r, err}
		}()
	}
	waiters := func(n int) func() bool {
		return func() bool {
			d, err := lc.Describe(ctx, connect.NewRequest(&beaconv1.DescribeLockRequest{Name: "inventory/sku-1"}))
			return err == nil && len(d.Msg.GetLock().GetWaiters()) == n
		}
	}
	waitFor(s2)
	eventually(t, "s2 waits", waiters(1))
	waitFor(s3)
	eventually(t, "s3 waits", waiters(2))
	if rel, err := lc.Release(ctx, connect.NewRequest(&beaconv1.ReleaseLockRequest{Name: "inventory/sku-1", SessionId: s1})); err != nil || !rel.Msg.GetReleased() {
		t.Fatalf("release = %v, %v", rel, err)
	}
	first := <-got
	if first.err != nil || first.who != s2 || !first.resp.GetAcquired() || first.resp.GetFencingToken() <= a1.GetFencingToken() {
		t.Fatalf("after the release: %+v; want s2 with a larger token than %d", first, a1.GetFencingToken())
	}
	err = fencedPut(ctx, kc, "999", s1, a1.GetFencingToken())
	if connect.CodeOf(err) != connect.CodeFailedPrecondition || !containsAll(err.Error(), "fenced", "nothing written") {
		t.Fatalf("the old holder's fenced write = %v, want it refused as fenced", err)
	}
	var ce *connect.Error
	if !errors.As(err, &ce) || ce.Meta().Get(server.FencedHeader) != "true" {
		t.Fatalf("a fenced refusal without the %s header: %v", server.FencedHeader, err)
	}
	if v, _ := kvGet(t, kc, "inventory/sku-1/stock"); string(v.GetValue()) != "10" {
		t.Fatalf("stock = %s after a refused fenced write", v.GetValue())
	}
	if err := fencedPut(ctx, kc, "9", s2, first.resp.GetFencingToken()); err != nil {
		t.Fatalf("the new holder's fenced write: %v", err)
	}
	// A release by a session that does not hold the lock changes nothing.
	if rel, err := lc.Release(ctx, connect.NewRequest(&beaconv1.ReleaseLockRequest{Name: "inventory/sku-1", SessionId: s1})); err != nil || rel.Msg.GetReleased() {
		t.Fatalf("release by a non-holder = %v, %v; want released false", rel, err)
	}
	if d, _ := lc.Describe(ctx, connect.NewRequest(&beaconv1.DescribeLockRequest{Name: "inventory/sku-1"})); d.Msg.GetLock().GetHolder().GetSessionId() != s2 {
		t.Fatalf("after a non-holder's release the holder is %v", d.Msg.GetLock().GetHolder())
	}
	// A forged token for the right session is refused too.
	if err := fencedPut(ctx, kc, "1", s2, first.resp.GetFencingToken()+1); connect.CodeOf(err) != connect.CodeFailedPrecondition {
		t.Fatalf("forged token = %v", err)
	}
	lc.Release(ctx, connect.NewRequest(&beaconv1.ReleaseLockRequest{Name: "inventory/sku-1", SessionId: s2}))
	second := <-got
	if second.err != nil || second.who != s3 || !second.resp.GetAcquired() || second.resp.GetFencingToken() <= first.resp.GetFencingToken() {
		t.Fatalf("then: %+v; want s3", second)
	}
	// FIFO across calls: a waiter whose wait ended keeps its place
	// (keep_place) and is served before a later one when it calls again.
	s4, s5 := newSession(t, srv), newSession(t, srv)
	short := func(s int64) *beaconv1.AcquireLockResponse {
		t.Helper()
		resp, err := lc.Acquire(ctx, connect.NewRequest(&beaconv1.AcquireLockRequest{Name: "inventory/sku-1", SessionId: s, Wait: durationpb.New(100 * time.Millisecond), KeepPlace: true}))
		if err != nil {
			t.Fatal(err)
		}
		return resp.Msg
	}
	if r := short(s4); r.GetAcquired() {
		t.Fatal("s4 got the lock s3 holds")
	}
	if r := short(s5); r.GetAcquired() || len(r.GetLock().GetWaiters()) != 2 || r.GetLock().GetWaiters()[0].GetSessionId() != s4 {
		t.Fatalf("queue after two kept places = %v", r.GetLock())
	}
	lc.Release(ctx, connect.NewRequest(&beaconv1.ReleaseLockRequest{Name: "inventory/sku-1", SessionId: s3}))
	if r := short(s5); r.GetAcquired() {
		t.Fatal("the later waiter got the lock first")
	}
	if r := short(s4); !r.GetAcquired() {
		t.Fatalf("the first waiter, calling again, = %v", r)
	}
	// Bad input names the field.
	_, err = lc.Acquire(ctx, connect.NewRequest(&beaconv1.AcquireLockRequest{Name: "a//b", SessionId: s1}))
	wantCode(t, err, connect.CodeInvalidArgument, "name")
	_, err = lc.Acquire(ctx, connect.NewRequest(&beaconv1.AcquireLockRequest{Name: "x", SessionId: s1, Wait: durationpb.New(-time.Second)}))
	wantCode(t, err, connect.CodeInvalidArgument, "wait")
	_, err = lc.Acquire(ctx, connect.NewRequest(&beaconv1.AcquireLockRequest{Name: "x", SessionId: 12345}))
	wantCode(t, err, connect.CodeNotFound, "session")
}

// A holder lost with its session (not released) keeps the lock from the
// next in line for the lock delay; a release hands it over at once.
func TestLockDelayOnlyAfterALostHolder(t *testing.T) {
	cfg := servertest.Config(t, "")
	cfg.LockDelay = time.Minute // far longer than any wait below
	srv := servertest.Start(t, cfg)
	lc, rc := lockClient(srv), regClient(srv, "", connect.WithGRPC())
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	s1, s2 := newSession(t, srv), newSession(t, srv)
	if a, err := acquire(ctx, lc, s1, 0); err != nil || !a.GetAcquired() {
		t.Fatal(a, err)
	}
	// A clean release: the next waiter gets it without the minute's delay.
	done := make(chan *beaconv1.AcquireLockResponse, 1)
	go func() {
		r, _ := acquire(ctx, lc, s2, 50*time.Second)
		done <- r
	}()
	eventually(t, "s2 waits", func() bool {
		d, err := lc.Describe(ctx, connect.NewRequest(&beaconv1.DescribeLockRequest{Name: "inventory/sku-1"}))
		return err == nil && len(d.Msg.GetLock().GetWaiters()) == 1
	})
	lc.Release(ctx, connect.NewRequest(&beaconv1.ReleaseLockRequest{Name: "inventory/sku-1", SessionId: s1}))
	if r := <-done; !r.GetAcquired() {
		t.Fatalf("after a release: %v", r)
	}
	// s2's session ends while it holds the lock: lost, not released.
	if _, err := rc.CloseSession(ctx, connect.NewRequest(&beaconv1.CloseSessionRequest{SessionId: s2})); err != nil {
		t.Fatal(err)
	}
	s3 := newSession(t, srv)
	eventually(t, "the lock to be free, in its lock delay", func() bool {
		d, err := lc.Describe(ctx, connect.NewRequest(&beaconv1.DescribeLockRequest{Name: "inventory/sku-1"}))
		return err == nil && d.Msg.GetLock().GetHolder() == nil && d.Msg.GetLock().GetLockDelay()
	})
	// Within the delay neither a try nor a short wait gets it.
	for _, wait := range []time.Duration{0, 2 * time.Second} {
		if r, err := acquire(ctx, lc, s3, wait); err != nil || r.GetAcquired() {
			t.Fatalf("acquire (wait %v) within the lock delay = %v, %v; want not acquired", wait, r, err)
		}
	}
}

func containsAll(s string, subs ...string) bool {
	for _, sub := range subs {
		if !strings.Contains(s, sub) {
			return false
		}
	}
	return true
}

func eventually(t *testing.T, what string, cond func() bool) {
	t.Helper()
	testutil.Eventually(t, 30*time.Second, what, cond)
}

// An election: candidates campaign with their values, Observe follows the
// leader and its proclaimed value, a resignation or a lost leader passes
// leadership on in order, and only the leader may proclaim.
func TestElectionObserveProclaimFailover(t *testing.T) {
	cfg := servertest.Config(t, "")
	cfg.LockDelay = -1 // no lock delay: the failover itself is the subject
	srv := servertest.Start(t, cfg)
	lc := lockClient(srv)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	obs, err := lc.Observe(ctx, connect.NewRequest(&beaconv1.ObserveLockRequest{Name: "leader", Heartbeat: durationpb.New(time.Second)}))
	if err != nil {
		t.Fatal(err)
	}
	defer obs.Close()
	next := func(want string) *beaconv1.LockState {
		t.Helper()
		for obs.Receive() {
			st := obs.Msg().GetLock()
			if string(st.GetHolder().GetValue()) == want {
				return st
			}
		}
		t.Fatalf("observe ended before the leader's value was %q: %v", want, obs.Err())
		return nil
	}
	next("") // no leader yet
	campaign := func(s int64, value string, wait time.Duration) (*beaconv1.AcquireLockResponse, error) {
		resp, err := lc.Acquire(ctx, connect.NewRequest(&beaconv1.AcquireLockRequest{Name: "leader", SessionId: s, Value: []byte(value), Wait: durationpb.New(wait)}))
		if err != nil {
			return nil, err
		}
		return resp.Msg, nil
	}
	s1, s2 := newSession(t, srv), newSession(t, srv)
	a1, err := campaign(s1, "10.0.0.1:80", 0)
	if err != nil || !a1.GetAcquired() {
		t.Fatal(a1, err)
	}
	next("10.0.0.1:80")
	won := make(chan *beaconv1.AcquireLockResponse, 1)
	go func() {
		r, _ := campaign(s2, "10.0.0.2:80", 50*time.Second)
		won <- r
	}()
	if _, err := lc.Proclaim(ctx, connect.NewRequest(&beaconv1.ProclaimRequest{Name: "leader", SessionId: s1, FencingToken: a1.GetFencingToken(), Value: []byte("10.0.0.1:81")})); err != nil {
		t.Fatal(err)
	}
	next("10.0.0.1:81")
	// A candidate that does not lead may not proclaim.
	_, err = lc.Proclaim(ctx, connect.NewRequest(&beaconv1.ProclaimRequest{Name: "leader", SessionId: s2, FencingToken: a1.GetFencingToken() + 1, Value: []byte("me")}))
	wantCode(t, err, connect.CodeFailedPrecondition, "does not hold")
	// The leader's session ends: the next candidate leads.
	if _, err := regClient(srv, "", connect.WithGRPC()).CloseSession(ctx, connect.NewRequest(&beaconv1.CloseSessionRequest{SessionId: s1})); err != nil {
		t.Fatal(err)
	}
	st := next("10.0.0.2:80")
	if r := <-won; !r.GetAcquired() || st.GetHolder().GetFencingToken() != r.GetFencingToken() || r.GetFencingToken() <= a1.GetFencingToken() {
		t.Fatalf("second campaign = %v, observed %v", r, st)
	}
}
