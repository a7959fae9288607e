package audit_test

import (
	"bufio"
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"

	"beacon.dev/beacon/server/audit"
)

// t0 is the time of the tests' events: nothing here reads the clock.
var t0 = time.Date(2026, 3, 1, 12, 0, 0, 0, time.UTC)

func fixedNow() time.Time { return t0 }

func event(i int) audit.Event {
	return audit.Event{
		Accessor:  fmt.Sprintf("acc-%d", i%3),
		Source:    "127.0.0.1:5000",
		Operation: "beacon.v1.RegistryService/Register",
		Resource:  fmt.Sprintf("service:prod/web-%d", i),
		Outcome:   audit.OutcomeAllowed,
	}
}

func open(t *testing.T, path string, opts audit.Options) *audit.Log {
	t.Helper()
	if opts.Now == nil {
		opts.Now = fixedNow
	}
	l, err := audit.Open(path, opts)
	if err != nil {
		t.Fatalf("Open(%s) = %v", path, err)
	}
	t.Cleanup(func() { l.Close() })
	return l
}

// write records events from, from+1, … to.
func write(t *testing.T, l *audit.Log, from, to int) {
	t.Helper()
	for i := from; i <= to; i++ {
		if err := l.Record(event(i)); err != nil {
			t.Fatalf("Record(%d) = %v", i, err)
		}
	}
}

// line is a written line as the tests read it.
type line struct {
	Seq  int64  `json:"seq"`
	Prev string `json:"prev"`
	audit.Event
}

func readLines(t *testing.T, path string) (lines []line, raw [][]byte) {
	t.Helper()
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	sc := bufio.NewScanner(bytes.NewReader(data))
	for sc.Scan() {
		var l line
		if err := json.Unmarshal(sc.Bytes(), &l); err != nil {
			t.Fatalf("%s: line %d %q: %v", path, len(lines)+1, sc.Bytes(), err)
		}
		lines = append(lines, l)
		raw = append(raw, bytes.Clone(sc.Bytes()))
	}
	return lines, raw
}

func hashOf(b []byte) string {
	sum := sha256.Sum256(b)
	return hex.EncodeToString(sum[:])
}

func verifyOK(t *testing.T, paths ...string) audit.Report {
	t.Helper()
	rep, err := audit.VerifyFiles(paths...)
	if err != nil {
		t.Fatalf("VerifyFiles(%v) = %+v, %v; want no error", paths, rep, err)
	}
	return rep
}

// Each line holds the event, seq 1, 2, … and the hash of the line before;
// the first line's prev is all zeros. The file is 0600, a directory Open
// makes 0700.
func TestRecordWritesTheChain(t *testing.T) {
	path := filepath.Join(t.TempDir(), "logs", "audit.log")
	l := open(t, path, audit.Options{})
	write(t, l, 1, 3)
	denied := audit.Event{
		Time: time.Date(2026, 3, 1, 13, 0, 0, 5, time.FixedZone("CET", 3600)), Source: "10.0.0.1:9",
		Operation: "beacon.v1.RegistryService/Deregister", Resource: "service:prod/web", Outcome: audit.OutcomeDenied,
		Reason: "missing service:write", Detail: map[string]string{"instance": "w-1"},
	}
	if err := l.Record(denied); err != nil {
		t.Fatal(err)
	}
	if err := l.Close(); err != nil {
		t.Fatalf("Close() = %v", err)
	}

	lines, raw := readLines(t, path)
	want := []audit.Event{event(1), event(2), event(3), denied}
	for i := range 3 {
		want[i].Time = t0
	}
	want[3].Time = denied.Time.UTC()
	if len(lines) != len(want) {
		t.Fatalf("%d lines, want %d", len(lines), len(want))
	}
	for i, ln := range lines {
		if ln.Seq != int64(i+1) {
			t.Errorf("line %d: seq %d, want %d", i+1, ln.Seq, i+1)
		}
		wantPrev := audit.Genesis
		if i > 0 {
			wantPrev = hashOf(raw[i-1])
		}
		if ln.Prev != wantPrev {
			t.Errorf("line %d: prev %s, want %s", i+1, ln.Prev, wantPrev)
		}
		if diff := cmp.Diff(want[i], ln.Event); diff != "" {
			t.Errorf("line %d event (-want +got):\n%s", i+1, diff)
		}
	}
	if !strings.HasPrefix(string(raw[0]), `{"seq":1,"prev":"`+audit.Genesis+`","time":"2026-03-01T12:00:00Z","accessor":"acc-1",`) {
		t.Errorf("line 1 = %s: want seq, prev, then the event's fields", raw[0])
	}
	for _, c := range []struct {
		path string
		want os.FileMode
	}{{path, 0o600}, {filepath.Dir(path), 0o700 | os.ModeDir}} {
		if st, err := os.Stat(c.path); err != nil || st.Mode() != c.want {
			t.Errorf("mode of %s = %v (%v), want %v", c.path, st.Mode(), err, c.want)
		}
	}
	if rep := verifyOK(t, path); rep.Lines != 4 || rep.LastSeq != 4 || !rep.FromStart || rep.LastHash != hashOf(raw[3]) {
		t.Errorf("VerifyFiles = %+v, want 4 lines from the start, last hash %s", rep, hashOf(raw[3]))
	}
}

// A reopened log continues the chain; so does one whose last rotation
// stopped between the rename and the new file.
func TestReopenContinuesTheChain(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "audit.log")
	l := open(t, path, audit.Options{})
	write(t, l, 1, 5)
	l.Close()

	l = open(t, path, audit.Options{})
	write(t, l, 6, 8)
	l.Close()
	if rep := verifyOK(t, path); rep.Lines != 8 || rep.FirstSeq != 1 || rep.LastSeq != 8 {
		t.Errorf("after a reopen: %+v, want seq 1..8", rep)
	}

	// As after a crash between rename(path, path.1) and the new file.
	if err := os.Rename(path, path+".1"); err != nil {
		t.Fatal(err)
	}
	l = open(t, path, audit.Options{})
	write(t, l, 9, 9)
	l.Close()
	rep := verifyOK(t, path)
	if rep.Lines != 9 || len(rep.Files) != 2 || rep.Files[1].FirstSeq != 9 {
		t.Errorf("after a lost rotation: %+v, want seq 1..9 in 2 files, the second from 9", rep)
	}
}

// A partial last line (a write cut short) is reported by Verify, then
// dropped by Open, and the chain continues from the line before it.
func TestOpenDropsAPartialLastLine(t *testing.T) {
	path := filepath.Join(t.TempDir(), "audit.log")
	l := open(t, path, audit.Options{})
	write(t, l, 1, 3)
	l.Close()
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_APPEND, 0)
	if err != nil {
		t.Fatal(err)
	}
	f.WriteString(`{"seq":4,"prev":"ab`)
	f.Close()

	rep, err := audit.VerifyFiles(path)
	var le *audit.LineError
	if !errors.Is(err, audit.ErrTruncated) || !errors.As(err, &le) || le.Line != 4 || rep.Lines != 3 {
		t.Fatalf("VerifyFiles with a partial line = %+v, %v; want ErrTruncated at line 4, 3 lines verified", rep, err)
	}
	l = open(t, path, audit.Options{})
	write(t, l, 4, 4)
	l.Close()
	if rep := verifyOK(t, path); rep.Lines != 4 {
		t.Errorf("after the reopen: %+v, want 4 lines", rep)
	}
}

// A log Open cannot continue is refused rather than started anew.
func TestOpenRefusesWhatItCannotContinue(t *testing.T) {
	for _, tc := range []struct {
		name, content, want string
	}{
		{"not JSON", "hello\n", "not an audit record"},
		{"no chain fields", `{"time":"2026-03-01T12:00:00Z"}` + "\n", "not an audit record"},
		{"no newline in 2 MiB", strings.Repeat("x", 2*audit.MaxLineBytes+10), "no newline"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "audit.log")
			if err := os.WriteFile(path, []byte(tc.content), 0o600); err != nil {
				t.Fatal(err)
			}
			l, err := audit.Open(path, audit.Options{})
			if err == nil {
				l.Close()
			}
			if err == nil || !strings.Contains(err.Error(), tc.want) || !strings.HasPrefix(err.Error(), "audit: ") {
				t.Errorf("Open = %v, want an audit: error saying %q", err, tc.want)
			}
		})
	}
}

// Rotation keeps MaxFiles rotated files, path.1 the newest, and the chain
// runs on across them; once the oldest are deleted the log verifies from
// the oldest line left, and the report says it is not the start.
func TestRotationKeepsMaxFiles(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "audit.log")
	l := open(t, path, audit.Options{MaxFiles: 3})
	write(t, l, 1, 1)
	l.Close()
	lines, _ := readLines(t, path)
	if len(lines) != 1 {
		t.Fatal("no first line")
	}
	st, _ := os.Stat(path)
	lineSize := st.Size() // every line of these events is this long (±2 digits of seq)

	// Room for 4 lines a file: 20 lines make 5 files, of which 4 are kept.
	l = open(t, path, audit.Options{MaxBytes: 4*lineSize + 10, MaxFiles: 3})
	write(t, l, 2, 20)
	if err := l.Sync(); err != nil {
		t.Errorf("Sync() = %v", err)
	}
	l.Close()

	entries, _ := os.ReadDir(dir)
	var names []string
	for _, e := range entries {
		names = append(names, e.Name())
	}
	if diff := cmp.Diff([]string{"audit.log", "audit.log.1", "audit.log.2", "audit.log.3"}, names); diff != "" {
		t.Errorf("files (-want +got):\n%s", diff)
	}
	for _, n := range names {
		if st, _ := os.Stat(filepath.Join(dir, n)); st.Mode() != 0o600 || st.Size() > 4*lineSize+10 {
			t.Errorf("%s: mode %v, %d bytes; want 0600 and at most %d", n, st.Mode(), st.Size(), 4*lineSize+10)
		}
	}
	rep := verifyOK(t, path)
	if rep.FromStart || rep.FirstSeq != 5 || rep.LastSeq != 20 || rep.Lines != 16 || len(rep.Files) != 4 {
		t.Errorf("VerifyFiles(%s) = %+v, want seq 5..20 in 4 files, not from the start", path, rep)
	}
	if rep.Files[0].Path != path+".3" || rep.Files[3].Path != path || rep.Files[1].FirstSeq != 9 {
		t.Errorf("files = %+v, want audit.log.3 (oldest) … audit.log, the second from seq 9", rep.Files)
	}
	// The rotated files one by one, in order, verify the same.
	if rep2 := verifyOK(t, path+".3", path+".2", path+".1", path); rep2.Lines != rep.Lines || rep2.LastHash != rep.LastHash {
		t.Errorf("VerifyFiles of the files listed = %+v, want %+v", rep2, rep)
	}

	// A lowered MaxFiles deletes the rotated files past it at the next
	// rotation.
	l = open(t, path, audit.Options{MaxBytes: 4*lineSize + 10, MaxFiles: 1})
	write(t, l, 21, 25)
	l.Close()
	for _, n := range []string{".2", ".3", ".4"} {
		if _, err := os.Stat(path + n); !os.IsNotExist(err) {
			t.Errorf("audit.log%s is left after MaxFiles 1 (%v)", n, err)
		}
	}
	if rep := verifyOK(t, path); rep.LastSeq != 25 || len(rep.Files) != 2 {
		t.Errorf("VerifyFiles = %+v, want 2 files up to seq 25", rep)
	}
}

// A line larger than MaxBytes gets a file of its own; nothing is lost.
func TestALineLargerThanMaxBytes(t *testing.T) {
	path := filepath.Join(t.TempDir(), "audit.log")
	l := open(t, path, audit.Options{MaxBytes: 10})
	write(t, l, 1, 3)
	l.Close()
	if rep := verifyOK(t, path); rep.Lines != 3 || len(rep.Files) != 3 || !rep.FromStart {
		t.Errorf("VerifyFiles = %+v, want 3 lines in 3 files", rep)
	}
}

// After a failed write the next Record reopens the file and the chain
// goes on unbroken.
func TestRecordRecoversFromAWriteError(t *testing.T) {
	path := filepath.Join(t.TempDir(), "audit.log")
	l := open(t, path, audit.Options{})
	write(t, l, 1, 2)
	audit.BreakFile(l)
	if err := l.Record(event(3)); err == nil || !strings.HasPrefix(err.Error(), "audit: writing ") {
		t.Fatalf("Record on a broken file = %v, want an audit: writing error", err)
	}
	write(t, l, 3, 4)
	l.Close()
	lines, _ := readLines(t, path)
	if rep := verifyOK(t, path); rep.Lines != 4 || lines[2].Resource != event(3).Resource {
		t.Errorf("VerifyFiles = %+v, lines %+v: want 4 lines, the third the retried event", rep, lines)
	}
}

func TestRecordChecksAndBoundsTheEvent(t *testing.T) {
	path := filepath.Join(t.TempDir(), "audit.log")
	l := open(t, path, audit.Options{})
	for _, o := range []audit.Outcome{"", "ok", "ALLOWED"} {
		e := event(1)
		e.Outcome = o
		if err := l.Record(e); err == nil || !strings.Contains(err.Error(), "invalid Outcome") {
			t.Errorf("Record with Outcome %q = %v, want invalid Outcome", o, err)
		}
	}
	detail := map[string]string{}
	for i := range 40 {
		detail[fmt.Sprintf("k%02d", i)] = strings.Repeat("é", 200) // 400 bytes
	}
	detail["k00"] = strings.Repeat("v", 300)
	detail["k15"] = "a" + strings.Repeat("é", 200) // byte 256 is inside an é
	e := event(1)
	e.Detail = detail
	e.Reason = strings.Repeat("r", 5000)
	if err := l.Record(e); err != nil {
		t.Fatal(err)
	}
	if len(detail) != 40 || len(detail["k00"]) != 300 {
		t.Error("Record changed the caller's Detail")
	}
	l.Close()
	lines, _ := readLines(t, path)
	got := lines[0]
	if len(got.Detail) != audit.MaxDetail || got.Detail["k00"] != strings.Repeat("v", 256) || got.Detail["k15"] != "a"+strings.Repeat("é", 127) || got.Detail["k16"] != "" {
		t.Errorf("Detail = %d entries, k00 %d bytes, k15 %d bytes, k16 %q: want the 16 first keys, values cut to 256 bytes at a rune boundary",
			len(got.Detail), len(got.Detail["k00"]), len(got.Detail["k15"]), got.Detail["k16"])
	}
	if len(got.Reason) != audit.MaxFieldBytes {
		t.Errorf("Reason is %d bytes, want %d", len(got.Reason), audit.MaxFieldBytes)
	}
}

func TestOpenChecksOptions(t *testing.T) {
	for _, tc := range []struct {
		opts audit.Options
		want string
	}{
		{audit.Options{MaxBytes: -1}, "invalid MaxBytes -1"},
		{audit.Options{MaxFiles: -2}, "invalid MaxFiles -2"},
	} {
		l, err := audit.Open(filepath.Join(t.TempDir(), "audit.log"), tc.opts)
		if err == nil {
			l.Close()
		}
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("Open(%+v) = %v, want %q", tc.opts, err, tc.want)
		}
	}
}

func TestCloseThenRecord(t *testing.T) {
	l := open(t, filepath.Join(t.TempDir(), "audit.log"), audit.Options{})
	if err := l.Close(); err != nil {
		t.Fatal(err)
	}
	if err := l.Close(); err != nil {
		t.Errorf("Close again = %v, want nil", err)
	}
	if err := l.Record(event(1)); !errors.Is(err, audit.ErrClosed) {
		t.Errorf("Record after Close = %v, want ErrClosed", err)
	}
}

// Concurrent writers each get a line of their own, the chain intact,
// across rotations.
func TestConcurrentRecords(t *testing.T) {
	path := filepath.Join(t.TempDir(), "audit.log")
	l := open(t, path, audit.Options{MaxBytes: 4 << 10, MaxFiles: 100})
	var wg sync.WaitGroup
	for w := range 4 {
		wg.Go(func() {
			for i := range 50 {
				if err := l.Record(event(w*1000 + i)); err != nil {
					t.Error(err)
					return
				}
			}
		})
	}
	wg.Wait()
	l.Close()
	if rep := verifyOK(t, path); rep.Lines != 200 || !rep.FromStart || len(rep.Files) < 2 {
		t.Errorf("VerifyFiles = %+v, want 200 lines from the start over several files", rep)
	}
}

func BenchmarkRecord(b *testing.B) {
	e := event(1)
	e.Detail = map[string]string{"instance": "w-1", "zone": "eu-1"}
	b.Run("serial", func(b *testing.B) {
		l, err := audit.Open(filepath.Join(b.TempDir(), "audit.log"), audit.Options{})
		if err != nil {
			b.Fatal(err)
		}
		defer l.Close()
		b.ReportAllocs()
		for b.Loop() {
			if err := l.Record(e); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run("parallel", func(b *testing.B) {
		l, err := audit.Open(filepath.Join(b.TempDir(), "audit.log"), audit.Options{})
		if err != nil {
			b.Fatal(err)
		}
		defer l.Close()
		b.ReportAllocs()
		b.RunParallel(func(pb *testing.PB) {
			for pb.Next() {
				if err := l.Record(e); err != nil {
					b.Error(err)
					return
				}
			}
		})
	})
}
