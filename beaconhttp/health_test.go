package beaconhttp_test

import (
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"testing"

	"beacon.dev/beacon/beaconhttp"
)

func TestHealthFollowsTheLifecycle(t *testing.T) {
	var h beaconhttp.Health
	srv := httptest.NewServer(h.Handler())
	defer srv.Close()
	probe := func(path string) (int, string) {
		resp, err := http.Get(srv.URL + path)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		var body struct{ State string }
		_ = json.NewDecoder(resp.Body).Decode(&body)
		return resp.StatusCode, body.State
	}
	for _, tc := range []struct {
		state                 beaconhttp.State
		livez, readyz, health int
	}{
		{beaconhttp.Starting, 200, 503, 503},
		{beaconhttp.Serving, 200, 200, 200},
		{beaconhttp.Draining, 200, 503, 503},
		{beaconhttp.Stopped, 503, 503, 503},
	} {
		h.Set(tc.state)
		for path, want := range map[string]int{"/livez": tc.livez, "/readyz": tc.readyz, "/healthz": tc.health} {
			if code, state := probe(path); code != want || state != tc.state.String() {
				t.Errorf("%v: GET %s = %d %s, want %d %s", tc.state, path, code, state, want, tc.state)
			}
		}
	}
}

func TestMiddlewareCountsAndClosesWhileDraining(t *testing.T) {
	var h beaconhttp.Health
	inside := make(chan int64, 1)
	srv := httptest.NewServer(h.Middleware(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		inside <- h.Inflight()
	})))
	defer srv.Close()
	h.Set(beaconhttp.Draining)
	resp, err := http.Get(srv.URL)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if n := <-inside; n != 1 {
		t.Errorf("Inflight() inside a request = %d, want 1", n)
	}
	if !resp.Close {
		t.Error("a response while draining does not close the connection")
	}
	if n := h.Inflight(); n != 0 {
		t.Errorf("Inflight() after = %d, want 0", n)
	}
}
