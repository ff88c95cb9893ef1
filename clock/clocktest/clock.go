// Package clocktest has the manual clock every test of the module uses.
package clocktest

import (
	"sync"
	"time"

	"guardianproject.dev/ops/nix-builder-autoscaler/clock"
)

// Clock is a manual clock: time moves only when Advance or Set is called.
// Tickers then fire once per elapsed period at most (like time.Ticker, which
// drops ticks a slow reader missed) and due timers fire once.
type Clock struct {
	mu      sync.Mutex
	now     time.Time
	tickers []*ticker
	timers  []*timer
}

var _ clock.Clock = (*Clock)(nil)

// New returns a clock stopped at start.
func New(start time.Time) *Clock { return &Clock{now: start} }

func (c *Clock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.now
}

// Advance moves the clock forward by d and fires what is due.
func (c *Clock) Advance(d time.Duration) {
	c.mu.Lock()
	c.now = c.now.Add(d)
	c.mu.Unlock()
	c.fire()
}

// Set moves the clock to t (never backwards) and fires what is due.
func (c *Clock) Set(t time.Time) {
	c.mu.Lock()
	if t.After(c.now) {
		c.now = t
	}
	c.mu.Unlock()
	c.fire()
}

func (c *Clock) fire() {
	c.mu.Lock()
	now := c.now
	ts := append([]*ticker(nil), c.tickers...)
	var due []*timer
	keep := c.timers[:0]
	for _, t := range c.timers {
		if t.stopped {
			continue
		}
		if !now.Before(t.at) {
			t.stopped = true
			due = append(due, t)
			continue
		}
		keep = append(keep, t)
	}
	c.timers = keep
	c.mu.Unlock()
	for _, t := range ts {
		t.fire(now)
	}
	for _, t := range due {
		t.c <- now // buffered, fires once
	}
}

func (c *Clock) NewTicker(d time.Duration) clock.Ticker {
	c.mu.Lock()
	defer c.mu.Unlock()
	t := &ticker{c: make(chan time.Time, 1), period: d, next: c.now.Add(d)}
	c.tickers = append(c.tickers, t)
	return t
}

// NewTimer returns a timer that fires when the clock reaches now+d; with
// d <= 0 it has fired already.
func (c *Clock) NewTimer(d time.Duration) clock.Timer {
	c.mu.Lock()
	defer c.mu.Unlock()
	t := &timer{c: make(chan time.Time, 1), at: c.now.Add(d), clock: c}
	if d <= 0 {
		t.stopped = true
		t.c <- c.now
		return t
	}
	c.timers = append(c.timers, t)
	return t
}

type ticker struct {
	mu      sync.Mutex
	c       chan time.Time
	period  time.Duration
	next    time.Time
	stopped bool
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

type timer struct {
	c       chan time.Time
	at      time.Time
	stopped bool // guarded by clock.mu
	clock   *Clock
}

func (t *timer) C() <-chan time.Time { return t.c }

func (t *timer) Stop() bool {
	t.clock.mu.Lock()
	defer t.clock.mu.Unlock()
	was := !t.stopped
	t.stopped = true
	return was
}
