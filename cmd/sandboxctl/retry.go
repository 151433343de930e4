package main

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"flag"
	"fmt"
	mathrand "math/rand/v2"
	"time"

	"connectrpc.com/connect"
)

// retryPolicy bounds the retries of calls that carry an idempotency key:
// attempts in all, waiting initial, then twice as long each time up to max,
// each wait shortened at random by up to a fifth so that clients cut off by
// the same leader change do not come back in step.
type retryPolicy struct {
	attempts int
	initial  time.Duration
	max      time.Duration
}

// defaultRetry rides out a leader election (1.3 to 2.4 s with Raft's
// default timeouts, as measured on the project's machines) with room to
// spare: 5 attempts, waits of 0.5, 1, 2 and 4 s, about 7.5 s in all.
var defaultRetry = retryPolicy{attempts: 5, initial: 500 * time.Millisecond, max: 4 * time.Second}

// retryPolicy is the app's policy: the default unless a test set another.
func (a *app) retryPolicy() retryPolicy {
	if a.retry.attempts > 0 {
		return a.retry
	}
	return defaultRetry
}

// newIdempotencyKey returns a fresh random key: 128 bits in hex.
func newIdempotencyKey() string {
	b := make([]byte, 16)
	_, _ = rand.Read(b) // crypto/rand.Read never fails; it crashes the program instead.
	return hex.EncodeToString(b)
}

// idempotencyKeyFlag registers --idempotency-key on fs. The returned string
// stays empty unless the flag was given; an empty value is refused.
func idempotencyKeyFlag(fs *flag.FlagSet, usage string) *string {
	key := new(string)
	fs.Func("idempotency-key", usage, func(s string) error {
		if s == "" {
			return errors.New("must not be empty")
		}
		*key = s
		return nil
	})
	return key
}

// retryable reports whether a call that failed with err may be sent again
// with the same idempotency key: when it failed in transport (no answer
// from a server: the connection broke, was refused or reset) or the server
// said unavailable (no leader, a leader change under way). Any other answer
// is final, and nothing is retried once ctx is done.
func retryable(ctx context.Context, err error) bool {
	if ctx.Err() != nil {
		return false
	}
	var ce *connect.Error
	if !errors.As(err, &ce) {
		return true
	}
	switch ce.Code() {
	case connect.CodeUnavailable:
		return true
	case connect.CodeInternal, connect.CodeUnknown:
		// connect-go makes these up itself for broken streams (an
		// RST_STREAM, an unexpected EOF); the same codes sent by a server
		// are its answer.
		return !connect.IsWireError(err)
	}
	return false
}

// withRetry runs call until it succeeds, fails in a way retryable rejects,
// or the policy's attempts are spent. call must send the same request,
// idempotency key included, every time: the server then creates its
// record once however many attempts reached it. Each retry is announced on
// stderr; what names the call there and in the final error.
func withRetry[T any](ctx context.Context, a *app, what string, call func(context.Context) (T, error)) (T, error) {
	p := a.retryPolicy()
	wait := p.initial
	for attempt := 1; ; attempt++ {
		res, err := call(ctx)
		if err == nil {
			return res, nil
		}
		if !retryable(ctx, err) {
			if attempt > 1 {
				err = fmt.Errorf("%s (attempt %d of %d): %w", what, attempt, p.attempts, err)
			}
			return res, err
		}
		if attempt >= p.attempts {
			return res, fmt.Errorf("%s: gave up after %d attempts: %w", what, attempt, err)
		}
		d := wait - time.Duration(mathrand.Int64N(int64(wait)/5+1))
		fmt.Fprintf(a.stderr, "sandboxctl: %s; retrying %s in %s (attempt %d of %d)\n",
			errorLine(err), what, d.Round(time.Millisecond), attempt+1, p.attempts)
		t := time.NewTimer(d)
		select {
		case <-ctx.Done():
			t.Stop()
			return res, fmt.Errorf("%s: %w", what, connect.NewError(connect.CodeCanceled, ctx.Err()))
		case <-t.C:
		}
		wait = min(2*wait, p.max)
	}
}
