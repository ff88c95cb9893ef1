package scaler

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"strings"
)

// The actions that call a provider: launch and terminate.

func newLaunchID() string {
	b := make([]byte, 8)
	_, _ = rand.Read(b)
	return hex.EncodeToString(b)
}

func (a *applier) launch(ctx context.Context, act Launch) error {
	key := SlotKey{act.Pool, act.Slot}
	p := a.r.o.Providers[act.Pool]
	if p == nil {
		return fmt.Errorf("no provider for pool %s", act.Pool)
	}
	launchID := newLaunchID()
	// The slot says "launching" with its launch id before the provider is
	// called: after a crash the instance is found again by that id.
	_, err := a.updateSlot(ctx, key, func(s *Slot) bool {
		if s.State != Empty {
			return false
		}
		*s = Slot{Pool: s.Pool, Name: s.Name, State: Launching, LaunchID: launchID, StateSince: a.now,
			LastActive: s.LastActive, Weight: s.Weight, Version: s.Version}
		return true
	})
	if err != nil {
		return err
	}
	cctx, cancel := context.WithTimeout(ctx, a.r.o.CallTimeout)
	in, lerr := p.Launch(cctx, LaunchRequest{Pool: act.Pool, Slot: act.Slot, LaunchID: launchID})
	cancel()
	if lerr != nil {
		a.r.launchFailed(act.Pool, a.now, lerr)
		a.r.o.Recorder.Launched(act.Pool, lerr)
		a.log().Error("launch failed", "slot", key, "err", lerr)
		ev := a.event(EvFailed, act)
		ev.Reason = "launch failed: " + lerr.Error()
		_, err = a.updateSlot(ctx, key, func(s *Slot) bool {
			if s.State != Launching || s.LaunchID != launchID || s.InstanceID != "" {
				return false
			}
			*s = Slot{Pool: s.Pool, Name: s.Name, State: Empty, StateSince: a.now, LastActive: s.LastActive, Weight: s.Weight, Version: s.Version}
			return true
		}, ev)
		return err
	}
	a.r.launchSucceeded(act.Pool)
	a.r.o.Recorder.Launched(act.Pool, nil)
	launched := in.LaunchedAt
	if launched.IsZero() {
		launched = a.now
	}
	a.r.boots.launch(in.ID, launched)
	ev := a.event(EvLaunched, act)
	ev.InstanceID = in.ID
	_, err = a.updateSlot(ctx, key, func(s *Slot) bool {
		if s.LaunchID != launchID {
			return false
		}
		s.InstanceID, s.InstanceType, s.Market, s.Zone = in.ID, in.Type, in.Market, in.Zone
		return true
	}, launchedEvent(ev, in))
	a.log().Info("builder launched", "slot", key, "instance", in.ID, "type", in.Type, "market", in.Market, "zone", in.Zone, "reason", act.Reason)
	return err
}

// quiet closes a drained builder to new connections and reports whether
// no session is open on it, so it may be terminated (Quiescer). Without a
// Quiescer, Plan's observation is all there is.
func (a *applier) quiet(ctx context.Context, key SlotKey, act Terminate) bool {
	q, ok := a.r.o.Readiness.(Quiescer)
	if !ok {
		return true
	}
	cctx, cancel := context.WithTimeout(ctx, a.r.o.CallTimeout)
	n, err := q.Quiesce(cctx, key)
	cancel()
	switch {
	case err != nil:
		a.log().Warn("not terminating a drained builder yet: cannot close it to new connections first (retried next round)",
			"slot", key, "instance", act.Instance, "err", err)
		a.r.o.Recorder.CallFailed("quiesce")
		return false
	case n > 0:
		a.log().Info("a session reached the drained builder after it was seen idle; terminating it once the session ends",
			"slot", key, "instance", act.Instance, "sessions", n)
		return false
	}
	return true
}

func (a *applier) terminate(ctx context.Context, act Terminate) error {
	key := SlotKey{act.Pool, act.Slot}
	if act.IfIdle && !a.quiet(ctx, key, act) {
		return nil // the slot stays draining; a later round decides again
	}
	if act.Slot != "" {
		_, err := a.updateSlot(ctx, key, func(s *Slot) bool {
			if s.InstanceID != act.Instance || s.State == Terminating || s.State == Empty {
				return false
			}
			if s.InstanceID == "" {
				*s = Slot{Pool: s.Pool, Name: s.Name, State: Empty, StateSince: a.now, LastActive: s.LastActive, Weight: s.Weight, Version: s.Version}
			} else {
				s.State, s.StateSince, s.DrainReason = Terminating, a.now, act.Reason
			}
			return true
		}, a.event(EvTerminated, act))
		if err != nil {
			return err
		}
	}
	if act.Instance == "" {
		a.log().Info("slot freed", "slot", key, "reason", act.Reason)
		return nil
	}
	if act.Slot == "" {
		if err := a.r.o.Store.Commit(ctx, Change{Events: []Event{a.event(EvTerminated, act)}}); err != nil {
			return err
		}
	}
	ok, err := a.callTerminate(ctx, key, act.Instance, act.Reason)
	if ok {
		a.r.o.Recorder.Terminated(act.Pool, act.Cause)
	}
	return err
}

func (a *applier) retryTerminate(ctx context.Context, act RetryTerminate) error {
	_, err := a.callTerminate(ctx, SlotKey{act.Pool, act.Slot}, act.Instance, act.Reason)
	return err
}

// callTerminate asks the provider that listed the instance (or the slot's
// pool's) to terminate it, and reports whether it did. A failed call is
// not an error of the round: the slot stays terminating and Plan asks
// again (RetryTerminate).
func (a *applier) callTerminate(ctx context.Context, key SlotKey, instance, reason string) (bool, error) {
	p := a.owner[instance]
	if p == nil {
		p = a.r.o.Providers[key.Pool]
	}
	if p == nil {
		return false, fmt.Errorf("no provider knows instance %s", instance)
	}
	cctx, cancel := context.WithTimeout(ctx, a.r.o.CallTimeout)
	err := p.Terminate(cctx, instance)
	cancel()
	if err != nil {
		a.r.o.Recorder.CallFailed("terminate")
		a.log().Error("terminate failed; will retry", "slot", key, "instance", instance, "err", err)
		return false, nil
	}
	a.log().Info("builder terminated", "slot", key, "instance", instance, "reason", reason)
	return true, nil
}

// launchedEvent records what was bought (market, type, zone) with the
// reason it was launched, so costs can be traced from the event log.
func launchedEvent(ev Event, in Instance) Event {
	var what []string
	for _, w := range []string{in.Market, in.Type, in.Zone} {
		if w != "" {
			what = append(what, w)
		}
	}
	if len(what) > 0 {
		ev.Reason = strings.Join(what, " ") + ": " + ev.Reason
	}
	return ev
}
