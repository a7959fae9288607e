package bench

import (
	"bytes"
	"context"
	"flag"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/http"
	"os"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"connectrpc.com/connect"

	beaconv1 "beacon.dev/beacon/api/beacon/v1"
	"beacon.dev/beacon/api/beacon/v1/beaconv1connect"
	"beacon.dev/beacon/client"
	"beacon.dev/beacon/internal/testutil"
	"beacon.dev/beacon/internal/testutil/blackhole"
	"beacon.dev/beacon/registry"
)

// The soak: a normal client registers, watches and heartbeats against a
// beacon server process, first alone (the idle phase), then beside every
// kind of hostile client at once (the hostile phase), in the same run.
// It reports the normal client's p99 and failures in each phase and the
// server's peak RSS, descriptors and goroutines, and whether they came back
// to the baseline after the hostiles stopped.
//
// BenchmarkSoak runs each phase for -soak.duration (10 minutes: make
// bench); TestSoak, in the suite, for -soak.short (15 s) and asserts
// counts and states only — no failure, no lost session, every hostile
// refused as documented, resources back to the baseline.
var (
	soakDuration = flag.Duration("soak.duration", 10*time.Minute, "BenchmarkSoak: length of each phase")
	soakShort    = flag.Duration("soak.short", 15*time.Second, "TestSoak: length of each phase")
)

// soakServerArgs shorten the timeouts so that hostile connections are cut
// within a phase of the short run, and lower the per-connection write rate
// so that one hostile connection can pass it without taking the machine's
// two cores (at the default 1000/s, writing at the limit is a load test of
// its own).
var soakServerArgs = []string{"--write-timeout", "5s", "--read-header-timeout", "5s", "--write-rate", "50", "--write-burst", "50"}

const (
	soakBigServices     = 300 // the namespace the stalled watchers ask for (~1.2 MB)
	soakStalledWatchers = 50
	soakIdleConns       = 200
	soakDropInstances   = 40 // each with 6 HTTP, 1 TCP and 1 gRPC check at 200 ms
	soakFloodIDs        = 10000
	soakWriteRate       = 150 // per second, three times the soak server's --write-rate 50
)

// soakPhase is what one phase measured.
type soakPhase struct {
	name                  string
	ops                   int
	failures              []string
	p50, p99              time.Duration
	peakRSS               float64
	peakFDs, peakRoutines int
}

// soakCounters are the hostiles' own counts: what they tried and what the
// server answered.
type soakCounters struct {
	stalledOpened, idleOpened, idleCut    atomic.Int64
	oversize, oversize413, oversizeOther  atomic.Int64
	writes, writes200, writes429, writesX atomic.Int64
	floodBatches, floodResults            atomic.Int64
}

type soak struct {
	tb   testing.TB
	srv  *serverProcess
	pid  string
	http *http.Client
}

func runSoak(tb testing.TB, phase time.Duration) (idle, hostile soakPhase, base, after soakSample, c *soakCounters) {
	s := &soak{tb: tb, srv: startServerProcess(tb, soakServerArgs...)}
	s.pid = strconv.Itoa(s.srv.cmd.Process.Pid)
	s.http = &http.Client{Timeout: 30 * time.Second}
	ctx, cancel := context.WithTimeout(context.Background(), 2*phase+10*time.Minute)
	defer cancel()
	s.seedBigNamespace(ctx)
	base = s.settle(ctx, soakSample{}, 0)

	idle = s.phase(ctx, "idle", phase, nil)
	c = new(soakCounters)
	hostile = s.phase(ctx, "hostile", phase, c)
	// Back to the baseline: goroutines and descriptors within a margin
	// (connections closing, the checks' last probes).
	after = s.settle(ctx, base, 64)
	return idle, hostile, base, after, c
}

// soakSample is one reading of the server process.
type soakSample struct {
	rss            float64
	fds, routines  int
	writeTimeouts  float64
	refusals       map[string]float64
	keepaliveFails float64
}

var refusalRE = regexp.MustCompile(`(?m)^beacon_limit_refusals_total\{limit="([^"]+)"\} (\S+)$`)

func (s *soak) sample() (soakSample, error) {
	var out soakSample
	resp, err := s.http.Get("http://" + s.srv.addr + "/metrics")
	if err != nil {
		return out, err
	}
	body, err := io.ReadAll(resp.Body)
	resp.Body.Close()
	if err != nil {
		return out, err
	}
	metric := func(name string) float64 {
		m := regexp.MustCompile(`(?m)^` + regexp.QuoteMeta(name) + ` (\S+)$`).FindSubmatch(body)
		if m == nil {
			return 0
		}
		v, _ := strconv.ParseFloat(string(m[1]), 64)
		return v
	}
	out.routines = int(metric("go_goroutines"))
	out.writeTimeouts = metric("beacon_write_timeouts_total")
	out.refusals = map[string]float64{}
	for _, m := range refusalRE.FindAllSubmatch(body, -1) {
		v, _ := strconv.ParseFloat(string(m[2]), 64)
		out.refusals[string(m[1])] = v
	}
	data, err := os.ReadFile("/proc/" + s.pid + "/status")
	if err != nil {
		return out, err
	}
	if m := regexp.MustCompile(`VmRSS:\s+(\d+) kB`).FindSubmatch(data); m != nil {
		kb, _ := strconv.ParseFloat(string(m[1]), 64)
		out.rss = kb * 1024
	}
	ents, err := os.ReadDir("/proc/" + s.pid + "/fd")
	if err != nil {
		return out, err
	}
	out.fds = len(ents)
	return out, nil
}

// settle waits until the server's goroutines and descriptors are within
// margin of base (any, when margin is 0) and steady, and returns the
// reading.
func (s *soak) settle(ctx context.Context, base soakSample, margin int) soakSample {
	var last soakSample
	steady := 0
	for steady < 3 {
		if ctx.Err() != nil {
			s.tb.Fatalf("the server did not come back to its baseline (%d goroutines, %d fds; last %d, %d)", base.routines, base.fds, last.routines, last.fds)
		}
		select { // the sampling period
		case <-ctx.Done():
			continue
		case <-time.After(time.Second):
		}
		cur, err := s.sample()
		if err != nil {
			s.tb.Fatal(err)
		}
		if margin > 0 && (cur.routines > base.routines+margin || cur.fds > base.fds+margin) {
			steady = 0
		} else if abs(cur.routines-last.routines) <= 2 && abs(cur.fds-last.fds) <= 2 {
			steady++
		}
		last = cur
	}
	return last
}

func abs(x int) int { return max(x, -x) }

// seedBigNamespace registers the services the stalled watchers ask for,
// from several connections (each under the soak server's --write-rate).
func (s *soak) seedBigNamespace(ctx context.Context) {
	meta := map[string]string{}
	for i := range 8 {
		meta[fmt.Sprint("key-", i)] = strings.Repeat("v", 480)
	}
	const seeders = 6
	errs := make(chan error, seeders)
	for w := range seeders {
		go func() {
			c, err := client.New([]string{s.srv.addr}, client.WithNamespace("soak-big"))
			if err != nil {
				errs <- err
				return
			}
			defer c.Close()
			for i := w; i < soakBigServices; i += seeders {
				in := registry.Instance{Service: fmt.Sprintf("svc-%03d", i), ID: "i-1", Address: "127.0.0.1", Port: 1000 + i, Metadata: meta}
				for {
					_, err := c.Register(ctx, in)
					if err == nil {
						break
					}
					// Over --write-rate: wait as a good client does.
					if !strings.Contains(err.Error(), "resource_exhausted") || ctx.Err() != nil {
						errs <- err
						return
					}
					time.Sleep(100 * time.Millisecond)
				}
			}
			errs <- nil
		}()
	}
	for range seeders {
		if err := <-errs; err != nil {
			s.tb.Fatalf("seeding: %v", err)
		}
	}
}

// phase runs the normal client for d, beside the hostiles if c is not nil.
func (s *soak) phase(ctx context.Context, name string, d time.Duration, c *soakCounters) soakPhase {
	pctx, stop := context.WithTimeout(ctx, d)
	defer stop()
	var wg sync.WaitGroup
	if c != nil {
		s.startHostiles(pctx, &wg, c)
	}
	res := soakPhase{name: name}
	var mu sync.Mutex
	wg.Add(1)
	go func() { // sample the server's resources every second
		defer wg.Done()
		tick := time.NewTicker(time.Second)
		defer tick.Stop()
		for {
			select {
			case <-pctx.Done():
				return
			case <-tick.C:
			}
			cur, err := s.sample()
			if err != nil {
				mu.Lock()
				res.failures = append(res.failures, "scrape: "+err.Error())
				mu.Unlock()
				continue
			}
			mu.Lock()
			res.peakRSS = max(res.peakRSS, cur.rss)
			res.peakFDs = max(res.peakFDs, cur.fds)
			res.peakRoutines = max(res.peakRoutines, cur.routines)
			mu.Unlock()
		}
	}()
	lat, fails := s.normalClient(pctx, name)
	wg.Wait()
	if c != nil {
		s.stopHostiles(ctx)
	}
	res.failures = append(res.failures, fails...)
	res.ops = len(lat)
	slices.Sort(lat)
	if len(lat) > 0 {
		res.p50 = lat[len(lat)/2]
		res.p99 = lat[min(len(lat)-1, len(lat)*99/100)]
	}
	return res
}

// normalClient is a well-behaved service: a session with the default TTL
// (10 s), an instance it updates every 50 ms, and a watch on its service;
// one operation is an update until its watch has seen it. A session that
// expires (renewals starved for 10 s) is a failure.
func (s *soak) normalClient(ctx context.Context, phase string) (lat []time.Duration, failures []string) {
	fail := func(format string, args ...any) {
		failures = append(failures, fmt.Sprintf(phase+": "+format, args...))
	}
	c, err := client.New([]string{s.srv.addr}, client.WithNamespace("soak-normal"))
	if err != nil {
		s.tb.Fatal(err)
	}
	defer c.Close()
	// The session and the watch live until this returns; the phase's end
	// must not break the operation in flight.
	life, end := context.WithCancel(context.WithoutCancel(ctx))
	defer end()
	var expired atomic.Int64
	sess, err := c.NewSession(life, client.WithEvents(func(ev client.SessionEvent) {
		if ev.Kind == client.SessionExpired {
			expired.Add(1)
		}
	}))
	if err != nil {
		fail("creating the session: %v", err)
		return nil, failures
	}
	defer sess.Close(context.Background())
	w, err := c.Watch(life, []string{"normal"})
	if err != nil {
		fail("watching: %v", err)
		return nil, failures
	}
	defer w.Close()
	tick := time.NewTicker(50 * time.Millisecond)
	defer tick.Stop()
	for seq := 0; ; seq++ {
		select {
		case <-ctx.Done():
			if n := expired.Load(); n > 0 {
				fail("the session expired %d times", n)
			}
			return lat, failures
		case <-tick.C:
		}
		// Each operation has 30 s; the phase's end is no failure.
		octx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		t0 := time.Now()
		rev, err := sess.Register(octx, registry.Instance{Service: "normal", ID: "n-1", Address: "127.0.0.1", Port: 9000, Metadata: map[string]string{"seq": strconv.Itoa(seq)}})
		if err == nil {
			for {
				if snap, ok := w.Snapshot("normal"); ok && snap.Revision >= rev {
					break
				}
				if _, err = w.Next(octx); err != nil {
					err = fmt.Errorf("watch did not see revision %d: %w", rev, err)
					break
				}
			}
		}
		cancel()
		if err != nil {
			fail("op %d: %v", seq, err)
			continue
		}
		lat = append(lat, time.Since(t0))
	}
}

// startHostiles starts every hostile client; each stops when ctx ends.
func (s *soak) startHostiles(ctx context.Context, wg *sync.WaitGroup, c *soakCounters) {
	s.startDroppingChecks(ctx)
	for _, f := range []func(context.Context, *soakCounters){s.stalledWatchers, s.idleConns, s.oversizeBodies, s.rateWriter, s.keepAliveFlood} {
		wg.Add(1)
		go func() { defer wg.Done(); f(ctx, c) }()
	}
}

// startDroppingChecks registers instances whose checks probe an address
// that drops SYNs.
func (s *soak) startDroppingChecks(ctx context.Context) {
	addr := blackhole.Listener(s.tb)
	host, portStr, _ := net.SplitHostPort(addr)
	port, _ := strconv.Atoi(portStr)
	c, err := client.New([]string{s.srv.addr}, client.WithNamespace("soak-drop"))
	if err != nil {
		s.tb.Fatal(err)
	}
	defer c.Close()
	var checks []registry.Check
	for i := range 6 {
		checks = append(checks, registry.Check{Name: fmt.Sprint("http-", i), Kind: registry.CheckHTTP, Interval: 200 * time.Millisecond, Timeout: 200 * time.Millisecond})
	}
	checks = append(checks,
		registry.Check{Name: "tcp", Kind: registry.CheckTCP, Interval: 200 * time.Millisecond, Timeout: 200 * time.Millisecond},
		registry.Check{Name: "grpc", Kind: registry.CheckGRPC, Interval: 200 * time.Millisecond, Timeout: 200 * time.Millisecond})
	for i := range soakDropInstances {
		in := registry.Instance{Service: "drop", ID: fmt.Sprint("d-", i), Address: host, Port: port, Checks: registry.CloneChecks(checks)}
		if _, err := c.Register(ctx, in); err != nil {
			s.tb.Fatalf("registering the dropping checks: %v", err)
		}
	}
}

func (s *soak) stopHostiles(ctx context.Context) {
	c, err := client.New([]string{s.srv.addr}, client.WithNamespace("soak-drop"))
	if err != nil {
		s.tb.Fatal(err)
	}
	defer c.Close()
	for i := range soakDropInstances {
		if _, err := c.Deregister(ctx, "drop", fmt.Sprint("d-", i)); err != nil {
			s.tb.Fatalf("deregistering the dropping checks: %v", err)
		}
	}
}

// stalledWatchers keeps soakStalledWatchers watches of the big namespace
// open over HTTP/2 and never reads them: once a stream's 64 KB window is
// full the server's writes to it block, as to a frozen client. The server
// cuts them after --write-timeout; they are opened again every 10 s.
func (s *soak) stalledWatchers(ctx context.Context, c *soakCounters) {
	for ctx.Err() == nil {
		p := new(http.Protocols)
		p.SetUnencryptedHTTP2(true)
		tr := &http.Transport{Protocols: p, HTTP2: &http.HTTP2Config{MaxReceiveBufferPerStream: 64 << 10}}
		wctx, cancel := context.WithCancel(ctx)
		var bodies []io.Closer
		for range soakStalledWatchers {
			req, _ := http.NewRequestWithContext(wctx, "GET", "http://"+s.srv.addr+"/v1/watch?namespace=soak-big", nil)
			resp, err := tr.RoundTrip(req)
			if err != nil {
				break
			}
			c.stalledOpened.Add(1)
			bodies = append(bodies, resp.Body) // never read
		}
		select {
		case <-ctx.Done():
		case <-time.After(10 * time.Second):
		}
		cancel()
		for _, b := range bodies {
			b.Close()
		}
		tr.CloseIdleConnections()
	}
}

// idleConns keeps soakIdleConns connections open that never send a
// request; each is opened again when the server closes it.
func (s *soak) idleConns(ctx context.Context, c *soakCounters) {
	var wg sync.WaitGroup
	for range soakIdleConns {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for ctx.Err() == nil {
				conn, err := (&net.Dialer{}).DialContext(ctx, "tcp", s.srv.addr)
				if err != nil {
					return
				}
				c.idleOpened.Add(1)
				stop := context.AfterFunc(ctx, func() { conn.Close() })
				_, err = conn.Read(make([]byte, 1))
				if stop() && err != nil {
					c.idleCut.Add(1) // closed by the server, not by us
				}
				conn.Close()
			}
		}()
	}
	wg.Wait()
}

// oversizeBodies sends 2 MB registrations, one after another.
func (s *soak) oversizeBodies(ctx context.Context, c *soakCounters) {
	body := bytes.Repeat([]byte(" "), 2<<20)
	hc := &http.Client{}
	defer hc.CloseIdleConnections()
	for ctx.Err() == nil {
		req, _ := http.NewRequestWithContext(ctx, "POST", "http://"+s.srv.addr+beaconv1connect.RegistryServiceRegisterProcedure, bytes.NewReader(body))
		req.Header.Set("Content-Type", "application/json")
		c.oversize.Add(1)
		resp, err := hc.Do(req)
		switch {
		case err != nil:
			// The server answers 413 and closes before reading the rest,
			// so the client may see its write fail instead.
			c.oversizeOther.Add(1)
		case resp.StatusCode == http.StatusRequestEntityTooLarge:
			c.oversize413.Add(1)
		default:
			c.oversizeOther.Add(1)
		}
		if resp != nil {
			io.Copy(io.Discard, resp.Body)
			resp.Body.Close()
		}
	}
}

// rateWriter registers on one HTTP/2 connection at soakWriteRate per
// second, over the server's per-connection --write-rate, from 8 callers.
func (s *soak) rateWriter(ctx context.Context, c *soakCounters) {
	tr := testutil.H2CTransport()
	defer tr.CloseIdleConnections()
	hc := &http.Client{Transport: tr}
	tick := time.NewTicker(time.Second / soakWriteRate)
	defer tick.Stop()
	var wg sync.WaitGroup
	defer wg.Wait()
	for w := range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := w; ; i += 8 {
				select {
				case <-ctx.Done():
					return
				case <-tick.C:
				}
				body := fmt.Sprintf(`{"instance":{"namespace":"soak-rate","service":"rate","id":"r-%d","address":"127.0.0.1","port":9000}}`, i%100)
				req, _ := http.NewRequestWithContext(ctx, "POST", "http://"+s.srv.addr+beaconv1connect.RegistryServiceRegisterProcedure, strings.NewReader(body))
				req.Header.Set("Content-Type", "application/json")
				c.writes.Add(1)
				resp, err := hc.Do(req)
				switch {
				case err != nil:
					c.writesX.Add(1)
					continue
				case resp.StatusCode == http.StatusOK:
					c.writes200.Add(1)
				case resp.StatusCode == http.StatusTooManyRequests:
					c.writes429.Add(1)
				default:
					c.writesX.Add(1)
				}
				io.Copy(io.Discard, resp.Body)
				resp.Body.Close()
			}
		}()
	}
}

// keepAliveFlood sends batches of soakFloodIDs made-up session ids on one
// KeepAliveStream as fast as the stream takes them.
func (s *soak) keepAliveFlood(ctx context.Context, c *soakCounters) {
	hc := &http.Client{Transport: testutil.H2CTransport()}
	defer hc.CloseIdleConnections()
	rpc := beaconv1connect.NewRegistryServiceClient(hc, "http://"+s.srv.addr, connect.WithGRPC())
	for ctx.Err() == nil {
		stream := rpc.KeepAliveStream(ctx)
		done := make(chan struct{})
		go func() {
			defer close(done)
			for {
				res, err := stream.Receive()
				if err != nil {
					return
				}
				c.floodResults.Add(int64(len(res.GetResults())))
			}
		}()
		for ctx.Err() == nil {
			ids := make([]int64, soakFloodIDs)
			for i := range ids {
				ids[i] = rand.Int64()
			}
			if err := stream.Send(&beaconv1.KeepAliveBatch{SessionIds: ids}); err != nil {
				break
			}
			c.floodBatches.Add(1)
		}
		stream.CloseRequest()
		stream.CloseResponse()
		<-done
	}
}

func (p soakPhase) String() string {
	return fmt.Sprintf("%s: %d ops, %d failures, p50 %.1f ms, p99 %.1f ms; server peak RSS %.0f MB, %d fds, %d goroutines",
		p.name, p.ops, len(p.failures), ms(p.p50), ms(p.p99), p.peakRSS/(1<<20), p.peakFDs, p.peakRoutines)
}

func (c *soakCounters) String() string {
	return fmt.Sprintf("stalled watchers opened %d; idle connections opened %d, cut by the server %d; oversize bodies %d (413: %d, other: %d); rate writes %d (200: %d, 429: %d, other: %d); keep-alive flood %d batches of %d ids, %d results",
		c.stalledOpened.Load(), c.idleOpened.Load(), c.idleCut.Load(), c.oversize.Load(), c.oversize413.Load(), c.oversizeOther.Load(),
		c.writes.Load(), c.writes200.Load(), c.writes429.Load(), c.writesX.Load(), c.floodBatches.Load(), soakFloodIDs, c.floodResults.Load())
}

func logSoak(tb testing.TB, idle, hostile soakPhase, base, after soakSample, c *soakCounters) {
	tb.Logf("baseline: RSS %.0f MB, %d fds, %d goroutines", base.rss/(1<<20), base.fds, base.routines)
	tb.Log(idle)
	tb.Log(hostile)
	tb.Logf("hostiles: %s", c)
	tb.Logf("server: write timeouts %.0f, refusals %v", after.writeTimeouts, after.refusals)
	tb.Logf("after: RSS %.0f MB, %d fds, %d goroutines", after.rss/(1<<20), after.fds, after.routines)
	for _, f := range append(idle.failures, hostile.failures...) {
		tb.Logf("failure: %s", f)
	}
}

// TestSoak is the soak's short run: the normal client sees no failure and
// no lost session beside the hostiles, every hostile meets the limit meant
// for it, and the server comes back to its baseline.
func TestSoak(t *testing.T) {
	idle, hostile, base, after, c := runSoak(t, *soakShort)
	logSoak(t, idle, hostile, base, after, c)
	if n := len(idle.failures) + len(hostile.failures); n > 0 {
		t.Errorf("the normal client failed %d times", n)
	}
	if idle.ops == 0 || hostile.ops == 0 {
		t.Errorf("the normal client did nothing (idle %d ops, hostile %d ops)", idle.ops, hostile.ops)
	}
	checks := []struct {
		what string
		ok   bool
	}{
		{"oversize bodies refused with 413", c.oversize413.Load() > 0},
		{"writes over the rate refused with 429", c.writes429.Load() > 0 && after.refusals["write-rate"] > 0},
		{"writes under the rate served", c.writes200.Load() > 0},
		{"idle connections cut by the server", c.idleCut.Load() > 0},
		{"stalled watchers cut after --write-timeout", after.writeTimeouts > 0},
		{"the keep-alive flood answered", c.floodResults.Load() > 0},
	}
	for _, ch := range checks {
		if !ch.ok {
			t.Errorf("not seen: %s", ch.what)
		}
	}
}

// BenchmarkSoak: the normal client's p99 beside the hostiles, as a ratio
// to its p99 on the idle server in the same run, and the server's peaks.
func BenchmarkSoak(b *testing.B) {
	for range b.N {
		idle, hostile, base, after, c := runSoak(b, *soakDuration)
		logSoak(b, idle, hostile, base, after, c)
		b.ReportMetric(ms(idle.p99), "idle-p99-ms")
		b.ReportMetric(ms(hostile.p99), "hostile-p99-ms")
		if idle.p99 > 0 {
			b.ReportMetric(float64(hostile.p99)/float64(idle.p99), "p99-ratio")
		}
		b.ReportMetric(float64(len(idle.failures)+len(hostile.failures)), "failures")
		b.ReportMetric(hostile.peakRSS/(1<<20), "peak-rss-MB")
		b.ReportMetric(float64(hostile.peakFDs), "peak-fds")
		b.ReportMetric(float64(hostile.peakRoutines), "peak-goroutines")
		b.ReportMetric(float64(after.routines-base.routines), "goroutines-left")
		b.ReportMetric(float64(after.fds-base.fds), "fds-left")
	}
}
