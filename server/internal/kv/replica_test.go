package kv

import (
	"context"
	"fmt"
	"testing"
	"time"

	"go.etcd.io/etcd/api/v3/mvccpb"
	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/goleak"

	beaconv1 "beacon.dev/beacon/api/beacon/v1"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

const prefix = "/beacon/v1/kv/"

func put(ns, key, value string, rev int64) *clientv3.Event {
	return &clientv3.Event{Type: mvccpb.PUT, Kv: &mvccpb.KeyValue{Key: []byte(prefix + ns + "/" + key), Value: []byte(value), ModRevision: rev, CreateRevision: rev, Version: 1}}
}

func del(ns, key string, rev int64) *clientv3.Event {
	return &clientv3.Event{Type: mvccpb.DELETE, Kv: &mvccpb.KeyValue{Key: []byte(prefix + ns + "/" + key), ModRevision: rev}}
}

func all(string) bool { return true }

func next(t *testing.T, s *Sub) *beaconv1.KVWatchResponse {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	resp, err := s.Next(ctx, nil)
	if err != nil {
		t.Fatal(err)
	}
	return resp
}

func describe(resp *beaconv1.KVWatchResponse) string {
	out := fmt.Sprintf("rev %d full %v:", resp.GetRevision(), resp.GetFullState())
	for _, ev := range resp.GetEvents() {
		if ev.GetDeleted() {
			out += fmt.Sprintf(" -%s@%d", ev.GetKv().GetKey(), ev.GetKv().GetModRevision())
		} else {
			out += fmt.Sprintf(" %s=%s@%d", ev.GetKv().GetKey(), ev.GetKv().GetValue(), ev.GetKv().GetModRevision())
		}
	}
	return out
}

// A subscriber gets the whole state, then each changed key once at its
// latest version in revision order, only from its namespace and prefix,
// and only keys it may read.
func TestReplicaChangesCoalescedInOrder(t *testing.T) {
	r := NewReplica(prefix, "", 0)
	r.Listed([]*mvccpb.KeyValue{{Key: []byte(prefix + "ns/app/a"), Value: []byte("1"), ModRevision: 5}, {Key: []byte(prefix + "ns/app/secret"), Value: []byte("s"), ModRevision: 6}}, 10)
	s := r.Subscribe("ns", "app/", true, false, 0, 0, func(k string) bool { return k != "app/secret" })
	defer s.Close()
	if got := describe(next(t, s)); got != "rev 10 full true: app/a=1@5" {
		t.Fatalf("first = %s", got)
	}
	r.Changed([]*clientv3.Event{put("ns", "app/b", "1", 11), put("other", "app/a", "x", 12), put("ns", "app/b", "2", 13), put("ns", "apple", "no", 14), del("ns", "app/a", 15), put("ns", "app/secret", "t", 16)}, 16)
	if got := describe(next(t, s)); got != "rev 16 full false: app/b=2@13 -app/a@15" {
		t.Fatalf("changes = %s", got)
	}
}

// A subscriber behind the change log, or resuming from before it, gets
// the whole state again instead of a gap; one resuming inside it gets
// only what came after.
func TestReplicaResetsBehindTheLog(t *testing.T) {
	r := NewReplica(prefix, "", 4)
	r.Listed(nil, 10)
	behind := r.Subscribe("ns", "k", false, false, 10, 0, all)
	defer behind.Close()
	for rev := int64(11); rev <= 20; rev++ {
		r.Changed([]*clientv3.Event{put("ns", fmt.Sprint("other", rev), "v", rev)}, rev)
	}
	r.Changed([]*clientv3.Event{put("ns", "k", "late", 21)}, 21)
	if got := describe(next(t, behind)); got != "rev 21 full true: k=late@21" {
		t.Fatalf("behind the log = %s", got)
	}
	inside := r.Subscribe("ns", "k", false, false, 20, 0, all)
	defer inside.Close()
	if got := describe(next(t, inside)); got != "rev 21 full false: k=late@21" {
		t.Fatalf("inside the log = %s", got)
	}
	// A relisting (after etcd compacted the watch) resets everyone behind it.
	r.Listed([]*mvccpb.KeyValue{{Key: []byte(prefix + "ns/k"), Value: []byte("relisted"), ModRevision: 30}}, 40)
	if got := describe(next(t, inside)); got != "rev 40 full true: k=relisted@30" {
		t.Fatalf("after a relisting = %s", got)
	}
}

// A subscriber resuming from a revision this replica has not reached
// (it came from a server ahead) waits, and never gets older changes.
func TestReplicaNeverStepsBack(t *testing.T) {
	r := NewReplica(prefix, "", 0)
	r.Listed([]*mvccpb.KeyValue{{Key: []byte(prefix + "ns/k"), Value: []byte("old"), ModRevision: 5}}, 10)
	s := r.Subscribe("ns", "k", false, false, 12, 0, all)
	defer s.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel()
	if resp, err := s.Next(ctx, nil); err == nil {
		t.Fatalf("got %s before the replica reached the revision resumed from", describe(resp))
	}
	r.Changed([]*clientv3.Event{put("ns", "k", "seen-elsewhere", 12)}, 12)
	r.Changed([]*clientv3.Event{put("ns", "k", "new", 13)}, 13)
	if got := describe(next(t, s)); got != "rev 13 full false: k=new@13" {
		t.Fatalf("resumed = %s", got)
	}
}

// A new watch reads its own writes: its whole state waits until the
// replica has reached the revision the server knew etcd had.
func TestReplicaWholeStateWaitsForItsRevision(t *testing.T) {
	r := NewReplica(prefix, "", 0)
	r.Listed(nil, 10)
	s := r.Subscribe("ns", "k", false, false, 0, 12, all)
	defer s.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel()
	if resp, err := s.Next(ctx, nil); err == nil {
		t.Fatalf("got %s before the replica reached revision 12", describe(resp))
	}
	r.Changed([]*clientv3.Event{put("other", "x", "1", 11)}, 11)
	r.Changed([]*clientv3.Event{put("ns", "k", "mine", 12)}, 12)
	if got := describe(next(t, s)); got != "rev 12 full true: k=mine@12" {
		t.Fatalf("whole state = %s", got)
	}
}

// A watch catching up gets its events in batches whose header is the
// store's current revision: the replica advances past each batch's last
// event, not its header, and applies the next batch.
func TestReplicaCatchUpBatches(t *testing.T) {
	r := NewReplica(prefix, "", 0)
	r.Listed(nil, 10)
	s := r.Subscribe("ns", "", true, false, 10, 0, all)
	defer s.Close()
	r.Changed([]*clientv3.Event{put("ns", "a", "1", 11)}, 30)
	r.Changed([]*clientv3.Event{put("ns", "b", "2", 25)}, 30)
	r.Changed(nil, 30) // then a progress notification
	if got := describe(next(t, s)); got != "rev 30 full false: a=1@11 b=2@25" {
		t.Fatalf("after the catch-up: %s", got)
	}
}
