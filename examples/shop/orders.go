package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"net/http"
	"os"
	"os/signal"
	"strconv"
	"sync/atomic"
	"syscall"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"beacon.dev/beacon/client"
	"beacon.dev/beacon/config"
	"beacon.dev/beacon/examples/shop/shoppb"
	"beacon.dev/beacon/saga"
)

// orders places an order as a saga (ordersaga.go): stock from inventory
// (gRPC), then payment from payments (HTTP), both through the SDK, then
// the order confirmed — or what was done undone.
type orders struct {
	shoppb.UnimplementedOrdersServer
	id         string
	inventory  shoppb.InventoryClient
	http       *http.Client
	slow       atomic.Int64 // injected latency per request, ns
	db         *db          // orders are confirmed (or cancelled) here
	sagas      *saga.Orchestrator
	sagaPauses bool
	// pricing comes from the config center (key shop/pricing), hot
	// reloaded: `discount N` in the demo changes it on every instance.
	pricing *config.Binding[pricing]
}

// pricing is the shop's pricing config.
type pricing struct {
	DiscountPercent int64 `json:"discount_percent"`
}

func validPricing(p pricing) error {
	if p.DiscountPercent < 0 || p.DiscountPercent > 90 {
		return fmt.Errorf("discount_percent %d is outside [0, 90]", p.DiscountPercent)
	}
	return nil
}

// pricingKey is the config key orders read their pricing from.
const pricingKey = "shop/pricing"

func (s *orders) PlaceOrder(ctx context.Context, req *shoppb.PlaceOrderRequest) (*shoppb.PlaceOrderResponse, error) {
	if d := time.Duration(s.slow.Load()); d > 0 {
		t := time.NewTimer(d)
		select {
		case <-ctx.Done():
			t.Stop()
			return nil, status.FromContextError(ctx.Err()).Err()
		case <-t.C:
		}
	}
	if req.GetOrderId() == "" || req.GetItem() == "" || req.GetQuantity() <= 0 || req.GetAmountCents() <= 0 {
		return nil, status.Error(codes.InvalidArgument, "order_id, item, and a positive quantity and amount_cents are required")
	}
	amount := req.GetAmountCents()
	if s.pricing != nil {
		amount -= amount * s.pricing.Load().DiscountPercent / 100
	}
	if s.sagas == nil {
		return s.placeDirect(ctx, req, amount)
	}
	input, _ := json.Marshal(orderInput{Item: req.GetItem(), Quantity: req.GetQuantity(), AmountCents: amount})
	// The order's saga: started once per order ID (a retried or hedged
	// request finds it; if the discount changed in between, the first
	// request's terms hold), moved by whichever orders instance leads its
	// shard, and waited for here.
	_, err := s.sagas.Start(ctx, orderSagaName, req.GetOrderId(), input)
	switch {
	case errors.Is(err, saga.ErrExists):
		// Placed before: the same order again (a retry or a hedge, maybe
		// priced with another discount) waits for it; another order under
		// the same ID is refused.
		cur, gerr := s.sagas.Store().Get(ctx, orderSagaName, req.GetOrderId())
		if gerr != nil {
			return nil, status.Errorf(codes.Unavailable, "reading the order's saga: %v", gerr)
		}
		var was orderInput
		if json.Unmarshal(cur.Input, &was) != nil || was.Item != req.GetItem() || was.Quantity != req.GetQuantity() {
			return nil, status.Errorf(codes.AlreadyExists, "order %s exists for %d × %s", req.GetOrderId(), was.Quantity, was.Item)
		}
	case errors.Is(err, saga.ErrInvalid):
		return nil, status.Error(codes.InvalidArgument, err.Error())
	case err != nil:
		return nil, status.Errorf(codes.Unavailable, "starting the order's saga: %v", err)
	}
	st, err := s.sagas.Wait(ctx, orderSagaName, req.GetOrderId())
	if err != nil {
		return nil, status.FromContextError(err).Err()
	}
	switch st.Status {
	case saga.Done:
		left, _ := strconv.ParseInt(string(st.Outputs["reserve"]), 10, 64)
		return &shoppb.PlaceOrderResponse{OrderId: req.GetOrderId(), Remaining: left, ChargeId: string(st.Outputs["charge"]), ServedBy: s.id}, nil
	case saga.Compensated:
		return nil, status.Errorf(codes.FailedPrecondition, "order %s was not placed (undone): %s", req.GetOrderId(), st.Error)
	default:
		return nil, status.Errorf(codes.Internal, "order %s is stuck: %s (beacon saga retry %s %s)", req.GetOrderId(), st.Error, orderSagaName, req.GetOrderId())
	}
}

// placeDirect places an order without a saga (orders --sagas=false, what
// the chaos scorecard runs: it measures the data plane, and keeps
// placing orders while the registry is down): stock, then payment, each
// call once through the SDK, nothing undone if the payment fails.
func (s *orders) placeDirect(ctx context.Context, req *shoppb.PlaceOrderRequest, amount int64) (*shoppb.PlaceOrderResponse, error) {
	res, err := s.inventory.Reserve(ctx, &shoppb.ReserveRequest{OrderId: req.GetOrderId(), Item: req.GetItem(), Quantity: req.GetQuantity()})
	if err != nil {
		return nil, err // its status says why (out of stock, unavailable)
	}
	body, _ := json.Marshal(chargeRequest{AmountCents: amount})
	b, err := s.payments(ctx, http.MethodPut, req.GetOrderId(), body)
	if err != nil {
		return nil, status.Error(codes.Unavailable, err.Error())
	}
	var ch chargeResponse
	if err := json.Unmarshal(b, &ch); err != nil {
		return nil, status.Errorf(codes.Unavailable, "payments: %v", err)
	}
	return &shoppb.PlaceOrderResponse{OrderId: req.GetOrderId(), Remaining: res.GetRemaining(), ChargeId: ch.ChargeID, ServedBy: s.id}, nil
}

// injectLatency follows SIGUSR1 (slow) and SIGUSR2 (normal) until ctx ends.
func (s *orders) injectLatency(ctx context.Context, d time.Duration) {
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGUSR1, syscall.SIGUSR2)
	defer signal.Stop(sig)
	for {
		select {
		case <-ctx.Done():
			return
		case v := <-sig:
			if v == syscall.SIGUSR1 {
				s.slow.Store(int64(d))
				fmt.Printf("shop: slow %v\n", d)
			} else {
				s.slow.Store(0)
				fmt.Println("shop: normal")
			}
		}
	}
}

func runOrders(args []string) error {
	fs := flag.NewFlagSet("orders", flag.ExitOnError)
	var c common
	c.bind(fs, "127.0.0.1:0")
	slow := fs.Duration("slow", 200*time.Millisecond, "latency SIGUSR1 adds to every request")
	dbAddr := fs.String("db", "127.0.0.1:7379", "the shop database's address (orders are confirmed there)")
	sagas := fs.Bool("sagas", true, "place orders as sagas (false: reserve and charge directly, nothing undone — what the chaos scorecard measures)")
	pauses := fs.Bool("saga-pauses", false, "stop order sagas whose ID asks for it at a step boundary until SIGCONT (for the crash tests)")
	_ = fs.Parse(args)
	log := logger("orders")
	d, err := openDB(*dbAddr)
	if err != nil {
		return err
	}
	defer d.Close()
	stopTracing, err := c.startTracing("orders")
	if err != nil {
		return err
	}
	defer stopTracing()
	peers, err := c.peers(log, "inventory", "payments")
	if err != nil {
		return err
	}
	defer peers.Close()
	cc, err := peers.Conn("inventory")
	if err != nil {
		return err
	}
	srv := &orders{inventory: shoppb.NewInventoryClient(cc), http: peers.HTTP(), db: d, sagaPauses: *pauses}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	// The pricing config, reported to the config center as applied (or
	// refused) by this instance's reporting session.
	reports, err := peers.Client.NewSession(ctx, client.WithTTL(c.ttl), client.WithSessionName("orders config reports"))
	if err != nil {
		return err
	}
	defer reports.Close(context.Background())
	bctx, bcancel := context.WithTimeout(ctx, 5*time.Second)
	srv.pricing, err = config.Bind(bctx, peers.Client, pricingKey, config.Default(pricing{}), config.Validate(validPricing), config.ReportTo[pricing](reports, ""))
	bcancel()
	if err != nil {
		// Started while the registry is down: serve without a discount
		// rather than not at all.
		log.Warn("pricing config unavailable: no discount", "err", err)
		srv.pricing = nil
	} else {
		defer srv.pricing.Close()
	}
	// The order sagas' orchestrator: every orders instance runs one; the
	// shards' leadership lives on this session.
	var workers []func(context.Context) error
	if *sagas {
		sagaSess, err := peers.Client.NewSession(ctx, client.WithTTL(c.ttl), client.WithSessionName("orders sagas"))
		if err != nil {
			return err
		}
		defer sagaSess.Close(context.Background())
		srv.sagas, err = saga.New(saga.Config{Client: peers.Client, Session: sagaSess, Prefix: sagaPrefix, Logger: log, OnTransition: srv.onTransition, TracerProvider: c.tp}, srv.orderSaga())
		if err != nil {
			return err
		}
		workers = append(workers, srv.sagas.Run)
	}
	go srv.injectLatency(ctx, *slow) // owned: ends with ctx
	gs := c.grpcServer()
	shoppb.RegisterOrdersServer(gs, srv)
	return serve(&c, "orders", peers, log, gs, nil, func(id string) { srv.id = id }, workers...)
}
