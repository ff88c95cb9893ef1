package clocktest

import (
	"context"
	"testing"
	"time"

	"guardianproject.dev/ops/nix-builder-autoscaler/clock"
)

var t0 = time.Date(2026, 12, 1, 0, 0, 0, 0, time.UTC)

func fired(c <-chan time.Time) bool {
	select {
	case <-c:
		return true
	default:
		return false
	}
}

func TestTimer(t *testing.T) {
	c := New(t0)
	tm := c.NewTimer(time.Minute)
	c.Advance(59 * time.Second)
	if fired(tm.C()) {
		t.Fatal("timer fired before its time")
	}
	c.Advance(time.Second)
	if !fired(tm.C()) {
		t.Fatal("timer did not fire at its time")
	}
	c.Advance(time.Hour)
	if fired(tm.C()) {
		t.Fatal("timer fired twice")
	}
	if tm.Stop() {
		t.Error("Stop of a fired timer reported true")
	}

	stopped := c.NewTimer(time.Second)
	if !stopped.Stop() {
		t.Error("Stop of a pending timer reported false")
	}
	c.Advance(time.Minute)
	if fired(stopped.C()) {
		t.Error("a stopped timer fired")
	}
	if !fired(c.NewTimer(0).C()) {
		t.Error("a zero timer has not fired at once")
	}
}

func TestTicker(t *testing.T) {
	c := New(t0)
	tk := c.NewTicker(time.Second)
	c.Advance(500 * time.Millisecond)
	if fired(tk.C()) {
		t.Fatal("ticker fired early")
	}
	c.Advance(10 * time.Second) // many periods: one tick, as time.Ticker drops missed ones
	if !fired(tk.C()) || fired(tk.C()) {
		t.Fatal("want exactly one tick after many periods")
	}
	tk.Stop()
	c.Advance(time.Minute)
	if fired(tk.C()) {
		t.Error("a stopped ticker ticked")
	}
}

func TestSleep(t *testing.T) {
	c := New(t0)
	done := make(chan error, 1)
	go func() { done <- clock.Sleep(context.Background(), c, time.Minute) }()
	// Advance until the sleeper's timer exists and fires.
	for {
		select {
		case err := <-done:
			if err != nil {
				t.Fatal(err)
			}
			if got := c.Now().Sub(t0); got < time.Minute {
				t.Fatalf("Sleep(1m) returned after %v of clock time", got)
			}
			return
		default:
			c.Advance(time.Second)
			time.Sleep(time.Millisecond)
		}
	}
}

func TestSleepCancelled(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if err := clock.Sleep(ctx, New(t0), time.Hour); err != context.Canceled {
		t.Fatalf("Sleep with a cancelled context = %v", err)
	}
}
