package apiserver

import (
	"bytes"
	"context"
	"encoding/json"
	"guardianproject.dev/ops/nix-builder-autoscaler/clock"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"net/url"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"guardianproject.dev/ops/nix-builder-autoscaler/internal/api"
	"guardianproject.dev/ops/nix-builder-autoscaler/internal/config"
	"guardianproject.dev/ops/nix-builder-autoscaler/internal/store"
	"guardianproject.dev/ops/nix-builder-autoscaler/internal/testwait"
	"guardianproject.dev/ops/nix-builder-autoscaler/scaler"
)

// fuzzStore is the real SQLite store; it records whether any call failed,
// the only case in which the API may answer 500.
type fuzzStore struct {
	*store.DB
	failed atomic.Bool
}

func (s *fuzzStore) note(err error) error {
	if err != nil && !strings.Contains(err.Error(), scaler.ErrNotFound.Error()) {
		s.failed.Store(true)
	}
	return err
}

func (s *fuzzStore) CreateReservation(ctx context.Context, r scaler.Reservation, ev scaler.Event) (scaler.Reservation, bool, error) {
	got, created, err := s.DB.CreateReservation(ctx, r, ev)
	return got, created, s.note(err)
}

func (s *fuzzStore) Reservation(ctx context.Context, id string) (scaler.Reservation, error) {
	r, err := s.DB.Reservation(ctx, id)
	return r, s.note(err)
}

func (s *fuzzStore) Reservations(ctx context.Context, f store.ReservationFilter) ([]scaler.Reservation, error) {
	r, err := s.DB.Reservations(ctx, f)
	return r, s.note(err)
}

func (s *fuzzStore) LiveReservations(ctx context.Context) ([]scaler.Reservation, error) {
	r, err := s.DB.LiveReservations(ctx)
	return r, s.note(err)
}

func (s *fuzzStore) Slots(ctx context.Context) ([]scaler.Slot, error) {
	r, err := s.DB.Slots(ctx)
	return r, s.note(err)
}

func (s *fuzzStore) Slot(ctx context.Context, key scaler.SlotKey) (scaler.Slot, error) {
	r, err := s.DB.Slot(ctx, key)
	return r, s.note(err)
}

func (s *fuzzStore) Commit(ctx context.Context, c scaler.Change) error {
	return s.note(s.DB.Commit(ctx, c))
}

func (s *fuzzStore) LoggedEvents(ctx context.Context, f store.EventFilter) ([]store.LoggedEvent, error) {
	r, err := s.DB.LoggedEvents(ctx, f)
	return r, s.note(err)
}

func (s *fuzzStore) ForecastPage(ctx context.Context, limit int, after store.ListKey) ([]scaler.Forecast, error) {
	r, err := s.DB.ForecastPage(ctx, limit, after)
	return r, s.note(err)
}

// fuzzServer is an API over a fresh store with one pool of two slots, one
// pending reservation "r1" and a short max_poll so long polls end quickly.
func fuzzServer(tb testing.TB) (*Server, *fuzzStore) {
	tb.Helper()
	cfg, err := config.Parse([]byte(`
[reservations]
max_poll = "20ms"

[[pool]]
name = "x86"
systems = ["x86_64-linux"]
features = ["kvm", "big-parallel"]
max_builders = 2
provider = "local"
`))
	if err != nil {
		tb.Fatal(err)
	}
	ctx := context.Background()
	db, err := store.Open(ctx, tb.TempDir()+"/state.db")
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { db.Close() })
	now := time.Date(2026, 11, 26, 12, 0, 0, 0, time.UTC)
	if err := db.EnsureSlots(ctx, map[string]int{"x86": 2}, now); err != nil {
		tb.Fatal(err)
	}
	st := &fuzzStore{DB: db}
	sc := newTestScaler(tb, st, cfg.Pools, clock.Real{})
	s := New(Options{Store: st, Scaler: sc, Views: sc.Views(), Pools: cfg.Pools, Reservations: cfg.Reservations,
		Logger: slog.New(slog.DiscardHandler)})
	rec := httptest.NewRecorder()
	req := httptest.NewRequest(http.MethodPost, "/v1/reservations", strings.NewReader(`{"id":"r1","system":"x86_64-linux"}`))
	s.Handler().ServeHTTP(rec, req)
	if rec.Code != http.StatusCreated {
		tb.Fatalf("seed reservation: %d %s", rec.Code, rec.Body)
	}
	return s, st
}

// validMethod reports whether m is an HTTP token, as net/http's server
// requires before a handler sees the request.
func validMethod(m string) bool {
	if m == "" || len(m) > 16 {
		return false
	}
	for _, c := range []byte(m) {
		if c <= ' ' || c >= 0x7f || strings.IndexByte(`()<>@,;:\"/[]?={}`, c) >= 0 {
			return false
		}
	}
	return true
}

// Limits on fuzz inputs, so memory stays bounded.
const (
	fuzzMaxPath  = 2048
	fuzzMaxQuery = 2048
	fuzzMaxBody  = 2 * MaxBodyBytes
	// fuzzDeadline bounds one request: a hang guard, not a speed check
	// (long polls last max_poll, 20ms; any request answers long before).
	fuzzDeadline = testwait.Bound
)

// FuzzHandler drives the unauthenticated API with arbitrary methods,
// paths, queries and bodies: no panic, no 5xx unless the store failed, a
// JSON answer (with a JSON content type), and an answer in bounded time.
func FuzzHandler(f *testing.F) {
	for _, s := range []struct{ method, path, query, body string }{
		{"POST", "/v1/reservations", "", `{"id":"b1","system":"x86_64-linux","features":["kvm"],"owner":"ci","lease":"5m"}`},
		{"POST", "/v1/reservations", "", `{"system":"aarch64-linux"}`},
		{"POST", "/v1/reservations", "", `{"id":"r1","system":"x86_64-linux","pool":"x86"}`},
		{"POST", "/v1/reservations", "", `{"id":"b1","system":"x86_64-linux"}{}`},
		{"POST", "/v1/reservations", "", `{"id":"b1","system":"x86_64-linux","bogus":1}`},
		{"POST", "/v1/reservations", "", `{"lease":"-1s","system":"x86_64-linux"}`},
		{"POST", "/v1/reservations", "", `[`},
		{"GET", "/v1/reservations", "state=pending&pool=x86&limit=5", ""},
		{"GET", "/v1/reservations", "limit=-1", ""},
		{"GET", "/v1/reservations", "limit=1&cursor=cjoxNzY0MDAwMDAwMDAwMDAwMDAwOnIx", ""},
		{"GET", "/v1/events", "limit=1&cursor=ZToxMA", ""},
		{"GET", "/v1/forecasts", "limit=1&cursor=ZjoxOng", ""},
		{"GET", "/v1/reservations/r1", "wait=10s", ""},
		{"GET", "/v1/reservations/r1", "wait=-1s", ""},
		{"GET", "/v1/reservations/%2e%2e", "", ""},
		{"POST", "/v1/reservations/r1/heartbeat", "", `{"lease":"1m"}`},
		{"POST", "/v1/reservations/r1/heartbeat", "", ``},
		{"DELETE", "/v1/reservations/r1", "", ""},
		{"POST", "/v1/forecasts", "", `{"id":"e1","source":"github:o/r","system":"x86_64-linux","builds":3,"ttl":"20m"}`},
		{"POST", "/v1/forecasts", "", `{"id":"e2","source":"p","pool":"x86"}`},
		{"GET", "/v1/forecasts", "", ""},
		{"GET", "/v1/forecasts/e1", "", ""},
		{"DELETE", "/v1/forecasts/e1", "", ""},
		{"POST", "/v1/reservations", "", `{"id":"s1","system":"x86_64-linux","source":"p"}`},
		{"GET", "/v1/slots", "", ""},
		{"POST", "/v1/slots/x86/slot1/drain", "", `{"reason":"maint"}`},
		{"POST", "/v1/slots/x86/slot1/undrain", "", `{}`},
		{"POST", "/v1/slots/x86/slot1/weight", "", `{"weight":50}`},
		{"POST", "/v1/slots/x86/slot1/weight", "", `{"weight":300}`},
		{"POST", "/v1/slots/x86/../slot1/weight", "", `{"weight":null}`},
		{"GET", "/v1/status", "", ""},
		{"POST", "/v1/reconcile", "", ""},
		{"GET", "/v1/events", "since=2026-01-01T00:00:00Z&limit=3&pool=x86&slot=slot1&reservation=r1", ""},
		{"GET", "/v1/events", "since=yesterday", ""},
		{"GET", "/healthz", "", ""},
		{"PUT", "/v1/slots", "", ""},
		{"HEAD", "/v1/status", "", ""},
		{"OPTIONS", "/", "", ""},
		{"GET", "//v1//status/", "", ""},
		{"GET", "/v1/reservations/r1", "wait=1h&wait=0s;x", ""},
	} {
		f.Add(s.method, s.path, s.query, []byte(s.body))
	}
	srv, st := fuzzServer(f)
	h := srv.Handler()
	f.Fuzz(func(t *testing.T, method, path, query string, body []byte) {
		if !validMethod(method) || len(path) > fuzzMaxPath || len(query) > fuzzMaxQuery || len(body) > fuzzMaxBody {
			t.Skip()
		}
		if !strings.HasPrefix(path, "/") {
			path = "/" + path
		}
		u := &url.URL{Path: path, RawQuery: query}
		req := httptest.NewRequest(http.MethodGet, "/", nil)
		req.Method = method
		req.URL = u
		req.RequestURI = u.RequestURI()
		req.Body = io.NopCloser(bytes.NewReader(body))
		req.ContentLength = int64(len(body))
		req.Header.Set("Content-Type", "application/json")
		ctx, cancel := context.WithTimeout(context.Background(), fuzzDeadline)
		defer cancel()
		req = req.WithContext(ctx)

		st.failed.Store(false)
		rec := httptest.NewRecorder()
		done := make(chan struct{})
		go func() {
			defer close(done)
			h.ServeHTTP(rec, req)
		}()
		select {
		case <-done:
		case <-time.After(fuzzDeadline + time.Second):
			t.Fatalf("%s %s?%s: no answer within %s", method, path, query, fuzzDeadline)
		}
		code := rec.Code
		if code >= 500 && !(code == http.StatusInternalServerError && st.failed.Load()) {
			t.Fatalf("%s %q?%q body %q: status %d without a store error; answer %s", method, path, query, body, code, rec.Body)
		}
		if method == http.MethodHead {
			return
		}
		if ct := rec.Header().Get("Content-Type"); !strings.HasPrefix(ct, "application/json") {
			t.Fatalf("%s %q?%q body %q: status %d, Content-Type %q, want JSON; answer %q", method, path, query, body, code, ct, rec.Body)
		}
		if !json.Valid(rec.Body.Bytes()) {
			t.Fatalf("%s %q?%q body %q: status %d, answer is not JSON: %q", method, path, query, body, code, rec.Body)
		}
		if code >= 400 {
			var e api.Error
			if err := json.Unmarshal(rec.Body.Bytes(), &e); err != nil || e.Error == "" || e.Code == "" {
				t.Fatalf("%s %q?%q: status %d with an answer that is not an API error: %q", method, path, query, code, rec.Body)
			}
		}
	})
}
