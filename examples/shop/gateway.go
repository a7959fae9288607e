package main

import (
	"encoding/json"
	"flag"
	"fmt"
	"net/http"
	"strconv"
	"strings"
	"sync/atomic"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"beacon.dev/beacon/beacongrpc"
	"beacon.dev/beacon/events"
	"beacon.dev/beacon/examples/shop/shoppb"
)

// gateway is the shop's HTTP front: POST /orders {"item", "quantity",
// "user"} places an order through the orders service; GET
// /items/ITEM?user=U (a view) and POST /cart {"user", "item",
// "quantity"} only tell tracking; with --brokers, each publishes a
// user-behaviour event (header Beacon-Tracked says whether it was);
// GET /debug/outliers shows its outlier detection.
type gateway struct {
	orders  shoppb.OrdersClient
	tracker *tracker // nil: no behaviour events
	seq     atomic.Int64
	boot    string
}

type orderRequest struct {
	OrderID  string `json:"order_id"` // optional: set it to make a retried POST safe
	Item     string `json:"item"`
	Quantity int32  `json:"quantity"`
	User     string `json:"user,omitempty"` // optional: whose behaviour it is (tracking)
}

func (g *gateway) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if r.URL.Path == "/debug/outliers" && r.Method == http.MethodGet {
		// Outlier detection toward each service, for the demo's view.
		w.Header().Set("Content-Type", "application/json")
		_ = json.NewEncoder(w).Encode(beacongrpc.Outliers())
		return
	}
	if item, ok := strings.CutPrefix(r.URL.Path, "/items/"); ok && r.Method == http.MethodGet {
		g.view(w, r, item)
		return
	}
	if r.URL.Path == "/cart" && r.Method == http.MethodPost {
		g.addToCart(w, r)
		return
	}
	if r.URL.Path != "/orders" || r.Method != http.MethodPost {
		http.Error(w, "POST /orders, POST /cart, GET /items/ITEM?user=U", http.StatusNotFound)
		return
	}
	var req orderRequest
	if err := json.NewDecoder(http.MaxBytesReader(w, r.Body, 1<<10)).Decode(&req); err != nil {
		http.Error(w, "body: {\"item\": ..., \"quantity\": N}: "+err.Error(), http.StatusBadRequest)
		return
	}
	if req.User != "" {
		if err := (behaviour{User: req.User, Kind: "order", Item: req.Item, Quantity: req.Quantity}).validate(); err != nil {
			http.Error(w, err.Error(), http.StatusBadRequest)
			return
		}
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
	if req.User != "" {
		// The order's id names the event: a retried order is counted once.
		g.setTracked(w, g.tracker.track(r.Context(), behaviour{User: req.User, Kind: "order", Item: req.Item, Quantity: req.Quantity}, "order-"+req.OrderID))
	}
	w.Header().Set("Content-Type", "application/json")
	_ = json.NewEncoder(w).Encode(resp)
}

// setTracked says whether the request's behaviour event was published.
func (g *gateway) setTracked(w http.ResponseWriter, ok bool) {
	w.Header().Set("Beacon-Tracked", strconv.FormatBool(ok))
}

// view is GET /items/ITEM?user=U: the item, and a "view" event.
func (g *gateway) view(w http.ResponseWriter, r *http.Request, item string) {
	b := behaviour{User: r.URL.Query().Get("user"), Kind: "view", Item: item}
	if err := b.validate(); err != nil {
		http.Error(w, err.Error(), http.StatusBadRequest)
		return
	}
	g.setTracked(w, g.tracker.track(r.Context(), b, ""))
	w.Header().Set("Content-Type", "application/json")
	_ = json.NewEncoder(w).Encode(map[string]string{"item": item})
}

// addToCart is POST /cart {"user","item","quantity"}: an "add to cart"
// event (the cart itself is the client's).
func (g *gateway) addToCart(w http.ResponseWriter, r *http.Request) {
	var b behaviour
	if err := json.NewDecoder(http.MaxBytesReader(w, r.Body, 1<<10)).Decode(&b); err != nil {
		http.Error(w, "body (at most 1 KiB): {\"user\": ..., \"item\": ..., \"quantity\": N}: "+err.Error(), http.StatusBadRequest)
		return
	}
	b.Kind = "cart"
	if err := b.validate(); err != nil {
		http.Error(w, err.Error(), http.StatusBadRequest)
		return
	}
	g.setTracked(w, g.tracker.track(r.Context(), b, ""))
	w.WriteHeader(http.StatusAccepted)
}

func runGateway(args []string) error {
	fs := flag.NewFlagSet("gateway", flag.ExitOnError)
	var c common
	c.bind(fs, "127.0.0.1:8080")
	brokers := fs.String("brokers", "", "publish user-behaviour events to these Kafka brokers, comma-separated (\"\": none)")
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
	if *brokers != "" {
		p, err := events.NewProducer(events.Config{Brokers: strings.Split(*brokers, ","), Logger: log, TracerProvider: c.tp})
		if err != nil {
			return err
		}
		defer p.Close()
		g.tracker = &tracker{p: p, log: log}
	}
	return serve(&c, "gateway", peers, log, nil, g, func(string) {})
}

// httpStatus maps the orders service's answers to the gateway's; anything
// else is a 502.
var httpStatus = map[codes.Code]int{
	codes.InvalidArgument: http.StatusBadRequest, codes.FailedPrecondition: http.StatusConflict,
	codes.NotFound: http.StatusNotFound, codes.AlreadyExists: http.StatusConflict, codes.DeadlineExceeded: http.StatusGatewayTimeout,
	codes.Unavailable: http.StatusServiceUnavailable, codes.Unknown: http.StatusBadGateway,
	codes.Internal: http.StatusBadGateway, codes.Canceled: http.StatusBadGateway,
}
