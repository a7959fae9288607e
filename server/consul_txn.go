package server

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	beaconv1 "beacon.dev/beacon/api/beacon/v1"
	"beacon.dev/beacon/api/beacon/v1/beaconv1connect"
	"beacon.dev/beacon/registry"
	"beacon.dev/beacon/server/internal/acl"
	"beacon.dev/beacon/server/internal/kv"
)

// Transactions (PUT /v1/txn): the KV verbs of Consul's transaction API
// over one beacon KV commit — set, cas, get, delete, delete-cas,
// check-index, check-not-exists. All or nothing: a failed check (or a get
// of a key that is not there) answers 409 naming the operation, and
// nothing is written; the results are read at the commit's revision.

type consulTxnKV struct {
	Verb, Key string
	Value     []byte
	Flags     uint64
	Index     int64
	Session   string
}

type consulTxnOp struct {
	KV                            *consulTxnKV
	Node, Service, Check, Session any
}

type consulTxnError struct {
	OpIndex int
	What    string
}

// consulMaxTxnKeys bounds the distinct keys of a Consul transaction: each
// costs up to 5 compares and 5 writes of one etcd transaction (the value,
// its history, the records beside it), and etcd takes at most 128 of each.
const consulMaxTxnKeys = 25

func consulTxnWrites(verb string) bool {
	return verb == "set" || verb == "cas" || verb == "delete" || verb == "delete-cas"
}

func (s *Server) consulTxn(w http.ResponseWriter, r *http.Request, q *consulQuery) {
	ctx := r.Context()
	var ops []consulTxnOp
	if err := s.consulBody(w, r, &ops); err != nil {
		consulError(w, err)
		return
	}
	if max := s.cfg.Limits.MaxKVTxnOps; len(ops) > max {
		consulError(w, refused("operations", fmt.Sprintf("%d in one transaction, at most %d (--max-kv-txn-ops)", len(ops), max)))
		return
	}
	seenWrite := map[string]int{}
	var keys []string
	seen := map[string]bool{}
	writes := 0
	for i, op := range ops {
		f := fmt.Sprintf("[%d]", i)
		if op.KV == nil || op.Node != nil || op.Service != nil || op.Check != nil || op.Session != nil {
			consulError(w, refused(f, "only KV operations are served in a transaction (catalog and session ones are not)"))
			return
		}
		need := acl.Read
		switch op.KV.Verb {
		case "set", "cas", "delete", "delete-cas":
			need = acl.Write
			writes++
		case "get", "check-index", "check-not-exists":
		default:
			consulError(w, refused(f+".KV.Verb", fmt.Sprintf("%q: served verbs are set, cas, get, delete, delete-cas, check-index, check-not-exists", op.KV.Verb)))
			return
		}
		if err := registry.ValidateKey(f+".KV.Key", op.KV.Key); err != nil {
			consulError(w, toConnectError(err))
			return
		}
		if need == acl.Write {
			if j, dup := seenWrite[op.KV.Key]; dup {
				consulError(w, refused(f+".KV.Key", fmt.Sprintf("%q written again (already by [%d]): each key is written at most once per transaction", op.KV.Key, j)))
				return
			}
			seenWrite[op.KV.Key] = i
		}
		if !seen[op.KV.Key] {
			seen[op.KV.Key] = true
			keys = append(keys, op.KV.Key)
		}
		if err := needKey(ctx, q.ns, op.KV.Key, need); err != nil {
			consulError(w, err)
			return
		}
		if len(op.KV.Value) > s.cfg.Limits.MaxKVValueBytes {
			consulError(w, s.limitError("max-kv-value-bytes", "value of %s larger than %d bytes", f, s.cfg.Limits.MaxKVValueBytes))
			return
		}
	}
	if len(keys) > consulMaxTxnKeys {
		consulError(w, refused("operations", fmt.Sprintf("name %d keys, at most %d in one transaction (etcd's 128 operations of a transaction)", len(keys), consulMaxTxnKeys)))
		return
	}
	total := 0
	var written []string
	for _, op := range ops {
		total += len(op.KV.Value)
	}
	for k := range seenWrite {
		written = append(written, k)
	}
	if max := s.cfg.Limits.MaxKVValueBytes; total > max {
		consulError(w, s.limitError("max-kv-value-bytes", "the transaction's values hold %d bytes together, at most %d", total, max))
		return
	}
	msg := &beaconv1.KVTxnRequest{Namespace: q.ns}
	var err error
	if writes > 0 {
		if err = (kvAPI{s}).admitKeys(q.ns, written); err == nil {
			err = s.spendWrites(ctx, connOf(ctx), writes, time.Now())
		}
		if err != nil {
			s.audit.record(ctx, beaconv1connect.KVServiceTxnProcedure, msg, nil, err)
			consulError(w, err)
			return
		}
	}
	results, failed, err := s.consulTxnRun(ctx, q.ns, ops, keys, writes > 0)
	if writes > 0 {
		s.audit.record(ctx, beaconv1connect.KVServiceTxnProcedure, msg, &beaconv1.KVTxnResponse{}, err)
	}
	if err != nil {
		consulError(w, kvError(err))
		return
	}
	w.Header().Set("Content-Type", "application/json")
	if len(failed) > 0 {
		w.WriteHeader(http.StatusConflict)
		_ = json.NewEncoder(w).Encode(map[string]any{"Results": nil, "Errors": failed})
		return
	}
	_ = json.NewEncoder(w).Encode(map[string]any{"Results": results, "Errors": nil})
}

// consulTxnRun decides and commits a transaction: the keys are read in one
// etcd transaction (releases of ended sessions finished first), the checks
// decided on that read; a transaction that writes commits under compares
// on everything read and answers what it left at its commit's revision,
// one that only reads answers from the read itself.
func (s *Server) consulTxnRun(ctx context.Context, ns string, ops []consulTxnOp, keys []string, writes bool) ([]map[string]consulKVPair, []consulTxnError, error) {
	ctx, cancel := context.WithTimeout(ctx, consulKVTimeout)
	defer cancel()
	for range 8 {
		_, states, _, err := s.consulKVStates(ctx, ns, keys, false, !writes, true, 0)
		if err != nil {
			return nil, nil, err
		}
		pending := false
		for _, k := range keys {
			if st := states[k]; st.releasePending() {
				pending = true
				if _, err := s.consulFinishRelease(ctx, ns, k, st); err != nil {
					return nil, nil, err
				}
			}
		}
		if pending {
			continue // decide on the finished releases
		}
		if failed := consulTxnCheck(ops, states); len(failed) > 0 {
			return nil, failed, nil
		}
		if !writes {
			return consulTxnResults(ns, ops, states), nil, nil
		}
		kvOps, cmps, more := s.consulTxnPlan(ns, ops, keys, states)
		res, err := s.kv.CommitWith(ctx, ns, kvOps, identityOf(ctx).Accessor, cmps, more)
		if errors.Is(err, kv.ErrConflict) || errors.Is(err, kv.ErrCompare) {
			continue
		}
		if err != nil {
			return nil, nil, err
		}
		_, after, _, err := s.consulKVStates(ctx, ns, keys, false, true, true, res.Revision)
		if err != nil {
			return nil, nil, err
		}
		return consulTxnResults(ns, ops, after), nil, nil
	}
	return nil, nil, kv.ErrConflict
}

// consulTxnCheck decides the checks on the keys as read, each operation
// seeing the writes of those before it: what fails, by operation.
func consulTxnCheck(ops []consulTxnOp, states map[string]consulKeyState) []consulTxnError {
	var failed []consulTxnError
	exists := map[string]bool{}
	for k, st := range states {
		exists[k] = st.dataRev != 0
	}
	for i, op := range ops {
		k, st := op.KV.Key, states[op.KV.Key]
		switch op.KV.Verb {
		case "cas", "delete-cas", "check-index":
			if st.modifyIndex() != op.KV.Index || op.KV.Verb == "check-index" && !exists[k] {
				failed = append(failed, consulTxnError{i, fmt.Sprintf("current modify index %d != %d", st.modifyIndex(), op.KV.Index)})
			}
		case "check-not-exists":
			if exists[k] {
				failed = append(failed, consulTxnError{i, fmt.Sprintf("key %q exists", k)})
			}
		case "get":
			if !exists[k] {
				failed = append(failed, consulTxnError{i, fmt.Sprintf("key %q doesn't exist", k)})
			}
		}
		switch op.KV.Verb {
		case "set", "cas":
			exists[k] = true
		case "delete", "delete-cas":
			exists[k] = false
		}
	}
	return failed
}

// consulTxnPlan turns the operations into one commit: an op per key (the
// write, or a check), the records beside each key compared once and
// written with it.
func (s *Server) consulTxnPlan(ns string, ops []consulTxnOp, keys []string, states map[string]consulKeyState) ([]kv.Op, []clientv3.Cmp, []clientv3.Op) {
	var kvOps []kv.Op
	var cmps []clientv3.Cmp
	var more []clientv3.Op
	write := map[string]*consulTxnKV{}
	for _, op := range ops {
		if consulTxnWrites(op.KV.Verb) {
			write[op.KV.Key] = op.KV
		}
	}
	for _, k := range keys {
		st := states[k]
		metaKey, holdKey := s.consulMetaKey(ns, k), s.consulHoldKey(ns, k)
		cmps = append(cmps, clientv3.Compare(clientv3.ModRevision(metaKey), "=", st.metaRev),
			clientv3.Compare(clientv3.ModRevision(holdKey), "=", st.holdRev))
		op := kv.Op{Type: kv.Check, Key: k, HasExpected: true, Expected: st.dataRev}
		if w := write[k]; w != nil {
			switch w.Verb {
			case "set", "cas":
				op.Type, op.Value = kv.Put, w.Value
				meta := st.metaToWrite()
				meta.Flags = w.Flags
				rec, _ := json.Marshal(meta)
				more = append(more, clientv3.OpPut(metaKey, string(rec)))
			default:
				op.Type = kv.Delete
				more = append(more, clientv3.OpDelete(holdKey))
				if time.Now().Before(st.delay) {
					more = append(more, clientv3.OpPut(metaKey, string(mustJSON(consulKVMeta{DelayUntil: st.delay}))))
				} else {
					more = append(more, clientv3.OpDelete(metaKey))
				}
			}
		}
		kvOps = append(kvOps, op)
	}
	return kvOps, cmps, more
}

// consulTxnResults answers what each operation left, from states read
// after the commit (or, for a transaction that only reads, the read): a
// get's whole pair; a set's, cas's or check-index's without its value.
func consulTxnResults(ns string, ops []consulTxnOp, states map[string]consulKeyState) []map[string]consulKVPair {
	results := []map[string]consulKVPair{}
	for _, op := range ops {
		switch op.KV.Verb {
		case "get", "set", "cas", "check-index":
		default:
			continue
		}
		if st := states[op.KV.Key]; st.dataRev != 0 {
			p := st.pair(ns, op.KV.Key)
			if op.KV.Verb != "get" {
				p.Value = nil
			}
			results = append(results, map[string]consulKVPair{"KV": p})
		}
	}
	return results
}
