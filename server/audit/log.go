package audit

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"sync"
	"time"
	"unicode/utf8"
)

// Outcome is what became of the operation an event records.
type Outcome string

// The outcomes.
const (
	OutcomeAllowed Outcome = "allowed" // the operation was permitted (whether or not it then succeeded)
	OutcomeDenied  Outcome = "denied"  // refused: no or a bad token, or a missing permission (Reason)
	OutcomeError   Outcome = "error"   // the decision could not be made (Reason says why)
)

// Event is one audited operation.
type Event struct {
	// Time of the operation; Record sets it when zero. Written in UTC.
	Time time.Time `json:"time"`
	// Accessor is the accessor id of the caller's token; "" for anonymous.
	Accessor string `json:"accessor"`
	// Source is the client's address.
	Source string `json:"source"`
	// Operation is the RPC, e.g. "beacon.v1.RegistryService/Register".
	Operation string `json:"operation"`
	// Resource is what it acted on, e.g. "service:prod/web".
	Resource string `json:"resource"`
	// Outcome is OutcomeAllowed, OutcomeDenied or OutcomeError; Record
	// refuses anything else.
	Outcome Outcome `json:"outcome"`
	// Reason says why, e.g. the missing permission of a denial.
	Reason string `json:"reason,omitempty"`
	// Detail is free-form. It is bounded so that one caller cannot make
	// lines of any size: at most MaxDetail entries (those whose keys sort
	// first are kept), keys and values truncated to MaxDetailBytes bytes
	// (at a UTF-8 boundary).
	Detail map[string]string `json:"detail,omitempty"`
}

// Bounds on what one event writes. The string fields of Event are
// truncated to MaxFieldBytes, so that a line stays far below what Verify
// reads (MaxLineBytes) even with every byte escaped.
const (
	MaxDetail      = 16
	MaxDetailBytes = 256
	MaxFieldBytes  = 4096
)

// Genesis is the prev of the first line of a log: 64 zeros.
const Genesis = "0000000000000000000000000000000000000000000000000000000000000000"

// Defaults of Options.
const (
	DefaultMaxBytes = 64 << 20
	DefaultMaxFiles = 10
)

// Options tune a Log. The zero value means the defaults.
type Options struct {
	// MaxBytes: the file is rotated before a line would take it past this
	// size (a line larger on its own still gets a file of its own).
	// 0 means DefaultMaxBytes.
	MaxBytes int64
	// MaxFiles is how many rotated files are kept, path.1 (the newest) …
	// path.MaxFiles; older ones are deleted. 0 means DefaultMaxFiles.
	MaxFiles int
	// Logger reports what Open repairs (a partial last line dropped) and a
	// directory sync that failed after a rotation. Default: discard.
	Logger *slog.Logger
	// Now stamps events recorded without a Time. Default time.Now.
	Now func() time.Time
}

// ErrClosed is returned by Record after Close.
var ErrClosed = errors.New("audit: log closed")

// Log appends events to an audit log file. It is safe for concurrent use;
// only one Log (in one process) may write a file at a time, or the chain
// breaks.
type Log struct {
	path string
	opts Options

	// mu covers the chain state and the file operations (write, rotation,
	// reopen) and nothing else: events are encoded before it is taken.
	mu     sync.Mutex
	f      *os.File // guarded by mu; nil after a failed write, until reopened
	size   int64    // guarded by mu: bytes of f up to the end of its last line
	seq    int64    // guarded by mu: seq of the last line written (0: none yet)
	prev   [32]byte // guarded by mu: SHA-256 of the last line written
	buf    []byte   // guarded by mu: the line being written
	closed bool     // guarded by mu
}

// Open opens the audit log at path, creating it (mode 0600, and its
// directory with 0700 if missing). An existing log is continued: its last
// line gives the seq and the hash the next line chains to. When path is
// missing or empty and path.1 exists (a crash between the rotation's
// rename and the new file), the chain continues from path.1's last line.
// A partial last line, left by a write that was interrupted, is dropped.
func Open(path string, opts Options) (*Log, error) {
	switch {
	case opts.MaxBytes < 0:
		return nil, fmt.Errorf("audit: invalid MaxBytes %d: must be positive, or 0 for the default %d", opts.MaxBytes, DefaultMaxBytes)
	case opts.MaxFiles < 0:
		return nil, fmt.Errorf("audit: invalid MaxFiles %d: must be positive, or 0 for the default %d", opts.MaxFiles, DefaultMaxFiles)
	}
	if opts.MaxBytes == 0 {
		opts.MaxBytes = DefaultMaxBytes
	}
	if opts.MaxFiles == 0 {
		opts.MaxFiles = DefaultMaxFiles
	}
	if opts.Logger == nil {
		opts.Logger = slog.New(slog.DiscardHandler)
	}
	if opts.Now == nil {
		opts.Now = time.Now
	}
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return nil, fmt.Errorf("audit: %w", err)
	}
	l := &Log{path: path, opts: opts}
	l.mu.Lock()
	defer l.mu.Unlock()
	if err := l.openLocked(); err != nil {
		return nil, err
	}
	if l.seq == 0 {
		// A new or empty file: chain to the last rotated file, if any.
		seq, prev, ok, err := lastRecord(rotatedName(path, 1))
		if err != nil {
			l.f.Close()
			return nil, err
		}
		if ok {
			l.seq, l.prev = seq, prev
		}
	}
	return l, nil
}

// openLocked opens l.path for appending and, when it holds lines, takes
// the chain state from its last one (else it keeps l's).
func (l *Log) openLocked() error {
	f, err := os.OpenFile(l.path, os.O_RDWR|os.O_CREATE|os.O_APPEND, 0o600)
	if err != nil {
		return fmt.Errorf("audit: %w", err)
	}
	line, end, size, err := lastLine(f)
	if err != nil {
		f.Close()
		return fmt.Errorf("audit: %s: %w", l.path, err)
	}
	if end < size {
		if err := f.Truncate(end); err != nil {
			f.Close()
			return fmt.Errorf("audit: dropping the partial last line of %s: %w", l.path, err)
		}
		l.opts.Logger.Warn("audit: dropped a partial last line left by an interrupted write", "file", l.path, "bytes", size-end)
	}
	if line != nil {
		seq, err := parseTail(line)
		if err != nil {
			f.Close()
			return fmt.Errorf("audit: %s: the last line is not an audit record (%v): check it with `beacon audit verify`, and move the file aside to start a new one", l.path, err)
		}
		l.seq, l.prev = seq, sha256.Sum256(line)
	}
	l.f, l.size = f, end
	return nil
}

// lastRecord reads the seq and hash of the last complete line of the file
// at path; ok is false when there is no such file or line. The file is
// not changed.
func lastRecord(path string) (seq int64, hash [32]byte, ok bool, err error) {
	f, err := os.Open(path)
	if errors.Is(err, fs.ErrNotExist) {
		return 0, hash, false, nil
	}
	if err != nil {
		return 0, hash, false, fmt.Errorf("audit: %w", err)
	}
	defer f.Close()
	line, _, _, err := lastLine(f)
	if err != nil {
		return 0, hash, false, fmt.Errorf("audit: %s: %w", path, err)
	}
	if line == nil {
		return 0, hash, false, nil
	}
	seq, err = parseTail(line)
	if err != nil {
		return 0, hash, false, fmt.Errorf("audit: %s: the last line is not an audit record: %v", path, err)
	}
	return seq, sha256.Sum256(line), true, nil
}

// lastLine returns the last complete line of f (without its newline), the
// offset just past it (end) and f's size: bytes past end are a partial
// line. line is nil when f has no complete line.
func lastLine(f *os.File) (line []byte, end, size int64, err error) {
	st, err := f.Stat()
	if err != nil {
		return nil, 0, 0, err
	}
	size = st.Size()
	window := min(size, 2*MaxLineBytes+2)
	buf := make([]byte, window)
	if _, err := f.ReadAt(buf, size-window); err != nil && err != io.EOF {
		return nil, 0, 0, err
	}
	nl := bytes.LastIndexByte(buf, '\n')
	if nl < 0 {
		if window < size {
			return nil, 0, 0, fmt.Errorf("no newline in the last %d bytes: not an audit log", window)
		}
		return nil, 0, size, nil
	}
	end = size - window + int64(nl) + 1
	start := bytes.LastIndexByte(buf[:nl], '\n') + 1
	if start == 0 && window < size {
		return nil, 0, 0, fmt.Errorf("the last line is longer than %d bytes: not an audit log", MaxLineBytes)
	}
	return buf[start:nl], end, size, nil
}

// parseTail reads the seq of a line the chain continues from.
func parseTail(line []byte) (int64, error) {
	var r struct {
		Seq  int64  `json:"seq"`
		Prev string `json:"prev"`
	}
	if err := json.Unmarshal(line, &r); err != nil {
		return 0, err
	}
	if r.Seq < 1 || !isHash(r.Prev) {
		return 0, errors.New("no seq or prev")
	}
	return r.Seq, nil
}

// Record appends e as one line and returns once it is written to the file
// (not synced: Sync, rotation and Close sync). An error means the line is
// not in the log; the next Record tries again, reopening the file if
// need be, and the chain stays unbroken.
func (l *Log) Record(e Event) error {
	switch e.Outcome {
	case OutcomeAllowed, OutcomeDenied, OutcomeError:
	default:
		return fmt.Errorf("audit: invalid Outcome %q: want %q, %q or %q", e.Outcome, OutcomeAllowed, OutcomeDenied, OutcomeError)
	}
	if e.Time.IsZero() {
		e.Time = l.opts.Now()
	}
	body, err := json.Marshal(bounded(e))
	if err != nil {
		return fmt.Errorf("audit: encoding the event: %w", err)
	}

	l.mu.Lock()
	defer l.mu.Unlock()
	if l.closed {
		return ErrClosed
	}
	if l.f == nil {
		if err := l.openLocked(); err != nil {
			return err
		}
	}
	// {"seq":N,"prev":"…", then the event's fields.
	b := append(l.buf[:0], `{"seq":`...)
	b = strconv.AppendInt(b, l.seq+1, 10)
	b = append(b, `,"prev":"`...)
	b = hex.AppendEncode(b, l.prev[:])
	b = append(b, `",`...)
	b = append(b, body[1:]...)
	b = append(b, '\n')
	l.buf = b
	if l.size > 0 && l.size+int64(len(b)) > l.opts.MaxBytes {
		if err := l.rotateLocked(); err != nil {
			return err
		}
	}
	n, err := l.f.Write(b)
	if err != nil {
		// Take back a partial line, and reopen at the next Record: the
		// file may be gone or its descriptor broken. The reopen drops a
		// partial line the truncation could not.
		if n > 0 {
			_ = l.f.Truncate(l.size)
		}
		l.f.Close()
		l.f = nil
		return fmt.Errorf("audit: writing %s: %w", l.path, err)
	}
	l.size += int64(n)
	l.seq++
	l.prev = sha256.Sum256(b[:len(b)-1])
	return nil
}

// rotateLocked syncs and closes the file, shifts path.i to path.i+1
// (deleting what falls past MaxFiles), renames path to path.1 and starts
// a new path. The chain state is kept: the new file's first line chains
// to the last line of path.1.
func (l *Log) rotateLocked() error {
	if l.f != nil {
		err := l.f.Sync()
		if cerr := l.f.Close(); err == nil {
			err = cerr
		}
		l.f = nil
		if err != nil {
			return fmt.Errorf("audit: rotating %s: %w", l.path, err)
		}
	}
	// Delete the oldest, and any left past a MaxFiles since lowered.
	for i := l.opts.MaxFiles; ; i++ {
		err := os.Remove(rotatedName(l.path, i))
		if errors.Is(err, fs.ErrNotExist) {
			break
		}
		if err != nil {
			return fmt.Errorf("audit: rotating %s: %w", l.path, err)
		}
	}
	for i := l.opts.MaxFiles - 1; i >= 1; i-- {
		err := os.Rename(rotatedName(l.path, i), rotatedName(l.path, i+1))
		if err != nil && !errors.Is(err, fs.ErrNotExist) {
			return fmt.Errorf("audit: rotating %s: %w", l.path, err)
		}
	}
	if err := os.Rename(l.path, rotatedName(l.path, 1)); err != nil {
		return fmt.Errorf("audit: rotating %s: %w", l.path, err)
	}
	f, err := os.OpenFile(l.path, os.O_RDWR|os.O_CREATE|os.O_EXCL|os.O_APPEND, 0o600)
	if err != nil {
		return fmt.Errorf("audit: rotating %s: %w", l.path, err)
	}
	l.f, l.size = f, 0
	// The renames are durable once the directory is synced. Failing that
	// the lines are still written; a crash may only undo the renames.
	if err := syncDir(filepath.Dir(l.path)); err != nil {
		l.opts.Logger.Warn("audit: syncing the directory after a rotation", "file", l.path, "err", err)
	}
	return nil
}

func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	err = d.Sync()
	if cerr := d.Close(); err == nil {
		err = cerr
	}
	return err
}

// rotatedName is path.i.
func rotatedName(path string, i int) string { return path + "." + strconv.Itoa(i) }

// Sync commits the lines written so far to stable storage.
func (l *Log) Sync() error {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.f == nil {
		return nil
	}
	if err := l.f.Sync(); err != nil {
		return fmt.Errorf("audit: syncing %s: %w", l.path, err)
	}
	return nil
}

// Close syncs and closes the file. Record then returns ErrClosed; Close
// again returns nil.
func (l *Log) Close() error {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.closed {
		return nil
	}
	l.closed = true
	if l.f == nil {
		return nil
	}
	err := l.f.Sync()
	if cerr := l.f.Close(); err == nil {
		err = cerr
	}
	l.f = nil
	if err != nil {
		return fmt.Errorf("audit: closing %s: %w", l.path, err)
	}
	return nil
}

// bounded returns e in UTC with its strings and Detail cut to the bounds
// (a copy: the caller's map is not changed).
func bounded(e Event) Event {
	e.Time = e.Time.UTC()
	e.Accessor = truncate(e.Accessor, MaxFieldBytes)
	e.Source = truncate(e.Source, MaxFieldBytes)
	e.Operation = truncate(e.Operation, MaxFieldBytes)
	e.Resource = truncate(e.Resource, MaxFieldBytes)
	e.Reason = truncate(e.Reason, MaxFieldBytes)
	if len(e.Detail) == 0 {
		e.Detail = nil
		return e
	}
	keys := make([]string, 0, len(e.Detail))
	for k := range e.Detail {
		keys = append(keys, k)
	}
	if len(keys) > MaxDetail {
		slices.Sort(keys)
		keys = keys[:MaxDetail]
	}
	d := make(map[string]string, len(keys))
	for _, k := range keys {
		d[truncate(k, MaxDetailBytes)] = truncate(e.Detail[k], MaxDetailBytes)
	}
	e.Detail = d
	return e
}

// truncate cuts s to at most n bytes, at a UTF-8 boundary.
func truncate(s string, n int) string {
	if len(s) <= n {
		return s
	}
	for n > 0 && !utf8.RuneStart(s[n]) {
		n--
	}
	return s[:n]
}
