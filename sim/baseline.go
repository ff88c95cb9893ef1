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

// baselinePool is one pool's state while a baseline policy runs on it.
type baselinePool struct {
	env      Env
	rng      *rand.Rand
	bl       Baseline
	capacity int // builds per builder
	maxB     int // builders at most
	builds   []Build
	next     int // next build to submit
	a        *acc
	alive    []*bBuilder
	queue    []*bJob
	running  []*bJob
}

func runBaselinePool(env Env, rng *rand.Rand, p Pool, bl Baseline, builds []Build, horizon time.Duration, a *acc) time.Duration {
	bp := &baselinePool{env: env, rng: rng, bl: bl, builds: builds, a: a,
		capacity: max(p.Policy.ReservationsPerBuilder, 1), maxB: max(p.Policy.MaxBuilders, 1)}
	if bl.Kind == "per-build" {
		bp.capacity = 1
	}
	if bl.Kind == "always-on" {
		bp.maxB = bl.N
		for range bl.N {
			bp.launch(0, true)
		}
	}
	t := time.Duration(0)
	for ; ; t += time.Second {
		if t >= horizon && bp.next == len(builds) && len(bp.queue) == 0 && len(bp.running) == 0 || t >= horizon+24*time.Hour {
			break
		}
		bp.interrupt(t)
		bp.releaseFinished(t)
		bp.submit(t)
		bp.pruneEnded()
		bp.assign(t)
		bp.scale(t)
		bp.accountWaits(t)
	}
	for _, b := range bp.alive {
		if !b.ended {
			bp.bill(b, t)
		}
	}
	a.capSec = a.billedSec * float64(bp.capacity)
	return t
}

// bill ends builder b at time at and bills it from running to at.
func (bp *baselinePool) bill(b *bBuilder, at time.Duration) {
	b.ended = true
	if at >= b.runningAt {
		bp.a.billedSec += bp.env.Bill(Epoch.Add(b.runningAt), Epoch.Add(at)).Seconds()
	}
}

// launch starts a builder at t, already up if warm; it reports false when
// the launch failed for capacity.
func (bp *baselinePool) launch(t time.Duration, warm bool) bool {
	env, rng := bp.env, bp.rng
	if !warm && rng.Float64() < env.CapacityErrorRate {
		bp.a.capErr++
		return false
	}
	bp.a.launches++
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
	bp.alive = append(bp.alive, b)
	return true
}

// interrupt ends builders interrupted at t.
func (bp *baselinePool) interrupt(t time.Duration) {
	// Interruptions: running builds go back to the head of the queue.
	for _, b := range bp.alive {
		if b.interruptAt >= 0 && t >= b.interruptAt && !b.ended {
			bp.a.intr++
			bp.bill(b, t)
			keep := bp.running[:0]
			var back []*bJob
			for _, j := range bp.running {
				if j.builder == b {
					back = append(back, j)
					bp.a.reruns++
				} else {
					keep = append(keep, j)
				}
			}
			bp.running = keep
			bp.queue = append(back, bp.queue...)
		}
	}
}

// releaseFinished frees the room of builds that end at t.
func (bp *baselinePool) releaseFinished(t time.Duration) {
	keep := bp.running[:0]
	for _, j := range bp.running {
		if t >= j.endAt {
			j.builder.busy--
			if j.builder.busy == 0 {
				j.builder.idleSince = t
			}
			bp.a.completed++
			bp.a.buildSec += j.b.Duration.Seconds()
			continue
		}
		keep = append(keep, j)
	}
	bp.running = keep
}

// submit queues the builds submitted by t.
func (bp *baselinePool) submit(t time.Duration) {
	for bp.next < len(bp.builds) && bp.builds[bp.next].Submit <= t {
		bp.queue = append(bp.queue, &bJob{b: bp.builds[bp.next], created: t})
		bp.a.builds++
		bp.next++
	}
}

// pruneEnded forgets ended builders.
func (bp *baselinePool) pruneEnded() {
	liveB := bp.alive[:0]
	for _, b := range bp.alive {
		if !b.ended {
			liveB = append(liveB, b)
		}
	}
	bp.alive = liveB
}

// assign starts queued builds on ready builders with room.
func (bp *baselinePool) assign(t time.Duration) {
	// Assign FIFO, fullest ready builder first.
	for len(bp.queue) > 0 {
		var best *bBuilder
		for _, b := range bp.alive {
			if b.readyAt <= t && b.busy < bp.capacity && (best == nil || b.busy > best.busy) {
				best = b
			}
		}
		if best == nil {
			break
		}
		j := bp.queue[0]
		bp.queue = bp.queue[1:]
		best.busy++
		j.builder, j.endAt = best, t+j.b.Duration
		bp.running = append(bp.running, j)
		if !j.assigned {
			j.assigned = true
			bp.a.wait(t-j.created, j.bootWait)
		}
	}
}

// scale launches and retires builders as the baseline's policy says.
func (bp *baselinePool) scale(t time.Duration) {
	starting, idle := 0, 0
	for _, b := range bp.alive {
		switch {
		case b.readyAt > t:
			starting++
		case b.busy == 0:
			idle++
		}
	}
	switch bp.bl.Kind {
	case "always-on":
		for len(bp.alive) < bp.bl.N && bp.launch(t, false) {
		}
	case "per-build", "idle-count":
		bp.scaleUp(t, starting, idle)
		bp.retireIdle(t, idle)
	}
}

// scaleUp launches builders for the queue not covered by starting ones and,
// for "idle-count", to keep K idle.
func (bp *baselinePool) scaleUp(t time.Duration, starting, idle int) {
	capacity := bp.capacity
	need := (max(len(bp.queue)-starting*capacity, 0) + capacity - 1) / capacity
	if bp.bl.Kind == "idle-count" {
		need += max(bp.bl.K-idle-max(starting-need, 0), 0)
	}
	for ; need > 0 && len(bp.alive) < bp.maxB; need-- {
		if !bp.launch(t, false) {
			break
		}
	}
}

// retireIdle ends builders idle past the baseline's limit while more than
// it keeps are idle.
func (bp *baselinePool) retireIdle(t time.Duration, idle int) {
	limit, keepIdle := bp.bl.WaitTimeout, 0
	if bp.bl.Kind == "idle-count" {
		limit, keepIdle = bp.bl.IdleTime, bp.bl.K
	}
	for _, b := range bp.alive {
		if idle <= keepIdle {
			break
		}
		if b.readyAt <= t && b.busy == 0 && t-b.idleSince >= limit {
			bp.bill(b, t)
			idle--
		}
	}
}

// accountWaits adds the coming second to each queued build's wait.
func (bp *baselinePool) accountWaits(t time.Duration) {
	// Wait accounting, as in Run: covered by a starting builder's room
	// (FIFO) is boot wait, the rest is queueing.
	starting := 0
	for _, b := range bp.alive {
		if !b.ended && b.readyAt > t {
			starting++
		}
	}
	for i, j := range bp.queue {
		if !j.assigned && i < starting*bp.capacity {
			j.bootWait += time.Second
		} else if !j.assigned {
			j.queueWait += time.Second
		}
	}
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
