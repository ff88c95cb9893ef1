// Package apiserver serves the daemon's HTTP reservation and operator API
// (docs/design.md §3.1) over the store and the reconciler. The wire types
// and the Go client live in internal/api, which API clients such as
// autoscalerctl import without pulling in the server's dependencies.
package apiserver

import (
	"context"
	"crypto/rand"
	"crypto/subtle"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/url"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"guardianproject.dev/ops/nix-builder-autoscaler/clock"
	"guardianproject.dev/ops/nix-builder-autoscaler/internal/api"
	"guardianproject.dev/ops/nix-builder-autoscaler/internal/config"
	"guardianproject.dev/ops/nix-builder-autoscaler/internal/store"
	"guardianproject.dev/ops/nix-builder-autoscaler/scaler"
)

// MaxBodyBytes bounds every request body.
const MaxBodyBytes = 64 << 10

// Store is the state the API reads and writes.
type Store interface {
	CreateReservation(ctx context.Context, r scaler.Reservation, ev scaler.Event) (scaler.Reservation, bool, error)
	Reservation(ctx context.Context, id string) (scaler.Reservation, error)
	Reservations(ctx context.Context, f store.ReservationFilter) ([]scaler.Reservation, error)
	LiveReservations(ctx context.Context) ([]scaler.Reservation, error)
	Slots(ctx context.Context) ([]scaler.Slot, error)
	Slot(ctx context.Context, key scaler.SlotKey) (scaler.Slot, error)
	Commit(ctx context.Context, c scaler.Change) error
	Events(ctx context.Context, f store.EventFilter) ([]scaler.Event, error)
}

// Scaler is the reconciler as the API drives it.
type Scaler interface {
	Kick()
	Reconcile(ctx context.Context) error
	Status() scaler.RoundStatus
}

// Options configures a Server.
type Options struct {
	Store        Store
	Scaler       Scaler
	Pools        []config.Pool
	Reservations config.Reservations
	Clock        clock.Clock // nil = wall clock
	Logger       *slog.Logger
	// HAProxy reports HAProxy's state for /v1/status (nil: not in use).
	HAProxy func() api.HAProxyStatus
	// Held reports connections held for a builder, per pool (nil: none).
	Held func() map[string]int
}

// Server serves the reservation and operator API.
type Server struct {
	o      Options
	notify notifier
	mux    *http.ServeMux
}

// New returns a server; mount Handler on a listener.
func New(o Options) *Server {
	if o.Clock == nil {
		o.Clock = clock.Real{}
	}
	if o.Logger == nil {
		o.Logger = slog.Default()
	}
	s := &Server{o: o, notify: notifier{ch: make(chan struct{})}, mux: http.NewServeMux()}
	s.mux.HandleFunc("POST /v1/reservations", s.create)
	s.mux.HandleFunc("GET /v1/reservations", s.listReservations)
	s.mux.HandleFunc("GET /v1/reservations/{id}", s.get)
	s.mux.HandleFunc("POST /v1/reservations/{id}/heartbeat", s.heartbeat)
	s.mux.HandleFunc("DELETE /v1/reservations/{id}", s.release)
	s.mux.HandleFunc("GET /v1/slots", s.slots)
	s.mux.HandleFunc("POST /v1/slots/{pool}/{slot}/drain", s.drain)
	s.mux.HandleFunc("POST /v1/slots/{pool}/{slot}/undrain", s.undrain)
	s.mux.HandleFunc("POST /v1/slots/{pool}/{slot}/weight", s.weight)
	s.mux.HandleFunc("GET /v1/status", s.status)
	s.mux.HandleFunc("POST /v1/reconcile", s.reconcile)
	s.mux.HandleFunc("GET /v1/events", s.events)
	s.mux.HandleFunc("GET /healthz", s.health)
	return s
}

// Handler is the API without authentication (for the unix socket, where
// file permissions decide who may connect).
func (s *Server) Handler() http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		// Every handler reads at most MaxBodyBytes.
		r.Body = http.MaxBytesReader(w, r.Body, MaxBodyBytes)
		if _, pattern := s.mux.Handler(r); pattern == "" {
			if allow := s.allowed(r); len(allow) > 0 {
				w.Header().Set("Allow", strings.Join(allow, ", "))
				writeError(w, http.StatusMethodNotAllowed, api.CodeBadRequest, fmt.Sprintf("%s %s: method not allowed; use %s", r.Method, r.URL.Path, strings.Join(allow, " or ")))
				return
			}
			writeError(w, http.StatusNotFound, api.CodeNotFound, fmt.Sprintf("no endpoint %s %s; see docs/design.md §3.1 for the API", r.Method, r.URL.Path))
			return
		}
		s.mux.ServeHTTP(w, r)
	})
}

// allowed lists the methods that have an endpoint at r's path.
func (s *Server) allowed(r *http.Request) []string {
	var allow []string
	for _, m := range []string{http.MethodGet, http.MethodPost, http.MethodDelete} {
		probe := r.Clone(r.Context())
		probe.Method = m
		if _, pattern := s.mux.Handler(probe); pattern != "" {
			allow = append(allow, m)
		}
	}
	return allow
}

// RequireToken wraps h so that every request but /healthz needs
// "Authorization: Bearer <token>". The comparison is constant-time.
func RequireToken(token string, h http.Handler) http.Handler {
	want := []byte("Bearer " + token)
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path != "/healthz" {
			got := []byte(r.Header.Get("Authorization"))
			if token == "" || subtle.ConstantTimeCompare(got, want) != 1 {
				w.Header().Set("WWW-Authenticate", `Bearer realm="nix-builder-autoscaler"`)
				writeError(w, http.StatusUnauthorized, api.CodeUnauthorized, "missing or wrong bearer token; send Authorization: Bearer <token from the daemon's token_file>")
				return
			}
		}
		h.ServeHTTP(w, r)
	})
}

// Notify wakes every long poll so it re-reads its reservation.
func (s *Server) Notify() { s.notify.broadcast() }

type notifier struct {
	mu sync.Mutex
	ch chan struct{}
}

func (n *notifier) wait() <-chan struct{} {
	n.mu.Lock()
	defer n.mu.Unlock()
	return n.ch
}

func (n *notifier) broadcast() {
	n.mu.Lock()
	defer n.mu.Unlock()
	close(n.ch)
	n.ch = make(chan struct{})
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	_ = enc.Encode(v)
}

func writeError(w http.ResponseWriter, status int, code, msg string) {
	writeJSON(w, status, api.Error{Error: msg, Code: code})
}

func (s *Server) internal(w http.ResponseWriter, what string, err error) {
	s.o.Logger.Error("api: "+what, "err", err)
	writeError(w, http.StatusInternalServerError, api.CodeInternal, what+": "+err.Error())
}

// decode reads a JSON body strictly: size-limited, no unknown fields, one value.
func decode(w http.ResponseWriter, r *http.Request, v any) bool {
	dec := json.NewDecoder(r.Body)
	dec.DisallowUnknownFields()
	err := dec.Decode(v)
	if err == nil {
		// Exactly one value: anything but the end of the body after it is
		// an error (json.Decoder.More misses a stray ']' or '}').
		var rest json.RawMessage
		switch e := dec.Decode(&rest); {
		case errors.Is(e, io.EOF):
			return true
		case errors.As(e, new(*http.MaxBytesError)):
			err = e
		default:
			err = errors.New("trailing data after the JSON object")
		}
	}
	var tooBig *http.MaxBytesError
	switch {
	case errors.As(err, &tooBig):
		writeError(w, http.StatusRequestEntityTooLarge, api.CodeTooLarge, fmt.Sprintf("request body larger than %d bytes", MaxBodyBytes))
	case errors.Is(err, io.EOF):
		writeError(w, http.StatusBadRequest, api.CodeBadRequest, "empty body; send a JSON object")
	default:
		writeError(w, http.StatusBadRequest, api.CodeBadRequest, "invalid JSON body: "+err.Error())
	}
	return false
}

var (
	reID      = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._:@/+-]{0,127}$`)
	reSystem  = regexp.MustCompile(`^[a-z0-9_]+-[a-z0-9_]+$`)
	reFeature = regexp.MustCompile(`^[a-z0-9][a-z0-9._-]{0,63}$`)
)

func newID() string {
	b := make([]byte, 12)
	_, _ = rand.Read(b)
	return "r-" + hex.EncodeToString(b)
}

func (s *Server) create(w http.ResponseWriter, r *http.Request) {
	var req api.CreateReservationRequest
	if !decode(w, r, &req) {
		return
	}
	lease, msg := s.validateCreate(&req)
	if msg != "" {
		writeError(w, http.StatusBadRequest, api.CodeBadRequest, msg)
		return
	}
	now := s.o.Clock.Now()
	res := scaler.Reservation{ID: req.ID, Pool: req.Pool, System: req.System, Features: req.Features, Owner: req.Owner,
		State: scaler.Pending, Lease: lease, CreatedAt: now, ExpiresAt: now.Add(lease)}
	if res.Pool == "" {
		res.Pool = s.matchPool(req.System, req.Features)
	}
	if res.Pool == "" {
		res.State, res.EndedAt = scaler.Failed, now
		res.Reason = fmt.Sprintf("no pool serves system %s with features [%s]; configured: %s",
			req.System, strings.Join(req.Features, " "), s.poolSummary())
	}
	ev := scaler.Event{At: now, Kind: scaler.EvCreated, Pool: res.Pool, ReservationID: res.ID, Actor: "api", Reason: "owner " + req.Owner}
	if res.State == scaler.Failed {
		ev.Kind, ev.Reason = scaler.EvFailed, res.Reason
	}
	got, created, err := s.o.Store.CreateReservation(r.Context(), res, ev)
	if err != nil {
		s.internal(w, "create reservation", err)
		return
	}
	if !created {
		tombstone := got.System == ""
		if !tombstone && (got.System != res.System || !slices.Equal(got.Features, res.Features) || req.Pool != "" && got.Pool != req.Pool) {
			writeError(w, http.StatusConflict, api.CodeConflict, fmt.Sprintf("reservation %s already exists with other parameters (system %s, pool %s); choose a new id", got.ID, got.System, got.Pool))
			return
		}
		writeJSON(w, http.StatusOK, s.view(r.Context(), got, nil))
		return
	}
	if got.State == scaler.Pending {
		s.o.Logger.Info("reservation created", "reservation", got.ID, "pool", got.Pool, "system", got.System, "owner", got.Owner)
		s.o.Scaler.Kick()
	} else {
		s.o.Logger.Warn("reservation failed", "reservation", got.ID, "reason", got.Reason)
	}
	s.Notify()
	writeJSON(w, http.StatusCreated, s.view(r.Context(), got, nil))
}

// validateCreate checks and completes a create request; msg says what is
// wrong and how to fix it.
func (s *Server) validateCreate(req *api.CreateReservationRequest) (lease time.Duration, msg string) {
	if req.ID == "" {
		req.ID = newID()
	} else if !reID.MatchString(req.ID) {
		return 0, "id: must be 1-128 characters of letters, digits and ._:@/+- starting with a letter or digit"
	}
	if req.System == "" {
		return 0, `system: required, e.g. "x86_64-linux"`
	}
	if !reSystem.MatchString(req.System) {
		return 0, fmt.Sprintf("system: %q is not a Nix system name like \"x86_64-linux\"", req.System)
	}
	for _, f := range req.Features {
		if !reFeature.MatchString(f) {
			return 0, fmt.Sprintf("features: %q is not a feature name like \"kvm\" or \"big-parallel\"", f)
		}
	}
	req.Features = slices.Compact(slices.Sorted(slices.Values(req.Features)))
	if len(req.Owner) > 512 {
		return 0, "owner: longer than 512 characters"
	}
	if req.Pool != "" {
		p, ok := s.pool(req.Pool)
		if !ok {
			return 0, fmt.Sprintf("pool: no pool named %q; configured: %s", req.Pool, s.poolSummary())
		}
		if !p.Serves(req.System, req.Features) {
			return 0, fmt.Sprintf("pool: %s does not serve system %s with features [%s]", req.Pool, req.System, strings.Join(req.Features, " "))
		}
	}
	lease = s.o.Reservations.Lease.D()
	if req.Lease != "" {
		d, err := time.ParseDuration(req.Lease)
		if err != nil {
			return 0, fmt.Sprintf("lease: %q is not a duration; write it like \"10m\" or \"1h30m\"", req.Lease)
		}
		if d <= 0 {
			return 0, "lease: must be positive"
		}
		if max := s.o.Reservations.MaxLease.D(); d > max {
			return 0, fmt.Sprintf("lease: %s is longer than max_lease %s; ask for less and heartbeat", d, max)
		}
		lease = d
	}
	return lease, ""
}

func (s *Server) pool(name string) (config.Pool, bool) {
	for _, p := range s.o.Pools {
		if p.Name == name {
			return p, true
		}
	}
	return config.Pool{}, false
}

func (s *Server) matchPool(system string, features []string) string {
	if i := scaler.MatchPool(s.o.Pools, config.Pool.Route, system, features); i >= 0 {
		return s.o.Pools[i].Name
	}
	return ""
}

func (s *Server) poolSummary() string {
	var parts []string
	for _, p := range s.o.Pools {
		parts = append(parts, fmt.Sprintf("%s (systems %s; features %s)", p.Name, strings.Join(p.Systems, " "), strings.Join(p.Features, " ")))
	}
	return strings.Join(parts, ", ")
}

// view renders a reservation; slots (may be nil) saves a lookup per item.
func (s *Server) view(ctx context.Context, r scaler.Reservation, slots map[scaler.SlotKey]scaler.Slot) api.Reservation {
	v := api.Reservation{ID: r.ID, Pool: r.Pool, System: r.System, Features: r.Features, Owner: r.Owner, State: string(r.State),
		Slot: r.Slot, Lease: r.Lease.String(), CreatedAt: r.CreatedAt, ExpiresAt: r.ExpiresAt, Reason: r.Reason}
	if v.Features == nil {
		v.Features = []string{}
	}
	if !r.AssignedAt.IsZero() {
		t := r.AssignedAt
		v.AssignedAt = &t
		v.WaitSeconds = t.Sub(r.CreatedAt).Seconds()
	} else if r.State == scaler.Pending {
		v.WaitSeconds = s.o.Clock.Now().Sub(r.CreatedAt).Seconds()
	}
	if !r.EndedAt.IsZero() {
		t := r.EndedAt
		v.EndedAt = &t
	}
	if r.State == scaler.Assigned && r.Slot != "" {
		key := scaler.SlotKey{Pool: r.Pool, Slot: r.Slot}
		sl, ok := slots[key]
		if slots == nil {
			var err error
			sl, err = s.o.Store.Slot(ctx, key)
			ok = err == nil
		}
		if ok {
			v.Address, v.InstanceID = sl.Address, sl.InstanceID
		}
	}
	return v
}

func (s *Server) lookup(w http.ResponseWriter, r *http.Request) (scaler.Reservation, bool) {
	res, err := s.o.Store.Reservation(r.Context(), r.PathValue("id"))
	if errors.Is(err, scaler.ErrNotFound) {
		writeError(w, http.StatusNotFound, api.CodeNotFound, fmt.Sprintf("no reservation %q", r.PathValue("id")))
		return res, false
	}
	if err != nil {
		s.internal(w, "read reservation", err)
		return res, false
	}
	return res, true
}

func (s *Server) get(w http.ResponseWriter, r *http.Request) {
	var wait time.Duration
	if q := r.URL.Query().Get("wait"); q != "" {
		d, err := time.ParseDuration(q)
		if err != nil || d < 0 {
			writeError(w, http.StatusBadRequest, api.CodeBadRequest, fmt.Sprintf("wait: %q is not a duration; write it like \"30s\"", q))
			return
		}
		wait = min(d, s.o.Reservations.MaxPoll.D())
	}
	timer := s.o.Clock.NewTimer(wait)
	defer timer.Stop()
	for {
		// Take the channel before reading, so a change between the read
		// and the wait still wakes us.
		changed := s.notify.wait()
		res, ok := s.lookup(w, r)
		if !ok {
			return
		}
		if res.State != scaler.Pending || wait == 0 {
			writeJSON(w, http.StatusOK, s.view(r.Context(), res, nil))
			return
		}
		select {
		case <-changed:
		case <-timer.C():
			wait = 0
		case <-r.Context().Done():
			return
		}
	}
}

// conflictAttempts bounds how often a request re-reads a row that the
// reconciler (or another request) changed meanwhile.
const conflictAttempts = 10

// updateReservation applies fn to the stored reservation and commits,
// retrying when the reconciler changed it meanwhile.
func (s *Server) updateReservation(ctx context.Context, id string, fn func(*scaler.Reservation) (scaler.Change, bool)) (scaler.Reservation, error) {
	var res scaler.Reservation
	err := scaler.RetryOnConflict(conflictAttempts, func() error {
		var err error
		if res, err = s.o.Store.Reservation(ctx, id); err != nil {
			return err
		}
		c, ok := fn(&res)
		if !ok {
			return nil
		}
		c.Reservations = append(c.Reservations, res)
		if err := s.o.Store.Commit(ctx, c); err != nil {
			return err
		}
		res.Version++
		return nil
	})
	return res, err
}

func (s *Server) heartbeat(w http.ResponseWriter, r *http.Request) {
	id := r.PathValue("id")
	now := s.o.Clock.Now()
	live := true
	res, err := s.updateReservation(r.Context(), id, func(res *scaler.Reservation) (scaler.Change, bool) {
		if !res.State.Live() {
			live = false
			return scaler.Change{}, false
		}
		res.ExpiresAt = now.Add(res.Lease)
		return scaler.Change{}, true
	})
	switch {
	case errors.Is(err, scaler.ErrNotFound):
		writeError(w, http.StatusNotFound, api.CodeNotFound, fmt.Sprintf("no reservation %q", id))
	case err != nil:
		s.internal(w, "heartbeat", err)
	case !live:
		writeError(w, http.StatusConflict, api.CodeConflict, fmt.Sprintf("reservation %s is %s (%s); create a new one", id, res.State, res.Reason))
	default:
		writeJSON(w, http.StatusOK, s.view(r.Context(), res, nil))
	}
}

func (s *Server) release(w http.ResponseWriter, r *http.Request) {
	id := r.PathValue("id")
	if !reID.MatchString(id) {
		writeError(w, http.StatusBadRequest, api.CodeBadRequest, "id: not a valid reservation id")
		return
	}
	now := s.o.Clock.Now()
	ev := scaler.Event{At: now, Kind: scaler.EvReleased, ReservationID: id, Actor: "api"}
	var freed string
	released := false
	res, err := s.updateReservation(r.Context(), id, func(res *scaler.Reservation) (scaler.Change, bool) {
		if !res.State.Live() {
			return scaler.Change{}, false
		}
		c := scaler.Change{}
		ev.Pool, ev.Slot = res.Pool, res.Slot
		if res.State == scaler.Assigned {
			// Idle time of the builder counts from this release.
			sl, err := s.o.Store.Slot(r.Context(), scaler.SlotKey{Pool: res.Pool, Slot: res.Slot})
			if err == nil {
				sl.LastActive = now
				c.Slots = append(c.Slots, sl)
				ev.InstanceID = sl.InstanceID
			}
		}
		freed, released = res.Slot, true
		res.State, res.EndedAt, res.Slot = scaler.Released, now, ""
		c.Events = []scaler.Event{ev}
		return c, true
	})
	if errors.Is(err, scaler.ErrNotFound) {
		// Released before its create arrived (the client picks ids first):
		// keep a tombstone so a late create gets this released reservation.
		tomb := scaler.Reservation{ID: id, State: scaler.Released, CreatedAt: now, EndedAt: now, ExpiresAt: now,
			Reason: "released before it was created"}
		ev.Reason = tomb.Reason
		res, released, err = s.o.Store.CreateReservation(r.Context(), tomb, ev)
	}
	if err != nil {
		s.internal(w, "release", err)
		return
	}
	if released {
		s.o.Logger.Info("reservation released", "reservation", id, "pool", res.Pool, "slot", freed)
		s.o.Scaler.Kick()
		s.Notify()
	}
	writeJSON(w, http.StatusOK, s.view(r.Context(), res, nil))
}

func (s *Server) listReservations(w http.ResponseWriter, r *http.Request) {
	q := r.URL.Query()
	f := store.ReservationFilter{Pool: q.Get("pool")}
	if st := q.Get("state"); st != "" {
		for _, v := range strings.Split(st, ",") {
			rs := scaler.ReservationState(strings.TrimSpace(v))
			if !slices.Contains(scaler.ReservationStates, rs) {
				writeError(w, http.StatusBadRequest, api.CodeBadRequest, fmt.Sprintf("state: %q is not one of pending, ready, released, failed, expired", v))
				return
			}
			f.States = append(f.States, rs)
		}
	}
	if !queryLimit(w, q, &f.Limit) {
		return
	}
	list, err := s.o.Store.Reservations(r.Context(), f)
	if err != nil {
		s.internal(w, "list reservations", err)
		return
	}
	slots, err := s.slotMap(r.Context())
	if err != nil {
		s.internal(w, "list slots", err)
		return
	}
	out := api.ReservationList{Reservations: []api.Reservation{}}
	for _, res := range list {
		out.Reservations = append(out.Reservations, s.view(r.Context(), res, slots))
	}
	writeJSON(w, http.StatusOK, out)
}

// queryLimit sets *limit from the "limit" query parameter, if given. It
// answers 400 and returns false when that is not a non-negative integer.
func queryLimit(w http.ResponseWriter, q url.Values, limit *int) bool {
	l := q.Get("limit")
	if l == "" {
		return true
	}
	n, err := strconv.Atoi(l)
	if err != nil || n < 0 {
		writeError(w, http.StatusBadRequest, api.CodeBadRequest, "limit: must be a non-negative integer")
		return false
	}
	*limit = n
	return true
}

func (s *Server) slotMap(ctx context.Context) (map[scaler.SlotKey]scaler.Slot, error) {
	slots, err := s.o.Store.Slots(ctx)
	if err != nil {
		return nil, err
	}
	m := make(map[scaler.SlotKey]scaler.Slot, len(slots))
	for _, sl := range slots {
		m[sl.Key()] = sl
	}
	return m, nil
}

func slotView(sl scaler.Slot, reservations int) api.Slot {
	return api.Slot{Pool: sl.Pool, Slot: sl.Name, State: string(sl.State), InstanceID: sl.InstanceID, LaunchID: sl.LaunchID, Address: sl.Address,
		InstanceType: sl.InstanceType, Market: sl.Market, Zone: sl.Zone, Weight: sl.Weight, Since: sl.StateSince, LastActive: sl.LastActive,
		DrainReason: sl.DrainReason, Reservations: reservations}
}

func (s *Server) slots(w http.ResponseWriter, r *http.Request) {
	slots, err := s.o.Store.Slots(r.Context())
	if err != nil {
		s.internal(w, "list slots", err)
		return
	}
	count, err := s.assignedCount(r.Context())
	if err != nil {
		s.internal(w, "list reservations", err)
		return
	}
	out := api.SlotList{Slots: []api.Slot{}}
	for _, sl := range slots {
		out.Slots = append(out.Slots, slotView(sl, count[sl.Key()]))
	}
	writeJSON(w, http.StatusOK, out)
}

// assignedCount counts live assigned reservations per slot.
func (s *Server) assignedCount(ctx context.Context) (map[scaler.SlotKey]int, error) {
	live, err := s.o.Store.LiveReservations(ctx)
	if err != nil {
		return nil, err
	}
	count := map[scaler.SlotKey]int{}
	for _, res := range live {
		if res.State == scaler.Assigned {
			count[scaler.SlotKey{Pool: res.Pool, Slot: res.Slot}]++
		}
	}
	return count, nil
}

// operate applies an operator change to one slot.
func (s *Server) operate(w http.ResponseWriter, r *http.Request, kind, reason string, fn func(*scaler.Slot) string) {
	key := scaler.SlotKey{Pool: r.PathValue("pool"), Slot: r.PathValue("slot")}
	now := s.o.Clock.Now()
	var (
		sl      scaler.Slot
		readErr error  // the slot could not be read
		refused string // why fn refused the change
	)
	err := scaler.RetryOnConflict(conflictAttempts, func() error {
		if sl, readErr = s.o.Store.Slot(r.Context(), key); readErr != nil {
			return readErr
		}
		if refused = fn(&sl); refused != "" {
			return nil
		}
		ev := scaler.Event{At: now, Kind: kind, Pool: key.Pool, Slot: key.Slot, InstanceID: sl.InstanceID, Actor: "operator", Reason: reason}
		return s.o.Store.Commit(r.Context(), scaler.Change{Slots: []scaler.Slot{sl}, Events: []scaler.Event{ev}})
	})
	switch {
	case errors.Is(readErr, scaler.ErrNotFound):
		writeError(w, http.StatusNotFound, api.CodeNotFound, fmt.Sprintf("no slot %s; `autoscalerctl slots` lists them", key))
		return
	case readErr != nil:
		s.internal(w, "read slot", readErr)
		return
	case refused != "":
		writeError(w, http.StatusConflict, api.CodeConflict, refused)
		return
	case err != nil:
		s.internal(w, kind, err)
		return
	}
	sl.Version++
	s.o.Logger.Info("operator: slot "+kind, "slot", key, "instance", sl.InstanceID, "reason", reason)
	s.o.Scaler.Kick()
	count, err := s.assignedCount(r.Context())
	if err != nil {
		s.internal(w, "list reservations", err)
		return
	}
	writeJSON(w, http.StatusOK, slotView(sl, count[key]))
}

func (s *Server) drain(w http.ResponseWriter, r *http.Request) {
	now := s.o.Clock.Now()
	s.operate(w, r, scaler.EvDrained, "operator", func(sl *scaler.Slot) string {
		switch sl.State {
		case scaler.Ready:
			sl.State, sl.StateSince, sl.DrainReason = scaler.Draining, now, "operator"
			return ""
		case scaler.Draining:
			sl.DrainReason = "operator"
			return ""
		}
		return fmt.Sprintf("slot %s/%s is %s; only a ready slot can be drained", sl.Pool, sl.Name, sl.State)
	})
}

func (s *Server) undrain(w http.ResponseWriter, r *http.Request) {
	now := s.o.Clock.Now()
	s.operate(w, r, scaler.EvUndrained, "operator", func(sl *scaler.Slot) string {
		switch sl.State {
		case scaler.Draining:
			sl.State, sl.StateSince, sl.DrainReason, sl.LastActive = scaler.Ready, now, "", now
			return ""
		case scaler.Ready:
			return ""
		}
		return fmt.Sprintf("slot %s/%s is %s; only a draining slot can be undrained", sl.Pool, sl.Name, sl.State)
	})
}

func (s *Server) weight(w http.ResponseWriter, r *http.Request) {
	var req api.WeightRequest
	if !decode(w, r, &req) {
		return
	}
	if req.Weight == nil || *req.Weight < 0 || *req.Weight > scaler.MaxWeight {
		writeError(w, http.StatusBadRequest, api.CodeBadRequest, fmt.Sprintf(`weight: required, an integer 0..%d, e.g. {"weight": 100}`, scaler.MaxWeight))
		return
	}
	s.operate(w, r, scaler.EvWeight, fmt.Sprintf("weight %d", *req.Weight), func(sl *scaler.Slot) string {
		sl.Weight = *req.Weight
		return ""
	})
}

func (s *Server) status(w http.ResponseWriter, r *http.Request) {
	slots, err := s.o.Store.Slots(r.Context())
	if err != nil {
		s.internal(w, "list slots", err)
		return
	}
	live, err := s.o.Store.LiveReservations(r.Context())
	if err != nil {
		s.internal(w, "list reservations", err)
		return
	}
	out := api.Status{Pools: []api.PoolStatus{}, Reconcile: reconcileView(s.o.Scaler.Status())}
	if s.o.HAProxy != nil {
		out.HAProxy = s.o.HAProxy()
	}
	var held map[string]int
	if s.o.Held != nil {
		held = s.o.Held()
	}
	for _, p := range s.o.Pools {
		ps := api.PoolStatus{Name: p.Name, Systems: p.Systems, Features: p.Features, MinBuilders: p.MinBuilders, MaxBuilders: p.MaxBuilders,
			WarmPool: p.WarmPool, ReservationsPerBuilder: p.ReservationsPerBuilder, Slots: map[string]int{}, Reservations: map[string]int{},
			HeldConnections: held[p.Name]}
		if ps.Features == nil {
			ps.Features = []string{}
		}
		for _, sl := range slots {
			if sl.Pool == p.Name {
				ps.Slots[string(sl.State)]++
			}
		}
		for _, res := range live {
			if res.Pool == p.Name {
				ps.Reservations[string(res.State)]++
			}
		}
		out.Pools = append(out.Pools, ps)
	}
	writeJSON(w, http.StatusOK, out)
}

func reconcileView(st scaler.RoundStatus) api.ReconcileStatus {
	v := api.ReconcileStatus{LastAt: st.At, DurationSeconds: st.Duration.Seconds(), Rounds: st.Rounds}
	if st.Err != nil {
		v.LastError = st.Err.Error()
	}
	return v
}

func (s *Server) reconcile(w http.ResponseWriter, r *http.Request) {
	ctx, cancel := context.WithTimeout(r.Context(), 5*time.Minute)
	defer cancel()
	if err := s.o.Scaler.Reconcile(ctx); err != nil && ctx.Err() != nil {
		writeError(w, http.StatusServiceUnavailable, api.CodeUnavailable, "reconcile did not finish: "+err.Error())
		return
	}
	writeJSON(w, http.StatusOK, reconcileView(s.o.Scaler.Status()))
}

func (s *Server) events(w http.ResponseWriter, r *http.Request) {
	q := r.URL.Query()
	f := store.EventFilter{Pool: q.Get("pool"), Slot: q.Get("slot"), ReservationID: q.Get("reservation"), Limit: 100}
	if !queryLimit(w, q, &f.Limit) {
		return
	}
	if since := q.Get("since"); since != "" {
		t, err := time.Parse(time.RFC3339Nano, since)
		if err != nil {
			writeError(w, http.StatusBadRequest, api.CodeBadRequest, "since: must be an RFC 3339 time like 2026-01-02T15:04:05Z")
			return
		}
		f.Since = t
	}
	evs, err := s.o.Store.Events(r.Context(), f)
	if err != nil {
		s.internal(w, "list events", err)
		return
	}
	out := api.EventList{Events: []api.Event{}}
	for _, e := range evs {
		out.Events = append(out.Events, api.Event{At: e.At, Kind: e.Kind, Pool: e.Pool, Slot: e.Slot, InstanceID: e.InstanceID,
			ReservationID: e.ReservationID, Actor: e.Actor, Reason: e.Reason})
	}
	writeJSON(w, http.StatusOK, out)
}

func (s *Server) health(w http.ResponseWriter, r *http.Request) {
	if _, err := s.o.Store.Slots(r.Context()); err != nil {
		writeError(w, http.StatusServiceUnavailable, api.CodeUnavailable, "database: "+err.Error())
		return
	}
	writeJSON(w, http.StatusOK, map[string]string{"status": "ok"})
}
