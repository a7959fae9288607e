package server_test

import (
	"bufio"
	"bytes"
	"compress/gzip"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"testing"
	"time"

	"connectrpc.com/connect"
	"google.golang.org/protobuf/types/known/durationpb"

	beaconv1 "beacon.dev/beacon/api/beacon/v1"
	"beacon.dev/beacon/api/beacon/v1/beaconv1connect"
	"beacon.dev/beacon/internal/testutil"
	"beacon.dev/beacon/server"
	"beacon.dev/beacon/server/servertest"
)

// Finding 10: while etcd starts the port answers — /readyz 503, API calls
// unavailable — instead of accepting connections and saying nothing; and
// start-up gives up when its context ends.
func TestPortAnswersWhileEtcdStarts(t *testing.T) {
	cfg := servertest.Config(t, "")
	// A member of a three-node cluster whose peers never come: etcd waits
	// for a quorum for as long as Start lets it.
	cfg.Name = "n0"
	cfg.EtcdInitialCluster = fmt.Sprintf("n0=http://%s,n1=http://%s,n2=http://%s", cfg.EtcdPeerAddr, testutil.FreeAddr(t), testutil.FreeAddr(t))
	cfg.Insecure = true // no peer TLS: this test is about the API port
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	started := make(chan error, 1)
	go func() {
		srv, err := server.Start(ctx, cfg)
		if err == nil {
			srv.Close()
			err = errors.New("Start succeeded without a quorum")
		}
		started <- err
	}()
	hc := &http.Client{Timeout: 20 * time.Second}
	var resp *http.Response
	testutil.Eventually(t, 30*time.Second, "the API port to accept", func() bool {
		c, err := net.Dial("tcp", cfg.Addr)
		if err == nil {
			c.Close()
		}
		return err == nil
	})
	resp, err := hc.Get("http://" + cfg.Addr + "/readyz")
	if err != nil {
		t.Fatalf("GET /readyz while etcd starts: %v (want an answer, 503)", err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != http.StatusServiceUnavailable {
		t.Errorf("GET /readyz while etcd starts = %d %s, want 503", resp.StatusCode, body)
	}
	resp, err = hc.Post("http://"+cfg.Addr+"/beacon.v1.RegistryService/ListServices", "application/json", strings.NewReader(`{}`))
	if err != nil {
		t.Fatalf("ListServices while etcd starts: %v", err)
	}
	body, _ = io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != http.StatusServiceUnavailable || !strings.Contains(string(body), "unavailable") || !strings.Contains(string(body), "not ready") {
		t.Errorf("ListServices while etcd starts = %d %s, want 503 unavailable, not ready", resp.StatusCode, body)
	}
	cl := beaconv1connect.NewRegistryServiceClient(hc, "http://"+cfg.Addr, connect.WithGRPC())
	if _, err := cl.ListServices(context.Background(), connect.NewRequest(&beaconv1.ListServicesRequest{})); connect.CodeOf(err) != connect.CodeUnavailable {
		t.Errorf("gRPC ListServices while etcd starts: %v, want unavailable", err)
	}
	cancel()
	select {
	case err := <-started:
		if err == nil || !errors.Is(err, context.Canceled) {
			t.Errorf("Start after its context ended = %v, want context.Canceled", err)
		}
	case <-time.After(60 * time.Second):
		t.Fatal("Start did not return after its context ended")
	}
	if c, err := net.Dial("tcp", cfg.Addr); err == nil {
		c.Close()
		t.Error("the API port still accepts after Start failed")
	}
}

// Finding 11: a second server on a data directory in use says so at once.
func TestDataDirInUseIsRefusedAtOnce(t *testing.T) {
	first := servertest.Config(t, "")
	servertest.Start(t, first)
	second := servertest.Config(t, first.DataDir)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	srv, err := server.Start(ctx, second)
	if err == nil {
		srv.Close()
		t.Fatal("a second server started on a data directory in use")
	}
	if ctx.Err() != nil || !strings.Contains(err.Error(), first.DataDir) || !strings.Contains(err.Error(), "in use") {
		t.Fatalf("Start on a data directory in use: %v, want an error naming %s as in use, before the context ends", err, first.DataDir)
	}
}

// rawConn is a keep-alive HTTP/1.1 connection, as a careless client keeps it.
func rawRequest(t *testing.T, addr, req string) (net.Conn, *bufio.Reader, *http.Response) {
	t.Helper()
	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := io.WriteString(c, req); err != nil {
		t.Fatal(err)
	}
	br := bufio.NewReader(c)
	c.SetReadDeadline(time.Now().Add(30 * time.Second))
	resp, err := http.ReadResponse(br, nil)
	if err != nil {
		c.Close()
		t.Fatalf("reading the answer: %v", err)
	}
	io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	return c, br, resp
}

// closedByServer reports whether the server closed c (a read returns EOF).
func closedByServer(c net.Conn, br *bufio.Reader) bool {
	c.SetReadDeadline(time.Now().Add(30 * time.Second))
	_, err := br.ReadByte()
	return err != nil && !isTimeoutErr(err)
}

func isTimeoutErr(err error) bool {
	var ne net.Error
	return errors.As(err, &ne) && ne.Timeout()
}

// Finding 5: idle connections are closed after --idle-timeout.
func TestIdleConnectionsAreClosed(t *testing.T) {
	cfg := servertest.Config(t, "")
	cfg.Limits.IdleTimeout = 300 * time.Millisecond
	srv := servertest.Start(t, cfg)
	const n = 20
	for range n {
		c, br, resp := rawRequest(t, srv.Addr(), "GET /livez HTTP/1.1\r\nHost: x\r\n\r\n")
		if resp.StatusCode != 200 {
			t.Fatalf("GET /livez = %d", resp.StatusCode)
		}
		if !closedByServer(c, br) {
			t.Error("an idle keep-alive connection stayed open past --idle-timeout")
		}
		c.Close()
	}
	// The scrape's own connection is the one left.
	testutil.Eventually(t, 30*time.Second, "no client connection but the scrape's left", func() bool {
		return metricOr0(t, srv, "beacon_client_connections") <= 1
	})
}

// Finding 5: connections past --max-conns-per-ip (and --max-conns) are
// closed at once and counted; the server keeps serving.
func TestConnectionLimitsRefuseAndServerStaysUp(t *testing.T) {
	for _, tc := range []struct {
		name         string
		total, perIP int
		limit        string
	}{
		{"per address", 1000, 10, "max-conns-per-ip"},
		{"total", 10, 1000, "max-conns"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cfg := servertest.Config(t, "")
			cfg.Limits.MaxConns, cfg.Limits.MaxConnsPerIP = tc.total, tc.perIP
			srv := servertest.Start(t, cfg)
			var held []net.Conn
			defer func() {
				for _, c := range held {
					c.Close()
				}
			}()
			for range 10 {
				c, _, _ := rawRequest(t, srv.Addr(), "GET /livez HTTP/1.1\r\nHost: x\r\n\r\n")
				held = append(held, c)
			}
			// The eleventh is accepted by the kernel and closed by the server.
			extra, err := net.Dial("tcp", srv.Addr())
			if err != nil {
				t.Fatal(err)
			}
			defer extra.Close()
			io.WriteString(extra, "GET /livez HTTP/1.1\r\nHost: x\r\n\r\n")
			if !closedByServer(extra, bufio.NewReader(extra)) {
				t.Fatal("a connection over the limit was served")
			}
			// Two places: one for the readiness check, one for the scrape.
			held[0].Close()
			held[1].Close()
			held = held[2:]
			testutil.Eventually(t, 30*time.Second, "a place under the limit again", func() bool {
				resp, err := http.Get("http://" + srv.Addr() + "/readyz")
				if err != nil {
					return false
				}
				resp.Body.Close()
				return resp.StatusCode == 200
			})
			// The scrape may still meet the limit while the server
			// counts the closed connections out: try again until served.
			testutil.Eventually(t, 30*time.Second, "the refusal counted in /metrics", func() bool {
				resp, err := http.Get("http://" + srv.Addr() + "/metrics")
				if err != nil {
					return false
				}
				defer resp.Body.Close()
				body, _ := io.ReadAll(resp.Body)
				return strings.Contains(string(body), `beacon_limit_refusals_total{limit="`+tc.limit+`"}`)
			})
		})
	}
}

// Finding 8: an oversized body gets 413 as soon as it passes the limit,
// before the rest is sent; a compressed one is not inflated past it.
func TestOversizedBodiesAre413AtOnce(t *testing.T) {
	cfg := servertest.Config(t, "")
	srv := servertest.Start(t, cfg)
	max := cfg.Limits.MaxRequestBytes

	t.Run("declared length", func(t *testing.T) {
		c, err := net.Dial("tcp", srv.Addr())
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		// Announce 100 MB, send 64 KB, and wait for the answer.
		fmt.Fprintf(c, "POST /beacon.v1.RegistryService/Register HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n", 100<<20)
		c.Write(bytes.Repeat([]byte(" "), 64<<10))
		c.SetReadDeadline(time.Now().Add(30 * time.Second))
		resp, err := http.ReadResponse(bufio.NewReader(c), nil)
		if err != nil {
			t.Fatalf("no answer before the body was sent: %v", err)
		}
		body, _ := io.ReadAll(resp.Body)
		if resp.StatusCode != http.StatusRequestEntityTooLarge || !strings.Contains(string(body), "--max-request-bytes") {
			t.Errorf("oversized Register = %d %s, want 413 naming --max-request-bytes", resp.StatusCode, body)
		}
	})
	t.Run("chunked", func(t *testing.T) {
		pr, pw := io.Pipe()
		go func() {
			chunk := bytes.Repeat([]byte(" "), 64<<10)
			for range 1000 { // 64 MB if the server read it all
				if _, err := pw.Write(chunk); err != nil {
					return
				}
			}
			pw.Close()
		}()
		defer pr.Close()
		resp, err := http.Post("http://"+srv.Addr()+"/beacon.v1.RegistryService/Register", "application/json", pr)
		if err != nil {
			t.Fatal(err)
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != http.StatusRequestEntityTooLarge {
			t.Errorf("chunked oversized Register = %d %s, want 413", resp.StatusCode, body)
		}
	})
	t.Run("gzip bomb", func(t *testing.T) {
		var buf bytes.Buffer
		zw := gzip.NewWriter(&buf)
		zw.Write([]byte(`{"instance":{"service":"orders","id":"o-1","address":"127.0.0.1","port":9001,"metadata":{"k":"`))
		zeros := make([]byte, 1<<20)
		for range 64 { // 64 MiB inflated, ~64 KB on the wire
			zw.Write(zeros)
		}
		zw.Write([]byte(`"}}}`))
		zw.Close()
		if buf.Len() > max {
			t.Fatalf("the bomb is %d bytes compressed, want under %d", buf.Len(), max)
		}
		req, _ := http.NewRequest("POST", "http://"+srv.Addr()+"/beacon.v1.RegistryService/Register", &buf)
		req.Header.Set("Content-Type", "application/json")
		req.Header.Set("Content-Encoding", "gzip")
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != http.StatusRequestEntityTooLarge || !strings.Contains(string(body), "decompressed") {
			t.Errorf("gzip bomb = %d %s, want 413 naming the decompressed limit", resp.StatusCode, body)
		}
	})
	t.Run("gRPC", func(t *testing.T) {
		cl := beaconv1connect.NewRegistryServiceClient(http.DefaultClient, "http://"+srv.Addr(), connect.WithGRPC())
		big := &beaconv1.RegisterRequest{Instance: &beaconv1.Instance{Service: "orders", Id: "o-1", Address: "127.0.0.1", Port: 9001,
			Metadata: map[string]string{"k": strings.Repeat("x", 2*max)}}}
		_, err := cl.Register(context.Background(), connect.NewRequest(big))
		if connect.CodeOf(err) != connect.CodeResourceExhausted || !strings.Contains(err.Error(), "--max-request-bytes") {
			t.Errorf("gRPC Register of %d bytes: %v, want resource_exhausted naming --max-request-bytes", 2*max, err)
		}
		// The server is still fine.
		if code, body := post(t, srv, "ListServices", `{}`); code != 200 {
			t.Errorf("ListServices after = %d %s", code, body)
		}
	})
}

// Finding 6: quotas answer resource_exhausted (429 with Retry-After over
// HTTP) naming their flag, and the caller's other calls keep working.
func TestQuotasNameTheirLimit(t *testing.T) {
	cfg := servertest.Config(t, "")
	cfg.Limits.MaxSessions = 3
	cfg.Limits.MaxWatchServices = 5
	cfg.Limits.MaxAwaitsPerConn = 2
	cfg.Limits.WriteRate, cfg.Limits.WriteBurst = 1, 5
	srv := servertest.Start(t, cfg)

	wantLimit := func(t *testing.T, code int, body, flag string) {
		t.Helper()
		if code != http.StatusTooManyRequests || !strings.Contains(body, "resource_exhausted") || !strings.Contains(body, "--"+flag) {
			t.Errorf("got %d %s, want 429 resource_exhausted naming --%s", code, body, flag)
		}
	}
	t.Run("sessions", func(t *testing.T) {
		hc := &http.Client{} // one connection: its write budget is 5
		for i := range 3 {
			resp, err := hc.Post("http://"+srv.Addr()+"/beacon.v1.RegistryService/CreateSession", "application/json", strings.NewReader(`{"ttl":"30s"}`))
			if err != nil {
				t.Fatal(err)
			}
			io.Copy(io.Discard, resp.Body)
			resp.Body.Close()
			if resp.StatusCode != 200 {
				t.Fatalf("CreateSession %d = %d", i, resp.StatusCode)
			}
		}
		testutil.Eventually(t, 30*time.Second, "the view to hold 3 sessions", func() bool {
			return metricOr0(t, srv, "beacon_sessions") == 3
		})
		resp, err := hc.Post("http://"+srv.Addr()+"/beacon.v1.RegistryService/CreateSession", "application/json", strings.NewReader(`{"ttl":"30s"}`))
		if err != nil {
			t.Fatal(err)
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		wantLimit(t, resp.StatusCode, string(body), "max-sessions")
		if resp.Header.Get("Retry-After") == "" {
			t.Error("no Retry-After on a refused CreateSession")
		}
	})
	t.Run("write rate", func(t *testing.T) {
		hc := &http.Client{Transport: &http.Transport{MaxConnsPerHost: 1}}
		defer hc.CloseIdleConnections()
		// The burst of 5 is there at the start, then 1 a second: of 20
		// more writes one is refused, unless a busy machine takes over
		// 20 s to serve them.
		const burst = 5
		refused := false
		for i := 0; i < burst+20 && !refused; i++ {
			resp, err := hc.Post("http://"+srv.Addr()+"/beacon.v1.RegistryService/Register", "application/json",
				strings.NewReader(fmt.Sprintf(`{"instance":{"service":"rate","id":"r-%d","address":"127.0.0.1","port":9001}}`, i)))
			if err != nil {
				t.Fatal(err)
			}
			body, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			switch {
			case i < burst && resp.StatusCode != 200:
				t.Fatalf("Register %d within the burst = %d %s", i, resp.StatusCode, body)
			case resp.StatusCode != 200:
				wantLimit(t, resp.StatusCode, string(body), "write-rate")
				refused = true
			}
		}
		if !refused {
			t.Errorf("%d writes on one connection at --write-rate 1 --write-burst %d: none refused", burst+20, burst)
		}
		// Reads are not writes; another connection has its own budget.
		if code, body := post(t, srv, "Register", `{"instance":{"service":"rate","id":"r-other","address":"127.0.0.1","port":9001}}`); code != 200 {
			t.Errorf("Register on another connection = %d %s", code, body)
		}
	})
	t.Run("watch services", func(t *testing.T) {
		resp, err := http.Get("http://" + srv.Addr() + "/v1/watch?service=a&service=b&service=c&service=d&service=e&service=f")
		if err != nil {
			t.Fatal(err)
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != http.StatusBadRequest || !strings.Contains(string(body), "--max-watch-services") {
			t.Errorf("watch of 6 services = %d %s, want 400 naming --max-watch-services", resp.StatusCode, body)
		}
	})
	t.Run("awaits per connection", func(t *testing.T) {
		cl := beaconv1connect.NewRegistryServiceClient(&http.Client{Transport: testutil.H2CTransport()}, "http://"+srv.Addr(), connect.WithGRPC())
		ctx, cancel := context.WithCancel(context.Background())
		defer cancel()
		// A watcher that never acknowledges keeps the waits waiting.
		st, err := cl.Watch(ctx, connect.NewRequest(&beaconv1.WatchRequest{Services: []string{"orders"}, Acknowledge: true}))
		if err != nil || !st.Receive() {
			t.Fatalf("watch: %v %v", err, st.Err())
		}
		defer st.Close()
		await := &beaconv1.AwaitWatchersRequest{Service: "orders", Revision: 1 << 40, Timeout: durationpb.New(time.Minute)}
		errs := make(chan error, 2)
		for range 2 {
			go func() {
				_, err := cl.AwaitWatchers(ctx, connect.NewRequest(await))
				errs <- err
			}()
		}
		testutil.Eventually(t, 30*time.Second, "two waits in flight", func() bool {
			return metricOr0(t, srv, "beacon_awaits_in_flight") == 2
		})
		_, err = cl.AwaitWatchers(ctx, connect.NewRequest(await))
		if connect.CodeOf(err) != connect.CodeResourceExhausted || !strings.Contains(err.Error(), "--max-awaits-per-conn") {
			t.Errorf("third AwaitWatchers on one connection: %v, want resource_exhausted naming --max-awaits-per-conn", err)
		}
		cancel()
		<-errs
		<-errs
	})
}

// metricOr0 reads a sample from the server's /metrics (0 when absent).
func metricOr0(t *testing.T, srv *server.Server, name string) float64 {
	t.Helper()
	v, _ := metricValue(t, srv, name)
	return v
}

// More connections do not buy more writes (--write-rate-per-ip), and a
// body trickled slower than --read-body-timeout is cut with 408.
func TestAddressWriteRateAndBodyTimeout(t *testing.T) {
	cfg := servertest.Config(t, "")
	cfg.Limits.WriteRatePerIP, cfg.Limits.WriteBurstPerIP = 1, 3
	cfg.Limits.ReadBodyTimeout = 500 * time.Millisecond
	srv := servertest.Start(t, cfg)

	t.Run("write rate per address", func(t *testing.T) {
		hc := &http.Client{Transport: &http.Transport{DisableKeepAlives: true}} // a new connection per call
		// The address's burst of 3 is there at the start, then 1 a second:
		// of 20 more writes one is refused, unless a busy machine takes
		// over 20 s to serve them.
		const burst = 3
		refused := false
		for i := 0; i < burst+20 && !refused; i++ {
			resp, err := hc.Post("http://"+srv.Addr()+"/beacon.v1.RegistryService/Register", "application/json",
				strings.NewReader(fmt.Sprintf(`{"instance":{"service":"ip","id":"i-%d","address":"127.0.0.1","port":9001}}`, i)))
			if err != nil {
				t.Fatal(err)
			}
			body, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			switch {
			case i < burst && resp.StatusCode != 200:
				t.Fatalf("Register %d within the address's burst = %d %s", i, resp.StatusCode, body)
			case resp.StatusCode != 200:
				if resp.StatusCode != http.StatusTooManyRequests || !strings.Contains(string(body), "--write-rate-per-ip") {
					t.Errorf("write %d of the address on its own connection = %d %s, want 429 naming --write-rate-per-ip", i, resp.StatusCode, body)
				}
				refused = true
			}
		}
		if !refused {
			t.Errorf("%d writes of one address, each on a new connection, at --write-rate-per-ip 1 --write-burst-per-ip %d: none refused", burst+20, burst)
		}
	})
	t.Run("trickled body", func(t *testing.T) {
		c, err := net.Dial("tcp", srv.Addr())
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		io.WriteString(c, "POST /beacon.v1.RegistryService/ListServices HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{")
		c.SetReadDeadline(time.Now().Add(30 * time.Second))
		resp, err := http.ReadResponse(bufio.NewReader(c), nil)
		if err != nil {
			t.Fatalf("no answer to a trickled body: %v", err)
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != http.StatusRequestTimeout || !strings.Contains(string(body), "--read-body-timeout") {
			t.Errorf("trickled body = %d %s, want 408 naming --read-body-timeout", resp.StatusCode, body)
		}
		if got := metricOr0(t, srv, `beacon_limit_refusals_total{limit="read-body-timeout"}`); got < 1 {
			t.Errorf(`beacon_limit_refusals_total{limit="read-body-timeout"} = %v, want ≥ 1`, got)
		}
	})
}

// RegisterBatch answers for each instance, in the request's order, bounds
// its size (--max-register-batch, and never more than a write burst:
// refused whole, nothing written), and spends a write token per instance,
// so that batching buys no writes.
func TestRegisterBatchAnswersEachAndSpendsATokenEach(t *testing.T) {
	const burst = 1000 // refilled at 1 a second: 1,000 s to pass a second full batch
	cfg := servertest.Config(t, "")
	cfg.Limits.WriteRate, cfg.Limits.WriteBurst = 1, burst
	cfg.Limits.MaxRegisterBatch = 5000 // the burst bounds it
	srv := servertest.Start(t, cfg)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	rc := beaconv1connect.NewRegistryServiceClient(&http.Client{Transport: testutil.H2CTransport()}, "http://"+srv.Addr(), connect.WithGRPC())
	inst := func(id, addr string) *beaconv1.Instance {
		return &beaconv1.Instance{Service: "batch", Id: id, Address: addr, Port: 9001}
	}
	batch := func(prefix string, n int) []*beaconv1.Instance {
		out := make([]*beaconv1.Instance, n)
		for i := range out {
			out[i] = inst(fmt.Sprintf("%s-%d", prefix, i), "127.0.0.1")
		}
		return out
	}
	_, err := rc.RegisterBatch(ctx, connect.NewRequest(&beaconv1.RegisterBatchRequest{Instances: batch("big", burst+1)}))
	if connect.CodeOf(err) != connect.CodeResourceExhausted || !strings.Contains(err.Error(), "--max-register-batch") {
		t.Errorf("RegisterBatch of %d at --write-burst %d = %v, want resource_exhausted naming --max-register-batch", burst+1, burst, err)
	}
	resp, err := rc.RegisterBatch(ctx, connect.NewRequest(&beaconv1.RegisterBatchRequest{Instances: []*beaconv1.Instance{inst("b", "not an address"), inst("a", "127.0.0.1"), inst("a", "127.0.0.2")}}))
	if err != nil {
		t.Fatal(err)
	}
	res := resp.Msg.GetResults()
	if len(res) != 3 || connect.Code(res[0].GetErrorCode()) != connect.CodeInvalidArgument || !strings.Contains(res[0].GetError(), "address") ||
		res[1].GetRevision() == 0 || res[1].GetErrorCode() != 0 ||
		connect.Code(res[2].GetErrorCode()) != connect.CodeInvalidArgument || !strings.Contains(res[2].GetError(), "instances[2]") {
		t.Errorf("results %v: want b refused naming its address, a registered, the second a refused as a duplicate naming instances[2]", res)
	}
	list, err := rc.ListInstances(ctx, connect.NewRequest(&beaconv1.ListInstancesRequest{Service: "batch", All: true}))
	if err != nil || len(list.Msg.GetInstances()) != 1 || list.Msg.GetInstances()[0].GetAddress() != "127.0.0.1" {
		t.Errorf("ListInstances(batch) = %v, %v; want only a at 127.0.0.1", list.Msg.GetInstances(), err)
	}
	// 3 tokens spent; the rest of the burst takes 997 more instances, and
	// then a full batch finds at most the few tokens refilled since.
	if _, err := rc.RegisterBatch(ctx, connect.NewRequest(&beaconv1.RegisterBatchRequest{Instances: batch("rest", burst-3)})); err != nil {
		t.Fatalf("RegisterBatch of the rest of the burst = %v", err)
	}
	_, err = rc.RegisterBatch(ctx, connect.NewRequest(&beaconv1.RegisterBatchRequest{Instances: batch("more", burst)}))
	if connect.CodeOf(err) != connect.CodeResourceExhausted || !strings.Contains(err.Error(), "--write-rate") {
		t.Errorf("a full batch after the burst was spent = %v, want resource_exhausted naming --write-rate: a batch must spend a token per instance", err)
	}
	// The refused batch took nothing: a single write passes as soon as a
	// token has refilled.
	testutil.Eventually(t, 30*time.Second, "a single registration to pass again", func() bool {
		_, err := rc.Register(ctx, connect.NewRequest(&beaconv1.RegisterRequest{Instance: inst("one", "127.0.0.1")}))
		return err == nil
	})
}
