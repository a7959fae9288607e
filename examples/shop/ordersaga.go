package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/signal"
	"strconv"
	"strings"
	"syscall"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"beacon.dev/beacon/examples/shop/shoppb"
	"beacon.dev/beacon/saga"
)

// The order saga: reserve stock → charge → confirm; compensations
// release, refund and cancel. Every participant is idempotent by order and
// leaves a tombstone when compensated, so an action that arrives late
// (from an orchestrator paused in the call) is refused.
const orderSagaName = "order"

// sagaPrefix is where the shop's sagas are kept in beacon KV.
const sagaPrefix = "shop/sagas/"

// orderInput is an order saga's input.
type orderInput struct {
	Item        string `json:"item"`
	Quantity    int32  `json:"quantity"`
	AmountCents int64  `json:"amount_cents"` // after the discount
}

// orderSaga defines the order saga for the orders service s.
func (s *orders) orderSaga() saga.Definition {
	input := func(r saga.Run) (orderInput, error) {
		var in orderInput
		if err := json.Unmarshal(r.Input, &in); err != nil {
			return in, saga.Permanent(fmt.Errorf("input: %w", err))
		}
		return in, nil
	}
	return saga.Definition{Name: orderSagaName, Timeout: 30 * time.Second, Steps: []saga.Step{
		{
			Name: "reserve",
			Action: func(ctx context.Context, r saga.Run) ([]byte, error) {
				in, err := input(r)
				if err != nil {
					return nil, err
				}
				return s.around(ctx, r.ID, "reserve", func() ([]byte, error) {
					res, err := s.inventory.Reserve(ctx, &shoppb.ReserveRequest{OrderId: r.ID, Item: in.Item, Quantity: in.Quantity})
					if err != nil {
						return nil, grpcStepError(err)
					}
					return strconv.AppendInt(nil, res.GetRemaining(), 10), nil
				})
			},
			Compensate: func(ctx context.Context, r saga.Run) error {
				in, err := input(r)
				if err != nil {
					return err
				}
				_, err = s.around(ctx, r.ID, "release", func() ([]byte, error) {
					_, err := s.inventory.Release(ctx, &shoppb.ReleaseRequest{OrderId: r.ID, Item: in.Item, Quantity: in.Quantity})
					return nil, grpcStepError(err)
				})
				return err
			},
		},
		{
			Name: "charge",
			Action: func(ctx context.Context, r saga.Run) ([]byte, error) {
				in, err := input(r)
				if err != nil {
					return nil, err
				}
				return s.around(ctx, r.ID, "charge", func() ([]byte, error) {
					body, _ := json.Marshal(chargeRequest{AmountCents: in.AmountCents})
					b, err := s.payments(ctx, http.MethodPut, r.ID, body)
					if err != nil {
						return nil, err
					}
					var ch chargeResponse
					if err := json.Unmarshal(b, &ch); err != nil {
						return nil, fmt.Errorf("payments: %w", err)
					}
					return []byte(ch.ChargeID), nil
				})
			},
			Compensate: func(ctx context.Context, r saga.Run) error {
				_, err := s.around(ctx, r.ID, "refund", func() ([]byte, error) {
					_, err := s.payments(ctx, http.MethodDelete, r.ID, nil)
					return nil, err
				})
				return err
			},
		},
		{
			Name: "confirm",
			Action: func(ctx context.Context, r saga.Run) ([]byte, error) {
				return s.around(ctx, r.ID, "confirm", func() ([]byte, error) {
					err := s.db.confirm(ctx, r.ID)
					if errors.Is(err, ErrCancelled) {
						return nil, saga.Permanent(err)
					}
					return nil, err
				})
			},
			Compensate: func(ctx context.Context, r saga.Run) error {
				_, err := s.around(ctx, r.ID, "cancel", func() ([]byte, error) { return nil, s.db.cancel(ctx, r.ID) })
				return err
			},
		},
	}}
}

// grpcStepError makes a refusal that a retry cannot change permanent.
func grpcStepError(err error) error {
	switch status.Code(err) {
	case codes.OK:
		return nil
	case codes.InvalidArgument, codes.FailedPrecondition:
		return saga.Permanent(err)
	}
	return err
}

// payments calls the payments service through the SDK's data plane; a
// 4xx answer (declined, refunded, bad request) is permanent.
func (s *orders) payments(ctx context.Context, method, order string, body []byte) ([]byte, error) {
	req, err := http.NewRequestWithContext(ctx, method, "http://payments/charges/"+order, bytes.NewReader(body))
	if err != nil {
		return nil, saga.Permanent(err)
	}
	resp, err := s.http.Do(req)
	if err != nil {
		return nil, fmt.Errorf("payments: %w", err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(io.LimitReader(resp.Body, 4<<10))
	switch {
	case resp.StatusCode == http.StatusOK:
		return b, nil
	case resp.StatusCode >= 400 && resp.StatusCode < 500:
		return nil, saga.Permanent(fmt.Errorf("payments: %s: %s", resp.Status, bytes.TrimSpace(b)))
	}
	return nil, fmt.Errorf("payments: %s: %s", resp.Status, bytes.TrimSpace(b))
}

// around runs a participant call between the demo's pause points: with
// --saga-pauses, an order whose ID starts with "pause-before-STEP-" or
// "pause-after-STEP-" stops there (once per order, whichever orchestrator
// gets there first) until the process gets SIGCONT — for the tests that
// SIGKILL or SIGSTOP an orchestrator at each step boundary.
func (s *orders) around(ctx context.Context, order, step string, call func() ([]byte, error)) ([]byte, error) {
	s.pause(ctx, order, "before-"+step)
	out, err := call()
	if err == nil {
		s.pause(ctx, order, "after-"+step)
	}
	return out, err
}

// pause stops at boundary if the order asks for it (see around); the
// "recorded-STEP" boundaries come from the orchestrator's OnTransition.
func (s *orders) pause(ctx context.Context, order, boundary string) {
	if !s.sagaPauses || !strings.HasPrefix(order, "pause-"+boundary+"-") {
		return
	}
	if first, err := s.db.pauseOnce(ctx, order, boundary); err != nil || !first {
		return
	}
	cont := make(chan os.Signal, 1)
	signal.Notify(cont, syscall.SIGCONT)
	defer signal.Stop(cont)
	fmt.Printf("shop: saga %s paused at %s\n", order, boundary)
	select {
	case <-cont:
	case <-time.After(2 * time.Minute):
	}
	fmt.Printf("shop: saga %s goes on from %s\n", order, boundary)
}

// onTransition is the orchestrator's: the "recorded-STEP" pause points.
func (s *orders) onTransition(st saga.State) {
	if len(st.History) == 0 {
		return
	}
	switch last := st.History[len(st.History)-1]; last.What {
	case "done":
		s.pause(context.Background(), st.ID, "recorded-"+last.Step)
	case "compensated":
		s.pause(context.Background(), st.ID, "recorded-"+compensationOf[last.Step])
	}
}

// compensationOf names each step's compensation (the pause points').
var compensationOf = map[string]string{"reserve": "release", "charge": "refund", "confirm": "cancel"}
