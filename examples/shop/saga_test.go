package main

import (
	"context"
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"

	"beacon.dev/beacon/client"
	"beacon.dev/beacon/examples/shop/shopkit"
	"beacon.dev/beacon/examples/shop/shoppb"
	"beacon.dev/beacon/internal/testutil"
	"beacon.dev/beacon/saga"
)

// The boundaries an order saga can be stopped at (ordersaga.go): before
// a participant call, after it returned but before it was recorded, and
// after it was recorded — forward, and on the way back (a declined
// charge compensates: refund, then release).
var (
	forwardBoundaries = []string{
		"before-reserve", "after-reserve", "recorded-reserve",
		"before-charge", "after-charge", "recorded-charge",
		"before-confirm", "after-confirm", "recorded-confirm",
	}
	compensationBoundaries = []string{
		"before-refund", "after-refund", "recorded-refund",
		"before-release", "after-release", "recorded-release",
	}
)

// sagaShop is a shop whose orders instances stop sagas at the boundaries
// their IDs ask for.
type sagaShop struct {
	t     *testing.T
	cl    *shopkit.Cluster
	store *saga.Store
	db    *db

	mu     sync.Mutex
	paused map[string]*shopkit.Proc // "ORDER at BOUNDARY" → the process paused there
	goneOn map[string]bool          // same keys: the process went on
	fenced int                      // late state writes refused by the fence
}

func startSagaShop(t *testing.T, ctx context.Context) *sagaShop {
	s := &sagaShop{t: t, paused: map[string]*shopkit.Proc{}, goneOn: map[string]bool{}}
	s.cl = newCluster(ctx, t, func(cl *shopkit.Cluster) {
		cl.RegistryArgs = []string{"--lock-delay=1s"}
		cl.OnLine = s.onLine
	})
	cl := s.cl
	if err := cl.StartDB(ctx); err != nil {
		t.Fatal(err)
	}
	for _, svc := range []string{"inventory", "inventory", "payments", "orders", "orders"} {
		args := []string{"--ttl", "2s"}
		switch svc {
		case "inventory":
			// Two instances deducting under the item's lock with fenced
			// writes (docs/locks.md): the stock stays exact across them.
			args = append(args, "--stock", strconv.Itoa(sagaStock), "--fenced-stock")
		case "orders":
			args = append(args, "--saga-pauses")
		}
		if _, err := cl.Start(ctx, svc, args...); err != nil {
			t.Fatal(err)
		}
	}
	observer, err := client.New([]string{cl.Registry})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { observer.Close() })
	if s.store, err = saga.NewStore(observer.KV(), sagaPrefix); err != nil {
		t.Fatal(err)
	}
	if s.db, err = openDB(cl.DB); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.db.Close() })
	return s
}

const sagaStock = 1_000_000

// onLine follows what the orders processes say about their sagas.
func (s *sagaShop) onLine(p *shopkit.Proc, line string) {
	if strings.Contains(line, "a newer leader of the shard owns the saga") {
		s.mu.Lock()
		s.fenced++
		s.mu.Unlock()
	}
	rest, ok := strings.CutPrefix(line, "shop: saga ")
	if !ok {
		return
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if id, at, ok := strings.Cut(rest, " paused at "); ok {
		s.paused[id+" at "+at] = p
	} else if id, at, ok := strings.Cut(rest, " goes on from "); ok {
		s.goneOn[id+" at "+at] = true
	}
}

// startOrders starts one more orders instance.
func (s *sagaShop) startOrders(ctx context.Context) {
	if _, err := s.cl.Start(ctx, "orders", "--ttl", "2s", "--saga-pauses"); err != nil {
		s.t.Fatal(err)
	}
}

// place sends an order to a live orders instance (chosen at random)
// without waiting for it, and sends it again, as a client would (it is
// idempotent by order ID), until it has an answer: the instance may be
// killed or frozen under the call.
func (s *sagaShop) place(ctx context.Context, wg *sync.WaitGroup, id, item string, amount int64) {
	wg.Go(func() {
		for ctx.Err() == nil {
			live := s.cl.Running("orders")
			p := live[rand.IntN(len(live))]
			cc, err := grpc.NewClient(p.Addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
			if err != nil {
				s.t.Error(err)
				return
			}
			cctx, cancel := context.WithTimeout(ctx, 20*time.Second)
			_, err = shoppb.NewOrdersClient(cc).PlaceOrder(cctx, &shoppb.PlaceOrderRequest{OrderId: id, Item: item, Quantity: 1, AmountCents: amount})
			cancel()
			cc.Close()
			if c := status.Code(err); c == codes.OK || c == codes.FailedPrecondition {
				return // placed, or undone
			}
		}
	})
}

// pauseAll starts one saga per boundary and waits until each has stopped
// there; it returns the processes they stopped in.
func (s *sagaShop) pauseAll(ctx context.Context, round string, wg *sync.WaitGroup) map[*shopkit.Proc][]string {
	var want []string
	for _, b := range forwardBoundaries {
		id := "pause-" + b + "-" + round
		s.place(ctx, wg, id, "widget", 100)
		want = append(want, id+" at "+b)
	}
	for _, b := range compensationBoundaries {
		id := "pause-" + b + "-" + round
		s.place(ctx, wg, id, "widget", 2*maxChargeCents) // declined: the saga compensates
		want = append(want, id+" at "+b)
	}
	testutil.Eventually(s.t, 2*time.Minute, "every saga of round "+round+" to stop at its boundary", func() bool {
		s.mu.Lock()
		defer s.mu.Unlock()
		for _, w := range want {
			if s.paused[w] == nil {
				return false
			}
		}
		return true
	})
	s.mu.Lock()
	defer s.mu.Unlock()
	by := map[*shopkit.Proc][]string{}
	for _, w := range want {
		by[s.paused[w]] = append(by[s.paused[w]], w)
	}
	return by
}

// waitFinished waits until every saga is finished and returns them; if
// they do not, the test's failure shows which are left and what the
// orders processes said.
func (s *sagaShop) waitFinished(ctx context.Context, n int) []saga.State {
	s.t.Helper()
	var all []saga.State
	var left []string
	defer func() {
		if s.t.Failed() {
			s.t.Logf("%d of %d sagas are there, %d unfinished:\n%s", len(all), n, len(left), strings.Join(left[:min(len(left), 10)], "\n"))
			for _, p := range s.cl.Running("orders") {
				s.t.Logf("%s output:\n%s", p.ID, p.Output())
			}
		}
	}()
	testutil.Eventually(s.t, 3*time.Minute, fmt.Sprintf("all %d sagas to finish", n), func() bool {
		var err error
		all, err = s.store.List(ctx, orderSagaName)
		left = left[:0]
		for _, st := range all {
			if !st.Status.Finished() {
				left = append(left, fmt.Sprintf("%s: %s at %s, history %+v", st.ID, st.Status, st.StepName(), st.History))
			}
		}
		return err == nil && len(all) >= n && len(left) == 0
	})
	return all
}

// An orders instance (the saga orchestrator) is SIGKILLed with a saga
// stopped at every step boundary at once, forward and compensating; then
// frozen (SIGSTOP) there past its session, and thawed (SIGCONT) once
// another instance has finished its sagas; then a few hundred orders run
// while an orchestrator is killed under them. Every saga ends done or
// compensated (none stuck, none left), and the stock, the charges, the
// refunds and the orders' states reconcile exactly with them.
func TestOrderSagasSurviveOrchestratorKillsAndFreezes(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	s := startSagaShop(t, ctx)
	var calls sync.WaitGroup
	defer calls.Wait()
	total := 0

	// Round 1: SIGKILL at every boundary.
	s.startOrders(ctx) // the instance that takes over
	for p, at := range s.pauseAll(ctx, "kill", &calls) {
		t.Logf("SIGKILL %s (%s), stopped at %d boundaries", p.ID, p.Addr, len(at))
		p.Kill()
	}
	total += len(forwardBoundaries) + len(compensationBoundaries)
	s.checkBoundaries(s.waitFinished(ctx, total), "kill")

	// Round 2: SIGSTOP at every boundary past the session's TTL, SIGCONT
	// after another instance finished the sagas: the thawed orchestrator's
	// late calls are refused by the participants' tombstones or are
	// repeats, and its late writes by the fence.
	s.startOrders(ctx)
	frozen := s.pauseAll(ctx, "freeze", &calls)
	for p, at := range frozen {
		t.Logf("SIGSTOP %s, stopped at %d boundaries", p.ID, len(at))
		if err := p.Signal(syscall.SIGSTOP); err != nil {
			t.Fatal(err)
		}
	}
	if len(s.cl.Running("orders")) == len(frozen) {
		s.startOrders(ctx)
	}
	total += len(forwardBoundaries) + len(compensationBoundaries)
	s.checkBoundaries(s.waitFinished(ctx, total), "freeze")
	for p, at := range frozen {
		if err := p.Signal(syscall.SIGCONT); err != nil {
			t.Fatal(err)
		}
		testutil.Eventually(t, time.Minute, "the thawed instance to go on from its boundaries", func() bool {
			s.mu.Lock()
			defer s.mu.Unlock()
			for _, w := range at {
				if !s.goneOn[w] {
					return false
				}
			}
			return true
		})
	}
	s.mu.Lock()
	// The thawed instance may notice its lost lead before it writes (its
	// lock's context ends) or be refused by the fence: both are safe, and
	// the count shows which happened.
	t.Logf("after the thaw, %d late saga writes were refused by the fence", s.fenced)
	s.mu.Unlock()

	// Round 3: a few hundred orders (one in ten declined), with an
	// orchestrator killed under them.
	for len(s.cl.Running("orders")) < 2 {
		s.startOrders(ctx)
	}
	// In waves of 50 (each item's stock is deducted under its lock, one
	// order at a time across the inventory instances).
	const bulk, wave = 300, 50
	for i := range bulk {
		amount := int64(100)
		if i%10 == 0 {
			amount = 2 * maxChargeCents
		}
		s.place(ctx, &calls, fmt.Sprintf("bulk-%d", i), items[i%len(items)], amount)
		if i == bulk/2 {
			victim := s.cl.Running("orders")[0]
			t.Logf("SIGKILL %s under load", victim.ID)
			victim.Kill()
			s.startOrders(ctx)
		}
		if i%wave == wave-1 {
			calls.Wait()
		}
	}
	total += bulk
	all := s.waitFinished(ctx, total)
	s.reconcile(ctx, all)
}

// checkBoundaries: a round's forward sagas are done, its declined ones
// compensated.
func (s *sagaShop) checkBoundaries(all []saga.State, round string) {
	s.t.Helper()
	got := map[string]saga.Status{}
	for _, st := range all {
		got[st.ID] = st.Status
	}
	for _, b := range forwardBoundaries {
		if id := "pause-" + b + "-" + round; got[id] != saga.Done {
			s.t.Errorf("%s: %s, want done", id, got[id])
		}
	}
	for _, b := range compensationBoundaries {
		if id := "pause-" + b + "-" + round; got[id] != saga.Compensated {
			s.t.Errorf("%s: %s, want compensated", id, got[id])
		}
	}
}

// reconcile checks every saga against the participants' records: a done
// order has its reservation, its charge and its confirmation; a
// compensated one has none of them (a tombstone at most); the stock is
// what the done orders took.
func (s *sagaShop) reconcile(ctx context.Context, all []saga.State) {
	t := s.t
	get := func(k string) string {
		r, err := s.db.cli.Get(ctx, k)
		if err != nil {
			t.Fatal(err)
		}
		if len(r.Kvs) == 0 {
			return ""
		}
		return string(r.Kvs[0].Value)
	}
	done, compensated := 0, 0
	var charged int64
	taken := map[string]int{}
	for _, st := range all {
		res, ch, ord := get("/shop/reservations/"+st.ID), get("/shop/charges/"+st.ID), get("/shop/orders/"+st.ID)
		switch st.Status {
		case saga.Done:
			done++
			n, err := strconv.ParseInt(ch, 10, 64)
			if _, rerr := strconv.Atoi(res); rerr != nil || err != nil || ord != "confirmed" {
				t.Errorf("done order %s: reservation %q, charge %q, order %q; want reserved, charged, confirmed", st.ID, res, ch, ord)
			}
			charged += n
			var in orderInput
			if err := json.Unmarshal(st.Input, &in); err != nil {
				t.Fatal(err)
			}
			taken[in.Item] += int(in.Quantity)
		case saga.Compensated:
			compensated++
			if res != "" && res != releasedMark || ch != "" && ch != refundedMark || ord != "" && ord != "cancelled" {
				t.Errorf("compensated order %s: reservation %q, charge %q, order %q; want none (or tombstones)", st.ID, res, ch, ord)
			}
			if !strings.Contains(st.Error, "declined") {
				t.Errorf("compensated order %s: %q, want only declined orders compensated", st.ID, st.Error)
			}
		default:
			t.Errorf("order %s is %s: %s", st.ID, st.Status, st.Error)
		}
	}
	for _, item := range items {
		stock, _ := strconv.Atoi(get("/shop/stock/" + item))
		if stock != sagaStock-taken[item] {
			t.Errorf("%s: stock = %d, want %d: done orders took %d", item, stock, sagaStock-taken[item], taken[item])
		}
	}
	if charged != int64(done)*100 {
		t.Errorf("charged %d cents, want %d", charged, done*100)
	}
	t.Logf("%d sagas: %d done, %d compensated; stock and charges reconcile", len(all), done, compensated)
}
