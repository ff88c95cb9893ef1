package scaler

import "fmt"

func (p *planner) reservationDeadlines() {
	for i := range p.res {
		r := &p.res[i]
		switch {
		case !r.ExpiresAt.IsZero() && !p.now.Before(r.ExpiresAt):
			p.end(r, Expired, "lease expired without heartbeat")
		case r.State == Pending && p.pol.PendingTimeout > 0 && p.now.Sub(r.CreatedAt) >= p.pol.PendingTimeout:
			p.end(r, Failed, p.pendingFailure(r))
		case p.poolIndex[r.Pool].Name == "":
			p.end(r, Failed, "pool "+r.Pool+" is no longer configured")
		}
	}
}

func (p *planner) pendingFailure(r *Reservation) string {
	pp := p.poolIndex[r.Pool]
	if msg := p.obs.LaunchError[r.Pool]; msg != "" {
		return "no builder after " + p.pol.PendingTimeout.String() + ": launch failing: " + msg
	}
	if p.active(r.Pool) >= pp.MaxBuilders {
		return fmt.Sprintf("no builder after %s: pool %s at max_builders (%d)", p.pol.PendingTimeout, r.Pool, pp.MaxBuilders)
	}
	return "no builder became ready within pending_timeout " + p.pol.PendingTimeout.String()
}

func (p *planner) end(r *Reservation, state ReservationState, reason string) {
	p.emit(EndReservation{Pool: r.Pool, Slot: r.Slot, Reservation: r.ID, State: state, Reason: reason})
	p.ended[r.ID] = true
	if r.State == Assigned {
		p.perSlot[SlotKey{r.Pool, r.Slot}]--
	}
}

func (p *planner) requeueSlot(s *Slot, reason string) {
	for i := range p.res {
		r := &p.res[i]
		if r.State == Assigned && r.Pool == s.Pool && r.Slot == s.Name && !p.ended[r.ID] {
			p.emit(Requeue{Pool: r.Pool, Slot: r.Slot, Reservation: r.ID, Reason: reason})
			r.State, r.Slot = Pending, ""
		}
	}
	p.perSlot[s.Key()] = 0
}

// assign gives pending reservations to ready slots with room, packing
// builders so that the others can go idle and be released.
func (p *planner) assign(pp PoolPolicy) {
	p.moveOffInterrupted(pp)
	for i := range p.res {
		r := &p.res[i]
		if r.Pool != pp.Name || r.State != Pending || p.ended[r.ID] {
			continue
		}
		best := -1
		for j := range p.slots {
			s := &p.slots[j]
			if s.Pool != pp.Name || s.State != Ready || s.Weight <= 0 || p.perSlot[s.Key()] >= pp.ReservationsPerBuilder || !p.routable(s) {
				continue
			}
			if best < 0 || p.better(s, &p.slots[best]) {
				best = j
			}
		}
		if best < 0 {
			return // no room left; later reservations wait too (FIFO)
		}
		s := &p.slots[best]
		p.emit(Assign{Pool: pp.Name, Slot: s.Name, Reservation: r.ID, Instance: s.InstanceID})
		r.State, r.Slot = Assigned, s.Name
		p.perSlot[s.Key()]++
		s.LastActive = p.now
	}
}

// better prefers a builder without a notice (one with a rebalance
// recommendation is used only while nothing else has room), then the
// fuller slot (packing), then fewer sessions.
func (p *planner) better(a, b *Slot) bool {
	if da, db := p.doomed(a), p.doomed(b); da != db {
		return db
	}
	ra, rb := p.perSlot[a.Key()], p.perSlot[b.Key()]
	if ra != rb {
		return ra > rb
	}
	sa, _ := p.server(a.Key())
	sb, _ := p.server(b.Key())
	return sa.Sessions < sb.Sessions
}

// routable reports whether the load balancer routes new connections to the
// slot's builder: a reservation is ready only when its builder can be used
// (docs/design.md §3.1). A slot that has just become ready is pushed UP by
// the same round and assigned by the next one, once it is seen UP. When the
// load balancer cannot be read, the slot's own state is all there is.
func (p *planner) routable(s *Slot) bool {
	if !p.obs.ServersKnown {
		return true
	}
	srv, ok := p.obs.Servers[s.Key()]
	return ok && srv.Up && srv.Addr == s.Address
}
