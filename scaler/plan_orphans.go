package scaler

import "sort"

// orphans terminates instances of this cluster that no slot claims.
func (p *planner) orphans() {
	ids := make([]string, 0, len(p.byID))
	for id := range p.byID {
		ids = append(ids, id)
	}
	sort.Strings(ids)
	for _, id := range ids {
		in := p.byID[id]
		stopped := in.State == InstanceStopped || in.State == InstanceStopping
		if p.claimed[id] || in.State.Gone() && !stopped {
			continue
		}
		if stopped {
			p.emit(Terminate{Pool: in.Pool, Instance: id, Cause: CauseOrphan, Reason: "orphan: stopped outside the daemon"})
			continue
		}
		if s := p.freeSlot(in); s != nil {
			// A healthy builder of ours whose slot is free (its record was
			// lost): take it back rather than pay for a new one.
			p.claimed[id] = true
			s.InstanceID, s.LaunchID = in.ID, in.LaunchID
			p.emit(Adopt{Pool: s.Pool, Slot: s.Name, Instance: id, To: Booting, Reason: "untracked instance tagged for this free slot"})
			p.setState(s, Booting)
			continue
		}
		if p.now.Sub(in.LaunchedAt) < p.pol.OrphanGrace {
			continue
		}
		p.emit(Terminate{Pool: in.Pool, Instance: id, Cause: CauseOrphan, Reason: "orphan: no slot tracks it"})
	}
}

// freeSlot returns the empty, configured slot an untracked running instance
// is tagged for, or nil.
func (p *planner) freeSlot(in Instance) *Slot {
	if in.State != InstanceRunning || in.Slot == "" {
		return nil
	}
	pp, ok := p.poolIndex[in.Pool]
	if !ok || SlotNumber(in.Slot) < 1 || SlotNumber(in.Slot) > pp.MaxBuilders {
		return nil
	}
	for i := range p.slots {
		s := &p.slots[i]
		if s.Pool == in.Pool && s.Name == in.Slot && s.State == Empty {
			return s
		}
	}
	return nil
}
