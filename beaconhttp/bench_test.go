package beaconhttp_test

import (
	"fmt"
	"io"
	"net/http"
	"strings"
	"testing"

	"beacon.dev/beacon/beaconhttp"
	"beacon.dev/beacon/registry"
)

// canned answers every request at once, without a network: what is left
// is the transport's own cost.
type canned struct{}

func (canned) RoundTrip(*http.Request) (*http.Response, error) {
	return &http.Response{StatusCode: http.StatusOK, Body: http.NoBody, Header: http.Header{}}, nil
}

// BenchmarkRoundTripOverhead is the beacon transport's cost per request
// (service lookup, P2C pick, retry executor, request copy, accounting)
// over a base transport that answers at once; "direct" calls that base
// alone, the anchor.
func BenchmarkRoundTripOverhead(b *testing.B) {
	e := newEnv(b)
	for i := range 3 {
		if _, err := e.c.Register(e.ctx, registry.Instance{Service: "web", ID: fmt.Sprint(i), Address: "127.0.0.1", Port: 10000 + i}); err != nil {
			b.Fatal(err)
		}
	}
	tr, err := beaconhttp.NewTransport(e.cache, beaconhttp.WithBase(canned{}), beaconhttp.WithServices("web"))
	if err != nil {
		b.Fatal(err)
	}
	defer tr.Close()
	req, _ := http.NewRequest(http.MethodGet, "http://web/x", nil)
	for {
		if _, err := tr.RoundTrip(req); err == nil {
			break
		} else if !strings.Contains(err.Error(), "no") {
			b.Fatal(err)
		}
	}
	for _, side := range []struct {
		name string
		rt   http.RoundTripper
	}{{"beacon", tr}, {"direct", canned{}}} {
		b.Run(side.name, func(b *testing.B) {
			b.ReportAllocs()
			b.RunParallel(func(pb *testing.PB) {
				for pb.Next() {
					resp, err := side.rt.RoundTrip(req)
					if err != nil {
						b.Fatal(err)
					}
					io.Copy(io.Discard, resp.Body)
				}
			})
		})
	}
}
