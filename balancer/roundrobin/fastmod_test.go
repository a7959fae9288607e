package roundrobin

import (
	"math/rand/v2"
	"testing"
)

func TestFastmod(t *testing.T) {
	r := rand.New(rand.NewPCG(1, 2))
	for _, d := range []uint32{1, 2, 3, 7, 100, 1000, 65537, 1<<31 - 1} {
		m := ^uint64(0)/uint64(d) + 1
		for _, a := range []uint32{0, 1, d - 1, d, d + 1, 1<<32 - 1} {
			if got, want := fastmod(a, m, d), a%d; got != want {
				t.Errorf("fastmod(%d, %d) = %d, want %d", a, d, got, want)
			}
		}
		for range 10000 {
			a := r.Uint32()
			if got, want := fastmod(a, m, d), a%d; got != want {
				t.Fatalf("fastmod(%d, %d) = %d, want %d", a, d, got, want)
			}
		}
	}
}
