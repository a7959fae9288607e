package audit

import (
	"bufio"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
)

// MaxLineBytes is the longest line Verify reads; Record's bounds keep its
// lines far below it.
const MaxLineBytes = 1 << 20

// Verification fails with a *LineError that wraps one of these.
var (
	// ErrBroken: a line is not an audit record or the chain is broken
	// there; the log was edited, or lines were removed, reordered or
	// inserted (or the file is not an audit log).
	ErrBroken = errors.New("audit: the log does not verify")
	// ErrTruncated: the last line has no newline. A write was cut short
	// (a crash, a full disk: Open drops such a line), or the log is being
	// written as it is read. The lines before it verify.
	ErrTruncated = errors.New("audit: the last line is incomplete")
)

// LineError says where a log stops verifying and why.
type LineError struct {
	File   string // "" when verifying a reader
	Line   int    // 1-based, within File
	Reason string
	Err    error // ErrBroken or ErrTruncated
}

func (e *LineError) Error() string {
	if e.File == "" {
		return fmt.Sprintf("audit: line %d: %s", e.Line, e.Reason)
	}
	return fmt.Sprintf("audit: %s: line %d: %s", e.File, e.Line, e.Reason)
}

func (e *LineError) Unwrap() error { return e.Err }

// Verify reads an audit log from r and checks every line: a JSON audit
// record, its seq one more than the line before's, its prev the SHA-256 of
// the line before. prevHash and prevSeq are the line before the first
// one: Genesis and 0 for the start of a log, "" (and any prevSeq) when it
// is not known, and the first line is then taken as it is.
//
// It returns the hash and seq of the last line that verified and the
// number of lines that did (n): when err is not nil, the first n lines
// verify and line n+1 does not (err is a *LineError), or reading failed.
// An empty r verifies, returning prevHash and prevSeq.
func Verify(r io.Reader, prevHash string, prevSeq int64) (lastHash string, lastSeq int64, n int, err error) {
	if prevHash != "" && !isHash(prevHash) {
		return prevHash, prevSeq, 0, fmt.Errorf("audit: invalid prevHash %q: want 64 lowercase hex digits, or \"\" when unknown", prevHash)
	}
	if prevSeq < 0 || prevHash == Genesis && prevSeq != 0 {
		return prevHash, prevSeq, 0, fmt.Errorf("audit: invalid prevSeq %d: want 0 with Genesis, else at least 0", prevSeq)
	}
	v := verifier{hash: prevHash, seq: prevSeq, prevName: "the line before"}
	err = v.read(r)
	return v.hash, v.seq, v.n, err
}

// Report is what VerifyFiles verified.
type Report struct {
	Files []FileReport `json:"files"` // in the order verified, oldest first
	Lines int          `json:"lines"`
	// FirstSeq and LastSeq are the seqs of the first and last lines (0
	// when there are none); LastHash is the SHA-256 of the last line. Keep
	// them: a later VerifyFiles that does not reach LastSeq with the same
	// hash means the log lost its end.
	FirstSeq int64  `json:"first_seq"`
	LastSeq  int64  `json:"last_seq"`
	LastHash string `json:"last_hash"`
	// FromStart: the first line starts the chain (its prev is Genesis).
	// When false, the files before it were rotated away (or deleted), and
	// the log verifies from that line on only.
	FromStart bool `json:"from_start"`
}

// FileReport is what VerifyFiles verified in one file.
type FileReport struct {
	Path     string `json:"path"`
	Lines    int    `json:"lines"`
	FirstSeq int64  `json:"first_seq"` // 0 when the file has no lines
	LastSeq  int64  `json:"last_seq"`
}

// VerifyFiles verifies the files of one log in the order given, oldest
// first, the chain running from each file into the next. Given a single
// path that has rotated files beside it (path.1, path.2, …), it verifies
// them all: path.N … path.1, then path. The first line is taken as it
// is, and Report.FromStart says whether it starts the chain.
//
// The Report covers what verified, also when err is not nil; err names
// the file and the line (a *LineError), or the file that could not be
// read.
func VerifyFiles(paths ...string) (Report, error) {
	if len(paths) == 0 {
		return Report{}, errors.New("audit: no file to verify")
	}
	if len(paths) == 1 {
		rotated, err := rotatedFiles(paths[0])
		if err != nil {
			return Report{}, err
		}
		paths = append(rotated, paths[0])
	}
	var rep Report
	v := verifier{}
	for _, p := range paths {
		if rep.Lines > 0 {
			last := rep.Files[len(rep.Files)-1]
			for _, fr := range rep.Files {
				if fr.Lines > 0 {
					last = fr
				}
			}
			v.prevName = fmt.Sprintf("the last line of %s (line %d)", last.Path, last.Lines)
		}
		v.file, v.n = p, 0
		f, err := os.Open(p)
		if err != nil {
			return rep, fmt.Errorf("audit: %w", err)
		}
		before := v.seq
		err = v.read(f)
		f.Close()
		fr := FileReport{Path: p, Lines: v.n}
		if v.n > 0 {
			fr.FirstSeq, fr.LastSeq = before+1, v.seq
			if rep.Lines == 0 {
				rep.FirstSeq, rep.FromStart = v.firstSeq, v.firstPrev == Genesis
				fr.FirstSeq = v.firstSeq
			}
			rep.LastSeq, rep.LastHash = v.seq, v.hash
		}
		rep.Files = append(rep.Files, fr)
		rep.Lines += v.n
		if err != nil {
			return rep, err
		}
	}
	return rep, nil
}

// rotatedFiles lists path.N … path.1 (any N, oldest first), those that
// exist: a gap in the numbers then shows as a break in the chain.
func rotatedFiles(path string) ([]string, error) {
	dir, base := filepath.Split(path)
	entries, err := os.ReadDir(filepath.Clean(dir + "."))
	if err != nil {
		return nil, fmt.Errorf("audit: %w", err)
	}
	var nums []int
	for _, e := range entries {
		suffix, ok := strings.CutPrefix(e.Name(), base+".")
		if !ok || e.IsDir() {
			continue
		}
		if i, err := strconv.Atoi(suffix); err == nil && i > 0 && strconv.Itoa(i) == suffix {
			nums = append(nums, i)
		}
	}
	slices.Sort(nums)
	slices.Reverse(nums)
	out := make([]string, len(nums))
	for j, i := range nums {
		out[j] = rotatedName(path, i)
	}
	return out, nil
}

// verifier checks lines one after the other, across files.
type verifier struct {
	file      string
	hash      string // of the last line verified; "" when not known
	seq       int64  // of the last line verified
	n         int    // lines verified in this file
	total     int    // lines verified in all
	prevName  string // how to name the line before this file's first
	firstSeq  int64
	firstPrev string
}

func (v *verifier) fail(line int, err error, format string, args ...any) error {
	return &LineError{File: v.file, Line: line, Reason: fmt.Sprintf(format, args...), Err: err}
}

// record is a line as Verify decodes it: the chain fields and the event's,
// typed, so that a field of the wrong type is reported.
type record struct {
	Seq  *int64  `json:"seq"`
	Prev *string `json:"prev"`
	Event
}

func (v *verifier) read(r io.Reader) error {
	br := bufio.NewReaderSize(r, 64<<10)
	var long []byte
	for {
		line, err := br.ReadSlice('\n')
		if err == bufio.ErrBufferFull || long != nil {
			long = append(long, line...)
			if len(long) > MaxLineBytes+1 {
				return v.fail(v.n+1, ErrBroken, "longer than %d bytes: not an audit record", MaxLineBytes)
			}
			if err == bufio.ErrBufferFull {
				continue
			}
			line = long
		}
		switch {
		case err == io.EOF && len(line) == 0:
			return nil
		case err == io.EOF:
			return v.fail(v.n+1, ErrTruncated, "no newline at the end: a write was cut short (Open drops such a line), or the log is being written; the %d lines before it verify", v.n)
		case err != nil:
			if v.file != "" {
				return fmt.Errorf("audit: %s: reading line %d: %w", v.file, v.n+1, err)
			}
			return fmt.Errorf("audit: reading line %d: %w", v.n+1, err)
		}
		if err := v.check(line[:len(line)-1]); err != nil {
			return err
		}
		long = nil
	}
}

// check verifies one line (without its newline) after the last one.
func (v *verifier) check(line []byte) error {
	no := v.n + 1
	if len(line) > MaxLineBytes {
		return v.fail(no, ErrBroken, "longer than %d bytes: not an audit record", MaxLineBytes)
	}
	var rec record
	if err := json.Unmarshal(line, &rec); err != nil {
		return v.fail(no, ErrBroken, "not a JSON audit record: %v", err)
	}
	switch {
	case rec.Seq == nil || rec.Prev == nil:
		return v.fail(no, ErrBroken, "not an audit record: no seq or prev")
	case *rec.Seq < 1:
		return v.fail(no, ErrBroken, "seq %d: want 1 or more", *rec.Seq)
	case !isHash(*rec.Prev):
		return v.fail(no, ErrBroken, "prev %q is not a SHA-256 in hex", *rec.Prev)
	}
	seq, prev := *rec.Seq, *rec.Prev
	prevName := v.prevName
	if v.n > 0 {
		prevName = fmt.Sprintf("line %d", v.n)
	}
	switch {
	case v.hash == "":
		// The start is not known: take this line as it is.
		if prev == Genesis && seq != 1 {
			return v.fail(no, ErrBroken, "prev is all zeros (the start of a log) but seq is %d, want 1: the log was edited", seq)
		}
	case prev != v.hash && v.hash == Genesis:
		return v.fail(no, ErrBroken, "seq %d where the log should start (seq 1, prev all zeros): lines were removed from the start", seq)
	case prev != v.hash && prev == Genesis:
		return v.fail(no, ErrBroken, "seq %d starts a new chain (prev is all zeros) after seq %d: the log was started again from nothing here, or files of different logs were put together", seq, v.seq)
	case prev != v.hash && seq > v.seq+1:
		return v.fail(no, ErrBroken, "seq %d follows seq %d and prev does not match the hash of %s: lines were removed or reordered", seq, v.seq, prevName)
	case prev != v.hash && seq <= v.seq:
		return v.fail(no, ErrBroken, "seq %d follows seq %d and prev does not match the hash of %s: lines were reordered, repeated or inserted", seq, v.seq, prevName)
	case prev != v.hash:
		return v.fail(no, ErrBroken, "prev does not match the hash of %s: the log was edited or lines were removed", prevName)
	case seq != v.seq+1:
		return v.fail(no, ErrBroken, "seq %d follows seq %d though prev matches the hash of %s: this line was edited", seq, v.seq, prevName)
	}
	if v.total == 0 {
		v.firstSeq, v.firstPrev = seq, prev
	}
	sum := sha256.Sum256(line)
	v.hash, v.seq = hex.EncodeToString(sum[:]), seq
	v.n++
	v.total++
	return nil
}

// isHash: 64 lowercase hex digits, as Record writes them.
func isHash(s string) bool {
	if len(s) != 2*sha256.Size {
		return false
	}
	for i := 0; i < len(s); i++ {
		if c := s[i]; (c < '0' || c > '9') && (c < 'a' || c > 'f') {
			return false
		}
	}
	return true
}
