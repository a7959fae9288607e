// Package backendtest is the conformance suite every backend passes: the
// same registrations, expiries, watches and bad input give the same
// results on a beacon server, in memory, on etcd and on Consul.
package backendtest

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"slices"
	"strings"
	"testing"
	"time"

	"beacon.dev/beacon/backend"
	"beacon.dev/beacon/registry"
	"beacon.dev/beacon/session"
)

// Harness builds fresh backends for the suite.
type Harness struct {
	// New returns an empty backend; the suite closes it.
	New func(t *testing.T) backend.Backend
	// TTL is the session TTL the suite uses (the backend's minimum is fine).
	TTL time.Duration
	// Expire, when set, ends a session's lease behind its back, as the
	// registry does when the TTL runs out (the cases that need it are
	// skipped without it).
	Expire func(t *testing.T, b backend.Backend, sessionID int64)
	// Freeze, when set, makes the registry b talks to stop answering while
	// still accepting what is sent (a gray failure: a hung process, a
	// stalled disk) until thaw is called (the case is skipped without it).
	Freeze func(t *testing.T, b backend.Backend) (thaw func())
}

// Run runs the suite.
func Run(t *testing.T, h Harness) {
	if h.TTL == 0 {
		h.TTL = 2 * time.Second
	}
	for _, tc := range []struct {
		name string
		f    func(*testing.T, backend.Backend, Harness)
	}{
		{"RegisterListDeregister", registerListDeregister},
		{"SessionCloseRemovesAtOnce", sessionCloseRemovesAtOnce},
		{"SessionExpiresWhenItsOwnerIsGone", sessionExpires},
		{"WatchConverges", watchConverges},
		{"BadInputIsRefusedAndChangesNothing", badInput},
		{"LostSessionIsReplacedAndACallbackMayRegister", lostSessionCallbackRegisters},
		{"SessionComesThroughARegistryThatHangs", registryHangs},
	} {
		t.Run(tc.name, func(t *testing.T) {
			b := h.New(t)
			defer b.Close()
			tc.f(t, b, h)
		})
	}
}

func ctxFor(t *testing.T, d time.Duration) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), d)
	t.Cleanup(cancel)
	return ctx
}

func eventually(t *testing.T, d time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(d)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %v waiting for %s", d, what)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func ids(s *registry.Snapshot) []string {
	var out []string
	for _, in := range s.Instances {
		out = append(out, in.ID)
	}
	return out
}

func list(ctx context.Context, t *testing.T, b backend.Backend, service string) []string {
	t.Helper()
	s, err := b.Instances(ctx, service)
	if err != nil {
		t.Fatalf("Instances(%s): %v", service, err)
	}
	return ids(s)
}

func registerListDeregister(t *testing.T, b backend.Backend, _ Harness) {
	ctx := ctxFor(t, 30*time.Second)
	in := registry.Instance{Service: "orders", ID: "o-1", Address: "127.0.0.1", Port: 9001, Weight: 7,
		Zone: "a", Version: "1.2", Tags: []string{"canary"}, Metadata: map[string]string{"team": "core"}}
	if _, err := b.Register(ctx, in); err != nil {
		t.Fatal(err)
	}
	s, err := b.Instances(ctx, "orders")
	if err != nil || len(s.Instances) != 1 {
		t.Fatalf("Instances = %v, %v", s, err)
	}
	got := s.Instances[0]
	if got.Address != in.Address || got.Port != in.Port || got.Weight != 7 || got.Zone != "a" || got.Version != "1.2" ||
		!slices.Equal(got.Tags, in.Tags) || got.Metadata["team"] != "core" || !got.Routable() || got.Ephemeral() {
		t.Errorf("stored %+v, registered %+v", got, in)
	}
	if s.Revision <= 0 {
		t.Errorf("snapshot revision %d", s.Revision)
	}
	found, err := b.Deregister(ctx, "orders", "o-1")
	if err != nil || !found {
		t.Fatalf("Deregister = %v, %v", found, err)
	}
	if found, err := b.Deregister(ctx, "orders", "o-1"); err != nil || found {
		t.Errorf("second Deregister = %v, %v; want not found", found, err)
	}
	if got := list(ctx, t, b, "orders"); len(got) != 0 {
		t.Errorf("after Deregister: %v", got)
	}
}

// closedSessionTTL is long enough that an instance leaving within the
// waits below can only be the revoke's doing, never an expiry.
const closedSessionTTL = time.Hour

// livingSessionTTL is for sessions that must stay alive throughout a case:
// long enough that keepalives starved by a loaded machine cannot let them
// lapse.
const livingSessionTTL = time.Minute

func sessionCloseRemovesAtOnce(t *testing.T, b backend.Backend, h Harness) {
	ctx := ctxFor(t, 90*time.Second)
	s, err := b.NewSession(ctx, session.WithTTL(closedSessionTTL))
	if err != nil {
		t.Fatal(err)
	}
	for i := range 2 {
		if _, err := s.Register(ctx, registry.Instance{Service: "orders", ID: fmt.Sprint("e-", i), Address: "127.0.0.1", Port: 9000 + i}); err != nil {
			t.Fatal(err)
		}
	}
	if got := list(ctx, t, b, "orders"); len(got) != 2 {
		t.Fatalf("registered %v", got)
	}
	if err := s.Close(ctx); err != nil {
		t.Fatal(err)
	}
	select {
	case <-s.Done():
	default:
		t.Error("Done is not closed after Close")
	}
	eventually(t, 30*time.Second, "a closed session's instances are gone (revoked: the TTL is an hour)", func() bool {
		return len(list(ctx, t, b, "orders")) == 0
	})
}

func sessionExpires(t *testing.T, b backend.Backend, h Harness) {
	ctx := ctxFor(t, 3*time.Minute)
	// No lease of the dying session (its first, or a replacement if it
	// lapsed under load) can be granted before granted, so none can expire
	// before granted + TTL: a lower bound that load cannot break.
	granted := time.Now()
	dying, err := b.NewSession(ctx, session.WithTTL(h.TTL))
	if err != nil {
		t.Fatal(err)
	}
	living, err := b.NewSession(ctx, session.WithTTL(livingSessionTTL))
	if err != nil {
		t.Fatal(err)
	}
	defer living.Close(ctx)
	if _, err := dying.Register(ctx, registry.Instance{Service: "orders", ID: "dying", Address: "127.0.0.1", Port: 9001}); err != nil {
		t.Fatal(err)
	}
	if _, err := living.Register(ctx, registry.Instance{Service: "orders", ID: "living", Address: "127.0.0.1", Port: 9002}); err != nil {
		t.Fatal(err)
	}
	// The owner goes without telling the registry, as a crashed process does.
	gone, cancel := context.WithCancel(ctx)
	cancel()
	_ = dying.Close(gone)
	livingID := living.ID()
	eventually(t, 2*h.TTL+30*time.Second, "the dead owner's instance expires", func() bool {
		return slices.Equal(list(ctx, t, b, "orders"), []string{"living"})
	})
	if d, ttl := time.Since(granted), dying.TTL(); d < ttl-100*time.Millisecond {
		t.Errorf("expired %v after the lease was asked for, before its TTL %v", d, ttl)
	}
	// The dying session's expiry takes nothing else with it: past its TTL
	// again, the living session's instance is listed, on the same lease.
	time.Sleep(h.TTL + h.TTL/2)
	if got := list(ctx, t, b, "orders"); !slices.Equal(got, []string{"living"}) {
		t.Errorf("a live session's instance: %v", got)
	}
	if id := living.ID(); id != livingID {
		t.Errorf("the living session's lease changed from %d to %d: it lapsed", livingID, id)
	}
}

func watchConverges(t *testing.T, b backend.Backend, h Harness) {
	ctx := ctxFor(t, 3*time.Minute)
	services := []string{"alpha", "beta"}
	st, err := b.Watch(ctx, services)
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	select {
	case <-st.Synced():
	case <-ctx.Done():
		t.Fatal("the watch never synced")
	}
	// Follow it as the discovery cache does, checking revisions only grow.
	revs := map[string]int64{}
	stopped := make(chan struct{})
	var bad error
	go func() {
		defer close(stopped)
		for {
			snaps, err := st.Next(ctx)
			if err != nil {
				return
			}
			for _, s := range snaps {
				if s.Revision < revs[s.Service] && bad == nil {
					bad = fmt.Errorf("%s went back from revision %d to %d", s.Service, revs[s.Service], s.Revision)
				}
				revs[s.Service] = s.Revision
			}
		}
	}()
	// The session must not lapse (its instances would leave and come back
	// behind the listing the watch is compared with).
	sess, err := b.NewSession(ctx, session.WithTTL(livingSessionTTL))
	if err != nil {
		t.Fatal(err)
	}
	defer sess.Close(ctx)
	rng := rand.New(rand.NewPCG(1, 2))
	for i := range 120 {
		svc := services[rng.IntN(2)]
		id := fmt.Sprint("i-", rng.IntN(12))
		in := registry.Instance{Service: svc, ID: id, Address: "127.0.0.1", Port: 1000 + i}
		switch rng.IntN(3) {
		case 0:
			_, err = b.Register(ctx, in)
		case 1:
			_, err = sess.Register(ctx, in)
		default:
			_, err = b.Deregister(ctx, svc, id)
		}
		if err != nil {
			t.Fatalf("op %d: %v", i, err)
		}
	}
	for _, svc := range services {
		want := list(ctx, t, b, svc)
		var got []string
		var rev int64
		converged := func() bool {
			s, ok := st.Snapshot(svc)
			if !ok {
				got, rev = nil, 0
				return len(want) == 0
			}
			got, rev = ids(s), s.Revision
			return slices.Equal(got, want)
		}
		const within = 60 * time.Second // liveness, not latency
		deadline := time.Now().Add(within)
		for !converged() {
			if time.Now().After(deadline) {
				t.Fatalf("after %v the watch holds %s = %v (revision %d), the registry lists %v", within, svc, got, rev, want)
			}
			time.Sleep(20 * time.Millisecond)
		}
	}
	st.Close()
	<-stopped
	if bad != nil {
		t.Error(bad)
	}
}

func badInput(t *testing.T, b backend.Backend, h Harness) {
	ctx := ctxFor(t, 30*time.Second)
	good := registry.Instance{Service: "orders", ID: "o-1", Address: "127.0.0.1", Port: 9001}
	if _, err := b.Register(ctx, good); err != nil {
		t.Fatal(err)
	}
	before, err := b.Instances(ctx, "orders")
	if err != nil || len(before.Instances) != 1 {
		t.Fatalf("Instances after Register: %v, %v", before, err)
	}
	sess, err := b.NewSession(ctx, session.WithTTL(h.TTL))
	if err != nil {
		t.Fatal(err)
	}
	defer sess.Close(ctx)
	for _, tc := range []struct {
		field string
		in    registry.Instance
	}{
		{"port", registry.Instance{Service: "orders", ID: "o-1", Address: "127.0.0.1", Port: 0}},
		{"service", registry.Instance{Service: "Orders!", ID: "o-1", Address: "127.0.0.1", Port: 1}},
		{"id", registry.Instance{Service: "orders", ID: "o 1", Address: "127.0.0.1", Port: 1}},
		{"address", registry.Instance{Service: "orders", ID: "o-1", Address: "not an address", Port: 1}},
		{"weight", registry.Instance{Service: "orders", ID: "o-1", Address: "127.0.0.1", Port: 1, Weight: 1 << 20}},
		{"tags", registry.Instance{Service: "orders", ID: "o-1", Address: "127.0.0.1", Port: 1, Tags: make([]string, registry.MaxTags+1)}},
	} {
		for name, reg := range map[string]func(context.Context, registry.Instance) (int64, error){"Register": b.Register, "Session.Register": sess.Register} {
			_, err := reg(ctx, tc.in)
			if !errors.Is(err, registry.ErrInvalid) || !strings.Contains(err.Error(), tc.field) {
				t.Errorf("%s with a bad %s: %v, want an invalid-argument error naming it", name, tc.field, err)
			}
		}
	}
	if _, err := b.NewSession(ctx, session.WithTTL(time.Millisecond)); !errors.Is(err, registry.ErrInvalid) {
		t.Errorf("NewSession(1ms): %v, want invalid", err)
	}
	after, err := b.Instances(ctx, "orders")
	if err != nil {
		t.Fatal(err)
	}
	if len(after.Instances) != 1 || after.Revision != before.Revision || after.Instances[0].Port != 9001 {
		t.Errorf("bad input changed the registry: before %+v, after %+v", before.Instances[0], after.Instances)
	}
}

// A session whose lease the registry ended is replaced with every instance
// registered again, and an event callback that registers (on the Expired
// event, while the replacement runs) neither deadlocks nor is lost.
func lostSessionCallbackRegisters(t *testing.T, b backend.Backend, h Harness) {
	if h.Expire == nil {
		t.Skip("the harness cannot end a lease behind the session's back")
	}
	ctx := ctxFor(t, 60*time.Second)
	var s *backend.Session
	ready := make(chan struct{})
	cbErr := make(chan error, 1)
	s, err := b.NewSession(ctx, session.WithTTL(h.TTL), session.WithEvents(func(ev session.Event) {
		<-ready
		if ev.Kind == session.Expired {
			_, err := s.Register(ctx, registry.Instance{Service: "orders", ID: "from-callback", Address: "127.0.0.1", Port: 9002})
			select {
			case cbErr <- err:
			default:
			}
		}
	}))
	if err != nil {
		t.Fatal(err)
	}
	close(ready)
	defer s.Close(ctx)
	if _, err := s.Register(ctx, registry.Instance{Service: "orders", ID: "kept", Address: "127.0.0.1", Port: 9001}); err != nil {
		t.Fatal(err)
	}
	old := s.ID()
	h.Expire(t, b, old)
	select {
	case err := <-cbErr:
		if err != nil {
			t.Fatalf("Register from the Expired callback: %v", err)
		}
	case <-ctx.Done():
		t.Fatal("the Expired callback's Register never returned")
	}
	eventually(t, 30*time.Second, "both instances registered under the new session", func() bool {
		return s.ID() != old && slices.Equal(list(ctx, t, b, "orders"), []string{"from-callback", "kept"})
	})
}

// registryHangs: while the registry accepts but does not answer, a call
// returns by its own deadline instead of hanging with it; once it answers
// again (after longer than the TTL, so the lease may be gone), the session
// has its instance listed again and takes new registrations, with nothing
// done by its owner.
func registryHangs(t *testing.T, b backend.Backend, h Harness) {
	if h.Freeze == nil {
		t.Skip("the harness cannot freeze the registry")
	}
	ctx := ctxFor(t, 120*time.Second)
	s, err := b.NewSession(ctx, session.WithTTL(h.TTL))
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close(ctx)
	if _, err := s.Register(ctx, registry.Instance{Service: "orders", ID: "g-1", Address: "127.0.0.1", Port: 9001}); err != nil {
		t.Fatal(err)
	}
	thaw := h.Freeze(t, b)
	thawed := false
	defer func() {
		if !thawed {
			thaw()
		}
	}()
	callCtx, cancel := context.WithTimeout(ctx, h.TTL/2)
	returned := make(chan error, 1)
	go func() {
		_, err := b.Register(callCtx, registry.Instance{Service: "orders", ID: "during", Address: "127.0.0.1", Port: 9003})
		returned <- err
	}()
	select {
	case <-returned: // an error, or even success if the write got through: either way it returned
	case <-time.After(60 * time.Second):
		t.Fatal("a Register with a deadline hung with the registry")
	}
	cancel()
	time.Sleep(2 * h.TTL) // the registry hangs for longer than the TTL
	thaw()
	thawed = true
	eventually(t, 60*time.Second, "the session's instance listed once the registry answers", func() bool {
		got, err := b.Instances(ctx, "orders")
		return err == nil && slices.Contains(ids(got), "g-1")
	})
	if _, err := s.Register(ctx, registry.Instance{Service: "orders", ID: "g-2", Address: "127.0.0.1", Port: 9002}); err != nil {
		t.Fatalf("Register after the hang: %v", err)
	}
	eventually(t, 30*time.Second, "the new registration listed", func() bool {
		got, err := b.Instances(ctx, "orders")
		return err == nil && slices.Contains(ids(got), "g-1") && slices.Contains(ids(got), "g-2")
	})
	select {
	case <-s.Done():
		t.Fatalf("the session ended: %v", s.Err())
	default:
	}
}
