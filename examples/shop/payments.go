package main

import (
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"net/http"
	"strings"
)

// payments charges orders over HTTP: PUT /charges/ORDER_ID with
// {"amount_cents": N}, DELETE /charges/ORDER_ID refunds; both idempotent
// by order, and a charge after a refund is refused (409).
type payments struct {
	db *db
	id string
}

type chargeRequest struct {
	AmountCents int64 `json:"amount_cents"`
}

type chargeResponse struct {
	ChargeID string `json:"charge_id"`
	ServedBy string `json:"served_by"`
}

// maxChargeCents: a larger charge is declined (the demo's card limit,
// for an order whose saga compensates).
const maxChargeCents = 10_000_000

func (s *payments) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	order, ok := strings.CutPrefix(r.URL.Path, "/charges/")
	if !ok || order == "" || r.Method != http.MethodPut && r.Method != http.MethodDelete {
		http.Error(w, "PUT or DELETE /charges/ORDER_ID", http.StatusNotFound)
		return
	}
	if r.Method == http.MethodDelete { // a refund: idempotent
		refunded, err := s.db.refund(r.Context(), order)
		if err != nil {
			http.Error(w, err.Error(), http.StatusServiceUnavailable)
			return
		}
		w.Header().Set("Content-Type", "application/json")
		_ = json.NewEncoder(w).Encode(map[string]any{"refunded": refunded, "served_by": s.id})
		return
	}
	var req chargeRequest
	if err := json.NewDecoder(http.MaxBytesReader(w, r.Body, 1<<10)).Decode(&req); err != nil || req.AmountCents <= 0 {
		http.Error(w, "body: {\"amount_cents\": a positive integer}", http.StatusBadRequest)
		return
	}
	if req.AmountCents > maxChargeCents {
		http.Error(w, fmt.Sprintf("declined: %d cents is over the limit of %d", req.AmountCents, maxChargeCents), http.StatusPaymentRequired)
		return
	}
	id, err := s.db.charge(r.Context(), order, req.AmountCents)
	if errors.Is(err, ErrRefunded) {
		http.Error(w, err.Error(), http.StatusConflict)
		return
	}
	if err != nil {
		http.Error(w, err.Error(), http.StatusServiceUnavailable)
		return
	}
	w.Header().Set("Content-Type", "application/json")
	_ = json.NewEncoder(w).Encode(chargeResponse{ChargeID: id, ServedBy: s.id})
}

func runPayments(args []string) error {
	fs := flag.NewFlagSet("payments", flag.ExitOnError)
	var c common
	c.bind(fs, "127.0.0.1:0")
	dbAddr := fs.String("db", "127.0.0.1:7379", "the shop database's address")
	_ = fs.Parse(args)
	log := logger("payments")
	d, err := openDB(*dbAddr)
	if err != nil {
		return err
	}
	defer d.Close()
	stopTracing, err := c.startTracing("payments")
	if err != nil {
		return err
	}
	defer stopTracing()
	peers, err := c.peers(log)
	if err != nil {
		return err
	}
	defer peers.Close()
	srv := &payments{db: d}
	return serve(&c, "payments", peers, log, nil, srv, func(id string) { srv.id = id })
}
