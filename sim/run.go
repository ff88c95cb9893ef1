package sim

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"time"

	"guardianproject.dev/ops/nix-builder-autoscaler/clock/clocktest"
	"guardianproject.dev/ops/nix-builder-autoscaler/scaler"
	"guardianproject.dev/ops/nix-builder-autoscaler/scaler/memstore"
)

// Run replays trace against the daemon's policy: scaler.Reconciler (and so
// scaler.Plan) runs on a simulated clock (no sleeps), once per simulated second while
// anything changes and every Interval otherwise, as the daemon's Run loop
// does, with a reservation created at each build's submit time (a kick) and
// released when the build ends (a kick).
func Run(cfg Config, trace []Build) (Result, error) {
	r := newRun(cfg, trace)
	horizon := Horizon(trace)
	for t := time.Duration(0); ; t += time.Second {
		now := Epoch.Add(t)
		if t > 0 {
			r.clock.Set(now)
		}
		if t >= horizon && r.next == len(r.jobs) && len(r.live) == 0 || t >= horizon+24*time.Hour {
			break
		}
		if err := r.step(t, now); err != nil {
			return Result{}, err
		}
	}
	return r.result(), nil
}

// run is one Run's state: the daemon's reconciler and store, the simulated
// cloud, and the builds.
type run struct {
	ctx   context.Context
	cfg   Config
	clock *clocktest.Clock
	store *memstore.Store
	provs map[string]*provider
	rd    *readiness
	rec   *scaler.Reconciler

	jobs       []*job
	evals      []*eval // by start
	nextEval   int     // the first evaluation not started
	openEvals  []*eval // started, not ended
	unroutable int
	accs       []acc
	next       int // next job to submit
	live       []*job
	lastRound  time.Time
	settling   bool
	rounds     int
	// idleMin and idleMax are the shortest and longest idle timeout each
	// pool's policy used in a round.
	idleMin, idleMax []time.Duration
}

// newRun wires the daemon's reconciler to a memory store, the simulated
// providers and readiness, all on a simulated clock, and routes the trace's
// builds to pools.
func newRun(cfg Config, trace []Build) *run {
	if cfg.Interval <= 0 {
		cfg.Interval = 10 * time.Second
	}
	clock := clocktest.New(Epoch) // moved by the run loop; the reconciler is driven by ReconcileOnce
	pol := cfg.Policy
	pol.Pools = nil
	for _, p := range cfg.Pools {
		pol.Pools = append(pol.Pools, p.Policy)
	}
	store := memstore.New(pol.Pools, func() scaler.Slot {
		return scaler.Slot{State: scaler.Empty, StateSince: Epoch, LastActive: Epoch, Weight: scaler.DefaultWeight}
	})
	provs := map[string]*provider{}
	provIface := map[string]scaler.Provider{}
	for i, p := range cfg.Pools {
		pr := &provider{env: cfg.Env, rng: rand.New(rand.NewPCG(cfg.Seed, uint64(i)+1)), now: clock.Now,
			pool: p.Policy.Name, insts: map[string]*simInstance{}}
		provs[p.Policy.Name], provIface[p.Policy.Name] = pr, pr
	}
	rd := &readiness{prov: provs, addr: map[scaler.SlotKey]string{}, sessions: map[scaler.SlotKey]int{}, now: clock.Now}
	rec := scaler.New(scaler.Options{Store: store, Providers: provIface, Readiness: rd, Policy: pol, Clock: clock,
		Interval: cfg.Interval, Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})

	r := &run{ctx: context.Background(), cfg: cfg, clock: clock, store: store, provs: provs, rd: rd, rec: rec,
		jobs: make([]*job, 0, len(trace)), accs: make([]acc, len(cfg.Pools)),
		idleMin: make([]time.Duration, len(cfg.Pools)), idleMax: make([]time.Duration, len(cfg.Pools)),
		lastRound: Epoch.Add(-time.Hour), settling: true}
	for i, b := range trace {
		pi := route(cfg.Pools, b)
		if pi < 0 {
			r.unroutable++
			continue
		}
		r.jobs = append(r.jobs, &job{b: b, id: fmt.Sprintf("r%06d", i), pool: pi})
	}
	r.evals = evals(r.jobs)
	return r
}

// step simulates second t (at now): the cloud moves, builds end and are
// submitted, the reconciler runs if the daemon's would, and waits are
// accounted.
func (r *run) step(t time.Duration, now time.Time) error {
	for _, pr := range r.provs {
		if pr.advance(now) {
			r.settling = true
		}
	}
	released, err := r.releaseEnded(now)
	if err != nil {
		return err
	}
	submitted, err := r.submit(t, now)
	if err != nil {
		return err
	}
	forecast, err := r.forecast(t, now)
	if err != nil {
		return err
	}
	if released || submitted || forecast || r.settling || now.Sub(r.lastRound) >= r.cfg.Interval {
		if err := r.reconcile(now); err != nil {
			return err
		}
		if err := r.follow(now); err != nil {
			return err
		}
	}
	if err := r.accountWaits(); err != nil {
		return err
	}
	if t%(10*time.Minute) == 0 {
		for _, pr := range r.provs {
			pr.compact(now)
		}
	}
	return nil
}

// releaseEnded releases the reservations of builds that end now; it reports
// whether any did.
func (r *run) releaseEnded(now time.Time) (bool, error) {
	event := false
	// Builds that end now release their reservation.
	for _, j := range r.live {
		if j.running && !now.Before(j.endAt) {
			res, err := r.store.Reservation(r.ctx, j.id)
			if err != nil {
				return false, err
			}
			res.State, res.EndedAt, res.Reason = scaler.Released, now, "released"
			if err := r.store.Commit(r.ctx, scaler.Change{Reservations: []scaler.Reservation{res}}); err != nil {
				return false, err
			}
			j.running, j.done = false, true
			r.rd.sessions[j.slot]--
			a := &r.accs[j.pool]
			a.completed++
			a.buildSec += j.b.Duration.Seconds()
			event = true
		}
	}
	return event, nil
}

// submit creates a pending reservation for each build submitted by t; it
// reports whether any was.
func (r *run) submit(t time.Duration, now time.Time) (bool, error) {
	event := false
	for r.next < len(r.jobs) && r.jobs[r.next].b.Submit <= t {
		j := r.jobs[r.next]
		r.next++
		j.created, j.submitted = now, true
		res := scaler.Reservation{ID: j.id, Pool: r.cfg.Pools[j.pool].Policy.Name, System: j.b.System,
			Features: j.b.Features, Owner: "sim", Source: j.b.Source, State: scaler.Pending, CreatedAt: now}
		if err := r.store.Commit(r.ctx, scaler.Change{Reservations: []scaler.Reservation{res}}); err != nil {
			return false, err
		}
		r.live = append(r.live, j)
		r.accs[j.pool].builds++
		event = true
	}
	return event, nil
}

// reconcile runs reconcile rounds until nothing changes (at most 20) and
// decides whether the next second needs rounds too.
func (r *run) reconcile(now time.Time) error {
	changed := false
	for range 20 {
		c, err := r.rec.ReconcileOnce(r.ctx)
		r.rounds++
		if err != nil {
			return err
		}
		if !c {
			break
		}
		changed = true
	}
	r.lastRound = now
	r.settling = changed
	r.noteIdle()
	slots, err := r.store.Slots(r.ctx)
	if err != nil {
		return err
	}
	for _, s := range slots {
		// As the daemon's Run loop: rounds every second (its fast
		// interval) while builders change state.
		if s.State != scaler.Empty && s.State != scaler.Ready {
			r.settling = true
		}
	}
	return nil
}

// noteIdle records the idle timeout each pool's policy uses now, as the
// reconciler's boot measurements make it.
func (r *run) noteIdle() {
	boots := r.rec.BootTimes()
	for i, p := range r.cfg.Pools {
		d, _ := p.Policy.IdlePolicy(boots[p.Policy.Name])
		if r.idleMax[i] == 0 || d < r.idleMin[i] {
			r.idleMin[i] = d
		}
		r.idleMax[i] = max(r.idleMax[i], d)
	}
}

// idlePolicy describes each pool's idle policy at the end of the run.
func (r *run) idlePolicy() []string {
	boots := r.rec.BootTimes()
	var out []string
	for i, p := range r.cfg.Pools {
		pp := p.Policy
		_, why := pp.IdlePolicy(boots[pp.Name])
		if pp.IdleAuto && r.idleMin[i] != r.idleMax[i] {
			why += fmt.Sprintf(" (%s to %s during the run)", scaler.ShortDuration(r.idleMin[i]), scaler.ShortDuration(r.idleMax[i]))
		}
		out = append(out, fmt.Sprintf("%s: %s; billing minimum %s", pp.Name, why, scaler.ShortDuration(pp.BillingMinimum)))
	}
	return out
}

// follow updates the live builds from their reservations.
func (r *run) follow(now time.Time) error {
	// Follow the reservations: start, abort (requeued) or fail builds.
	keep := r.live[:0]
	for _, j := range r.live {
		if j.done {
			continue
		}
		res, err := r.store.Reservation(r.ctx, j.id)
		if err != nil {
			return err
		}
		r.followOne(j, res, now)
		if !j.done {
			keep = append(keep, j)
		}
	}
	r.live = keep
	return nil
}

// followOne starts, aborts or fails build j as its reservation res and
// its builder say. A running build is lost (and reruns) when the
// instance it runs on ends under it; a reservation moved off a warned
// builder (requeued, or assigned elsewhere) does not stop the build
// still running there.
func (r *run) followOne(j *job, res scaler.Reservation, now time.Time) {
	a := &r.accs[j.pool]
	if j.running && j.inst != "" && r.provs[j.slot.Pool].ended(j.inst) {
		j.running = false
		r.rd.sessions[j.slot]--
		a.reruns++
	}
	switch {
	case res.State == scaler.Assigned && !j.running:
		j.running, j.started, j.endAt = true, now, now.Add(j.b.Duration)
		j.slot = scaler.SlotKey{Pool: res.Pool, Slot: res.Slot}
		j.inst = ""
		if s, err := r.store.Slot(r.ctx, j.slot); err == nil {
			j.inst = s.InstanceID
		}
		r.rd.sessions[j.slot]++
		if !j.assigned {
			j.assigned = true
			a.wait(now.Sub(j.created), j.bootWait)
		}
	case !res.State.Live():
		if j.running {
			r.rd.sessions[j.slot]--
		}
		j.running, j.done = false, true
		a.failed++
	}
}

// accountWaits adds the coming second to each pending build's boot or
// queue wait.
func (r *run) accountWaits() error {
	if len(r.live) == 0 {
		return nil
	}
	// Wait accounting for the coming second: a pending build waits for
	// boot if builders already starting have room for it (FIFO), else it
	// queues.
	starting := map[string]int{}
	slots, err := r.store.Slots(r.ctx)
	if err != nil {
		return err
	}
	for _, s := range slots {
		if s.State.Starting() {
			starting[s.Pool]++
		}
	}
	ahead := make([]int, len(r.cfg.Pools))
	for _, j := range r.live {
		if j.running || j.assigned {
			continue
		}
		p := r.cfg.Pools[j.pool].Policy
		if ahead[j.pool] < starting[p.Name]*max(p.ReservationsPerBuilder, 1) {
			j.bootWait += time.Second
		} else {
			j.queueWait += time.Second
		}
		ahead[j.pool]++
	}
	return nil
}

// result bills the providers up to the end of the run and sums the pools.
func (r *run) result() Result {
	end := r.clock.Now()
	for i, p := range r.cfg.Pools {
		pr := r.provs[p.Policy.Name]
		pr.finish(end)
		a := &r.accs[i]
		a.billedSec = pr.billed.Seconds()
		a.capSec = a.billedSec * float64(max(p.Policy.ReservationsPerBuilder, 1))
		a.launches, a.capErr, a.intr = pr.launches, pr.capacityErrors, pr.interruptions
	}
	res := merge(r.accs).result("policy", r.cfg.Env.Price())
	res.Unroutable = r.unroutable
	res.Rounds = r.rounds
	res.IdlePolicy = r.idlePolicy()
	res.SimulatedSeconds = end.Sub(Epoch).Seconds()
	return res
}
