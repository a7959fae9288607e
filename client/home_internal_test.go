package client

import "testing"

// Clients given the same list of servers spread over them (a random home
// each), unless told to keep the order; a stream leaving a server goes to
// one of the others, each about as often.
func TestHomesSpreadAndStreamsLeaveForAnotherServer(t *testing.T) {
	servers := []string{"127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3"}
	homes := make([]int, len(servers))
	for range 300 {
		c, err := New(servers, WithRebalanceInterval(0))
		if err != nil {
			t.Fatal(err)
		}
		homes[c.current.Load()]++
		next := make([]int, len(servers))
		for range 100 {
			next[c.otherServer(1)]++
		}
		if next[1] != 0 || next[0] < 20 || next[2] < 20 {
			t.Fatalf("streams leaving server 1 went to %v; want never 1, and both others", next)
		}
		c.Close()
	}
	for i, n := range homes {
		// 300 clients over 3 servers: 100 each on average, σ ≈ 8.
		if n < 60 || n > 140 {
			t.Errorf("server %d is home to %d of 300 clients (all: %v); want about 100", i, n, homes)
		}
	}
	c, err := New(servers, WithOrderedServers(), WithRebalanceInterval(0))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if c.current.Load() != 0 || c.otherServer(0) != 1 || c.otherServer(2) != 0 {
		t.Errorf("WithOrderedServers: first server %d, after 0 comes %d, after 2 comes %d; want 0, 1, 0", c.current.Load(), c.otherServer(0), c.otherServer(2))
	}
}
