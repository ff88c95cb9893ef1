package apiserver

import (
	"bytes"
	"context"
	"fmt"
	"log/slog"
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"

	"guardianproject.dev/ops/nix-builder-autoscaler/internal/api"
	"guardianproject.dev/ops/nix-builder-autoscaler/internal/store"
	"guardianproject.dev/ops/nix-builder-autoscaler/scaler"
)

// syncBuffer is a log destination for concurrent handlers.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// concurrently runs n requests at once and returns their answers.
func (ts *testServer) concurrently(n int, method, path string) []answer {
	out := make([]answer, n)
	var wg sync.WaitGroup
	start := make(chan struct{})
	for i := range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			<-start
			out[i] = ts.do(method, path, "")
		}()
	}
	close(start)
	wg.Wait()
	return out
}

// TestConcurrentHeartbeatsNeverFail: 300 heartbeats of one reservation at
// once all succeed (they used to conflict with each other, and 66 of 300
// answered 500 "changed since read").
func TestConcurrentHeartbeatsNeverFail(t *testing.T) {
	ts := newTestServer(t)
	ts.createReservation(`{"id":"hb","system":"x86_64-linux"}`)
	for i, a := range ts.concurrently(300, "POST", "/v1/reservations/hb/heartbeat") {
		if a.status != http.StatusOK {
			t.Errorf("heartbeat %d: %d %s", i, a.status, a.body)
		}
	}
}

// conflictingStore fails every commit as if another writer had changed
// the row since it was read.
type conflictingStore struct{ Store }

func (conflictingStore) Commit(context.Context, scaler.Change) error {
	return fmt.Errorf("commit: reservation at version 1: changed since read: %w", scaler.ErrConflict)
}

// TestConflictBudgetIsBusyNot500: a write that keeps conflicting backs off
// on the server's clock and, when its budget is spent, answers 503 busy
// with Retry-After, never 500.
func TestConflictBudgetIsBusyNot500(t *testing.T) {
	ts := newTestServer(t)
	ts.createReservation(`{"id":"c1","system":"x86_64-linux"}`)
	ts.srv.o.Store = conflictingStore{ts.srv.o.Store}
	for _, c := range []struct{ method, path string }{{"POST", "/v1/reservations/c1/heartbeat"}, {"DELETE", "/v1/reservations/c1"}} {
		done := make(chan answer, 1)
		go func() { done <- ts.do(c.method, c.path, "") }()
		var a answer
		advanced := time.Duration(0)
	wait:
		for {
			select {
			case a = <-done:
				break wait
			case <-time.After(time.Millisecond):
				// The retry pauses on the server's (manual) clock.
				ts.clock.Advance(10 * time.Millisecond)
				advanced += 10 * time.Millisecond
			}
		}
		wantError(t, a, http.StatusServiceUnavailable, api.CodeBusy, "changed concurrently")
		if a.header.Get("Retry-After") == "" {
			t.Errorf("%s %s: 503 busy without Retry-After", c.method, c.path)
		}
		if advanced < conflictBudget {
			t.Errorf("%s %s: gave up after %s of the server's clock, before its budget %s", c.method, c.path, advanced, conflictBudget)
		}
	}
}

// TestConcurrentReleaseLogsOnce: of concurrent DELETEs of one reservation,
// only the one that released it logs and records the release.
func TestConcurrentReleaseLogsOnce(t *testing.T) {
	var logs syncBuffer
	ts := newTestServer(t, func(o *Options) { o.Logger = slog.New(slog.NewTextHandler(&logs, nil)) })
	for i := range 10 {
		id := fmt.Sprintf("rel%d", i)
		ts.createReservation(`{"id":"` + id + `","system":"x86_64-linux"}`)
		for _, a := range ts.concurrently(5, "DELETE", "/v1/reservations/"+id) {
			if got := wantReservation(t, a, http.StatusOK); got.State != "released" {
				t.Fatalf("DELETE %s: state %s", id, got.State)
			}
		}
		if n := strings.Count(logs.String(), `msg="reservation released" reservation=`+id+" "); n != 1 {
			t.Errorf("%s: released once by 5 DELETEs, logged %d times:\n%s", id, n, logs.String())
		}
		var released int
		for _, ev := range ts.events(store.EventFilter{ReservationID: id}) {
			if ev.Kind == scaler.EvReleased {
				released++
			}
		}
		if released != 1 {
			t.Errorf("%s: %d release events, want 1", id, released)
		}
	}
}

// TestLeaseMinimum: a lease shorter than MinLease is refused, naming the
// field and the bound.
func TestLeaseMinimum(t *testing.T) {
	ts := newTestServer(t)
	for _, l := range []string{"1ns", "999ms", "-1s", "0s"} {
		wantError(t, ts.do("POST", "/v1/reservations", `{"system":"x86_64-linux","lease":"`+l+`"}`), http.StatusBadRequest, api.CodeBadRequest,
			"shorter than the minimum "+MinLease.String())
	}
	if a := ts.do("POST", "/v1/reservations", `{"system":"x86_64-linux","lease":"`+MinLease.String()+`"}`); a.status != http.StatusCreated {
		t.Errorf("lease of exactly %s: %d %s, want 201", MinLease, a.status, a.body)
	}
}

// TestCreateCaps: lists and strings of a create are bounded; the error
// names the field and the limit and does not repeat a huge value.
func TestCreateCaps(t *testing.T) {
	ts := newTestServer(t)
	many := make([]string, 5000)
	for i := range many {
		many[i] = fmt.Sprintf(`"f%d"`, i)
	}
	manyFeatures := "[" + strings.Join(many, ",") + "]"
	long := func(n int) string { return strings.Repeat("a", n) }
	for _, c := range []struct{ name, path, body, msg string }{
		{"5000 features", "/v1/reservations", `{"system":"x86_64-linux","features":` + manyFeatures + `}`, "features: more than 32 (5000 given)"},
		{"33 features", "/v1/reservations", `{"system":"x86_64-linux","features":` + "[" + strings.Join(many[:33], ",") + "]" + `}`, "features: more than 32"},
		{"long feature", "/v1/reservations", `{"system":"x86_64-linux","features":["` + long(65) + `"]}`, "longer than 64 bytes (65 given)"},
		{"long owner", "/v1/reservations", `{"system":"x86_64-linux","owner":"` + long(513) + `"}`, "owner: longer than 512 bytes (513 given)"},
		{"control in owner", "/v1/reservations", `{"system":"x86_64-linux","owner":"a\u001b[2Jb"}`, "owner: must be UTF-8 text without control characters"},
		{"long source", "/v1/reservations", `{"system":"x86_64-linux","source":"` + long(257) + `"}`, "source: longer than 256 bytes (257 given)"},
		{"long system", "/v1/reservations", `{"system":"x86_64-` + long(60) + `"}`, "system: longer than 64 bytes"},
		{"long id", "/v1/reservations", `{"id":"` + long(129) + `","system":"x86_64-linux"}`, "id: must be 1-128 characters"},
		{"forecast: 5000 features", "/v1/forecasts", `{"id":"f","source":"s","system":"x86_64-linux","features":` + manyFeatures + `}`, "features: more than 32 (5000 given)"},
		{"forecast: long feature", "/v1/forecasts", `{"id":"f","source":"s","system":"x86_64-linux","features":["` + long(65) + `"]}`, "longer than 64 bytes"},
		{"forecast: long id", "/v1/forecasts", `{"id":"` + long(129) + `","source":"s","system":"x86_64-linux"}`, "id: required, 1-128 characters"},
	} {
		a := ts.do("POST", c.path, c.body)
		wantError(t, a, http.StatusBadRequest, api.CodeBadRequest, c.msg)
		if len(a.body) > 1024 {
			t.Errorf("%s: a %d-byte error answer; it should not repeat the value", c.name, len(a.body))
		}
	}
	// At the bounds: accepted.
	feats := make([]string, 32)
	for i := range feats {
		feats[i] = fmt.Sprintf(`"f%02d%s"`, i, long(60))
	}
	a := ts.do("POST", "/v1/reservations", `{"system":"x86_64-linux","owner":"`+long(512)+`","source":"`+long(256)+`","features":[`+strings.Join(feats, ",")+`]}`)
	if got := wantReservation(t, a, http.StatusCreated); got.State != "failed" || len(got.Reason) > maxReason {
		t.Errorf("create at the bounds: state %s, reason of %d bytes (at most %d)", got.State, len(got.Reason), maxReason)
	}
}
