package server_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"

	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"
	clientv3 "go.etcd.io/etcd/client/v3"

	"beacon.dev/beacon/internal/testutil"
	"beacon.dev/beacon/server"
	"beacon.dev/beacon/server/servertest"
)

// spaceQuota is the small quota the space tests fill.
const spaceQuota = 16 << 20

// syncBuffer is a log sink the server writes to while the test reads it.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (b *syncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.b.Write(p)
}

func (b *syncBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.b.String()
}

func spaceServer(t *testing.T) (*server.Server, *syncBuffer) {
	t.Helper()
	cfg := servertest.Config(t, "")
	cfg.EtcdQuotaBackendBytes = spaceQuota
	cfg.EtcdSpaceCheckInterval = 50 * time.Millisecond
	logs := &syncBuffer{}
	cfg.Logger = slog.New(slog.NewTextHandler(logs, &slog.HandlerOptions{Level: slog.LevelInfo}))
	return servertest.Start(t, cfg), logs
}

// fillEtcd puts value-sized records until etcd refuses with NOSPACE:
// under distinct keys (live data no compaction frees) or, with keys 1,
// over one key again and again (history only). It returns the puts made.
func fillEtcd(ctx context.Context, t *testing.T, cli *clientv3.Client, prefix string, keys, valueSize int) int {
	t.Helper()
	value := strings.Repeat("x", valueSize)
	limit := 20 * spaceQuota / valueSize // far more than fits
	for i := range limit {
		pctx, cancel := context.WithTimeout(ctx, 30*time.Second)
		_, err := cli.Put(pctx, fmt.Sprintf("%s%04d", prefix, i%keys), value)
		cancel()
		if errors.Is(err, rpctypes.ErrNoSpace) {
			return i
		}
		if err != nil {
			t.Fatalf("Put #%d = %v, want nil or %v", i, err, rpctypes.ErrNoSpace)
		}
	}
	t.Fatalf("%d puts of %d bytes never hit the %d-byte quota", limit, valueSize, spaceQuota)
	return 0
}

func httpGet(t *testing.T, url string) (int, string) {
	t.Helper()
	resp, err := http.Get(url)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b)
}

func metricIs(t *testing.T, addr, name string, want float64) func() bool {
	return func() bool {
		v, ok := testutil.Metric(t, addr, name)
		return ok && v == want
	}
}

func registerBody(id string) string {
	return `{"instance":{"service":"orders","id":"` + id + `","address":"127.0.0.1","port":9001,"metadata":{"k":"v"}}}`
}

// The quota filled with records, on a server that does not recover by
// itself: /readyz and /healthz say 503 naming the alarm, the metric is 1,
// writes fail. Restarted with recovery on (and a quota the records fill
// beyond its safe share), the alarm is still there and the server leaves
// the member alone; once the records are deleted it recovers by itself:
// alarm disarmed, /readyz 200, Register succeeds.
func TestSpaceAlarmShownThenRecoveredWhenRecordsDeleted(t *testing.T) {
	cfg := servertest.Config(t, "")
	cfg.EtcdQuotaBackendBytes = spaceQuota
	cfg.EtcdSpaceCheckInterval = 50 * time.Millisecond
	cfg.EtcdAutoRecover = false
	srv := servertest.Start(t, cfg)
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()

	start := time.Now()
	puts := fillEtcd(ctx, t, srv.EtcdClient(), "/space-test/", 1<<20, 256<<10)
	t.Logf("NOSPACE after %d distinct 256 KiB puts in %s", puts, time.Since(start).Round(time.Millisecond))

	base := "http://" + srv.Addr()
	testutil.Eventually(t, time.Minute, "/readyz 503 naming the NOSPACE alarm", func() bool {
		code, body := httpGet(t, base+"/readyz")
		return code == http.StatusServiceUnavailable && strings.Contains(body, "etcd alarm NOSPACE") && strings.Contains(body, "docs/operations.md")
	})
	if code, body := httpGet(t, base+"/healthz"); code != http.StatusServiceUnavailable || !strings.Contains(body, "NOSPACE") {
		t.Errorf("GET /healthz = %d %q, want 503 naming NOSPACE", code, body)
	}
	_, body := httpGet(t, base+"/readyz")
	t.Logf("/readyz: %s", strings.TrimSpace(body))
	testutil.Eventually(t, time.Minute, `beacon_etcd_alarm{type="NOSPACE"} 1`, metricIs(t, srv.Addr(), `beacon_etcd_alarm{type="NOSPACE"}`, 1))
	size, _ := testutil.Metric(t, srv.Addr(), "beacon_etcd_db_size_bytes")
	inUse, _ := testutil.Metric(t, srv.Addr(), "beacon_etcd_db_size_in_use_bytes")
	t.Logf("full: db %.1f MiB, in use %.1f MiB, quota %d MiB", size/(1<<20), inUse/(1<<20), spaceQuota>>20)
	if code, body := post(t, srv, "Register", registerBody("o-1")); code == http.StatusOK {
		t.Errorf("Register with NOSPACE raised = %d %s, want an error", code, body)
	}
	srv.Close()

	// Restart with recovery on. The records alone (puts x 256 KiB) are
	// above 80% of a 13 MiB quota: compaction cannot make room.
	cfg.EtcdAutoRecover = true
	cfg.EtcdQuotaBackendBytes = 13 << 20
	if records := int64(puts) * 256 << 10; records < cfg.EtcdQuotaBackendBytes*8/10 {
		t.Fatalf("records %d bytes fit in 80%% of the quota %d: the test needs them not to", records, cfg.EtcdQuotaBackendBytes)
	}
	logs := &syncBuffer{}
	cfg.Logger = slog.New(slog.NewTextHandler(logs, &slog.HandlerOptions{Level: slog.LevelInfo}))
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("logs after the restart:\n%s", logs)
		}
	})
	srv = servertest.Start(t, cfg)
	base = "http://" + srv.Addr()
	testutil.Eventually(t, time.Minute, "/readyz 503 naming the NOSPACE alarm after a restart", func() bool {
		code, body := httpGet(t, base+"/readyz")
		return code == http.StatusServiceUnavailable && strings.Contains(body, "etcd alarm NOSPACE")
	})
	testutil.Eventually(t, time.Minute, "a recovery attempt refused for space in use", func() bool {
		v, ok := testutil.Metric(t, srv.Addr(), `beacon_etcd_space_recoveries_total{result="in_use"}`)
		return ok && v >= 1
	})
	if v, _ := testutil.Metric(t, srv.Addr(), `beacon_etcd_space_recoveries_total{result="recovered"}`); v != 0 {
		t.Errorf("recovered = %v while the records fill the quota, want 0", v)
	}

	// Deletes are allowed under NOSPACE; the server does the rest.
	cli := srv.EtcdClient()
	dctx, dcancel := context.WithTimeout(ctx, 30*time.Second)
	_, err := cli.Delete(dctx, "/space-test/", clientv3.WithPrefix())
	dcancel()
	if err != nil {
		t.Fatalf("Delete under NOSPACE = %v, want nil", err)
	}
	start = time.Now()
	testutil.Eventually(t, time.Minute, "/readyz 200", func() bool {
		code, _ := httpGet(t, base+"/readyz")
		return code == http.StatusOK
	})
	t.Logf("recovered %s after the delete", time.Since(start).Round(time.Millisecond))
	testutil.Eventually(t, time.Minute, `beacon_etcd_alarm{type="NOSPACE"} 0`, metricIs(t, srv.Addr(), `beacon_etcd_alarm{type="NOSPACE"}`, 0))
	if code, body := post(t, srv, "Register", registerBody("o-2")); code != http.StatusOK {
		t.Errorf("Register after recovery = %d %s, want 200", code, body)
	}
	if v, _ := testutil.Metric(t, srv.Addr(), `beacon_etcd_space_recoveries_total{result="recovered"}`); v != 1 {
		t.Errorf(`beacon_etcd_space_recoveries_total{result="recovered"} = %v, want 1`, v)
	}
	size, _ = testutil.Metric(t, srv.Addr(), "beacon_etcd_db_size_bytes")
	t.Logf("after recovery: db %.0f KiB", size/(1<<10))
	for _, line := range []string{"etcd alarm raised", "etcd space cannot be recovered automatically", "etcd space recovered", "etcd alarms cleared"} {
		if !strings.Contains(logs.String(), line) {
			t.Errorf("logs lack %q", line)
		}
	}
}

// The quota filled with history of one key (the finding: overwrites):
// the server compacts, defragments and disarms by itself, nothing deleted.
func TestSpaceRecoversByItselfFromHistory(t *testing.T) {
	srv, logs := spaceServer(t)
	cli := srv.EtcdClient()
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()

	start := time.Now()
	puts := fillEtcd(ctx, t, cli, "/space-test/", 1, 256<<10)
	t.Logf("NOSPACE after %d overwrites of one 256 KiB key in %s", puts, time.Since(start).Round(time.Millisecond))
	start = time.Now()
	testutil.Eventually(t, time.Minute, "one recovery", metricIs(t, srv.Addr(), `beacon_etcd_space_recoveries_total{result="recovered"}`, 1))
	testutil.Eventually(t, time.Minute, "/readyz 200", func() bool {
		code, _ := httpGet(t, "http://"+srv.Addr()+"/readyz")
		return code == http.StatusOK
	})
	t.Logf("recovered in %s", time.Since(start).Round(time.Millisecond))
	actx, acancel := context.WithTimeout(ctx, 30*time.Second)
	alarms, err := cli.AlarmList(actx)
	acancel()
	if err != nil || len(alarms.Alarms) != 0 {
		t.Errorf("AlarmList = %v, %v; want none", alarms, err)
	}
	pctx, pcancel := context.WithTimeout(ctx, 30*time.Second)
	_, err = cli.Put(pctx, "/space-test/0000", "small")
	pcancel()
	if err != nil {
		t.Errorf("Put after recovery = %v, want nil", err)
	}
	if code, body := post(t, srv, "Register", registerBody("o-1")); code != http.StatusOK {
		t.Errorf("Register after recovery = %d %s, want 200", code, body)
	}
	if !strings.Contains(logs.String(), "etcd space recovered") {
		t.Errorf("logs lack the recovery:\n%s", logs)
	}
}

// The server keeps the last EtcdCompactionRetention revisions: older ones
// are compacted, newer ones readable.
func TestSpaceCompactsHistoryToRetention(t *testing.T) {
	cfg := servertest.Config(t, "")
	cfg.EtcdCompactionRetention = 100
	cfg.EtcdSpaceCheckInterval = 20 * time.Millisecond
	srv := servertest.Start(t, cfg)
	cli := srv.EtcdClient()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()

	var first, last int64
	for i := range 300 {
		pctx, pcancel := context.WithTimeout(ctx, 30*time.Second)
		resp, err := cli.Put(pctx, "/space-test/k", fmt.Sprint(i))
		pcancel()
		if err != nil {
			t.Fatal(err)
		}
		if i == 0 {
			first = resp.Header.Revision
		}
		last = resp.Header.Revision
	}
	testutil.Eventually(t, time.Minute, "a compaction past the first write", func() bool {
		v, ok := testutil.Metric(t, srv.Addr(), "beacon_etcd_compacted_revision")
		return ok && int64(v) > first
	})
	v, _ := testutil.Metric(t, srv.Addr(), "beacon_etcd_compacted_revision")
	if got := int64(v); got > last-100 {
		t.Errorf("compacted to %d, want at most %d (the last %d revisions kept)", got, last-100, 100)
	}
	gctx, gcancel := context.WithTimeout(ctx, 30*time.Second)
	defer gcancel()
	if _, err := cli.Get(gctx, "/space-test/k", clientv3.WithRev(first)); !errors.Is(err, rpctypes.ErrCompacted) {
		t.Errorf("Get at revision %d = %v, want %v", first, err, rpctypes.ErrCompacted)
	}
	if _, err := cli.Get(gctx, "/space-test/k", clientv3.WithRev(last-50)); err != nil {
		t.Errorf("Get at revision %d (within retention) = %v, want nil", last-50, err)
	}
}

func TestSpaceConfigValidate(t *testing.T) {
	for _, tc := range []struct {
		name string
		edit func(c *server.Config)
		want string // substring of the error; "" for valid
	}{
		{"defaults", func(c *server.Config) {}, ""},
		{"quota too small", func(c *server.Config) { c.EtcdQuotaBackendBytes = 1000 }, "--etcd-quota-backend-bytes 1000: must be between 1 MiB"},
		{"quota too big", func(c *server.Config) { c.EtcdQuotaBackendBytes = 9 << 30 }, "and 8 GiB"},
		{"negative retention", func(c *server.Config) { c.EtcdCompactionRetention = -1 }, "--etcd-compaction-retention -1: must be at least 100"},
		{"retention too small", func(c *server.Config) { c.EtcdCompactionRetention = 10 }, "at least 100 revisions"},
		{"no compaction embedded", func(c *server.Config) { c.EtcdCompactionRetention = 0 }, "0 only with --etcd-endpoints"},
		{"no compaction external", func(c *server.Config) {
			c.EtcdCompactionRetention = 0
			c.EtcdEndpoints = []string{"http://127.0.0.1:2379"}
		}, ""},
		{"check interval too short", func(c *server.Config) { c.EtcdSpaceCheckInterval = time.Millisecond }, "--etcd-space-check-interval 1ms: must be between 10ms and 10m"},
		{"negative defrag interval", func(c *server.Config) { c.EtcdDefragInterval = -time.Second }, "--etcd-defrag-interval -1s: must not be negative"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := server.NewConfig()
			tc.edit(c)
			err := c.Validate()
			switch {
			case tc.want == "" && err != nil:
				t.Errorf("Validate() = %v, want nil", err)
			case tc.want != "" && (err == nil || !strings.Contains(err.Error(), tc.want)):
				t.Errorf("Validate() = %v, want an error containing %q", err, tc.want)
			}
		})
	}
}
