package server_test

import (
	"context"
	"fmt"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"connectrpc.com/connect"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/durationpb"

	beaconv1 "beacon.dev/beacon/api/beacon/v1"
	"beacon.dev/beacon/api/beacon/v1/beaconv1connect"
	"beacon.dev/beacon/server"
	"beacon.dev/beacon/server/servertest"
)

func kvClient(srv *server.Server, opts ...connect.ClientOption) beaconv1connect.KVServiceClient {
	return beaconv1connect.NewKVServiceClient(h2c(), "http://"+srv.Addr(), append(opts, connect.WithGRPC())...)
}

func kvPut(t *testing.T, c beaconv1connect.KVServiceClient, key, value string) int64 {
	t.Helper()
	resp, err := c.Put(context.Background(), connect.NewRequest(&beaconv1.KVPutRequest{Key: key, Value: []byte(value)}))
	if err != nil {
		t.Fatalf("put %s: %v", key, err)
	}
	return resp.Msg.GetRevision()
}

func kvGet(t *testing.T, c beaconv1connect.KVServiceClient, key string) (*beaconv1.KeyValue, error) {
	t.Helper()
	resp, err := c.Get(context.Background(), connect.NewRequest(&beaconv1.KVGetRequest{Key: key}))
	if err != nil {
		return nil, err
	}
	return resp.Msg.GetKv(), nil
}

func wantCode(t *testing.T, err error, code connect.Code, mention ...string) {
	t.Helper()
	if connect.CodeOf(err) != code {
		t.Fatalf("err = %v, want code %v", err, code)
	}
	for _, m := range mention {
		if !strings.Contains(err.Error(), m) {
			t.Errorf("err = %v, want it to mention %q", err, m)
		}
	}
}

func TestKVPutGetDeleteHistoryRollback(t *testing.T) {
	srv := startServer(t)
	c := kvClient(srv)
	ctx := context.Background()
	r1 := kvPut(t, c, "app/price", "10")
	r2 := kvPut(t, c, "app/price", "12")
	got, err := kvGet(t, c, "app/price")
	if err != nil {
		t.Fatal(err)
	}
	if string(got.GetValue()) != "12" || got.GetModRevision() != r2 || got.GetCreateRevision() != r1 || got.GetVersion() != 2 {
		t.Fatalf("get = %v, want value 12 at revision %d created at %d, version 2", got, r2, r1)
	}
	kvPut(t, c, "app/flags", "{}")
	kvPut(t, c, "other", "x")
	list, err := c.List(ctx, connect.NewRequest(&beaconv1.KVListRequest{Prefix: "app/"}))
	if err != nil {
		t.Fatal(err)
	}
	if keys := kvKeys(list.Msg.GetKvs()); keys != "app/flags app/price" {
		t.Fatalf("list app/ = %q", keys)
	}
	del, err := c.Delete(ctx, connect.NewRequest(&beaconv1.KVDeleteRequest{Key: "app/price"}))
	if err != nil || !del.Msg.GetFound() {
		t.Fatalf("delete = %v, %v", del, err)
	}
	_, err = kvGet(t, c, "app/price")
	wantCode(t, err, connect.CodeNotFound, "app/price")
	again, err := c.Delete(ctx, connect.NewRequest(&beaconv1.KVDeleteRequest{Key: "app/price"}))
	if err != nil || again.Msg.GetFound() {
		t.Fatalf("second delete = %v, %v; want found false", again, err)
	}

	hist, err := c.History(ctx, connect.NewRequest(&beaconv1.KVHistoryRequest{Key: "app/price"}))
	if err != nil {
		t.Fatal(err)
	}
	vs := hist.Msg.GetVersions()
	if len(vs) != 3 || string(vs[0].GetValue()) != "10" || vs[0].GetRevision() != r1 || string(vs[1].GetValue()) != "12" ||
		vs[1].GetRevision() != r2 || !vs[2].GetDeleted() || vs[2].GetRevision() != del.Msg.GetRevision() {
		t.Fatalf("history = %v", vs)
	}
	if vs[0].GetTime().AsTime().IsZero() {
		t.Errorf("history has no time: %v", vs[0])
	}

	// Rolling back to the deletion is refused; to the first version
	// writes it again as a new version that says where it came from.
	_, err = c.Rollback(ctx, connect.NewRequest(&beaconv1.KVRollbackRequest{Key: "app/price", ToRevision: vs[2].GetRevision()}))
	wantCode(t, err, connect.CodeNotFound, "deleted")
	rb, err := c.Rollback(ctx, connect.NewRequest(&beaconv1.KVRollbackRequest{Key: "app/price", ToRevision: r1}))
	if err != nil {
		t.Fatal(err)
	}
	got, _ = kvGet(t, c, "app/price")
	if string(got.GetValue()) != "10" || got.GetModRevision() != rb.Msg.GetRevision() || got.GetVersion() != 1 {
		t.Fatalf("after rollback get = %v", got)
	}
	hist, _ = c.History(ctx, connect.NewRequest(&beaconv1.KVHistoryRequest{Key: "app/price"}))
	if last := hist.Msg.GetVersions()[len(hist.Msg.GetVersions())-1]; last.GetRollbackOf() != r1 || string(last.GetValue()) != "10" {
		t.Fatalf("last version = %v, want a rollback of %d", last, r1)
	}
	_, err = c.Rollback(ctx, connect.NewRequest(&beaconv1.KVRollbackRequest{Key: "app/price", ToRevision: 1}))
	wantCode(t, err, connect.CodeNotFound, "no version at revision 1")
}

func kvKeys(kvs []*beaconv1.KeyValue) string {
	var keys []string
	for _, kv := range kvs {
		keys = append(keys, kv.GetKey())
	}
	return strings.Join(keys, " ")
}

// Compare-and-set: a write on a wrong revision is refused and changes
// nothing; racing writers that each read, add one and compare lose no
// increment; the history keeps only --kv-history versions.
func TestKVCompareAndSetRace(t *testing.T) {
	cfg := servertest.Config(t, "")
	cfg.KVHistory = 5
	srv := servertest.Start(t, cfg)
	c := kvClient(srv)
	ctx := context.Background()
	rev := kvPut(t, c, "counter", "0")
	_, err := c.Put(ctx, connect.NewRequest(&beaconv1.KVPutRequest{Key: "counter", Value: []byte("x"), ExpectedRevision: proto.Int64(rev - 1)}))
	wantCode(t, err, connect.CodeFailedPrecondition, fmt.Sprintf("revision %d", rev), fmt.Sprintf("expected revision %d", rev-1))
	_, err = c.Put(ctx, connect.NewRequest(&beaconv1.KVPutRequest{Key: "counter", Value: []byte("x"), ExpectedRevision: proto.Int64(0)}))
	wantCode(t, err, connect.CodeFailedPrecondition, "expected it absent")
	_, err = c.Delete(ctx, connect.NewRequest(&beaconv1.KVDeleteRequest{Key: "counter", ExpectedRevision: proto.Int64(rev + 100)}))
	wantCode(t, err, connect.CodeFailedPrecondition)
	if got, _ := kvGet(t, c, "counter"); string(got.GetValue()) != "0" || got.GetModRevision() != rev {
		t.Fatalf("refused writes changed the key: %v", got)
	}

	const writers, each = 8, 10
	var wg sync.WaitGroup
	var conflicts sync.Map // writers that lost a compare at least once
	for w := range writers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for done := 0; done < each; {
				cur, err := kvGet(t, c, "counter")
				if err != nil {
					t.Error(err)
					return
				}
				n, _ := strconv.Atoi(string(cur.GetValue()))
				_, err = c.Put(ctx, connect.NewRequest(&beaconv1.KVPutRequest{Key: "counter", Value: []byte(strconv.Itoa(n + 1)), ExpectedRevision: proto.Int64(cur.GetModRevision())}))
				switch {
				case err == nil:
					done++
				case connect.CodeOf(err) == connect.CodeFailedPrecondition:
					conflicts.Store(w, true)
				default:
					t.Error(err)
					return
				}
			}
		}()
	}
	wg.Wait()
	got, _ := kvGet(t, c, "counter")
	if string(got.GetValue()) != strconv.Itoa(writers*each) || got.GetVersion() != writers*each+1 {
		t.Fatalf("counter = %s (version %d), want %d increments", got.GetValue(), got.GetVersion(), writers*each)
	}
	lost := 0
	conflicts.Range(func(any, any) bool { lost++; return true })
	t.Logf("%d of %d writers lost a compare at least once", lost, writers)
	hist, err := c.History(ctx, connect.NewRequest(&beaconv1.KVHistoryRequest{Key: "counter"}))
	if err != nil {
		t.Fatal(err)
	}
	vs := hist.Msg.GetVersions()
	if len(vs) != 5 || string(vs[4].GetValue()) != strconv.Itoa(writers*each) || string(vs[0].GetValue()) != strconv.Itoa(writers*each-4) {
		t.Fatalf("history = %d versions, first %q last %q; want the last 5", len(vs), vs[0].GetValue(), vs[len(vs)-1].GetValue())
	}
}

// A transaction lands whole in one revision or not at all.
func TestKVTxnAllOrNothing(t *testing.T) {
	srv := startServer(t)
	c := kvClient(srv)
	ctx := context.Background()
	ra := kvPut(t, c, "a", "1")
	kvPut(t, c, "c", "old")
	put := func(key, v string) *beaconv1.KVOp {
		return &beaconv1.KVOp{Type: beaconv1.KVOp_TYPE_PUT, Key: key, Value: []byte(v)}
	}
	// A failing check: nothing changes.
	_, err := c.Txn(ctx, connect.NewRequest(&beaconv1.KVTxnRequest{Ops: []*beaconv1.KVOp{
		put("b", "2"),
		{Type: beaconv1.KVOp_TYPE_CHECK, Key: "a", ExpectedRevision: proto.Int64(ra + 1)},
		{Type: beaconv1.KVOp_TYPE_DELETE, Key: "c"},
	}}))
	wantCode(t, err, connect.CodeFailedPrecondition, `"a"`)
	if _, err := kvGet(t, c, "b"); connect.CodeOf(err) != connect.CodeNotFound {
		t.Fatalf("b after a failed transaction: %v", err)
	}
	if got, _ := kvGet(t, c, "c"); string(got.GetValue()) != "old" {
		t.Fatalf("c after a failed transaction: %v", got)
	}
	resp, err := c.Txn(ctx, connect.NewRequest(&beaconv1.KVTxnRequest{Ops: []*beaconv1.KVOp{
		put("b", "2"),
		{Type: beaconv1.KVOp_TYPE_CHECK, Key: "a", ExpectedRevision: proto.Int64(ra)},
		{Type: beaconv1.KVOp_TYPE_DELETE, Key: "c"},
		put("d", "4"),
	}}))
	if err != nil {
		t.Fatal(err)
	}
	rev := resp.Msg.GetRevision()
	for _, key := range []string{"b", "d"} {
		if got, _ := kvGet(t, c, key); got.GetModRevision() != rev {
			t.Errorf("%s = %v, want it written at the transaction's revision %d", key, got, rev)
		}
	}
	if _, err := kvGet(t, c, "c"); connect.CodeOf(err) != connect.CodeNotFound {
		t.Errorf("c after the transaction: %v", err)
	}

	// Bad transactions name the operation and the rule.
	for _, tc := range []struct {
		ops  []*beaconv1.KVOp
		want string
	}{
		{nil, "ops"},
		{[]*beaconv1.KVOp{put("x", "1"), put("x", "2")}, "ops[1].key"},
		{[]*beaconv1.KVOp{{Type: beaconv1.KVOp_TYPE_CHECK, Key: "x"}}, "ops[0].expected_revision"},
		{[]*beaconv1.KVOp{{Key: "x"}}, "ops[0].type"},
		{[]*beaconv1.KVOp{{Type: beaconv1.KVOp_TYPE_DELETE, Key: "x", Value: []byte("v")}}, "ops[0].value"},
		{[]*beaconv1.KVOp{put("x", "1"), put("bad key", "1")}, "ops[1].key"},
		{func() (ops []*beaconv1.KVOp) {
			for i := range 33 {
				ops = append(ops, put(fmt.Sprint("k", i), "v"))
			}
			return ops
		}(), "--max-kv-txn-ops"},
	} {
		_, err := c.Txn(ctx, connect.NewRequest(&beaconv1.KVTxnRequest{Ops: tc.ops}))
		wantCode(t, err, connect.CodeInvalidArgument, tc.want)
		if _, err := kvGet(t, c, "x"); connect.CodeOf(err) != connect.CodeNotFound {
			t.Fatalf("a refused transaction wrote x: %v", err)
		}
	}
}

// Bad input names the field and the limit, and changes nothing.
func TestKVLimits(t *testing.T) {
	cfg := servertest.Config(t, "")
	cfg.Limits.MaxKVValueBytes = 1024
	cfg.Limits.MaxKVKeys = 3
	srv := servertest.Start(t, cfg)
	c := kvClient(srv)
	ctx := context.Background()
	for _, tc := range []struct {
		key, value string
		code       connect.Code
		want       string
	}{
		{"", "v", connect.CodeInvalidArgument, "invalid key: must not be empty"},
		{"/abs", "v", connect.CodeInvalidArgument, "start or end with '/'"},
		{"a//b", "v", connect.CodeInvalidArgument, "empty segment"},
		{"a@1", "v", connect.CodeInvalidArgument, "byte 1"},
		{strings.Repeat("k", 513), "v", connect.CodeInvalidArgument, "at most 512"},
		{"big", strings.Repeat("v", 1025), connect.CodeInvalidArgument, "--max-kv-value-bytes"},
	} {
		_, err := c.Put(ctx, connect.NewRequest(&beaconv1.KVPutRequest{Key: tc.key, Value: []byte(tc.value)}))
		wantCode(t, err, tc.code, tc.want)
	}
	for i := range 3 {
		kvPut(t, c, fmt.Sprint("k", i), "v")
	}
	waitForKeys(t, c, "", 3)
	_, err := c.Put(ctx, connect.NewRequest(&beaconv1.KVPutRequest{Key: "k3", Value: []byte("v")}))
	wantCode(t, err, connect.CodeResourceExhausted, "--max-kv-keys")
	kvPut(t, c, "k0", "replacing a key creates none") // still allowed
	list, _ := c.List(ctx, connect.NewRequest(&beaconv1.KVListRequest{}))
	if keys := kvKeys(list.Msg.GetKvs()); keys != "k0 k1 k2" {
		t.Fatalf("keys = %q", keys)
	}
	_, err = c.List(ctx, connect.NewRequest(&beaconv1.KVListRequest{Limit: 1001}))
	wantCode(t, err, connect.CodeInvalidArgument, "limit")
}

// waitForKeys waits until the server's replica (which counts keys for
// --max-kv-keys) holds n keys: a watch from scratch shows what it holds.
func waitForKeys(t *testing.T, c beaconv1connect.KVServiceClient, prefix string, n int) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	stream, err := c.Watch(ctx, connect.NewRequest(&beaconv1.KVWatchRequest{Key: prefix, Prefix: true}))
	if err != nil {
		t.Fatal(err)
	}
	defer stream.Close()
	have := map[string]bool{}
	for len(have) < n && stream.Receive() {
		for _, ev := range stream.Msg().GetEvents() {
			if ev.GetDeleted() {
				delete(have, ev.GetKv().GetKey())
			} else {
				have[ev.GetKv().GetKey()] = true
			}
		}
	}
	if len(have) < n {
		t.Fatalf("the replica never held %d keys: %v", n, stream.Err())
	}
}

// pagination: start_after continues a listing.
func TestKVListPages(t *testing.T) {
	srv := startServer(t)
	c := kvClient(srv)
	for i := range 7 {
		kvPut(t, c, fmt.Sprintf("p/%02d", i), "v")
	}
	var all []string
	after := ""
	for pages := 0; ; pages++ {
		if pages > 10 {
			t.Fatal("pagination does not end")
		}
		resp, err := c.List(context.Background(), connect.NewRequest(&beaconv1.KVListRequest{Prefix: "p/", Limit: 3, StartAfter: after, KeysOnly: true}))
		if err != nil {
			t.Fatal(err)
		}
		for _, kv := range resp.Msg.GetKvs() {
			if len(kv.GetValue()) != 0 {
				t.Fatalf("keys_only returned a value: %v", kv)
			}
			all = append(all, kv.GetKey())
		}
		if !resp.Msg.GetMore() {
			break
		}
		after = all[len(all)-1]
	}
	if got := strings.Join(all, " "); got != "p/00 p/01 p/02 p/03 p/04 p/05 p/06" {
		t.Fatalf("pages = %q", got)
	}
}

type kvWatchState struct {
	vals map[string]string
	rev  int64
}

// receiveUntil applies watch messages until cond holds for the state.
func receiveUntil(t *testing.T, stream *connect.ServerStreamForClient[beaconv1.KVWatchResponse], st *kvWatchState, msgs *[]*beaconv1.KVWatchResponse, cond func() bool) {
	t.Helper()
	for !cond() {
		if !stream.Receive() {
			t.Fatalf("watch ended: %v", stream.Err())
		}
		m := stream.Msg()
		if msgs != nil {
			*msgs = append(*msgs, m)
		}
		if m.GetFullState() {
			st.vals = map[string]string{}
		}
		for _, ev := range m.GetEvents() {
			if ev.GetKv().GetModRevision() > m.GetRevision() {
				t.Fatalf("event %v after the message's revision %d", ev, m.GetRevision())
			}
			if ev.GetDeleted() {
				delete(st.vals, ev.GetKv().GetKey())
			} else {
				st.vals[ev.GetKv().GetKey()] = string(ev.GetKv().GetValue())
			}
		}
		if m.GetRevision() < st.rev {
			t.Fatalf("revision went back from %d to %d", st.rev, m.GetRevision())
		}
		st.rev = m.GetRevision()
	}
}

// A watch starts with the whole state, follows every change in order,
// resumes after a revision with only what came after it, and splits a
// large state into parts marked more.
func TestKVWatchFollowsAndResumes(t *testing.T) {
	srv := startServer(t)
	c := kvClient(srv)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	kvPut(t, c, "cfg/a", "1")
	kvPut(t, c, "elsewhere", "no")
	stream, err := c.Watch(ctx, connect.NewRequest(&beaconv1.KVWatchRequest{Key: "cfg/", Prefix: true}))
	if err != nil {
		t.Fatal(err)
	}
	st := &kvWatchState{}
	var msgs []*beaconv1.KVWatchResponse
	receiveUntil(t, stream, st, &msgs, func() bool { return st.vals["cfg/a"] == "1" })
	if !msgs[0].GetFullState() {
		t.Fatalf("first message is not the whole state: %v", msgs[0])
	}
	kvPut(t, c, "cfg/b", "2")
	kvPut(t, c, "elsewhere", "still no")
	rdel, _ := c.Delete(ctx, connect.NewRequest(&beaconv1.KVDeleteRequest{Key: "cfg/a"}))
	receiveUntil(t, stream, st, nil, func() bool { return st.rev >= rdel.Msg.GetRevision() })
	if fmt.Sprint(st.vals) != "map[cfg/b:2]" {
		t.Fatalf("state = %v", st.vals)
	}
	stream.Close()

	// Resume after the revision seen: only the later change, no reset.
	resumeAt := st.rev
	kvPut(t, c, "cfg/c", "3")
	stream, err = c.Watch(ctx, connect.NewRequest(&beaconv1.KVWatchRequest{Key: "cfg/", Prefix: true, AfterRevision: resumeAt}))
	if err != nil {
		t.Fatal(err)
	}
	defer stream.Close()
	if !stream.Receive() {
		t.Fatal(stream.Err())
	}
	m := stream.Msg()
	if m.GetFullState() || len(m.GetEvents()) != 1 || m.GetEvents()[0].GetKv().GetKey() != "cfg/c" {
		t.Fatalf("resumed with %v, want only cfg/c", m)
	}

	// A state larger than a message is split.
	big := strings.Repeat("x", 200<<10)
	for i := range 4 {
		kvPut(t, c, fmt.Sprint("big/", i), big)
	}
	waitForKeys(t, c, "big/", 4)
	whole, err := c.Watch(ctx, connect.NewRequest(&beaconv1.KVWatchRequest{Key: "big/", Prefix: true}))
	if err != nil {
		t.Fatal(err)
	}
	defer whole.Close()
	parts := 0
	keys := 0
	for whole.Receive() {
		parts++
		keys += len(whole.Msg().GetEvents())
		if parts == 1 != whole.Msg().GetFullState() {
			t.Fatalf("part %d full_state = %v", parts, whole.Msg().GetFullState())
		}
		if !whole.Msg().GetMore() {
			break
		}
	}
	if parts < 2 || keys != 4 {
		t.Fatalf("4 values of 200 KiB came in %d parts with %d keys", parts, keys)
	}
}

// A watch of one key that does not exist yet sees it appear; heartbeats
// carry the revision.
func TestKVWatchOneKeyAndHeartbeat(t *testing.T) {
	srv := startServer(t)
	c := kvClient(srv)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	stream, err := c.Watch(ctx, connect.NewRequest(&beaconv1.KVWatchRequest{Key: "flag", Heartbeat: durationpb.New(100 * time.Millisecond)}))
	if err != nil {
		t.Fatal(err)
	}
	defer stream.Close()
	if !stream.Receive() || !stream.Msg().GetFullState() || len(stream.Msg().GetEvents()) != 0 {
		t.Fatalf("first = %v, %v; want an empty whole state", stream.Msg(), stream.Err())
	}
	if !stream.Receive() || len(stream.Msg().GetEvents()) != 0 || stream.Msg().GetRevision() == 0 {
		t.Fatalf("heartbeat = %v, %v", stream.Msg(), stream.Err())
	}
	kvPut(t, c, "flagship", "not this one")
	rev := kvPut(t, c, "flag", "on")
	st := &kvWatchState{vals: map[string]string{}}
	receiveUntil(t, stream, st, nil, func() bool { return st.rev >= rev })
	if fmt.Sprint(st.vals) != "map[flag:on]" {
		t.Fatalf("state = %v", st.vals)
	}
	bad, err := c.Watch(ctx, connect.NewRequest(&beaconv1.KVWatchRequest{Key: "x", AfterRevision: -1}))
	if err == nil {
		bad.Receive()
		err = bad.Err()
		bad.Close()
	}
	wantCode(t, err, connect.CodeInvalidArgument, "after_revision")
}
