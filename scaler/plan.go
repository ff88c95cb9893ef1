package scaler

import (
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
	// ForecastMaxBuilders caps the builders that forecasts alone make the
	// pool launch (0: none).
	ForecastMaxBuilders int
	// BillingMinimum is the least time a builder is billed for (EC2: 60 s
	// from its launch). An idle builder younger than this is not drained:
	// it is paid for until then anyway (0: none).
	BillingMinimum time.Duration
	// IdleAuto derives the idle timeout from the pool's measured boot
	// time instead of IdleTimeout (IdlePolicy).
	IdleAuto bool
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
	// Queued counts, per pool, connections the load balancer queues
	// because the builders they may go to are at their connection limit
	// (HAProxy's maxconn, max_jobs): demand like Held. A connection is
	// held (waiting for the SPOE agent's answer) before it can be queued,
	// never both at once; the reconciler reads Held after Queued, so a
	// connection moving on between the two reads is missed for a round
	// rather than counted twice.
	Queued map[string]int
	// Intents are the operators' and clients' requests not applied yet,
	// oldest first.
	Intents []Intent
	// Forecasts are the open forecasts and those that ended within
	// ForecastRecent; only open ones are demand.
	Forecasts []Forecast
	// Boots is, per pool, what its recent boots took (the reconciler
	// measures them); a pool with IdleAuto derives its idle timeout from it.
	Boots map[string]BootTime
	// Notices are the providers' warnings, by instance id, that they will
	// take an instance back (NoticeReader).
	Notices map[string]Notice
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
	// CauseInterrupted: a builder still starting when its provider warned
	// that it reclaims it; a replacement is launched instead.
	CauseInterrupted Cause = "interrupted"
	// CauseOrphan: an instance of this cluster that no slot tracks.
	CauseOrphan Cause = "orphan"
	// CauseOther: anything else (a launch cut off by a crash, ...).
	CauseOther Cause = "other"
)

// Plan is the scaling policy: a pure function from the time, the policy and
// what is observed to the actions that move the fleet toward what is wanted.
// It is level-based: running it twice on the same input gives the same
// actions, and the reconciler may apply them in order.
func Plan(now time.Time, pol Policy, obs Observed) []Action {
	p := planner{now: now, pol: pol, obs: obs}
	p.index()
	p.intents()
	p.reservationDeadlines()
	p.slotTransitions()
	p.orphans()
	for _, pp := range pol.Pools {
		p.assign(pp)
		p.scale(pp)
		p.retire(pp)
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
	// idleDrained are the idle-drained slots with no session that
	// slotTransitions left to the pool's scale (reclaim, retire).
	idleDrained []SlotKey
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

func (p *planner) setState(s *Slot, to SlotState) {
	s.State = to
	s.StateSince = p.now
}

func (p *planner) advance(s *Slot, to SlotState, reason string) {
	p.emit(Advance{Pool: s.Pool, Slot: s.Name, Instance: s.InstanceID, To: to, Reason: reason})
	p.setState(s, to)
}

func (p *planner) terminate(s *Slot, cause Cause, reason string) { p.stop(s, cause, reason, false) }

// stop terminates s's builder; with ifIdle only if it has no session once
// closed to new ones (Action.IfIdle).
func (p *planner) stop(s *Slot, cause Cause, reason string, ifIdle bool) {
	p.emit(Terminate{Pool: s.Pool, Slot: s.Name, Instance: s.InstanceID, Reason: reason, Cause: cause, IfIdle: ifIdle})
	p.requeueSlot(s, reason)
	if s.InstanceID == "" {
		// Nothing was ever launched that we can name: the slot is free now.
		p.setState(s, Empty)
		return
	}
	p.setState(s, Terminating)
}

func (p *planner) bind(s *Slot, addr string) {
	p.emit(Bind{Pool: s.Pool, Slot: s.Name, Instance: s.InstanceID, Addr: addr})
	s.Address = addr
	if s.State == Booting {
		p.setState(s, Binding)
	}
}

func (p *planner) drain(s *Slot, reason, intent string) {
	p.emit(Drain{Pool: s.Pool, Slot: s.Name, Instance: s.InstanceID, Reason: reason, Intent: intent})
	p.setState(s, Draining)
	s.DrainReason = reason
}
