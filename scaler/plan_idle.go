package scaler

import (
	"fmt"
	"strings"
	"time"
)

// The idle policy: how long an idle builder is kept (IdlePolicy), what an
// idle builder has already paid for (paidFor), and taking an idle-drained
// builder back when demand returns (reclaim).

// BootTime is what a pool's recent boots took, as the reconciler measured
// them: the median of the last BootSamples boots since the daemon started.
type BootTime struct {
	// Ready is from the launch to the builder passing its health check:
	// the wait a boot causes.
	Ready time.Duration
	// Billed is the part of Ready from the instance running (when the
	// provider starts billing) to ready: paid for while nothing builds.
	Billed time.Duration
	// Samples is how many boots the medians are of (0: none measured).
	Samples int
}

// The auto idle timeout's bounds, and its value before any boot was
// measured (docs/configuration.md, idle_timeout).
const (
	AutoIdleMin        = 10 * time.Second
	AutoIdleMax        = 10 * time.Minute
	AutoIdleUnmeasured = 2 * time.Minute
)

// IdlePolicy returns how long an idle builder of the pool is kept above its
// target, and says how that was chosen, given what the pool's recent boots
// took.
//
// With IdleAuto it is the ski-rental break-even: keeping an idle builder
// costs its time; draining it costs, when demand returns, a boot: the
// boot's billed part plus the wait it causes (a second of a build's wait
// counted as a second of a builder). Staying idle that long, and no
// longer, never costs more than twice the best choice made knowing when
// demand returns. It is at least the billing minimum (a new builder is
// billed that much, however briefly used) and AutoIdleMin, at most
// AutoIdleMax; AutoIdleUnmeasured (at least the billing minimum) until a
// boot of the pool has been measured.
func (pp PoolPolicy) IdlePolicy(b BootTime) (time.Duration, string) {
	if !pp.IdleAuto {
		return pp.IdleTimeout, "idle_timeout " + ShortDuration(pp.IdleTimeout)
	}
	floor := max(AutoIdleMin, pp.BillingMinimum)
	if b.Samples == 0 {
		d := max(AutoIdleUnmeasured, floor)
		return d, "idle_timeout auto = " + ShortDuration(d) + " (no boot measured yet)"
	}
	cost := satAdd(b.Ready, b.Billed)
	d := min(max(cost, floor), AutoIdleMax)
	why := fmt.Sprintf("idle_timeout auto = %s from measured boot %s (%s of it billed; median of %d)",
		ShortDuration(d), ShortDuration(b.Ready), ShortDuration(b.Billed), b.Samples)
	switch {
	case cost < pp.BillingMinimum && pp.BillingMinimum >= AutoIdleMin:
		why += ", raised to the billing minimum " + ShortDuration(pp.BillingMinimum)
	case cost < floor:
		why += ", raised to " + ShortDuration(floor)
	case cost > AutoIdleMax:
		why += ", capped at " + ShortDuration(AutoIdleMax)
	}
	return d, why
}

// ShortDuration formats d rounded to the second, without trailing zero
// units ("1m", "1m30s", "2h").
func ShortDuration(d time.Duration) string {
	s := d.Round(time.Second).String()
	if strings.HasSuffix(s, "m0s") {
		s = strings.TrimSuffix(s, "0s")
	}
	if strings.HasSuffix(s, "h0m") {
		s = strings.TrimSuffix(s, "0m")
	}
	return s
}

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
	return s.DrainReason == DrainIdle && v.configured && !p.doomed(s) && SlotNumber(s.Name) <= pp.MaxBuilders && !old &&
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
