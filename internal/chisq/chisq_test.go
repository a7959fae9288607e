package chisq

import (
	"math"
	"testing"
)

func TestCritical(t *testing.T) {
	// Reference values of the chi-squared 0.999 quantile.
	for _, tc := range []struct {
		df   int
		want float64
	}{{1, 10.828}, {2, 13.816}, {3, 16.266}, {5, 20.515}, {10, 29.588}, {99, 148.230}} {
		if got := Critical(tc.df); math.Abs(got-tc.want)/tc.want > 0.015 {
			t.Errorf("Critical(%d) = %.3f, want %.3f ± 1.5%%", tc.df, got, tc.want)
		}
	}
}

func TestFit(t *testing.T) {
	if err := Fit([]int{1000, 1010, 990}, []float64{1, 1, 1}); err != nil {
		t.Errorf("Fit(uniform) = %v, want nil", err)
	}
	if err := Fit([]int{1200, 900, 900}, []float64{1, 1, 1}); err == nil {
		t.Error("Fit(skewed) = nil, want a rejection")
	}
	if err := Fit([]int{5, 0}, []float64{1, 0}); err != nil {
		t.Errorf("Fit(impossible cell empty) = %v, want nil", err)
	}
	if err := Fit([]int{5, 1}, []float64{1, 0}); err == nil {
		t.Error("Fit(impossible cell hit) = nil, want an error")
	}
}
