package testutil

import (
	"io"
	"net/http"
	"regexp"
	"strconv"
	"testing"
)

// Metric reads one sample (name with its labels, as exposed) from the
// /metrics page at addr; ok is false when it has not been recorded yet.
func Metric(t testing.TB, addr, name string) (v float64, ok bool) {
	t.Helper()
	resp, err := http.Get("http://" + addr + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	m := regexp.MustCompile(`(?m)^` + regexp.QuoteMeta(name) + ` (\S+)$`).FindSubmatch(b)
	if m == nil {
		return 0, false
	}
	v, _ = strconv.ParseFloat(string(m[1]), 64)
	return v, true
}
