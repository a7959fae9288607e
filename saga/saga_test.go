package saga_test

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	promtest "github.com/prometheus/client_golang/prometheus/testutil"
	"go.opentelemetry.io/otel/trace"
	"go.uber.org/goleak"

	"beacon.dev/beacon/client"
	"beacon.dev/beacon/internal/testutil"
	"beacon.dev/beacon/saga"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m, testutil.LeakOptions()...) }

// calls records what the steps were asked to do, in order.
type calls struct {
	mu   sync.Mutex
	list []string
}

func (c *calls) add(s string) {
	c.mu.Lock()
	c.list = append(c.list, s)
	c.mu.Unlock()
}

func (c *calls) get() []string {
	c.mu.Lock()
	defer c.mu.Unlock()
	return slices.Clone(c.list)
}

// step is a step that records its action and compensation; fail says
// whether an attempt of the action fails.
func step(name string, log *calls, fail func(r saga.Run) error) saga.Step {
	return saga.Step{
		Name: name,
		Action: func(ctx context.Context, r saga.Run) ([]byte, error) {
			log.add(name + " " + r.Key)
			if fail != nil {
				if err := fail(r); err != nil {
					return nil, err
				}
			}
			return []byte(name + "-out"), nil
		},
		Compensate: func(ctx context.Context, r saga.Run) error {
			log.add("undo " + name + " " + r.Key)
			return nil
		},
	}
}

type env struct {
	srv *testutil.Node
	c   *client.Client
}

func newEnv(t *testing.T) *env {
	t.Helper()
	srv := testutil.StartBeacon(t, "--lock-delay=-1s")
	c, err := client.New([]string{srv.Addr()})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return &env{srv: srv, c: c}
}

// run starts an orchestrator on its own session, waits until it leads a
// shard, and stops it when the test ends; stop stops it earlier.
func (e *env) run(t *testing.T, cfg saga.Config, defs ...saga.Definition) (o *saga.Orchestrator, sess *client.Session, stop func()) {
	t.Helper()
	o, sess, stop = e.start(t, cfg, defs...)
	testutil.Eventually(t, time.Minute, "the orchestrator to lead its shards", func() bool { return o.Stats().Leading > 0 })
	return o, sess, stop
}

// start is run without waiting for a lead (a second orchestrator waits in
// line).
func (e *env) start(t *testing.T, cfg saga.Config, defs ...saga.Definition) (o *saga.Orchestrator, sess *client.Session, stop func()) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	sess, err := e.c.NewSession(ctx, client.WithTTL(3*time.Second))
	if err != nil {
		t.Fatal(err)
	}
	cfg.Client, cfg.Session = e.c, sess
	o, err = saga.New(cfg, defs...)
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- o.Run(ctx) }()
	var once sync.Once
	stop = func() {
		once.Do(func() {
			cancel()
			err := <-done
			select {
			case <-sess.Done(): // lost on purpose: Run says so
			default:
				if err != nil {
					t.Errorf("Run = %v", err)
				}
			}
			sess.Close(context.Background())
		})
	}
	t.Cleanup(stop)
	return o, sess, stop
}

func TestStepsRunInOrderAndPassTheirOutputs(t *testing.T) {
	e := newEnv(t)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	var log calls
	var transitions []string
	var tmu sync.Mutex
	var outputsSeen []string
	def := saga.Definition{Name: "order", Steps: []saga.Step{
		step("reserve", &log, nil),
		step("charge", &log, func(r saga.Run) error {
			tmu.Lock()
			outputsSeen = append(outputsSeen, string(r.Outputs["reserve"]))
			tmu.Unlock()
			return nil
		}),
		step("confirm", &log, nil),
	}}
	o, _, _ := e.run(t, saga.Config{OnTransition: func(st saga.State) {
		tmu.Lock()
		transitions = append(transitions, fmt.Sprintf("%s@%d", st.Status, st.Step))
		tmu.Unlock()
	}}, def)
	if _, err := o.Start(ctx, "order", "o-1", []byte(`{"item":"widget"}`)); err != nil {
		t.Fatal(err)
	}
	st, err := o.Wait(ctx, "order", "o-1")
	if err != nil {
		t.Fatal(err)
	}
	if st.Status != saga.Done || string(st.Outputs["charge"]) != "charge-out" || string(st.Input) != `{"item":"widget"}` {
		t.Fatalf("state = %+v, want done with charge's output and the input", st)
	}
	want := []string{"reserve order/o-1/reserve", "charge order/o-1/charge", "confirm order/o-1/confirm"}
	if got := log.get(); !slices.Equal(got, want) {
		t.Fatalf("calls = %q, want %q", got, want)
	}
	// Wait can see the last write (through the watch) before its writer
	// has its answer and reports it.
	testutil.Eventually(t, time.Minute, "the last transition to be reported", func() bool {
		tmu.Lock()
		defer tmu.Unlock()
		return len(transitions) == 3
	})
	tmu.Lock()
	if !slices.Equal(outputsSeen, []string{"reserve-out"}) {
		t.Errorf("charge saw outputs %q, want reserve's", outputsSeen)
	}
	if want := []string{"running@1", "running@2", "done@3"}; !slices.Equal(transitions, want) {
		t.Errorf("transitions = %q, want %q (one write per step)", transitions, want)
	}
	tmu.Unlock()
	// The stored state is what Wait returned; the store reads it back.
	got, err := o.Store().Get(ctx, "order", "o-1")
	if err != nil || got.Status != saga.Done || got.Revision != st.Revision {
		t.Fatalf("Get = %+v, %v; want the done state at revision %d", got, err, st.Revision)
	}
	whats := []string{}
	for _, h := range got.History {
		whats = append(whats, h.Step+":"+h.What)
	}
	if want := []string{":started", "reserve:done", "charge:done", "confirm:done"}; !slices.Equal(whats, want) {
		t.Errorf("history = %q, want %q", whats, want)
	}
	if s := o.Stats(); s.Started != 1 || s.Steps != 3 || s.Done != 1 || s.Compensations != 0 {
		t.Errorf("stats = %+v, want 1 started, 3 steps, 1 done", s)
	}
	reg := prometheus.NewPedanticRegistry()
	reg.MustRegister(o)
	if err := promtest.GatherAndCompare(reg, strings.NewReader(`
# HELP beacon_saga_finished_total Sagas this orchestrator finished, by how.
# TYPE beacon_saga_finished_total counter
beacon_saga_finished_total{prefix="sagas/",status="compensated"} 0
beacon_saga_finished_total{prefix="sagas/",status="done"} 1
beacon_saga_finished_total{prefix="sagas/",status="stuck"} 0
# HELP beacon_saga_steps_total Actions this orchestrator recorded done.
# TYPE beacon_saga_steps_total counter
beacon_saga_steps_total{prefix="sagas/"} 3
`), "beacon_saga_finished_total", "beacon_saga_steps_total"); err != nil {
		t.Error(err)
	}
}

func TestAFailedStepIsCompensatedBackwards(t *testing.T) {
	e := newEnv(t)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	var log calls
	declined := errors.New("card declined")
	noUndo := step("notify", &log, nil)
	noUndo.Compensate = nil
	def := saga.Definition{Name: "order", Steps: []saga.Step{
		step("reserve", &log, nil),
		noUndo,
		step("charge", &log, func(r saga.Run) error { return saga.Permanent(declined) }),
		step("confirm", &log, nil),
	}}
	o, _, _ := e.run(t, saga.Config{}, def)
	if _, err := o.Start(ctx, "order", "o-2", nil); err != nil {
		t.Fatal(err)
	}
	st, err := o.Wait(ctx, "order", "o-2")
	if err != nil {
		t.Fatal(err)
	}
	if st.Status != saga.Compensated || !strings.Contains(st.Error, "charge") || !strings.Contains(st.Error, "card declined") {
		t.Fatalf("state = %s (%q), want compensated, naming the step and its error", st.Status, st.Error)
	}
	// The failed step's own compensation runs (its action may have
	// landed); a step without one is passed over; confirm never ran.
	want := []string{
		"reserve order/o-2/reserve", "notify order/o-2/notify", "charge order/o-2/charge",
		"undo charge order/o-2/charge/compensate", "undo reserve order/o-2/reserve/compensate",
	}
	if got := log.get(); !slices.Equal(got, want) {
		t.Fatalf("calls = %q, want %q", got, want)
	}
}

func TestRetriesThenTimeout(t *testing.T) {
	e := newEnv(t)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	var log calls
	flaky := 0
	def := saga.Definition{Name: "flaky", Steps: []saga.Step{
		step("a", &log, func(r saga.Run) error {
			if flaky++; flaky < 3 {
				return errors.New("unavailable")
			}
			return nil
		}),
	}}
	def.Steps[0].MaxAttempts = 3
	// A step that never answers: the saga's timeout ends it, and it
	// compensates.
	hang := saga.Definition{Name: "hang", Timeout: 500 * time.Millisecond, Steps: []saga.Step{
		step("a", &log, nil),
		{Name: "b", Action: func(ctx context.Context, r saga.Run) ([]byte, error) {
			<-ctx.Done()
			return nil, ctx.Err()
		}, Compensate: func(context.Context, saga.Run) error { log.add("undo b"); return nil }},
	}}
	o, _, _ := e.run(t, saga.Config{}, def, hang)
	if _, err := o.Start(ctx, "flaky", "f-1", nil); err != nil {
		t.Fatal(err)
	}
	if _, err := o.Start(ctx, "hang", "h-1", nil); err != nil {
		t.Fatal(err)
	}
	st, err := o.Wait(ctx, "flaky", "f-1")
	if err != nil {
		t.Fatal(err)
	}
	if st.Status != saga.Done || st.History[1].Attempts != 3 {
		t.Fatalf("flaky: %s after %d attempts, want done after 3", st.Status, st.History[1].Attempts)
	}
	st, err = o.Wait(ctx, "hang", "h-1")
	if err != nil {
		t.Fatal(err)
	}
	if st.Status != saga.Compensated || !strings.Contains(st.Error, "deadline") {
		t.Fatalf("hang: %s (%q), want compensated after its deadline", st.Status, st.Error)
	}
	if got := log.get(); !slices.Contains(got, "undo b") || !slices.Contains(got, "undo a hang/h-1/a/compensate") {
		t.Fatalf("calls = %q, want both of hang's steps undone", got)
	}
}

func TestStuckSagaIsRetriedByAnOperator(t *testing.T) {
	e := newEnv(t)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	var mu sync.Mutex
	refundWorks := false
	def := saga.Definition{Name: "pay", Steps: []saga.Step{
		{Name: "charge", Action: func(context.Context, saga.Run) ([]byte, error) { return nil, nil },
			Compensate: func(context.Context, saga.Run) error {
				mu.Lock()
				defer mu.Unlock()
				if !refundWorks {
					return errors.New("refunds are down")
				}
				return nil
			}},
		{Name: "ship", Action: func(context.Context, saga.Run) ([]byte, error) { return nil, saga.Permanent(errors.New("no courier")) }},
	}}
	o, _, _ := e.run(t, saga.Config{CompensationAttempts: 2}, def)
	if _, err := o.Start(ctx, "pay", "p-1", nil); err != nil {
		t.Fatal(err)
	}
	st, err := o.Wait(ctx, "pay", "p-1")
	if err != nil {
		t.Fatal(err)
	}
	if st.Status != saga.Stuck || !strings.Contains(st.Error, "refunds are down") || st.StepName() != "charge" {
		t.Fatalf("state = %s at %q (%q), want stuck at charge naming the refund's error", st.Status, st.StepName(), st.Error)
	}
	store := o.Store()
	// Bad requests change nothing and say why.
	if _, err := store.Retry(ctx, "pay", "nope"); !errors.Is(err, saga.ErrNotFound) || !strings.Contains(err.Error(), "pay/nope") {
		t.Fatalf("retry of an unknown saga = %v, want ErrNotFound naming it", err)
	}
	if _, err := store.Get(ctx, "pay", "bad id"); !errors.Is(err, saga.ErrInvalid) || !strings.Contains(err.Error(), "id") {
		t.Fatalf("get with a bad id = %v, want ErrInvalid naming the field", err)
	}
	mu.Lock()
	refundWorks = true
	mu.Unlock()
	if _, err := store.Retry(ctx, "pay", "p-1"); err != nil {
		t.Fatal(err)
	}
	testutil.Eventually(t, time.Minute, "the retried saga to be compensated", func() bool {
		st, err := store.Get(ctx, "pay", "p-1")
		return err == nil && st.Status == saga.Compensated
	})
	st, _ = store.Get(ctx, "pay", "p-1")
	if st.Retries != 1 {
		t.Errorf("retries = %d, want 1", st.Retries)
	}
	if _, err := store.Retry(ctx, "pay", "p-1"); !errors.Is(err, saga.ErrInvalid) || !strings.Contains(err.Error(), "compensated") {
		t.Fatalf("retry of a compensated saga = %v, want ErrInvalid saying it is compensated", err)
	}
	list, err := store.List(ctx, "")
	if err != nil || len(list) != 1 || list[0].ID != "p-1" {
		t.Fatalf("List = %v, %v; want p-1", list, err)
	}
}

func TestStartRefusesBadInputAndRepeatsSafely(t *testing.T) {
	e := newEnv(t)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	var log calls
	def := saga.Definition{Name: "order", Steps: []saga.Step{step("a", &log, nil)}}
	o, _, _ := e.run(t, saga.Config{MaxInputBytes: 16}, def)
	for _, tc := range []struct {
		name, saga, id string
		input          []byte
		want           string
	}{
		{"unknown saga", "refund", "x", nil, `no saga named "refund"`},
		{"empty id", "order", "", nil, "id"},
		{"id with a slash", "order", "a/b", nil, "id"},
		{"long id", "order", strings.Repeat("x", 129), nil, "1-128"},
		{"large input", "order", "x", make([]byte, 17), "MaxInputBytes"},
	} {
		if _, err := o.Start(ctx, tc.saga, tc.id, tc.input); !errors.Is(err, saga.ErrInvalid) || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: Start = %v, want ErrInvalid naming %q", tc.name, err, tc.want)
		}
	}
	if list, _ := o.Store().List(ctx, ""); len(list) != 0 {
		t.Fatalf("refused starts left %d sagas", len(list))
	}
	if _, err := o.Start(ctx, "order", "o-1", []byte("one")); err != nil {
		t.Fatal(err)
	}
	if _, err := o.Wait(ctx, "order", "o-1"); err != nil {
		t.Fatal(err)
	}
	again, err := o.Start(ctx, "order", "o-1", []byte("one"))
	if err != nil || again.Status != saga.Done {
		t.Fatalf("Start again with the same input = %s, %v; want the saga as it is (done)", again.Status, err)
	}
	if _, err := o.Start(ctx, "order", "o-1", []byte("two")); !errors.Is(err, saga.ErrExists) {
		t.Fatalf("Start again with another input = %v, want ErrExists", err)
	}
	if n := len(log.get()); n != 1 {
		t.Fatalf("the action ran %d times, want once", n)
	}
	for _, bad := range []saga.Definition{
		{Name: "x"},
		{Name: "x", Steps: []saga.Step{{Name: "a"}}},
		{Name: "x", Steps: []saga.Step{step("a", &log, nil), step("a", &log, nil)}},
		{Name: "x y", Steps: []saga.Step{step("a", &log, nil)}},
	} {
		if _, err := saga.New(saga.Config{Client: e.c, Session: &client.Session{}}, bad); !errors.Is(err, saga.ErrInvalid) {
			t.Errorf("New(%+v) = %v, want ErrInvalid", bad.Name, err)
		}
	}
}

// An orchestrator whose session is lost stops moving its sagas; another
// takes the shards and finishes them from the last recorded step, the
// interrupted step again with the same idempotency key.
func TestAnotherOrchestratorTakesOverALostOnesSagas(t *testing.T) {
	e := newEnv(t)
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	var log calls
	entered := make(chan struct{}, 1)
	first := true
	var fmu sync.Mutex
	def := saga.Definition{Name: "order", Steps: []saga.Step{
		step("reserve", &log, nil),
		{Name: "charge", Action: func(ctx context.Context, r saga.Run) ([]byte, error) {
			log.add("charge " + r.Key)
			fmu.Lock()
			hang := first
			first = false
			fmu.Unlock()
			if hang { // the first orchestrator hangs here until it loses its lead
				entered <- struct{}{}
				<-ctx.Done()
				return nil, ctx.Err()
			}
			return []byte("ch-1"), nil
		}},
		step("confirm", &log, nil),
	}}
	a, aSess, _ := e.run(t, saga.Config{Shards: 2}, def)
	if _, err := a.Start(ctx, "order", "o-1", nil); err != nil {
		t.Fatal(err)
	}
	<-entered
	b, _, _ := e.start(t, saga.Config{Shards: 2}, def)
	if err := aSess.Close(ctx); err != nil { // lost, not released: as if the process died
		t.Fatal(err)
	}
	st, err := b.Wait(ctx, "order", "o-1")
	if err != nil {
		t.Fatal(err)
	}
	if st.Status != saga.Done || string(st.Outputs["charge"]) != "ch-1" {
		t.Fatalf("state = %+v, want done with the second charge's output", st)
	}
	want := []string{"reserve order/o-1/reserve", "charge order/o-1/charge", "charge order/o-1/charge", "confirm order/o-1/confirm"}
	if got := log.get(); !slices.Equal(got, want) {
		t.Fatalf("calls = %q, want %q: reserve once, charge again by the new leader", got, want)
	}
	testutil.Eventually(t, time.Minute, "the new leader to count its 2 steps", func() bool { s := b.Stats(); return s.Steps == 2 && s.Done == 1 })
	if s := b.Stats(); s.Leading != 2 {
		t.Errorf("new leader's stats = %+v, want 2 shards led", s)
	}
}

// A saga's steps continue the trace of the call that started it, even
// when another process moves it.
func TestStepsContinueTheStartersTrace(t *testing.T) {
	e := newEnv(t)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	seen := make(chan trace.TraceID, 1)
	def := saga.Definition{Name: "traced", Steps: []saga.Step{{Name: "a", Action: func(ctx context.Context, r saga.Run) ([]byte, error) {
		seen <- trace.SpanContextFromContext(ctx).TraceID()
		return nil, nil
	}}}}
	o, _, _ := e.run(t, saga.Config{}, def)
	sc := trace.NewSpanContext(trace.SpanContextConfig{TraceID: trace.TraceID{1, 2, 3}, SpanID: trace.SpanID{4, 5}, TraceFlags: trace.FlagsSampled})
	if _, err := o.Start(trace.ContextWithSpanContext(ctx, sc), "traced", "t-1", nil); err != nil {
		t.Fatal(err)
	}
	if got := <-seen; got != sc.TraceID() {
		t.Fatalf("the step ran in trace %s, want the starter's %s", got, sc.TraceID())
	}
}

// Orchestrators of one prefix must split it into the same shards: one
// with another count refuses to run, saying why.
func TestOrchestratorsMustAgreeOnTheShards(t *testing.T) {
	e := newEnv(t)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	var log calls
	def := saga.Definition{Name: "order", Steps: []saga.Step{step("a", &log, nil)}}
	e.run(t, saga.Config{Shards: 8}, def)
	sess, err := e.c.NewSession(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer sess.Close(ctx)
	o, err := saga.New(saga.Config{Client: e.c, Session: sess, Shards: 4}, def)
	if err != nil {
		t.Fatal(err)
	}
	if err := o.Run(ctx); !errors.Is(err, saga.ErrInvalid) || !strings.Contains(err.Error(), "8 shards") || !strings.Contains(err.Error(), "Config.Shards 4") {
		t.Fatalf("Run with another shard count = %v, want ErrInvalid naming both counts", err)
	}
}

// Finished sagas are removed after KeepFinished — but a stuck one stays
// for its operator.
func TestStuckSagasOutliveKeepFinished(t *testing.T) {
	e := newEnv(t)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	ok := saga.Definition{Name: "ok", Steps: []saga.Step{noop("a")}}
	stuck := saga.Definition{Name: "stuck", Steps: []saga.Step{
		{Name: "a", Action: func(context.Context, saga.Run) ([]byte, error) { return nil, nil },
			Compensate: func(context.Context, saga.Run) error { return errors.New("cannot undo") }},
		{Name: "b", Action: func(context.Context, saga.Run) ([]byte, error) { return nil, saga.Permanent(errors.New("no")) }},
	}}
	o, _, _ := e.run(t, saga.Config{KeepFinished: time.Millisecond, CompensationAttempts: 1}, ok, stuck)
	for _, name := range []string{"ok", "stuck"} {
		if _, err := o.Start(ctx, name, "x", nil); err != nil {
			t.Fatal(err)
		}
	}
	testutil.Eventually(t, time.Minute, "the done saga to be removed", func() bool {
		_, err := o.Store().Get(ctx, "ok", "x")
		return errors.Is(err, saga.ErrNotFound)
	})
	if st, err := o.Store().Get(ctx, "stuck", "x"); err != nil || st.Status != saga.Stuck {
		t.Fatalf("the stuck saga = %s, %v; want it kept, stuck", st.Status, err)
	}
}

// A state the store refuses for good (here: larger than the server's
// --max-kv-value-bytes) makes the saga stuck, saying why, from its last
// recorded state — not a mover retrying for ever.
func TestAStateTheStoreRefusesMakesTheSagaStuck(t *testing.T) {
	srv := testutil.StartBeacon(t, "--lock-delay=-1s", "--max-kv-value-bytes=4096")
	c, err := client.New([]string{srv.Addr()})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	e := &env{srv: srv, c: c}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	def := saga.Definition{Name: "big", Steps: []saga.Step{
		{Name: "a", Action: func(context.Context, saga.Run) ([]byte, error) { return make([]byte, 6000), nil }},
	}}
	o, _, _ := e.run(t, saga.Config{}, def)
	if _, err := o.Start(ctx, "big", "x", nil); err != nil {
		t.Fatal(err)
	}
	st, err := o.Wait(ctx, "big", "x")
	if err != nil {
		t.Fatal(err)
	}
	if st.Status != saga.Stuck || !strings.Contains(st.Error, "recording step a") || len(st.Outputs["a"]) != 0 {
		t.Fatalf("state = %s (%q), want stuck, saying the step could not be recorded, without its output", st.Status, st.Error)
	}
}

// A saga started by another version of its definition (other steps) is
// left alone — not marked stuck, not spun on — and moved by an
// orchestrator that has its steps.
func TestASagaOfAnotherDefinitionVersionIsLeftForIt(t *testing.T) {
	e := newEnv(t)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	var log calls
	v1 := saga.Definition{Name: "order", Steps: []saga.Step{step("reserve", &log, nil), step("charge", &log, nil)}}
	v2 := saga.Definition{Name: "order", Steps: []saga.Step{step("reserve", &log, nil), step("check", &log, nil), step("charge", &log, nil)}}
	// v1's saga, started by a process that does not run (yet).
	sess, err := e.c.NewSession(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer sess.Close(ctx)
	starter, err := saga.New(saga.Config{Client: e.c, Session: sess}, v1)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := starter.Start(ctx, "order", "old-1", nil); err != nil {
		t.Fatal(err)
	}
	o2, _, stop2 := e.run(t, saga.Config{}, v2)
	if _, err := o2.Start(ctx, "order", "new-1", nil); err != nil {
		t.Fatal(err)
	}
	if st, err := o2.Wait(ctx, "order", "new-1"); err != nil || st.Status != saga.Done {
		t.Fatalf("v2's own saga = %s, %v", st.Status, err)
	}
	if st, err := o2.Store().Get(ctx, "order", "old-1"); err != nil || st.Status != saga.Running || st.Step != 0 {
		t.Fatalf("v1's saga under v2 = %s at %d, %v; want left running at its first step", st.Status, st.Step, err)
	}
	stop2()
	// v1's orchestrator takes the shards over and moves it.
	o1, _, _ := e.run(t, saga.Config{}, v1)
	if st, err := o1.Wait(ctx, "order", "old-1"); err != nil || st.Status != saga.Done {
		t.Fatalf("v1's saga under v1 = %s, %v; want done", st.Status, err)
	}
}
