package audit_test

import (
	"bytes"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"beacon.dev/beacon/server/audit"
)

// tenLines writes a log of 10 events and returns its lines (without
// newlines).
func tenLines(t testing.TB) [][]byte {
	t.Helper()
	path := filepath.Join(t.TempDir(), "audit.log")
	l, err := audit.Open(path, audit.Options{Now: fixedNow})
	if err != nil {
		t.Fatal(err)
	}
	for i := 1; i <= 10; i++ {
		if err := l.Record(event(i)); err != nil {
			t.Fatal(err)
		}
	}
	if err := l.Close(); err != nil {
		t.Fatal(err)
	}
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return bytes.Split(bytes.TrimSuffix(data, []byte("\n")), []byte("\n"))
}

func join(lines [][]byte) []byte {
	var b []byte
	for _, l := range lines {
		b = append(append(b, l...), '\n')
	}
	return b
}

// What a tampered log verifies as. Lines are numbered from 1; the
// functions get a copy of the ten lines.
func TestVerifyFindsTampering(t *testing.T) {
	orig := tenLines(t)
	origLast := hashOf(orig[9])
	for _, tc := range []struct {
		name   string
		tamper func(l [][]byte) []byte
		// want: the line where verification stops (0: it verifies), the
		// sentinel and words of the reason.
		line    int
		target  error
		reason  string
		lastSeq int64 // of what verifies
	}{
		{"intact", join, 0, nil, "", 10},
		{"an edited line", func(l [][]byte) []byte {
			l[4] = bytes.Replace(l[4], []byte("web-5"), []byte("web-X"), 1)
			return join(l)
		}, 6, audit.ErrBroken, "line 6: prev does not match the hash of line 5: the log was edited or lines were removed", 5},
		{"an edited seq", func(l [][]byte) []byte {
			l[4] = bytes.Replace(l[4], []byte(`"seq":5,`), []byte(`"seq":50,`), 1)
			return join(l)
		}, 5, audit.ErrBroken, "line 5: seq 50 follows seq 4 though prev matches the hash of line 4: this line was edited", 4},
		{"a deleted line", func(l [][]byte) []byte {
			return join(append(l[:4], l[5:]...))
		}, 5, audit.ErrBroken, "line 5: seq 6 follows seq 4 and prev does not match the hash of line 4: lines were removed or reordered", 4},
		{"the first line deleted", func(l [][]byte) []byte {
			return join(l[1:])
		}, 1, audit.ErrBroken, "line 1: seq 2 where the log should start (seq 1, prev all zeros): lines were removed from the start", 0},
		{"a truncated last line", func(l [][]byte) []byte {
			return join(l)[:len(join(l))-20]
		}, 10, audit.ErrTruncated, "line 10: no newline at the end: a write was cut short", 9},
		{"the last newline missing", func(l [][]byte) []byte {
			return bytes.TrimSuffix(join(l), []byte("\n"))
		}, 10, audit.ErrTruncated, "no newline at the end", 9},
		{"two lines swapped", func(l [][]byte) []byte {
			l[4], l[5] = l[5], l[4]
			return join(l)
		}, 5, audit.ErrBroken, "line 5: seq 6 follows seq 4 and prev does not match the hash of line 4: lines were removed or reordered", 4},
		{"a line inserted, chained to the one before", func(l [][]byte) []byte {
			forged := bytes.Replace(l[5], []byte("web-6"), []byte("evil"), 1) // seq 6, prev = hash(line 5)
			return join(append(l[:5:5], append([][]byte{forged}, l[5:]...)...))
		}, 7, audit.ErrBroken, "line 7: seq 6 follows seq 6 and prev does not match the hash of line 6: lines were reordered, repeated or inserted", 6},
		{"a line repeated", func(l [][]byte) []byte {
			return join(append(l[:5:5], append([][]byte{l[2]}, l[5:]...)...))
		}, 6, audit.ErrBroken, "line 6: seq 3 follows seq 5 and prev does not match the hash of line 5: lines were reordered, repeated or inserted", 5},
		{"a line of another log", func(l [][]byte) []byte {
			l[4] = []byte(`{"seq":1,"prev":"` + audit.Genesis + `","time":"2026-03-01T12:00:00Z","accessor":"","source":"","operation":"x","resource":"y","outcome":"allowed"}`)
			return join(l)
		}, 5, audit.ErrBroken, "line 5: seq 1 starts a new chain (prev is all zeros) after seq 4", 4},
		{"a line that is not JSON", func(l [][]byte) []byte {
			l[4] = []byte("hello")
			return join(l)
		}, 5, audit.ErrBroken, "line 5: not a JSON audit record", 4},
		{"a blank line", func(l [][]byte) []byte {
			return join(append(l[:3:3], append([][]byte{nil}, l[3:]...)...))
		}, 4, audit.ErrBroken, "line 4: not a JSON audit record", 3},
		{"a field of the wrong type", func(l [][]byte) []byte {
			l[0] = bytes.Replace(l[0], []byte(`"source":"127.0.0.1:5000"`), []byte(`"source":5000`), 1)
			return join(l)
		}, 1, audit.ErrBroken, "line 1: not a JSON audit record", 0},
		{"an uppercase prev", func(l [][]byte) []byte {
			l[1] = bytes.ToUpper(l[1])
			return join(l)
		}, 2, audit.ErrBroken, "line 2: prev \"" + strings.ToUpper(hashOf(orig[0])) + "\" is not a SHA-256 in hex", 1},
		{"a huge line", func(l [][]byte) []byte {
			l[2] = bytes.Repeat([]byte("x"), audit.MaxLineBytes+1)
			return join(l)
		}, 3, audit.ErrBroken, "line 3: longer than 1048576 bytes", 2},
		// The chain alone cannot see these: the last hash kept from an
		// earlier verification can (lastHash differs, or lastSeq is short).
		{"the last line edited", func(l [][]byte) []byte {
			l[9] = bytes.Replace(l[9], []byte("web-10"), []byte("web-XX"), 1)
			return join(l)
		}, 0, nil, "", 10},
		{"the last line deleted", func(l [][]byte) []byte { return join(l[:9]) }, 0, nil, "", 9},
	} {
		t.Run(tc.name, func(t *testing.T) {
			lines := make([][]byte, len(orig))
			for i := range orig {
				lines[i] = bytes.Clone(orig[i])
			}
			data := tc.tamper(lines)
			lastHash, lastSeq, n, err := audit.Verify(bytes.NewReader(data), audit.Genesis, 0)
			if lastSeq != tc.lastSeq {
				t.Errorf("lastSeq = %d, want %d", lastSeq, tc.lastSeq)
			}
			if tc.target == nil {
				if err != nil {
					t.Fatalf("Verify = %v, want nil", err)
				}
				if n != int(tc.lastSeq) {
					t.Errorf("n = %d, want %d", n, tc.lastSeq)
				}
				if tc.name != "intact" && lastHash == origLast {
					t.Errorf("lastHash = the original's: a kept hash would not see the change")
				}
				if tc.name == "intact" && lastHash != origLast {
					t.Errorf("lastHash = %s, want %s", lastHash, origLast)
				}
				return
			}
			var le *audit.LineError
			if !errors.Is(err, tc.target) || !errors.As(err, &le) {
				t.Fatalf("Verify = %v, want a *LineError wrapping %v", err, tc.target)
			}
			if le.Line != tc.line || n != tc.line-1 || !strings.Contains(err.Error(), tc.reason) || !strings.HasPrefix(err.Error(), "audit: line ") {
				t.Errorf("Verify = n %d, %v\nwant line %d, %d lines verified, saying %q", n, err, tc.line, tc.line-1, tc.reason)
			}
		})
	}
}

// Verify continues from a hash and seq it is given; "" takes the first
// line as it is.
func TestVerifyContinuesFromAGivenLine(t *testing.T) {
	lines := tenLines(t)
	h, s, n, err := audit.Verify(bytes.NewReader(join(lines[:4])), audit.Genesis, 0)
	if err != nil || s != 4 || n != 4 {
		t.Fatalf("Verify(first 4) = %s %d %d %v", h, s, n, err)
	}
	if _, s, n, err := audit.Verify(bytes.NewReader(join(lines[4:])), h, s); err != nil || s != 10 || n != 6 {
		t.Errorf("Verify(the rest, from line 4) = %d %d %v, want seq 10, 6 lines", s, n, err)
	}
	if _, _, _, err := audit.Verify(bytes.NewReader(join(lines[5:])), h, s); !errors.Is(err, audit.ErrBroken) {
		t.Errorf("Verify(from line 6, given line 4) = %v, want ErrBroken", err)
	}
	if _, s, n, err := audit.Verify(bytes.NewReader(join(lines[5:])), "", 0); err != nil || s != 10 || n != 5 {
		t.Errorf("Verify(from line 6, start unknown) = %d %d %v, want seq 10, 5 lines", s, n, err)
	}
	if h2, s2, n, err := audit.Verify(strings.NewReader(""), h, 4); err != nil || h2 != h || s2 != 4 || n != 0 {
		t.Errorf("Verify(empty) = %s %d %d %v, want what it was given", h2, s2, n, err)
	}
}

func TestVerifyChecksItsArguments(t *testing.T) {
	for _, tc := range []struct {
		hash string
		seq  int64
		want string
	}{
		{"abc", 0, "invalid prevHash"},
		{strings.ToUpper(strings.Repeat("ab", 32)), 3, "invalid prevHash"},
		{strings.Repeat("ab", 32), -1, "invalid prevSeq -1"},
		{audit.Genesis, 5, "invalid prevSeq 5"},
	} {
		if _, _, _, err := audit.Verify(strings.NewReader(""), tc.hash, tc.seq); err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("Verify(%q, %d) = %v, want %q", tc.hash, tc.seq, err, tc.want)
		}
	}
}

// rotatedLog writes 20 lines, 4 a file: audit.log.4 (1..4) … audit.log
// (17..20).
func rotatedLog(t *testing.T) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "audit.log")
	l := open(t, path, audit.Options{})
	write(t, l, 1, 1)
	l.Close()
	st, _ := os.Stat(path)
	l = open(t, path, audit.Options{MaxBytes: 4*st.Size() + 10})
	write(t, l, 2, 20)
	l.Close()
	return path
}

// VerifyFiles names the file and the line, also across files.
func TestVerifyFilesNamesTheFile(t *testing.T) {
	t.Run("an edited line", func(t *testing.T) {
		path := rotatedLog(t)
		data, _ := os.ReadFile(path + ".2")
		os.WriteFile(path+".2", bytes.Replace(data, []byte("web-10"), []byte("web-XX"), 1), 0o600)
		rep, err := audit.VerifyFiles(path)
		want := path + ".2: line 3: prev does not match the hash of line 2"
		if !errors.Is(err, audit.ErrBroken) || !strings.Contains(err.Error(), want) || rep.Lines != 10 || rep.LastSeq != 10 {
			t.Errorf("VerifyFiles = %+v, %v; want %q after 10 lines", rep, err, want)
		}
	})
	t.Run("a rotated file missing", func(t *testing.T) {
		path := rotatedLog(t)
		os.Remove(path + ".2")
		_, err := audit.VerifyFiles(path)
		want := path + ".1: line 1: seq 13 follows seq 8 and prev does not match the hash of the last line of " + path + ".3 (line 4): lines were removed"
		if !errors.Is(err, audit.ErrBroken) || !strings.Contains(err.Error(), want) {
			t.Errorf("VerifyFiles = %v, want %q", err, want)
		}
	})
	t.Run("files out of order", func(t *testing.T) {
		path := rotatedLog(t)
		_, err := audit.VerifyFiles(path+".3", path+".4", path+".2", path+".1", path)
		if want := path + ".4: line 1: seq 1 starts a new chain"; !strings.Contains(err.Error(), want) {
			t.Errorf("VerifyFiles = %v, want %q", err, want)
		}
	})
	t.Run("an empty file between", func(t *testing.T) {
		path := rotatedLog(t)
		empty := filepath.Join(filepath.Dir(path), "empty")
		os.WriteFile(empty, nil, 0o600)
		rep, err := audit.VerifyFiles(path+".4", path+".3", empty, path+".2", path+".1", path)
		if err != nil || rep.Lines != 20 || len(rep.Files) != 6 || rep.Files[2].Lines != 0 || rep.Files[3].FirstSeq != 9 {
			t.Errorf("VerifyFiles = %+v, %v; want 20 lines in 6 files", rep, err)
		}
	})
	t.Run("no such file", func(t *testing.T) {
		if _, err := audit.VerifyFiles(filepath.Join(t.TempDir(), "nope")); err == nil || !strings.HasPrefix(err.Error(), "audit: open ") {
			t.Errorf("VerifyFiles(missing) = %v, want an audit: open error", err)
		}
		if _, err := audit.VerifyFiles(); err == nil {
			t.Error("VerifyFiles() = nil, want an error")
		}
	})
}
