package sim

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"math"
	"math/rand/v2"
	"sort"
	"time"

	"guardianproject.dev/ops/nix-builder-autoscaler/clock/clocktest"
	"guardianproject.dev/ops/nix-builder-autoscaler/scaler"
	"guardianproject.dev/ops/nix-builder-autoscaler/scaler/memstore"
)

// Pool is a pool as the simulator needs it: the policy's view plus the
// systems and features that route a build to it.
type Pool struct {
	Policy   scaler.PoolPolicy
	Systems  []string
	Features []string
}

// Config is one simulation: the daemon's policy, its reconcile interval, the
// simulated cloud and the random seed.
type Config struct {
	Policy   scaler.Policy // Pools are replaced by those of Pools
	Pools    []Pool
	Interval time.Duration // the daemon's reconcile_interval (0: 10s)
	Env      Env
	Seed     uint64
}

// Epoch is the simulated time of a trace's second 0 (a Monday).
var Epoch = time.Date(2026, 1, 5, 0, 0, 0, 0, time.UTC)

type job struct {
	b         Build
	id        string
	pool      int
	created   time.Time
	running   bool
	started   time.Time
	endAt     time.Time
	slot      scaler.SlotKey
	assigned  bool // assigned at least once (wait recorded)
	done      bool
	submitted bool
	// bootWait and queueWait split the wait before the first assignment.
	bootWait, queueWait time.Duration
}

// route picks the first pool that serves the build's system and features.
func route(pools []Pool, b Build) int {
	return scaler.MatchPool(pools, Pool.route, b.System, b.Features)
}

// route is what sends a build to the pool.
func (p Pool) route() scaler.Route {
	return scaler.Route{Systems: p.Systems, Features: p.Features}
}

// Horizon is how long a run lasts: whole days covering every build's end.
func Horizon(trace []Build) time.Duration {
	var end time.Duration
	for _, b := range trace {
		end = max(end, b.Submit+b.Duration)
	}
	day := 24 * time.Hour
	return max(day, (end+day-1)/day*day)
}

// Run replays trace against the daemon's policy: scaler.Reconciler (and so
// scaler.Plan) runs on a simulated clock (no sleeps), once per simulated second while
// anything changes and every Interval otherwise, as the daemon's Run loop
// does, with a reservation created at each build's submit time (a kick) and
// released when the build ends (a kick).
func Run(cfg Config, trace []Build) (Result, error) {
	ctx := context.Background()
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

	jobs := make([]*job, 0, len(trace))
	var unroutable int
	for i, b := range trace {
		pi := route(cfg.Pools, b)
		if pi < 0 {
			unroutable++
			continue
		}
		jobs = append(jobs, &job{b: b, id: fmt.Sprintf("r%06d", i), pool: pi})
	}
	accs := make([]acc, len(cfg.Pools))
	horizon := Horizon(trace)
	next := 0 // next job to submit
	var live []*job
	lastRound := Epoch.Add(-time.Hour)
	settling := true
	rounds := 0
	for t := time.Duration(0); ; t += time.Second {
		now := Epoch.Add(t)
		if t > 0 {
			clock.Set(now)
		}
		if t >= horizon && next == len(jobs) && len(live) == 0 || t >= horizon+24*time.Hour {
			break
		}
		event := false
		for _, pr := range provs {
			if pr.advance(now) {
				settling = true
			}
		}
		// Builds that end now release their reservation.
		for _, j := range live {
			if j.running && !now.Before(j.endAt) {
				r, err := store.Reservation(ctx, j.id)
				if err != nil {
					return Result{}, err
				}
				r.State, r.EndedAt, r.Reason = scaler.Released, now, "released"
				if err := store.Commit(ctx, scaler.Change{Reservations: []scaler.Reservation{r}}); err != nil {
					return Result{}, err
				}
				j.running, j.done = false, true
				rd.sessions[j.slot]--
				a := &accs[j.pool]
				a.completed++
				a.buildSec += j.b.Duration.Seconds()
				event = true
			}
		}
		for next < len(jobs) && jobs[next].b.Submit <= t {
			j := jobs[next]
			next++
			j.created, j.submitted = now, true
			res := scaler.Reservation{ID: j.id, Pool: cfg.Pools[j.pool].Policy.Name, System: j.b.System,
				Features: j.b.Features, Owner: "sim", State: scaler.Pending, CreatedAt: now}
			if err := store.Commit(ctx, scaler.Change{Reservations: []scaler.Reservation{res}}); err != nil {
				return Result{}, err
			}
			live = append(live, j)
			accs[j.pool].builds++
			event = true
		}
		if event || settling || now.Sub(lastRound) >= cfg.Interval {
			changed := false
			for range 20 {
				c, err := rec.ReconcileOnce(ctx)
				rounds++
				if err != nil {
					return Result{}, err
				}
				if !c {
					break
				}
				changed = true
			}
			lastRound = now
			settling = changed
			slots, err := store.Slots(ctx)
			if err != nil {
				return Result{}, err
			}
			for _, s := range slots {
				// As the daemon's Run loop: rounds every second (its fast
				// interval) while builders change state.
				if s.State != scaler.Empty && s.State != scaler.Ready {
					settling = true
				}
			}
			// Follow the reservations: start, abort (requeued) or fail builds.
			keep := live[:0]
			for _, j := range live {
				if j.done {
					continue
				}
				r, err := store.Reservation(ctx, j.id)
				if err != nil {
					return Result{}, err
				}
				a := &accs[j.pool]
				switch {
				case r.State == scaler.Assigned && !j.running:
					j.running, j.started, j.endAt = true, now, now.Add(j.b.Duration)
					j.slot = scaler.SlotKey{Pool: r.Pool, Slot: r.Slot}
					rd.sessions[j.slot]++
					if !j.assigned {
						j.assigned = true
						a.wait(now.Sub(j.created), j.bootWait)
					}
				case r.State == scaler.Pending && j.running:
					j.running = false
					rd.sessions[j.slot]--
					a.reruns++
				case !r.State.Live():
					if j.running {
						rd.sessions[j.slot]--
					}
					j.running, j.done = false, true
					a.failed++
				}
				if !j.done {
					keep = append(keep, j)
				}
			}
			live = keep
		}
		// Wait accounting for the coming second: a pending build waits for
		// boot if builders already starting have room for it (FIFO), else it
		// queues.
		if len(live) > 0 {
			starting := map[string]int{}
			slots, err := store.Slots(ctx)
			if err != nil {
				return Result{}, err
			}
			for _, s := range slots {
				if s.State.Starting() {
					starting[s.Pool]++
				}
			}
			ahead := make([]int, len(cfg.Pools))
			for _, j := range live {
				if j.running || j.assigned {
					continue
				}
				p := cfg.Pools[j.pool].Policy
				if ahead[j.pool] < starting[p.Name]*max(p.ReservationsPerBuilder, 1) {
					j.bootWait += time.Second
				} else {
					j.queueWait += time.Second
				}
				ahead[j.pool]++
			}
		}
		if t%(10*time.Minute) == 0 {
			for _, pr := range provs {
				pr.compact(now)
			}
		}
	}
	end := clock.Now()
	for i, p := range cfg.Pools {
		pr := provs[p.Policy.Name]
		pr.finish(end)
		a := &accs[i]
		a.billedSec = pr.billed.Seconds()
		a.capSec = a.billedSec * float64(max(p.Policy.ReservationsPerBuilder, 1))
		a.launches, a.capErr, a.intr = pr.launches, pr.capacityErrors, pr.interruptions
	}
	res := merge(accs).result("policy", cfg.Env.Price())
	res.Unroutable = unroutable
	res.Rounds = rounds
	res.SimulatedSeconds = end.Sub(Epoch).Seconds()
	return res, nil
}

// acc accumulates one run's raw figures.
type acc struct {
	waits, boots, queues              []float64
	buildSec, billedSec, capSec       float64
	builds, completed, failed, reruns int
	launches, capErr, intr            int
}

func (a *acc) wait(wait, boot time.Duration) {
	a.waits = append(a.waits, wait.Seconds())
	a.boots = append(a.boots, boot.Seconds())
	a.queues = append(a.queues, (wait - boot).Seconds())
}

func merge(as []acc) *acc {
	var m acc
	for _, a := range as {
		m.waits = append(m.waits, a.waits...)
		m.boots = append(m.boots, a.boots...)
		m.queues = append(m.queues, a.queues...)
		m.buildSec += a.buildSec
		m.billedSec += a.billedSec
		m.capSec += a.capSec
		m.builds += a.builds
		m.completed += a.completed
		m.failed += a.failed
		m.reruns += a.reruns
		m.launches += a.launches
		m.capErr += a.capErr
		m.intr += a.intr
	}
	return &m
}

// Stats summarises a distribution of waits, in seconds.
type Stats struct {
	Mean float64 `json:"mean"`
	P50  float64 `json:"p50"`
	P95  float64 `json:"p95"`
	Max  float64 `json:"max"`
}

func stats(xs []float64) Stats {
	if len(xs) == 0 {
		return Stats{}
	}
	s := append([]float64(nil), xs...)
	sort.Float64s(s)
	sum := 0.0
	for _, x := range s {
		sum += x
	}
	q := func(p float64) float64 { return s[int(math.Ceil(p*float64(len(s))))-1] }
	return Stats{Mean: round2(sum / float64(len(s))), P50: q(0.5), P95: q(0.95), Max: s[len(s)-1]}
}

func round2(x float64) float64 { return math.Round(x*100) / 100 }

// Result is what one policy cost and how long its builds waited.
type Result struct {
	Policy string `json:"policy"`
	// Builds were submitted; Completed ran to the end; Failed ended
	// without a builder (pending_timeout); Reruns restarted after their
	// builder was interrupted.
	Builds     int `json:"builds"`
	Completed  int `json:"completed"`
	Failed     int `json:"failed"`
	Reruns     int `json:"reruns"`
	Unroutable int `json:"unroutable,omitempty"`
	// BuildSeconds is the time builds ran; BilledSeconds the instance
	// time billed (per second, 60 s minimum); Cost is BilledSeconds at
	// the market's hourly price.
	BuildSeconds  float64 `json:"build_seconds"`
	BilledSeconds float64 `json:"billed_seconds"`
	Cost          float64 `json:"cost"`
	// Utilisation is BuildSeconds over billed reservation capacity
	// (BilledSeconds × reservations_per_builder).
	Utilisation float64 `json:"utilisation"`
	// Wait is from submit to a builder; BootWait the part of it spent
	// waiting for the builder that took the build to come up; QueueWait
	// the rest (queueing, reconcile latency).
	Wait             Stats   `json:"wait"`
	BootWait         Stats   `json:"boot_wait"`
	QueueWait        Stats   `json:"queue_wait"`
	Launches         int     `json:"launches"`
	CapacityErrors   int     `json:"capacity_errors"`
	Interruptions    int     `json:"interruptions"`
	Rounds           int     `json:"reconcile_rounds,omitempty"`
	SimulatedSeconds float64 `json:"simulated_seconds"`
}

func (a *acc) result(name string, price float64) Result {
	r := Result{Policy: name, Builds: a.builds, Completed: a.completed, Failed: a.failed, Reruns: a.reruns,
		BuildSeconds: a.buildSec, BilledSeconds: a.billedSec, Cost: round4(a.billedSec / 3600 * price),
		Wait: stats(a.waits), BootWait: stats(a.boots), QueueWait: stats(a.queues),
		Launches: a.launches, CapacityErrors: a.capErr, Interruptions: a.intr}
	if a.capSec > 0 {
		r.Utilisation = round4(a.buildSec / a.capSec)
	}
	return r
}

func round4(x float64) float64 { return math.Round(x*10000) / 10000 }
