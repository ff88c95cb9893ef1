package scaler

import "time"

// touchEvery bounds how often a busy slot's LastActive is rewritten.
const touchEvery = time.Second

// LostLaunchAfter is how long a launching slot with no instance may wait for
// an instance carrying its launch id to show up in the provider's list.
// Launch calls finish inside the reconcile round that starts them, so such a
// slot is never being launched by this process: its launch died with an
// earlier one (kill -9 before RunInstances answered, or before the answer
// was stored). EC2's list can lag a launch by seconds; past this grace the
// slot is freed at once instead of after launch_timeout, and an instance
// that still shows up later is an orphan (adopted into its free slot, or
// terminated after the orphan grace).
const LostLaunchAfter = 30 * time.Second

// instanceOf finds the instance a slot owns, adopting one found by launch id.
func (p *planner) instanceOf(s *Slot) (Instance, bool) {
	if s.InstanceID != "" {
		in, ok := p.byID[s.InstanceID]
		if ok {
			p.claimed[in.ID] = true
		}
		return in, ok
	}
	if s.LaunchID == "" {
		return Instance{}, false
	}
	in, ok := p.byLaunch[s.LaunchID]
	if !ok {
		return Instance{}, false
	}
	p.claimed[in.ID] = true
	s.InstanceID = in.ID
	p.emit(Adopt{Pool: s.Pool, Slot: s.Name, Instance: in.ID, Reason: "found by launch id"})
	return in, true
}

// lost handles a slot whose instance the provider no longer runs.
func (p *planner) lost(s *Slot, in Instance, found bool) bool {
	if !p.obs.InstancesKnown[s.Pool] {
		return false
	}
	var reason string
	switch {
	case !found && s.State == Launching && p.now.Sub(s.StateSince) < p.pol.OrphanGrace:
		// A provider's list may lag its launch call (EC2 is eventually
		// consistent); give a fresh launch the same grace as an orphan.
		return false
	case !found:
		reason = "instance " + s.InstanceID + " no longer exists"
	case in.State.Gone():
		reason = "instance " + in.ID + " is " + string(in.State)
		if in.StateReason != "" {
			reason += ": " + in.StateReason
		}
	default:
		return false
	}
	if s.State == Terminating {
		reason = "terminated"
	}
	if found && (in.State == InstanceStopped || in.State == InstanceStopping) {
		// A stopped instance still costs (its volumes) and may come back:
		// it is terminated below, as an instance no slot owns.
		p.claimed[in.ID] = false
	}
	p.requeueSlot(s, reason)
	p.advance(s, Empty, reason)
	return true
}

// slotView is what this round knows about a slot besides its record: its
// pool's policy, its instance and its load balancer server.
type slotView struct {
	s          *Slot
	pp         PoolPolicy
	configured bool // the slot's pool is configured (pp is its policy)
	in         Instance
	found      bool // the provider listed the slot's instance
	srv        ServerStatus
	srvKnown   bool // the load balancer reported the slot's server
	age        time.Duration
}

// slotTransitions moves every slot on from its state according to what was
// observed; each state has its own rule below.
func (p *planner) slotTransitions() {
	for i := range p.slots {
		s := &p.slots[i]
		if s.State == Empty {
			continue
		}
		in, found := p.instanceOf(s)
		if s.InstanceID != "" && p.lost(s, in, found) {
			continue
		}
		v := slotView{s: s, in: in, found: found, age: p.now.Sub(s.StateSince)}
		v.pp, v.configured = p.poolIndex[s.Pool]
		v.srv, v.srvKnown = p.server(s.Key())
		if s.State.Starting() && p.interrupted(s) && v.srv.Sessions == 0 {
			// It would be reclaimed before, or soon after, it serves.
			p.terminate(s, CauseInterrupted, "interruption warning while "+string(s.State))
			continue
		}
		switch s.State {
		case Launching:
			p.launchingSlot(v)
		case Booting:
			p.bootingSlot(v)
		case Binding:
			p.bindingSlot(v)
		case Ready:
			p.readySlot(v)
		case Draining:
			p.drainingSlot(v)
		case Terminating:
			p.terminatingSlot(v)
		}
	}
}

func (p *planner) launchingSlot(v slotView) {
	s, pp := v.s, v.pp
	switch {
	case v.found && v.in.State == InstanceRunning:
		p.advance(s, Booting, "instance running")
		if v.in.Address != "" {
			p.bind(s, v.in.Address)
		}
	case !v.found && s.InstanceID == "" && v.age >= LostLaunchAfter:
		p.terminate(s, CauseOther, "launch lost: no instance has launch id "+s.LaunchID+" (the daemon stopped during the launch)")
	case v.configured && v.age >= pp.LaunchTimeout:
		p.terminate(s, CauseLaunchTimeout, "launch timeout ("+pp.LaunchTimeout.String()+")")
	}
}

func (p *planner) bootingSlot(v slotView) {
	s, pp := v.s, v.pp
	switch {
	case v.found && v.in.Address != "":
		p.bind(s, v.in.Address)
	case v.configured && v.age >= pp.BootTimeout:
		p.terminate(s, CauseBootTimeout, "boot timeout ("+pp.BootTimeout.String()+")")
	}
}

func (p *planner) bindingSlot(v slotView) {
	s, pp := v.s, v.pp
	switch {
	case v.srvKnown && v.srv.Addr != s.Address:
		p.bind(s, s.Address)
	case v.srvKnown && v.srv.Healthy:
		p.advance(s, Ready, "server healthy")
		s.LastActive = p.now
	case v.configured && v.age >= pp.BindTimeout:
		p.terminate(s, CauseBindTimeout, "bind timeout ("+pp.BindTimeout.String()+")")
	}
}

// rebind writes a serving slot's address into the load balancer again when
// the load balancer forgot it (restart, reload).
func (p *planner) rebind(v slotView) {
	if p.obs.ServersKnown && v.srv.Addr != v.s.Address {
		p.bind(v.s, v.s.Address)
	}
}

func (p *planner) readySlot(v slotView) {
	s, pp := v.s, v.pp
	p.rebind(v)
	busy := p.perSlot[s.Key()] > 0 || v.srv.Sessions > 0
	if busy && p.now.Sub(s.LastActive) >= touchEvery {
		p.emit(Touch{Pool: s.Pool, Slot: s.Name})
		s.LastActive = p.now
	}
	switch {
	case p.interrupted(s):
		// No new connection goes to a builder about to be reclaimed; the
		// sessions open finish if they can, and a replacement is launched
		// in the same round (scale: it no longer counts as active).
		p.drain(s, DrainInterrupted, "")
	case !v.configured || SlotNumber(s.Name) > pp.MaxBuilders:
		// The pool, or this slot, left the configuration.
		p.drain(s, "slot no longer configured", "")
	case pp.MaxLifetime > 0 && v.found && !v.in.LaunchedAt.IsZero() && p.now.Sub(v.in.LaunchedAt) >= pp.MaxLifetime:
		// Old builders go; demand brings a fresh one.
		p.drain(s, "max lifetime ("+pp.MaxLifetime.String()+")", "")
	}
}

func (p *planner) drainingSlot(v slotView) {
	s, pp := v.s, v.pp
	p.rebind(v)
	if !p.obs.ServersKnown {
		return // sessions unknown: never terminate blind
	}
	switch {
	case p.perSlot[s.Key()] == 0 && v.srv.Sessions == 0 && p.reclaimable(v):
		// Terminated after its pool's scale (retire), unless demand
		// came back for it meanwhile (reclaim).
		p.idleDrained = append(p.idleDrained, s.Key())
	case p.perSlot[s.Key()] == 0 && v.srv.Sessions == 0:
		p.stop(s, CauseDrained, "drained ("+s.DrainReason+")", true)
	case v.configured && v.age >= pp.DrainTimeout:
		p.terminate(s, CauseDrainTimeout, "drain timeout ("+pp.DrainTimeout.String()+")")
	}
}

func (p *planner) terminatingSlot(v slotView) {
	if v.found && !v.in.State.Gone() {
		// Terminate is idempotent; a failed call is retried here.
		s := v.s
		p.emit(RetryTerminate{Pool: s.Pool, Slot: s.Name, Instance: s.InstanceID, Reason: s.DrainReason})
	}
}
