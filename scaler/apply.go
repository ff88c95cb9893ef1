package scaler

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"time"
)

// applier carries one round's context while actions are applied.
type applier struct {
	r       *Reconciler
	now     time.Time
	owner   map[string]Provider // instance id → provider that listed it
	changed bool
	// results of the intents applied or refused this round, by id.
	results map[string]IntentResult
	// pushes are the slots whose load balancer state changed this round.
	pushes []SlotKey
}

const actor = "reconciler"

func (a *applier) event(kind string, act Action) Event {
	t := act.describe()
	ev := Event{At: a.now, Kind: kind, Pool: t.Pool, Slot: t.Slot, InstanceID: t.Instance,
		ReservationID: t.Reservation, Actor: actor, Reason: t.Reason}
	if t.Intent != "" {
		// Applied by the reconciler, decided by the operator who asked.
		ev.Actor = "operator"
	}
	return ev
}

// conflictAttempts bounds how often the reconciler re-reads a row that a
// concurrent writer changed; after that the round ends and is kicked again.
const conflictAttempts = 5

// updateSlot re-reads a slot and applies fn until the commit does not
// conflict, so a concurrent change is merged, never overwritten. fn returns
// false to skip (the slot no longer needs the change).
func (a *applier) updateSlot(ctx context.Context, key SlotKey, fn func(*Slot) bool, evs ...Event) (Slot, error) {
	return a.updateSlotFor(ctx, key, "", fn, evs...)
}

// updateSlotFor is updateSlot for an action that applies intent (when not
// empty): the intent is deleted in the same commit, and its result (the
// slot as committed, or as it was when fn skipped) is recorded for the API.
func (a *applier) updateSlotFor(ctx context.Context, key SlotKey, intent string, fn func(*Slot) bool, evs ...Event) (Slot, error) {
	var s Slot
	err := RetryOnConflict(conflictAttempts, func() error {
		var err error
		if s, err = a.r.o.Store.Slot(ctx, key); err != nil {
			return err
		}
		c := Change{Events: evs}
		if intent != "" {
			c.DoneIntents = []string{intent}
		}
		if fn(&s) {
			c.Slots = []Slot{s}
		} else if intent == "" {
			return nil
		}
		if err := a.r.o.Store.Commit(ctx, c); err != nil {
			return err
		}
		a.changed = true
		if len(c.Slots) > 0 {
			s.Version++
		}
		return nil
	})
	if err == nil && intent != "" {
		a.result(intent, IntentResult{Slot: s})
	}
	return s, err
}

// result records how an intent was dealt with, for Reconciler.Result.
func (a *applier) result(intent string, res IntentResult) {
	if a.results == nil {
		a.results = map[string]IntentResult{}
	}
	a.results[intent] = res
}

// push asks the load balancer to take s's state and weight at once, after
// the round has published its view (see Pusher).
func (a *applier) push(s Slot) { a.pushes = append(a.pushes, s.Key()) }

// updateReservation is updateSlot for a reservation; it reports whether it
// committed a change.
func (a *applier) updateReservation(ctx context.Context, id string, fn func(*Reservation) bool, evs ...Event) (bool, error) {
	committed := false
	err := RetryOnConflict(conflictAttempts, func() error {
		res, err := a.r.o.Store.Reservation(ctx, id)
		if err != nil {
			return err
		}
		if !fn(&res) {
			return nil
		}
		if err := a.r.o.Store.Commit(ctx, Change{Reservations: []Reservation{res}, Events: evs}); err != nil {
			return err
		}
		a.changed, committed = true, true
		return nil
	})
	return committed, err
}

func (a *applier) log() *slog.Logger { return a.r.o.Logger }

// apply carries out one action; each type has its own method below.
func (a *applier) apply(ctx context.Context, act Action) error {
	switch act := act.(type) {
	case Launch:
		return a.launch(ctx, act)
	case Adopt:
		return a.adopt(ctx, act)
	case Advance:
		return a.advance(ctx, act)
	case Bind:
		return a.bind(ctx, act)
	case Touch:
		return a.touch(ctx, act)
	case Drain:
		return a.drain(ctx, act)
	case Undrain:
		return a.undrain(ctx, act)
	case SetWeight:
		return a.weight(ctx, act)
	case Forget:
		return a.forget(ctx, act)
	case Terminate:
		return a.terminate(ctx, act)
	case RetryTerminate:
		return a.retryTerminate(ctx, act)
	case Assign:
		return a.assign(ctx, act)
	case Requeue:
		return a.requeue(ctx, act)
	case EndReservation:
		return a.end(ctx, act)
	}
	return fmt.Errorf("no applier for action %T", act)
}

func (a *applier) adopt(ctx context.Context, act Adopt) error {
	key := SlotKey{act.Pool, act.Slot}
	_, err := a.updateSlot(ctx, key, func(s *Slot) bool {
		switch {
		case act.To == Booting && s.State == Empty:
			// An untracked builder taken back into its free slot.
			*s = Slot{Pool: s.Pool, Name: s.Name, State: Booting, InstanceID: act.Instance, StateSince: a.now,
				LastActive: a.now, Weight: s.Weight, Version: s.Version}
			return true
		case act.To == "" && s.State == Launching && s.InstanceID == "":
			s.InstanceID = act.Instance
			return true
		}
		return false
	}, a.event(EvAdopted, act))
	a.log().Info("instance adopted", "slot", key, "instance", act.Instance, "reason", act.Reason)
	return err
}

func (a *applier) advance(ctx context.Context, act Advance) error {
	key := SlotKey{act.Pool, act.Slot}
	kind := map[SlotState]string{Booting: EvBooted, Ready: EvReady, Empty: EvEmptied}[act.To]
	var from SlotState
	s, err := a.updateSlot(ctx, key, func(s *Slot) bool {
		if s.InstanceID != act.Instance {
			return false
		}
		from = s.State
		s.State, s.StateSince = act.To, a.now
		switch act.To {
		case Ready:
			s.LastActive = a.now
		case Empty:
			*s = Slot{Pool: s.Pool, Name: s.Name, State: Empty, StateSince: a.now, LastActive: s.LastActive, Weight: s.Weight, Version: s.Version}
		}
		return true
	}, a.event(kind, act))
	if err != nil {
		return err
	}
	a.log().Info("slot "+string(act.To), "slot", key, "from", from, "instance", act.Instance, "reason", act.Reason)
	switch {
	case act.To == Booting && from == Launching:
		a.r.boots.run(act.Instance, a.now)
	case act.To == Ready && from == Binding && s.State == Ready:
		a.r.boots.ready(act.Pool, act.Instance, a.now)
	}
	if act.To == Ready && s.State == Ready {
		a.push(s)
	}
	if act.To == Empty && a.r.o.Readiness != nil {
		a.unbind(ctx, key)
	}
	return nil
}

func (a *applier) bind(ctx context.Context, act Bind) error {
	if a.r.o.Readiness == nil {
		return nil
	}
	key := SlotKey{act.Pool, act.Slot}
	cctx, cancel := context.WithTimeout(ctx, a.r.o.CallTimeout)
	err := a.r.o.Readiness.Bind(cctx, key, act.Addr)
	cancel()
	if err != nil {
		// Not fatal for the round: retried next round, and the slot's
		// bind timeout replaces a builder that can never be bound.
		a.log().Error("bind failed", "slot", key, "instance", act.Instance, "addr", act.Addr, "err", err)
		a.r.o.Recorder.CallFailed("bind")
		return nil
	}
	var from SlotState
	s, err := a.updateSlot(ctx, key, func(s *Slot) bool {
		if s.InstanceID != act.Instance {
			return false
		}
		from = s.State
		if s.State == Booting {
			s.State, s.StateSince = Binding, a.now
		}
		s.Address = act.Addr
		return true
	}, a.event(EvBound, act))
	if err != nil {
		return err
	}
	if from == Booting && s.State == Binding {
		// Out of maintenance now, so that HAProxy's health checks of the
		// builder start without waiting for the agent's next check.
		a.push(s)
	}
	a.log().Info("slot bound", "slot", key, "instance", act.Instance, "addr", act.Addr)
	return nil
}

func (a *applier) touch(ctx context.Context, act Touch) error {
	at := a.now
	if !act.At.IsZero() {
		at = act.At
	}
	_, err := a.updateSlotFor(ctx, SlotKey{act.Pool, act.Slot}, act.Intent, func(s *Slot) bool {
		if !at.After(s.LastActive) {
			return false
		}
		s.LastActive = at
		return true
	})
	return err
}

func (a *applier) drain(ctx context.Context, act Drain) error {
	key := SlotKey{act.Pool, act.Slot}
	var refused string
	s, err := a.updateSlotFor(ctx, key, act.Intent, func(s *Slot) bool {
		switch {
		case s.State == Ready:
			s.State, s.StateSince, s.DrainReason = Draining, a.now, act.Reason
			return true
		case s.State == Draining && act.Intent != "":
			s.DrainReason = act.Reason
			return true
		}
		refused = fmt.Sprintf("slot %s is %s; only a ready slot can be drained", key, s.State)
		return false
	}, a.event(EvDrained, act))
	if err != nil {
		return err
	}
	if refused != "" {
		if act.Intent != "" {
			a.result(act.Intent, IntentResult{Refused: refused, Slot: s})
		}
		return nil
	}
	a.push(s)
	a.log().Info("slot draining", "slot", key, "instance", act.Instance, "reason", act.Reason)
	return nil
}

func (a *applier) undrain(ctx context.Context, act Undrain) error {
	key := SlotKey{act.Pool, act.Slot}
	var refused string
	ev := a.event(EvUndrained, act)
	s, err := a.updateSlotFor(ctx, key, act.Intent, func(s *Slot) bool {
		switch {
		case s.State != Draining:
			refused = fmt.Sprintf("slot %s is %s; only a draining slot can be undrained", key, s.State)
			return false
		case act.Intent == "" && (s.DrainReason != DrainIdle || s.InstanceID != act.Instance):
			// The policy takes back only its own idle drain of this builder.
			refused = fmt.Sprintf("slot %s is draining for %q", key, s.DrainReason)
			return false
		}
		s.State, s.StateSince, s.DrainReason, s.LastActive = Ready, a.now, "", a.now
		return true
	}, ev)
	if err != nil {
		return err
	}
	if refused != "" {
		if act.Intent != "" {
			a.result(act.Intent, IntentResult{Refused: refused, Slot: s})
		}
		return nil
	}
	a.push(s)
	a.log().Info("slot undrained", "slot", key, "instance", act.Instance, "reason", act.Reason)
	return nil
}

func (a *applier) weight(ctx context.Context, act SetWeight) error {
	key := SlotKey{act.Pool, act.Slot}
	s, err := a.updateSlotFor(ctx, key, act.Intent, func(s *Slot) bool {
		if s.Weight == act.Weight {
			return false
		}
		s.Weight = act.Weight
		return true
	}, a.event(EvWeight, act))
	if err != nil {
		return err
	}
	a.push(s)
	a.log().Info("slot weight set", "slot", key, "instance", act.Instance, "weight", act.Weight)
	return nil
}

// forget deletes an intent that changes nothing, recording why it was
// refused (if it was).
func (a *applier) forget(ctx context.Context, act Forget) error {
	s, err := a.r.o.Store.Slot(ctx, SlotKey{act.Pool, act.Slot})
	if err != nil && !errors.Is(err, ErrNotFound) {
		return err
	}
	if err := a.r.o.Store.Commit(ctx, Change{DoneIntents: []string{act.Intent}}); err != nil {
		return err
	}
	a.changed = true
	a.result(act.Intent, IntentResult{Refused: act.Refused, Slot: s})
	if act.Refused != "" {
		a.log().Info("intent refused", "intent", act.Intent, "slot", SlotKey{act.Pool, act.Slot}, "reason", act.Refused)
	}
	return nil
}

func (a *applier) assign(ctx context.Context, act Assign) error {
	key := SlotKey{act.Pool, act.Slot}
	var wait time.Duration
	ok, err := a.updateReservation(ctx, act.Reservation, func(res *Reservation) bool {
		if res.State != Pending {
			return false
		}
		res.State, res.Slot, res.AssignedAt = Assigned, act.Slot, a.now
		wait = max(a.now.Sub(res.CreatedAt), 0) // created after the round began
		return true
	}, a.event(EvAssigned, act))
	if err != nil || !ok {
		return err
	}
	a.r.o.Recorder.Assigned(act.Pool, wait)
	a.log().Info("reservation assigned", "reservation", act.Reservation, "slot", key, "instance", act.Instance, "wait", wait)
	_, err = a.updateSlot(ctx, key, func(s *Slot) bool {
		s.LastActive = a.now
		return true
	})
	return err
}

func (a *applier) requeue(ctx context.Context, act Requeue) error {
	_, err := a.updateReservation(ctx, act.Reservation, func(res *Reservation) bool {
		if res.State != Assigned || res.Slot != act.Slot {
			return false
		}
		res.State, res.Slot, res.AssignedAt = Pending, "", time.Time{}
		return true
	}, a.event(EvRequeued, act))
	a.log().Warn("reservation back to pending", "reservation", act.Reservation, "slot", SlotKey{act.Pool, act.Slot}, "reason", act.Reason)
	return err
}

// end ends a live reservation as failed or expired.
func (a *applier) end(ctx context.Context, act EndReservation) error {
	state, kind := Failed, EvFailed
	if act.State == Expired {
		state, kind = Expired, EvExpired
	}
	ok, err := a.updateReservation(ctx, act.Reservation, func(res *Reservation) bool {
		if !res.State.Live() {
			return false
		}
		res.State, res.EndedAt, res.Reason = state, a.now, act.Reason
		return true
	}, a.event(kind, act))
	if ok && state == Expired {
		a.r.o.Recorder.LeaseExpired(act.Pool)
	}
	if ok {
		a.log().Warn("reservation "+string(state), "reservation", act.Reservation, "pool", act.Pool, "slot", act.Slot, "reason", act.Reason)
	}
	return err
}

func (a *applier) unbind(ctx context.Context, key SlotKey) {
	cctx, cancel := context.WithTimeout(ctx, a.r.o.CallTimeout)
	defer cancel()
	if err := a.r.o.Readiness.Bind(cctx, key, ""); err != nil {
		a.log().Warn("could not reset the server address of an empty slot", "slot", key, "err", err)
	}
}
