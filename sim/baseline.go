package sim

import (
	"fmt"
	"math"
	"math/rand/v2"
	"time"
)

// Baseline is a simple scaling policy other autoscalers use, simulated on
// the same trace and the same cloud (Env) for comparison.
type Baseline struct {
	// Kind is "always-on" (N builders for the whole run, already up at the
	// start), "per-build" (Buildbot's EC2 latent worker: one build per
	// instance, launched on demand, terminated after WaitTimeout without a
	// build) or "idle-count" (GitLab's autoscaler: keep K idle builders,
	// remove a builder idle for IdleTime while more than K are idle).
	Kind        string
	N           int
	WaitTimeout time.Duration
	K           int
	IdleTime    time.Duration
}

// Name is the baseline's label in results.
func (b Baseline) Name() string {
	switch b.Kind {
	case "always-on":
		return fmt.Sprintf("always-on N=%d", b.N)
	case "per-build":
		return fmt.Sprintf("per-build wait_timeout=%s", b.WaitTimeout)
	case "idle-count":
		return fmt.Sprintf("idle-count K=%d T=%s", b.K, b.IdleTime)
	}
	return b.Kind
}

// DefaultBaselines are the baselines compared by default for a pool of at
// most maxBuilders builders.
func DefaultBaselines(maxBuilders int) []Baseline {
	return []Baseline{
		{Kind: "always-on", N: 2},
		{Kind: "always-on", N: max(1, maxBuilders/2)},
		{Kind: "per-build", WaitTimeout: 10 * time.Minute},
		{Kind: "idle-count", K: 1, IdleTime: 30 * time.Minute},
	}
}

type bBuilder struct {
	launchAt, runningAt, readyAt time.Duration
	interruptAt                  time.Duration // <0: never
	busy                         int
	idleSince                    time.Duration
	ended                        bool
}

type bJob struct {
	b        Build
	created  time.Duration
	assigned bool
	builder  *bBuilder
	endAt    time.Duration
	// bootWait and queueWait split the wait before the first assignment.
	bootWait, queueWait time.Duration
}

// RunBaseline simulates a baseline policy on the trace, each pool on its
// own, with the pool's max_builders and reservations_per_builder (one build
// per builder for "per-build").
func RunBaseline(cfg Config, bl Baseline, trace []Build) Result {
	accs := make([]acc, len(cfg.Pools))
	horizon := Horizon(trace)
	var unroutable int
	perPool := make([][]Build, len(cfg.Pools))
	for _, b := range trace {
		if pi := route(cfg.Pools, b); pi >= 0 {
			perPool[pi] = append(perPool[pi], b)
		} else {
			unroutable++
		}
	}
	var end time.Duration
	for i, p := range cfg.Pools {
		rng := rand.New(rand.NewPCG(cfg.Seed, uint64(i)+1))
		end = max(end, runBaselinePool(cfg.Env, rng, p, bl, perPool[i], horizon, &accs[i]))
	}
	r := merge(accs).result(bl.Name(), cfg.Env.Price())
	r.Unroutable = unroutable
	r.SimulatedSeconds = end.Seconds()
	return r
}

func runBaselinePool(env Env, rng *rand.Rand, p Pool, bl Baseline, builds []Build, horizon time.Duration, a *acc) time.Duration {
	capacity := max(p.Policy.ReservationsPerBuilder, 1)
	maxB := max(p.Policy.MaxBuilders, 1)
	if bl.Kind == "per-build" {
		capacity = 1
	}
	if bl.Kind == "always-on" {
		maxB = bl.N
	}
	var alive []*bBuilder
	var queue, running []*bJob
	bill := func(b *bBuilder, at time.Duration) {
		b.ended = true
		if at >= b.runningAt {
			a.billedSec += env.Bill(Epoch.Add(b.runningAt), Epoch.Add(at)).Seconds()
		}
	}
	launch := func(t time.Duration, warm bool) bool {
		if !warm && rng.Float64() < env.CapacityErrorRate {
			a.capErr++
			return false
		}
		a.launches++
		b := &bBuilder{launchAt: t, interruptAt: -1, idleSince: t}
		if warm {
			b.runningAt, b.readyAt = t, t
		} else {
			b.runningAt = t + env.LaunchToRunning.draw(rng)
			b.readyAt = b.runningAt + env.RunningToReachable.draw(rng)
		}
		if env.Market == "spot" && env.InterruptionsPerHour > 0 {
			if h := rng.ExpFloat64() / env.InterruptionsPerHour; h < 24*365 {
				b.interruptAt = b.runningAt + time.Duration(math.Round(h*float64(time.Hour))).Round(time.Second)
			}
		}
		alive = append(alive, b)
		return true
	}
	if bl.Kind == "always-on" {
		for range bl.N {
			launch(0, true)
		}
	}
	next := 0
	t := time.Duration(0)
	for ; ; t += time.Second {
		if t >= horizon && next == len(builds) && len(queue) == 0 && len(running) == 0 || t >= horizon+24*time.Hour {
			break
		}
		// Interruptions: running builds go back to the head of the queue.
		for _, b := range alive {
			if b.interruptAt >= 0 && t >= b.interruptAt && !b.ended {
				a.intr++
				bill(b, t)
				keep := running[:0]
				var back []*bJob
				for _, j := range running {
					if j.builder == b {
						back = append(back, j)
						a.reruns++
					} else {
						keep = append(keep, j)
					}
				}
				running = keep
				queue = append(back, queue...)
			}
		}
		keep := running[:0]
		for _, j := range running {
			if t >= j.endAt {
				j.builder.busy--
				if j.builder.busy == 0 {
					j.builder.idleSince = t
				}
				a.completed++
				a.buildSec += j.b.Duration.Seconds()
				continue
			}
			keep = append(keep, j)
		}
		running = keep
		for next < len(builds) && builds[next].Submit <= t {
			queue = append(queue, &bJob{b: builds[next], created: t})
			a.builds++
			next++
		}
		liveB := alive[:0]
		for _, b := range alive {
			if !b.ended {
				liveB = append(liveB, b)
			}
		}
		alive = liveB
		// Assign FIFO, fullest ready builder first.
		for len(queue) > 0 {
			var best *bBuilder
			for _, b := range alive {
				if b.readyAt <= t && b.busy < capacity && (best == nil || b.busy > best.busy) {
					best = b
				}
			}
			if best == nil {
				break
			}
			j := queue[0]
			queue = queue[1:]
			best.busy++
			j.builder, j.endAt = best, t+j.b.Duration
			running = append(running, j)
			if !j.assigned {
				j.assigned = true
				a.wait(t-j.created, j.bootWait)
			}
		}
		starting, idle := 0, 0
		for _, b := range alive {
			switch {
			case b.readyAt > t:
				starting++
			case b.busy == 0:
				idle++
			}
		}
		switch bl.Kind {
		case "always-on":
			for len(alive) < bl.N && launch(t, false) {
			}
		case "per-build", "idle-count":
			need := (max(len(queue)-starting*capacity, 0) + capacity - 1) / capacity
			if bl.Kind == "idle-count" {
				need += max(bl.K-idle-max(starting-need, 0), 0)
			}
			for ; need > 0 && len(alive) < maxB; need-- {
				if !launch(t, false) {
					break
				}
			}
			limit, keepIdle := bl.WaitTimeout, 0
			if bl.Kind == "idle-count" {
				limit, keepIdle = bl.IdleTime, bl.K
			}
			for _, b := range alive {
				if idle <= keepIdle {
					break
				}
				if b.readyAt <= t && b.busy == 0 && t-b.idleSince >= limit {
					bill(b, t)
					idle--
				}
			}
		}
		// Wait accounting, as in Run: covered by a starting builder's room
		// (FIFO) is boot wait, the rest is queueing.
		starting = 0
		for _, b := range alive {
			if !b.ended && b.readyAt > t {
				starting++
			}
		}
		for i, j := range queue {
			if !j.assigned && i < starting*capacity {
				j.bootWait += time.Second
			} else if !j.assigned {
				j.queueWait += time.Second
			}
		}
	}
	for _, b := range alive {
		if !b.ended {
			bill(b, t)
		}
	}
	a.capSec = a.billedSec * float64(capacity)
	return t
}

// LowerBound is the cheapest any policy could be: every build-second packed
// onto builders reservations_per_builder at a time, with no idle time and
// no boot time, billed per second with one 60 s minimum per pool.
func LowerBound(cfg Config, trace []Build) Result {
	accs := make([]acc, len(cfg.Pools))
	for _, b := range trace {
		if pi := route(cfg.Pools, b); pi >= 0 {
			accs[pi].buildSec += b.Duration.Seconds()
			accs[pi].builds++
			accs[pi].completed++
			accs[pi].wait(0, 0)
		}
	}
	for i, p := range cfg.Pools {
		rpb := float64(max(p.Policy.ReservationsPerBuilder, 1))
		if accs[i].buildSec > 0 {
			accs[i].billedSec = math.Max(accs[i].buildSec/rpb, cfg.Env.MinBilled.Seconds())
		}
		accs[i].capSec = accs[i].billedSec * rpb
	}
	return merge(accs).result("lower bound", cfg.Env.Price())
}
