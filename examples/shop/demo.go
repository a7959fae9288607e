package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/signal"
	"slices"
	"strings"
	"sync"
	"syscall"
	"time"

	"beacon.dev/beacon/beacongrpc"
	"beacon.dev/beacon/client"
	"beacon.dev/beacon/examples/shop/shopkit"
	"beacon.dev/beacon/examples/shop/shoppb"
)

// runDemo starts a beacon server, the shop's database and every service
// as processes, puts a steady load on the gateway and shows what happens,
// refreshed each second, until interrupted (or --duration); then it stops
// everything cleanly.
func runDemo(args []string) error {
	fs := flag.NewFlagSet("demo", flag.ExitOnError)
	rate := fs.Int("rate", 50, "orders per second sent to the gateway")
	httpAddr := fs.String("http", "127.0.0.1:8080", "the gateway's address")
	duration := fs.Duration("duration", 0, "stop after this long (0: at Ctrl-C)")
	dir := fs.String("dir", "", "working directory (default: a new temporary one, removed at the end)")
	plain := fs.Bool("plain", false, "print the view as plain text, without clearing the screen")
	otlp := fs.String("otlp", "", "every service exports its traces over OTLP/gRPC to this collector (host:port, plaintext)")
	_ = fs.Parse(args)
	if *rate < 1 || *rate > 5000 {
		return fmt.Errorf("--rate must be between 1 and 5000, is %d", *rate)
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	if *duration > 0 {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, *duration)
		defer cancel()
	}
	if *dir == "" {
		d, err := os.MkdirTemp("", "beacon-demo-")
		if err != nil {
			return err
		}
		defer os.RemoveAll(d)
		*dir = d
	}
	fmt.Println("demo: building the shop and beacon …")
	mod, err := shopkit.ModuleDir()
	if err != nil {
		return err
	}
	shopBin, beaconBin, err := shopkit.Build(ctx, mod, *dir)
	if err != nil {
		return err
	}
	cl, err := shopkit.NewCluster(shopBin, beaconBin, *dir)
	if err != nil {
		return err
	}
	cl.OTLP = *otlp
	defer func() {
		fmt.Println("demo: stopping every process (SIGTERM, graceful) …")
		cl.Close()
		fmt.Println("demo: stopped")
	}()
	startCtx, cancel := context.WithTimeout(ctx, 2*time.Minute)
	defer cancel()
	if err := startShop(startCtx, cl, *httpAddr); err != nil {
		return err
	}
	c, err := client.New([]string{cl.Registry})
	if err != nil {
		return err
	}
	defer c.Close()
	ld := newLoad("http://" + *httpAddr + "/orders")
	var wg sync.WaitGroup
	loadCtx, stopLoad := context.WithCancel(ctx)
	wg.Go(func() { ld.run(loadCtx, *rate) })
	// Faults typed on the standard input, one command a line. The reader
	// ends at EOF (no input: the demo just runs) or with the process: a
	// read from a terminal cannot be cancelled.
	f := newFaults(cl)
	go f.read(ctx, os.Stdin)
	tracked := &rates{last: map[string]sample{}}
	tick := time.NewTicker(time.Second)
	defer tick.Stop()
	for done := false; !done; {
		select {
		case <-ctx.Done():
			done = true
		case <-tick.C:
			view(ctx, os.Stdout, c, ld, f, tracked, "http://"+*httpAddr, *plain)
		}
	}
	stopLoad()
	wg.Wait()
	f.wait()
	total, failed := ld.totals()
	fmt.Printf("demo: %d orders placed, %d failed\n", total-failed, failed)
	return nil
}

// startShop starts the registry, the database and the services.
func startShop(ctx context.Context, cl *shopkit.Cluster, gatewayAddr string) error {
	if err := cl.StartRegistry(ctx); err != nil {
		return err
	}
	if err := cl.StartDB(ctx); err != nil {
		return err
	}
	if err := cl.StartBroker(ctx); err != nil {
		return err
	}
	for _, s := range []struct {
		service string
		n       int
	}{{"inventory", 2}, {"payments", 2}, {"orders", 3}, {"tracking", 2}} {
		var args []string
		if s.service == "inventory" {
			args = []string{"--fenced-stock"} // the item's lock and fenced stock writes (docs/locks.md)
		}
		for range s.n {
			if _, err := cl.Start(ctx, s.service, args...); err != nil {
				return err
			}
		}
	}
	_, err := cl.Start(ctx, "gateway", "--listen", gatewayAddr)
	return err
}

// load sends orders at a fixed rate and keeps per-second figures.
type load struct {
	url  string
	http *http.Client

	mu      sync.Mutex
	seconds map[int64]*second // guarded by mu; by Unix second
	total   int               // guarded by mu
	failed  int               // guarded by mu
	lastErr string            // guarded by mu
}

type second struct {
	ok, failed int
	latencies  []time.Duration
	servedBy   map[string]int
}

func newLoad(url string) *load {
	return &load{url: url, http: &http.Client{Timeout: 5 * time.Second}, seconds: map[int64]*second{}}
}

func (l *load) run(ctx context.Context, rate int) {
	var wg sync.WaitGroup
	defer wg.Wait()
	t := time.NewTicker(time.Second / time.Duration(rate))
	defer t.Stop()
	inflight := make(chan struct{}, 256)
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		select {
		case inflight <- struct{}{}:
		default:
			l.record(time.Now(), 0, "", errors.New("more than 256 orders in flight"))
			continue
		}
		wg.Go(func() {
			defer func() { <-inflight }()
			start := time.Now()
			served, err := l.order(ctx)
			if ctx.Err() != nil {
				return // stopping: not the shop's failure
			}
			l.record(start, time.Since(start), served, err)
		})
	}
}

// demoUsers is how many users the load plays: each order is one user's
// view of the item, then the order.
const demoUsers = 50

func (l *load) order(ctx context.Context) (string, error) {
	n := time.Now().Nanosecond()
	item, user := items[n%len(items)], fmt.Sprintf("u-%d", n/7%demoUsers)
	if view, err := http.NewRequestWithContext(ctx, http.MethodGet, strings.TrimSuffix(l.url, "/orders")+"/items/"+item+"?user="+user, nil); err == nil {
		if resp, err := l.http.Do(view); err == nil {
			resp.Body.Close()
		}
	}
	body, _ := json.Marshal(orderRequest{Item: item, Quantity: 1, User: user})
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, l.url, bytes.NewReader(body))
	if err != nil {
		return "", err
	}
	resp, err := l.http.Do(req)
	if err != nil {
		return "", err
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(io.LimitReader(resp.Body, 4096))
	if resp.StatusCode != http.StatusOK {
		return "", fmt.Errorf("%s: %s", resp.Status, bytes.TrimSpace(b))
	}
	var out shoppb.PlaceOrderResponse
	if err := json.Unmarshal(b, &out); err != nil {
		return "", err
	}
	return out.ServedBy, nil
}

func (l *load) record(at time.Time, d time.Duration, servedBy string, err error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	s := l.seconds[at.Unix()]
	if s == nil {
		s = &second{servedBy: map[string]int{}}
		l.seconds[at.Unix()] = s
		delete(l.seconds, at.Unix()-60)
	}
	l.total++
	if err != nil {
		s.failed++
		l.failed++
		l.lastErr = err.Error()
		return
	}
	s.ok++
	s.latencies = append(s.latencies, d)
	s.servedBy[servedBy]++
}

func (l *load) totals() (total, failed int) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.total, l.failed
}

// window sums the last n complete seconds.
func (l *load) window(n int) (ok, failed int, p50, p99 time.Duration, servedBy map[string]int, lastErr string) {
	l.mu.Lock()
	defer l.mu.Unlock()
	servedBy = map[string]int{}
	var lat []time.Duration
	now := time.Now().Unix()
	for sec := now - int64(n); sec < now; sec++ {
		if s := l.seconds[sec]; s != nil {
			ok, failed = ok+s.ok, failed+s.failed
			lat = append(lat, s.latencies...)
			for k, v := range s.servedBy {
				servedBy[k] += v
			}
		}
	}
	slices.Sort(lat)
	q := func(f float64) time.Duration {
		if len(lat) == 0 {
			return 0
		}
		return lat[min(len(lat)-1, int(f*float64(len(lat))))]
	}
	return ok, failed, q(0.5), q(0.99), servedBy, l.lastErr
}

// view prints the registry's instances, the load's last seconds, the
// gateway's outlier detection and the faults injected.
func view(ctx context.Context, w io.Writer, c *client.Client, l *load, f *faults, r *rates, gateway string, plain bool) {
	var b strings.Builder
	if !plain {
		b.WriteString("\033[H\033[2J")
	}
	fmt.Fprintf(&b, "beacon demo — %s — Ctrl-C stops everything gracefully\n\n", time.Now().Format(time.TimeOnly))
	qctx, cancel := context.WithTimeout(ctx, 500*time.Millisecond)
	defer cancel()
	_, _, _, _, served5, _ := l.window(5)
	ok60, _, _, _, served60, _ := l.window(60)
	ok5 := 0
	for _, n := range served5 {
		ok5 += n
	}
	number := map[string]int{}
	for i, p := range f.orders() {
		number[p.ID] = i + 1
	}
	faultLog, state := f.recent()
	for _, svc := range []string{"gateway", "orders", "inventory", "payments"} {
		snap, err := c.Instances(qctx, svc, client.All())
		if err != nil {
			fmt.Fprintf(&b, "%-10s registry unreachable: %v\n", svc, err)
			continue
		}
		if svc != "orders" {
			fmt.Fprintf(&b, "%-10s %d instance(s)\n", svc, len(snap.Instances))
			for _, in := range snap.Instances {
				fmt.Fprintf(&b, "    %-36s %-21s %-8s %s\n", in.ID, in.HostPort(), in.Status, in.Health)
			}
			continue
		}
		fmt.Fprintf(&b, "%-10s %d instance(s)                                           answered: last 5 s  last 60 s\n", svc, len(snap.Instances))
		for _, in := range snap.Instances {
			n := "  "
			if i, ok := number[in.ID]; ok {
				n = fmt.Sprintf("%d.", i)
			}
			fmt.Fprintf(&b, "  %s %-36s %-21s %-8s %-8s %-5s %7.1f %%  %7.1f %%\n", n, in.ID, in.HostPort(), in.Status, in.Health,
				state[in.ID], share(served5[in.ID], ok5), share(served60[in.ID], ok60))
		}
	}
	ok, failed, p50, p99, _, lastErr := l.window(5)
	fmt.Fprintf(&b, "\nload, last 5 s: %.1f orders/s, %d failed, p50 %v, p99 %v\n", float64(ok+failed)/5, failed,
		p50.Round(100*time.Microsecond), p99.Round(100*time.Microsecond))
	if st, ok := gatewayOutliers(qctx, gateway)["orders"]; ok {
		fmt.Fprintf(&b, "gateway → orders: %d endpoints, %d ejected now (ejections %d, readmitted %d)\n", st.Ready, st.Ejected, st.Ejections, st.Readmitted)
	}
	if st, err := c.KV().RolloutStatus(qctx, pricingKey); err == nil {
		fmt.Fprintf(&b, "%s\n", pricingLine(st, len(f.orders())))
	}
	for _, line := range trackingLines(qctx, c, r) {
		fmt.Fprintf(&b, "%s\n", line)
	}
	if total, allFailed := l.totals(); allFailed > 0 {
		fmt.Fprintf(&b, "since start: %d orders, %d failed; last error: %s\n", total, allFailed, lastErr)
	}
	b.WriteString("\n(answered: the instance whose answer the gateway used; a hedge's loser is not counted.\n" +
		" P2C sends each call to the less loaded, faster of two instances: shares move with every latency spike.)\n")
	fmt.Fprintf(&b, "\ntype a command and Enter: %s\n", faultHelp)
	for _, line := range faultLog {
		fmt.Fprintf(&b, "  %s\n", line)
	}
	fmt.Fprint(w, b.String())
}

// trackingLines shows each tracking instance's consumer: events handled
// per second since the last view, and its lag (events waiting on the
// broker past what it finished).
func trackingLines(ctx context.Context, c *client.Client, r *rates) []string {
	snap, err := c.Instances(ctx, "tracking")
	if err != nil || len(snap.Instances) == 0 {
		return nil
	}
	lines := []string{fmt.Sprintf("tracking (consumer group %q on topic %q, %d members):", trackingGroup, behaviourTopic, len(snap.Instances))}
	for _, in := range snap.Instances {
		req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+in.HostPort()+"/stats", nil)
		if err != nil {
			continue
		}
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			lines = append(lines, fmt.Sprintf("    %-36s unreachable", in.ID))
			continue
		}
		var st struct{ Handled, Lag, Duplicates int64 }
		_ = json.NewDecoder(io.LimitReader(resp.Body, 4096)).Decode(&st)
		resp.Body.Close()
		rate := r.rate(in.ID, st.Handled)
		lines = append(lines, fmt.Sprintf("    %-36s %7.1f events/s  lag %d  handled %d (%d redeliveries absorbed)", in.ID, rate, st.Lag, st.Handled, st.Duplicates))
	}
	return lines
}

// rates turns the tracking instances' handled counts into events/s
// between two views.
type rates struct {
	mu   sync.Mutex
	last map[string]sample // guarded by mu; by instance
}

type sample struct {
	n  int64
	at time.Time
}

func (r *rates) rate(id string, n int64) float64 {
	r.mu.Lock()
	defer r.mu.Unlock()
	now := time.Now()
	prev, ok := r.last[id]
	r.last[id] = sample{n, now}
	if !ok || n < prev.n || !now.After(prev.at) {
		return 0
	}
	return float64(n-prev.n) / now.Sub(prev.at).Seconds()
}

func share(n, of int) float64 { return 100 * float64(n) / float64(max(of, 1)) }

// gatewayOutliers reads the gateway's outlier detection; nothing when it
// does not answer.
func gatewayOutliers(ctx context.Context, gateway string) map[string]beacongrpc.OutlierStats {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, gateway+"/debug/outliers", nil)
	if err != nil {
		return nil
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return nil
	}
	defer resp.Body.Close()
	var out map[string]beacongrpc.OutlierStats
	_ = json.NewDecoder(io.LimitReader(resp.Body, 1<<16)).Decode(&out)
	return out
}

// pricingLine says which pricing the orders instances run: the config's
// revision and how many of them reported applying (or refusing) it.
func pricingLine(st client.RolloutStatus, instances int) string {
	if st.Current == nil {
		return fmt.Sprintf("pricing (%s): not set, the default (no discount); `discount N` sets it", pricingKey)
	}
	applied, refused := 0, 0
	for _, r := range st.Reports {
		switch {
		case r.Revision == st.Current.ModRevision && r.Error == "":
			applied++
		case r.Revision == st.Current.ModRevision:
			refused++
		}
	}
	line := fmt.Sprintf("pricing (%s) %s at revision %d: applied by %d of %d orders instances", pricingKey, st.Current.Value, st.Current.ModRevision, applied, instances)
	if refused > 0 {
		line += fmt.Sprintf(", refused by %d", refused)
	}
	return line
}
