package sim

import (
	"fmt"
	"slices"
	"sort"
	"time"

	"guardianproject.dev/ops/nix-builder-autoscaler/scaler"
)

// eval is one evaluation of a trace: builds with the same Source and
// EvalStart. The replay does what the Buildbot extension does: a forecast
// per pool its builds use, without a build count (the daemon estimates it
// from the source's past evaluations), sent when the evaluation starts and
// withdrawn when it ends, which is when its first build is submitted.
type eval struct {
	source     string
	start, end time.Duration
	pools      []int // indexes in Config.Pools
	ids        []string
}

// evals groups the jobs that name an evaluation, ordered by start.
func evals(jobs []*job) []*eval {
	byKey := map[string]*eval{}
	var out []*eval
	for _, j := range jobs {
		if j.b.Source == "" {
			continue
		}
		k := fmt.Sprintf("%s@%d", j.b.Source, j.b.EvalStart)
		e := byKey[k]
		if e == nil {
			e = &eval{source: j.b.Source, start: j.b.EvalStart, end: j.b.Submit}
			byKey[k] = e
			out = append(out, e)
		}
		e.end = min(e.end, j.b.Submit)
		if !slices.Contains(e.pools, j.pool) {
			e.pools = append(e.pools, j.pool)
		}
	}
	sort.SliceStable(out, func(i, j int) bool { return out[i].start < out[j].start })
	return out
}

// forecast sends the forecasts of evaluations that start by t and
// withdraws those of evaluations that ended by t; it reports whether it
// did anything.
func (r *run) forecast(t time.Duration, now time.Time) (bool, error) {
	event := false
	for r.nextEval < len(r.evals) && r.evals[r.nextEval].start <= t {
		e := r.evals[r.nextEval]
		r.nextEval++
		for _, pi := range e.pools {
			pool := r.cfg.Pools[pi].Policy.Name
			n, err := scaler.Estimate(r.ctx, r.store, e.source, pool)
			if err != nil {
				return false, err
			}
			f := scaler.Forecast{ID: fmt.Sprintf("f-%s-%d-%s", e.source, e.start/time.Second, pool), Source: e.source, Pool: pool,
				Builds: n, Estimated: true, CreatedAt: now, ExpiresAt: now.Add(scaler.DefaultForecastTTL)}
			if _, _, err := r.store.CreateForecast(r.ctx, f); err != nil {
				return false, err
			}
			e.ids = append(e.ids, f.ID)
		}
		r.openEvals = append(r.openEvals, e)
		event = true
	}
	keep := r.openEvals[:0]
	for _, e := range r.openEvals {
		if e.end > t {
			keep = append(keep, e)
			continue
		}
		for _, id := range e.ids {
			if _, err := r.store.WithdrawForecast(r.ctx, id, now); err != nil {
				return false, err
			}
		}
		event = true
	}
	r.openEvals = keep
	return event, nil
}
