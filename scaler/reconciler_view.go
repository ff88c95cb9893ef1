package scaler

import (
	"context"
	"time"

	"guardianproject.dev/ops/nix-builder-autoscaler/clock"
)

// How a round's outcome leaves the reconciler: the published view, the
// pushes to the load balancer, and the bind poll that watches what has no
// event.

// bindTicker starts the bind poll's ticker while a slot is binding and
// stops it otherwise; it returns the ticker and its channel (nil: none).
func (r *Reconciler) bindTicker(t clock.Ticker) (clock.Ticker, <-chan time.Time) {
	if !r.binding || r.o.Readiness == nil {
		if t != nil {
			t.Stop()
		}
		return nil, nil
	}
	if t == nil {
		t = r.o.Clock.NewTicker(r.o.BindPoll)
	}
	return t, t.C()
}

// bindingPassed asks the load balancer whether a binding slot's builder
// passed its health check (or lost its address), which is worth a round.
func (r *Reconciler) bindingPassed(ctx context.Context) bool {
	v := r.views.Current()
	if v == nil {
		return false
	}
	cctx, cancel := context.WithTimeout(ctx, r.o.CallTimeout)
	servers, err := r.o.Readiness.Servers(cctx)
	cancel()
	if err != nil {
		return false // the next round reports it
	}
	for _, s := range v.Slots {
		if srv := servers[s.Key()]; s.State == Binding && (srv.Healthy || srv.Addr != s.Address) {
			return true
		}
	}
	return false
}

// generation is the store's write count, if it keeps one (Generationer).
func (r *Reconciler) generation() uint64 {
	if g, ok := r.o.Store.(Generationer); ok {
		return g.Generation()
	}
	return 0
}

// Generationer is a Store that counts its committed writes; the view
// records the count it was read at (View.Generation).
type Generationer interface {
	Generation() uint64
}

// publish makes this round's outcome the current view. A round that
// changed rows reads them again, so readers see what it did at once rather
// than after the next round.
func (r *Reconciler) publish(ctx context.Context, now time.Time, gen uint64, obs Observed, changed bool) {
	slots, live := obs.Slots, obs.Reservations
	if changed {
		// Read like the next round would, so that it reuses these rows.
		var fresh Observed
		if err := r.readStore(ctx, &fresh); err == nil {
			slots, live = fresh.Slots, fresh.Reservations
			if r.rows != nil {
				gen = r.rows.gen
			}
		}
	}
	r.binding = false
	for _, s := range slots {
		r.binding = r.binding || s.State == Binding
	}
	r.version++
	v := NewView(r.version, now, gen, slots, live, obs.Servers, obs.ServersKnown)
	r.views.publish(v)
	if r.o.OnPublish != nil {
		r.o.OnPublish(v)
	}
}

// pushAll sets the load balancer's state of each slot whose state or weight
// this round changed (Pusher), as the published view has it: the round's
// last word on the slot (a slot drained and then terminated in one round is
// pushed terminating, never drain after its quiesce). It also confirms the
// others: a slot whose server the round saw disagree with it (HAProxy
// restarted or reloaded, a push was lost, someone used the runtime API) is
// pushed again. A failed push is logged; the next round or the agent check
// mends it.
func (r *Reconciler) pushAll(ctx context.Context, keys []SlotKey) {
	p, ok := r.o.Readiness.(Pusher)
	v := r.views.Current()
	if !ok || v == nil {
		return
	}
	if v.ServersKnown {
		for _, s := range v.Slots {
			if srv, ok := v.Servers[s.Key()]; ok && !srv.Agrees(s) {
				keys = append(keys, s.Key())
			}
		}
	}
	done := map[SlotKey]bool{}
	for _, k := range keys {
		s, ok := v.Slot(k)
		if !ok || done[k] {
			continue
		}
		done[k] = true
		cctx, cancel := context.WithTimeout(ctx, r.o.CallTimeout)
		err := p.Push(cctx, s)
		cancel()
		if err != nil {
			r.o.Recorder.CallFailed("push")
			r.o.Logger.Warn("could not push a slot's state to the load balancer; its agent check brings it", "slot", k, "state", s.State, "err", err)
		}
	}
}
