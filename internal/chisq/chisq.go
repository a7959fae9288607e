// Package chisq is Pearson's chi-squared goodness-of-fit test, for tests
// that check random distributions (never loose bounds).
package chisq

import (
	"fmt"
	"math"
)

// Z999 is the standard normal quantile for a 0.1% false-alarm rate.
const Z999 = 3.0902

// Critical returns the chi-squared value that a fit with df degrees of
// freedom exceeds with probability 0.001: tabulated for df ≤ 3, else the
// Wilson–Hilferty approximation (within 1.5%, on the high side).
func Critical(df int) float64 {
	switch df {
	case 1:
		return 10.828
	case 2:
		return -2 * math.Log(0.001)
	case 3:
		return 16.266
	}
	k := float64(df)
	a := 2 / (9 * k)
	return k * math.Pow(1-a+Z999*math.Sqrt(a), 3)
}

// Fit compares observed counts with expected probabilities (which need not
// sum to exactly 1; they are normalised). It returns an error describing
// the worst cell when the fit is rejected at the 0.1% level.
func Fit(observed []int, probs []float64) error {
	if len(observed) != len(probs) || len(observed) < 2 {
		return fmt.Errorf("chisq: %d observations for %d probabilities", len(observed), len(probs))
	}
	n, sum := 0, 0.0
	for i := range observed {
		n += observed[i]
		sum += probs[i]
	}
	stat, worst, worstAt := 0.0, 0.0, 0
	for i, o := range observed {
		exp := float64(n) * probs[i] / sum
		if exp == 0 {
			if o != 0 {
				return fmt.Errorf("chisq: cell %d: %d observations where none are possible", i, o)
			}
			continue
		}
		d := (float64(o) - exp) * (float64(o) - exp) / exp
		stat += d
		if d > worst {
			worst, worstAt = d, i
		}
	}
	if c := Critical(len(observed) - 1); stat > c {
		exp := float64(n) * probs[worstAt] / sum
		return fmt.Errorf("chisq: statistic %.1f > critical %.1f (df %d); worst cell %d: got %d, want ≈%.0f",
			stat, c, len(observed)-1, worstAt, observed[worstAt], exp)
	}
	return nil
}
