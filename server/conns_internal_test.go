package server

import (
	"net"
	"testing"
	"time"

	"golang.org/x/time/rate"
)

// An address's write budget survives its connections closing until it has
// refilled; then the address is forgotten, so the map stays bounded.
func TestAddressBudgetOutlivesItsConnections(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	l := newConnLimiter(ln, 10, 10, func() *rate.Limiter { return rate.NewLimiter(rate.Limit(20), 2) }, func(string) {})

	accept := func() *limitedConn {
		t.Helper()
		c, err := net.Dial("tcp", ln.Addr().String())
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
		s, err := l.Accept()
		if err != nil {
			t.Fatal(err)
		}
		return s.(*limitedConn)
	}

	first := accept()
	if !first.writes.Allow() || !first.writes.Allow() {
		t.Fatal("the address's burst of 2 was not available")
	}
	spent := time.Now()
	// Hold the refill (20/s: a token in 50 ms, which a busy machine can
	// take between two accepts) while the address reconnects; it goes on
	// below.
	first.writes.SetLimitAt(spent, 0)
	first.Close()
	second := accept()
	if second.writes != first.writes {
		t.Fatal("a reconnecting address got a fresh write budget")
	}
	if tokens := second.writes.TokensAt(spent); tokens >= 1 {
		t.Errorf("a reconnecting address has %.2f writes left of its spent burst, want none", tokens)
	}
	second.Close()
	if got := l.Addresses(); got != 1 {
		t.Fatalf("addresses held with a budget still refilling = %d, want 1", got)
	}
	// Let the budget refill (at 20/s, 100 ms), then a sweep on the next
	// accept forgets the idle address (the new one is the same address,
	// so it starts fresh).
	second.writes.SetLimit(20)
	deadline := time.Now().Add(30 * time.Second)
	for !refilled(second.writes) && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	l.mu.Lock()
	l.swept = time.Time{} // the once-a-second sweep is due
	l.mu.Unlock()
	third := accept()
	if third.writes == second.writes {
		t.Error("a refilled idle address was not forgotten")
	}
	third.Close()
	if got, open := l.Addresses(), l.Open(); open != 0 || got > 1 {
		t.Errorf("after every connection closed: %d addresses, %d open", got, open)
	}
}
