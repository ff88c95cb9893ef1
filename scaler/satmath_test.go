package scaler

import (
	"math"
	"testing"
	"time"
)

func TestSatAdd(t *testing.T) {
	for _, tt := range []struct{ a, b, want int }{
		{1, 2, 3},
		{math.MaxInt, 1, math.MaxInt},
		{math.MaxInt, math.MaxInt, math.MaxInt},
		{math.MinInt, -1, math.MinInt},
		{math.MaxInt, math.MinInt, -1},
	} {
		if got := satAdd(tt.a, tt.b); got != tt.want {
			t.Errorf("satAdd(%d, %d) = %d, want %d", tt.a, tt.b, got, tt.want)
		}
	}
	if got := satSub(0, math.MinInt); got != math.MaxInt {
		t.Errorf("satSub(0, MinInt) = %d, want MaxInt", got)
	}
	if got := satAdd(time.Duration(math.MaxInt64), time.Hour); got != time.Duration(math.MaxInt64) {
		t.Errorf("satAdd(max duration, 1h) = %v", got)
	}
}

// TestTargetSaturates: the repro (min_builders 1, warm_pool
// MaxInt64, max_builders 2) made the target wrap negative, so the pool
// launched nothing and a reservation waited out its pending timeout.
func TestTargetSaturates(t *testing.T) {
	const huge = math.MaxInt
	tests := []struct {
		name           string
		pp             PoolPolicy
		live, forecast int
		want           int
	}{
		{"warm pool", pool(func(p *PoolPolicy) { p.MaxBuilders = 2; p.MinBuilders = 1; p.WarmPool = huge }), 1, 0, 2},
		{"min builders", pool(func(p *PoolPolicy) { p.MinBuilders = huge; p.WarmPool = huge }), 0, 0, 3},
		{"live", pool(func(p *PoolPolicy) { p.WarmPool = 1 }), huge, 0, 3},
		{"live and rpb", pool(func(p *PoolPolicy) { p.ReservationsPerBuilder = huge }), huge, 0, 1},
		{"forecast", pool(func(p *PoolPolicy) { p.ForecastMaxBuilders = huge }), huge, huge, 3},
		// live + forecast saturates at MaxInt: one builder's worth, not two.
		{"forecast and rpb", pool(func(p *PoolPolicy) { p.ForecastMaxBuilders = huge; p.ReservationsPerBuilder = huge }), huge, huge, 1},
		{"forecast with live 1", pool(func(p *PoolPolicy) { p.ForecastMaxBuilders = huge; p.ReservationsPerBuilder = 2 }), 1, huge, 3},
	}
	for _, tt := range tests {
		if got := Target(tt.pp, tt.live, tt.forecast); got != tt.want {
			t.Errorf("%s: Target = %d, want %d", tt.name, got, tt.want)
		}
	}
}

// TestPlanLaunchesWithHugeCounts: the planner's own sums (held + queued
// connections, the forecasts' remaining builds) saturate too, and a pool
// with a huge warm pool still launches.
func TestPlanLaunchesWithHugeCounts(t *testing.T) {
	const huge = math.MaxInt
	empty := []Slot{slot("slot1", Empty), slot("slot2", Empty), slot("slot3", Empty)}
	for name, tc := range map[string]struct {
		pol Policy
		obs Observed
	}{
		"warm pool": {policy(pool(func(p *PoolPolicy) { p.MinBuilders = 1; p.WarmPool = huge })), Observed{}},
		"held and queued": {policy(), Observed{
			Held: map[string]int{"x86": huge}, Queued: map[string]int{"x86": huge}}},
		"forecasts": {policy(pool(func(p *PoolPolicy) { p.ForecastMaxBuilders = 3 })), Observed{
			Forecasts: []Forecast{forecast("f1", huge), forecast("f2", huge, func(f *Forecast) { f.Arrived = -huge })}}},
	} {
		tc.obs.Slots = append([]Slot(nil), empty...)
		tc.obs.ServersKnown = true
		launches := 0
		for _, a := range Plan(t0, tc.pol, tc.obs) {
			if _, ok := a.(Launch); ok {
				launches++
			}
		}
		if launches != 3 {
			t.Errorf("%s: %d launches, want 3 (max_builders)", name, launches)
		}
	}
}

func TestEstimateBuildsHugeHistory(t *testing.T) {
	if got := EstimateBuilds([]int{math.MaxInt, math.MaxInt}); got != MaxForecastBuilds {
		t.Errorf("EstimateBuilds(huge) = %d, want %d", got, MaxForecastBuilds)
	}
}
