package scaler_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"guardianproject.dev/ops/nix-builder-autoscaler/clock/clocktest"
	"guardianproject.dev/ops/nix-builder-autoscaler/internal/store"
	"guardianproject.dev/ops/nix-builder-autoscaler/internal/testwait"
	"guardianproject.dev/ops/nix-builder-autoscaler/scaler"
	"guardianproject.dev/ops/nix-builder-autoscaler/scaler/memstore"
)

var t0 = time.Date(2026, 12, 1, 12, 0, 0, 0, time.UTC)

// runningProvider lists one running instance per slot it was given.
type runningProvider struct{ ins []scaler.Instance }

func (p *runningProvider) Launch(context.Context, scaler.LaunchRequest) (scaler.Instance, error) {
	panic("no launch expected")
}
func (p *runningProvider) Terminate(context.Context, string) error         { return nil }
func (p *runningProvider) List(context.Context) ([]scaler.Instance, error) { return p.ins, nil }

// upServers reports every slot it was given up, healthy and without
// sessions: a load balancer whose view the test does not change.
type upServers map[scaler.SlotKey]string

func (u upServers) Bind(context.Context, scaler.SlotKey, string) error { return nil }
func (u upServers) Servers(context.Context) (map[scaler.SlotKey]scaler.ServerStatus, error) {
	out := map[scaler.SlotKey]scaler.ServerStatus{}
	for k, addr := range u {
		out[k] = scaler.ServerStatus{Addr: addr, Healthy: true, Up: true, Weight: scaler.DefaultWeight}
	}
	return out, nil
}

// racingStore runs during, once, right after the round has read the live
// reservations: what a concurrent writer (the API) and the passing of time
// do while the round's provider and load balancer calls are in flight.
type racingStore struct {
	*store.DB
	once   sync.Once
	during func()
}

func (s *racingStore) LiveReservations(ctx context.Context) ([]scaler.Reservation, error) {
	rs, err := s.DB.LiveReservations(ctx)
	s.once.Do(s.during)
	return rs, err
}

// TestStaleRoundDoesNotRestartIdleTime: a round that saw a reservation
// before it was released must not mark the builder active at a time after
// the release. It did once: the round took "now" after its observation, so
// when the clock moved on while its calls were in flight (a slow SSH probe,
// or a test's manual clock) it touched the slot at the later time and the
// idle drain came that much late, or, with a test's jump of minutes, never.
func TestStaleRoundDoesNotRestartIdleTime(t *testing.T) {
	ctx := context.Background()
	db, err := store.Open(ctx, filepath.Join(t.TempDir(), "state.db"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { db.Close() })
	key := scaler.SlotKey{Pool: "x86", Slot: "slot1"}
	if err := db.EnsureSlots(ctx, map[string]int{"x86": 1}, t0); err != nil {
		t.Fatal(err)
	}
	slot, err := db.Slot(ctx, key)
	if err != nil {
		t.Fatal(err)
	}
	slot.State, slot.InstanceID, slot.Address, slot.StateSince, slot.LastActive = scaler.Ready, "i-1", "127.0.0.1:22", t0, t0
	res := scaler.Reservation{ID: "r1", Pool: "x86", System: "x86_64-linux", State: scaler.Assigned, Slot: "slot1",
		CreatedAt: t0, AssignedAt: t0, ExpiresAt: t0.Add(time.Hour)}
	if _, _, err := db.CreateReservation(ctx, res, scaler.Event{At: t0, Kind: scaler.EvCreated, ReservationID: "r1"}); err != nil {
		t.Fatal(err)
	}
	if err := db.Commit(ctx, scaler.Change{Slots: []scaler.Slot{slot}}); err != nil {
		t.Fatal(err)
	}

	clock := clocktest.New(t0)
	released := t0.Add(time.Minute)
	clock.Advance(time.Minute)
	rs := &racingStore{DB: db, during: func() {
		// The build ends: its release restarts the idle time, as the API does.
		r, err := db.Reservation(ctx, "r1")
		if err != nil {
			t.Fatal(err)
		}
		s, err := db.Slot(ctx, key)
		if err != nil {
			t.Fatal(err)
		}
		r.State, r.Slot, r.EndedAt = scaler.Released, "", released
		s.LastActive = released
		if err := db.Commit(ctx, scaler.Change{Reservations: []scaler.Reservation{r}, Slots: []scaler.Slot{s}}); err != nil {
			t.Fatal(err)
		}
		clock.Advance(4 * time.Minute)
	}}
	prov := &runningProvider{ins: []scaler.Instance{{ID: "i-1", Pool: "x86", Slot: "slot1", State: scaler.InstanceRunning,
		Address: "127.0.0.1:22", LaunchedAt: t0}}}
	rec := scaler.New(scaler.Options{Store: rs, Providers: map[string]scaler.Provider{"x86": prov}, Clock: clock,
		Readiness: upServers{key: "127.0.0.1:22"},
		Policy: scaler.Policy{Pools: []scaler.PoolPolicy{{Name: "x86", MaxBuilders: 1, ReservationsPerBuilder: 1,
			IdleTimeout: 5 * time.Minute, DrainTimeout: time.Hour, LaunchTimeout: time.Hour, BootTimeout: time.Hour, BindTimeout: time.Hour}}}})
	if _, err := rec.ReconcileOnce(ctx); err != nil {
		t.Fatal(err)
	}
	s, err := db.Slot(ctx, key)
	if err != nil {
		t.Fatal(err)
	}
	if !s.LastActive.Equal(released) {
		t.Fatalf("slot LastActive = %v after a round that observed the reservation before its release; want the release time %v",
			s.LastActive, released)
	}

	// Five minutes after the release the builder is idle and drains.
	clock.Advance(released.Add(5 * time.Minute).Sub(clock.Now()))
	if _, err := rec.ReconcileOnce(ctx); err != nil {
		t.Fatal(err)
	}
	if s, _ = db.Slot(ctx, key); s.State != scaler.Draining {
		t.Errorf("slot = %s five minutes after the release with idle_timeout 5m; want draining", s.State)
	}
}

// failingProvider fails every launch with err.
type failingProvider struct{ err error }

func (p *failingProvider) Launch(context.Context, scaler.LaunchRequest) (scaler.Instance, error) {
	return scaler.Instance{}, p.err
}
func (p *failingProvider) Terminate(context.Context, string) error         { return nil }
func (p *failingProvider) List(context.Context) ([]scaler.Instance, error) { return nil, nil }

// TestLaunchBackoffByErrorKind: a throttled launch is retried after
// ThrottleBackoff every time; a pool without capacity backs off further
// with each failure.
func TestLaunchBackoffByErrorKind(t *testing.T) {
	for _, tc := range []struct {
		name string
		err  error
		want []time.Duration // backoff after each failed launch
	}{
		{"throttled", fmt.Errorf("RunInstances: %w", scaler.ErrThrottled), []time.Duration{5 * time.Second, 5 * time.Second, 5 * time.Second}},
		{"no capacity", fmt.Errorf("all offerings: %w", scaler.ErrNoCapacity), []time.Duration{5 * time.Second, 10 * time.Second, 20 * time.Second}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ctx := context.Background()
			pools := []scaler.PoolPolicy{{Name: "x86", MaxBuilders: 1, ReservationsPerBuilder: 1, IdleTimeout: time.Hour,
				DrainTimeout: time.Hour, LaunchTimeout: time.Hour, BootTimeout: time.Hour, BindTimeout: time.Hour}}
			st := memstore.New(pools, func() scaler.Slot { return scaler.Slot{State: scaler.Empty, StateSince: t0} })
			if err := st.Commit(ctx, scaler.Change{Reservations: []scaler.Reservation{{ID: "r1", Pool: "x86", State: scaler.Pending,
				CreatedAt: t0, ExpiresAt: t0.Add(24 * time.Hour)}}}); err != nil {
				t.Fatal(err)
			}
			clock := clocktest.New(t0)
			var backoff time.Time
			rec := scaler.New(scaler.Options{Store: st, Providers: map[string]scaler.Provider{"x86": &failingProvider{tc.err}},
				Clock: clock, Policy: scaler.Policy{Pools: pools},
				Recorder: observeRecorder{f: func(obs scaler.Observed) { backoff = obs.LaunchBackoff["x86"] }}})
			for i, want := range tc.want {
				launchedAt := clock.Now()
				if _, err := rec.ReconcileOnce(ctx); err != nil { // launches and fails
					t.Fatal(err)
				}
				if _, err := rec.ReconcileOnce(ctx); err != nil { // observes the backoff
					t.Fatal(err)
				}
				if got := backoff.Sub(launchedAt); got != want {
					t.Fatalf("after failure %d: backoff %v, want %v", i+1, got, want)
				}
				clock.Set(backoff)
			}
		})
	}
}

// observeRecorder is a Recorder that hands every round's observation to f.
type observeRecorder struct {
	scaler.NopRecorder
	f func(scaler.Observed)
}

func (r observeRecorder) Observed(_ scaler.Policy, obs scaler.Observed) { r.f(obs) }

// pushRecorder is a load balancer that reports every slot it was given up
// and records each push with the state the published view had for the slot
// at that moment.
type pushRecorder struct {
	upServers
	views  *scaler.Views
	pushed []string // "slot state (view: state)"
}

func (p *pushRecorder) Push(_ context.Context, s scaler.Slot) error {
	inView, _ := p.views.Current().Slot(s.Key())
	p.pushed = append(p.pushed, fmt.Sprintf("%s %s (view: %s)", s.Name, s.State, inView.State))
	return nil
}

// maintServers is upServers after a HAProxy restart: every server back in
// the maintenance of the configuration's `disabled`, its check passing.
type maintServers struct{ pushRecorder }

func (m *maintServers) Servers(ctx context.Context) (map[scaler.SlotKey]scaler.ServerStatus, error) {
	out, _ := m.upServers.Servers(ctx)
	for k, srv := range out {
		srv.Up, srv.Maint = false, true
		out[k] = srv
	}
	return out, nil
}

// TestRoundRepushesWhatTheLoadBalancerLost: a round that sees a ready
// slot's server in maintenance (HAProxy restarted; or someone used the
// runtime API) pushes the slot's state again, without waiting for the
// agent check; an empty slot's server in maintenance is left alone.
func TestRoundRepushesWhatTheLoadBalancerLost(t *testing.T) {
	ctx := context.Background()
	pools, st := emptyFleet(2)
	s, _ := st.Slot(ctx, scaler.SlotKey{Pool: "x86", Slot: "slot1"})
	s.State, s.InstanceID, s.Address, s.LastActive = scaler.Ready, "i-slot1", "10.0.0.1:22", t0
	if err := st.Commit(ctx, scaler.Change{Slots: []scaler.Slot{s}}); err != nil {
		t.Fatal(err)
	}
	views := &scaler.Views{}
	lb := &maintServers{pushRecorder{upServers: upServers{{Pool: "x86", Slot: "slot1"}: "10.0.0.1:22", {Pool: "x86", Slot: "slot2"}: "192.0.2.1:22"}, views: views}}
	rec := scaler.New(scaler.Options{Store: st, Clock: clocktest.New(t0), Policy: scaler.Policy{Pools: pools}, Readiness: lb, Views: views,
		Providers: map[string]scaler.Provider{"x86": &runningProvider{ins: []scaler.Instance{
			{ID: "i-slot1", Pool: "x86", Slot: "slot1", State: scaler.InstanceRunning, Address: "10.0.0.1:22"}}}}})
	if _, err := rec.ReconcileOnce(ctx); err != nil {
		t.Fatal(err)
	}
	if want := []string{"slot1 ready (view: ready)"}; fmt.Sprint(lb.pushed) != fmt.Sprint(want) {
		t.Errorf("pushes = %q, want %q", lb.pushed, want)
	}
}

// TestIntentsAppliedPublishedThenPushed: an operator's drain and weight,
// recorded as intents, are applied by one round, deleted in the commit that
// applies them, answered through Result, published in the round's view,
// and pushed to the load balancer only after that view was published (an
// agent check answering from the view in between must not undo the push).
func TestIntentsAppliedPublishedThenPushed(t *testing.T) {
	ctx := context.Background()
	pools, st := emptyFleet(2)
	ready := func(name string) scaler.Slot {
		s, _ := st.Slot(ctx, scaler.SlotKey{Pool: "x86", Slot: name})
		s.State, s.InstanceID, s.Address, s.LastActive = scaler.Ready, "i-"+name, "10.0.0.1:22", t0
		return s
	}
	if err := st.Commit(ctx, scaler.Change{Slots: []scaler.Slot{ready("slot1"), ready("slot2")}}); err != nil {
		t.Fatal(err)
	}
	views := &scaler.Views{}
	lb := &pushRecorder{upServers: upServers{{Pool: "x86", Slot: "slot1"}: "10.0.0.1:22", {Pool: "x86", Slot: "slot2"}: "10.0.0.1:22"}, views: views}
	rec := scaler.New(scaler.Options{Store: st, Clock: clocktest.New(t0), Policy: scaler.Policy{Pools: pools}, Readiness: lb, Views: views,
		Providers: map[string]scaler.Provider{"x86": &runningProvider{ins: []scaler.Instance{
			{ID: "i-slot1", Pool: "x86", Slot: "slot1", State: scaler.InstanceRunning, Address: "10.0.0.1:22"},
			{ID: "i-slot2", Pool: "x86", Slot: "slot2", State: scaler.InstanceRunning, Address: "10.0.0.1:22"}}}}})
	if _, err := rec.ReconcileOnce(ctx); err != nil {
		t.Fatal(err)
	}
	before := views.Current()
	if before == nil || len(lb.pushed) != 0 {
		t.Fatalf("a quiet round: view %v, pushes %v; want a view and no push", before, lb.pushed)
	}
	if err := st.Commit(ctx, scaler.Change{Intents: []scaler.Intent{
		{ID: "drain1", Kind: scaler.IntentDrain, Pool: "x86", Slot: "slot1", At: t0, Actor: "operator"},
		{ID: "weight2", Kind: scaler.IntentWeight, Pool: "x86", Slot: "slot2", Weight: 7, At: t0, Actor: "operator"},
	}}); err != nil {
		t.Fatal(err)
	}
	if _, err := rec.ReconcileOnce(ctx); err != nil {
		t.Fatal(err)
	}
	if left, _ := st.Intents(ctx); len(left) != 0 {
		t.Errorf("intents left after the round: %+v", left)
	}
	if res, ok := rec.Result("drain1"); !ok || res.Refused != "" || res.Slot.State != scaler.Draining || res.Slot.DrainReason != "operator" {
		t.Errorf("Result(drain1) = %+v, %v; want the slot drained by the operator", res, ok)
	}
	if _, ok := rec.Result("drain1"); ok {
		t.Error("Result(drain1) answered twice")
	}
	v := views.Current()
	if v.Version <= before.Version {
		t.Errorf("view version %d after %d; want it to grow", v.Version, before.Version)
	}
	if s, _ := v.Slot(scaler.SlotKey{Pool: "x86", Slot: "slot1"}); s.State != scaler.Terminating || s.DrainReason != "drained (operator)" {
		t.Errorf("view has slot1 %s (%s), want terminating, drained by the operator", s.State, s.DrainReason)
	}
	if s, _ := v.Slot(scaler.SlotKey{Pool: "x86", Slot: "slot2"}); s.Weight != 7 {
		t.Errorf("view has slot2 weight %d, want 7", s.Weight)
	}
	// slot1 had no session: drained and terminated in the same round, and
	// pushed as the round left it.
	want := []string{"slot1 terminating (view: terminating)", "slot2 ready (view: ready)"}
	if fmt.Sprint(lb.pushed) != fmt.Sprint(want) {
		t.Errorf("pushes = %q, want %q", lb.pushed, want)
	}
}

// flipServers is a load balancer whose one server turns healthy when told.
type flipServers struct {
	mu      sync.Mutex
	key     scaler.SlotKey
	addr    string
	healthy bool
	up      bool
	calls   int
}

func (f *flipServers) Bind(context.Context, scaler.SlotKey, string) error { return nil }
func (f *flipServers) Servers(context.Context) (map[scaler.SlotKey]scaler.ServerStatus, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.calls++
	return map[scaler.SlotKey]scaler.ServerStatus{f.key: {Addr: f.addr, Healthy: f.healthy, Up: f.up}}, nil
}

// TestBindingSlotReadyOnTheBindPoll: while a slot is binding, the Run loop
// asks the load balancer every BindPoll whether its health check passed and
// runs a round as soon as it has, instead of waiting for the next round
// (here an hour away). A view is published by every round; the agent check
// reads slots from it (Views.Slot).
func TestBindingSlotReadyOnTheBindPoll(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	pools, st := emptyFleet(1)
	key := scaler.SlotKey{Pool: "x86", Slot: "slot1"}
	s, _ := st.Slot(ctx, key)
	s.State, s.InstanceID, s.Address, s.StateSince = scaler.Binding, "i-1", "10.0.0.1:22", t0
	if err := st.Commit(ctx, scaler.Change{Slots: []scaler.Slot{s}}); err != nil {
		t.Fatal(err)
	}
	lb := &flipServers{key: key, addr: "10.0.0.1:22"}
	clk := clocktest.New(t0)
	views := &scaler.Views{}
	if _, err := views.Slot(ctx, key); !errors.Is(err, scaler.ErrNoView) {
		t.Fatalf("Views.Slot before any round = %v, want ErrNoView", err)
	}
	rec := scaler.New(scaler.Options{Store: st, Clock: clk, Policy: scaler.Policy{Pools: pools}, Readiness: lb, Views: views,
		Interval: time.Hour, FastInterval: time.Hour, BindPoll: 100 * time.Millisecond, KickBatch: -1,
		Providers: map[string]scaler.Provider{"x86": &runningProvider{ins: []scaler.Instance{
			{ID: "i-1", Pool: "x86", Slot: "slot1", State: scaler.InstanceRunning, Address: "10.0.0.1:22"}}}}})
	done := make(chan error, 1)
	go func() { done <- rec.Run(ctx) }()
	testwait.Until(t, "the first round's view", func() bool { return views.Current() != nil })
	if sl, err := views.Slot(ctx, key); err != nil || sl.State != scaler.Binding {
		t.Fatalf("Views.Slot after the first round = %+v, %v; want binding", sl, err)
	}
	if _, err := views.Slot(ctx, scaler.SlotKey{Pool: "x86", Slot: "slot9"}); !errors.Is(err, scaler.ErrNotFound) {
		t.Errorf("Views.Slot of an unknown slot = %v, want ErrNotFound", err)
	}
	lb.mu.Lock()
	lb.healthy = true
	lb.mu.Unlock()
	testwait.Until(t, "slot ready after a bind poll", func() bool {
		clk.Advance(100 * time.Millisecond)
		sl, _ := views.Slot(ctx, key)
		return sl.State == scaler.Ready
	})
	if clk.Now().Sub(t0) >= time.Hour {
		t.Errorf("became ready only after %v of the test clock; want it on a bind poll", clk.Now().Sub(t0))
	}
	cancel()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
}

// emptyFleet is pool x86 of n empty slots, with hour-long timeouts, in an
// in-memory store.
func emptyFleet(n int) ([]scaler.PoolPolicy, *memstore.Store) {
	pools := []scaler.PoolPolicy{{Name: "x86", MaxBuilders: n, ReservationsPerBuilder: 1, IdleTimeout: time.Hour,
		DrainTimeout: time.Hour, LaunchTimeout: time.Hour, BootTimeout: time.Hour, BindTimeout: time.Hour}}
	return pools, memstore.New(pools, func() scaler.Slot {
		return scaler.Slot{State: scaler.Empty, StateSince: t0, Weight: scaler.DefaultWeight}
	})
}

// countingStore counts the reads of slots.
type countingStore struct {
	*memstore.Store
	slotReads int
}

func (s *countingStore) Slots(ctx context.Context) ([]scaler.Slot, error) {
	s.slotReads++
	return s.Store.Slots(ctx)
}

// TestIdleRoundsReadNothing: while nothing is written, a round reuses the
// rows the last one read; a write (here, a reservation) is read by the
// next round.
func TestIdleRoundsReadNothing(t *testing.T) {
	ctx := context.Background()
	pools, mem := emptyFleet(1)
	st := &countingStore{Store: mem}
	rec := scaler.New(scaler.Options{Store: st, Clock: clocktest.New(t0), Policy: scaler.Policy{Pools: pools},
		Providers: map[string]scaler.Provider{"x86": &failingProvider{scaler.ErrNoCapacity}}})
	for range 3 {
		if _, err := rec.ReconcileOnce(ctx); err != nil {
			t.Fatal(err)
		}
	}
	if st.slotReads != 1 {
		t.Errorf("three rounds without a write read slots %d times, want once", st.slotReads)
	}
	if err := st.Commit(ctx, scaler.Change{Reservations: []scaler.Reservation{{ID: "r1", Pool: "x86", State: scaler.Pending,
		CreatedAt: t0, ExpiresAt: t0.Add(time.Hour)}}}); err != nil {
		t.Fatal(err)
	}
	if _, err := rec.ReconcileOnce(ctx); err != nil {
		t.Fatal(err)
	}
	if v := rec.Views().Current(); st.slotReads < 2 || len(v.Reservations) != 1 {
		t.Errorf("after a write: %d slot reads in all, view with %d reservations; want a second read and 1", st.slotReads, len(v.Reservations))
	}
}

// slowProvider takes its time, on the test's clock: List listDelay, Launch
// launchDelay; every launch fails for want of capacity. List calls after
// the first `lists` return only when their context ends, so that the test
// reads the status of a round that no later round overwrote.
type slowProvider struct {
	clock                  *clocktest.Clock
	listDelay, launchDelay time.Duration
	mu                     sync.Mutex
	lists                  int // calls that return at once
}

func (p *slowProvider) Launch(context.Context, scaler.LaunchRequest) (scaler.Instance, error) {
	p.clock.Advance(p.launchDelay)
	return scaler.Instance{}, scaler.ErrNoCapacity
}
func (p *slowProvider) Terminate(context.Context, string) error { return nil }
func (p *slowProvider) List(ctx context.Context) ([]scaler.Instance, error) {
	p.mu.Lock()
	p.lists--
	hold := p.lists < 0
	p.mu.Unlock()
	if hold {
		<-ctx.Done()
		return nil, ctx.Err()
	}
	p.clock.Advance(p.listDelay)
	return nil, nil
}

// TestRoundPhases: the status of a round says where its time went, so that
// an operator (and the fleet benchmark) can tell a slow provider from a slow
// store or load balancer.
func TestRoundPhases(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	pools, st := emptyFleet(1)
	clk := clocktest.New(t0)
	// Three rounds: Run's first, and the two the test asks for; the one a
	// failed launch kicks waits in List.
	prov := &slowProvider{clock: clk, listDelay: 3 * time.Millisecond, launchDelay: 5 * time.Millisecond, lists: 3}
	rec := scaler.New(scaler.Options{Store: st, Clock: clk, Policy: scaler.Policy{Pools: pools}, KickBatch: -1,
		Interval: time.Hour, FastInterval: time.Hour, Providers: map[string]scaler.Provider{"x86": prov}})
	done := make(chan error, 1)
	go func() { done <- rec.Run(ctx) }()
	if err := rec.Reconcile(ctx); err != nil { // after Run's first round
		t.Fatal(err)
	}
	// A reservation, so that the next round launches.
	if err := st.Commit(ctx, scaler.Change{Reservations: []scaler.Reservation{{ID: "r1", Pool: "x86", State: scaler.Pending,
		CreatedAt: t0, ExpiresAt: t0.Add(time.Hour)}}}); err != nil {
		t.Fatal(err)
	}
	if err := rec.Reconcile(ctx); err != nil {
		t.Fatal(err)
	}
	s := rec.Status()
	cancel()
	<-done
	ph := s.Phases
	if ph.List < prov.listDelay || ph.Observe < ph.List || ph.Apply < prov.launchDelay {
		t.Errorf("phases = %+v; want list >= %v, observe >= list, apply >= %v", ph, prov.listDelay, prov.launchDelay)
	}
	if sum := ph.Observe + ph.Plan + ph.Apply + ph.Publish + ph.Push; sum > s.Duration {
		t.Errorf("phases add up to %v, more than the round's %v", sum, s.Duration)
	}
}

// queueServers is upServers with a queue: a load balancer that reports,
// with its servers, the connections it queues per pool (QueueReader).
type queueServers struct {
	upServers
	mu     sync.Mutex
	queued map[string]int
}

func (q *queueServers) ServersAndQueues(ctx context.Context) (map[scaler.SlotKey]scaler.ServerStatus, map[string]int, error) {
	servers, _ := q.upServers.Servers(ctx)
	q.mu.Lock()
	defer q.mu.Unlock()
	queued := map[string]int{}
	for p, n := range q.queued {
		queued[p] = n
	}
	return servers, queued, nil
}

// TestQueuedConnectionsObservedAndKeepRoundsFast: the connections a
// QueueReader reports queued reach the plan (Observed.Queued), and while
// any is queued the Run loop goes at FastInterval, like while connections
// are held, even though nothing else changes: here the pool is at
// max_builders, so the queue launches nothing and every slot is stable.
func TestQueuedConnectionsObservedAndKeepRoundsFast(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	pools, st := emptyFleet(1)
	key := scaler.SlotKey{Pool: "x86", Slot: "slot1"}
	s, _ := st.Slot(ctx, key)
	s.State, s.InstanceID, s.Address, s.LastActive = scaler.Ready, "i-slot1", "10.0.0.1:22", t0
	if err := st.Commit(ctx, scaler.Change{Slots: []scaler.Slot{s}}); err != nil {
		t.Fatal(err)
	}
	lb := &queueServers{upServers: upServers{key: "10.0.0.1:22"}, queued: map[string]int{"x86": 2}}
	var mu sync.Mutex
	var rounds, sawQueued int
	clk := clocktest.New(t0)
	rec := scaler.New(scaler.Options{Store: st, Clock: clk, Policy: scaler.Policy{Pools: pools}, Readiness: lb,
		Interval: time.Hour, FastInterval: time.Second, KickBatch: -1,
		Recorder: observeRecorder{f: func(obs scaler.Observed) {
			mu.Lock()
			defer mu.Unlock()
			rounds++
			if obs.Queued["x86"] == 2 {
				sawQueued++
			}
		}},
		Providers: map[string]scaler.Provider{"x86": &runningProvider{ins: []scaler.Instance{
			{ID: "i-slot1", Pool: "x86", Slot: "slot1", State: scaler.InstanceRunning, Address: "10.0.0.1:22"}}}}})
	done := make(chan error, 1)
	go func() { done <- rec.Run(ctx) }()
	testwait.Until(t, "three rounds while connections are queued", func() bool {
		clk.Advance(time.Second)
		mu.Lock()
		defer mu.Unlock()
		return rounds >= 3
	})
	if elapsed := clk.Now().Sub(t0); elapsed >= time.Hour {
		t.Errorf("three rounds took %v of the test clock; want them at FastInterval while connections are queued", elapsed)
	}
	mu.Lock()
	if sawQueued != rounds {
		t.Errorf("%d of %d rounds observed the 2 queued connections", sawQueued, rounds)
	}
	mu.Unlock()
	cancel()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
}

// TestIdleDrainedBuilderTakenBack: a reservation that arrives while an
// idle-drained builder waits to be terminated takes that builder back
// (runningProvider panics on a launch) and is assigned to it.
func TestIdleDrainedBuilderTakenBack(t *testing.T) {
	ctx := context.Background()
	key := scaler.SlotKey{Pool: "x86", Slot: "slot1"}
	pools := []scaler.PoolPolicy{{Name: "x86", MaxBuilders: 1, ReservationsPerBuilder: 1, IdleTimeout: time.Minute,
		DrainTimeout: time.Hour, LaunchTimeout: time.Hour, BootTimeout: time.Hour, BindTimeout: time.Hour}}
	st := memstore.New(pools, func() scaler.Slot {
		return scaler.Slot{State: scaler.Empty, StateSince: t0, LastActive: t0, Weight: scaler.DefaultWeight}
	})
	s, err := st.Slot(ctx, key)
	if err != nil {
		t.Fatal(err)
	}
	s.State, s.InstanceID, s.Address, s.StateSince, s.DrainReason = scaler.Draining, "i-1", "127.0.0.1:22", t0, scaler.DrainIdle
	res := scaler.Reservation{ID: "r1", Pool: "x86", System: "x86_64-linux", State: scaler.Pending, CreatedAt: t0, ExpiresAt: t0.Add(time.Hour)}
	if err := st.Commit(ctx, scaler.Change{Slots: []scaler.Slot{s}, Reservations: []scaler.Reservation{res}}); err != nil {
		t.Fatal(err)
	}
	prov := &runningProvider{ins: []scaler.Instance{{ID: "i-1", Pool: "x86", Slot: "slot1", State: scaler.InstanceRunning,
		Address: "127.0.0.1:22", LaunchedAt: t0.Add(-time.Hour)}}}
	rec := scaler.New(scaler.Options{Store: st, Providers: map[string]scaler.Provider{"x86": prov}, Clock: clocktest.New(t0),
		Readiness: upServers{key: "127.0.0.1:22"}, Policy: scaler.Policy{Pools: pools}})
	for range 2 {
		if _, err := rec.ReconcileOnce(ctx); err != nil {
			t.Fatal(err)
		}
	}
	if s, _ = st.Slot(ctx, key); s.State != scaler.Ready || s.DrainReason != "" {
		t.Errorf("slot = %s (drain reason %q); want ready again", s.State, s.DrainReason)
	}
	if r, _ := st.Reservation(ctx, "r1"); r.State != scaler.Assigned || r.Slot != "slot1" {
		t.Errorf("reservation = %s on %q; want assigned to slot1", r.State, r.Slot)
	}
}

// TestIdlePolicyLogged: the reconciler logs each pool's idle timeout once,
// and again only when it changes.
func TestIdlePolicyLogged(t *testing.T) {
	ctx := context.Background()
	pools := []scaler.PoolPolicy{{Name: "x86", MaxBuilders: 1, ReservationsPerBuilder: 1, IdleAuto: true, BillingMinimum: time.Minute,
		DrainTimeout: time.Hour, LaunchTimeout: time.Hour, BootTimeout: time.Hour, BindTimeout: time.Hour}}
	st := memstore.New(pools, func() scaler.Slot { return scaler.Slot{State: scaler.Empty, StateSince: t0, LastActive: t0} })
	var logs bytes.Buffer
	rec := scaler.New(scaler.Options{Store: st, Providers: map[string]scaler.Provider{"x86": &runningProvider{}}, Clock: clocktest.New(t0),
		Readiness: upServers{}, Policy: scaler.Policy{Pools: pools}, Logger: slog.New(slog.NewTextHandler(&logs, nil))})
	for range 2 {
		if _, err := rec.ReconcileOnce(ctx); err != nil {
			t.Fatal(err)
		}
	}
	want := `msg="idle policy" pool=x86 idle_timeout=2m0s why="idle_timeout auto = 2m (no boot measured yet)" billing_minimum=1m0s`
	if got := logs.String(); strings.Count(got, "idle policy") != 1 || !strings.Contains(got, want) {
		t.Errorf("logs:\n%s\nwant one line with %s", got, want)
	}
}
