package apiserver

import (
	"context"
	"encoding/json"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"path/filepath"
	"reflect"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"guardianproject.dev/ops/nix-builder-autoscaler/clock/clocktest"
	"guardianproject.dev/ops/nix-builder-autoscaler/internal/api"
	"guardianproject.dev/ops/nix-builder-autoscaler/internal/config"
	"guardianproject.dev/ops/nix-builder-autoscaler/internal/store"
	"guardianproject.dev/ops/nix-builder-autoscaler/internal/testwait"
	"guardianproject.dev/ops/nix-builder-autoscaler/scaler"
)

var serverT0 = time.Date(2026, 11, 26, 12, 0, 0, 0, time.UTC)

// watchedStore is the real store; it also tells when a read of a chosen
// reservation has completed, so a test can change the reservation while a
// long poll is known to be waiting, and it can hold reads back until the
// test has made a change.
type watchedStore struct {
	*store.DB
	mu    sync.Mutex
	reads map[string]chan struct{}
	holds map[string]*readHold
}

// readHold lets pass reads of a reservation through, then blocks the
// following ones until gate is closed.
type readHold struct {
	pass int
	gate chan struct{}
}

func (s *watchedStore) Reservation(ctx context.Context, id string) (scaler.Reservation, error) {
	s.mu.Lock()
	var gate chan struct{}
	if h := s.holds[id]; h != nil {
		if h.pass > 0 {
			h.pass--
		} else {
			gate = h.gate
		}
	}
	s.mu.Unlock()
	if gate != nil {
		select {
		case <-gate:
		case <-ctx.Done():
			return scaler.Reservation{}, ctx.Err()
		}
	}
	r, err := s.DB.Reservation(ctx, id)
	s.mu.Lock()
	if ch, ok := s.reads[id]; ok {
		delete(s.reads, id)
		close(ch)
	}
	s.mu.Unlock()
	return r, err
}

// readOf returns a channel closed after the next read of reservation id.
func (s *watchedStore) readOf(id string) <-chan struct{} {
	s.mu.Lock()
	defer s.mu.Unlock()
	ch := make(chan struct{})
	s.reads[id] = ch
	return ch
}

// holdAfter lets the next pass reads of reservation id through and holds
// every later one until release is called (release is idempotent and also
// runs when the test ends).
func (s *watchedStore) holdAfter(t *testing.T, id string, pass int) (release func()) {
	s.mu.Lock()
	defer s.mu.Unlock()
	h := &readHold{pass: pass, gate: make(chan struct{})}
	s.holds[id] = h
	var once sync.Once
	release = func() { once.Do(func() { close(h.gate) }) }
	t.Cleanup(release)
	return release
}

type testServer struct {
	t     *testing.T
	db    *store.DB
	st    *watchedStore
	kicks *testScaler
	clock *clocktest.Clock
	srv   *Server
	url   string
}

// testPools are two pools: x86 (with kvm and big-parallel) and arm.
func testPools() []config.Pool {
	x86 := config.DefaultPool()
	x86.Name, x86.Systems, x86.Features, x86.MaxBuilders, x86.Provider = "x86", []string{"x86_64-linux"}, []string{"big-parallel", "kvm"}, 2, config.ProviderLocal
	arm := config.DefaultPool()
	arm.Name, arm.Systems, arm.MaxBuilders, arm.Provider = "arm", []string{"aarch64-linux"}, 1, config.ProviderLocal
	return []config.Pool{x86, arm}
}

// newTestServer serves a Server over the real store in a temporary
// directory, with the default [reservations] (lease 10m, max_lease 24h,
// max_poll 60s), a manual clock at serverT0 and the slots of testPools.
// opts change the server's Options before it starts.
func newTestServer(t *testing.T, opts ...func(*Options)) *testServer {
	t.Helper()
	ctx := context.Background()
	db, err := store.Open(ctx, filepath.Join(t.TempDir(), "state.db"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { db.Close() })
	pools := testPools()
	sizes := map[string]int{}
	for _, p := range pools {
		sizes[p.Name] = p.MaxBuilders
	}
	if err := db.EnsureSlots(ctx, sizes, serverT0); err != nil {
		t.Fatal(err)
	}
	ts := &testServer{t: t, db: db, st: &watchedStore{DB: db, reads: map[string]chan struct{}{}, holds: map[string]*readHold{}},
		clock: clocktest.New(serverT0)}
	ts.kicks = newTestScaler(t, ts.st, pools, ts.clock)
	o := Options{Store: ts.st, Scaler: ts.kicks, Views: ts.kicks.Views(), Pools: pools, Reservations: config.Default().Reservations,
		Clock: ts.clock, Logger: slog.New(slog.NewTextHandler(io.Discard, nil))}
	for _, opt := range opts {
		opt(&o)
	}
	ts.srv = New(o)
	hs := httptest.NewServer(ts.srv.Handler())
	t.Cleanup(hs.Close)
	ts.url = hs.URL
	return ts
}

type answer struct {
	status int
	header http.Header
	body   []byte
}

// do sends one request; body "" sends an empty body.
func (ts *testServer) do(method, path, body string) answer {
	ts.t.Helper()
	return doRequest(ts.t, method, ts.url+path, body, nil)
}

func doRequest(t *testing.T, method, url, body string, header http.Header) answer {
	t.Helper()
	req, err := http.NewRequest(method, url, strings.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	for k, vs := range header {
		req.Header[k] = vs
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatalf("%s %s: %v", method, url, err)
	}
	defer resp.Body.Close()
	data, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatalf("%s %s: read answer: %v", method, url, err)
	}
	return answer{status: resp.StatusCode, header: resp.Header, body: data}
}

// withMaxPoll sets [reservations] max_poll, so a test can long-poll for
// longer than the default 60s.
func withMaxPoll(d time.Duration) func(*Options) {
	return func(o *Options) { o.Reservations.MaxPoll = config.NewDuration(d) }
}

// polled is the outcome of a request sent in the background.
type polled struct {
	answer
	err error
}

// poll sends GET path in the background and delivers its answer, or the
// error that ended it, on the returned channel. The request gives up after
// testwait.Bound: a hang guard, far longer than any step of a working test
// and far shorter than the long waits the tests ask for.
func (ts *testServer) poll(path string) <-chan polled {
	ch := make(chan polled, 1)
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), testwait.Bound)
		defer cancel()
		req, err := http.NewRequestWithContext(ctx, "GET", ts.url+path, nil)
		if err != nil {
			ch <- polled{err: err}
			return
		}
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			ch <- polled{err: err}
			return
		}
		defer resp.Body.Close()
		data, err := io.ReadAll(resp.Body)
		ch <- polled{answer: answer{status: resp.StatusCode, header: resp.Header, body: data}, err: err}
	}()
	return ch
}

// decodeStrict decodes a JSON answer, failing on fields T does not have.
func decodeStrict[T any](t *testing.T, a answer) T {
	t.Helper()
	var v T
	dec := json.NewDecoder(strings.NewReader(string(a.body)))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&v); err != nil {
		t.Fatalf("decode answer %q as %T: %v", a.body, v, err)
	}
	if ct := a.header.Get("Content-Type"); ct != "application/json" {
		t.Errorf("Content-Type = %q, want application/json", ct)
	}
	return v
}

// wantReservation checks status and decodes a reservation answer.
func wantReservation(t *testing.T, a answer, status int) api.Reservation {
	t.Helper()
	if a.status != status {
		t.Fatalf("status = %d, want %d; body %s", a.status, status, a.body)
	}
	return decodeStrict[api.Reservation](t, a)
}

// wantError checks that a is an error answer: the status, and a JSON body
// of exactly {"error", "code"} whose message contains msg.
func wantError(t *testing.T, a answer, status int, code, msg string) {
	t.Helper()
	if a.status != status {
		t.Fatalf("status = %d, want %d (code %s, message containing %q); body %.300s", a.status, status, code, msg, a.body)
	}
	var body map[string]any
	if err := json.Unmarshal(a.body, &body); err != nil {
		t.Fatalf("error body %q is not a JSON object: %v", a.body, err)
	}
	var keys []string
	for k := range body {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	if want := []string{"code", "error"}; !slices.Equal(keys, want) {
		t.Errorf("error body keys = %v, want %v; body %s", keys, want, a.body)
	}
	if got, _ := body["code"].(string); got != code {
		t.Errorf("code = %q, want %q; body %s", got, code, a.body)
	}
	if got, _ := body["error"].(string); !strings.Contains(got, msg) {
		t.Errorf("error = %q, want it to contain %q", got, msg)
	}
	if ct := a.header.Get("Content-Type"); ct != "application/json" {
		t.Errorf("Content-Type = %q, want application/json", ct)
	}
}

// setSlot puts a builder into slot name of pool x86 in state st.
func (ts *testServer) setSlot(name string, st scaler.SlotState) {
	ts.t.Helper()
	ctx := context.Background()
	sl, err := ts.db.Slot(ctx, scaler.SlotKey{Pool: "x86", Slot: name})
	if err != nil {
		ts.t.Fatal(err)
	}
	sl.State, sl.StateSince = st, ts.clock.Now()
	if st != scaler.Empty {
		sl.InstanceID, sl.Address = "i-"+name, "127.0.0.1:2222"
	}
	if err := ts.db.Commit(ctx, scaler.Change{Slots: []scaler.Slot{sl}}); err != nil {
		ts.t.Fatal(err)
	}
}

func (ts *testServer) stored(id string) scaler.Reservation {
	ts.t.Helper()
	r, err := ts.db.Reservation(context.Background(), id)
	if err != nil {
		ts.t.Fatal(err)
	}
	return r
}

func (ts *testServer) events(f store.EventFilter) []scaler.Event {
	ts.t.Helper()
	evs, err := ts.db.Events(context.Background(), f)
	if err != nil {
		ts.t.Fatal(err)
	}
	return evs
}

func TestCreateIsIdempotentOnClientID(t *testing.T) {
	ts := newTestServer(t)
	const body = `{"id": "build-1", "system": "x86_64-linux", "features": ["kvm", "big-parallel"], "owner": "proj/nix-build#42", "lease": "15m"}`

	first := wantReservation(t, ts.do("POST", "/v1/reservations", body), http.StatusCreated)
	want := api.Reservation{ID: "build-1", Pool: "x86", System: "x86_64-linux", Features: []string{"big-parallel", "kvm"},
		Owner: "proj/nix-build#42", State: "pending", Lease: "15m0s", CreatedAt: serverT0, ExpiresAt: serverT0.Add(15 * time.Minute)}
	if !reflect.DeepEqual(first, want) {
		t.Errorf("first create = %+v\nwant %+v", first, want)
	}
	if got := ts.kicks.count(); got != 1 {
		t.Errorf("kicks after create = %d, want 1", got)
	}

	tests := []struct {
		name string
		body string
	}{
		{"same request", body},
		{"features in another order, repeated", `{"id": "build-1", "system": "x86_64-linux", "features": ["big-parallel", "kvm", "kvm"], "owner": "proj/nix-build#42", "lease": "15m"}`},
		{"same pool named explicitly", `{"id": "build-1", "pool": "x86", "system": "x86_64-linux", "features": ["kvm", "big-parallel"]}`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got := wantReservation(t, ts.do("POST", "/v1/reservations", tt.body), http.StatusOK)
			if !reflect.DeepEqual(got, first) {
				t.Errorf("repeated create = %+v\nwant the first answer %+v", got, first)
			}
		})
	}

	conflicts := []struct {
		name string
		body string
	}{
		{"other system", `{"id": "build-1", "system": "aarch64-linux"}`},
		{"other features", `{"id": "build-1", "system": "x86_64-linux", "features": ["kvm"]}`},
	}
	for _, tt := range conflicts {
		t.Run(tt.name, func(t *testing.T) {
			wantError(t, ts.do("POST", "/v1/reservations", tt.body), http.StatusConflict, api.CodeConflict, "build-1")
		})
	}

	// Only the first create stored anything.
	list, err := ts.db.Reservations(context.Background(), store.ReservationFilter{})
	if err != nil {
		t.Fatal(err)
	}
	if len(list) != 1 || list[0].System != "x86_64-linux" || list[0].Version != 1 {
		t.Errorf("stored reservations = %+v, want only build-1 as first created", list)
	}
	if evs := ts.events(store.EventFilter{ReservationID: "build-1"}); len(evs) != 1 || evs[0].Kind != scaler.EvCreated {
		t.Errorf("events of build-1 = %+v, want one %q", evs, scaler.EvCreated)
	}
}

func TestCreateWithoutIDGeneratesOne(t *testing.T) {
	ts := newTestServer(t)
	const body = `{"system": "x86_64-linux"}`
	a := wantReservation(t, ts.do("POST", "/v1/reservations", body), http.StatusCreated)
	b := wantReservation(t, ts.do("POST", "/v1/reservations", body), http.StatusCreated)
	if a.ID == "" || b.ID == "" || a.ID == b.ID {
		t.Fatalf("generated ids %q and %q; want two distinct non-empty ids", a.ID, b.ID)
	}
	if a.State != "pending" || a.Lease != "10m0s" || !a.ExpiresAt.Equal(serverT0.Add(10*time.Minute)) {
		t.Errorf("reservation = %+v; want pending with the default lease of 10m", a)
	}
	got := wantReservation(t, ts.do("GET", "/v1/reservations/"+a.ID, ""), http.StatusOK)
	if got.ID != a.ID || got.State != "pending" {
		t.Errorf("GET %s = %+v", a.ID, got)
	}
	if k := ts.kicks.count(); k != 2 {
		t.Errorf("kicks = %d, want 2 (one per create)", k)
	}
}

func TestCreateValidation(t *testing.T) {
	ts := newTestServer(t)
	tests := []struct {
		name   string
		body   string
		status int
		code   string
		msg    string // the message must contain this (the field it is about)
	}{
		{"malformed JSON", `{"system": "x86_64-linux"`, 400, api.CodeBadRequest, "invalid JSON body"},
		{"not an object", `"x86_64-linux"`, 400, api.CodeBadRequest, "invalid JSON body"},
		{"unknown field", `{"system": "x86_64-linux", "colour": "blue"}`, 400, api.CodeBadRequest, `"colour"`},
		{"wrong type", `{"system": "x86_64-linux", "features": "kvm"}`, 400, api.CodeBadRequest, "features"},
		{"trailing object", `{"system": "x86_64-linux"} {"system": "x86_64-linux"}`, 400, api.CodeBadRequest, "trailing data"},
		{"trailing garbage", `{"system": "x86_64-linux"} x`, 400, api.CodeBadRequest, "trailing data"},
		// json.Decoder.More reports false before a '}' or ']', so the
		// server must not rely on it alone to find trailing data.
		{"trailing close bracket", `{"system": "x86_64-linux"}]`, 400, api.CodeBadRequest, "trailing data"},
		{"trailing close brace", `{"system": "x86_64-linux"}}`, 400, api.CodeBadRequest, "trailing data"},
		{"empty body", ``, 400, api.CodeBadRequest, "empty body"},
		{"whitespace body", " \n", 400, api.CodeBadRequest, "empty body"},
		{"missing system", `{"owner": "me"}`, 400, api.CodeBadRequest, "system"},
		{"bad system", `{"system": "x86 64 linux"}`, 400, api.CodeBadRequest, "system"},
		{"upper-case system", `{"system": "X86_64-Linux"}`, 400, api.CodeBadRequest, "system"},
		{"bad feature", `{"system": "x86_64-linux", "features": ["kvm", "Big Parallel"]}`, 400, api.CodeBadRequest, "features"},
		{"empty feature", `{"system": "x86_64-linux", "features": [""]}`, 400, api.CodeBadRequest, "features"},
		{"bad id", `{"id": "-starts-with-dash", "system": "x86_64-linux"}`, 400, api.CodeBadRequest, "id"},
		{"id with space", `{"id": "a b", "system": "x86_64-linux"}`, 400, api.CodeBadRequest, "id"},
		{"owner too long", `{"system": "x86_64-linux", "owner": "` + strings.Repeat("o", 513) + `"}`, 400, api.CodeBadRequest, "owner"},
		{"bad lease", `{"system": "x86_64-linux", "lease": "10 minutes"}`, 400, api.CodeBadRequest, "lease"},
		{"lease without unit", `{"system": "x86_64-linux", "lease": "600"}`, 400, api.CodeBadRequest, "lease"},
		{"negative lease", `{"system": "x86_64-linux", "lease": "-5m"}`, 400, api.CodeBadRequest, "lease"},
		{"zero lease", `{"system": "x86_64-linux", "lease": "0s"}`, 400, api.CodeBadRequest, "lease"},
		{"lease above max_lease", `{"system": "x86_64-linux", "lease": "25h"}`, 400, api.CodeBadRequest, "max_lease"},
		{"unknown pool", `{"pool": "riscv", "system": "x86_64-linux"}`, 400, api.CodeBadRequest, "pool"},
		{"pool does not serve the system", `{"pool": "arm", "system": "x86_64-linux"}`, 400, api.CodeBadRequest, "pool"},
		{"pool lacks a feature", `{"pool": "arm", "system": "aarch64-linux", "features": ["kvm"]}`, 400, api.CodeBadRequest, "pool"},
		{"oversized body", `{"system": "x86_64-linux", "owner": "` + strings.Repeat("o", MaxBodyBytes) + `"}`, 413, api.CodeTooLarge, "larger than"},
		// A valid object followed by padding beyond the limit is still a
		// body larger than MaxBodyBytes.
		{"oversized by trailing padding", `{"system": "x86_64-linux"}` + strings.Repeat(" ", MaxBodyBytes), 413, api.CodeTooLarge, "larger than"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			wantError(t, ts.do("POST", "/v1/reservations", tt.body), tt.status, tt.code, tt.msg)
		})
	}
	list, err := ts.db.Reservations(context.Background(), store.ReservationFilter{})
	if err != nil {
		t.Fatal(err)
	}
	if len(list) != 0 {
		t.Errorf("invalid requests stored %d reservations, e.g. %+v; want none", len(list), list[0])
	}
	if k := ts.kicks.count(); k != 0 {
		t.Errorf("invalid requests kicked the scaler %d times, want 0", k)
	}
}

func TestGetWaitValidation(t *testing.T) {
	ts := newTestServer(t)
	wantReservation(t, ts.do("POST", "/v1/reservations", `{"id": "r1", "system": "x86_64-linux"}`), http.StatusCreated)
	for _, wait := range []string{"abc", "-1s", "10", "30%20seconds"} {
		t.Run(wait, func(t *testing.T) {
			wantError(t, ts.do("GET", "/v1/reservations/r1?wait="+wait, ""), 400, api.CodeBadRequest, "wait")
		})
	}
}

func TestWeightValidation(t *testing.T) {
	ts := newTestServer(t)
	tests := []struct {
		name string
		body string
		msg  string
	}{
		{"missing", `{}`, "weight"},
		{"null", `{"weight": null}`, "weight"},
		{"negative", `{"weight": -1}`, "weight"},
		{"above max", `{"weight": 257}`, "weight"},
		{"not an integer", `{"weight": 1.5}`, "weight"},
		{"string", `{"weight": "high"}`, "weight"},
		{"unknown field", `{"weight": 10, "slot": "slot2"}`, `"slot"`},
		{"empty body", ``, "empty body"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			wantError(t, ts.do("POST", "/v1/slots/x86/slot1/weight", tt.body), 400, api.CodeBadRequest, tt.msg)
		})
	}
	sl, err := ts.db.Slot(context.Background(), scaler.SlotKey{Pool: "x86", Slot: "slot1"})
	if err != nil {
		t.Fatal(err)
	}
	if sl.Weight != scaler.DefaultWeight {
		t.Errorf("weight after invalid requests = %d, want %d", sl.Weight, scaler.DefaultWeight)
	}
	if evs := ts.events(store.EventFilter{}); len(evs) != 0 {
		t.Errorf("invalid weight requests wrote events %+v", evs)
	}
}

func TestCreateWithNoMatchingPoolFails(t *testing.T) {
	ts := newTestServer(t)
	tests := []struct {
		name   string
		body   string
		system string
	}{
		{"unserved system", `{"id": "r-riscv", "system": "riscv64-linux"}`, "riscv64-linux"},
		{"unserved feature", `{"id": "r-test", "system": "x86_64-linux", "features": ["nixos-test"]}`, "x86_64-linux"},
		{"features of different pools", `{"id": "r-mix", "system": "aarch64-linux", "features": ["kvm"]}`, "aarch64-linux"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r := wantReservation(t, ts.do("POST", "/v1/reservations", tt.body), http.StatusCreated)
			if r.State != "failed" {
				t.Errorf("state = %q, want failed", r.State)
			}
			for _, want := range []string{tt.system, "x86", "arm", "x86_64-linux", "aarch64-linux"} {
				if !strings.Contains(r.Reason, want) {
					t.Errorf("reason %q does not name %q (the system and the configured pools)", r.Reason, want)
				}
			}
			if r.EndedAt == nil || !r.EndedAt.Equal(serverT0) {
				t.Errorf("ended_at = %v, want %v", r.EndedAt, serverT0)
			}
			if st := ts.stored(r.ID); st.State != scaler.Failed || st.Reason != r.Reason {
				t.Errorf("stored = %s %q, want failed with the answer's reason", st.State, st.Reason)
			}
			// Retrying gives the same failed reservation.
			again := wantReservation(t, ts.do("POST", "/v1/reservations", tt.body), http.StatusOK)
			if !reflect.DeepEqual(again, r) {
				t.Errorf("retried create = %+v, want %+v", again, r)
			}
		})
	}
}

func TestReleaseIsIdempotent(t *testing.T) {
	ts := newTestServer(t)
	wantReservation(t, ts.do("POST", "/v1/reservations", `{"id": "r1", "system": "x86_64-linux"}`), http.StatusCreated)
	ts.clock.Advance(time.Minute)
	first := wantReservation(t, ts.do("DELETE", "/v1/reservations/r1", ""), http.StatusOK)
	if first.State != "released" || first.EndedAt == nil || !first.EndedAt.Equal(serverT0.Add(time.Minute)) {
		t.Fatalf("first release = %+v; want released at %v", first, serverT0.Add(time.Minute))
	}
	ts.clock.Advance(time.Minute)
	second := wantReservation(t, ts.do("DELETE", "/v1/reservations/r1", ""), http.StatusOK)
	if second.State != "released" || second.EndedAt == nil || !second.EndedAt.Equal(*first.EndedAt) {
		t.Errorf("second release = %+v; want still released at the first release's time", second)
	}
	if st := ts.stored("r1"); st.State != scaler.Released {
		t.Errorf("stored state = %s, want released", st.State)
	}
	var released int
	for _, e := range ts.events(store.EventFilter{ReservationID: "r1"}) {
		if e.Kind == scaler.EvReleased {
			released++
		}
	}
	if released != 1 {
		t.Errorf("%d released events, want 1", released)
	}
}

func TestReleaseBeforeCreateLeavesTombstone(t *testing.T) {
	ts := newTestServer(t)
	rel := wantReservation(t, ts.do("DELETE", "/v1/reservations/late-1", ""), http.StatusOK)
	if rel.ID != "late-1" || rel.State != "released" {
		t.Fatalf("release of unknown id = %+v; want released late-1", rel)
	}
	kicks := ts.kicks.count()

	got := ts.do("POST", "/v1/reservations", `{"id": "late-1", "system": "x86_64-linux", "owner": "proj#1"}`)
	r := wantReservation(t, got, http.StatusOK)
	if r.ID != "late-1" || r.State != "released" {
		t.Errorf("late create = %+v; want the released tombstone, not a new reservation", r)
	}
	if st := ts.stored("late-1"); st.State != scaler.Released {
		t.Errorf("stored state = %s, want released", st.State)
	}
	live, err := ts.db.LiveReservations(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if len(live) != 0 {
		t.Errorf("live reservations = %+v, want none", live)
	}
	if k := ts.kicks.count(); k != kicks {
		t.Errorf("late create kicked the scaler (%d -> %d kicks); nothing to do", kicks, k)
	}
	again := wantReservation(t, ts.do("DELETE", "/v1/reservations/late-1", ""), http.StatusOK)
	if again.State != "released" {
		t.Errorf("second release = %s, want released", again.State)
	}
}

func TestHeartbeat(t *testing.T) {
	ts := newTestServer(t)
	wantReservation(t, ts.do("POST", "/v1/reservations", `{"id": "r1", "system": "x86_64-linux", "lease": "10m"}`), http.StatusCreated)
	ts.clock.Advance(3 * time.Minute)
	r := wantReservation(t, ts.do("POST", "/v1/reservations/r1/heartbeat", ""), http.StatusOK)
	want := serverT0.Add(13 * time.Minute)
	if !r.ExpiresAt.Equal(want) {
		t.Errorf("expires_at after heartbeat = %v, want %v (now + lease)", r.ExpiresAt, want)
	}
	if st := ts.stored("r1"); !st.ExpiresAt.Equal(want) || st.State != scaler.Pending {
		t.Errorf("stored = %s expires %v, want pending expiring %v", st.State, st.ExpiresAt, want)
	}

	// The answer carries the version the store holds, so a second heartbeat
	// works without a conflict.
	ts.clock.Advance(time.Minute)
	r = wantReservation(t, ts.do("POST", "/v1/reservations/r1/heartbeat", ""), http.StatusOK)
	if want := serverT0.Add(14 * time.Minute); !r.ExpiresAt.Equal(want) {
		t.Errorf("expires_at after second heartbeat = %v, want %v", r.ExpiresAt, want)
	}

	wantReservation(t, ts.do("DELETE", "/v1/reservations/r1", ""), http.StatusOK)
	wantError(t, ts.do("POST", "/v1/reservations/r1/heartbeat", ""), http.StatusConflict, api.CodeConflict, "released")
	wantError(t, ts.do("POST", "/v1/reservations/nope/heartbeat", ""), http.StatusNotFound, api.CodeNotFound, "nope")
}

// assign commits reservation id as assigned to x86/slot1.
func assign(ctx context.Context, db *store.DB, id string, now time.Time) error {
	r, err := db.Reservation(ctx, id)
	if err != nil {
		return err
	}
	r.State, r.Slot, r.AssignedAt = scaler.Assigned, "slot1", now
	return db.Commit(ctx, scaler.Change{Reservations: []scaler.Reservation{r},
		Events: []scaler.Event{{At: now, Kind: scaler.EvAssigned, Pool: "x86", Slot: "slot1", ReservationID: id, Actor: "test"}}})
}

func TestLongPollWakesOnNotify(t *testing.T) {
	// The poll waits 10 minutes, and gives up after testwait.Bound (2
	// minutes): one that answers did wake on Notify, one that did not would
	// answer only when its wait ended and fails on that guard instead.
	const wait = 10 * time.Minute
	ts := newTestServer(t, withMaxPoll(wait))
	ts.setSlot("slot1", scaler.Ready)
	wantReservation(t, ts.do("POST", "/v1/reservations", `{"id": "lp", "system": "x86_64-linux"}`), http.StatusCreated)

	firstRead := ts.st.readOf("lp")
	p := ts.poll("/v1/reservations/lp?wait=" + wait.String())
	select {
	case <-firstRead: // the poll has seen "pending" and waits
	case res := <-p:
		t.Fatalf("long poll answered before it read the reservation: %d %s, %v", res.status, res.body, res.err)
	}
	if err := assign(context.Background(), ts.db, "lp", ts.clock.Now()); err != nil {
		t.Fatal(err)
	}
	ts.srv.Notify()
	res := <-p
	if res.err != nil {
		t.Fatalf("long poll with a %s wait gave no answer within %s (%v), though its reservation became ready and Notify came while it waited; it must wake on Notify, not at the end of its wait",
			wait, testwait.Bound, res.err)
	}
	r := wantReservation(t, res.answer, http.StatusOK)
	if r.State != "ready" {
		t.Fatalf("long poll answered state %q; want ready", r.State)
	}
	if r.Slot != "slot1" || r.Address != "127.0.0.1:2222" || r.InstanceID != "i-slot1" || r.AssignedAt == nil {
		t.Errorf("ready reservation = %+v; want slot1 with its builder's address and instance", r)
	}
}

func TestLongPollAnswersPendingAfterWait(t *testing.T) {
	ts := newTestServer(t, withMaxPoll(10*time.Minute))
	created := wantReservation(t, ts.do("POST", "/v1/reservations", `{"id": "lp", "system": "x86_64-linux"}`), http.StatusCreated)

	// A short wait in which nothing changes ends with the state unchanged.
	// The poll reads the reservation once, then waits; every later read is
	// held until the test has changed the reservation behind the server's
	// back (no Notify). The answer shows that change: the poll was still
	// open after its first read and answered the reservation as it was when
	// its wait ended. A poll that answered at once would show the state
	// before the change.
	firstRead := ts.st.readOf("lp")
	release := ts.st.holdAfter(t, "lp", 1)
	p := ts.poll("/v1/reservations/lp?wait=200ms")
	select {
	case <-firstRead:
	case res := <-p:
		t.Fatalf("long poll answered before it read the reservation: %d %s, %v", res.status, res.body, res.err)
	}
	stored := ts.stored("lp")
	stored.ExpiresAt = stored.ExpiresAt.Add(time.Hour)
	if err := ts.db.Commit(context.Background(), scaler.Change{Reservations: []scaler.Reservation{stored}}); err != nil {
		t.Fatal(err)
	}
	// The wait runs on the server's clock: only moving it ends the wait.
	ts.clock.Advance(200 * time.Millisecond)
	release()
	res := <-p
	if res.err != nil {
		t.Fatal(res.err)
	}
	r := wantReservation(t, res.answer, http.StatusOK)
	if r.State != "pending" {
		t.Errorf("state = %q, want pending", r.State)
	}
	if want := created.ExpiresAt.Add(time.Hour); !r.ExpiresAt.Equal(want) {
		t.Errorf("answer expires at %s, want %s: the poll answered at once instead of waiting and answering the reservation as it was when its wait ended",
			r.ExpiresAt, want)
	}

	// Unrelated changes wake the poll, which then keeps waiting: the
	// reservation's own change, made after the poll re-read it, is what
	// ends the poll.
	firstRead = ts.st.readOf("lp")
	p = ts.poll("/v1/reservations/lp?wait=10m")
	select {
	case <-firstRead:
	case res := <-p:
		t.Fatalf("long poll answered before it read the reservation: %d %s, %v", res.status, res.body, res.err)
	}
	reread := ts.st.readOf("lp")
	wantReservation(t, ts.do("POST", "/v1/reservations", `{"id": "other", "system": "x86_64-linux"}`), http.StatusCreated)
	ts.srv.Notify()
	select {
	case <-reread: // the poll woke and saw "pending" again
	case res := <-p:
		if res.err != nil {
			t.Fatalf("long poll did not wake on Notify within %s: %v", testwait.Bound, res.err)
		}
		t.Fatalf("long poll answered %d %s after an unrelated change without reading its reservation again", res.status, res.body)
	}
	ts.setSlot("slot1", scaler.Ready)
	if err := assign(context.Background(), ts.db, "lp", ts.clock.Now()); err != nil {
		t.Fatal(err)
	}
	ts.srv.Notify()
	res = <-p
	if res.err != nil {
		t.Fatalf("long poll gave no answer within %s of its reservation becoming ready: %v", testwait.Bound, res.err)
	}
	if r := wantReservation(t, res.answer, http.StatusOK); r.State != "ready" {
		t.Errorf("state = %q, want ready: an unrelated change must not end the poll, only its own reservation's change", r.State)
	}
}

func TestRequireToken(t *testing.T) {
	ts := newTestServer(t)
	hs := httptest.NewServer(RequireToken("s3cret", ts.srv.Handler()))
	t.Cleanup(hs.Close)
	tests := []struct {
		name   string
		path   string
		auth   []string // Authorization header values; nil = none
		status int
	}{
		{"missing token", "/v1/slots", nil, 401},
		{"wrong token", "/v1/slots", []string{"Bearer wrong"}, 401},
		{"bearer without token", "/v1/slots", []string{"Bearer "}, 401},
		{"bare bearer", "/v1/slots", []string{"Bearer"}, 401},
		{"token without scheme", "/v1/slots", []string{"s3cret"}, 401},
		{"token prefix", "/v1/slots", []string{"Bearer s3cre"}, 401},
		{"token with suffix", "/v1/slots", []string{"Bearer s3cret2"}, 401},
		{"basic auth", "/v1/slots", []string{"Basic czNjcmV0"}, 401},
		{"right token", "/v1/slots", []string{"Bearer s3cret"}, 200},
		{"right token, unknown path", "/v1/nope", []string{"Bearer s3cret"}, 404},
		{"unknown path without token", "/v1/nope", nil, 401},
		{"healthz without token", "/healthz", nil, 200},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			h := http.Header{}
			if tt.auth != nil {
				h["Authorization"] = tt.auth
			}
			a := doRequest(t, "GET", hs.URL+tt.path, "", h)
			switch tt.status {
			case 401:
				wantError(t, a, 401, api.CodeUnauthorized, "bearer token")
				if a.header.Get("WWW-Authenticate") == "" {
					t.Errorf("401 without WWW-Authenticate header")
				}
			case 404:
				wantError(t, a, 404, api.CodeNotFound, tt.path)
			default:
				if a.status != tt.status {
					t.Errorf("status = %d, want %d; body %s", a.status, tt.status, a.body)
				}
			}
		})
	}

	// An empty configured token admits nobody, not even "Bearer ". The
	// handler is called directly: over the wire, the trailing space of the
	// header value would be trimmed before the check.
	open := RequireToken("", ts.srv.Handler())
	for _, auth := range []string{"", "Bearer ", "Bearer"} {
		req := httptest.NewRequest("GET", "/v1/slots", nil)
		if auth != "" {
			req.Header.Set("Authorization", auth)
		}
		rec := httptest.NewRecorder()
		open.ServeHTTP(rec, req)
		wantError(t, answer{status: rec.Code, header: rec.Header(), body: rec.Body.Bytes()}, 401, api.CodeUnauthorized, "bearer token")
	}
}

func TestOperatorSlotCommands(t *testing.T) {
	ts := newTestServer(t)
	ts.setSlot("slot1", scaler.Ready)

	slot := func(a answer) api.Slot {
		t.Helper()
		if a.status != http.StatusOK {
			t.Fatalf("status = %d, want 200; body %s", a.status, a.body)
		}
		return decodeStrict[api.Slot](t, a)
	}
	ts.clock.Advance(time.Minute)
	if s := slot(ts.do("POST", "/v1/slots/x86/slot1/drain", "")); s.State != "draining" || s.DrainReason != "operator" {
		t.Errorf("drain = %+v; want draining by operator", s)
	}
	if st := ts.storedSlot("slot1"); st.State != scaler.Draining || !st.StateSince.Equal(serverT0.Add(time.Minute)) {
		t.Errorf("stored slot1 = %s since %v, want draining since %v", st.State, st.StateSince, serverT0.Add(time.Minute))
	}
	if s := slot(ts.do("POST", "/v1/slots/x86/slot1/undrain", "")); s.State != "ready" || s.DrainReason != "" {
		t.Errorf("undrain = %+v; want ready", s)
	}
	if s := slot(ts.do("POST", "/v1/slots/x86/slot1/weight", `{"weight": 42}`)); s.Weight != 42 {
		t.Errorf("weight answer = %+v; want weight 42", s)
	}
	if st := ts.storedSlot("slot1"); st.Weight != 42 || st.State != scaler.Ready {
		t.Errorf("stored slot1 = %s weight %d, want ready weight 42", st.State, st.Weight)
	}
	for _, w := range []int{0, scaler.MaxWeight} {
		body, _ := json.Marshal(api.WeightRequest{Weight: &w})
		if s := slot(ts.do("POST", "/v1/slots/x86/slot2/weight", string(body))); s.Weight != w {
			t.Errorf("weight %d answer = %+v", w, s)
		}
	}

	wantError(t, ts.do("POST", "/v1/slots/x86/slot2/drain", ""), http.StatusConflict, api.CodeConflict, "only a ready slot can be drained")
	wantError(t, ts.do("POST", "/v1/slots/x86/slot2/undrain", ""), http.StatusConflict, api.CodeConflict, "only a draining slot")
	if st := ts.storedSlot("slot2"); st.State != scaler.Empty {
		t.Errorf("slot2 = %s after a refused drain, want empty", st.State)
	}
	for _, path := range []string{"/v1/slots/x86/slot9/drain", "/v1/slots/x86/slot9/undrain", "/v1/slots/riscv/slot1/drain"} {
		wantError(t, ts.do("POST", path, ""), http.StatusNotFound, api.CodeNotFound, "no slot")
	}
	wantError(t, ts.do("POST", "/v1/slots/x86/slot9/weight", `{"weight": 5}`), http.StatusNotFound, api.CodeNotFound, "x86/slot9")

	type ev struct{ kind, slot, actor, reason string }
	var got []ev
	for _, e := range ts.events(store.EventFilter{Pool: "x86"}) {
		got = append(got, ev{e.Kind, e.Slot, e.Actor, e.Reason})
	}
	want := []ev{
		{scaler.EvDrained, "slot1", "operator", "operator"},
		{scaler.EvUndrained, "slot1", "operator", "operator"},
		{scaler.EvWeight, "slot1", "operator", "weight 42"},
		{scaler.EvWeight, "slot2", "operator", "weight 0"},
		{scaler.EvWeight, "slot2", "operator", "weight 256"},
	}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("events = %+v\nwant %+v", got, want)
	}
	for _, e := range ts.events(store.EventFilter{Pool: "x86", Slot: "slot1"}) {
		if e.InstanceID != "i-slot1" {
			t.Errorf("event %s has instance %q, want i-slot1", e.Kind, e.InstanceID)
		}
	}
}

func (ts *testServer) storedSlot(slot string) scaler.Slot {
	ts.t.Helper()
	s, err := ts.db.Slot(context.Background(), scaler.SlotKey{Pool: "x86", Slot: slot})
	if err != nil {
		ts.t.Fatal(err)
	}
	return s
}

func TestUnknownPathIsJSON404(t *testing.T) {
	ts := newTestServer(t)
	tests := []struct {
		method, path, msg string
	}{
		{"GET", "/v1/nope", "/v1/nope"},
		{"GET", "/", "no endpoint"},
		{"POST", "/v2/reservations", "/v2/reservations"},
		{"GET", "/v1/reservations/a/b/c", "no endpoint"},
		{"POST", "/v1/slots/x86/slot1/explode", "no endpoint"},
		{"GET", "/v1/reservations/missing", `"missing"`},
		{"DELETE", "/v1/slots/x86/slot1", "no endpoint"},
	}
	for _, tt := range tests {
		t.Run(tt.method+" "+tt.path, func(t *testing.T) {
			wantError(t, ts.do(tt.method, tt.path, ""), http.StatusNotFound, api.CodeNotFound, tt.msg)
		})
	}
}

func TestWrongMethodIs405(t *testing.T) {
	h := newTestServer(t)
	req := httptest.NewRequest(http.MethodPut, "/v1/reservations", nil)
	rec := httptest.NewRecorder()
	h.srv.Handler().ServeHTTP(rec, req)
	if rec.Code != http.StatusMethodNotAllowed || rec.Header().Get("Allow") != "GET, POST" {
		t.Fatalf("PUT /v1/reservations = %d Allow %q; want 405 Allow \"GET, POST\"", rec.Code, rec.Header().Get("Allow"))
	}
}

// readsOf reports whether f read reservation id from the store (1) or
// not (0).
func (s *watchedStore) readsOf(id string, f func()) int {
	ch := s.readOf(id)
	f()
	select {
	case <-ch:
		return 1
	default:
		s.mu.Lock()
		delete(s.reads, id)
		s.mu.Unlock()
		return 0
	}
}

// TestReadsComeFromTheView: once a round has published a view that holds
// the API's last write of a reservation, reading it (the long poll's hot
// path) costs no database read; right after a write of it (a heartbeat)
// the view is stale for it, so the read goes to the store and shows the
// write, until the next round's view does.
func TestReadsComeFromTheView(t *testing.T) {
	ts := newTestServer(t)
	if a := ts.do("POST", "/v1/reservations", `{"id":"r1","system":"x86_64-linux"}`); a.status != http.StatusCreated {
		t.Fatalf("create: %d %s", a.status, a.body)
	}
	get := func() api.Reservation {
		t.Helper()
		a := ts.do("GET", "/v1/reservations/r1", "")
		if a.status != http.StatusOK {
			t.Fatalf("get: %d %s", a.status, a.body)
		}
		return decodeStrict[api.Reservation](t, a)
	}
	if n := ts.st.readsOf("r1", func() { get() }); n != 1 {
		t.Errorf("get right after the create, before any round: %d store reads, want 1", n)
	}
	// The round fails to launch (the test has no provider) after it
	// published the view.
	_ = ts.kicks.Reconcile(t.Context())
	if n := ts.st.readsOf("r1", func() { get() }); n != 0 {
		t.Errorf("get after a round published the reservation: %d store reads, want 0", n)
	}
	ts.clock.Advance(time.Minute)
	if a := ts.do("POST", "/v1/reservations/r1/heartbeat", ""); a.status != http.StatusOK {
		t.Fatalf("heartbeat: %d %s", a.status, a.body)
	}
	var got api.Reservation
	if n := ts.st.readsOf("r1", func() { got = get() }); n != 1 || !got.ExpiresAt.Equal(serverT0.Add(time.Minute+10*time.Minute)) {
		t.Errorf("get after a heartbeat the view does not have yet: %d store reads, expires %v; want 1 read and the new expiry", n, got.ExpiresAt)
	}
	_ = ts.kicks.Reconcile(t.Context())
	if n := ts.st.readsOf("r1", func() { got = get() }); n != 0 || !got.ExpiresAt.Equal(serverT0.Add(11*time.Minute)) {
		t.Errorf("get after the next round: %d store reads, expires %v; want 0 reads and the new expiry", n, got.ExpiresAt)
	}
}
