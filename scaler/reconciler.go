package scaler

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"strings"
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
	Logger       *slog.Logger
	Recorder     Recorder // nil = NopRecorder
	// OnChange is called after a round that changed state (long polls wake).
	OnChange func()
	// OnObserved gets every round's observation (the SPOE agent's view of
	// the fleet is refreshed from it).
	OnObserved func(Observed)
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
	// settling is true while some slot is between stable states; only the
	// Run goroutine touches it.
	settling bool

	mu       sync.Mutex
	backoff  map[string]time.Time
	failures map[string]int
	lastErr  map[string]string
	status   RoundStatus
}

// RoundStatus tells how the last reconcile round went.
type RoundStatus struct {
	At       time.Time
	Duration time.Duration
	Err      error
	Rounds   uint64
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
	return &Reconciler{
		o:        o,
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

// DefaultFastInterval is the round rate while any builder is changing state
// (starting, draining, terminating, held connections waiting): there is no
// event for "the builder's sshd answers", so it is polled, but only while
// it matters.
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
	for {
		select {
		case <-ctx.Done():
			return nil
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
	r.status = RoundStatus{At: r.o.Clock.Now(), Duration: d, Err: err, Rounds: r.status.Rounds + 1}
	r.mu.Unlock()
	if changed {
		if r.o.OnChange != nil {
			r.o.OnChange()
		}
		r.Kick()
	}
	return err
}

// ReconcileOnce observes, plans and applies once. It reports whether any
// state changed. Callers other than Run must not run it concurrently.
func (r *Reconciler) ReconcileOnce(ctx context.Context) (changed bool, err error) {
	// The round's time is when its observation began, not when it ended: a
	// round whose provider or load balancer calls took a while acts on what
	// it saw then. Stamped later, a round that saw a reservation still
	// assigned would mark its builder active after the release that a
	// concurrent request committed meanwhile, and restart its idle time.
	now := r.o.Clock.Now()
	obs, owner, err := r.observe(ctx)
	if err != nil {
		return false, err
	}
	actions := Plan(now, r.o.Policy, obs)
	r.settling = len(actions) > 0 || len(obs.Held) > 0
	for _, s := range obs.Slots {
		srv := obs.Servers[s.Key()]
		// A ready slot the load balancer does not route to yet (the agent's
		// next check brings it up) is still settling too.
		r.settling = r.settling || s.State != Empty && s.State != Ready || s.State == Ready && obs.ServersKnown && !srv.Up
	}
	r.o.Recorder.Observed(r.o.Policy, obs)
	if r.o.OnObserved != nil {
		r.o.OnObserved(obs)
	}
	a := applier{r: r, now: now, owner: owner}
	for _, act := range actions {
		if err := a.apply(ctx, act); err != nil {
			if errors.Is(err, ErrConflict) {
				// Someone changed a row meanwhile; the plan is stale. Go again.
				r.Kick()
				return a.changed, nil
			}
			return a.changed, fmt.Errorf("%s: %w", act, err)
		}
	}
	return a.changed, nil
}

func (r *Reconciler) observe(ctx context.Context) (Observed, map[string]Provider, error) {
	var obs Observed
	var err error
	if obs.Slots, err = r.o.Store.Slots(ctx); err != nil {
		return obs, nil, fmt.Errorf("load slots: %w", err)
	}
	if obs.Reservations, err = r.o.Store.LiveReservations(ctx); err != nil {
		return obs, nil, fmt.Errorf("load reservations: %w", err)
	}
	obs.InstancesKnown = map[string]bool{}
	owner := map[string]Provider{}
	listed := map[Provider]bool{}
	for _, pp := range r.o.Policy.Pools {
		p := r.o.Providers[pp.Name]
		if p == nil || listed[p] {
			continue
		}
		listed[p] = true
		cctx, cancel := context.WithTimeout(ctx, r.o.CallTimeout)
		ins, err := p.List(cctx)
		cancel()
		if err != nil {
			r.o.Logger.Error("provider list failed; no instance is judged gone this round", "pool", pp.Name, "err", err)
			r.o.Recorder.CallFailed("list")
			continue
		}
		for pool, q := range r.o.Providers {
			if q == p {
				obs.InstancesKnown[pool] = true
			}
		}
		for _, in := range ins {
			owner[in.ID] = p
		}
		obs.Instances = append(obs.Instances, ins...)
	}
	if r.o.Readiness != nil {
		cctx, cancel := context.WithTimeout(ctx, r.o.CallTimeout)
		servers, err := r.o.Readiness.Servers(cctx)
		cancel()
		if err != nil {
			r.o.Logger.Error("load balancer unreachable: no builder is drained or terminated until it answers", "err", err)
			r.o.Recorder.LoadBalancer(false)
		} else {
			r.o.Recorder.LoadBalancer(true)
			obs.Servers, obs.ServersKnown = servers, true
		}
	}
	r.mu.Lock()
	obs.LaunchBackoff = copyMap(r.backoff)
	obs.LaunchError = copyMap(r.lastErr)
	if r.o.Held != nil {
		obs.Held = r.o.Held()
	}
	r.mu.Unlock()
	return obs, owner, nil
}

func copyMap[V any](m map[string]V) map[string]V {
	c := make(map[string]V, len(m))
	for k, v := range m {
		c[k] = v
	}
	return c
}

// applier carries one round's context while actions are applied.
type applier struct {
	r       *Reconciler
	now     time.Time
	owner   map[string]Provider // instance id → provider that listed it
	changed bool
}

const actor = "reconciler"

func (a *applier) event(kind string, act Action) Event {
	return Event{At: a.now, Kind: kind, Pool: act.Pool, Slot: act.Slot, InstanceID: act.Instance,
		ReservationID: act.Reservation, Actor: actor, Reason: act.Reason}
}

// conflictAttempts bounds how often the reconciler re-reads a row that a
// concurrent writer changed; after that the round ends and is kicked again.
const conflictAttempts = 5

// updateSlot re-reads a slot and applies fn until the commit does not
// conflict, so a concurrent operator change is merged, never overwritten.
// fn returns false to skip (the slot no longer needs the change).
func (a *applier) updateSlot(ctx context.Context, key SlotKey, fn func(*Slot) bool, evs ...Event) (Slot, error) {
	var s Slot
	err := RetryOnConflict(conflictAttempts, func() error {
		var err error
		if s, err = a.r.o.Store.Slot(ctx, key); err != nil {
			return err
		}
		if !fn(&s) {
			return nil
		}
		if err := a.r.o.Store.Commit(ctx, Change{Slots: []Slot{s}, Events: evs}); err != nil {
			return err
		}
		a.changed = true
		s.Version++
		return nil
	})
	return s, err
}

// updateReservation is updateSlot for a reservation; it reports whether it
// committed a change.
func (a *applier) updateReservation(ctx context.Context, id string, fn func(*Reservation) bool, evs ...Event) (bool, error) {
	committed := false
	err := RetryOnConflict(conflictAttempts, func() error {
		res, err := a.r.o.Store.Reservation(ctx, id)
		if err != nil {
			return err
		}
		if !fn(&res) {
			return nil
		}
		if err := a.r.o.Store.Commit(ctx, Change{Reservations: []Reservation{res}, Events: evs}); err != nil {
			return err
		}
		a.changed, committed = true, true
		return nil
	})
	return committed, err
}

func (a *applier) log() *slog.Logger { return a.r.o.Logger }

func (a *applier) apply(ctx context.Context, act Action) error {
	key := SlotKey{act.Pool, act.Slot}
	m := a.r.o.Recorder
	switch act.Kind {
	case ActLaunch:
		return a.launch(ctx, act)
	case ActAdopt:
		_, err := a.updateSlot(ctx, key, func(s *Slot) bool {
			switch {
			case act.To == Booting && s.State == Empty:
				// An untracked builder taken back into its free slot.
				*s = Slot{Pool: s.Pool, Name: s.Name, State: Booting, InstanceID: act.Instance, StateSince: a.now,
					LastActive: a.now, Weight: s.Weight, Version: s.Version}
				return true
			case act.To == "" && s.State == Launching && s.InstanceID == "":
				s.InstanceID = act.Instance
				return true
			}
			return false
		}, a.event(EvAdopted, act))
		a.log().Info("instance adopted", "slot", key, "instance", act.Instance, "reason", act.Reason)
		return err
	case ActAdvance:
		kind := map[SlotState]string{Booting: EvBooted, Ready: EvReady, Empty: EvEmptied}[act.To]
		var from SlotState
		_, err := a.updateSlot(ctx, key, func(s *Slot) bool {
			if s.InstanceID != act.Instance {
				return false
			}
			from = s.State
			s.State, s.StateSince = act.To, a.now
			switch act.To {
			case Ready:
				s.LastActive = a.now
			case Empty:
				*s = Slot{Pool: s.Pool, Name: s.Name, State: Empty, StateSince: a.now, LastActive: s.LastActive, Weight: s.Weight, Version: s.Version}
			}
			return true
		}, a.event(kind, act))
		if err != nil {
			return err
		}
		a.log().Info("slot "+string(act.To), "slot", key, "from", from, "instance", act.Instance, "reason", act.Reason)
		if act.To == Empty && a.r.o.Readiness != nil {
			a.unbind(ctx, key)
		}
		return nil
	case ActBind:
		if a.r.o.Readiness == nil {
			return nil
		}
		cctx, cancel := context.WithTimeout(ctx, a.r.o.CallTimeout)
		err := a.r.o.Readiness.Bind(cctx, key, act.Addr)
		cancel()
		if err != nil {
			// Not fatal for the round: retried next round, and the slot's
			// bind timeout replaces a builder that can never be bound.
			a.log().Error("bind failed", "slot", key, "instance", act.Instance, "addr", act.Addr, "err", err)
			m.CallFailed("bind")
			return nil
		}
		_, err = a.updateSlot(ctx, key, func(s *Slot) bool {
			if s.InstanceID != act.Instance {
				return false
			}
			if s.State == Booting {
				s.State, s.StateSince = Binding, a.now
			}
			s.Address = act.Addr
			return true
		}, a.event(EvBound, act))
		a.log().Info("slot bound", "slot", key, "instance", act.Instance, "addr", act.Addr)
		return err
	case ActTouch:
		_, err := a.updateSlot(ctx, key, func(s *Slot) bool {
			if s.LastActive.After(a.now) || s.LastActive.Equal(a.now) {
				return false
			}
			s.LastActive = a.now
			return true
		})
		return err
	case ActDrain:
		_, err := a.updateSlot(ctx, key, func(s *Slot) bool {
			if s.State != Ready {
				return false
			}
			s.State, s.StateSince, s.DrainReason = Draining, a.now, act.Reason
			return true
		}, a.event(EvDrained, act))
		a.log().Info("slot draining", "slot", key, "instance", act.Instance, "reason", act.Reason)
		return err
	case ActTerminate, ActRetryTerminate:
		return a.terminate(ctx, act)
	case ActAssign:
		var wait time.Duration
		ok, err := a.updateReservation(ctx, act.Reservation, func(res *Reservation) bool {
			if res.State != Pending {
				return false
			}
			res.State, res.Slot, res.AssignedAt = Assigned, act.Slot, a.now
			wait = max(a.now.Sub(res.CreatedAt), 0) // created after the round began
			return true
		}, a.event(EvAssigned, act))
		if err != nil || !ok {
			return err
		}
		m.Assigned(act.Pool, wait)
		a.log().Info("reservation assigned", "reservation", act.Reservation, "slot", key, "instance", act.Instance, "wait", wait)
		_, err = a.updateSlot(ctx, key, func(s *Slot) bool {
			s.LastActive = a.now
			return true
		})
		return err
	case ActRequeue:
		_, err := a.updateReservation(ctx, act.Reservation, func(res *Reservation) bool {
			if res.State != Assigned || res.Slot != act.Slot {
				return false
			}
			res.State, res.Slot, res.AssignedAt = Pending, "", time.Time{}
			return true
		}, a.event(EvRequeued, act))
		a.log().Warn("reservation back to pending", "reservation", act.Reservation, "slot", key, "reason", act.Reason)
		return err
	case ActFail, ActExpire:
		state, kind := Failed, EvFailed
		if act.Kind == ActExpire {
			state, kind = Expired, EvExpired
		}
		ok, err := a.updateReservation(ctx, act.Reservation, func(res *Reservation) bool {
			if !res.State.Live() {
				return false
			}
			res.State, res.EndedAt, res.Reason = state, a.now, act.Reason
			return true
		}, a.event(kind, act))
		if ok && act.Kind == ActExpire {
			m.LeaseExpired(act.Pool)
		}
		if ok {
			a.log().Warn("reservation "+string(state), "reservation", act.Reservation, "pool", act.Pool, "slot", act.Slot, "reason", act.Reason)
		}
		return err
	}
	return fmt.Errorf("unknown action %q", act.Kind)
}

func (a *applier) unbind(ctx context.Context, key SlotKey) {
	cctx, cancel := context.WithTimeout(ctx, a.r.o.CallTimeout)
	defer cancel()
	if err := a.r.o.Readiness.Bind(cctx, key, ""); err != nil {
		a.log().Warn("could not reset the server address of an empty slot", "slot", key, "err", err)
	}
}

func newLaunchID() string {
	b := make([]byte, 8)
	_, _ = rand.Read(b)
	return hex.EncodeToString(b)
}

func (a *applier) launch(ctx context.Context, act Action) error {
	key := SlotKey{act.Pool, act.Slot}
	p := a.r.o.Providers[act.Pool]
	if p == nil {
		return fmt.Errorf("no provider for pool %s", act.Pool)
	}
	launchID := newLaunchID()
	// The slot says "launching" with its launch id before the provider is
	// called: after a crash the instance is found again by that id.
	_, err := a.updateSlot(ctx, key, func(s *Slot) bool {
		if s.State != Empty {
			return false
		}
		*s = Slot{Pool: s.Pool, Name: s.Name, State: Launching, LaunchID: launchID, StateSince: a.now,
			LastActive: s.LastActive, Weight: s.Weight, Version: s.Version}
		return true
	})
	if err != nil {
		return err
	}
	cctx, cancel := context.WithTimeout(ctx, a.r.o.CallTimeout)
	in, lerr := p.Launch(cctx, LaunchRequest{Pool: act.Pool, Slot: act.Slot, LaunchID: launchID})
	cancel()
	if lerr != nil {
		a.r.launchFailed(act.Pool, a.now, lerr)
		a.r.o.Recorder.Launched(act.Pool, lerr)
		a.log().Error("launch failed", "slot", key, "err", lerr)
		ev := a.event(EvFailed, act)
		ev.Reason = "launch failed: " + lerr.Error()
		_, err = a.updateSlot(ctx, key, func(s *Slot) bool {
			if s.State != Launching || s.LaunchID != launchID || s.InstanceID != "" {
				return false
			}
			*s = Slot{Pool: s.Pool, Name: s.Name, State: Empty, StateSince: a.now, LastActive: s.LastActive, Weight: s.Weight, Version: s.Version}
			return true
		}, ev)
		return err
	}
	a.r.launchSucceeded(act.Pool)
	a.r.o.Recorder.Launched(act.Pool, nil)
	act.Instance = in.ID
	_, err = a.updateSlot(ctx, key, func(s *Slot) bool {
		if s.LaunchID != launchID {
			return false
		}
		s.InstanceID, s.InstanceType, s.Market, s.Zone = in.ID, in.Type, in.Market, in.Zone
		return true
	}, launchedEvent(a.event(EvLaunched, act), in))
	a.log().Info("builder launched", "slot", key, "instance", in.ID, "type", in.Type, "market", in.Market, "zone", in.Zone, "reason", act.Reason)
	return err
}

// quiet closes a drained builder to new connections and reports whether
// no session is open on it, so it may be terminated (Quiescer). Without a
// Quiescer, Plan's observation is all there is.
func (a *applier) quiet(ctx context.Context, key SlotKey, act Action) bool {
	q, ok := a.r.o.Readiness.(Quiescer)
	if !ok {
		return true
	}
	cctx, cancel := context.WithTimeout(ctx, a.r.o.CallTimeout)
	n, err := q.Quiesce(cctx, key)
	cancel()
	switch {
	case err != nil:
		a.log().Warn("not terminating a drained builder yet: cannot close it to new connections first (retried next round)",
			"slot", key, "instance", act.Instance, "err", err)
		a.r.o.Recorder.CallFailed("quiesce")
		return false
	case n > 0:
		a.log().Info("a session reached the drained builder after it was seen idle; terminating it once the session ends",
			"slot", key, "instance", act.Instance, "sessions", n)
		return false
	}
	return true
}

func (a *applier) terminate(ctx context.Context, act Action) error {
	key := SlotKey{act.Pool, act.Slot}
	retry := act.Kind == ActRetryTerminate
	if act.IfIdle && !a.quiet(ctx, key, act) {
		return nil // the slot stays draining; a later round decides again
	}
	if act.Slot != "" && !retry {
		_, err := a.updateSlot(ctx, key, func(s *Slot) bool {
			if s.InstanceID != act.Instance || s.State == Terminating || s.State == Empty {
				return false
			}
			if s.InstanceID == "" {
				*s = Slot{Pool: s.Pool, Name: s.Name, State: Empty, StateSince: a.now, LastActive: s.LastActive, Weight: s.Weight, Version: s.Version}
			} else {
				s.State, s.StateSince, s.DrainReason = Terminating, a.now, act.Reason
			}
			return true
		}, a.event(EvTerminated, act))
		if err != nil {
			return err
		}
	}
	if act.Instance == "" {
		a.log().Info("slot freed", "slot", key, "reason", act.Reason)
		return nil
	}
	p := a.owner[act.Instance]
	if p == nil {
		p = a.r.o.Providers[act.Pool]
	}
	if p == nil {
		return fmt.Errorf("no provider knows instance %s", act.Instance)
	}
	if act.Slot == "" {
		if err := a.r.o.Store.Commit(ctx, Change{Events: []Event{a.event(EvTerminated, act)}}); err != nil {
			return err
		}
	}
	cctx, cancel := context.WithTimeout(ctx, a.r.o.CallTimeout)
	err := p.Terminate(cctx, act.Instance)
	cancel()
	if err != nil {
		// The slot stays terminating; Plan asks again next round.
		a.r.o.Recorder.CallFailed("terminate")
		a.log().Error("terminate failed; will retry", "slot", key, "instance", act.Instance, "err", err)
		return nil
	}
	if !retry {
		a.r.o.Recorder.Terminated(act.Pool, act.Cause)
	}
	a.log().Info("builder terminated", "slot", key, "instance", act.Instance, "reason", act.Reason)
	return nil
}

// launchedEvent records what was bought (market, type, zone) with the
// reason it was launched, so costs can be traced from the event log.
func launchedEvent(ev Event, in Instance) Event {
	var what []string
	for _, w := range []string{in.Market, in.Type, in.Zone} {
		if w != "" {
			what = append(what, w)
		}
	}
	if len(what) > 0 {
		ev.Reason = strings.Join(what, " ") + ": " + ev.Reason
	}
	return ev
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
