package kv

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"time"

	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"
	clientv3 "go.etcd.io/etcd/client/v3"
	"google.golang.org/protobuf/types/known/timestamppb"

	beaconv1 "beacon.dev/beacon/api/beacon/v1"
	"beacon.dev/beacon/internal/store"
)

// Apply reports: kvapplied/{namespace}/{key}@{session} holds an
// instance's last report on a key, on its session's lease.

// ErrSessionNotFound: a report under a session that does not exist.
var ErrSessionNotFound = errors.New("kv: session not found")

type appliedRecord struct {
	Label    string    `json:"label,omitempty"`
	Revision int64     `json:"revision"`
	Error    string    `json:"error,omitempty"`
	Time     time.Time `json:"time"`
}

// Applied keeps and reads apply reports under prefix (store.Layout's
// KVAppliedPrefix).
type Applied struct {
	cli    *clientv3.Client
	prefix string
}

// NewApplied returns the apply reports' store.
func NewApplied(cli *clientv3.Client, prefix string) *Applied {
	return &Applied{cli: cli, prefix: prefix}
}

func (a *Applied) queue(ns, key string) string { return a.prefix + ns + "/" + key + "@" }

// Report records session's last report on a key.
func (a *Applied) Report(ctx context.Context, ns, key string, session int64, label string, revision int64, errText string) error {
	rec, _ := json.Marshal(appliedRecord{Label: label, Revision: revision, Error: errText, Time: time.Now().UTC()})
	_, err := a.cli.Put(ctx, a.queue(ns, key)+store.FormatSessionID(session), string(rec), clientv3.WithLease(clientv3.LeaseID(session)))
	if errors.Is(err, rpctypes.ErrLeaseNotFound) || errors.Is(err, rpctypes.ErrGRPCLeaseNotFound) {
		return fmt.Errorf("%w: %s", ErrSessionNotFound, store.FormatSessionID(session))
	}
	return err
}

// List returns the reports on a key, by session. Records that do not
// decode are left out.
func (a *Applied) List(ctx context.Context, ns, key string) ([]*beaconv1.KVApplied, error) {
	resp, err := a.cli.Get(ctx, a.queue(ns, key), clientv3.WithPrefix())
	if err != nil {
		return nil, err
	}
	out := make([]*beaconv1.KVApplied, 0, len(resp.Kvs))
	for _, kv := range resp.Kvs {
		k := string(kv.Key)
		id, err := store.ParseSessionID(k[strings.LastIndexByte(k, '@')+1:])
		var rec appliedRecord
		if err != nil || json.Unmarshal(kv.Value, &rec) != nil {
			continue
		}
		out = append(out, &beaconv1.KVApplied{SessionId: id, Label: rec.Label, Revision: rec.Revision, Error: rec.Error, Time: timestamppb.New(rec.Time)})
	}
	return out, nil
}
