package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"hash/fnv"
	"net/url"
	"os"
	"os/signal"
	"strconv"
	"syscall"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.etcd.io/etcd/server/v3/embed"
	"go.uber.org/zap"
)

// runDB runs the shop's database: a single-node etcd of its own, apart
// from the registry's.
func runDB(args []string) error {
	fs := flag.NewFlagSet("db", flag.ExitOnError)
	dir := fs.String("dir", "shop.db", "data directory")
	clientAddr := fs.String("client-addr", "127.0.0.1:7379", "client address")
	peerAddr := fs.String("peer-addr", "127.0.0.1:7380", "peer address")
	_ = fs.Parse(args)
	e, err := startEtcd(*dir, *clientAddr, *peerAddr)
	if err != nil {
		return err
	}
	defer e.Close()
	fmt.Printf("shop: serving {\"service\":\"db\",\"addr\":%q,\"pid\":\"%d\"}\n", *clientAddr, os.Getpid())
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGTERM, syscall.SIGINT)
	select {
	case <-sig:
	case err := <-e.Err():
		return err
	}
	fmt.Println("shop: stopped db")
	return nil
}

// startEtcd starts a single-node etcd and waits until it serves.
func startEtcd(dir, clientAddr, peerAddr string) (*embed.Etcd, error) {
	cfg := embed.NewConfig()
	cfg.Dir, cfg.Name = dir, "shop"
	cu, pu := url.URL{Scheme: "http", Host: clientAddr}, url.URL{Scheme: "http", Host: peerAddr}
	cfg.ListenClientUrls, cfg.AdvertiseClientUrls = []url.URL{cu}, []url.URL{cu}
	cfg.ListenPeerUrls, cfg.AdvertisePeerUrls = []url.URL{pu}, []url.URL{pu}
	cfg.InitialCluster = "shop=" + pu.String()
	cfg.LogLevel = "error"
	cfg.ZapLoggerBuilder = embed.NewZapLoggerBuilder(zap.NewNop())
	e, err := embed.StartEtcd(cfg)
	if err != nil {
		return nil, err
	}
	select {
	case <-e.Server.ReadyNotify():
		return e, nil
	case <-time.After(time.Minute):
		e.Close()
		return nil, errors.New("etcd not ready after 1m")
	}
}

// db is the shop's data, with the two writes that must be safe under
// concurrency and retries: taking stock and charging, each once per order.
type db struct {
	cli *clientv3.Client
	// turns: one reservation at a time per item in this process, striped
	// so that item names from requests cannot grow a map.
	turns [64]chan struct{}
}

func openDB(addr string) (*db, error) {
	cli, err := clientv3.New(clientv3.Config{Endpoints: []string{addr}, DialTimeout: 5 * time.Second, Logger: zap.NewNop()})
	if err != nil {
		return nil, err
	}
	d := &db{cli: cli}
	for i := range d.turns {
		d.turns[i] = make(chan struct{}, 1)
	}
	return d, nil
}

func (d *db) Close() error { return d.cli.Close() }

// ErrOutOfStock: the item has fewer than asked.
var ErrOutOfStock = errors.New("out of stock")

// seedStock sets an item's stock (and its fence, below) unless set already.
func (d *db) seedStock(ctx context.Context, item string, n int64) error {
	k, f := "/shop/stock/"+item, fenceKey(item)
	if _, err := d.cli.Txn(ctx).If(clientv3.Compare(clientv3.CreateRevision(k), "=", 0)).Then(clientv3.OpPut(k, strconv.FormatInt(n, 10))).Commit(); err != nil {
		return err
	}
	_, err := d.cli.Txn(ctx).If(clientv3.Compare(clientv3.CreateRevision(f), "=", 0)).Then(clientv3.OpPut(f, fenceToken(0))).Commit()
	return err
}

// ErrFenced: a stock write carried a fencing token older than one the
// stock has already seen — its writer lost the item's lock (paused past
// its session, say) and a newer holder has written since.
var ErrFenced = errors.New("fenced: a newer holder of the item's lock has written the stock")

// fenceKey holds the highest fencing token the item's stock was written
// with: the store itself refuses an older one (docs/locks.md).
func fenceKey(item string) string { return "/shop/stockfence/" + item }

// fenceToken is a token as the fence stores it: fixed width, so that
// etcd's byte order of values is the tokens' order.
func fenceToken(t int64) string { return fmt.Sprintf("%020d", t) }

// reserveFenced is reserve for an instance holding the item's beacon
// lock with fencing token token: the stock's write happens only if no
// newer token has written it (checked by the database in the write's own
// transaction), so a holder that lost the lock cannot take stock twice or
// overwrite its successor's. beforeWrite runs once, after the read.
func (d *db) reserveFenced(ctx context.Context, order, item string, quantity, token int64, beforeWrite func()) (remaining int64, err error) {
	stockKey, resKey, fk := "/shop/stock/"+item, "/shop/reservations/"+order, fenceKey(item)
	mine, next := fenceToken(token), fenceToken(token+1)
	for {
		resp, err := d.cli.Txn(ctx).Then(clientv3.OpGet(stockKey), clientv3.OpGet(resKey), clientv3.OpGet(fk)).Commit()
		if err != nil {
			return 0, err
		}
		if kvs := resp.Responses[1].GetResponseRange().Kvs; len(kvs) == 1 {
			return reservedAlready(kvs[0].Value)
		}
		kvs, fence := resp.Responses[0].GetResponseRange().Kvs, resp.Responses[2].GetResponseRange().Kvs
		if len(kvs) == 0 || len(fence) == 0 {
			return 0, fmt.Errorf("no such item %q", item)
		}
		if string(fence[0].Value) > mine {
			return 0, ErrFenced
		}
		stock, err := strconv.ParseInt(string(kvs[0].Value), 10, 64)
		if err != nil {
			return 0, err
		}
		if stock < quantity {
			return stock, ErrOutOfStock
		}
		if beforeWrite != nil {
			beforeWrite()
			beforeWrite = nil
		}
		left := strconv.FormatInt(stock-quantity, 10)
		put, err := d.cli.Txn(ctx).If(
			clientv3.Compare(clientv3.ModRevision(stockKey), "=", kvs[0].ModRevision),
			clientv3.Compare(clientv3.CreateRevision(resKey), "=", 0),
			clientv3.Compare(clientv3.Value(fk), "<", next), // the fence: no newer token wrote
		).Then(clientv3.OpPut(stockKey, left), clientv3.OpPut(resKey, left), clientv3.OpPut(fk, mine)).Commit()
		if err != nil {
			return 0, err
		}
		if put.Succeeded {
			return stock - quantity, nil
		}
		// The stock, the order or the fence changed: read again (and be
		// refused if the fence moved past our token).
	}
}

// reserve takes quantity of item for an order, once: an optimistic
// version check on the stock (the write applies only if nobody changed
// it since it was read; else read again), and the reservation recorded in
// the same transaction, so a retried or hedged request answers what the
// first one did. Within one process, reservations of an item take
// turns: the version check guards against the other instances, and
// conflicts among this one's own requests would only cost etcd writes
// (a failed compare is still a Raft round) — under load, enough of them
// to collapse throughput on a popular item.
func (d *db) reserve(ctx context.Context, order, item string, quantity int64) (remaining int64, err error) {
	release, err := d.lockItem(ctx, item)
	if err != nil {
		return 0, err
	}
	defer release()
	stockKey, resKey := "/shop/stock/"+item, "/shop/reservations/"+order
	for {
		resp, err := d.cli.Txn(ctx).Then(clientv3.OpGet(stockKey), clientv3.OpGet(resKey)).Commit()
		if err != nil {
			return 0, err
		}
		if kvs := resp.Responses[1].GetResponseRange().Kvs; len(kvs) == 1 {
			return reservedAlready(kvs[0].Value)
		}
		kvs := resp.Responses[0].GetResponseRange().Kvs
		if len(kvs) == 0 {
			return 0, fmt.Errorf("no such item %q", item)
		}
		stock, err := strconv.ParseInt(string(kvs[0].Value), 10, 64)
		if err != nil {
			return 0, err
		}
		if stock < quantity {
			return stock, ErrOutOfStock
		}
		left := strconv.FormatInt(stock-quantity, 10)
		put, err := d.cli.Txn(ctx).If(
			clientv3.Compare(clientv3.ModRevision(stockKey), "=", kvs[0].ModRevision),
			clientv3.Compare(clientv3.CreateRevision(resKey), "=", 0),
		).Then(clientv3.OpPut(stockKey, left), clientv3.OpPut(resKey, left)).Commit()
		if err != nil {
			return 0, err
		}
		if put.Succeeded {
			return stock - quantity, nil
		}
		// Someone else took stock (or this order) in between: read again.
	}
}

// lockItem waits for this process's turn on an item, or for ctx.
func (d *db) lockItem(ctx context.Context, item string) (release func(), err error) {
	h := fnv.New32a()
	_, _ = h.Write([]byte(item))
	turn := d.turns[h.Sum32()%uint32(len(d.turns))]
	select {
	case turn <- struct{}{}:
		return func() { <-turn }, nil
	case <-ctx.Done():
		return nil, ctx.Err()
	}
}

// ErrReleased: the order's reservation was released (its saga
// compensated) — a reservation arriving after that, from an orchestrator
// that was paused in the call, is refused rather than taking stock for an
// order that no longer exists.
var ErrReleased = errors.New("the order's reservation was released")

// releasedMark is a released reservation's value: a tombstone.
const releasedMark = "released"

func reservedAlready(v []byte) (int64, error) {
	if string(v) == releasedMark {
		return 0, ErrReleased
	}
	return strconv.ParseInt(string(v), 10, 64)
}

// release gives an order's reservation of quantity back to the item's
// stock, once, and leaves a tombstone so that a late reservation is
// refused; released says stock went back. With a fencing token (> 0) the
// write is fenced like reserveFenced's.
func (d *db) release(ctx context.Context, order, item string, quantity, token int64) (released bool, err error) {
	unlock, err := d.lockItem(ctx, item)
	if err != nil {
		return false, err
	}
	defer unlock()
	stockKey, resKey, fk := "/shop/stock/"+item, "/shop/reservations/"+order, fenceKey(item)
	for {
		resp, err := d.cli.Txn(ctx).Then(clientv3.OpGet(stockKey), clientv3.OpGet(resKey)).Commit()
		if err != nil {
			return false, err
		}
		res := resp.Responses[1].GetResponseRange().Kvs
		if len(res) == 0 { // never reserved: the tombstone alone
			put, err := d.cli.Txn(ctx).If(clientv3.Compare(clientv3.CreateRevision(resKey), "=", 0)).Then(clientv3.OpPut(resKey, releasedMark)).Commit()
			if err != nil {
				return false, err
			}
			if put.Succeeded {
				return false, nil
			}
			continue
		}
		if string(res[0].Value) == releasedMark {
			return false, nil
		}
		kvs := resp.Responses[0].GetResponseRange().Kvs
		if len(kvs) == 0 {
			return false, fmt.Errorf("no such item %q", item)
		}
		stock, err := strconv.ParseInt(string(kvs[0].Value), 10, 64)
		if err != nil {
			return false, err
		}
		cmps := []clientv3.Cmp{
			clientv3.Compare(clientv3.ModRevision(stockKey), "=", kvs[0].ModRevision),
			clientv3.Compare(clientv3.ModRevision(resKey), "=", res[0].ModRevision),
		}
		ops := []clientv3.Op{clientv3.OpPut(stockKey, strconv.FormatInt(stock+quantity, 10)), clientv3.OpPut(resKey, releasedMark)}
		if token > 0 {
			cmps = append(cmps, clientv3.Compare(clientv3.Value(fk), "<", fenceToken(token+1)))
			ops = append(ops, clientv3.OpPut(fk, fenceToken(token)))
		}
		put, err := d.cli.Txn(ctx).If(cmps...).Then(ops...).Commit()
		if err != nil {
			return false, err
		}
		if put.Succeeded {
			return true, nil
		}
		if token > 0 {
			f, err := d.cli.Get(ctx, fk)
			if err != nil {
				return false, err
			}
			if len(f.Kvs) == 1 && string(f.Kvs[0].Value) > fenceToken(token) {
				return false, ErrFenced
			}
		}
	}
}

// ErrRefunded: the order's charge was refunded (its saga compensated);
// a charge arriving after that is refused.
var ErrRefunded = errors.New("the order's charge was refunded")

const refundedMark = "refunded"

// refund refunds an order's charge once (recording the amount under
// /shop/refunds/) and leaves a tombstone so that a late charge is
// refused; refunded says money went back.
func (d *db) refund(ctx context.Context, order string) (refunded bool, err error) {
	k, rk := "/shop/charges/"+order, "/shop/refunds/"+order
	for {
		resp, err := d.cli.Txn(ctx).If(clientv3.Compare(clientv3.CreateRevision(k), "=", 0)).
			Then(clientv3.OpPut(k, refundedMark)).Else(clientv3.OpGet(k)).Commit()
		if err != nil {
			return false, err
		}
		if resp.Succeeded {
			return false, nil // never charged: the tombstone alone
		}
		kv := resp.Responses[0].GetResponseRange().Kvs[0]
		if string(kv.Value) == refundedMark {
			return false, nil
		}
		put, err := d.cli.Txn(ctx).If(clientv3.Compare(clientv3.ModRevision(k), "=", kv.ModRevision)).
			Then(clientv3.OpPut(k, refundedMark), clientv3.OpPut(rk, string(kv.Value))).Commit()
		if err != nil {
			return false, err
		}
		if put.Succeeded {
			return true, nil
		}
	}
}

// ErrCancelled: the order was cancelled (its saga compensated); a
// confirmation arriving after that is refused.
var ErrCancelled = errors.New("the order was cancelled")

// confirm marks an order confirmed, once, unless it was cancelled.
func (d *db) confirm(ctx context.Context, order string) error {
	k := "/shop/orders/" + order
	resp, err := d.cli.Txn(ctx).If(clientv3.Compare(clientv3.CreateRevision(k), "=", 0)).
		Then(clientv3.OpPut(k, "confirmed")).Else(clientv3.OpGet(k)).Commit()
	if err != nil {
		return err
	}
	if !resp.Succeeded && string(resp.Responses[0].GetResponseRange().Kvs[0].Value) == "cancelled" {
		return ErrCancelled
	}
	return nil
}

// cancel marks an order cancelled (a confirmation after it is refused).
func (d *db) cancel(ctx context.Context, order string) error {
	_, err := d.cli.Put(ctx, "/shop/orders/"+order, "cancelled")
	return err
}

// pauseOnce says whether this is the first time anyone reached the
// boundary of an order (the demo's pauses happen once per order, not
// again in the orchestrator that takes the saga over).
func (d *db) pauseOnce(ctx context.Context, order, boundary string) (bool, error) {
	k := "/shop/pauses/" + order + "/" + boundary
	resp, err := d.cli.Txn(ctx).If(clientv3.Compare(clientv3.CreateRevision(k), "=", 0)).Then(clientv3.OpPut(k, "")).Commit()
	if err != nil {
		return false, err
	}
	return resp.Succeeded, nil
}

// charge records a charge for an order once and returns its ID.
func (d *db) charge(ctx context.Context, order string, cents int64) (string, error) {
	k := "/shop/charges/" + order
	id := "ch-" + order
	resp, err := d.cli.Txn(ctx).If(clientv3.Compare(clientv3.CreateRevision(k), "=", 0)).
		Then(clientv3.OpPut(k, strconv.FormatInt(cents, 10))).Else(clientv3.OpGet(k)).Commit()
	if err != nil {
		return "", err
	}
	if !resp.Succeeded {
		kv := resp.Responses[0].GetResponseRange().Kvs[0]
		if string(kv.Value) == refundedMark {
			return "", ErrRefunded
		}
		if string(kv.Value) != strconv.FormatInt(cents, 10) {
			return "", fmt.Errorf("order %s was charged %s cents, not %d", order, kv.Value, cents)
		}
	}
	return id, nil
}
