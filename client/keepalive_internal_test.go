package client

import (
	"context"
	"testing"
	"time"
)

// A heartbeat waits for company at most keepAliveMaxLinger, and at most a
// quarter of the time it has for an answer.
func TestKeepAliveLingerIsBoundedByTheAnswerTime(t *testing.T) {
	now := time.Date(2026, 12, 7, 0, 0, 0, 0, time.UTC)
	for _, tc := range []struct {
		name     string
		deadline time.Duration // 0: none
		want     time.Duration
	}{
		{"no deadline", 0, keepAliveMaxLinger},
		{"default TTL: half of 3.333 s to answer", 3333 * time.Millisecond / 2, 416625 * time.Microsecond},
		{"30 s TTL: the 5 s heartbeat timeout's half to answer", 2500 * time.Millisecond, keepAliveMaxLinger},
		{"shortest TTL: half of 666 ms to answer", 333 * time.Millisecond, 83250 * time.Microsecond},
		{"deadline passed", -time.Second, 0},
	} {
		ctx := context.Background()
		if tc.deadline != 0 {
			var cancel context.CancelFunc
			ctx, cancel = context.WithDeadline(ctx, now.Add(tc.deadline))
			defer cancel()
		}
		if got := keepAliveLinger(ctx, now); got != tc.want {
			t.Errorf("%s: linger %v, want %v", tc.name, got, tc.want)
		}
	}
}

// A message carries at most kaMaxBatch heartbeats (the server's limit):
// more are cut into several, in order, none lost.
func TestKeepAliveBatchesStayWithinTheServersLimit(t *testing.T) {
	for _, n := range []int{1, kaMaxBatch, kaMaxBatch + 1, 2*kaMaxBatch + 7} {
		ids := make([]int64, n)
		for i := range ids {
			ids[i] = int64(i + 1)
		}
		var next int64 = 1
		batches := splitBatch(ids, kaMaxBatch)
		for _, b := range batches {
			if len(b) == 0 || len(b) > kaMaxBatch {
				t.Fatalf("%d heartbeats: a message of %d", n, len(b))
			}
			for _, id := range b {
				if id != next {
					t.Fatalf("%d heartbeats: got %d, want %d", n, id, next)
				}
				next++
			}
		}
		if next != int64(n)+1 || len(batches) != (n+kaMaxBatch-1)/kaMaxBatch {
			t.Errorf("%d heartbeats: %d sent in %d messages", n, next-1, len(batches))
		}
	}
}
