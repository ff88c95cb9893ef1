package scaler

import (
	"fmt"
	"sort"
	"strconv"
	"strings"
	"time"
)

// PoolPolicy is the part of a pool's configuration the policy reads.
type PoolPolicy struct {
	Name                   string
	MaxBuilders            int
	MinBuilders            int
	WarmPool               int
	ReservationsPerBuilder int
	IdleTimeout            time.Duration
	DrainTimeout           time.Duration
	LaunchTimeout          time.Duration
	BootTimeout            time.Duration
	BindTimeout            time.Duration
	// MaxLifetime drains ready builders older than this (0: no limit).
	MaxLifetime time.Duration
	// WarmFor keeps the warm pool only while the pool saw activity (a
	// reservation, a busy builder) within this long (0: always).
	WarmFor time.Duration
}

// Policy is the configuration Plan works from.
type Policy struct {
	Pools []PoolPolicy
	// PendingTimeout fails a reservation that waited this long for a slot.
	PendingTimeout time.Duration
	// OrphanGrace is how long an instance tagged for this cluster but claimed
	// by no slot is left alone before it is terminated. It covers the window
	// between a provider accepting a launch and the daemon recording it.
	OrphanGrace time.Duration
}

// Observed is everything Plan may look at: the store's view and what the
// provider and the load balancer report right now.
type Observed struct {
	Slots []Slot
	// Reservations are the live (pending or ready) reservations.
	Reservations []Reservation
	Instances    []Instance
	// InstancesKnown is true for pools whose provider answered List this
	// round. Without it nothing is concluded from an instance being absent.
	InstancesKnown map[string]bool
	// Servers is the load balancer's view; ServersKnown is false when it
	// could not be reached, and then no builder is drained or terminated on
	// the strength of sessions that cannot be seen.
	Servers      map[SlotKey]ServerStatus
	ServersKnown bool
	// LaunchBackoff holds, per pool, the time before which no launch may be
	// tried (after failed launches); LaunchError is the last failure.
	LaunchBackoff map[string]time.Time
	LaunchError   map[string]string
	// Held counts, per pool, connections the load balancer holds while no
	// builder has room for them: demand that came without a reservation
	// (evaluation-time builds, other Nix clients).
	Held map[string]int
}

// ActionKind names what an Action does.
type ActionKind string

const (
	// ActLaunch starts a builder in an empty slot.
	ActLaunch ActionKind = "launch"
	// ActAdopt records an instance found by the slot's launch id.
	ActAdopt ActionKind = "adopt"
	// ActAdvance moves a slot to state To because of what was observed.
	ActAdvance ActionKind = "advance"
	// ActBind writes the slot's builder address into the load balancer.
	ActBind ActionKind = "bind"
	// ActTouch marks a busy slot active now (idle time restarts).
	ActTouch ActionKind = "touch"
	// ActDrain stops new work going to a slot.
	ActDrain ActionKind = "drain"
	// ActTerminate terminates a slot's instance (or an orphan instance when
	// Slot is empty) for Cause.
	ActTerminate ActionKind = "terminate"
	// ActRetryTerminate asks the provider again to terminate the instance
	// of a slot already terminating (a failed call, or one whose answer
	// was lost); the slot and its counts do not change.
	ActRetryTerminate ActionKind = "retry-terminate"
	// ActAssign gives reservation Reservation the slot Slot.
	ActAssign ActionKind = "assign"
	// ActRequeue sends an assigned reservation back to pending.
	ActRequeue ActionKind = "requeue"
	// ActFail ends a reservation as failed with Reason.
	ActFail ActionKind = "fail"
	// ActExpire ends a reservation whose lease ran out.
	ActExpire ActionKind = "expire"
)

// Action is one step the reconciler should take.
type Action struct {
	Kind        ActionKind
	Pool        string
	Slot        string
	Reservation string
	Instance    string
	Addr        string
	To          SlotState
	Reason      string // for people: logs and the event log
	// Cause, on a terminate, is why, for metrics and code to branch on.
	Cause Cause
	// IfIdle, on a terminate, asks the reconciler to close the builder to
	// new connections and terminate it only if no session is open then
	// (see Quiescer).
	IfIdle bool
}

func (a Action) String() string {
	var b strings.Builder
	b.WriteString(string(a.Kind))
	for _, kv := range [][2]string{{"pool", a.Pool}, {"slot", a.Slot}, {"reservation", a.Reservation},
		{"instance", a.Instance}, {"addr", a.Addr}, {"to", string(a.To)}, {"cause", string(a.Cause)}, {"reason", a.Reason},
		{"if_idle", map[bool]string{true: "true"}[a.IfIdle]}} {
		if kv[1] != "" {
			fmt.Fprintf(&b, " %s=%q", kv[0], kv[1])
		}
	}
	return b.String()
}

// Cause is why a builder is terminated, in terms code and metrics branch on
// (Action.Reason says it for people).
type Cause string

const (
	CauseLaunchTimeout Cause = "launch_timeout"
	CauseBootTimeout   Cause = "boot_timeout"
	CauseBindTimeout   Cause = "bind_timeout"
	CauseDrainTimeout  Cause = "drain_timeout"
	// CauseDrained: drained (idle, operator, max lifetime, ...) and no
	// session left.
	CauseDrained Cause = "drained"
	// CauseOrphan: an instance of this cluster that no slot tracks.
	CauseOrphan Cause = "orphan"
	// CauseOther: anything else (a launch cut off by a crash, ...).
	CauseOther Cause = "other"
)

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

// Plan is the scaling policy: a pure function from the time, the policy and
// what is observed to the actions that move the fleet toward what is wanted.
// It is level-based: running it twice on the same input gives the same
// actions, and the reconciler may apply them in order.
func Plan(now time.Time, pol Policy, obs Observed) []Action {
	p := planner{now: now, pol: pol, obs: obs}
	p.index()
	p.reservationDeadlines()
	p.slotTransitions()
	p.orphans()
	for _, pp := range pol.Pools {
		p.assign(pp)
		p.scale(pp)
	}
	return p.actions
}

type planner struct {
	now     time.Time
	pol     Policy
	obs     Observed
	actions []Action

	// slots is a working copy, updated as actions are emitted so that later
	// rules see the state the earlier ones will have produced.
	slots     []Slot
	byID      map[string]Instance
	byLaunch  map[string]Instance
	claimed   map[string]bool
	res       []Reservation // live, working copy
	ended     map[string]bool
	perSlot   map[SlotKey]int // live assigned reservations per slot
	poolIndex map[string]PoolPolicy
}

func (p *planner) emit(a Action) { p.actions = append(p.actions, a) }

func (p *planner) index() {
	p.slots = append([]Slot(nil), p.obs.Slots...)
	sort.SliceStable(p.slots, func(i, j int) bool { return slotLess(p.slots[i], p.slots[j]) })
	p.byID = map[string]Instance{}
	p.byLaunch = map[string]Instance{}
	for _, in := range p.obs.Instances {
		p.byID[in.ID] = in
		if in.LaunchID != "" {
			p.byLaunch[in.LaunchID] = in
		}
	}
	p.claimed = map[string]bool{}
	p.res = append([]Reservation(nil), p.obs.Reservations...)
	sort.SliceStable(p.res, func(i, j int) bool {
		if !p.res[i].CreatedAt.Equal(p.res[j].CreatedAt) {
			return p.res[i].CreatedAt.Before(p.res[j].CreatedAt)
		}
		return p.res[i].ID < p.res[j].ID
	})
	p.ended = map[string]bool{}
	p.perSlot = map[SlotKey]int{}
	for _, r := range p.res {
		if r.State == Assigned {
			p.perSlot[SlotKey{r.Pool, r.Slot}]++
		}
	}
	p.poolIndex = map[string]PoolPolicy{}
	for _, pp := range p.pol.Pools {
		p.poolIndex[pp.Name] = pp
	}
}

// slotLess orders slots by pool, then by their number (slot2 before slot10).
func slotLess(a, b Slot) bool {
	if a.Pool != b.Pool {
		return a.Pool < b.Pool
	}
	na, nb := SlotNumber(a.Name), SlotNumber(b.Name)
	if na != nb {
		return na < nb
	}
	return a.Name < b.Name
}

// SlotNumber returns N of "slotN", or 0 for any other name.
func SlotNumber(name string) int {
	n, err := strconv.Atoi(strings.TrimPrefix(name, "slot"))
	if err != nil || !strings.HasPrefix(name, "slot") {
		return 0
	}
	return n
}

func (p *planner) server(k SlotKey) (ServerStatus, bool) {
	if !p.obs.ServersKnown {
		return ServerStatus{}, false
	}
	s, ok := p.obs.Servers[k]
	return s, ok
}

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
	p.emit(Action{Kind: ActAdopt, Pool: s.Pool, Slot: s.Name, Instance: in.ID, Reason: "found by launch id"})
	return in, true
}

func (p *planner) setState(s *Slot, to SlotState) {
	s.State = to
	s.StateSince = p.now
}

func (p *planner) advance(s *Slot, to SlotState, reason string) {
	p.emit(Action{Kind: ActAdvance, Pool: s.Pool, Slot: s.Name, Instance: s.InstanceID, To: to, Reason: reason})
	p.setState(s, to)
}

func (p *planner) terminate(s *Slot, cause Cause, reason string) { p.stop(s, cause, reason, false) }

// stop terminates s's builder; with ifIdle only if it has no session once
// closed to new ones (Action.IfIdle).
func (p *planner) stop(s *Slot, cause Cause, reason string, ifIdle bool) {
	p.emit(Action{Kind: ActTerminate, Pool: s.Pool, Slot: s.Name, Instance: s.InstanceID, Reason: reason, Cause: cause, IfIdle: ifIdle})
	p.requeueSlot(s, reason)
	if s.InstanceID == "" {
		// Nothing was ever launched that we can name: the slot is free now.
		p.setState(s, Empty)
		return
	}
	p.setState(s, Terminating)
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

func (p *planner) requeueSlot(s *Slot, reason string) {
	for i := range p.res {
		r := &p.res[i]
		if r.State == Assigned && r.Pool == s.Pool && r.Slot == s.Name && !p.ended[r.ID] {
			p.emit(Action{Kind: ActRequeue, Pool: r.Pool, Slot: r.Slot, Reservation: r.ID, Reason: reason})
			r.State, r.Slot = Pending, ""
		}
	}
	p.perSlot[s.Key()] = 0
}

func (p *planner) slotTransitions() {
	for i := range p.slots {
		s := &p.slots[i]
		pp, configured := p.poolIndex[s.Pool]
		if s.State == Empty {
			continue
		}
		in, found := p.instanceOf(s)
		if s.InstanceID != "" && p.lost(s, in, found) {
			continue
		}
		age := p.now.Sub(s.StateSince)
		srv, srvKnown := p.server(s.Key())
		switch s.State {
		case Launching:
			switch {
			case found && in.State == InstanceRunning:
				p.advance(s, Booting, "instance running")
				if in.Address != "" {
					p.bind(s, in.Address)
				}
			case !found && s.InstanceID == "" && age >= LostLaunchAfter:
				p.terminate(s, CauseOther, "launch lost: no instance has launch id "+s.LaunchID+" (the daemon stopped during the launch)")
			case configured && age >= pp.LaunchTimeout:
				p.terminate(s, CauseLaunchTimeout, "launch timeout ("+pp.LaunchTimeout.String()+")")
			}
		case Booting:
			switch {
			case found && in.Address != "":
				p.bind(s, in.Address)
			case configured && age >= pp.BootTimeout:
				p.terminate(s, CauseBootTimeout, "boot timeout ("+pp.BootTimeout.String()+")")
			}
		case Binding:
			switch {
			case srvKnown && srv.Addr != s.Address:
				p.bind(s, s.Address)
			case srvKnown && srv.Healthy:
				p.advance(s, Ready, "server healthy")
				s.LastActive = p.now
			case configured && age >= pp.BindTimeout:
				p.terminate(s, CauseBindTimeout, "bind timeout ("+pp.BindTimeout.String()+")")
			}
		case Ready, Draining:
			if p.obs.ServersKnown && srv.Addr != s.Address {
				// The load balancer forgot the address (restart, reload).
				p.bind(s, s.Address)
			}
			if s.State == Ready {
				busy := p.perSlot[s.Key()] > 0 || srv.Sessions > 0
				if busy && p.now.Sub(s.LastActive) >= touchEvery {
					p.emit(Action{Kind: ActTouch, Pool: s.Pool, Slot: s.Name})
					s.LastActive = p.now
				}
				switch {
				case !configured || SlotNumber(s.Name) > pp.MaxBuilders:
					// The pool, or this slot, left the configuration.
					p.drain(s, "slot no longer configured")
				case pp.MaxLifetime > 0 && found && !in.LaunchedAt.IsZero() && p.now.Sub(in.LaunchedAt) >= pp.MaxLifetime:
					// Old builders go; demand brings a fresh one.
					p.drain(s, "max lifetime ("+pp.MaxLifetime.String()+")")
				}
				continue
			}
			if !p.obs.ServersKnown {
				continue // sessions unknown: never terminate blind
			}
			switch {
			case p.perSlot[s.Key()] == 0 && srv.Sessions == 0:
				p.stop(s, CauseDrained, "drained ("+s.DrainReason+")", true)
			case configured && age >= pp.DrainTimeout:
				p.terminate(s, CauseDrainTimeout, "drain timeout ("+pp.DrainTimeout.String()+")")
			}
		case Terminating:
			if found && !in.State.Gone() {
				// Terminate is idempotent; a failed call is retried here.
				p.emit(Action{Kind: ActRetryTerminate, Pool: s.Pool, Slot: s.Name, Instance: s.InstanceID, Reason: s.DrainReason})
			}
		}
	}
}

func (p *planner) bind(s *Slot, addr string) {
	p.emit(Action{Kind: ActBind, Pool: s.Pool, Slot: s.Name, Instance: s.InstanceID, Addr: addr})
	s.Address = addr
	if s.State == Booting {
		p.setState(s, Binding)
	}
}

func (p *planner) drain(s *Slot, reason string) {
	p.emit(Action{Kind: ActDrain, Pool: s.Pool, Slot: s.Name, Instance: s.InstanceID, Reason: reason})
	p.setState(s, Draining)
	s.DrainReason = reason
}

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
			p.emit(Action{Kind: ActTerminate, Pool: in.Pool, Instance: id, Cause: CauseOrphan, Reason: "orphan: stopped outside the daemon"})
			continue
		}
		if s := p.freeSlot(in); s != nil {
			// A healthy builder of ours whose slot is free (its record was
			// lost): take it back rather than pay for a new one.
			p.claimed[id] = true
			s.InstanceID, s.LaunchID = in.ID, in.LaunchID
			p.emit(Action{Kind: ActAdopt, Pool: s.Pool, Slot: s.Name, Instance: id, To: Booting, Reason: "untracked instance tagged for this free slot"})
			p.setState(s, Booting)
			continue
		}
		if p.now.Sub(in.LaunchedAt) < p.pol.OrphanGrace {
			continue
		}
		p.emit(Action{Kind: ActTerminate, Pool: in.Pool, Instance: id, Cause: CauseOrphan, Reason: "orphan: no slot tracks it"})
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

func (p *planner) reservationDeadlines() {
	for i := range p.res {
		r := &p.res[i]
		switch {
		case !r.ExpiresAt.IsZero() && !p.now.Before(r.ExpiresAt):
			p.end(r, Action{Kind: ActExpire, Reason: "lease expired without heartbeat"})
		case r.State == Pending && p.pol.PendingTimeout > 0 && p.now.Sub(r.CreatedAt) >= p.pol.PendingTimeout:
			p.end(r, Action{Kind: ActFail, Reason: p.pendingFailure(r)})
		case p.poolIndex[r.Pool].Name == "":
			p.end(r, Action{Kind: ActFail, Reason: "pool " + r.Pool + " is no longer configured"})
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

func (p *planner) end(r *Reservation, a Action) {
	a.Pool, a.Slot, a.Reservation = r.Pool, r.Slot, r.ID
	p.emit(a)
	p.ended[r.ID] = true
	if r.State == Assigned {
		p.perSlot[SlotKey{r.Pool, r.Slot}]--
	}
}

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

// assign gives pending reservations to ready slots with room, packing
// builders so that the others can go idle and be released.
func (p *planner) assign(pp PoolPolicy) {
	for i := range p.res {
		r := &p.res[i]
		if r.Pool != pp.Name || r.State != Pending || p.ended[r.ID] {
			continue
		}
		best := -1
		for j := range p.slots {
			s := &p.slots[j]
			if s.Pool != pp.Name || s.State != Ready || s.Weight <= 0 || p.perSlot[s.Key()] >= pp.ReservationsPerBuilder {
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
		p.emit(Action{Kind: ActAssign, Pool: pp.Name, Slot: s.Name, Reservation: r.ID, Instance: s.InstanceID})
		r.State, r.Slot = Assigned, s.Name
		p.perSlot[s.Key()]++
		s.LastActive = p.now
	}
}

// better prefers the fuller slot (packing), then fewer sessions.
func (p *planner) better(a, b *Slot) bool {
	ra, rb := p.perSlot[a.Key()], p.perSlot[b.Key()]
	if ra != rb {
		return ra > rb
	}
	sa, _ := p.server(a.Key())
	sb, _ := p.server(b.Key())
	return sa.Sessions < sb.Sessions
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
		for i := range p.slots {
			s := &p.slots[i]
			if active >= target {
				break
			}
			if s.Pool != pp.Name || s.State != Empty || SlotNumber(s.Name) > pp.MaxBuilders {
				continue
			}
			p.emit(Action{Kind: ActLaunch, Pool: pp.Name, Slot: s.Name,
				Reason: fmt.Sprintf("%d need a builder, %d builders wanted, %d active", p.demand(pp.Name), target, active)})
			p.setState(s, Launching)
			active++
		}
	}
	if active <= target || !p.obs.ServersKnown {
		return
	}
	// Idle drain: longest idle first, never a slot with a reservation or a
	// session, never below the target.
	var idle []*Slot
	for i := range p.slots {
		s := &p.slots[i]
		if s.Pool != pp.Name || s.State != Ready || p.perSlot[s.Key()] > 0 {
			continue
		}
		if srv, ok := p.server(s.Key()); !ok || srv.Sessions > 0 {
			continue
		}
		if p.now.Sub(s.LastActive) >= pp.IdleTimeout {
			idle = append(idle, s)
		}
	}
	sort.SliceStable(idle, func(i, j int) bool { return idle[i].LastActive.Before(idle[j].LastActive) })
	for _, s := range idle {
		if active <= target {
			break
		}
		p.drain(s, "idle")
		active--
	}
}
