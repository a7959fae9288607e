package kv

import (
	"context"
	"errors"
	"fmt"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/types/known/timestamppb"

	beaconv1 "beacon.dev/beacon/api/beacon/v1"
)

// Staged rollouts: kvrollout/{namespace}/{key} holds a KVRollout (the
// API's JSON). Readers that include rollouts in their watch get it beside
// the key's value and decide, each for itself, whether they are selected
// (docs/kv.md, "Staged rollout").

// ErrNoRollout: ending a rollout that does not exist.
var ErrNoRollout = errors.New("kv: no rollout")

// ErrRolloutExists: starting a rollout over a running one.
var ErrRolloutExists = errors.New("kv: a rollout is running")

// Rollouts starts and ends staged rollouts of keys.
type Rollouts struct {
	s      *Store
	prefix string
}

// NewRollouts returns the rollouts of store's keys, kept under prefix
// (store.Layout's KVRolloutPrefix).
func NewRollouts(s *Store, prefix string) *Rollouts { return &Rollouts{s: s, prefix: prefix} }

func (r *Rollouts) key(ns, key string) string { return r.prefix + ns + "/" + key }

// Start publishes value to the readers selected by labels and percent.
// One rollout per key at a time: end it before starting another.
func (r *Rollouts) Start(ctx context.Context, ns, key string, value []byte, labels map[string]string, percent int32, accessor string) (int64, error) {
	cur, _, err := r.s.Get(ctx, ns, key)
	if err != nil {
		return 0, err
	}
	rec, err := protojson.Marshal(&beaconv1.KVRollout{Value: value, Labels: labels, Percent: percent, BaseRevision: cur.GetModRevision(), Started: timestamppb.New(time.Now()), Accessor: accessor})
	if err != nil {
		return 0, err
	}
	k := r.key(ns, key)
	resp, err := r.s.cli.Txn(ctx).If(clientv3.Compare(clientv3.CreateRevision(k), "=", 0)).Then(clientv3.OpPut(k, string(rec))).Commit()
	if err != nil {
		return 0, err
	}
	if !resp.Succeeded {
		return 0, fmt.Errorf("%w on key %q: promote or abort it first", ErrRolloutExists, key)
	}
	return resp.Header.Revision, nil
}

// Get reads a key's rollout (nil: none) and its record's revision.
func (r *Rollouts) Get(ctx context.Context, ns, key string) (*beaconv1.KVRollout, int64, error) {
	resp, err := r.s.cli.Get(ctx, r.key(ns, key))
	if err != nil || len(resp.Kvs) == 0 {
		return nil, 0, err
	}
	out := &beaconv1.KVRollout{}
	if err := protojson.Unmarshal(resp.Kvs[0].Value, out); err != nil {
		return nil, 0, fmt.Errorf("kv: the rollout record of %q does not decode: %w", key, err)
	}
	return out, resp.Kvs[0].ModRevision, nil
}

// End ends a key's rollout. promote writes its value as the key's new
// version in the same transaction (with its history record); otherwise
// the rollout is aborted and its readers go back to the key's value.
func (r *Rollouts) End(ctx context.Context, ns, key string, promote bool, accessor string) (int64, error) {
	plan, rev, err := r.Get(ctx, ns, key)
	if err != nil {
		return 0, err
	}
	if plan == nil {
		return 0, fmt.Errorf("%w on key %q", ErrNoRollout, key)
	}
	k := r.key(ns, key)
	if !promote {
		resp, err := r.s.cli.Txn(ctx).If(clientv3.Compare(clientv3.ModRevision(k), "=", rev)).Then(clientv3.OpDelete(k)).Commit()
		if err != nil {
			return 0, err
		}
		if !resp.Succeeded {
			return 0, fmt.Errorf("%w: the rollout of %q changed meanwhile; look again", ErrConflict, key)
		}
		return resp.Header.Revision, nil
	}
	res, err := r.s.commit(ctx, ns, []Op{{Type: Put, Key: key, Value: plan.GetValue()}}, accessor, nil, &extra{
		cmps: []clientv3.Cmp{clientv3.Compare(clientv3.ModRevision(k), "=", rev)},
		ops:  []clientv3.Op{clientv3.OpDelete(k)},
	})
	if errors.Is(err, ErrConflict) {
		return 0, fmt.Errorf("%w: the rollout of %q changed meanwhile; look again", ErrConflict, key)
	}
	return res.Revision, err
}
