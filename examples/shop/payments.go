package main

import (
	"encoding/json"
	"flag"
	"net/http"
	"strings"
)

// payments charges orders over HTTP: PUT /charges/ORDER_ID with
// {"amount_cents": N}; idempotent by order.
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

func (s *payments) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	order, ok := strings.CutPrefix(r.URL.Path, "/charges/")
	if r.Method != http.MethodPut || !ok || order == "" {
		http.Error(w, "PUT /charges/ORDER_ID", http.StatusNotFound)
		return
	}
	var req chargeRequest
	if err := json.NewDecoder(http.MaxBytesReader(w, r.Body, 1<<10)).Decode(&req); err != nil || req.AmountCents <= 0 {
		http.Error(w, "body: {\"amount_cents\": a positive integer}", http.StatusBadRequest)
		return
	}
	id, err := s.db.charge(r.Context(), order, req.AmountCents)
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
