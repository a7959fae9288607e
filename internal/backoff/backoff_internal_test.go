package backoff

import (
	"context"
	"errors"
	"testing"
	"time"
)

func TestDelays(t *testing.T) {
	cfg := Config{Base: 100 * time.Millisecond, Max: time.Second, Multiplier: 2, Jitter: 0.2}
	for _, tc := range []struct {
		name string
		rand float64
		want []time.Duration
	}{
		{"no jitter drawn", 0.5, []time.Duration{100, 200, 400, 800, 1000, 1000}},
		{"lowest", 0, []time.Duration{80, 160, 320, 640, 800, 800}},
		{"highest", 1, []time.Duration{120, 240, 480, 960, 1200, 1200}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			b := New(cfg)
			b.rand = func() float64 { return tc.rand }
			for i, want := range tc.want {
				if got := b.Next(); got != want*time.Millisecond {
					t.Errorf("Next() #%d = %v, want %v", i, got, want*time.Millisecond)
				}
			}
			b.Reset()
			if got, want := b.Next(), tc.want[0]*time.Millisecond; got != want {
				t.Errorf("Next() after Reset = %v, want %v", got, want)
			}
		})
	}
}

// Two clients failing together draw different delays.
func TestJitterSpreads(t *testing.T) {
	seen := map[time.Duration]bool{}
	for range 20 {
		seen[New(DefaultConfig).Next()] = true
	}
	if len(seen) < 10 {
		t.Errorf("20 first delays took %d distinct values, want them spread", len(seen))
	}
}

func TestDefaultsFillZeroFields(t *testing.T) {
	b := New(Config{})
	b.rand = func() float64 { return 0.5 }
	if got := b.Next(); got != DefaultConfig.Base {
		t.Errorf("Next() = %v, want %v", got, DefaultConfig.Base)
	}
}

func TestWaitHonoursContext(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	b := New(Config{Base: time.Hour, Max: time.Hour})
	if err := b.Wait(ctx); !errors.Is(err, context.Canceled) {
		t.Errorf("Wait(cancelled) = %v, want context.Canceled", err)
	}
}
