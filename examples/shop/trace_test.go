package main

import (
	"context"
	"strings"
	"testing"
	"time"

	"beacon.dev/beacon/internal/testutil"
	"beacon.dev/beacon/tracing"
)

// The demo with --otlp: every service exports its spans to the collector
// (here a receiver in the test speaking OTLP/gRPC), and an order is one
// trace from the gateway through orders to inventory and payments, with
// beacon's call and attempt spans at each hop; a slowed orders instance
// makes the gateway hedge, and the hedge is in the trace; a killed
// payments instance makes orders retry, and the retry is in the trace.
func TestDemoTracesAnOrderAcrossServices(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 8*time.Minute)
	defer cancel()
	rcv := testutil.NewOTLPReceiver(t)
	d := startDemo(ctx, t, "--otlp", rcv.Addr)
	stopped := false
	defer func() {
		if !stopped {
			d.kill()
		}
	}()

	// The demo builds and starts a dozen processes first: slow on a busy
	// machine.
	select {
	case <-d.placed:
	case <-time.After(4 * time.Minute): // liveness, not latency
		t.Fatalf("the demo placed no orders in 4 minutes:\n%s", d.output())
	}
	// One trace with every service's spans, beacon's among them.
	testutil.Eventually(t, 3*time.Minute, "an order traced through every service", func() bool {
		byTrace := map[string]map[string]bool{}
		for _, s := range rcv.Spans() {
			id := string(s.GetTraceId())
			if byTrace[id] == nil {
				byTrace[id] = map[string]bool{}
			}
			byTrace[id][s.Service] = true
			if s.GetName() == tracing.SpanAttempt {
				byTrace[id]["attempt by "+s.Service] = true
			}
		}
		for _, services := range byTrace {
			if services["gateway"] && services["orders"] && services["inventory"] && services["payments"] &&
				services["attempt by gateway"] && services["attempt by orders"] {
				return true
			}
		}
		return false
	})
	// A slowed orders instance: the gateway's hedges answer for it.
	d.send(t, "slow 1")
	testutil.Eventually(t, 2*time.Minute, "a hedged attempt from the gateway", func() bool {
		for _, s := range rcv.Spans() {
			if h := testutil.Attr(s.Span, string(tracing.AttrHedge)); s.Service == "gateway" && s.GetName() == tracing.SpanAttempt &&
				h != "" && h != "0" && testutil.Attr(s.Span, string(tracing.AttrOutcome)) == "ok" {
				return true
			}
		}
		return false
	})
	// A killed payments instance: orders' calls to it are refused and
	// retried on the other one — a retried attempt inside an order's trace.
	d.send(t, "kill payments")
	defer func() {
		if !t.Failed() {
			return
		}
		// What orders' attempts looked like, to tell "no retry" from
		// "no call reached the killed instance".
		seen := map[string]int{}
		for _, s := range rcv.Spans() {
			if s.Service == "orders" && s.GetName() == tracing.SpanAttempt {
				seen["attempt "+testutil.Attr(s.Span, string(tracing.AttrAttempt))+" "+testutil.Attr(s.Span, string(tracing.AttrOutcome))]++
			}
		}
		t.Logf("orders' attempt spans by number and outcome: %v\ndemo output:\n%s", seen, d.output())
	}()
	testutil.Eventually(t, 2*time.Minute, "an order's trace with orders retrying payments", func() bool {
		type hop struct {
			services    map[string]bool
			failedFirst bool // an attempt 1 by orders that failed
			retried     bool // an attempt 2 by orders that succeeded
		}
		byTrace := map[string]*hop{}
		for _, s := range rcv.Spans() {
			id := string(s.GetTraceId())
			h := byTrace[id]
			if h == nil {
				h = &hop{services: map[string]bool{}}
				byTrace[id] = h
			}
			h.services[s.Service] = true
			if s.Service != "orders" || s.GetName() != tracing.SpanAttempt {
				continue
			}
			// Orders' calls to payments (its calls to inventory have
			// attempts too).
			if !strings.HasPrefix(testutil.Attr(s.Span, string(tracing.AttrEndpointID)), "payments-") {
				continue
			}
			switch n, outcome := testutil.Attr(s.Span, string(tracing.AttrAttempt)), testutil.Attr(s.Span, string(tracing.AttrOutcome)); {
			case n == "1" && outcome == "error":
				h.failedFirst = true
			case n == "2" && outcome == "ok":
				h.retried = true
			}
		}
		for _, h := range byTrace {
			if h.failedFirst && h.retried && h.services["gateway"] && h.services["inventory"] && h.services["payments"] {
				return true
			}
		}
		return false
	})
	stopped = true
	if err := d.interrupt(); err != nil || !strings.Contains(d.output(), "demo: stopped") {
		t.Errorf("the demo did not stop cleanly (%v):\n%s", err, d.output())
	}
}
