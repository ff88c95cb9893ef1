package scaler

// The idle policy's rules besides the idle timeout itself: what an idle
// builder has already paid for.

// paidFor reports whether s's builder is younger than the pool's billing
// minimum: draining it now would save nothing, as the provider bills that
// much anyway, and keeping it may save a boot. Its age counts from the
// instance's launch, as the provider reports it; a builder whose launch
// time is unknown is not kept for it.
func (p *planner) paidFor(pp PoolPolicy, s *Slot) bool {
	in, ok := p.byID[s.InstanceID]
	return ok && !in.LaunchedAt.IsZero() && p.now.Sub(in.LaunchedAt) < pp.BillingMinimum
}

// DrainIdle is the DrainReason of a builder the policy drained for being
// idle above its pool's target.
const DrainIdle = "idle"

// reclaimable reports whether a draining builder with no session may be
// taken back into service when its pool needs a builder: only one the
// policy drained for being idle (never an operator's drain, a max-lifetime
// drain or one of a slot no longer configured), whose instance runs and
// whose load balancer server still points at it and passes its check.
func (p *planner) reclaimable(v slotView) bool {
	s, pp := v.s, v.pp
	old := pp.MaxLifetime > 0 && !v.in.LaunchedAt.IsZero() && p.now.Sub(v.in.LaunchedAt) >= pp.MaxLifetime
	return s.DrainReason == DrainIdle && v.configured && SlotNumber(s.Name) <= pp.MaxBuilders && !old &&
		v.found && v.in.State == InstanceRunning && v.srvKnown && v.srv.Healthy && v.srv.Addr == s.Address
}

// reclaim takes back the pool's reclaimable idle-drained builders while
// active is below target, instead of launching new ones: a builder that
// runs already serves at once, where a launch bills a new boot and makes
// the demand wait for it. It returns the new count of active builders.
func (p *planner) reclaim(pp PoolPolicy, target, active int) int {
	for _, k := range p.idleDrained {
		if active >= target {
			break
		}
		s := p.slot(k)
		if k.Pool != pp.Name || s.State != Draining {
			continue
		}
		p.emit(Undrain{Pool: s.Pool, Slot: s.Name, Instance: s.InstanceID, Reason: "demand returned"})
		p.setState(s, Ready)
		s.DrainReason, s.LastActive = "", p.now
		active++
	}
	return active
}

// retire terminates the pool's idle-drained builders that reclaim did not
// take back, as drainingSlot does every other drained builder.
func (p *planner) retire(pp PoolPolicy) {
	for _, k := range p.idleDrained {
		if s := p.slot(k); k.Pool == pp.Name && s.State == Draining {
			p.stop(s, CauseDrained, "drained ("+s.DrainReason+")", true)
		}
	}
}
