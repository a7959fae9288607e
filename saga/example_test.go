package saga_test

import (
	"context"
	"errors"
	"fmt"
	"log"
	"sync"

	"beacon.dev/beacon/client"
	"beacon.dev/beacon/internal/testutil"
	"beacon.dev/beacon/saga"
)

// stockService is a participant: reservations idempotent by key, and a
// release that leaves a tombstone so that a late reservation is refused.
type stockService struct {
	mu       sync.Mutex
	stock    int
	reserved map[string]string // key → "reserved" or "released"
}

func (s *stockService) Reserve(ctx context.Context, key string, n int) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	switch s.reserved[key] {
	case "reserved":
		return nil // a repeat
	case "released":
		return saga.Permanent(errors.New("released before it arrived"))
	}
	if s.stock < n {
		return saga.Permanent(fmt.Errorf("out of stock: %d left", s.stock))
	}
	s.stock -= n
	s.reserved[key] = "reserved"
	return nil
}

func (s *stockService) Release(ctx context.Context, key string, n int) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.reserved[key] == "reserved" {
		s.stock += n
	}
	s.reserved[key] = "released"
	return nil
}

// An order saga: reserve, then charge (declined over 100), undone when
// the charge fails.
func Example() {
	addr, stop := testutil.ExampleServer()
	defer stop()
	ctx := context.Background()
	c, err := client.New([]string{addr})
	if err != nil {
		log.Fatal(err)
	}
	defer c.Close()
	inv := &stockService{stock: 10, reserved: map[string]string{}}

	reserve := saga.Step{
		Name: "reserve",
		Action: func(ctx context.Context, r saga.Run) ([]byte, error) {
			// r.Key is the same on every attempt and after a failover:
			// the participant does it once.
			return nil, inv.Reserve(ctx, r.Key, 3)
		},
		Compensate: func(ctx context.Context, r saga.Run) error {
			return inv.Release(ctx, "order/"+r.ID+"/reserve", 3)
		},
	}
	charge := saga.Step{
		Name: "charge",
		Action: func(ctx context.Context, r saga.Run) ([]byte, error) {
			if string(r.Input) == "expensive" {
				return nil, saga.Permanent(errors.New("card declined"))
			}
			return []byte("ch-" + r.ID), nil
		},
	}
	sess, err := c.NewSession(ctx)
	if err != nil {
		log.Fatal(err)
	}
	defer sess.Close(ctx)
	o, err := saga.New(saga.Config{Client: c, Session: sess},
		saga.Definition{Name: "order", Steps: []saga.Step{reserve, charge}})
	if err != nil {
		log.Fatal(err)
	}
	runCtx, stopRun := context.WithCancel(ctx)
	ran := make(chan error, 1)
	go func() { ran <- o.Run(runCtx) }() // on every instance of the service
	defer func() { stopRun(); <-ran }()

	for _, order := range []struct{ id, input string }{{"o-1", "cheap"}, {"o-2", "expensive"}} {
		if _, err := o.Start(ctx, "order", order.id, []byte(order.input)); err != nil {
			log.Fatal(err)
		}
		st, err := o.Wait(ctx, "order", order.id)
		if err != nil {
			log.Fatal(err)
		}
		if st.Status == saga.Done {
			fmt.Printf("%s: done, charge %s\n", order.id, st.Outputs["charge"])
		} else {
			fmt.Printf("%s: %s (%s)\n", order.id, st.Status, st.Error)
		}
	}
	fmt.Println("stock left:", inv.stock)
	// Output:
	// o-1: done, charge ch-o-1
	// o-2: compensated (step charge: card declined)
	// stock left: 7
}
