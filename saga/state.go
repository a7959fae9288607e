package saga

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"slices"
	"strings"
	"time"

	"beacon.dev/beacon/client"
	"beacon.dev/beacon/registry"
)

// Status is where a saga is.
type Status string

const (
	// Running: its actions go forward, Step is the next one to do.
	Running Status = "running"
	// Compensating: an action failed for good, or the saga ran past its
	// timeout; Step is the next step whose compensation runs, going back.
	Compensating Status = "compensating"
	// Done: every action succeeded.
	Done Status = "done"
	// Compensated: every step that may have acted was undone.
	Compensated Status = "compensated"
	// Stuck: a compensation failed for good; an operator looks and
	// retries it (Retry, `beacon saga retry`).
	Stuck Status = "stuck"
)

// Finished says the saga will not move again by itself.
func (s Status) Finished() bool { return s == Done || s == Compensated || s == Stuck }

// State is a saga as it is stored: one KV key, PREFIX SAGA/ID, written
// after every step.
type State struct {
	Saga   string `json:"saga"`
	ID     string `json:"id"`
	Status Status `json:"status"`
	// Step indexes Steps: the next action (Running) or compensation
	// (Compensating; -1 once none is left).
	Step  int      `json:"step"`
	Steps []string `json:"steps"`
	Input []byte   `json:"input,omitempty"`
	// Outputs are the results of the actions that succeeded, by step.
	Outputs map[string][]byte `json:"outputs,omitempty"`
	// Error says why the saga compensates or is stuck.
	Error    string    `json:"error,omitempty"`
	Created  time.Time `json:"created"`
	Updated  time.Time `json:"updated"`
	Deadline time.Time `json:"deadline"`
	// Trace is the W3C trace context of the call that started the saga:
	// its steps' calls continue that trace.
	Trace map[string]string `json:"trace,omitempty"`
	// Retries counts operator retries.
	Retries int `json:"retries,omitempty"`
	// History is what happened, oldest first (the last MaxHistory entries).
	History []Entry `json:"history,omitempty"`

	// Key and Revision are the KV key and its version (not stored).
	Key      string `json:"-"`
	Revision int64  `json:"-"`
}

// Entry is one event of a saga's history.
type Entry struct {
	Time     time.Time `json:"time"`
	Step     string    `json:"step,omitempty"`
	What     string    `json:"what"` // started, done, failed, timed out, compensated, stuck, retried
	Attempts int       `json:"attempts,omitempty"`
	Error    string    `json:"error,omitempty"`
}

// MaxHistory bounds a saga's kept history entries.
const MaxHistory = 32

// maxErrorBytes bounds an error kept in a state (and in each history
// entry), so that a state's size stays bounded.
const maxErrorBytes = 1024

func clip(s string) string {
	if len(s) <= maxErrorBytes {
		return s
	}
	return s[:maxErrorBytes] + "…"
}

func (st *State) record(e Entry) {
	e.Error = clip(e.Error)
	st.Error = clip(st.Error)
	e.Time = time.Now().UTC()
	st.History = append(st.History, e)
	if n := len(st.History) - MaxHistory; n > 0 {
		st.History = slices.Delete(st.History, 0, n)
	}
	st.Updated = e.Time
}

// StepName is the name of the step Step points at ("" past either end).
func (st *State) StepName() string {
	if st.Step < 0 || st.Step >= len(st.Steps) {
		return ""
	}
	return st.Steps[st.Step]
}

func (st *State) clone() State {
	c := *st
	c.Steps = slices.Clone(st.Steps)
	c.History = slices.Clone(st.History)
	c.Input = slices.Clone(st.Input)
	c.Trace = maps.Clone(st.Trace)
	if st.Outputs != nil {
		c.Outputs = make(map[string][]byte, len(st.Outputs))
		for k, v := range st.Outputs {
			c.Outputs[k] = v
		}
	}
	return c
}

func decodeState(kv client.KeyValue) (State, error) {
	var st State
	if err := json.Unmarshal(kv.Value, &st); err != nil {
		return State{}, fmt.Errorf("saga: key %s: %w", kv.Key, err)
	}
	if st.Saga == "" || st.ID == "" || len(st.Steps) == 0 {
		return State{}, fmt.Errorf("saga: key %s: not a saga's state (no saga, id or steps)", kv.Key)
	}
	st.Key, st.Revision = kv.Key, kv.ModRevision
	return st, nil
}

// ErrNotFound is matched (errors.Is) when no saga has the name and id.
var ErrNotFound = errors.New("saga: not found")

// ErrInvalid is matched when an argument is refused; the error names the
// field and the limit.
var ErrInvalid = errors.New("saga: invalid")

// MaxIDLen bounds saga names and ids.
const MaxIDLen = 128

// validName checks a saga's name or id: 1–128 bytes of letters, digits,
// '.', '_' and '-' (it becomes part of a KV key).
func validName(field, s string) error {
	if s == "" || len(s) > MaxIDLen {
		return fmt.Errorf("%w: %s %q must be 1-%d bytes, has %d", ErrInvalid, field, s, MaxIDLen, len(s))
	}
	for _, r := range s {
		if !(r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' || r == '.' || r == '_' || r == '-') {
			return fmt.Errorf("%w: %s %q may hold only letters, digits, '.', '_' and '-'", ErrInvalid, field, s)
		}
	}
	return nil
}

// Store reads and repairs sagas kept under a KV prefix: what an operator
// (or `beacon saga`) needs, without the sagas' definitions.
type Store struct {
	kv     *client.KV
	prefix string
	opts   []client.CallOption
}

// DefaultPrefix is where sagas are kept unless told otherwise.
const DefaultPrefix = "sagas/"

// NewStore reads the sagas under prefix ("" is DefaultPrefix; it ends in
// '/'); opts (client.InNamespace, say) go with every call.
func NewStore(kv *client.KV, prefix string, opts ...client.CallOption) (*Store, error) {
	if prefix == "" {
		prefix = DefaultPrefix
	}
	if !strings.HasSuffix(prefix, "/") || strings.HasPrefix(prefix, "/") {
		return nil, fmt.Errorf("%w: prefix %q must end, and not start, with '/'", ErrInvalid, prefix)
	}
	if err := registry.ValidateKeyPrefix("prefix", prefix); err != nil {
		return nil, fmt.Errorf("%w: %w", ErrInvalid, err)
	}
	// Room for the longest key under it: runs/NAME/ID.
	if n := len(prefix) + len("runs/") + 2*MaxIDLen + 1; n > registry.MaxKeyLen {
		return nil, fmt.Errorf("%w: prefix %q is %d bytes: with a saga's name and id a key could reach %d, more than %d", ErrInvalid, prefix, len(prefix), n, registry.MaxKeyLen)
	}
	return &Store{kv: kv, prefix: prefix, opts: opts}, nil
}

// key is where saga name's instance id is kept.
func (s *Store) key(name, id string) string { return s.prefix + "runs/" + name + "/" + id }

// runs is the prefix of every saga's key.
func (s *Store) runs() string { return s.prefix + "runs/" }

// Get returns one saga's state (ErrNotFound when there is none).
func (s *Store) Get(ctx context.Context, name, id string) (State, error) {
	if err := validName("saga", name); err != nil {
		return State{}, err
	}
	if err := validName("id", id); err != nil {
		return State{}, err
	}
	kv, err := s.kv.Get(ctx, s.key(name, id), s.opts...)
	if errors.Is(err, client.ErrNotFound) {
		return State{}, fmt.Errorf("%w: no saga %s/%s under %s", ErrNotFound, name, id, s.prefix)
	}
	if err != nil {
		return State{}, err
	}
	return decodeState(kv)
}

// List returns the sagas (of saga name, or all with ""), oldest first.
// Keys under the prefix that are not a saga's state are skipped.
func (s *Store) List(ctx context.Context, name string) ([]State, error) {
	p := s.runs()
	if name != "" {
		if err := validName("saga", name); err != nil {
			return nil, err
		}
		p += name + "/"
	}
	kvs, _, err := s.kv.List(ctx, p, s.opts...)
	if err != nil {
		return nil, err
	}
	out := make([]State, 0, len(kvs))
	for _, kv := range kvs {
		if st, err := decodeState(kv); err == nil {
			out = append(out, st)
		}
	}
	slices.SortStableFunc(out, func(a, b State) int { return a.Created.Compare(b.Created) })
	return out, nil
}

// Retry sends a stuck saga back to compensating from the step it is
// stuck at, with fresh attempts; its orchestrator picks it up. Only a
// stuck saga can be retried: a running one is someone's to move, and a
// done or compensated one is over.
func (s *Store) Retry(ctx context.Context, name, id string) (State, error) {
	st, err := s.Get(ctx, name, id)
	if err != nil {
		return State{}, err
	}
	if st.Status != Stuck {
		return State{}, fmt.Errorf("%w: saga %s/%s is %s: only a stuck saga can be retried", ErrInvalid, name, id, st.Status)
	}
	st.Status = Compensating
	st.Retries++
	st.record(Entry{Step: st.StepName(), What: "retried"})
	b, err := json.Marshal(&st)
	if err != nil {
		return State{}, err
	}
	rev, err := s.kv.CompareAndSwap(ctx, st.Key, b, st.Revision, s.opts...)
	if err != nil {
		if errors.Is(err, client.ErrCompareFailed) {
			return State{}, fmt.Errorf("saga %s/%s changed while being retried: %w", name, id, err)
		}
		return State{}, err
	}
	st.Revision = rev
	return st, nil
}
