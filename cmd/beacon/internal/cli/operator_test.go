package cli_test

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"
	clientv3 "go.etcd.io/etcd/client/v3"

	"beacon.dev/beacon/cmd/beacon/internal/cli"
	"beacon.dev/beacon/internal/testutil"
	"beacon.dev/beacon/server"
	"beacon.dev/beacon/server/servertest"
)

func run(args ...string) (code int, stdout, stderr string) {
	var out, errb bytes.Buffer
	code = cli.Main(args, &out, &errb)
	return code, out.String(), errb.String()
}

// beacon operator space shows the NOSPACE alarm and the sizes;
// recover-space refuses while the records fill the quota, recovers once
// they are deleted, and is harmless run again.
func TestOperatorSpaceAndRecoverSpace(t *testing.T) {
	cfg := servertest.Config(t, "")
	cfg.EtcdQuotaBackendBytes = 16 << 20
	cfg.EtcdAutoRecover = false // the operator recovers here
	srv := servertest.Start(t, cfg)
	etcd := srv.EtcdClient()
	ep := "--data-dir=" + cfg.DataDir // through the embedded etcd's socket
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()

	code, out, errs := run("operator", "space", ep)
	if code != 0 || !strings.Contains(out, "alarms: none") || !strings.Contains(out, "16.0 MiB") {
		t.Fatalf("operator space = %d, stdout %q, stderr %q; want 0 listing the 16 MiB quota and no alarms", code, out, errs)
	}

	value := strings.Repeat("x", 256<<10)
	full, puts := false, 0
	for ; puts < 1000 && !full; puts++ {
		pctx, pcancel := context.WithTimeout(ctx, 10*time.Second)
		_, err := etcd.Put(pctx, fmt.Sprintf("/space-test/%04d", puts), value)
		pcancel()
		switch {
		case errors.Is(err, rpctypes.ErrNoSpace):
			full = true
		case err != nil:
			t.Fatalf("Put #%d = %v, want nil or %v", puts, err, rpctypes.ErrNoSpace)
		}
	}
	if !full {
		t.Fatal("1000 puts of 256 KiB never hit the 16 MiB quota")
	}
	if records := (puts - 1) * 256 << 10; records < (13<<20)*8/10 {
		t.Fatalf("records %d bytes fit in 80%% of a 13 MiB quota: the test needs them not to", records)
	}

	code, out, errs = run("operator", "space", ep)
	t.Logf("operator space when full:\n%s", out)
	if code != 0 || !strings.Contains(out, "alarm: NOSPACE") || !strings.Contains(out, "recover-space") {
		t.Errorf("operator space = %d, stdout %q, stderr %q; want 0 showing the NOSPACE alarm and what to run", code, out, errs)
	}
	code, out, errs = run("operator", "space", ep, "-o", "json")
	var sp server.Space
	if err := json.Unmarshal([]byte(out), &sp); code != 0 || err != nil {
		t.Fatalf("operator space -o json = %d %q (%v), stderr %q", code, out, err, errs)
	}
	if !sp.Has("NOSPACE") || len(sp.Members) != 1 || sp.Members[0].DBSize == 0 || sp.Members[0].Quota != 16<<20 {
		t.Errorf("operator space -o json = %+v, want NOSPACE and one member with its size and a 16 MiB quota", sp)
	}

	// Restarted with a 13 MiB quota, the records alone are above its safe
	// share (80%): defragmenting cannot make room.
	srv.Close()
	cfg.EtcdQuotaBackendBytes = 13 << 20
	srv = servertest.Start(t, cfg)
	etcd = srv.EtcdClient()
	code, out, errs = run("operator", "recover-space", ep)
	if code != 1 || !strings.Contains(errs, "delete records or raise --etcd-quota-backend-bytes") {
		t.Errorf("recover-space while full = %d, stdout %q, stderr %q; want 1 telling to delete records or raise the quota", code, out, errs)
	}
	if code, out, _ := run("operator", "space", ep); !strings.Contains(out, "alarm: NOSPACE") {
		t.Errorf("operator space after a refused recovery = %d %q, want the alarm still raised", code, out)
	}

	dctx, dcancel := context.WithTimeout(ctx, 10*time.Second)
	_, err := etcd.Delete(dctx, "/space-test/", clientv3.WithPrefix())
	dcancel()
	if err != nil {
		t.Fatalf("Delete under NOSPACE = %v, want nil", err)
	}
	code, out, errs = run("operator", "recover-space", ep)
	t.Logf("operator recover-space:\n%s", out)
	if code != 0 || !strings.Contains(out, "disarmed NOSPACE") || !strings.Contains(out, "defragmented") {
		t.Errorf("recover-space after the delete = %d, stdout %q, stderr %q; want 0, defragmented, NOSPACE disarmed", code, out, errs)
	}
	// Again: the compaction is to a revision already compacted.
	code, out, errs = run("operator", "recover-space", ep)
	if code != 0 || !strings.Contains(out, "no NOSPACE alarm to disarm") {
		t.Errorf("recover-space again = %d, stdout %q, stderr %q; want 0 and nothing to disarm", code, out, errs)
	}
	if code, out, errs := run("operator", "space", ep); code != 0 || !strings.Contains(out, "alarms: none") {
		t.Errorf("operator space after recovery = %d %q %q, want no alarms", code, out, errs)
	}
	pctx, pcancel := context.WithTimeout(ctx, 10*time.Second)
	defer pcancel()
	if _, err := etcd.Put(pctx, "/space-test/after", "small"); err != nil {
		t.Errorf("Put after recover-space = %v, want nil", err)
	}
	testutil.Eventually(t, time.Minute, "/readyz 200", func() bool {
		v, ok := testutil.Metric(t, srv.Addr(), `beacon_etcd_alarm{type="NOSPACE"}`)
		return ok && v == 0
	})
}

// Over the embedded etcd's TCP listener with client-certificate auth, the
// operator commands present the certificate they are given; without one
// they are refused.
func TestOperatorOverTLS(t *testing.T) {
	dir := t.TempDir()
	ca := testutil.NewCA(t, "etcd clients CA")
	caFile := ca.WriteCert(t, filepath.Join(dir, "ca.pem"))
	cfg := servertest.Config(t, "")
	cfg.EtcdClientAddr = testutil.FreeAddr(t)
	cfg.EtcdClientCertFile, cfg.EtcdClientKeyFile = ca.Issue(t, dir, "etcd", testutil.CertSpec{Names: []string{"127.0.0.1"}})
	cfg.EtcdClientCAFile = caFile
	servertest.Start(t, cfg)
	cert, key := ca.Issue(t, dir, "operator", testutil.CertSpec{Client: true})
	ep := "--etcd-endpoints=https://" + cfg.EtcdClientAddr

	code, out, errs := run("operator", "space", ep, "--etcd-cacert", caFile, "--etcd-cert", cert, "--etcd-key", key)
	if code != 0 || !strings.Contains(out, "alarms: none") || !strings.Contains(out, "https://"+cfg.EtcdClientAddr) {
		t.Errorf("operator space over TLS = %d, stdout %q, stderr %q; want 0 listing the member at its TLS listener", code, out, errs)
	}
	if code, out, errs := run("operator", "space", ep, "--etcd-cacert", caFile, "--timeout", "20s"); code == 0 {
		t.Errorf("operator space without a client certificate = 0, stdout %q, stderr %q; want refused", out, errs)
	}
}

func TestOperatorFlagsAreChecked(t *testing.T) {
	missing := filepath.Join(t.TempDir(), "no-server")
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"operator", "space", "--timeout=0s"}, "invalid --timeout 0s"},
		{[]string{"operator", "space", "-o", "yaml"}, "invalid --output"},
		{[]string{"operator", "space", "--data-dir", missing}, "no embedded etcd at " + filepath.Join(missing, "etcd.sock")},
		{[]string{"operator", "space", "--etcd-endpoints", "https://127.0.0.1:1", "--etcd-cert", "c.pem"}, "invalid --etcd-cert / --etcd-key"},
	} {
		if code, _, errs := run(tc.args...); code != 1 || !strings.Contains(errs, tc.want) {
			t.Errorf("beacon %v = %d %q, want 1 with %q", tc.args, code, errs, tc.want)
		}
	}
}
