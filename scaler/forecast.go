package scaler

import (
	"context"
	"math"
	"time"
)

// A Forecast says that demand is coming: an evaluation of Source started,
// and the builds it yields will ask for builders of Pool soon. The planner
// counts it like reservations (its Remaining builds) while it is Open, so
// that builders boot during the evaluation instead of after it.
//
// Reservations that carry the same Source and arrive in Pool while the
// forecast's TTL runs are counted in Arrived (also after a withdrawal: the
// builds start when the evaluation ends); they consume the forecast, and
// they are the history later forecasts of that source are estimated from.
type Forecast struct {
	ID       string
	Source   string
	Pool     string
	System   string
	Features []string
	// Builds is how many builds are expected; Estimated says the daemon
	// chose it from the source's history (the client gave none).
	Builds    int
	Estimated bool
	Arrived   int
	CreatedAt time.Time
	ExpiresAt time.Time
	// WithdrawnAt is when the client said the evaluation ended (zero:
	// not withdrawn).
	WithdrawnAt time.Time
}

// ForecastState is what a forecast means to the planner now.
type ForecastState string

const (
	ForecastOpen      ForecastState = "open"
	ForecastWithdrawn ForecastState = "withdrawn"
	ForecastExpired   ForecastState = "expired"
)

// State tells whether f counts as demand at now.
func (f Forecast) State(now time.Time) ForecastState {
	switch {
	case !f.WithdrawnAt.IsZero():
		return ForecastWithdrawn
	case !now.Before(f.ExpiresAt):
		return ForecastExpired
	}
	return ForecastOpen
}

// Remaining is the demand f still stands for at now: the builds not yet
// arrived as reservations, while it is open.
func (f Forecast) Remaining(now time.Time) int {
	if f.State(now) != ForecastOpen {
		return 0
	}
	return max(satSub(f.Builds, max(f.Arrived, 0)), 0)
}

// Ended is when f stopped counting as demand (withdrawn or expired), or
// the zero time while it is open at now.
func (f Forecast) Ended(now time.Time) time.Time {
	switch f.State(now) {
	case ForecastWithdrawn:
		return f.WithdrawnAt
	case ForecastExpired:
		return f.ExpiresAt
	}
	return time.Time{}
}

// ForecastRecent is how long a forecast that ended stays in the planner's
// view: builders it launched keep their idle time from its end, and the
// builds it announced arrive just after it (Observed.Forecasts).
const ForecastRecent = time.Hour

// Forecast bounds and defaults.
const (
	DefaultForecastTTL = 30 * time.Minute
	MaxForecastTTL     = 6 * time.Hour
	MaxForecastBuilds  = 10000
	// ForecastHistory is how many of a source's past forecasts an estimate
	// looks at.
	ForecastHistory = 8
	// forecastDecay weighs each past forecast half as much as the one
	// after it.
	forecastDecay = 0.5
)

// ForecastHistorian reads how many reservations arrived after each of the
// last n forecasts of source in pool (any source when source is ""),
// newest first.
type ForecastHistorian interface {
	ForecastHistory(ctx context.Context, source, pool string, n int) ([]int, error)
}

// Estimate is the build count of a new forecast of source in pool that
// gave none: EstimateBuilds over the source's history there, or, for a
// source the pool has not seen, over every source's (a new project is
// taken to be like the others).
func Estimate(ctx context.Context, h ForecastHistorian, source, pool string) (int, error) {
	hist, err := h.ForecastHistory(ctx, source, pool, ForecastHistory)
	if err == nil && len(hist) == 0 {
		hist, err = h.ForecastHistory(ctx, "", pool, ForecastHistory)
	}
	if err != nil {
		return 0, err
	}
	return EstimateBuilds(hist), nil
}

// EstimateBuilds estimates how many builds a new evaluation of a source
// yields from how many arrived after its past forecasts in the same pool,
// newest first: a decaying average, where each older evaluation counts half
// as much as the next. Without any history it is 1: an evaluation that
// started is likely to build something, and one builder is the least that
// hides a boot.
func EstimateBuilds(arrivedNewestFirst []int) int {
	if len(arrivedNewestFirst) == 0 {
		return 1
	}
	var sum, weights float64
	w := 1.0
	for _, n := range arrivedNewestFirst {
		sum += w * float64(n)
		weights += w
		w *= forecastDecay
	}
	// Clamped as a float: converting a float beyond int's range to int
	// is not defined, and gave a negative estimate on amd64.
	return int(min(max(math.Round(sum/weights), 0), MaxForecastBuilds))
}

// ForecastFor returns the index in fs of the forecast a new reservation r
// counts against, or -1. The candidates are r's source's forecasts in its
// pool made before r whose TTL still ran when r was made. r goes to the
// oldest of them still expecting builds (Arrived < Builds), else to the
// latest: evaluations of one project that overlap each count their own
// builds, in the order they were made (a project's builds cannot tell
// which evaluation they came from), and a count above the estimate goes to
// the newest, which learns from it.
func ForecastFor(fs []Forecast, r Reservation) int {
	best := -1
	if r.Source == "" {
		return best
	}
	open := func(f Forecast) bool { return f.Arrived < f.Builds }
	better := func(f, b Forecast) bool {
		switch {
		case open(f) != open(b):
			return open(f)
		case open(f):
			return f.CreatedAt.Before(b.CreatedAt)
		}
		return !f.CreatedAt.Before(b.CreatedAt)
	}
	for i, f := range fs {
		if f.Source != r.Source || f.Pool != r.Pool || r.CreatedAt.Before(f.CreatedAt) || !r.CreatedAt.Before(f.ExpiresAt) {
			continue
		}
		if best < 0 || better(f, fs[best]) {
			best = i
		}
	}
	return best
}
