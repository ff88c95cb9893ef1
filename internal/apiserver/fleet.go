package apiserver

import (
	"context"

	"guardianproject.dev/ops/nix-builder-autoscaler/scaler"
)

// The API reads the fleet from the reconciler's published view: slots are
// written by the reconciler alone, so the view is their truth; reservations
// are also written here (create, heartbeat, release), so a view published
// before such a write is stale for what it touched until the next round,
// which a write kicks, publishes its successor. Those reads, and only those,
// go to the store.

// wrote records a write of reservation id (or of several, when id is "").
func (s *Server) wrote(id string) {
	g := s.o.Store.Generation()
	s.mu.Lock()
	defer s.mu.Unlock()
	s.lastWrite = max(s.lastWrite, g)
	if id == "" {
		return
	}
	s.written[id] = g
	if len(s.written) > maxWritten {
		// Forget the writes every view shows by now.
		if v := s.o.Views.Current(); v != nil {
			for k, w := range s.written {
				if w <= v.Generation {
					delete(s.written, k)
				}
			}
		}
	}
}

// maxWritten bounds the per-reservation write marks kept between rounds.
const maxWritten = 1024

// fleet returns the current view if it shows every write this API made,
// else a view read from the store now.
func (s *Server) fleet(ctx context.Context) (*scaler.View, error) {
	v := s.o.Views.Current()
	s.mu.Lock()
	last := s.lastWrite
	s.mu.Unlock()
	if v != nil && v.Generation >= last {
		return v, nil
	}
	return s.storeView(ctx, v)
}

// storeView builds a view from the store, with the load balancer's servers
// of v (may be nil).
func (s *Server) storeView(ctx context.Context, v *scaler.View) (*scaler.View, error) {
	gen := s.o.Store.Generation()
	slots, err := s.o.Store.Slots(ctx)
	if err != nil {
		return nil, err
	}
	live, err := s.o.Store.LiveReservations(ctx)
	if err != nil {
		return nil, err
	}
	nv := scaler.NewView(0, s.o.Clock.Now(), gen, slots, live, nil, false)
	if v != nil {
		nv.Servers, nv.ServersKnown = v.Servers, v.ServersKnown
	}
	return nv, nil
}

// reservation returns reservation id from view v when v shows the API's
// last write of it and holds it (live); else from the store.
func (s *Server) reservation(ctx context.Context, v *scaler.View, id string) (scaler.Reservation, error) {
	if v != nil {
		s.mu.Lock()
		w, ok := s.written[id]
		if ok && w <= v.Generation {
			delete(s.written, id)
			ok = false
		}
		s.mu.Unlock()
		if !ok {
			if res, found := v.Reservation(id); found {
				return res, nil
			}
		}
	}
	return s.o.Store.Reservation(ctx, id)
}

// slotOf returns the slot named key: from v, or from the store without one.
func (s *Server) slotOf(ctx context.Context, v *scaler.View, key scaler.SlotKey) (scaler.Slot, bool) {
	if v != nil {
		return v.Slot(key)
	}
	sl, err := s.o.Store.Slot(ctx, key)
	return sl, err == nil
}
