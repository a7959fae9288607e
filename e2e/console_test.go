package e2e

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"connectrpc.com/connect"
	"github.com/chromedp/chromedp"

	beaconv1 "beacon.dev/beacon/api/beacon/v1"
	"beacon.dev/beacon/api/beacon/v1/beaconv1connect"
	"beacon.dev/beacon/client"
	"beacon.dev/beacon/internal/testutil"
	"beacon.dev/beacon/registry"
	"beacon.dev/beacon/server"
	"beacon.dev/beacon/server/servertest"
)

// chromiumPath finds Debian's chromium; the test command installs it and
// sets BEACON_REQUIRE_CHROMIUM, which turns a missing browser into a
// failure instead of a skip.
func chromiumPath(t testing.TB) string {
	for _, name := range []string{"chromium", "chromium-browser"} {
		if p, err := exec.LookPath(name); err == nil {
			return p
		}
	}
	if os.Getenv("BEACON_REQUIRE_CHROMIUM") != "" {
		t.Fatal("chromium is not installed (BEACON_REQUIRE_CHROMIUM is set)")
	}
	t.Skip("chromium is not installed (apt-get install chromium; make test does as root)")
	return ""
}

// browser starts a headless Chromium that reaches nothing but loopback,
// and returns a tab's context; the browser stops with the test.
func browser(t testing.TB) context.Context {
	opts := append(chromedp.DefaultExecAllocatorOptions[:],
		chromedp.ExecPath(chromiumPath(t)),
		chromedp.NoSandbox,
		chromedp.DisableGPU,
		chromedp.UserDataDir(t.TempDir()),
		chromedp.WindowSize(1280, 900),
		chromedp.Flag("host-resolver-rules", "MAP * ~NOTFOUND , EXCLUDE 127.0.0.1"),
	)
	alloc, cancelAlloc := chromedp.NewExecAllocator(context.Background(), opts...)
	tab, cancelTab := chromedp.NewContext(alloc)
	t.Cleanup(func() {
		cancelTab()
		cancelAlloc()
	})
	if err := chromedp.Do(tab); err != nil { // starts the browser
		t.Fatalf("starting chromium: %v", err)
	}
	return tab
}

// step runs browser actions with a liveness bound (generous: a busy CI
// machine), failing the test with what it was waiting for.
func step(t *testing.T, tab context.Context, what string, actions ...chromedp.Action[chromedp.Void]) {
	t.Helper()
	ctx, cancel := context.WithTimeout(tab, 60*time.Second)
	defer cancel()
	if err := chromedp.Do(ctx, actions...); err != nil {
		page, _ := chromedp.Run(tab, chromedp.Evaluate[string](`document.body ? document.body.innerText.slice(0, 2000) : ""`))
		t.Fatalf("%s: %v\npage:\n%s", what, err, page)
	}
}

// waitJS waits until a JavaScript expression is true in the page.
func waitJS(t *testing.T, tab context.Context, what, expr string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(tab, 60*time.Second)
	defer cancel()
	if _, err := chromedp.Run(ctx, chromedp.Poll[bool](expr)); err != nil {
		page, _ := chromedp.Run(tab, chromedp.Evaluate[string](`document.body ? document.body.innerText.slice(0, 2000) : ""`))
		t.Fatalf("%s: %v\npage:\n%s", what, err, page)
	}
}

// text reads an element's text once it is there.
func text(t *testing.T, tab context.Context, sel string) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(tab, 60*time.Second)
	defer cancel()
	s, err := chromedp.Run(ctx, chromedp.Text(chromedp.CSS(sel)))
	if err != nil {
		t.Fatalf("reading %s: %v", sel, err)
	}
	return s
}

// screenshot saves the page as NAME.png under $BEACON_CONSOLE_SCREENSHOTS
// (the docs' pictures); nothing without it.
func screenshot(t *testing.T, tab context.Context, name string) {
	dir := os.Getenv("BEACON_CONSOLE_SCREENSHOTS")
	if dir == "" {
		return
	}
	png, err := chromedp.Run(tab, chromedp.FullScreenshot(100))
	if err != nil {
		t.Fatalf("screenshot %s: %v", name, err)
	}
	if err := os.WriteFile(filepath.Join(dir, name+".png"), png, 0o644); err != nil {
		t.Fatal(err)
	}
}

type bearerToken string

func (b bearerToken) WrapUnary(next connect.UnaryFunc) connect.UnaryFunc {
	return func(ctx context.Context, req connect.AnyRequest) (connect.AnyResponse, error) {
		if b != "" {
			req.Header().Set("Authorization", "Bearer "+string(b))
		}
		return next(ctx, req)
	}
}
func (b bearerToken) WrapStreamingClient(next connect.StreamingClientFunc) connect.StreamingClientFunc {
	return next
}
func (b bearerToken) WrapStreamingHandler(next connect.StreamingHandlerFunc) connect.StreamingHandlerFunc {
	return next
}

// consoleFixture is a server with ACLs and a console, its management
// token, and API clients acting with it.
type consoleFixture struct {
	srv          *server.Server
	auditLog     string
	mgmt, ro     string // secrets
	mgmtAccessor string
	reg          beaconv1connect.RegistryServiceClient
	kv           beaconv1connect.KVServiceClient
}

func newConsoleFixture(t *testing.T) *consoleFixture {
	cfg := servertest.Config(t, "")
	cfg.ACL = true
	cfg.ConsoleAddr = "127.0.0.1:0"
	cfg.AuditLog = filepath.Join(t.TempDir(), "audit.log")
	srv := servertest.Start(t, cfg)
	ctx := context.Background()
	base := "http://" + srv.Addr()
	boot, err := beaconv1connect.NewAclServiceClient(http.DefaultClient, base).Bootstrap(ctx, connect.NewRequest(&beaconv1.BootstrapRequest{}))
	if err != nil {
		t.Fatal(err)
	}
	f := &consoleFixture{srv: srv, auditLog: cfg.AuditLog, mgmt: boot.Msg.GetToken().GetSecretId(), mgmtAccessor: boot.Msg.GetToken().GetAccessorId()}
	auth := connect.WithInterceptors(bearerToken(f.mgmt))
	acls := beaconv1connect.NewAclServiceClient(http.DefaultClient, base, auth)
	if _, err := acls.PutPolicy(ctx, connect.NewRequest(&beaconv1.PutPolicyRequest{Policy: &beaconv1.AclPolicy{Name: "read-only", Rules: "read service *\nread key *"}})); err != nil {
		t.Fatal(err)
	}
	tok, err := acls.CreateToken(ctx, connect.NewRequest(&beaconv1.CreateTokenRequest{Token: &beaconv1.AclToken{Policies: []string{"read-only"}}}))
	if err != nil {
		t.Fatal(err)
	}
	f.ro = tok.Msg.GetToken().GetSecretId()
	f.reg = beaconv1connect.NewRegistryServiceClient(http.DefaultClient, base, auth)
	f.kv = beaconv1connect.NewKVServiceClient(http.DefaultClient, base, auth)
	return f
}

func (f *consoleFixture) register(t *testing.T, in *beaconv1.Instance) {
	t.Helper()
	if _, err := f.reg.Register(context.Background(), connect.NewRequest(&beaconv1.RegisterRequest{Instance: in})); err != nil {
		t.Fatalf("Register(%s/%s) = %v", in.GetService(), in.GetId(), err)
	}
}

func (f *consoleFixture) kvValue(t *testing.T, key string) string {
	t.Helper()
	resp, err := f.kv.Get(context.Background(), connect.NewRequest(&beaconv1.KVGetRequest{Key: key}))
	if err != nil {
		t.Fatalf("KV Get(%s) = %v", key, err)
	}
	return string(resp.Msg.GetKv().GetValue())
}

func login(t *testing.T, tab context.Context, url, secret string) {
	t.Helper()
	step(t, tab, "logging in",
		chromedp.Navigate(url+"#/login"),
		chromedp.WaitVisible(chromedp.ID("token")),
		chromedp.SetValue(chromedp.ID("token"), secret),
		chromedp.Click(chromedp.ID("login")),
		chromedp.WaitVisible(chromedp.CSS("#services")),
	)
}

// The walk through the console in a real browser: log in, see a
// service appear live after an API registration, drain an instance and
// watch it go, ask why it gets no traffic, edit a KV value and roll it
// back, and be refused with a read-only token.
func TestConsoleInABrowser(t *testing.T) {
	tab := browser(t)
	f := newConsoleFixture(t)
	url := f.srv.ConsoleURL()

	login(t, tab, url, f.mgmt)
	if who := text(t, tab, "#who"); !strings.Contains(who, f.mgmtAccessor) {
		t.Errorf("#who = %q, want the management token's accessor %s", who, f.mgmtAccessor)
	}
	step(t, tab, "the services page's watch connected", chromedp.WaitVisible(chromedp.CSS(`#live[data-state="live"]`)))

	// An application watching orders with the SDK: it acknowledges what it
	// applied, which the propagation view counts.
	sdk, err := client.New([]string{f.srv.Addr()}, client.WithToken(f.mgmt))
	if err != nil {
		t.Fatal(err)
	}
	defer sdk.Close()
	watchCtx, stopWatch := context.WithCancel(context.Background())
	defer stopWatch()
	w, err := sdk.Watch(watchCtx, []string{"orders"})
	if err != nil {
		t.Fatal(err)
	}
	defer w.Close()
	go func() {
		for {
			if _, err := w.Next(watchCtx); err != nil {
				return
			}
		}
	}()

	// Live: registrations made through the API appear without a reload.
	f.register(t, &beaconv1.Instance{Service: "orders", Id: "orders-1", Address: "10.0.0.1", Port: 8080, Zone: "eu-1a", Version: "1.4.2",
		Tags: []string{"grpc"}, Metadata: map[string]string{"team": "checkout"}})
	f.register(t, &beaconv1.Instance{Service: "orders", Id: "orders-2", Address: "10.0.0.2", Port: 8080, Zone: "eu-1b", Version: "1.4.2"})
	f.register(t, &beaconv1.Instance{Service: "orders", Id: "orders-3", Address: "10.0.0.3", Port: 8080, Zone: "eu-1a", Version: "1.5.0-rc1",
		Checks: []*beaconv1.Check{{Name: "ttl", Kind: beaconv1.CheckKind_CHECK_KIND_TTL}}})
	f.register(t, &beaconv1.Instance{Service: "payments", Id: "payments-1", Address: "10.0.1.1", Port: 9090, Zone: "eu-1a"})
	step(t, tab, "orders and payments appearing live",
		chromedp.WaitVisible(chromedp.CSS(`#services tr[data-service="orders"]`)),
		chromedp.WaitVisible(chromedp.CSS(`#services tr[data-service="payments"]`)),
	)
	if n := text(t, tab, `#services tr[data-service="orders"] td:nth-child(2)`); n != "3" {
		t.Errorf("orders' instances cell = %q, want 3", n)
	}
	screenshot(t, tab, "services")

	// A service's instances, live: a drain shows DRAINING.
	step(t, tab, "the orders page",
		chromedp.Navigate(url+"#/services/default/orders"),
		chromedp.WaitVisible(chromedp.CSS(`#instances tr[data-id="orders-1"][data-status="UP"]`)),
		chromedp.Click(chromedp.CSS(`#instances tr[data-id="orders-1"] button[data-action="drain"]`)),
		chromedp.WaitVisible(chromedp.CSS(`#instances tr[data-id="orders-1"][data-status="DRAINING"]`)),
	)
	// The console's write is audited as any API call, under its token.
	testutil.Eventually(t, 30*time.Second, "the drain in the audit log", func() bool {
		b, _ := os.ReadFile(f.auditLog)
		for _, line := range strings.Split(string(b), "\n") {
			if strings.Contains(line, `"operation":"beacon.v1.RegistryService/SetStatus"`) && strings.Contains(line, `"accessor":"`+f.mgmtAccessor+`"`) &&
				strings.Contains(line, "orders-1") {
				return true
			}
		}
		return false
	})
	// Why no traffic: the drain, then a failing check.
	step(t, tab, "explaining the drained instance",
		chromedp.Click(chromedp.CSS(`#instances tr[data-id="orders-1"] button[data-action="explain"]`)),
		chromedp.WaitVisible(chromedp.CSS(`#explain-verdict[data-gets-traffic="false"]`)),
		chromedp.WaitVisible(chromedp.CSS(`#explain li.reason.excludes[data-rule="status"]`)),
	)
	step(t, tab, "explaining the instance whose check fails",
		chromedp.Click(chromedp.CSS(`#instances tr[data-id="orders-3"] button[data-action="explain"]`)),
		chromedp.WaitVisible(chromedp.CSS(`#explain li.reason.excludes[data-rule="check"]`)),
	)
	if detail := text(t, tab, `#explain li.reason.excludes[data-rule="check"]`); !strings.Contains(detail, "ttl") {
		t.Errorf("the check's reason = %q, want it to name the check", detail)
	}
	// The propagation view tracks orders from the page's first look: a
	// change made now is counted as the SDK watcher applies it.
	step(t, tab, "the propagation view tracking", chromedp.WaitVisible(chromedp.CSS(`#propagation-changes`)))
	if _, err := f.reg.SetStatus(context.Background(), connect.NewRequest(&beaconv1.SetStatusRequest{Service: "orders", Id: "orders-2", Status: beaconv1.Status_STATUS_UP})); err != nil {
		t.Fatal(err)
	}
	f.register(t, &beaconv1.Instance{Service: "orders", Id: "orders-4", Address: "10.0.0.4", Port: 8080, Zone: "eu-1b", Version: "1.5.0-rc1"})
	step(t, tab, "orders-4 appearing", chromedp.WaitVisible(chromedp.CSS(`#instances tr[data-id="orders-4"]`)))
	waitJS(t, tab, "the propagation view counting the watcher's acknowledgement",
		`[...document.querySelectorAll('#propagation-changes tr[data-revision]')].some(r => r.cells[2].textContent.trim() === '1' && r.cells[3].textContent.trim() === '1')`)
	screenshot(t, tab, "service")
	// The drained instance deregisters, as lifecycle.Run's drain ends: the
	// row goes.
	if _, err := f.reg.Deregister(context.Background(), connect.NewRequest(&beaconv1.DeregisterRequest{Service: "orders", Id: "orders-1"})); err != nil {
		t.Fatal(err)
	}
	step(t, tab, "the deregistered instance's row going", chromedp.WaitNotPresent(chromedp.CSS(`#instances tr[data-id="orders-1"]`)))

	// KV: edit a value, then roll it back from the history.
	put, err := f.kv.Put(context.Background(), connect.NewRequest(&beaconv1.KVPutRequest{Key: "orders/config", Value: []byte("timeout: 2s\nretries: 2\n")}))
	if err != nil {
		t.Fatal(err)
	}
	first := put.Msg.GetRevision()
	step(t, tab, "opening orders/config",
		chromedp.Navigate(url+"#/kv/default/orders/config"),
		chromedp.WaitVisible(chromedp.ID("kv-value")),
	)
	// The textarea is drawn empty and filled when the value arrives: an
	// edit typed before that is overwritten, and Save stores the old value.
	waitJS(t, tab, "orders/config's value loaded", `document.getElementById('kv-value').value === 'timeout: 2s\nretries: 2\n'`)
	step(t, tab, "editing orders/config",
		chromedp.SetValue(chromedp.ID("kv-value"), "timeout: 5s\nretries: 2\n"),
		chromedp.Click(chromedp.ID("kv-save")),
		chromedp.WaitVisible(chromedp.CSS(fmt.Sprintf(`.kv-rollback[data-version="%d"]`, first))),
	)
	if got := f.kvValue(t, "orders/config"); got != "timeout: 5s\nretries: 2\n" {
		t.Fatalf("after Save, orders/config = %q", got)
	}
	step(t, tab, "diffing against the first version",
		chromedp.Click(chromedp.CSS(fmt.Sprintf(`.kv-diff-select[data-version="%d"]`, first))),
		chromedp.WaitVisible(chromedp.CSS(`#kv-diff pre.diff .del`)),
	)
	screenshot(t, tab, "kv")
	step(t, tab, "rolling back to the first version", chromedp.Click(chromedp.CSS(fmt.Sprintf(`.kv-rollback[data-version="%d"]`, first))))
	testutil.Eventually(t, 60*time.Second, "orders/config rolled back", func() bool {
		return f.kvValue(t, "orders/config") == "timeout: 2s\nretries: 2\n"
	})

	step(t, tab, "the cluster page", chromedp.Navigate(url+"#/cluster"), chromedp.WaitVisible(chromedp.CSS(`#etcd tr[data-name]`)))
	screenshot(t, tab, "cluster")

	// A read-only token: no edit buttons, and a page it may not read says
	// which permission is missing.
	step(t, tab, "logging out", chromedp.Click(chromedp.ID("logout")))
	login(t, tab, url, f.ro)
	step(t, tab, "the orders page, read-only",
		chromedp.Navigate(url+"#/services/default/orders"),
		chromedp.WaitVisible(chromedp.CSS(`#instances tr[data-id="orders-2"]`)),
		chromedp.WaitVisible(chromedp.CSS(`#instances tr[data-id="orders-2"] button[data-action="explain"]`)),
	)
	for _, action := range []string{"drain", "out-of-service", "deregister"} {
		n, err := chromedp.Run(tab, chromedp.Evaluate[int](fmt.Sprintf(`document.querySelectorAll('#instances button[data-action=%q]').length`, action)))
		if err != nil || n != 0 {
			t.Errorf("read-only token: %d %q buttons (%v), want none", n, action, err)
		}
	}
	step(t, tab, "the sessions page", chromedp.Navigate(url+"#/sessions"))
	waitJS(t, tab, "the sessions page refused, naming session:read",
		`(document.getElementById('error') || {textContent: ''}).textContent.includes('session:read')`)
}

// BenchmarkConsoleFirstPaint loads the console's services page in headless
// Chromium over loopback and reports the browser's own first contentful
// paint and the time until the services table is drawn from the API (the
// issue's goal: first paint under 300 ms), with the assets' size.
func BenchmarkConsoleFirstPaint(b *testing.B) {
	tab := browser(b)
	cfg := servertest.Config(b, "")
	cfg.ConsoleAddr = "127.0.0.1:0"
	srv := servertest.Start(b, cfg)
	c, err := client.New([]string{srv.Addr()})
	if err != nil {
		b.Fatal(err)
	}
	defer c.Close()
	for i := range 20 {
		if _, err := c.Register(context.Background(), registry.Instance{Service: fmt.Sprintf("svc-%02d", i), ID: "i1", Address: "10.0.0.1", Port: 80}); err != nil {
			b.Fatal(err)
		}
	}
	var paint, table float64
	for b.Loop() {
		// A new tab each time: a user opening the console (the browser's
		// cache revalidates the assets by ETag).
		page, closePage := chromedp.NewContext(tab)
		ctx, cancel := context.WithTimeout(page, time.Minute)
		err := chromedp.Do(ctx, chromedp.Navigate(srv.ConsoleURL()+"#/services"),
			chromedp.WaitVisible(chromedp.CSS(`#services tr[data-service="svc-19"]`)))
		var timing []float64
		if err == nil {
			timing, err = chromedp.Run(ctx, chromedp.Evaluate[[]float64](`[
			(performance.getEntriesByName('first-contentful-paint')[0] || {startTime: -1}).startTime,
			performance.now()]`))
		}
		cancel()
		closePage()
		if err != nil {
			b.Fatal(err)
		}
		if timing[0] < 0 {
			b.Fatal("no first-contentful-paint entry: the page never painted")
		}
		paint += timing[0]
		table += timing[1]
	}
	b.ReportMetric(paint/float64(b.N), "first-paint-ms")
	b.ReportMetric(table/float64(b.N), "services-table-ms")
	b.ReportMetric(float64(consoleAssetBytes(b, srv)), "asset-bytes")
}

// consoleAssetBytes fetches the console's three files as a browser does.
func consoleAssetBytes(b *testing.B, srv *server.Server) int {
	total := 0
	for _, path := range []string{"", "ui/app.js", "ui/style.css"} {
		resp, err := http.Get(srv.ConsoleURL() + path)
		if err != nil {
			b.Fatal(err)
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		total += len(body)
	}
	return total
}
