package cli_test

import (
	"bytes"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"beacon.dev/beacon/server/audit"
)

// auditLog writes n events to dir/audit.log, rotating every maxBytes
// (0: never), and returns its path.
func auditLog(t *testing.T, n int, maxBytes int64) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "audit.log")
	l, err := audit.Open(path, audit.Options{MaxBytes: maxBytes, MaxFiles: 100})
	if err != nil {
		t.Fatal(err)
	}
	for i := range n {
		err := l.Record(audit.Event{
			Time:   time.Date(2026, 3, 1, 12, 0, i, 0, time.UTC),
			Source: "127.0.0.1:5000", Operation: "beacon.v1.RegistryService/Register",
			Resource: fmt.Sprintf("service:prod/web-%03d", i), Outcome: audit.OutcomeAllowed,
		})
		if err != nil {
			t.Fatal(err)
		}
	}
	if err := l.Close(); err != nil {
		t.Fatal(err)
	}
	return path
}

func TestAuditVerify(t *testing.T) {
	t.Run("intact, across rotated files", func(t *testing.T) {
		path := auditLog(t, 30, 2000) // about 8 lines a file
		rep, err := audit.VerifyFiles(path)
		if err != nil || len(rep.Files) < 3 {
			t.Fatalf("the test log: %+v %v, want 3 files or more", rep, err)
		}
		code, out, errs := run("audit", "verify", path)
		want := fmt.Sprintf("ok: 30 lines, seq 1..30, chain intact across %d files\nlast line: seq 30, sha256 %s\n", len(rep.Files), rep.LastHash)
		if code != 0 || out != want {
			t.Errorf("audit verify = %d, stdout %q, stderr %q; want 0 and %q", code, out, errs, want)
		}
	})
	t.Run("one line", func(t *testing.T) {
		path := auditLog(t, 1, 0)
		if code, out, _ := run("audit", "verify", path); code != 0 || !strings.HasPrefix(out, "ok: 1 line, seq 1..1, chain intact across 1 file\n") {
			t.Errorf("audit verify = %d %q", code, out)
		}
	})
	t.Run("oldest files rotated away", func(t *testing.T) {
		path := auditLog(t, 30, 2000)
		rotated, _ := filepath.Glob(path + ".*")
		for _, p := range rotated {
			if strings.HasSuffix(p, ".1") || strings.HasSuffix(p, ".2") {
				continue
			}
			os.Remove(p)
		}
		code, out, errs := run("audit", "verify", path)
		if code != 0 || !strings.Contains(out, "chain intact across 3 files") || !strings.Contains(out, "is not the start of the chain: older files were rotated away") {
			t.Errorf("audit verify = %d, stdout %q, stderr %q; want 0, 3 files, not from the start", code, out, errs)
		}
	})
	t.Run("an edited line", func(t *testing.T) {
		path := auditLog(t, 10, 0)
		data, _ := os.ReadFile(path)
		os.WriteFile(path, bytes.Replace(data, []byte("web-004"), []byte("web-XXX"), 1), 0o600)
		code, out, errs := run("audit", "verify", path)
		want := "beacon: audit: " + path + ": line 6: prev does not match the hash of line 5: the log was edited or lines were removed\n"
		if code != 1 || errs != want || out != "verified before it: 5 lines, seq 1..5\n" {
			t.Errorf("audit verify = %d, stdout %q, stderr %q; want 1, %q", code, out, errs, want)
		}
	})
	t.Run("a truncated last line", func(t *testing.T) {
		path := auditLog(t, 3, 0)
		data, _ := os.ReadFile(path)
		os.WriteFile(path, data[:len(data)-10], 0o600)
		code, _, errs := run("audit", "verify", path)
		if code != 1 || !strings.Contains(errs, path+": line 3: no newline at the end: a write was cut short") {
			t.Errorf("audit verify = %d, stderr %q; want 1 naming line 3 as cut short", code, errs)
		}
	})
	t.Run("json", func(t *testing.T) {
		path := auditLog(t, 4, 0)
		code, out, errs := run("audit", "verify", path, "-o", "json")
		var rep audit.Report
		if err := json.Unmarshal([]byte(out), &rep); code != 0 || err != nil || rep.Lines != 4 || !rep.FromStart || rep.Files[0].Path != path {
			t.Errorf("audit verify -o json = %d %q %q (%v)", code, out, errs, err)
		}
	})
	t.Run("usage", func(t *testing.T) {
		if code, _, errs := run("audit", "verify"); code != 1 || !strings.Contains(errs, "missing FILE") {
			t.Errorf("audit verify = %d %q, want the missing FILE named", code, errs)
		}
		if code, _, errs := run("audit", "verify", filepath.Join(t.TempDir(), "nope")); code != 1 || !strings.Contains(errs, "no such file") {
			t.Errorf("audit verify of a missing file = %d %q", code, errs)
		}
		if code, out, _ := run("audit", "verify", "--help"); code != 0 || strings.Contains(out, "--server") || !strings.Contains(out, "--output") {
			t.Errorf("audit verify --help = %d %q: want -o, not --server", code, out)
		}
	})
}
