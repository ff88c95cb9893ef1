package apiserver

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"net/http"
	"strconv"
	"sync"
	"time"

	"guardianproject.dev/ops/nix-builder-autoscaler/clock"
	"guardianproject.dev/ops/nix-builder-autoscaler/internal/api"
	"guardianproject.dev/ops/nix-builder-autoscaler/scaler"
)

// A write of a reservation commits only if the row is still the version
// it read (store.Commit); when the reconciler or another request changed it
// meanwhile, the write re-reads and re-decides. Two things keep that from
// failing under load:
//
//   - the API's own writes of one reservation take turns (idLocks), so
//     concurrent heartbeats or releases of one id queue instead of
//     invalidating each other's reads: only the reconciler can conflict;
//   - a conflict is retried after a jittered, growing pause, within a total
//     time budget (measured on the server's clock), so a retry does not
//     meet the same writer again at once. Past the budget the request is
//     answered 503 with CodeBusy and Retry-After: a conflict is never a 500.
const (
	conflictBudget     = 3 * time.Second
	conflictBackoffMin = 2 * time.Millisecond
	conflictBackoffMax = 200 * time.Millisecond
	// busyRetryAfter is the Retry-After, in seconds, of a CodeBusy answer.
	busyRetryAfter = 1
)

// errBusy wraps scaler.ErrConflict when the retry budget ran out.
var errBusy = errors.New("reservation changed concurrently too often")

// retryConflict runs attempt until it returns an error that does not wrap
// scaler.ErrConflict, pausing between attempts; when conflictBudget has
// passed it returns an error wrapping errBusy and scaler.ErrConflict.
func (s *Server) retryConflict(ctx context.Context, attempt func() error) error {
	start := s.o.Clock.Now()
	backoff := conflictBackoffMin
	for try := 0; ; try++ {
		err := attempt()
		if !errors.Is(err, scaler.ErrConflict) {
			return err
		}
		if clock.Since(s.o.Clock, start) >= conflictBudget {
			return fmt.Errorf("%w after %d attempts in %s: %w", errBusy, try+1, conflictBudget, err)
		}
		if try == 0 {
			continue // one immediate retry: a single race with a round is common
		}
		// Full jitter in [backoff/2, backoff): requests that conflicted
		// together do not retry together.
		pause := backoff/2 + rand.N(backoff/2)
		if err := clock.Sleep(ctx, s.o.Clock, pause); err != nil {
			return err
		}
		backoff = min(2*backoff, conflictBackoffMax)
	}
}

// writeBusy answers a write whose conflict budget ran out.
func writeBusy(w http.ResponseWriter, what string, err error) {
	w.Header().Set("Retry-After", strconv.Itoa(busyRetryAfter))
	writeError(w, http.StatusServiceUnavailable, api.CodeBusy, what+": "+err.Error()+"; retry")
}

// idLocks serializes the API's writes per reservation id.
type idLocks struct {
	mu sync.Mutex
	m  map[string]*idLock
}

type idLock struct {
	sync.Mutex
	users int // holders and waiters; the entry goes when it drops to 0
}

// lock takes id's lock and returns its unlock.
func (l *idLocks) lock(id string) (unlock func()) {
	l.mu.Lock()
	if l.m == nil {
		l.m = map[string]*idLock{}
	}
	e := l.m[id]
	if e == nil {
		e = &idLock{}
		l.m[id] = e
	}
	e.users++
	l.mu.Unlock()
	e.Lock()
	return func() {
		e.Unlock()
		l.mu.Lock()
		if e.users--; e.users == 0 {
			delete(l.m, id)
		}
		l.mu.Unlock()
	}
}
