package audit_test

import (
	"bytes"
	"errors"
	"testing"

	"beacon.dev/beacon/server/audit"
)

// FuzzVerify: Verify never panics, and whatever it says holds: the n
// lines it reports as verified verify again on their own, with the same
// last hash and seq, and the error names line n+1.
func FuzzVerify(f *testing.F) {
	lines := tenLines(f)
	log := join(lines)
	f.Add(log, audit.Genesis, int64(0))
	f.Add(log, "", int64(0))
	f.Add(join(lines[3:]), hashOf(lines[2]), int64(3))
	f.Add(log[:len(log)-7], audit.Genesis, int64(0))
	f.Add(join(append(lines[:4:4], lines[5:]...)), "", int64(0))
	f.Add([]byte("{}\n"), "", int64(0))
	f.Add([]byte(`{"seq":1,"prev":"`+audit.Genesis+`"}`+"\n"), audit.Genesis, int64(0))
	f.Add([]byte("\n\n"), "", int64(-1))
	f.Fuzz(func(t *testing.T, data []byte, prevHash string, prevSeq int64) {
		lastHash, lastSeq, n, err := audit.Verify(bytes.NewReader(data), prevHash, prevSeq)
		var le *audit.LineError
		switch {
		case err == nil:
			if len(data) > 0 && data[len(data)-1] != '\n' || n != bytes.Count(data, []byte("\n")) {
				t.Fatalf("Verify(%q) = %d lines, nil: want every line verified and ended", data, n)
			}
		case errors.As(err, &le):
			if le.Line != n+1 || !errors.Is(err, audit.ErrBroken) && !errors.Is(err, audit.ErrTruncated) {
				t.Fatalf("Verify(%q) = %d lines, %v: want the error on line %d, ErrBroken or ErrTruncated", data, n, err, n+1)
			}
		default:
			// Only the arguments can be wrong: a bytes.Reader does not fail.
			if n != 0 || lastHash != prevHash || lastSeq != prevSeq {
				t.Fatalf("Verify(%q, %q, %d) = %s %d %d %v", data, prevHash, prevSeq, lastHash, lastSeq, n, err)
			}
			return
		}
		end := 0
		for range n {
			end += bytes.IndexByte(data[end:], '\n') + 1
		}
		h, s, m, err := audit.Verify(bytes.NewReader(data[:end]), prevHash, prevSeq)
		if err != nil || h != lastHash || s != lastSeq || m != n {
			t.Fatalf("the %d lines that verified in %q, again: %s %d %d %v; want %s %d %d nil", n, data, h, s, m, err, lastHash, lastSeq, n)
		}
	})
}
