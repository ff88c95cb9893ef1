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
		if s.Pool == pool && (s.State.Starting() || s.State == Ready) && !p.doomed(&s) {
			n++
		}
	}
	return n
}

// demand counts the pool's live reservations that need a serving builder:
// pending ones and those on a builder that is not draining (a draining
// builder keeps serving what it holds, so those need no new capacity),
// except one about to be reclaimed, whose work needs a replacement.
func (p *planner) demand(pool string) int {
	draining := map[string]bool{}
	for i := range p.slots {
		if s := &p.slots[i]; s.Pool == pool && s.State == Draining && !p.interrupted(s) {
			draining[s.Name] = true
		}
	}
	n := satAdd(max(p.obs.Held[pool], 0), max(p.obs.Queued[pool], 0))
	n = satAdd(n, p.interruptedDemand(pool))
	for _, r := range p.res {
		if r.Pool == pool && !p.ended[r.ID] && !(r.State == Assigned && draining[r.Slot]) {
			n = satAdd(n, 1)
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

// forecast counts the builds the pool's open forecasts still expect.
func (p *planner) forecast(pool string) int {
	n := 0
	for _, f := range p.obs.Forecasts {
		if f.Pool == pool {
			n = satAdd(n, f.Remaining(p.now))
		}
	}
	return n
}

// idleSince is when s's idle time began: its last work, or the end of the
// latest forecast of its pool if later (now while one is open). A builder
// launched for a forecast waits for the builds the evaluation announced,
// which are submitted when it ends: its idle time starts then, not when
// it booted.
func (p *planner) idleSince(s *Slot) time.Time {
	t := s.LastActive
	for _, f := range p.obs.Forecasts {
		if f.Pool != s.Pool || f.CreatedAt.After(p.now) {
			continue
		}
		end := f.Ended(p.now)
		if end.IsZero() {
			end = p.now
		}
		if end.After(t) {
			t = end
		}
	}
	return t
}

// Target is how many builders a pool should have for live reservations and
// forecast builds: enough for the live demand plus the forecast (whose
// share is capped at forecast_max_builders), at least min_builders, plus
// the warm pool, capped at max_builders. Every sum saturates: no input,
// however large, wraps into a small or negative target.
func Target(pp PoolPolicy, live, forecast int) int {
	rpb := max(pp.ReservationsPerBuilder, 1)
	live, forecast = max(live, 0), max(forecast, 0)
	need := ceilDiv(live, rpb)
	if forecast > 0 && pp.ForecastMaxBuilders > 0 {
		// The forecast adds the builders that the live demand and it need
		// together beyond what the live demand needs alone.
		extra := ceilDiv(satAdd(live, forecast), rpb) - need
		need = satAdd(need, min(extra, pp.ForecastMaxBuilders))
	}
	return max(min(pp.MaxBuilders, satAdd(max(pp.MinBuilders, need), max(pp.WarmPool, 0))), 0)
}

// scale launches builders up to the target and drains idle ones above it.
func (p *planner) scale(pp PoolPolicy) {
	if pp.WarmPool > 0 && pp.WarmFor > 0 && p.now.Sub(p.lastActivity(pp.Name)) >= pp.WarmFor {
		// A quiet pool pays for no spare builder: the warm pool follows
		// recent demand.
		pp.WarmPool = 0
	}
	target := Target(pp, p.demand(pp.Name), p.forecast(pp.Name))
	active := p.active(pp.Name)
	if active < target {
		// Taking an idle-drained builder back launches nothing, so the
		// launch backoff does not hold it up.
		active = p.reclaim(pp, target, active)
	}
	if active < target && !p.now.Before(p.obs.LaunchBackoff[pp.Name]) {
		active = p.launchUpTo(pp, target, active)
	}
	p.drainRebalanced(pp, target)
	if active <= target || !p.obs.ServersKnown {
		return
	}
	p.drainIdle(pp, target, active)
}

// launchUpTo takes back idle-drained builders, then launches builders in
// the pool's empty slots, until active reaches target; it returns the new
// count of active builders.
func (p *planner) launchUpTo(pp PoolPolicy, target, active int) int {
	for i := range p.slots {
		s := &p.slots[i]
		if active >= target {
			break
		}
		if s.Pool != pp.Name || s.State != Empty || SlotNumber(s.Name) > pp.MaxBuilders {
			continue
		}
		p.emit(Launch{Pool: pp.Name, Slot: s.Name, Reason: p.launchReason(pp.Name, target, active)})
		p.setState(s, Launching)
		active++
	}
	return active
}

// launchReason says why the pool launches: its demand, and the forecast
// builds when there are some.
func (p *planner) launchReason(pool string, target, active int) string {
	r := fmt.Sprintf("%d need a builder, %d builders wanted, %d active", p.demand(pool), target, active)
	if f := p.forecast(pool); f > 0 {
		r = fmt.Sprintf("%d need a builder, %d forecast, %d builders wanted, %d active", p.demand(pool), f, target, active)
	}
	return r
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
		if p.now.Sub(p.idleSince(s)) >= timeout && !p.paidFor(pp, s) {
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
