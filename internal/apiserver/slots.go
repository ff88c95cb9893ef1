package apiserver

import (
	"context"
	"errors"
	"fmt"
	"net/http"

	"guardianproject.dev/ops/nix-builder-autoscaler/internal/api"
	"guardianproject.dev/ops/nix-builder-autoscaler/scaler"
)

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
