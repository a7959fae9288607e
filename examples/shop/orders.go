package main

import (
	"bytes"
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/signal"
	"sync/atomic"
	"syscall"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"beacon.dev/beacon/client"
	"beacon.dev/beacon/config"
	"beacon.dev/beacon/examples/shop/shoppb"
)

// orders places an order: stock from inventory (gRPC), then payment from
// payments (HTTP), both through the SDK.
type orders struct {
	shoppb.UnimplementedOrdersServer
	id        string
	inventory shoppb.InventoryClient
	http      *http.Client
	slow      atomic.Int64 // injected latency per request, ns
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
	res, err := s.inventory.Reserve(ctx, &shoppb.ReserveRequest{OrderId: req.GetOrderId(), Item: req.GetItem(), Quantity: req.GetQuantity()})
	if err != nil {
		return nil, err // its status says why (out of stock, unavailable)
	}
	amount := req.GetAmountCents()
	if s.pricing != nil {
		amount -= amount * s.pricing.Load().DiscountPercent / 100
	}
	body, _ := json.Marshal(chargeRequest{AmountCents: amount})
	hreq, err := http.NewRequestWithContext(ctx, http.MethodPut, "http://payments/charges/"+req.GetOrderId(), bytes.NewReader(body))
	if err != nil {
		return nil, status.Error(codes.Internal, err.Error())
	}
	resp, err := s.http.Do(hreq)
	if err != nil {
		return nil, status.Errorf(codes.Unavailable, "payments: %v", err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		msg, _ := io.ReadAll(io.LimitReader(resp.Body, 512))
		return nil, status.Errorf(codes.Unavailable, "payments: %s: %s", resp.Status, bytes.TrimSpace(msg))
	}
	var ch chargeResponse
	if err := json.NewDecoder(resp.Body).Decode(&ch); err != nil {
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
	_ = fs.Parse(args)
	log := logger("orders")
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
	srv := &orders{inventory: shoppb.NewInventoryClient(cc), http: peers.HTTP()}
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
	go srv.injectLatency(ctx, *slow) // owned: ends with ctx
	gs := c.grpcServer()
	shoppb.RegisterOrdersServer(gs, srv)
	return serve(&c, "orders", peers, log, gs, nil, func(id string) { srv.id = id })
}
