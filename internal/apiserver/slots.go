package apiserver

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"net/http"
	"time"

	"guardianproject.dev/ops/nix-builder-autoscaler/internal/api"
	"guardianproject.dev/ops/nix-builder-autoscaler/scaler"
)

func slotView(sl scaler.Slot, reservations int) api.Slot {
	return api.Slot{Pool: sl.Pool, Slot: sl.Name, State: string(sl.State), InstanceID: sl.InstanceID, LaunchID: sl.LaunchID, Address: sl.Address,
		InstanceType: sl.InstanceType, Market: sl.Market, Zone: sl.Zone, Weight: sl.Weight, Since: sl.StateSince, LastActive: sl.LastActive,
		DrainReason: sl.DrainReason, Reservations: reservations}
}

func (s *Server) slots(w http.ResponseWriter, r *http.Request) {
	f, err := s.fleet(r.Context())
	if err != nil {
		s.internal(w, "read the fleet", err)
		return
	}
	out := api.SlotList{Slots: []api.Slot{}}
	for _, sl := range f.Slots {
		out.Slots = append(out.Slots, slotView(sl, f.Assigned(sl.Key())))
	}
	writeJSON(w, http.StatusOK, out)
}

// IntentTimeout bounds how long an operator command waits for the
// reconciler to apply it. The intent is durable: one that is not applied in
// time is applied by a later round, and the answer says so.
const IntentTimeout = 30 * time.Second

// operate records an operator's intent for one slot, runs a reconcile round
// (the reconciler is the only writer of slots) and answers with the slot as
// that round left it, or why the reconciler refused.
func (s *Server) operate(w http.ResponseWriter, r *http.Request, kind scaler.IntentKind, weight int) {
	key := scaler.SlotKey{Pool: r.PathValue("pool"), Slot: r.PathValue("slot")}
	f, err := s.fleet(r.Context())
	if err != nil {
		s.internal(w, "read the fleet", err)
		return
	}
	if _, ok := f.Slot(key); !ok {
		writeError(w, http.StatusNotFound, api.CodeNotFound, fmt.Sprintf("no slot %s; `autoscalerctl slots` lists them", key))
		return
	}
	in := scaler.Intent{ID: newIntentID(), Kind: kind, Pool: key.Pool, Slot: key.Slot, Weight: weight, At: s.o.Clock.Now(), Actor: "operator"}
	if err := s.o.Store.Commit(r.Context(), scaler.Change{Intents: []scaler.Intent{in}}); err != nil {
		s.internal(w, "record "+string(kind), err)
		return
	}
	s.o.Logger.Info("operator: slot "+string(kind), "slot", key, "weight", weight, "intent", in.ID)
	ctx, cancel := context.WithTimeout(r.Context(), IntentTimeout)
	defer cancel()
	rerr := s.o.Scaler.Reconcile(ctx)
	res, ok := s.o.Scaler.Result(in.ID)
	switch {
	case !ok:
		msg := fmt.Sprintf("%s of slot %s is recorded, and the reconciler will apply it, but it has not yet", kind, key)
		if rerr != nil {
			msg += ": " + rerr.Error()
		}
		writeError(w, http.StatusServiceUnavailable, api.CodeUnavailable, msg)
	case res.Refused != "":
		writeError(w, http.StatusConflict, api.CodeConflict, res.Refused)
	default:
		assigned := 0
		if f, err := s.fleet(r.Context()); err == nil {
			assigned = f.Assigned(key)
		}
		writeJSON(w, http.StatusOK, slotView(res.Slot, assigned))
	}
}

func newIntentID() string {
	b := make([]byte, 12)
	_, _ = rand.Read(b)
	return "i-" + hex.EncodeToString(b)
}

func (s *Server) drain(w http.ResponseWriter, r *http.Request) {
	s.operate(w, r, scaler.IntentDrain, 0)
}

func (s *Server) undrain(w http.ResponseWriter, r *http.Request) {
	s.operate(w, r, scaler.IntentUndrain, 0)
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
	s.operate(w, r, scaler.IntentWeight, *req.Weight)
}
