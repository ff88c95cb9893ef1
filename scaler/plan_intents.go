package scaler

import "fmt"

// intents turns the operators' and clients' requests into actions, before
// any other rule, so that the rest of the round plans with them applied: a
// drained slot takes no new reservation, an undrained one does. Each intent
// becomes exactly one action that names it; the reconciler deletes the
// intent in the commit that applies it.
func (p *planner) intents() {
	for _, in := range p.obs.Intents {
		s := p.slot(in.Key())
		if s == nil {
			p.forget(in, fmt.Sprintf("no slot %s", in.Key()))
			continue
		}
		switch in.Kind {
		case IntentDrain:
			p.drainIntent(s, in)
		case IntentUndrain:
			p.undrainIntent(s, in)
		case IntentWeight:
			p.emit(SetWeight{Pool: s.Pool, Slot: s.Name, Instance: s.InstanceID, Weight: in.Weight, Intent: in.ID})
			s.Weight = in.Weight
		case IntentReleased:
			if !in.At.After(s.LastActive) {
				p.forget(in, "")
				continue
			}
			// The builder's idle time counts from the release, not from
			// the last time a round saw it busy.
			p.emit(Touch{Pool: s.Pool, Slot: s.Name, At: in.At, Intent: in.ID})
			s.LastActive = in.At
		default:
			p.forget(in, fmt.Sprintf("unknown intent %q", in.Kind))
		}
	}
}

func (p *planner) drainIntent(s *Slot, in Intent) {
	switch s.State {
	case Ready:
		p.drain(s, "operator", in.ID)
	case Draining:
		// The operator's reason replaces the policy's; the drain timeout
		// still counts from when draining began.
		p.emit(Drain{Pool: s.Pool, Slot: s.Name, Instance: s.InstanceID, Reason: "operator", Intent: in.ID})
		s.DrainReason = "operator"
	default:
		p.forget(in, fmt.Sprintf("slot %s is %s; only a ready slot can be drained", s.Key(), s.State))
	}
}

func (p *planner) undrainIntent(s *Slot, in Intent) {
	switch s.State {
	case Draining:
		p.emit(Undrain{Pool: s.Pool, Slot: s.Name, Instance: s.InstanceID, Intent: in.ID, Reason: "operator"})
		p.setState(s, Ready)
		s.DrainReason, s.LastActive = "", p.now
	case Ready:
		p.forget(in, "")
	default:
		p.forget(in, fmt.Sprintf("slot %s is %s; only a draining slot can be undrained", s.Key(), s.State))
	}
}

// forget drops an intent that changes nothing; refused says why it was
// refused ("" when what it asked is already true).
func (p *planner) forget(in Intent, refused string) {
	p.emit(Forget{Pool: in.Pool, Slot: in.Slot, Intent: in.ID, Refused: refused})
}

// slot returns the working copy of the slot named key, or nil.
func (p *planner) slot(key SlotKey) *Slot {
	for i := range p.slots {
		if p.slots[i].Key() == key {
			return &p.slots[i]
		}
	}
	return nil
}
