package scaler

import (
	"context"
	"fmt"
	"sync"
)

// How a round observes: the store, the providers and the load balancer,
// read at once.

// observe reads the store, the providers and the load balancer. The three
// are independent, so they are read at once: a round waits for the slowest
// (an EC2 DescribeInstances, HAProxy's show stat), not for their sum.
func (r *Reconciler) observe(ctx context.Context) (Observed, map[string]Provider, error) {
	var obs Observed
	var owner map[string]Provider
	var wg sync.WaitGroup
	start := r.o.Clock.Now()
	wg.Go(func() {
		obs.Instances, obs.InstancesKnown, owner, obs.Notices = r.listInstances(ctx)
		r.phases.List = r.since(start)
	})
	if r.o.Readiness != nil {
		wg.Go(func() {
			obs.Servers, obs.Queued, obs.ServersKnown = r.readServers(ctx)
			r.phases.Servers = r.since(start)
		})
	}
	err := r.readStore(ctx, &obs)
	r.phases.Store = r.since(start)
	wg.Wait()
	if err != nil {
		return obs, nil, err
	}
	r.mu.Lock()
	obs.LaunchBackoff = copyMap(r.backoff)
	obs.LaunchError = copyMap(r.lastErr)
	// Held is read after the servers (and their queues): a connection is
	// held before it can be queued, so one that moved on meanwhile is
	// counted in neither, never in both.
	if r.o.Held != nil {
		obs.Held = r.o.Held()
	}
	r.mu.Unlock()
	obs.Boots = r.boots.times()
	r.logIdlePolicy(obs.Boots)
	return obs, owner, nil
}

// readStore reads slots, live reservations and intents into obs. A store
// that counts its writes (Generationer) is not read again while the count
// has not moved: an idle fleet's rounds then cost no database read. The
// count is taken before the rows, so a write during the read is seen by
// the next round. The rows are shared between rounds; nothing changes them.
func (r *Reconciler) readStore(ctx context.Context, obs *Observed) error {
	g, counts := r.o.Store.(Generationer)
	var gen uint64
	if counts {
		gen = g.Generation()
		if c := r.rows; c != nil && c.gen == gen {
			obs.Slots, obs.Reservations, obs.Intents, obs.Forecasts = c.slots, c.res, c.intents, c.forecasts
			return nil
		}
	}
	var err error
	if obs.Slots, err = r.o.Store.Slots(ctx); err != nil {
		return fmt.Errorf("load slots: %w", err)
	}
	if obs.Reservations, err = r.o.Store.LiveReservations(ctx); err != nil {
		return fmt.Errorf("load reservations: %w", err)
	}
	if obs.Intents, err = r.o.Store.Intents(ctx); err != nil {
		return fmt.Errorf("load intents: %w", err)
	}
	if obs.Forecasts, err = r.o.Store.Forecasts(ctx); err != nil {
		return fmt.Errorf("load forecasts: %w", err)
	}
	if counts {
		r.rows = &storeRows{gen: gen, slots: obs.Slots, res: obs.Reservations, intents: obs.Intents, forecasts: obs.Forecasts}
	}
	return nil
}

// storeRows are the rows a round read, at the store's write count gen.
type storeRows struct {
	gen       uint64
	slots     []Slot
	res       []Reservation
	intents   []Intent
	forecasts []Forecast
}

// listInstances lists every provider once. known holds the pools whose
// provider answered; owner maps each instance to the provider that listed
// it; notices are the interruption notices of the providers that give
// them (NoticeReader).
func (r *Reconciler) listInstances(ctx context.Context) (ins []Instance, known map[string]bool, owner map[string]Provider, notices map[string]Notice) {
	known, owner = map[string]bool{}, map[string]Provider{}
	listed := map[Provider]bool{}
	for _, pp := range r.o.Policy.Pools {
		p := r.o.Providers[pp.Name]
		if p == nil || listed[p] {
			continue
		}
		listed[p] = true
		cctx, cancel := context.WithTimeout(ctx, r.o.CallTimeout)
		got, err := p.List(cctx)
		cancel()
		if err != nil {
			r.o.Logger.Error("provider list failed; no instance is judged gone this round", "pool", pp.Name, "err", err)
			r.o.Recorder.CallFailed("list")
			continue
		}
		for pool, q := range r.o.Providers {
			if q == p {
				known[pool] = true
			}
		}
		for _, in := range got {
			owner[in.ID] = p
		}
		ins = append(ins, got...)
		notices = r.readNotices(ctx, p, got, notices)
	}
	return ins, known, owner, notices
}

// readNotices adds p's notices about instances to into, keeping the
// stronger of two for one instance. A failed read leaves the builders as
// they are: without a notice they are treated as they always were.
func (r *Reconciler) readNotices(ctx context.Context, p Provider, instances []Instance, into map[string]Notice) map[string]Notice {
	nr, ok := p.(NoticeReader)
	if !ok {
		return into
	}
	cctx, cancel := context.WithTimeout(ctx, r.o.CallTimeout)
	got, err := nr.Notices(cctx, instances)
	cancel()
	if err != nil {
		r.o.Logger.Error("reading interruption notices failed", "err", err)
		r.o.Recorder.CallFailed("notices")
		return into
	}
	for id, n := range got {
		if into == nil {
			into = map[string]Notice{}
		}
		if old, ok := into[id]; !ok || n.Stronger(old) {
			into[id] = n
		}
	}
	return into
}

// readServers asks the load balancer for its servers, and the connections
// it queues per pool when it reports them (QueueReader); known is false
// when it could not be reached.
func (r *Reconciler) readServers(ctx context.Context) (servers map[SlotKey]ServerStatus, queued map[string]int, known bool) {
	cctx, cancel := context.WithTimeout(ctx, r.o.CallTimeout)
	var err error
	if q, ok := r.o.Readiness.(QueueReader); ok {
		servers, queued, err = q.ServersAndQueues(cctx)
	} else {
		servers, err = r.o.Readiness.Servers(cctx)
	}
	cancel()
	if err != nil {
		r.o.Logger.Error("load balancer unreachable: no builder is drained or terminated until it answers", "err", err)
		r.o.Recorder.LoadBalancer(false)
		return nil, nil, false
	}
	r.o.Recorder.LoadBalancer(true)
	return servers, queued, true
}

// anyPositive reports whether some count in m is above zero.
func anyPositive(m map[string]int) bool {
	for _, n := range m {
		if n > 0 {
			return true
		}
	}
	return false
}
