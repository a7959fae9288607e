package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"beacon.dev/beacon/client"
	"beacon.dev/beacon/examples/shop/shoppb"
)

type inventory struct {
	shoppb.UnimplementedInventoryServer
	db *db
	id string
	// With --fenced-stock: the item's beacon lock is taken for every
	// reservation, and the stock is written with its fencing token.
	locks *client.Client
	sess  *client.Session
}

func (s *inventory) Reserve(ctx context.Context, req *shoppb.ReserveRequest) (*shoppb.ReserveResponse, error) {
	if req.GetOrderId() == "" || req.GetItem() == "" || req.GetQuantity() <= 0 {
		return nil, status.Error(codes.InvalidArgument, "order_id, item and a positive quantity are required")
	}
	var left int64
	var err error
	if s.sess != nil {
		left, err = s.reserveLocked(ctx, req)
	} else {
		left, err = s.db.reserve(ctx, req.GetOrderId(), req.GetItem(), int64(req.GetQuantity()))
	}
	switch {
	case errors.Is(err, ErrOutOfStock):
		return nil, status.Errorf(codes.FailedPrecondition, "%s: %d left", err, left)
	case errors.Is(err, ErrReleased):
		return nil, status.Error(codes.FailedPrecondition, err.Error())
	case errors.Is(err, ErrFenced):
		return nil, status.Error(codes.Aborted, err.Error())
	case err != nil:
		return nil, status.Error(codes.Unavailable, err.Error())
	}
	return &shoppb.ReserveResponse{Remaining: left, ServedBy: s.id}, nil
}

// Release gives an order's reservation back (its saga's compensation).
func (s *inventory) Release(ctx context.Context, req *shoppb.ReleaseRequest) (*shoppb.ReleaseResponse, error) {
	if req.GetOrderId() == "" || req.GetItem() == "" || req.GetQuantity() <= 0 {
		return nil, status.Error(codes.InvalidArgument, "order_id, item and a positive quantity are required")
	}
	var token int64
	if s.sess != nil {
		h, err := s.locks.Mutex(s.sess, "shop/stock/"+req.GetItem()).Lock(ctx)
		if err != nil {
			return nil, status.Error(codes.Unavailable, err.Error())
		}
		defer h.Unlock(context.WithoutCancel(ctx))
		token = h.Token()
	}
	released, err := s.db.release(ctx, req.GetOrderId(), req.GetItem(), int64(req.GetQuantity()), token)
	switch {
	case errors.Is(err, ErrFenced):
		return nil, status.Error(codes.Aborted, err.Error())
	case err != nil:
		return nil, status.Error(codes.Unavailable, err.Error())
	}
	return &shoppb.ReleaseResponse{Released: released, ServedBy: s.id}, nil
}

// reserveLocked takes the item's lock across all inventory instances and
// writes the stock fenced by its token. An order whose ID starts with
// "stall-" (for the fencing test and the demo) stops after reading the
// stock until the process gets SIGCONT — as a process paused by GC or
// SIGSTOP would — and then writes without looking at its lock again:
// the database's fence is what refuses it.
func (s *inventory) reserveLocked(ctx context.Context, req *shoppb.ReserveRequest) (int64, error) {
	h, err := s.locks.Mutex(s.sess, "shop/stock/"+req.GetItem()).Lock(ctx)
	if err != nil {
		return 0, err
	}
	defer h.Unlock(context.WithoutCancel(ctx))
	var stall func()
	if strings.HasPrefix(req.GetOrderId(), "stall-") {
		stall = func() {
			cont := make(chan os.Signal, 1)
			signal.Notify(cont, syscall.SIGCONT)
			defer signal.Stop(cont)
			fmt.Printf("shop: stalled %s holding the lock of %s with fencing token %d\n", req.GetOrderId(), req.GetItem(), h.Token())
			select {
			case <-cont:
			case <-time.After(2 * time.Minute):
			}
		}
	}
	if stall != nil {
		ctx = context.WithoutCancel(ctx) // the paused holder does not know it lost the lock
	}
	return s.db.reserveFenced(ctx, req.GetOrderId(), req.GetItem(), int64(req.GetQuantity()), h.Token(), stall)
}

func runInventory(args []string) error {
	fs := flag.NewFlagSet("inventory", flag.ExitOnError)
	var c common
	c.bind(fs, "127.0.0.1:0")
	dbAddr := fs.String("db", "127.0.0.1:7379", "the shop database's address")
	stock := fs.Int64("stock", 1_000_000_000, "stock each item starts with (if not set yet)")
	fenced := fs.Bool("fenced-stock", false, "take the item's beacon lock for each reservation and write the stock with its fencing token")
	_ = fs.Parse(args)
	log := logger("inventory")
	d, err := openDB(*dbAddr)
	if err != nil {
		return err
	}
	defer d.Close()
	for _, item := range items {
		if err := d.seedStock(context.Background(), item, *stock); err != nil {
			return err
		}
	}
	stopTracing, err := c.startTracing("inventory")
	if err != nil {
		return err
	}
	defer stopTracing()
	peers, err := c.peers(log)
	if err != nil {
		return err
	}
	defer peers.Close()
	gs := c.grpcServer()
	srv := &inventory{db: d, id: c.id}
	if *fenced {
		sess, err := peers.Client.NewSession(context.Background(), client.WithTTL(c.ttl), client.WithSessionName("inventory locks"))
		if err != nil {
			return err
		}
		defer sess.Close(context.Background())
		srv.locks, srv.sess = peers.Client, sess
	}
	shoppb.RegisterInventoryServer(gs, srv)
	return serve(&c, "inventory", peers, log, gs, nil, func(id string) { srv.id = id })
}

// items the shop sells.
var items = []string{"widget", "gadget", "gizmo"}
