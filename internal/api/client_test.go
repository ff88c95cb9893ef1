package api_test

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"guardianproject.dev/ops/nix-builder-autoscaler/internal/api"
	"guardianproject.dev/ops/nix-builder-autoscaler/internal/testwait"
)

// clientFake serves the API contract of docs/design.md §3.1 from memory, for
// client tests. It records what it was asked.
type clientFake struct {
	token string // if set, requests need "Authorization: Bearer <token>"

	mu           sync.Mutex
	reservations map[string]*api.Reservation
	order        []string // ids, oldest first
	changed      chan struct{}
	slots        []*api.Slot
	rounds       uint64
	events       []api.Event
	nextID       int
	// readyAfterPolls, when > 0, makes a pending reservation ready on that
	// many-th long poll.
	readyAfterPolls int
	polls           map[string]int
	// pollArrived, when set, receives the id of each GET of a reservation
	// (long poll or not) once the fake has the request, before it reads the
	// reservation.
	pollArrived chan string
	// endPolls, when set, ends every long poll still waiting when it is
	// closed, answering the current state, as a wait that ended would.
	endPolls chan struct{}

	requests []string // "METHOD path?query"
	auth     []string // Authorization headers seen
	waits    []string // wait parameters seen
	bodies   []string // request bodies seen
}

func newClientFake() *clientFake {
	return &clientFake{
		reservations: map[string]*api.Reservation{},
		changed:      make(chan struct{}),
		polls:        map[string]int{},
		slots: []*api.Slot{
			{Pool: "x86", Slot: "slot1", State: "ready", Weight: 100, InstanceID: "i-1", Since: time.Now().Add(-time.Hour)},
			{Pool: "x86", Slot: "slot2", State: "empty", Weight: 100},
		},
		events: []api.Event{
			{At: time.Now(), Kind: "launch", Pool: "x86", Slot: "slot1", InstanceID: "i-1"},
			{At: time.Now(), Kind: "reservation-ready", Pool: "x86", Slot: "slot1", ReservationID: "r1"},
		},
	}
}

func (f *clientFake) handler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("POST /v1/reservations", f.create)
	mux.HandleFunc("GET /v1/reservations/{id}", f.get)
	mux.HandleFunc("POST /v1/reservations/{id}/heartbeat", f.heartbeat)
	mux.HandleFunc("DELETE /v1/reservations/{id}", f.release)
	mux.HandleFunc("GET /v1/reservations", f.list)
	mux.HandleFunc("GET /v1/slots", func(w http.ResponseWriter, r *http.Request) {
		f.mu.Lock()
		defer f.mu.Unlock()
		var l api.SlotList
		for _, s := range f.slots {
			l.Slots = append(l.Slots, *s)
		}
		clientFakeJSON(w, http.StatusOK, l)
	})
	mux.HandleFunc("GET /v1/status", func(w http.ResponseWriter, r *http.Request) {
		f.mu.Lock()
		defer f.mu.Unlock()
		clientFakeJSON(w, http.StatusOK, api.Status{
			Pools:     []api.PoolStatus{{Name: "x86", Systems: []string{"x86_64-linux"}, MaxBuilders: 2, Slots: map[string]int{"ready": 1, "empty": 1}}},
			Reconcile: api.ReconcileStatus{Rounds: f.rounds},
		})
	})
	mux.HandleFunc("POST /v1/slots/{pool}/{slot}/{action}", f.slotAction)
	mux.HandleFunc("POST /v1/reconcile", func(w http.ResponseWriter, r *http.Request) {
		f.mu.Lock()
		defer f.mu.Unlock()
		f.rounds++
		clientFakeJSON(w, http.StatusOK, api.ReconcileStatus{LastAt: time.Now(), Rounds: f.rounds, DurationSeconds: 0.01})
	})
	mux.HandleFunc("GET /v1/events", f.listEvents)
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, r *http.Request) {
		clientFakeJSON(w, http.StatusOK, map[string]string{"status": "ok"})
	})
	mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		clientFakeError(w, http.StatusNotFound, api.CodeNotFound, "no such endpoint")
	})
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		f.mu.Lock()
		f.requests = append(f.requests, r.Method+" "+r.URL.RequestURI())
		f.auth = append(f.auth, r.Header.Get("Authorization"))
		f.mu.Unlock()
		if f.token != "" && r.Header.Get("Authorization") != "Bearer "+f.token {
			clientFakeError(w, http.StatusUnauthorized, api.CodeUnauthorized, "missing or wrong bearer token")
			return
		}
		mux.ServeHTTP(w, r)
	})
}

func clientFakeJSON(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	_ = json.NewEncoder(w).Encode(v)
}

func clientFakeError(w http.ResponseWriter, status int, code, msg string) {
	clientFakeJSON(w, status, api.Error{Error: msg, Code: code})
}

// decodeBody decodes a request body strictly, as the daemon does.
func (f *clientFake) decodeBody(w http.ResponseWriter, r *http.Request, v any) bool {
	dec := json.NewDecoder(http.MaxBytesReader(w, r.Body, 1<<20))
	dec.DisallowUnknownFields()
	var raw json.RawMessage
	if err := dec.Decode(&raw); err != nil {
		clientFakeError(w, http.StatusBadRequest, api.CodeBadRequest, "bad body: "+err.Error())
		return false
	}
	f.mu.Lock()
	f.bodies = append(f.bodies, string(raw))
	f.mu.Unlock()
	d2 := json.NewDecoder(strings.NewReader(string(raw)))
	d2.DisallowUnknownFields()
	if err := d2.Decode(v); err != nil {
		clientFakeError(w, http.StatusBadRequest, api.CodeBadRequest, "bad body: "+err.Error())
		return false
	}
	return true
}

// setState changes a reservation's state and wakes long polls; f.mu held.
func (f *clientFake) setState(r *api.Reservation, state string) {
	r.State = state
	if state != "pending" && state != "ready" {
		now := time.Now()
		r.EndedAt = &now
	}
	close(f.changed)
	f.changed = make(chan struct{})
}

// watchPolls makes the fake report the id of every GET of a reservation it
// gets, on the returned channel, before it reads the reservation.
func (f *clientFake) watchPolls() <-chan string {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.pollArrived = make(chan string, 16)
	return f.pollArrived
}

// holdPolls makes long polls end, answering the current state, only when
// end is called (or when their wait or the state changes).
func (f *clientFake) holdPolls() (end func()) {
	f.mu.Lock()
	defer f.mu.Unlock()
	ch := make(chan struct{})
	f.endPolls = ch
	var once sync.Once
	return func() { once.Do(func() { close(ch) }) }
}

// waitPoll waits until the fake got a GET of reservation id (hang-guarded).
func waitPoll(t *testing.T, polls <-chan string, id string) {
	t.Helper()
	guard := time.NewTimer(testwait.Bound)
	defer guard.Stop()
	for {
		select {
		case got := <-polls:
			if got == id {
				return
			}
		case <-guard.C:
			t.Fatalf("no GET of reservation %s reached the fake within %s: stuck", id, testwait.Bound)
		}
	}
}

// SetState is setState for tests, taking the lock.
func (f *clientFake) SetState(id, state string) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.setState(f.reservations[id], state)
}

func (f *clientFake) create(w http.ResponseWriter, r *http.Request) {
	var req api.CreateReservationRequest
	if !f.decodeBody(w, r, &req) {
		return
	}
	if req.System == "" {
		clientFakeError(w, http.StatusBadRequest, api.CodeBadRequest, "system is required")
		return
	}
	lease := 10 * time.Minute
	if req.Lease != "" {
		d, err := time.ParseDuration(req.Lease)
		if err != nil || d <= 0 {
			clientFakeError(w, http.StatusBadRequest, api.CodeBadRequest, "lease must be a positive duration")
			return
		}
		lease = d
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	if req.ID == "" {
		f.nextID++
		req.ID = "r" + strconv.Itoa(f.nextID)
	}
	if old, ok := f.reservations[req.ID]; ok {
		clientFakeJSON(w, http.StatusOK, old)
		return
	}
	now := time.Now()
	res := &api.Reservation{
		ID: req.ID, Pool: orDefault(req.Pool, "x86"), System: req.System, Features: req.Features,
		Owner: req.Owner, State: "pending", Lease: lease.String(), CreatedAt: now, ExpiresAt: now.Add(lease),
	}
	f.reservations[req.ID] = res
	f.order = append(f.order, req.ID)
	clientFakeJSON(w, http.StatusCreated, res)
}

func orDefault(s, def string) string {
	if s == "" {
		return def
	}
	return s
}

func (f *clientFake) get(w http.ResponseWriter, r *http.Request) {
	id := r.PathValue("id")
	var wait time.Duration
	if s := r.URL.Query().Get("wait"); s != "" {
		d, err := time.ParseDuration(s)
		if err != nil || d < 0 {
			clientFakeError(w, http.StatusBadRequest, api.CodeBadRequest, "wait must be a duration")
			return
		}
		wait = d
	}
	f.mu.Lock()
	arrived, endPolls := f.pollArrived, f.endPolls
	f.mu.Unlock()
	if arrived != nil {
		select {
		case arrived <- id:
		case <-r.Context().Done():
			return
		}
	}
	f.mu.Lock()
	f.waits = append(f.waits, r.URL.Query().Get("wait"))
	res, ok := f.reservations[id]
	if !ok {
		f.mu.Unlock()
		clientFakeError(w, http.StatusNotFound, api.CodeNotFound, "reservation "+id+" not found")
		return
	}
	if wait > 0 && res.State == "pending" && f.readyAfterPolls > 0 {
		f.polls[id]++
		if f.polls[id] >= f.readyAfterPolls {
			res.Slot = "slot1"
			f.setState(res, "ready")
		}
	}
	f.mu.Unlock()

	deadline := time.NewTimer(wait)
	defer deadline.Stop()
	for {
		f.mu.Lock()
		state, changed := res.State, f.changed
		cur := *res
		f.mu.Unlock()
		if state != "pending" || wait == 0 {
			clientFakeJSON(w, http.StatusOK, cur)
			return
		}
		select {
		case <-changed:
		case <-deadline.C:
			clientFakeJSON(w, http.StatusOK, cur)
			return
		case <-endPolls: // nil unless set: never
			f.mu.Lock()
			cur = *res
			f.mu.Unlock()
			clientFakeJSON(w, http.StatusOK, cur)
			return
		case <-r.Context().Done():
			return
		}
	}
}

func (f *clientFake) heartbeat(w http.ResponseWriter, r *http.Request) {
	f.mu.Lock()
	defer f.mu.Unlock()
	res, ok := f.reservations[r.PathValue("id")]
	if !ok {
		clientFakeError(w, http.StatusNotFound, api.CodeNotFound, "reservation not found")
		return
	}
	if res.State != "pending" && res.State != "ready" {
		clientFakeError(w, http.StatusConflict, api.CodeConflict, "reservation is "+res.State)
		return
	}
	d, _ := time.ParseDuration(res.Lease)
	res.ExpiresAt = time.Now().Add(d)
	clientFakeJSON(w, http.StatusOK, res)
}

func (f *clientFake) release(w http.ResponseWriter, r *http.Request) {
	f.mu.Lock()
	defer f.mu.Unlock()
	res, ok := f.reservations[r.PathValue("id")]
	if !ok {
		clientFakeError(w, http.StatusNotFound, api.CodeNotFound, "reservation not found")
		return
	}
	if res.State == "pending" || res.State == "ready" {
		f.setState(res, "released")
	}
	clientFakeJSON(w, http.StatusOK, res)
}

func (f *clientFake) list(w http.ResponseWriter, r *http.Request) {
	q := r.URL.Query()
	var states []string
	if s := q.Get("state"); s != "" {
		states = strings.Split(s, ",")
	}
	limit := 100
	if s := q.Get("limit"); s != "" {
		n, err := strconv.Atoi(s)
		if err != nil || n < 1 {
			clientFakeError(w, http.StatusBadRequest, api.CodeBadRequest, "limit must be a positive integer")
			return
		}
		limit = n
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	l := api.ReservationList{Reservations: []api.Reservation{}}
	for i := len(f.order) - 1; i >= 0 && len(l.Reservations) < limit; i-- {
		res := f.reservations[f.order[i]]
		if len(states) > 0 && !slices.Contains(states, res.State) {
			continue
		}
		if p := q.Get("pool"); p != "" && res.Pool != p {
			continue
		}
		l.Reservations = append(l.Reservations, *res)
	}
	clientFakeJSON(w, http.StatusOK, l)
}

func (f *clientFake) slotAction(w http.ResponseWriter, r *http.Request) {
	var wr api.WeightRequest
	if r.PathValue("action") == "weight" {
		if !f.decodeBody(w, r, &wr) {
			return
		}
		if wr.Weight == nil || *wr.Weight < 0 || *wr.Weight > 256 {
			clientFakeError(w, http.StatusBadRequest, api.CodeBadRequest, "weight must be 0..256")
			return
		}
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	var s *api.Slot
	for _, c := range f.slots {
		if c.Pool == r.PathValue("pool") && c.Slot == r.PathValue("slot") {
			s = c
		}
	}
	if s == nil {
		clientFakeError(w, http.StatusNotFound, api.CodeNotFound, "slot "+r.PathValue("pool")+"/"+r.PathValue("slot")+" not found")
		return
	}
	switch r.PathValue("action") {
	case "drain":
		s.State, s.DrainReason = "draining", "operator"
	case "undrain":
		s.State, s.DrainReason = "ready", ""
	case "weight":
		s.Weight = *wr.Weight
	default:
		clientFakeError(w, http.StatusNotFound, api.CodeNotFound, "no such endpoint")
		return
	}
	clientFakeJSON(w, http.StatusOK, s)
}

func (f *clientFake) listEvents(w http.ResponseWriter, r *http.Request) {
	q := r.URL.Query()
	f.mu.Lock()
	defer f.mu.Unlock()
	l := api.EventList{Events: []api.Event{}}
	for _, e := range f.events {
		if p := q.Get("pool"); p != "" && e.Pool != p {
			continue
		}
		if s := q.Get("slot"); s != "" && e.Slot != s {
			continue
		}
		if id := q.Get("reservation"); id != "" && e.ReservationID != id {
			continue
		}
		l.Events = append(l.Events, e)
	}
	clientFakeJSON(w, http.StatusOK, l)
}

func (f *clientFake) lastRequest() string {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.requests[len(f.requests)-1]
}

// serveUnix serves h on a unix socket in a fresh directory and returns its path.
func serveUnixForClient(t *testing.T, h http.Handler) string {
	t.Helper()
	// Not t.TempDir(): socket paths are limited to ~100 bytes.
	dir, err := os.MkdirTemp("", "nba-client")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	sock := filepath.Join(dir, "daemon.sock")
	ln, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	srv := httptest.NewUnstartedServer(h)
	srv.Listener.Close()
	srv.Listener = ln
	srv.Start()
	t.Cleanup(srv.Close)
	return sock
}

func newUnixClientFake(t *testing.T) (*clientFake, *api.Client) {
	t.Helper()
	f := newClientFake()
	return f, api.NewUnixClient(serveUnixForClient(t, f.handler()))
}

func TestClientReservationLifecycle(t *testing.T) {
	f, c := newUnixClientFake(t)
	ctx := t.Context()

	req := api.CreateReservationRequest{ID: "build-42", System: "x86_64-linux", Features: []string{"kvm"}, Owner: "proj/nix-build#42", Lease: "5m"}
	r, created, err := c.CreateReservation(ctx, req)
	if err != nil {
		t.Fatal(err)
	}
	if !created || r.ID != "build-42" || r.State != "pending" || r.Lease != "5m0s" {
		t.Errorf("CreateReservation = %+v, created %v; want new pending build-42 with lease 5m0s", r, created)
	}
	if got, want := f.bodies[0], `{"id":"build-42","system":"x86_64-linux","features":["kvm"],"owner":"proj/nix-build#42","lease":"5m"}`; got != want {
		t.Errorf("request body = %s, want %s", got, want)
	}

	r, created, err = c.CreateReservation(ctx, req)
	if err != nil || created || r.ID != "build-42" {
		t.Errorf("second CreateReservation = %+v, created %v, %v; want the existing reservation, created false", r, created, err)
	}

	if r, err = c.Reservation(ctx, "build-42", 0); err != nil || r.State != "pending" {
		t.Errorf("Reservation = %+v, %v; want pending", r, err)
	}
	if got := f.lastRequest(); got != "GET /v1/reservations/build-42" {
		t.Errorf("request = %q, want no wait parameter", got)
	}

	if r, err = c.Heartbeat(ctx, "build-42"); err != nil || r.State != "pending" {
		t.Errorf("Heartbeat = %+v, %v", r, err)
	}
	if got := f.lastRequest(); got != "POST /v1/reservations/build-42/heartbeat" {
		t.Errorf("request = %q", got)
	}

	if _, _, err := c.CreateReservation(ctx, api.CreateReservationRequest{System: "aarch64-linux", Pool: "arm"}); err != nil {
		t.Fatal(err)
	}
	l, err := c.Reservations(ctx, api.ReservationQuery{States: []string{"pending", "ready"}, Pool: "x86", Limit: 5})
	if err != nil {
		t.Fatal(err)
	}
	if got := f.lastRequest(); got != "GET /v1/reservations?limit=5&pool=x86&state=pending%2Cready" {
		t.Errorf("request = %q", got)
	}
	if len(l.Reservations) != 1 || l.Reservations[0].ID != "build-42" {
		t.Errorf("Reservations = %+v, want only build-42", l.Reservations)
	}

	// Ids may hold a slash; it stays inside one path segment.
	if r, _, err = c.CreateReservation(ctx, api.CreateReservationRequest{ID: "proj/build-7", System: "x86_64-linux"}); err != nil {
		t.Fatal(err)
	}
	if r, err = c.Heartbeat(ctx, "proj/build-7"); err != nil || r.ID != "proj/build-7" {
		t.Errorf("Heartbeat(proj/build-7) = %+v, %v", r, err)
	}
	if got := f.lastRequest(); got != "POST /v1/reservations/proj%2Fbuild-7/heartbeat" {
		t.Errorf("request = %q", got)
	}

	for i := range 2 { // releasing is idempotent
		if r, err = c.Release(ctx, "build-42"); err != nil || r.State != "released" {
			t.Errorf("Release #%d = %+v, %v; want released", i+1, r, err)
		}
	}
	if got := f.lastRequest(); got != "DELETE /v1/reservations/build-42" {
		t.Errorf("request = %q", got)
	}
}

func TestClientOperatorCalls(t *testing.T) {
	f, c := newUnixClientFake(t)
	ctx := t.Context()

	sl, err := c.Slots(ctx)
	if err != nil || len(sl.Slots) != 2 {
		t.Fatalf("Slots = %+v, %v", sl, err)
	}
	st, err := c.Status(ctx)
	if err != nil || len(st.Pools) != 1 || st.Pools[0].Name != "x86" {
		t.Fatalf("Status = %+v, %v", st, err)
	}
	s, err := c.Drain(ctx, "x86", "slot1")
	if err != nil || s.State != "draining" {
		t.Errorf("Drain = %+v, %v", s, err)
	}
	if got := f.lastRequest(); got != "POST /v1/slots/x86/slot1/drain" {
		t.Errorf("request = %q", got)
	}
	if s, err = c.Undrain(ctx, "x86", "slot1"); err != nil || s.State != "ready" {
		t.Errorf("Undrain = %+v, %v", s, err)
	}
	if s, err = c.SetWeight(ctx, "x86", "slot1", 0); err != nil || s.Weight != 0 {
		t.Errorf("SetWeight(0) = %+v, %v", s, err)
	}
	if got, want := f.bodies[len(f.bodies)-1], `{"weight":0}`; got != want {
		t.Errorf("weight body = %s, want %s", got, want)
	}
	rs, err := c.Reconcile(ctx)
	if err != nil || rs.Rounds != 1 {
		t.Errorf("Reconcile = %+v, %v", rs, err)
	}
	ev, err := c.Events(ctx, api.EventQuery{Limit: 10, Pool: "x86", Slot: "slot1", Reservation: "r1"})
	if err != nil || len(ev.Events) != 1 || ev.Events[0].Kind != "reservation-ready" {
		t.Errorf("Events = %+v, %v", ev, err)
	}
	if got := f.lastRequest(); got != "GET /v1/events?limit=10&pool=x86&reservation=r1&slot=slot1" {
		t.Errorf("request = %q", got)
	}
	if err := c.Health(ctx); err != nil {
		t.Errorf("Health = %v", err)
	}
}

func TestClientErrorDecoding(t *testing.T) {
	_, c := newUnixClientFake(t)
	ctx := t.Context()

	tests := []struct {
		name string
		call func() error
		want api.APIError
	}{
		{"unknown reservation", func() error { _, err := c.Reservation(ctx, "nope", 0); return err },
			api.APIError{Status: 404, Code: api.CodeNotFound, Message: "reservation nope not found"}},
		{"missing system", func() error {
			_, _, err := c.CreateReservation(ctx, api.CreateReservationRequest{Owner: "me"})
			return err
		}, api.APIError{Status: 400, Code: api.CodeBadRequest, Message: "system is required"}},
		{"weight out of range", func() error { _, err := c.SetWeight(ctx, "x86", "slot1", 300); return err },
			api.APIError{Status: 400, Code: api.CodeBadRequest, Message: "weight must be 0..256"}},
		{"unknown slot", func() error { _, err := c.Drain(ctx, "x86", "slot9"); return err },
			api.APIError{Status: 404, Code: api.CodeNotFound, Message: "slot x86/slot9 not found"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			err := tt.call()
			var got *api.APIError
			if !errors.As(err, &got) {
				t.Fatalf("error = %v (%T), want *APIError", err, err)
			}
			if *got != tt.want {
				t.Errorf("error = %+v, want %+v", *got, tt.want)
			}
			if err.Error() != tt.want.Message {
				t.Errorf("Error() = %q, want %q", err.Error(), tt.want.Message)
			}
		})
	}
}

func TestClientErrorNotJSON(t *testing.T) {
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		http.Error(w, "upstream went away", http.StatusBadGateway)
	}))
	defer srv.Close()
	_, err := api.NewHTTPClient(srv.URL, "").Status(t.Context())
	var ae *api.APIError
	if !errors.As(err, &ae) {
		t.Fatalf("error = %v (%T), want *APIError", err, err)
	}
	if ae.Status != 502 || ae.Code != "" || ae.Message != "daemon answered 502 Bad Gateway: upstream went away" {
		t.Errorf("error = %+v", *ae)
	}
}

func TestClientBearerToken(t *testing.T) {
	f := newClientFake()
	f.token = "s3cret"
	srv := httptest.NewServer(f.handler())
	defer srv.Close()

	c := api.NewHTTPClient(srv.URL+"/", "s3cret") // a trailing slash is fine
	if _, err := c.Slots(t.Context()); err != nil {
		t.Fatalf("Slots with the right token: %v", err)
	}
	if got, want := f.auth[0], "Bearer s3cret"; got != want {
		t.Errorf("Authorization = %q, want %q", got, want)
	}
	if got, want := f.requests[0], "GET /v1/slots"; got != want {
		t.Errorf("request = %q, want %q", got, want)
	}

	_, err := api.NewHTTPClient(srv.URL, "wrong").Slots(t.Context())
	var ae *api.APIError
	if !errors.As(err, &ae) || ae.Status != http.StatusUnauthorized || ae.Code != api.CodeUnauthorized {
		t.Errorf("Slots with a wrong token: %v, want a 401 unauthorized *APIError", err)
	}
}

func TestClientUnreachableUnixSocket(t *testing.T) {
	sock := filepath.Join(t.TempDir(), "missing.sock")
	c := api.NewUnixClient(sock)
	_, err := c.Status(t.Context())
	var ue *api.UnreachableError
	if !errors.As(err, &ue) {
		t.Fatalf("error = %v (%T), want *UnreachableError", err, err)
	}
	msg := err.Error()
	for _, want := range []string{
		"cannot reach the daemon at unix socket " + sock + ": ",
		"dial unix " + sock + ": connect: no such file or directory",
		"(is nix-builder-autoscaler running? use --socket or --url to point elsewhere)",
	} {
		if !strings.Contains(msg, want) {
			t.Errorf("error %q does not contain %q", msg, want)
		}
	}
	if strings.Contains(msg, "http://daemon") {
		t.Errorf("error %q shows the internal URL", msg)
	}
}

func TestClientUnreachableTCP(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close() // nothing listens there now
	base := "http://" + addr
	_, err = api.NewHTTPClient(base, "t").Slots(t.Context())
	var ue *api.UnreachableError
	if !errors.As(err, &ue) {
		t.Fatalf("error = %v (%T), want *UnreachableError", err, err)
	}
	if want := "cannot reach the daemon at " + base + ": "; !strings.HasPrefix(err.Error(), want) {
		t.Errorf("error = %q, want prefix %q", err, want)
	}
}

func TestClientTimeout(t *testing.T) {
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		<-r.Context().Done() // never answers
	}))
	defer srv.Close()
	c := api.NewHTTPClient(srv.URL, "")
	c.Timeout = 100 * time.Millisecond
	// The caller's context is only a hang guard: if the client's Timeout
	// did not end the call, the guard would, with the caller's error.
	guard, cancelGuard := context.WithTimeout(t.Context(), testwait.Bound)
	defer cancelGuard()
	_, err := c.Status(guard)
	var ue *api.UnreachableError
	if !errors.As(err, &ue) || !strings.Contains(err.Error(), "no answer within 100ms") {
		t.Errorf("error = %v, want an *UnreachableError saying no answer within 100ms", err)
	}

	// The caller's own cancellation is not the daemon being unreachable.
	ctx, cancel := context.WithTimeout(t.Context(), 50*time.Millisecond)
	defer cancel()
	c.Timeout = testwait.Bound
	_, err = c.Status(ctx)
	if errors.As(err, &ue) || !errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("error = %v (%T), want the caller's context error", err, err)
	}
}

func TestClientBodyLimit(t *testing.T) {
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		fmt.Fprint(w, `{"slots":[`)
		chunk := strings.Repeat(`{"pool":"x86","slot":"slot1","state":"ready"},`, 1000)
		for written := 0; written < api.MaxResponseBytes+1; written += len(chunk) {
			fmt.Fprint(w, chunk)
		}
		fmt.Fprint(w, `{}]}`)
	}))
	defer srv.Close()
	_, err := api.NewHTTPClient(srv.URL, "").Slots(t.Context())
	if err == nil || !strings.Contains(err.Error(), "larger than") {
		t.Errorf("error = %v, want a body-too-large error", err)
	}
}

func TestClientLongPollPassesWait(t *testing.T) {
	f, c := newUnixClientFake(t)
	ctx := t.Context()
	if _, _, err := c.CreateReservation(ctx, api.CreateReservationRequest{ID: "lp", System: "x86_64-linux"}); err != nil {
		t.Fatal(err)
	}
	polls := f.watchPolls()

	// The poll outlasts the client's own timeout: the wait must extend it.
	// The fake holds the poll open for twice that timeout (the sleep is the
	// behaviour under test), then ends it as an ended wait would. A client
	// that did not add the wait to its timeout gives up first, with an
	// error; one that did has minutes left.
	c.Timeout = 200 * time.Millisecond
	end := f.holdPolls()
	type result struct {
		r   api.Reservation
		err error
	}
	done := make(chan result, 1)
	go func() {
		r, err := c.Reservation(ctx, "lp", 10*time.Minute)
		done <- result{r, err}
	}()
	waitPoll(t, polls, "lp")
	time.Sleep(2 * c.Timeout)
	end()
	res := <-done
	if res.err != nil {
		t.Fatalf("Reservation with a wait longer than the client's timeout: %v", res.err)
	}
	if res.r.State != "pending" {
		t.Errorf("state = %q, want pending", res.r.State)
	}
	if got := f.lastRequest(); got != "GET /v1/reservations/lp?wait=10m0s" {
		t.Errorf("request = %q, want wait=10m0s", got)
	}

	// A state change ends the poll early: the poll waits 10 minutes, the
	// client's context gives up after testwait.Bound (a hang guard), so an
	// answer means the poll ended on the change.
	f.mu.Lock()
	f.endPolls = nil
	f.mu.Unlock()
	guard, cancel := context.WithTimeout(ctx, testwait.Bound)
	defer cancel()
	go func() {
		r, err := c.Reservation(guard, "lp", 10*time.Minute)
		done <- result{r, err}
	}()
	waitPoll(t, polls, "lp")
	f.SetState("lp", "ready")
	res = <-done
	if res.err != nil || res.r.State != "ready" {
		t.Fatalf("Reservation = %+v, %v; want ready, answered when the state changed", res.r, res.err)
	}
	f.mu.Lock()
	lastWait := f.waits[len(f.waits)-1]
	f.mu.Unlock()
	if lastWait != "10m0s" {
		t.Errorf("wait = %q, want 10m0s", lastWait)
	}
}

func TestClientWaitReady(t *testing.T) {
	f, c := newUnixClientFake(t)
	f.readyAfterPolls = 3
	// The hang guard of the whole test: every wait below ends on a state
	// the test sets up, long before this.
	ctx, cancel := context.WithTimeout(t.Context(), testwait.Bound)
	defer cancel()
	if _, _, err := c.CreateReservation(ctx, api.CreateReservationRequest{ID: "w1", System: "x86_64-linux"}); err != nil {
		t.Fatal(err)
	}
	r, err := c.WaitReady(ctx, "w1", 50*time.Millisecond)
	if err != nil || r.State != "ready" || r.Slot != "slot1" {
		t.Fatalf("WaitReady = %+v, %v; want ready on slot1", r, err)
	}
	f.mu.Lock()
	polls := f.polls["w1"]
	f.readyAfterPolls = 0
	f.mu.Unlock()
	if polls != 3 {
		t.Errorf("polls = %d, want 3", polls)
	}

	// A reservation that fails ends the wait with its state, no error. The
	// poll waits 10 minutes; the state changes once it is open.
	if _, _, err := c.CreateReservation(ctx, api.CreateReservationRequest{ID: "w2", System: "x86_64-linux"}); err != nil {
		t.Fatal(err)
	}
	arrived := f.watchPolls()
	go func() {
		for id := range arrived {
			if id == "w2" {
				f.SetState("w2", "failed")
				return
			}
		}
	}()
	if r, err = c.WaitReady(ctx, "w2", 10*time.Minute); err != nil || r.State != "failed" {
		t.Errorf("WaitReady = %+v, %v; want failed", r, err)
	}

	// The context bounds the wait. It ends once a poll has answered
	// "pending" and the next one is open.
	if _, _, err := c.CreateReservation(ctx, api.CreateReservationRequest{ID: "w3", System: "x86_64-linux"}); err != nil {
		t.Fatal(err)
	}
	arrived = f.watchPolls()
	wctx, wcancel := context.WithCancel(ctx)
	defer wcancel()
	go func() {
		n := 0
		for id := range arrived {
			if id == "w3" {
				if n++; n == 2 {
					wcancel()
					return
				}
			}
		}
	}()
	r, err = c.WaitReady(wctx, "w3", 100*time.Millisecond)
	var ue *api.UnreachableError
	if !errors.Is(err, context.Canceled) || errors.As(err, &ue) {
		t.Errorf("WaitReady error = %v, want the context's error", err)
	}
	if r.ID != "w3" || r.State != "pending" {
		t.Errorf("WaitReady = %+v, want the last state seen (pending)", r)
	}

	// Errors end the wait.
	if _, err := c.WaitReady(ctx, "missing", time.Second); err == nil {
		t.Error("WaitReady of an unknown reservation succeeded")
	}
}
