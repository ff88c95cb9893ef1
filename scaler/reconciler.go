package scaler

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"time"

	"guardianproject.dev/ops/nix-builder-autoscaler/clock"
)

// Store is the persistent state the reconciler reads and changes.
type Store interface {
	Slots(ctx context.Context) ([]Slot, error)
	Slot(ctx context.Context, key SlotKey) (Slot, error)
	LiveReservations(ctx context.Context) ([]Reservation, error)
	Reservation(ctx context.Context, id string) (Reservation, error)
	// Intents returns the intents not yet applied, oldest first.
	Intents(ctx context.Context) ([]Intent, error)
	// Forecasts returns the forecasts open, or ended within
	// ForecastRecent, when they were read.
	Forecasts(ctx context.Context) ([]Forecast, error)
	Commit(ctx context.Context, c Change) error
}

// Options configures a Reconciler.
type Options struct {
	Store Store
	// Providers maps each pool to the provider that runs its builders. One
	// provider may serve several pools; it is listed once per round.
	Providers map[string]Provider
	Readiness Readiness
	Policy    Policy
	Clock     clock.Clock   // nil = clock.Real
	Interval  time.Duration // time between rounds without events
	// FastInterval is the time between rounds while builders change state
	// (0: DefaultFastInterval); match it to the load balancer's check
	// interval.
	FastInterval time.Duration
	// BindPoll is how often the load balancer is asked, between rounds,
	// whether a binding builder passed its health check (0:
	// DefaultBindPoll). It runs only while some slot is binding: the check
	// result has no event, and a round costs a provider List.
	BindPoll time.Duration
	Logger   *slog.Logger
	Recorder Recorder // nil = NopRecorder
	// Views receives the view every round publishes (nil: the reconciler
	// keeps its own; see Views).
	Views *Views
	// OnPublish is called with every view right after it is published
	// (the SPOE agent refreshes its routing table from it).
	OnPublish func(*View)
	// Held reports connections the load balancer holds for want of a
	// builder, per pool (nil: none).
	Held func() map[string]int
	// CallTimeout bounds each provider and readiness call.
	CallTimeout time.Duration
	// KickBatch is how long a kicked round waits for more events (0:
	// KickBatch; negative: not at all, for a manual clock that no test
	// advances by milliseconds).
	KickBatch time.Duration
}

// Reconciler runs Plan and applies its actions: on a ticker, and at once
// whenever Kick is called (new reservation, release, operator command).
type Reconciler struct {
	o    Options
	kick chan struct{}
	reqs chan chan error
	// settling is true while some slot is between stable states, binding
	// while some slot waits for its builder's health check; only the Run
	// goroutine touches them.
	settling, binding bool
	views             *Views
	version           uint64      // of the last view published; Run goroutine only
	rows              *storeRows  // the last rows read (readStore); Run goroutine only
	phases            RoundPhases // of the round running; Run goroutine only

	boots bootMeter // what boots take, per pool (Observed.Boots)
	// idle is each pool's idle timeout as last logged; Run goroutine only.
	idle map[string]time.Duration
	// noticed is the notice kind recorded per instance, so that each is
	// recorded once; Run goroutine only.
	noticed map[string]NoticeKind

	mu       sync.Mutex
	backoff  map[string]time.Time
	failures map[string]int
	lastErr  map[string]string
	status   RoundStatus
	results  map[string]IntentResult
}

// RoundStatus tells how the last reconcile round went.
type RoundStatus struct {
	At       time.Time
	Duration time.Duration
	Phases   RoundPhases
	Err      error
	Rounds   uint64
}

// RoundPhases is where a round's time went. Store, List and Servers run at
// once (observe), so Observe is the longest of them, not their sum; the
// rest run one after the other. Readers who find a round slow look here
// first: a slow List is the provider's API, a slow Servers is HAProxy, a
// slow Apply is the provider's calls or the store's commits.
type RoundPhases struct {
	Observe time.Duration // the three reads below, at once
	Store   time.Duration // slots, reservations and intents (reused while unchanged)
	List    time.Duration // every provider's List
	Servers time.Duration // the load balancer's server states
	Plan    time.Duration
	Apply   time.Duration // the actions: provider calls and store commits
	Publish time.Duration // the new view (and its re-read, if rows changed)
	Push    time.Duration // the load balancer states this round decided
}

// New returns a reconciler; call Run to start it.
func New(o Options) *Reconciler {
	if o.Clock == nil {
		o.Clock = clock.Real{}
	}
	if o.Logger == nil {
		o.Logger = slog.Default()
	}
	if o.Recorder == nil {
		o.Recorder = NopRecorder{}
	}
	if o.Interval <= 0 {
		o.Interval = 10 * time.Second
	}
	if o.FastInterval <= 0 {
		o.FastInterval = DefaultFastInterval
	}
	if o.CallTimeout <= 0 {
		o.CallTimeout = 2 * time.Minute
	}
	if o.KickBatch == 0 {
		o.KickBatch = KickBatch
	}
	if o.BindPoll <= 0 {
		o.BindPoll = DefaultBindPoll
	}
	if o.Views == nil {
		o.Views = &Views{}
	}
	return &Reconciler{
		o:        o,
		views:    o.Views,
		results:  map[string]IntentResult{},
		kick:     make(chan struct{}, 1),
		reqs:     make(chan chan error),
		backoff:  map[string]time.Time{},
		failures: map[string]int{},
		lastErr:  map[string]string{},
	}
}

// Kick asks for a round as soon as possible; it never blocks.
func (r *Reconciler) Kick() {
	select {
	case r.kick <- struct{}{}:
	default:
	}
}

// Reconcile runs one round in the Run loop and waits for it.
func (r *Reconciler) Reconcile(ctx context.Context) error {
	done := make(chan error, 1)
	select {
	case r.reqs <- done:
	case <-ctx.Done():
		return ctx.Err()
	}
	select {
	case err := <-done:
		return err
	case <-ctx.Done():
		return ctx.Err()
	}
}

// Status returns the last round's outcome.
func (r *Reconciler) Status() RoundStatus {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.status
}

// Views returns where the reconciler publishes its view of the fleet.
func (r *Reconciler) Views() *Views { return r.views }

// Result returns, once, how the intent id was dealt with, if a round has
// applied or refused it since the last call for it.
func (r *Reconciler) Result(id string) (IntentResult, bool) {
	r.mu.Lock()
	defer r.mu.Unlock()
	res, ok := r.results[id]
	delete(r.results, id)
	return res, ok
}

// maxResults bounds the results kept for API requests that wait for them;
// a request that gave up never collects its result.
const maxResults = 4096

func (r *Reconciler) keepResults(m map[string]IntentResult) {
	if len(m) == 0 {
		return
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	if len(r.results)+len(m) > maxResults {
		clear(r.results)
	}
	for id, res := range m {
		r.results[id] = res
	}
}

// DefaultBindPoll is how often a binding builder's health check is looked
// at between rounds (Options.BindPoll).
const DefaultBindPoll = 100 * time.Millisecond

// DefaultFastInterval is the round rate while any builder is changing state
// (starting, draining, terminating, held or queued connections waiting):
// there is no event for "the builder's sshd answers", so it is polled, but
// only while it matters.
const DefaultFastInterval = time.Second

// KickBatch is how long a round waits after the first event that asked for
// it, so that events arriving together are planned together (like
// Karpenter's batch window, but short enough not to matter to a build).
const KickBatch = 2 * time.Millisecond

// Run reconciles until ctx ends. Rounds never overlap. A round that changed
// something is followed at once by another, so chained transitions
// (launched → booting → binding) do not wait for a tick.
func (r *Reconciler) Run(ctx context.Context) error {
	t := r.o.Clock.NewTicker(min(r.o.FastInterval, r.o.Interval))
	defer t.Stop()
	r.round(ctx)
	last := r.o.Clock.Now()
	var bind clock.Ticker
	defer func() {
		if bind != nil {
			bind.Stop()
		}
	}()
	for {
		var bindC <-chan time.Time
		bind, bindC = r.bindTicker(bind)
		select {
		case <-ctx.Done():
			return nil
		case <-bindC:
			if !r.bindingPassed(ctx) {
				continue
			}
			r.round(ctx)
		case now := <-t.C():
			if !r.settling && now.Sub(last) < r.o.Interval {
				continue
			}
			r.round(ctx)
		case <-r.kick:
			// Let a burst of events (a push starting many builds, a
			// create quickly followed by its release) land in one round.
			if r.o.KickBatch > 0 && clock.Sleep(ctx, r.o.Clock, r.o.KickBatch) != nil {
				return nil
			}
			select {
			case <-r.kick:
			default:
			}
			r.round(ctx)
		case done := <-r.reqs:
			done <- r.round(ctx)
		}
		last = r.o.Clock.Now()
	}
}

func (r *Reconciler) round(ctx context.Context) error {
	start := r.o.Clock.Now()
	changed, err := r.ReconcileOnce(ctx)
	d := r.o.Clock.Now().Sub(start)
	if err != nil && ctx.Err() != nil {
		r.o.Recorder.Round(d, false)
		return err
	}
	r.o.Recorder.Round(d, err != nil)
	if err != nil {
		r.o.Logger.Error("reconcile failed", "err", err)
	}
	r.mu.Lock()
	r.status = RoundStatus{At: r.o.Clock.Now(), Duration: d, Phases: r.phases, Err: err, Rounds: r.status.Rounds + 1}
	r.mu.Unlock()
	if changed {
		r.Kick()
	}
	return err
}

// ReconcileOnce observes, plans, applies, publishes the new view and pushes
// the load balancer states it decided. It reports whether any state
// changed. Callers other than Run must not run it concurrently.
func (r *Reconciler) ReconcileOnce(ctx context.Context) (changed bool, err error) {
	// The round's time is when its observation began, not when it ended: a
	// round whose provider or load balancer calls took a while acts on what
	// it saw then. Stamped later, a round that saw a reservation still
	// assigned would mark its builder active after the release that a
	// concurrent request committed meanwhile, and restart its idle time.
	now := r.o.Clock.Now()
	r.phases = RoundPhases{}
	gen := r.generation()
	obs, owner, err := r.observe(ctx)
	r.phases.Observe = r.since(now)
	if err != nil {
		return false, err
	}
	t := r.o.Clock.Now()
	actions := Plan(now, r.o.Policy, obs)
	r.phases.Plan, t = r.lap(t)
	r.settling = len(actions) > 0 || len(obs.Held) > 0 || anyPositive(obs.Queued)
	for _, s := range obs.Slots {
		srv := obs.Servers[s.Key()]
		// A ready slot the load balancer does not route to yet (the push,
		// or the agent's next check, brings it up) is still settling too.
		r.settling = r.settling || s.State != Empty && s.State != Ready || s.State == Ready && obs.ServersKnown && !srv.Up
	}
	r.o.Recorder.Observed(r.o.Policy, obs)
	if err := r.recordNotices(ctx, now, obs); err != nil {
		return false, err
	}
	a := applier{r: r, now: now, owner: owner}
	for _, act := range actions {
		if err = a.apply(ctx, act); err != nil {
			if errors.Is(err, ErrConflict) {
				// Someone changed a row meanwhile; the plan is stale. Go again.
				r.Kick()
				err = nil
			} else {
				err = fmt.Errorf("%s: %w", act, err)
			}
			break
		}
	}
	r.phases.Apply, t = r.lap(t)
	r.publish(ctx, now, gen, obs, a.changed)
	r.keepResults(a.results)
	r.phases.Publish, t = r.lap(t)
	r.pushAll(ctx, a.pushes)
	r.phases.Push, _ = r.lap(t)
	return a.changed, err
}

// since is the time from t to now on the reconciler's clock.
func (r *Reconciler) since(t time.Time) time.Duration { return r.o.Clock.Now().Sub(t) }

// lap is the time from t to now, and now, for the next phase.
func (r *Reconciler) lap(t time.Time) (time.Duration, time.Time) {
	now := r.o.Clock.Now()
	return now.Sub(t), now
}

func copyMap[V any](m map[string]V) map[string]V {
	c := make(map[string]V, len(m))
	for k, v := range m {
		c[k] = v
	}
	return c
}

// launchFailed backs the pool off: exponentially (5s, 10s, ... up to 5m)
// for a provider without capacity or failing, but only ThrottleBackoff for
// one that throttled (it has capacity; its API wants fewer calls).
func (r *Reconciler) launchFailed(pool string, now time.Time, err error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.lastErr[pool] = err.Error()
	if errors.Is(err, ErrThrottled) {
		r.backoff[pool] = now.Add(ThrottleBackoff)
		return
	}
	r.failures[pool]++
	d := 5 * time.Second << min(r.failures[pool]-1, 6)
	r.backoff[pool] = now.Add(min(d, 5*time.Minute))
}

// ThrottleBackoff is how long a pool waits to launch again after its
// provider throttled a launch.
const ThrottleBackoff = 5 * time.Second

func (r *Reconciler) launchSucceeded(pool string) {
	r.mu.Lock()
	defer r.mu.Unlock()
	delete(r.failures, pool)
	delete(r.backoff, pool)
	delete(r.lastErr, pool)
}
