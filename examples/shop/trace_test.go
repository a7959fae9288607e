package main

import (
	"bufio"
	"context"
	"io"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"beacon.dev/beacon/internal/testutil"
	"beacon.dev/beacon/tracing"
)

// The demo with --otlp: every service exports its spans to the collector
// (here a receiver in the test speaking OTLP/gRPC), and an order is one
// trace from the gateway through orders to inventory and payments, with
// beacon's call and attempt spans at each hop; a slowed orders instance
// makes the gateway hedge, and the hedge is in the trace.
func TestDemoTracesAnOrderAcrossServices(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 4*time.Minute)
	defer cancel()
	rcv := testutil.NewOTLPReceiver(t)
	bin := filepath.Join(t.TempDir(), "shop")
	if out, err := exec.CommandContext(ctx, "go", "build", "-o", bin, ".").CombinedOutput(); err != nil {
		t.Fatalf("go build: %v\n%s", err, out)
	}
	cmd := exec.CommandContext(ctx, bin, "demo", "--dir", t.TempDir(), "--http", testutil.FreeAddr(t), "--rate", "20", "--plain", "--otlp", rcv.Addr)
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	stdin, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	cmd.Stderr = cmd.Stdout
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	var mu sync.Mutex
	var out strings.Builder
	copied := make(chan struct{})
	go func() { // owned: ends when the demo closes its output
		defer close(copied)
		sc := bufio.NewScanner(stdout)
		for sc.Scan() {
			mu.Lock()
			out.WriteString(sc.Text() + "\n")
			mu.Unlock()
		}
		_, _ = io.Copy(io.Discard, stdout)
	}()
	stopped := false
	stop := func() {
		if stopped {
			return
		}
		stopped = true
		_ = cmd.Process.Signal(syscall.SIGINT)
		<-copied
		_ = cmd.Wait()
	}
	defer stop()

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
	if _, err := io.WriteString(stdin, "slow 1\n"); err != nil {
		t.Fatal(err)
	}
	testutil.Eventually(t, 2*time.Minute, "a hedged attempt from the gateway", func() bool {
		for _, s := range rcv.Spans() {
			if h := testutil.Attr(s.Span, string(tracing.AttrHedge)); s.Service == "gateway" && s.GetName() == tracing.SpanAttempt &&
				h != "" && h != "0" && testutil.Attr(s.Span, string(tracing.AttrOutcome)) == "ok" {
				return true
			}
		}
		return false
	})
	stop()
	mu.Lock()
	defer mu.Unlock()
	if !strings.Contains(out.String(), "demo: stopped") {
		t.Errorf("the demo did not stop cleanly:\n%s", out.String())
	}
}
