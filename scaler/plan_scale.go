package scaler

import (
	"fmt"
	"sort"
	"time"
)

// active counts the pool's builders that are, or will soon be, serving.
func (p *planner) active(pool string) int {
	n := 0
	for _, s := range p.slots {
		if s.Pool == pool && (s.State.Starting() || s.State == Ready) {
			n++
		}
	}
	return n
}

// demand counts the pool's live reservations that need a serving builder:
// pending ones and those on a builder that is not draining (a draining
// builder keeps serving what it holds, so those need no new capacity).
func (p *planner) demand(pool string) int {
	draining := map[string]bool{}
	for _, s := range p.slots {
		if s.Pool == pool && s.State == Draining {
			draining[s.Name] = true
		}
	}
	n := p.obs.Held[pool]
	for _, r := range p.res {
		if r.Pool == pool && !p.ended[r.ID] && !(r.State == Assigned && draining[r.Slot]) {
			n++
		}
	}
	return n
}

// lastActivity is when the pool last had work: the latest LastActive of its
// slots (kept while a slot is empty) or creation of a live reservation.
func (p *planner) lastActivity(pool string) time.Time {
	var last time.Time
	for _, s := range p.slots {
		if s.Pool == pool && s.LastActive.After(last) {
			last = s.LastActive
		}
	}
	for _, r := range p.res {
		if r.Pool == pool && !p.ended[r.ID] && r.CreatedAt.After(last) {
			last = r.CreatedAt
		}
	}
	return last
}

// Target is how many builders a pool should have for live reservations:
// enough for the demand (at least min_builders) plus the warm pool, capped
// at max_builders.
func Target(pp PoolPolicy, live int) int {
	rpb := max(pp.ReservationsPerBuilder, 1)
	need := (live + rpb - 1) / rpb
	return min(pp.MaxBuilders, max(pp.MinBuilders, need)+pp.WarmPool)
}

// scale launches builders up to the target and drains idle ones above it.
func (p *planner) scale(pp PoolPolicy) {
	if pp.WarmPool > 0 && pp.WarmFor > 0 && p.now.Sub(p.lastActivity(pp.Name)) >= pp.WarmFor {
		// A quiet pool pays for no spare builder: the warm pool follows
		// recent demand.
		pp.WarmPool = 0
	}
	target := Target(pp, p.demand(pp.Name))
	active := p.active(pp.Name)
	if active < target && !p.now.Before(p.obs.LaunchBackoff[pp.Name]) {
		active = p.launchUpTo(pp, target, active)
	}
	if active <= target || !p.obs.ServersKnown {
		return
	}
	p.drainIdle(pp, target, active)
}

// launchUpTo takes back idle-drained builders, then launches builders in
// the pool's empty slots, until active reaches target; it returns the new
// count of active builders.
func (p *planner) launchUpTo(pp PoolPolicy, target, active int) int {
	active = p.reclaim(pp, target, active)
	for i := range p.slots {
		s := &p.slots[i]
		if active >= target {
			break
		}
		if s.Pool != pp.Name || s.State != Empty || SlotNumber(s.Name) > pp.MaxBuilders {
			continue
		}
		p.emit(Launch{Pool: pp.Name, Slot: s.Name,
			Reason: fmt.Sprintf("%d need a builder, %d builders wanted, %d active", p.demand(pp.Name), target, active)})
		p.setState(s, Launching)
		active++
	}
	return active
}

// drainIdle is the idle drain: longest idle first, never a slot with a
// reservation or a session, never one still inside its billing minimum,
// never below the target.
func (p *planner) drainIdle(pp PoolPolicy, target, active int) {
	timeout, _ := pp.IdlePolicy(p.obs.Boots[pp.Name])
	var idle []*Slot
	for i := range p.slots {
		s := &p.slots[i]
		if s.Pool != pp.Name || s.State != Ready || p.perSlot[s.Key()] > 0 {
			continue
		}
		if srv, ok := p.server(s.Key()); !ok || srv.Sessions > 0 {
			continue
		}
		if p.now.Sub(s.LastActive) >= timeout && !p.paidFor(pp, s) {
			idle = append(idle, s)
		}
	}
	sort.SliceStable(idle, func(i, j int) bool { return idle[i].LastActive.Before(idle[j].LastActive) })
	for _, s := range idle {
		if active <= target {
			break
		}
		p.drain(s, DrainIdle, "")
		active--
	}
}
