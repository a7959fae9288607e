// Package kv is the server's KV config store: keys per namespace in etcd,
// every version kept in a bounded history written in the same etcd
// transaction as the version itself, compare-and-set and multi-key
// transactions, and an in-memory replica that fans changes out to watch
// streams. docs/kv.md describes it for users; docs/ARCHITECTURE.md, "KV",
// for the code.
//
// Layout, under the server's etcd prefix:
//
//	kv/{namespace}/{key}                      the current value, as written
//	kvhistory/{namespace}/{key}@{seq:020d}    one version: a JSON header line, then the value
//
// A history record's etcd create revision is the revision of the version
// it records, so the record needs no revision of its own (which a
// transaction cannot know before it commits). Every write of a key's
// history is guarded by a compare on the key's own mod revision, so two
// writers can never both take the same sequence number.
package kv

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"time"

	"go.etcd.io/etcd/api/v3/mvccpb"
	clientv3 "go.etcd.io/etcd/client/v3"
	"google.golang.org/protobuf/types/known/timestamppb"

	beaconv1 "beacon.dev/beacon/api/beacon/v1"
)

// DefaultHistory is how many versions of a key are kept (the deletion of
// a key counts as one), unless the server is told otherwise (--kv-history).
const DefaultHistory = 100

// MaxHistory bounds --kv-history: a key's history is read whole on every
// write of the key.
const MaxHistory = 1000

// Store reads and writes KV records in etcd.
type Store struct {
	cli                 *clientv3.Client
	data, historyPrefix string
	history             int
	now                 func() time.Time
}

// New returns a store of values under dataPrefix and their history under
// historyPrefix (store.Layout's KVPrefix and KVHistoryPrefix), keeping
// history versions of each key.
func New(cli *clientv3.Client, dataPrefix, historyPrefix string, history int) *Store {
	return &Store{cli: cli, data: dataPrefix, historyPrefix: historyPrefix, history: history, now: time.Now}
}

// DataPrefix is the prefix of every current value.
func (s *Store) DataPrefix() string { return s.data }

// HistoryPrefix is the prefix of every history record.
func (s *Store) HistoryPrefix() string { return s.historyPrefix }

func (s *Store) dataKey(ns, key string) string { return s.DataPrefix() + ns + "/" + key }

func (s *Store) histPrefix(ns, key string) string { return s.HistoryPrefix() + ns + "/" + key + "@" }

// OpType is what an Op does.
type OpType int

// Op types.
const (
	Put OpType = iota + 1
	Delete
	Check // writes nothing; the commit happens only if the compare holds
)

// Op is one operation of a commit.
type Op struct {
	Type  OpType
	Key   string
	Value []byte
	// Expected, when HasExpected, is the mod revision the key must have
	// (0: it must not exist).
	Expected    int64
	HasExpected bool
	// RollbackOf is the revision of the version a rollback writes again.
	RollbackOf int64
}

// ErrCompare is matched (errors.Is) by every *CompareError.
var ErrCompare = errors.New("kv: compare failed")

// ErrConflict means the keys kept changing under a write that did not ask
// for a compare; the caller may try again.
var ErrConflict = errors.New("kv: the keys kept changing under the write; try again")

// CompareError is a refused compare-and-set: the key's revision is not
// the one the write expected. Op is the operation's index in the commit.
type CompareError struct {
	Op               int
	Key              string
	Expected, Actual int64
}

func (e *CompareError) Error() string {
	switch {
	case e.Actual == 0:
		return fmt.Sprintf("key %q does not exist, the write expected revision %d", e.Key, e.Expected)
	case e.Expected == 0:
		return fmt.Sprintf("key %q exists at revision %d, the write expected it absent (expected_revision 0)", e.Key, e.Actual)
	}
	return fmt.Sprintf("key %q is at revision %d, the write expected revision %d", e.Key, e.Actual, e.Expected)
}

// Is makes errors.Is(err, ErrCompare) true.
func (e *CompareError) Is(target error) bool { return target == ErrCompare }

// Fence makes a commit conditional on a lock: it happens only while the
// session's queue key (HolderKey) exists with create revision Token and no
// older key is in the lock's queue (Queue), i.e. the session holds the
// lock with this token. The store checks it in the commit's transaction.
type Fence struct {
	Lock, Queue, HolderKey string
	Token                  int64
}

// ErrFenced is matched (errors.Is) by every *FenceError.
var ErrFenced = errors.New("kv: fenced")

// FenceError is a write refused by its fence: the lock is not held with
// the token any more. Holder is the current holder's token (0: free).
type FenceError struct {
	Lock          string
	Token, Holder int64
}

func (e *FenceError) Error() string {
	// The holder's token is not said: the writer may not read the lock.
	return fmt.Sprintf("fenced: the write's fencing token %d no longer holds lock %q: nothing written", e.Token, e.Lock)
}

// Is makes errors.Is(err, ErrFenced) true.
func (e *FenceError) Is(target error) bool { return target == ErrFenced }

// Result is what a commit did.
type Result struct {
	Revision int64
	// Wrote is false when nothing changed: only checks, or deletions of
	// keys that were not there.
	Wrote bool
}

// maxAttempts bounds the re-reads of a commit whose keys change between
// its read and its transaction.
const maxAttempts = 16

// Commit applies ops (each key at most once) in one etcd transaction:
// every compare holds and every write lands in one revision, with a
// history record per written key, or nothing changes. accessor is who
// writes (kept in the history).
func (s *Store) Commit(ctx context.Context, ns string, ops []Op, accessor string, fence *Fence) (Result, error) {
	return s.commit(ctx, ns, ops, accessor, fence, nil)
}

// CommitWith is Commit with more of the transaction: compares and
// operations on records kept beside the values (the Consul API's flags
// and lock holders). A failed extra compare ends the commit in ErrConflict
// after one more linearizable try: the caller decided on what it read
// and must read again.
func (s *Store) CommitWith(ctx context.Context, ns string, ops []Op, accessor string, cmps []clientv3.Cmp, more []clientv3.Op) (Result, error) {
	return s.commit(ctx, ns, ops, accessor, nil, &extra{cmps: cmps, ops: more, failFast: true})
}

// extra is more of a commit's transaction: compares and operations on
// records other than values (a rollout's).
type extra struct {
	cmps     []clientv3.Cmp
	ops      []clientv3.Op
	failFast bool // CommitWith: see there
}

func (s *Store) commit(ctx context.Context, ns string, ops []Op, accessor string, fence *Fence, x *extra) (Result, error) {
	// The first read may be served by this member alone (cheap); a
	// compare is refused, and a conflict retried, only on a read the
	// cluster agrees on.
	linearizable := false
	attempts := maxAttempts
	if x != nil && x.failFast {
		// The caller decided on records of its own, which a re-read here
		// does not refresh: a failed compare goes back to it at once
		// (after one linearizable try, in case the first read lagged).
		attempts = 2
	}
	for range attempts {
		res, retry, err := s.tryCommit(ctx, ns, ops, accessor, fence, x, linearizable)
		if !retry {
			return res, err
		}
		linearizable = true
	}
	return Result{}, ErrConflict
}

func (s *Store) tryCommit(ctx context.Context, ns string, ops []Op, accessor string, fence *Fence, x *extra, linearizable bool) (Result, bool, error) {
	var readOpts []clientv3.OpOption
	if !linearizable {
		readOpts = append(readOpts, clientv3.WithSerializable())
	}
	reads := make([]clientv3.Op, 0, 2*len(ops))
	for _, op := range ops {
		reads = append(reads, clientv3.OpGet(s.dataKey(ns, op.Key), append([]clientv3.OpOption{clientv3.WithKeysOnly()}, readOpts...)...))
		if op.Type != Check {
			reads = append(reads, clientv3.OpGet(s.histPrefix(ns, op.Key), append([]clientv3.OpOption{clientv3.WithPrefix(), clientv3.WithKeysOnly()}, readOpts...)...))
		}
	}
	if fence != nil {
		reads = append(reads,
			clientv3.OpGet(fence.HolderKey, append([]clientv3.OpOption{clientv3.WithKeysOnly()}, readOpts...)...),
			clientv3.OpGet(fence.Queue, append([]clientv3.OpOption{clientv3.WithPrefix(), clientv3.WithKeysOnly(), clientv3.WithSort(clientv3.SortByCreateRevision, clientv3.SortAscend), clientv3.WithLimit(1)}, readOpts...)...))
	}
	read, err := s.cli.Txn(ctx).Then(reads...).Commit()
	if err != nil {
		return Result{}, false, err
	}
	at := s.now().UTC()
	var cmps []clientv3.Cmp
	if fence != nil {
		n := len(read.Responses)
		mine, oldest := read.Responses[n-2].GetResponseRange().Kvs, read.Responses[n-1].GetResponseRange().Kvs
		holder := int64(0)
		if len(oldest) > 0 {
			holder = oldest[0].CreateRevision
		}
		if len(mine) == 0 || mine[0].CreateRevision != fence.Token || holder != fence.Token {
			if !linearizable {
				return Result{}, true, nil
			}
			return Result{}, false, &FenceError{Lock: fence.Lock, Token: fence.Token, Holder: holder}
		}
		cmps = append(cmps,
			clientv3.Compare(clientv3.CreateRevision(fence.HolderKey), "=", fence.Token),
			clientv3.Compare(clientv3.CreateRevision(fence.Queue), ">", fence.Token-1).WithPrefix()) // no older key: etcd has no ">="
	}
	var writes []clientv3.Op
	j := 0
	for i, op := range ops {
		data := read.Responses[j].GetResponseRange()
		j++
		var modRev int64
		if len(data.Kvs) > 0 {
			modRev = data.Kvs[0].ModRevision
		}
		if op.HasExpected && op.Expected != modRev {
			if !linearizable {
				return Result{}, true, nil // perhaps a lagging member: ask the cluster
			}
			return Result{}, false, &CompareError{Op: i, Key: op.Key, Expected: op.Expected, Actual: modRev}
		}
		dataKey := s.dataKey(ns, op.Key)
		cmps = append(cmps, clientv3.Compare(clientv3.ModRevision(dataKey), "=", modRev))
		if op.Type == Check {
			continue
		}
		hist := read.Responses[j].GetResponseRange().Kvs
		j++
		if op.Type == Delete && modRev == 0 {
			continue // nothing to delete; the compare keeps the answer true
		}
		seq, trimBefore := s.nextVersion(ns, op.Key, hist)
		// The history must be as read: a key put and deleted meanwhile
		// is absent again (its mod revision compares equal), but it left
		// records that this write must not overwrite or precede.
		newRecord := s.histKey(ns, op.Key, seq)
		cmps = append(cmps, clientv3.Compare(clientv3.CreateRevision(newRecord), "=", 0))
		if len(hist) == 0 {
			cmps = append(cmps, clientv3.Compare(clientv3.CreateRevision(s.histPrefix(ns, op.Key)), "=", 0).WithPrefix())
		} else {
			last := hist[len(hist)-1]
			cmps = append(cmps, clientv3.Compare(clientv3.ModRevision(string(last.Key)), "=", last.ModRevision))
		}
		h := versionHeader{Time: at, Accessor: accessor, Deleted: op.Type == Delete, RollbackOf: op.RollbackOf}
		if op.Type == Put {
			writes = append(writes, clientv3.OpPut(dataKey, string(op.Value)))
		} else {
			writes = append(writes, clientv3.OpDelete(dataKey))
		}
		writes = append(writes, clientv3.OpPut(newRecord, string(encodeVersion(h, op.Value))))
		if trimBefore != "" {
			writes = append(writes, clientv3.OpDelete(s.histPrefix(ns, op.Key), clientv3.WithRange(trimBefore)))
		}
	}
	if len(writes) == 0 {
		if linearizable {
			return Result{Revision: read.Header.Revision}, false, nil
		}
		return Result{}, true, nil // "nothing to do" is said only on a linearizable read
	}
	if x != nil {
		cmps, writes = append(cmps, x.cmps...), append(writes, x.ops...)
	}
	resp, err := s.cli.Txn(ctx).If(cmps...).Then(writes...).Commit()
	if err != nil {
		return Result{}, false, err
	}
	if !resp.Succeeded {
		return Result{}, true, nil // changed since the read: read again
	}
	return Result{Revision: resp.Header.Revision, Wrote: true}, false, nil
}

func (s *Store) histKey(ns, key string, seq uint64) string {
	return fmt.Sprintf("%s%020d", s.histPrefix(ns, key), seq)
}

// nextVersion picks the sequence number of a key's next history record,
// and the first record to keep (all before it are trimmed) so that with
// the new one the key keeps s.history versions. hist is sorted by key,
// so by sequence.
func (s *Store) nextVersion(ns, key string, hist []*mvccpb.KeyValue) (seq uint64, trimBefore string) {
	if len(hist) == 0 {
		return 1, ""
	}
	last := string(hist[len(hist)-1].Key)
	n, err := strconv.ParseUint(last[strings.LastIndexByte(last, '@')+1:], 10, 64)
	if err != nil {
		// A hand-made record: continue past anything that parses.
		n = uint64(len(hist))
	}
	if keep := s.history - 1; len(hist) > keep {
		if keep == 0 {
			trimBefore = s.histKey(ns, key, n+1)
		} else {
			trimBefore = string(hist[len(hist)-keep].Key)
		}
	}
	return n + 1, trimBefore
}

// versionHeader is a history record's first line.
type versionHeader struct {
	Time       time.Time `json:"time"`
	Accessor   string    `json:"accessor,omitempty"`
	Deleted    bool      `json:"deleted,omitempty"`
	RollbackOf int64     `json:"rollback_of,omitempty"`
}

func encodeVersion(h versionHeader, value []byte) []byte {
	b, _ := json.Marshal(h) // plain fields: cannot fail
	b = append(b, '\n')
	if !h.Deleted {
		b = append(b, value...)
	}
	return b
}

func decodeVersion(kv *mvccpb.KeyValue) (*beaconv1.KVVersion, error) {
	head, value, ok := bytes.Cut(kv.Value, []byte{'\n'})
	if !ok {
		return nil, errors.New("no header line")
	}
	var h versionHeader
	if err := json.Unmarshal(head, &h); err != nil {
		return nil, err
	}
	v := &beaconv1.KVVersion{
		Revision: kv.CreateRevision, Deleted: h.Deleted, Accessor: h.Accessor,
		RollbackOf: h.RollbackOf, Time: timestamppb.New(h.Time),
	}
	if !h.Deleted {
		v.Value = value
	}
	return v, nil
}

// Get reads a key (linearizable); nil when there is no such key.
func (s *Store) Get(ctx context.Context, ns, key string) (*beaconv1.KeyValue, int64, error) {
	resp, err := s.cli.Get(ctx, s.dataKey(ns, key))
	if err != nil {
		return nil, 0, err
	}
	if len(resp.Kvs) == 0 {
		return nil, resp.Header.Revision, nil
	}
	return toProto(s.dataKey(ns, ""), resp.Kvs[0]), resp.Header.Revision, nil
}

// List reads up to limit keys starting with prefix and sorting after
// startAfter (linearizable); more says whether keys follow.
func (s *Store) List(ctx context.Context, ns, prefix, startAfter string, limit int, keysOnly bool) (kvs []*beaconv1.KeyValue, rev int64, more bool, err error) {
	base := s.dataKey(ns, "")
	from, end := base+prefix, clientv3.GetPrefixRangeEnd(base+prefix)
	if startAfter != "" && base+startAfter >= from {
		from = base + startAfter + "\x00"
	}
	opts := []clientv3.OpOption{clientv3.WithRange(end), clientv3.WithLimit(int64(limit) + 1)}
	if keysOnly {
		opts = append(opts, clientv3.WithKeysOnly())
	}
	resp, err := s.cli.Get(ctx, from, opts...)
	if err != nil {
		return nil, 0, false, err
	}
	n := len(resp.Kvs)
	if n > limit {
		n, more = limit, true
	}
	kvs = make([]*beaconv1.KeyValue, n)
	for i := range n {
		kvs[i] = toProto(base, resp.Kvs[i])
	}
	return kvs, resp.Header.Revision, more, nil
}

func toProto(base string, kv *mvccpb.KeyValue) *beaconv1.KeyValue {
	return &beaconv1.KeyValue{
		Key: strings.TrimPrefix(string(kv.Key), base), Value: kv.Value,
		CreateRevision: kv.CreateRevision, ModRevision: kv.ModRevision, Version: kv.Version,
	}
}

// History reads the versions kept of a key, oldest first (linearizable).
// Records that do not decode (edited by hand) are left out and counted in
// skipped.
func (s *Store) History(ctx context.Context, ns, key string) (versions []*beaconv1.KVVersion, rev int64, skipped int, err error) {
	resp, err := s.cli.Get(ctx, s.histPrefix(ns, key), clientv3.WithPrefix())
	if err != nil {
		return nil, 0, 0, err
	}
	for _, kv := range resp.Kvs {
		v, err := decodeVersion(kv)
		if err != nil {
			skipped++
			continue
		}
		versions = append(versions, v)
	}
	return versions, resp.Header.Revision, skipped, nil
}

// ErrNoVersion: a rollback names a revision the key's kept history does
// not have, or its deletion.
var ErrNoVersion = errors.New("kv: no such version")

// Rollback writes the version of revision to again, as a new version (a
// Put: expected, when hasExpected, is compared as in Put).
func (s *Store) Rollback(ctx context.Context, ns, key string, to, expected int64, hasExpected bool, accessor string) (Result, error) {
	versions, _, _, err := s.History(ctx, ns, key)
	if err != nil {
		return Result{}, err
	}
	for _, v := range versions {
		if v.Revision != to {
			continue
		}
		if v.Deleted {
			return Result{}, fmt.Errorf("%w: revision %d deleted key %q; roll back to a version that holds a value (or delete the key)", ErrNoVersion, to, key)
		}
		return s.Commit(ctx, ns, []Op{{Type: Put, Key: key, Value: v.Value, Expected: expected, HasExpected: hasExpected, RollbackOf: to}}, accessor, nil)
	}
	oldest := int64(0)
	if len(versions) > 0 {
		oldest = versions[0].Revision
	}
	return Result{}, fmt.Errorf("%w: key %q has no version at revision %d (its kept history starts at revision %d; `beacon kv history %s` lists them)", ErrNoVersion, key, to, oldest, key)
}
