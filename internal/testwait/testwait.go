// Package testwait waits, in tests, for a condition that some other
// process or goroutine makes true. The bound is a hang guard for a truly
// stuck test, never a statement about speed: these tests run on shared,
// noisy machines where a step that takes 50 ms alone can take 20 s while
// other packages build and test on the same cores. Tests check behaviour,
// benchmarks report speed.
package testwait

import (
	"testing"
	"time"
)

// Bound is how long Until waits before it fails the test. Generous on
// purpose: only a hang reaches it.
const Bound = 2 * time.Minute

// Until polls cond until it holds, and fails the test (Fatal) when it still
// does not after Bound. what names the condition in that failure.
func Until(tb testing.TB, what string, cond func() bool) {
	tb.Helper()
	if !Poll(Bound, cond) {
		tb.Fatalf("still waiting for %s after %v: stuck", what, Bound)
	}
}

// Poll polls cond until it holds or bound passes, and reports whether it
// held. Polling starts fast and backs off to 100 ms, so a quick condition is
// seen quickly and a slow one costs little CPU.
func Poll(bound time.Duration, cond func() bool) bool {
	deadline := time.Now().Add(bound)
	pause := time.Millisecond
	for {
		if cond() {
			return true
		}
		if time.Now().After(deadline) {
			return false
		}
		time.Sleep(pause)
		pause = min(2*pause, 100*time.Millisecond)
	}
}
