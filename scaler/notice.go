package scaler

import (
	"context"
	"time"
)

// NoticeKind is what a provider announced about an instance it is going to
// take back: the difference decides whether the builder stops taking work
// now or only once a replacement serves.
type NoticeKind string

const (
	// NoticeInterruption: the provider reclaims the instance at the
	// notice's Deadline (EC2's two-minute Spot interruption warning, or an
	// instance already stopping). Nothing new may start on it.
	NoticeInterruption NoticeKind = "interruption"
	// NoticeRebalance: the instance is at raised risk of interruption, or
	// due for scheduled maintenance (an EC2 rebalance recommendation, an
	// AWS Health scheduled change); it still serves until a replacement
	// does.
	NoticeRebalance NoticeKind = "rebalance"
)

// NoticeKinds lists every notice kind, strongest first.
var NoticeKinds = []NoticeKind{NoticeInterruption, NoticeRebalance}

// Notice is a provider's warning that it will take an instance back.
type Notice struct {
	Instance string
	Kind     NoticeKind
	// Deadline is when the provider takes the instance (zero: not said).
	Deadline time.Time
}

// Stronger reports whether n asks more of the planner than o: an
// interruption outranks a rebalance recommendation, so one instance keeps
// the strongest notice it got.
func (n Notice) Stronger(o Notice) bool {
	return n.Kind == NoticeInterruption && o.Kind != NoticeInterruption
}

// NoticeReader is a Provider that learns of interruptions before they
// happen. Notices is called once a round, after List, with the instances
// List returned (so a provider can skip its call when none can be
// interrupted), and returns the live notices by instance id. A notice for
// an instance that is gone may be returned or not; Plan ignores it.
type NoticeReader interface {
	Notices(ctx context.Context, instances []Instance) (map[string]Notice, error)
}

// DrainInterrupted is the DrainReason of a builder drained because its
// provider is about to reclaim it; DrainRebalance of one drained because
// its replacement serves after a rebalance recommendation.
const (
	DrainInterrupted = "interruption warning"
	DrainRebalance   = "rebalance recommendation"
)

// notice returns the notice of s's instance, if its provider gave one.
func (p *planner) notice(s *Slot) (Notice, bool) {
	if s.InstanceID == "" {
		return Notice{}, false
	}
	n, ok := p.obs.Notices[s.InstanceID]
	return n, ok
}

// interrupted reports whether s's instance is about to be reclaimed.
func (p *planner) interrupted(s *Slot) bool {
	n, ok := p.notice(s)
	return ok && n.Kind == NoticeInterruption
}

// doomed reports whether s's instance has any notice: it does not count as
// capacity the pool keeps, so a replacement is launched for it.
func (p *planner) doomed(s *Slot) bool {
	_, ok := p.notice(s)
	return ok
}

// interruptedDemand counts what the pool's interrupted draining builders
// carry besides their reservations (which demand counts like pending
// ones, also once moved off): a builder with sessions that no
// reservation accounts for still has a client who will need a builder
// once it is reclaimed.
func (p *planner) interruptedDemand(pool string) int {
	held := map[string]bool{}
	for _, r := range p.obs.Reservations {
		if r.Pool == pool && r.State == Assigned {
			held[r.Slot] = true
		}
	}
	n := 0
	for i := range p.slots {
		s := &p.slots[i]
		if s.Pool != pool || s.State != Draining || !p.interrupted(s) || held[s.Name] {
			continue
		}
		if srv, ok := p.server(s.Key()); ok && srv.Sessions > 0 {
			n++
		}
	}
	return n
}

// moveOffInterrupted requeues reservations held by the pool's interrupted
// builders as far as the pool's serving builders have room for them, so
// that assign, run next, gives them to those: a client's next build then
// goes to a builder that stays. The builds running on the interrupted
// builder go on while its sessions last.
func (p *planner) moveOffInterrupted(pp PoolPolicy) {
	room := 0
	for i := range p.slots {
		s := &p.slots[i]
		if s.Pool == pp.Name && s.State == Ready && s.Weight > 0 && !p.doomed(s) && p.routable(s) {
			room += max(pp.ReservationsPerBuilder-p.perSlot[s.Key()], 0)
		}
	}
	for i := range p.res {
		if room == 0 {
			return
		}
		r := &p.res[i]
		if r.Pool != pp.Name || r.State != Assigned || p.ended[r.ID] {
			continue
		}
		s := p.slot(SlotKey{r.Pool, r.Slot})
		if s == nil || s.State != Draining || !p.interrupted(s) {
			continue
		}
		p.emit(Requeue{Pool: r.Pool, Slot: r.Slot, Reservation: r.ID, Reason: "builder interrupted: moved to a builder that stays"})
		p.perSlot[s.Key()]--
		r.State, r.Slot = Pending, ""
		room--
	}
}

// drainRebalanced drains the pool's ready builders that got a rebalance
// recommendation once the builders without a notice that serve meet the
// pool's target: the replacement launched for them is ready.
func (p *planner) drainRebalanced(pp PoolPolicy, target int) {
	serving := 0
	for i := range p.slots {
		s := &p.slots[i]
		if s.Pool == pp.Name && s.State == Ready && !p.doomed(s) {
			serving++
		}
	}
	if serving < target {
		return
	}
	for i := range p.slots {
		s := &p.slots[i]
		if n, ok := p.notice(s); ok && s.Pool == pp.Name && s.State == Ready && n.Kind == NoticeRebalance {
			p.drain(s, DrainRebalance, "")
		}
	}
}
