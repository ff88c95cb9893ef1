package apiserver

import (
	"context"
	"net/http"
	"strconv"
	"time"

	"guardianproject.dev/ops/nix-builder-autoscaler/internal/api"
	"guardianproject.dev/ops/nix-builder-autoscaler/internal/store"
	"guardianproject.dev/ops/nix-builder-autoscaler/scaler"
)

func (s *Server) status(w http.ResponseWriter, r *http.Request) {
	f, err := s.fleet(r.Context())
	if err != nil {
		s.internal(w, "read the fleet", err)
		return
	}
	slots, live := f.Slots, f.Reservations
	out := api.Status{Pools: []api.PoolStatus{}, Reconcile: reconcileView(s.o.Scaler.Status())}
	if s.o.HAProxy != nil {
		out.HAProxy = s.o.HAProxy()
	}
	var held, queued map[string]int
	if s.o.Held != nil {
		held = s.o.Held()
	}
	if s.o.Queued != nil {
		queued = s.o.Queued()
	}
	for _, p := range s.o.Pools {
		ps := api.PoolStatus{Name: p.Name, Systems: p.Systems, Features: p.Features, MinBuilders: p.MinBuilders, MaxBuilders: p.MaxBuilders,
			WarmPool: p.WarmPool, ReservationsPerBuilder: p.ReservationsPerBuilder, Slots: map[string]int{}, Reservations: map[string]int{},
			HeldConnections: held[p.Name], QueuedConnections: queued[p.Name]}
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
	ph := st.Phases
	v := api.ReconcileStatus{LastAt: st.At, DurationSeconds: st.Duration.Seconds(), Rounds: st.Rounds,
		Phases: api.RoundPhases{
			Observe: ph.Observe.Seconds(), Store: ph.Store.Seconds(), List: ph.List.Seconds(), Servers: ph.Servers.Seconds(),
			Plan: ph.Plan.Seconds(), Apply: ph.Apply.Seconds(), Publish: ph.Publish.Seconds(), Push: ph.Push.Seconds(),
		}}
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
	f := store.EventFilter{Pool: q.Get("pool"), Slot: q.Get("slot"), ReservationID: q.Get("reservation")}
	limit, ok := pageLimit(w, q)
	if !ok {
		return
	}
	if f.Before, ok = seqFromCursor(w, q); !ok {
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
	f.Limit = limit + 1 // one more tells whether there is a next page
	evs, err := s.o.Store.LoggedEvents(r.Context(), f)
	if err != nil {
		s.internal(w, "list events", err)
		return
	}
	out := api.EventList{Events: []api.Event{}}
	if len(evs) > limit {
		// The oldest is the extra one: the next page ends before the
		// oldest of this one.
		evs = evs[1:]
		out.Next = encodeCursor(cursorEvents, strconv.FormatInt(evs[0].Seq, 10))
	}
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
