package beaconhttp_test

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"testing"
	"time"

	"beacon.dev/beacon/beaconhttp"
	"beacon.dev/beacon/policy"
)

// startStreamer is a backend that sends its headers at once and then its
// body in chunks, a pause between each: the shape of a slow download or
// a streamed API answer.
func startStreamer(t *testing.T, name string, chunks int, pause time.Duration) (b *backend, want string) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	b = &backend{name: name, ln: ln, port: ln.Addr().(*net.TCPAddr).Port}
	chunk := func(i int) string { return fmt.Sprintf("%s chunk %02d\n", name, i) }
	var sb strings.Builder
	for i := range chunks {
		sb.WriteString(chunk(i))
	}
	b.srv = &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		b.hits.Add(1)
		fl := w.(http.Flusher)
		w.WriteHeader(http.StatusOK)
		fl.Flush()
		for i := range chunks {
			select {
			case <-r.Context().Done():
				return
			case <-time.After(pause):
			}
			io.WriteString(w, chunk(i))
			fl.Flush()
		}
	})}
	go b.srv.Serve(ln)
	t.Cleanup(b.stop)
	return b, sb.String()
}

// A response body is read after RoundTrip returns, so the timeouts must
// not end with the attempt: the attempt's context lives until the body is
// read to the end or closed, as with http.Client.Timeout. The timeouts are
// far longer than the stream; only a context cancelled on return can cut
// the body.
func TestTimeoutsLeaveTheBodyWhole(t *testing.T) {
	e := newEnv(t)
	b, want := startStreamer(t, "slow", 10, 30*time.Millisecond)
	e.register(t, "echo", b)
	for _, tc := range []struct {
		name string
		opts []policy.Option
	}{
		{"per-try", []policy.Option{policy.WithPerTryTimeout(30 * time.Second)}},
		{"overall", []policy.Option{policy.WithTimeout(30 * time.Second)}},
		{"both", []policy.Option{policy.WithTimeout(30 * time.Second), policy.WithPerTryTimeout(30 * time.Second)}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			tr, err := beaconhttp.NewTransport(e.cache, beaconhttp.WithServices("echo"), beaconhttp.WithPolicies(tc.opts...))
			if err != nil {
				t.Fatal(err)
			}
			defer tr.Close()
			req, err := http.NewRequestWithContext(e.ctx, http.MethodGet, "http://echo/stream", nil)
			if err != nil {
				t.Fatal(err)
			}
			resp, err := tr.RoundTrip(req)
			if err != nil {
				t.Fatalf("RoundTrip(GET http://echo/stream) error = %v", err)
			}
			defer resp.Body.Close()
			got, err := io.ReadAll(resp.Body)
			if err != nil {
				t.Errorf("reading the body after RoundTrip: %v (read %d of %d bytes)", err, len(got), len(want))
			}
			if string(got) != want {
				t.Errorf("body = %q, want %q", got, want)
			}
		})
	}
}

// A fallback that answers an error without a response gives RoundTrip an
// error, not a nil response (nor a panic).
func TestFallbackWithoutAResponseIsAnError(t *testing.T) {
	e := newEnv(t)
	tr, err := beaconhttp.NewTransport(e.cache, beaconhttp.WithServices("nobody"),
		beaconhttp.WithPolicies(policy.WithFallback(func(context.Context, error) error { return nil })))
	if err != nil {
		t.Fatal(err)
	}
	defer tr.Close()
	req, err := http.NewRequestWithContext(e.ctx, http.MethodGet, "http://nobody/x", nil)
	if err != nil {
		t.Fatal(err)
	}
	resp, err := tr.RoundTrip(req)
	if err == nil || resp != nil || !strings.Contains(err.Error(), "fallback gave no response") {
		t.Fatalf("RoundTrip = %v, %v; want the fallback's missing response named", resp, err)
	}
}
