package sim

import (
	"math"
	"sort"
	"time"

	"guardianproject.dev/ops/nix-builder-autoscaler/scaler"
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
	inst      string // the instance it runs on (empty: not known)
	assigned  bool   // assigned at least once (wait recorded)
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
	// IdlePolicy says, per pool, the idle timeout the policy used at the
	// end of the run and why (scaler.PoolPolicy.IdlePolicy), the range it
	// took during the run, and the billing minimum.
	IdlePolicy []string `json:"idle_policy,omitempty"`
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
