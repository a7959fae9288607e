package main

import (
	"context"
	"errors"
	"flag"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"beacon.dev/beacon/examples/shop/shoppb"
)

type inventory struct {
	shoppb.UnimplementedInventoryServer
	db *db
	id string
}

func (s *inventory) Reserve(ctx context.Context, req *shoppb.ReserveRequest) (*shoppb.ReserveResponse, error) {
	if req.GetOrderId() == "" || req.GetItem() == "" || req.GetQuantity() <= 0 {
		return nil, status.Error(codes.InvalidArgument, "order_id, item and a positive quantity are required")
	}
	left, err := s.db.reserve(ctx, req.GetOrderId(), req.GetItem(), int64(req.GetQuantity()))
	switch {
	case errors.Is(err, ErrOutOfStock):
		return nil, status.Errorf(codes.FailedPrecondition, "%s: %d left", err, left)
	case err != nil:
		return nil, status.Error(codes.Unavailable, err.Error())
	}
	return &shoppb.ReserveResponse{Remaining: left, ServedBy: s.id}, nil
}

func runInventory(args []string) error {
	fs := flag.NewFlagSet("inventory", flag.ExitOnError)
	var c common
	c.bind(fs, "127.0.0.1:0")
	dbAddr := fs.String("db", "127.0.0.1:7379", "the shop database's address")
	stock := fs.Int64("stock", 1_000_000_000, "stock each item starts with (if not set yet)")
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
	peers, err := c.peers(log)
	if err != nil {
		return err
	}
	defer peers.Close()
	gs := grpc.NewServer()
	srv := &inventory{db: d, id: c.id}
	shoppb.RegisterInventoryServer(gs, srv)
	return serve(&c, "inventory", peers, log, gs, nil, func(id string) { srv.id = id })
}

// items the shop sells.
var items = []string{"widget", "gadget", "gizmo"}
