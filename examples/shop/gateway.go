package main

import (
	"encoding/json"
	"flag"
	"fmt"
	"net/http"
	"sync/atomic"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"beacon.dev/beacon/beacongrpc"
	"beacon.dev/beacon/examples/shop/shoppb"
)

// gateway is the shop's HTTP front: POST /orders {"item", "quantity"}
// places an order through the orders service; GET /debug/outliers shows
// its outlier detection.
type gateway struct {
	orders shoppb.OrdersClient
	seq    atomic.Int64
	boot   string
}

type orderRequest struct {
	OrderID  string `json:"order_id"` // optional: set it to make a retried POST safe
	Item     string `json:"item"`
	Quantity int32  `json:"quantity"`
}

func (g *gateway) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if r.URL.Path == "/debug/outliers" && r.Method == http.MethodGet {
		// Outlier detection toward each service, for the demo's view.
		w.Header().Set("Content-Type", "application/json")
		_ = json.NewEncoder(w).Encode(beacongrpc.Outliers())
		return
	}
	if r.URL.Path != "/orders" || r.Method != http.MethodPost {
		http.Error(w, "POST /orders", http.StatusNotFound)
		return
	}
	var req orderRequest
	if err := json.NewDecoder(http.MaxBytesReader(w, r.Body, 1<<10)).Decode(&req); err != nil {
		http.Error(w, "body: {\"item\": ..., \"quantity\": N}: "+err.Error(), http.StatusBadRequest)
		return
	}
	if req.OrderID == "" {
		req.OrderID = fmt.Sprintf("%s-%d", g.boot, g.seq.Add(1))
	}
	resp, err := g.orders.PlaceOrder(r.Context(), &shoppb.PlaceOrderRequest{OrderId: req.OrderID, Item: req.Item, Quantity: req.Quantity, AmountCents: 100 * int64(req.Quantity)})
	if err != nil {
		st := status.Convert(err)
		code := httpStatus[st.Code()]
		if code == 0 {
			code = http.StatusBadGateway
		}
		http.Error(w, st.Message(), code)
		return
	}
	w.Header().Set("Content-Type", "application/json")
	_ = json.NewEncoder(w).Encode(resp)
}

func runGateway(args []string) error {
	fs := flag.NewFlagSet("gateway", flag.ExitOnError)
	var c common
	c.bind(fs, "127.0.0.1:8080")
	_ = fs.Parse(args)
	log := logger("gateway")
	stopTracing, err := c.startTracing("gateway")
	if err != nil {
		return err
	}
	defer stopTracing()
	peers, err := c.peers(log, "orders")
	if err != nil {
		return err
	}
	defer peers.Close()
	cc, err := peers.Conn("orders")
	if err != nil {
		return err
	}
	g := &gateway{orders: shoppb.NewOrdersClient(cc), boot: fmt.Sprint(time.Now().UnixNano())}
	return serve(&c, "gateway", peers, log, nil, g, func(string) {})
}

// httpStatus maps the orders service's answers to the gateway's; anything
// else is a 502.
var httpStatus = map[codes.Code]int{
	codes.InvalidArgument: http.StatusBadRequest, codes.FailedPrecondition: http.StatusConflict,
	codes.NotFound: http.StatusNotFound, codes.DeadlineExceeded: http.StatusGatewayTimeout,
	codes.Unavailable: http.StatusServiceUnavailable, codes.Unknown: http.StatusBadGateway,
	codes.Internal: http.StatusBadGateway, codes.Canceled: http.StatusBadGateway,
}
