// Package scalertest has test doubles for the scaler's injected parts.
package scalertest

import (
	"sync"
	"time"

	"guardianproject.dev/ops/nix-builder-autoscaler/scaler"
)

// Clock is a manual clock: time moves only when Advance is called, and
// tickers fire then, once per elapsed period at most (like time.Ticker,
// which drops ticks a slow reader missed).
type Clock struct {
	mu      sync.Mutex
	now     time.Time
	tickers []*ticker
}

// NewClock returns a clock stopped at start.
func NewClock(start time.Time) *Clock { return &Clock{now: start} }

func (c *Clock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.now
}

// Advance moves the clock forward by d and fires due tickers.
func (c *Clock) Advance(d time.Duration) {
	c.mu.Lock()
	c.now = c.now.Add(d)
	now := c.now
	ts := append([]*ticker(nil), c.tickers...)
	c.mu.Unlock()
	for _, t := range ts {
		t.fire(now)
	}
}

func (c *Clock) NewTicker(d time.Duration) scaler.Ticker {
	c.mu.Lock()
	defer c.mu.Unlock()
	t := &ticker{c: make(chan time.Time, 1), period: d, next: c.now.Add(d), clock: c}
	c.tickers = append(c.tickers, t)
	return t
}

type ticker struct {
	mu      sync.Mutex
	c       chan time.Time
	period  time.Duration
	next    time.Time
	stopped bool
	clock   *Clock
}

func (t *ticker) C() <-chan time.Time { return t.c }

func (t *ticker) Stop() {
	t.mu.Lock()
	t.stopped = true
	t.mu.Unlock()
}

func (t *ticker) fire(now time.Time) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.stopped || now.Before(t.next) {
		return
	}
	for !now.Before(t.next) {
		t.next = t.next.Add(t.period)
	}
	select {
	case t.c <- now:
	default:
	}
}
