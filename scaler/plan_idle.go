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
