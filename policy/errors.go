package policy

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"syscall"
)

// Errors the policies return; callers test them with errors.Is.
var (
	// ErrOpen: the circuit breaker is open (or half-open with every probe
	// taken); the call was not made. Try later or fall back.
	ErrOpen = errors.New("policy: circuit breaker is open")
	// ErrBulkheadFull: too many calls in flight; the call was not made.
	ErrBulkheadFull = errors.New("policy: bulkhead full")
	// ErrRateLimited: the rate limit is spent; the call was not made.
	ErrRateLimited = errors.New("policy: rate limit exceeded")
	// ErrRetriesExhausted: every allowed attempt failed; the RetryError
	// carrying it unwraps to the last attempt's error.
	ErrRetriesExhausted = errors.New("policy: retries exhausted")
)

// RetryError reports why retrying stopped.
type RetryError struct {
	Attempts int
	// Reason: "max attempts", "retry budget", "deadline" or "not retryable".
	Reason string
	Last   error
}

func (e *RetryError) Error() string {
	return fmt.Sprintf("policy: gave up after %d attempts (%s): %v", e.Attempts, e.Reason, e.Last)
}

// Unwrap returns the last attempt's error.
func (e *RetryError) Unwrap() error { return e.Last }

// Is matches ErrRetriesExhausted.
func (e *RetryError) Is(target error) bool { return target == ErrRetriesExhausted }

type mark uint8

const (
	markRetryable mark = 1 << iota
	markPermanent
	markUnsent
)

type marked struct {
	err  error
	mark mark
}

func (m *marked) Error() string { return m.err.Error() }
func (m *marked) Unwrap() error { return m.err }

// Retryable marks err as worth retrying.
func Retryable(err error) error { return &marked{err, markRetryable} }

// Permanent marks err as never worth retrying.
func Permanent(err error) error { return &marked{err, markPermanent} }

// Unsent marks err as having happened before the request reached the
// server, so even a non-idempotent call may be retried.
func Unsent(err error) error { return &marked{err, markUnsent | markRetryable} }

func hasMark(err error, m mark) bool {
	var mk *marked
	for err != nil {
		if !errors.As(err, &mk) {
			return false
		}
		if mk.mark&m != 0 {
			return true
		}
		err = mk.err
	}
	return false
}

// IsUnsent reports whether err happened before the request was sent:
// marked Unsent, or a refused connection.
func IsUnsent(err error) bool {
	return hasMark(err, markUnsent) || errors.Is(err, syscall.ECONNREFUSED)
}

// IsRetryable is the default retry classification: errors marked Retryable
// or Unsent, refused or reset connections, unexpected EOFs and network
// timeouts. Errors marked Permanent, the policies' own rejections and
// context cancellation are not.
func IsRetryable(err error) bool {
	switch {
	case err == nil, hasMark(err, markPermanent):
		return false
	case hasMark(err, markRetryable):
		return true
	case errors.Is(err, ErrOpen), errors.Is(err, ErrBulkheadFull), errors.Is(err, ErrRateLimited),
		errors.Is(err, context.Canceled):
		return false
	case errors.Is(err, syscall.ECONNREFUSED), errors.Is(err, syscall.ECONNRESET),
		errors.Is(err, io.ErrUnexpectedEOF), errors.Is(err, context.DeadlineExceeded):
		return true
	}
	var ne net.Error
	return errors.As(err, &ne) && ne.Timeout()
}

// IsRejection reports whether err is a policy refusing to make the call.
func IsRejection(err error) bool {
	return errors.Is(err, ErrOpen) || errors.Is(err, ErrBulkheadFull) || errors.Is(err, ErrRateLimited)
}

func errorsIsCanceled(err error) bool { return errors.Is(err, context.Canceled) }
