package apiserver

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"net/http"
	"regexp"
	"slices"
	"strings"
	"time"

	"guardianproject.dev/ops/nix-builder-autoscaler/internal/api"
	"guardianproject.dev/ops/nix-builder-autoscaler/internal/config"
	"guardianproject.dev/ops/nix-builder-autoscaler/internal/store"
	"guardianproject.dev/ops/nix-builder-autoscaler/scaler"
)

// MinLease is the shortest lease a reservation may ask for: a lease must
// outlive a heartbeat's round trip and the reconcile round that would
// otherwise expire it; a shorter one only makes a reservation that expires
// while its client still wants it.
const MinLease = time.Second

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
		Source: req.Source, State: scaler.Pending, Lease: lease, CreatedAt: now, ExpiresAt: now.Add(lease)}
	if res.Pool == "" {
		res.Pool = s.matchPool(req.System, req.Features)
	}
	if res.Pool == "" {
		res.State, res.EndedAt = scaler.Failed, now
		res.Reason = truncate(fmt.Sprintf("no pool serves system %s with features [%s]; configured: %s",
			req.System, strings.Join(req.Features, " "), s.poolSummary()), maxReason)
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
	if created {
		s.wrote(got.ID)
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
	if msg := checkSystem(req.System); msg != "" {
		return 0, msg
	}
	if msg := checkFeatures(req.Features); msg != "" {
		return 0, msg
	}
	req.Features = slices.Compact(slices.Sorted(slices.Values(req.Features)))
	if msg := checkText("owner", req.Owner, maxOwner); msg != "" {
		return 0, msg
	}
	if msg := checkSource(req.Source, false); msg != "" {
		return 0, msg
	}
	if req.Pool != "" {
		p, ok := s.pool(req.Pool)
		if !ok {
			return 0, fmt.Sprintf("pool: no pool named %s; configured: %s", quote(req.Pool), s.poolSummary())
		}
		if !p.Serves(req.System, req.Features) {
			return 0, fmt.Sprintf("pool: %s does not serve system %s with features [%s]", req.Pool, req.System, strings.Join(req.Features, " "))
		}
	}
	lease = s.o.Reservations.Lease.D()
	if req.Lease != "" {
		d, err := time.ParseDuration(req.Lease)
		if err != nil {
			return 0, fmt.Sprintf("lease: %s is not a duration; write it like \"10m\" or \"1h30m\"", quote(req.Lease))
		}
		if d < MinLease {
			return 0, fmt.Sprintf("lease: %s is shorter than the minimum %s; a lease must outlive the heartbeats that renew it", d, MinLease)
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

// view renders a reservation, with its builder's address from the fleet f
// (nil: the current view, or the store before the first).
func (s *Server) view(ctx context.Context, r scaler.Reservation, f *scaler.View) api.Reservation {
	v := api.Reservation{ID: r.ID, Pool: r.Pool, System: r.System, Features: r.Features, Owner: r.Owner, Source: r.Source, State: string(r.State),
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
		if f == nil {
			f = s.o.Views.Current()
		}
		if sl, ok := s.slotOf(ctx, f, scaler.SlotKey{Pool: r.Pool, Slot: r.Slot}); ok {
			v.Address, v.InstanceID = sl.Address, sl.InstanceID
		}
	}
	return v
}

func (s *Server) lookup(w http.ResponseWriter, r *http.Request, f *scaler.View) (scaler.Reservation, bool) {
	res, err := s.reservation(r.Context(), f, r.PathValue("id"))
	if errors.Is(err, scaler.ErrNotFound) {
		writeError(w, http.StatusNotFound, api.CodeNotFound, fmt.Sprintf("no reservation %s", quote(r.PathValue("id"))))
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
			writeError(w, http.StatusBadRequest, api.CodeBadRequest, fmt.Sprintf("wait: %s is not a duration; write it like \"30s\"", quote(q)))
			return
		}
		wait = min(d, s.o.Reservations.MaxPoll.D())
	}
	timer := s.o.Clock.NewTimer(wait)
	defer timer.Stop()
	for {
		// Take the channels before reading, so a change between the read
		// and the wait still wakes us: a new view, or a write of this API.
		f, published := s.o.Views.Next()
		written := s.notify.wait()
		res, ok := s.lookup(w, r, f)
		if !ok {
			return
		}
		if res.State != scaler.Pending || wait == 0 {
			writeJSON(w, http.StatusOK, s.view(r.Context(), res, f))
			return
		}
		select {
		case <-published:
		case <-written:
		case <-timer.C():
			wait = 0
		case <-r.Context().Done():
			return
		}
	}
}

// updateReservation applies fn to the stored reservation and commits,
// retrying when the reconciler changed it meanwhile (see retryConflict).
// fn runs once per attempt, on a fresh read; what it records for the
// caller must be set anew each time.
func (s *Server) updateReservation(ctx context.Context, id string, fn func(*scaler.Reservation) (scaler.Change, bool)) (scaler.Reservation, error) {
	defer s.locks.lock(id)()
	var res scaler.Reservation
	err := s.retryConflict(ctx, func() error {
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
		if live = res.State.Live(); !live {
			return scaler.Change{}, false
		}
		res.ExpiresAt = now.Add(res.Lease)
		return scaler.Change{}, true
	})
	if err == nil && live {
		s.wrote(id)
	}
	switch {
	case errors.Is(err, scaler.ErrNotFound):
		writeError(w, http.StatusNotFound, api.CodeNotFound, fmt.Sprintf("no reservation %s", quote(id)))
	case errors.Is(err, errBusy):
		writeBusy(w, "heartbeat", err)
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
		// An attempt that lost a conflict released nothing: only the
		// attempt that commits (or sees the reservation ended) decides.
		freed, released = "", false
		if !res.State.Live() {
			return scaler.Change{}, false
		}
		c := scaler.Change{}
		ev.Pool, ev.Slot = res.Pool, res.Slot
		if res.State == scaler.Assigned {
			// The builder's idle time counts from this release; the
			// reconciler, the slot's only writer, records that.
			c.Intents = []scaler.Intent{{ID: newIntentID(), Kind: scaler.IntentReleased, Pool: res.Pool, Slot: res.Slot, At: now, Actor: "api"}}
			if sl, ok := s.slotOf(r.Context(), s.o.Views.Current(), scaler.SlotKey{Pool: res.Pool, Slot: res.Slot}); ok {
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
	if errors.Is(err, errBusy) {
		writeBusy(w, "release", err)
		return
	}
	if err != nil {
		s.internal(w, "release", err)
		return
	}
	if released {
		s.wrote(id)
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
				writeError(w, http.StatusBadRequest, api.CodeBadRequest, fmt.Sprintf("state: %s is not one of pending, ready, released, failed, expired", quote(v)))
				return
			}
			f.States = append(f.States, rs)
		}
	}
	limit, ok := pageLimit(w, q)
	if !ok {
		return
	}
	if f.After, ok = keyFromCursor(w, q, cursorReservations); !ok {
		return
	}
	f.Limit = limit + 1 // one more tells whether there is a next page
	list, err := s.o.Store.Reservations(r.Context(), f)
	if err != nil {
		s.internal(w, "list reservations", err)
		return
	}
	out := api.ReservationList{Reservations: []api.Reservation{}}
	if len(list) > limit {
		list = list[:limit]
		last := list[limit-1]
		out.Next = keyCursor(cursorReservations, store.ListKey{CreatedAt: last.CreatedAt, ID: last.ID})
	}
	fleet, err := s.fleet(r.Context())
	if err != nil {
		s.internal(w, "read the fleet", err)
		return
	}
	for _, res := range list {
		out.Reservations = append(out.Reservations, s.view(r.Context(), res, fleet))
	}
	writeJSON(w, http.StatusOK, out)
}
