// Package clock is the one time source of the daemon's parts: the
// reconciler, the HAProxy readiness, the SPOE agent, the agent-check
// responder, the API. Production code asks a Clock instead of package time,
// so that tests run the same code on a manual clock (clocktest) and nothing
// waits on the wall clock where a test means fake time.
//
// Network deadlines (net.Conn.SetDeadline) stay on the wall clock: the
// kernel enforces them, and a manual clock cannot move them. Waits on other
// processes (a stand-in builder writing its address, a SIGTERM's grace) use
// Real explicitly for the same reason: a manual clock cannot hurry them.
package clock

import (
	"context"
	"time"
)

// Clock tells the time and makes tickers and timers.
type Clock interface {
	Now() time.Time
	NewTicker(d time.Duration) Ticker
	NewTimer(d time.Duration) Timer
}

// Ticker is the part of time.Ticker the daemon uses.
type Ticker interface {
	C() <-chan time.Time
	Stop()
}

// Timer is the part of time.Timer the daemon uses.
type Timer interface {
	C() <-chan time.Time
	// Stop prevents the timer from firing; it reports whether it stopped
	// it (false: it had fired or was stopped already).
	Stop() bool
}

// Since is c.Now().Sub(t).
func Since(c Clock, t time.Time) time.Duration { return c.Now().Sub(t) }

// Sleep waits d on c, or until ctx ends (its error is returned then).
func Sleep(ctx context.Context, c Clock, d time.Duration) error {
	if d <= 0 {
		return ctx.Err()
	}
	t := c.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-t.C():
		return nil
	}
}

// Real is the wall clock.
type Real struct{}

func (Real) Now() time.Time                   { return time.Now() }
func (Real) NewTicker(d time.Duration) Ticker { return realTicker{time.NewTicker(d)} }
func (Real) NewTimer(d time.Duration) Timer   { return realTimer{time.NewTimer(d)} }

type realTicker struct{ t *time.Ticker }

func (t realTicker) C() <-chan time.Time { return t.t.C }
func (t realTicker) Stop()               { t.t.Stop() }

type realTimer struct{ t *time.Timer }

func (t realTimer) C() <-chan time.Time { return t.t.C }
func (t realTimer) Stop() bool          { return t.t.Stop() }
