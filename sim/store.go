package sim

import (
	"context"
	"fmt"
	"sort"
	"time"

	"guardianproject.dev/ops/nix-builder-autoscaler/scaler"
)

// memStore is an in-memory scaler.Store with the same optimistic-concurrency
// contract as the SQLite store: a row is written only if its Version is
// the stored one, and the stored Version then goes up by one.
type memStore struct {
	slots  map[scaler.SlotKey]scaler.Slot
	res    map[string]scaler.Reservation
	events int
}

func newMemStore(pools []scaler.PoolPolicy, now func() scaler.Slot) *memStore {
	m := &memStore{slots: map[scaler.SlotKey]scaler.Slot{}, res: map[string]scaler.Reservation{}}
	for _, p := range pools {
		for i := 1; i <= p.MaxBuilders; i++ {
			s := now()
			s.Pool, s.Name = p.Name, fmt.Sprintf("slot%d", i)
			m.slots[s.Key()] = s
		}
	}
	return m
}

func (m *memStore) Slots(context.Context) ([]scaler.Slot, error) {
	out := make([]scaler.Slot, 0, len(m.slots))
	for _, s := range m.slots {
		out = append(out, s)
	}
	sort.Slice(out, func(i, j int) bool {
		if out[i].Pool != out[j].Pool {
			return out[i].Pool < out[j].Pool
		}
		return scaler.SlotNumber(out[i].Name) < scaler.SlotNumber(out[j].Name)
	})
	return out, nil
}

func (m *memStore) Slot(_ context.Context, k scaler.SlotKey) (scaler.Slot, error) {
	s, ok := m.slots[k]
	if !ok {
		return s, scaler.ErrNotFound
	}
	return s, nil
}

func (m *memStore) LiveReservations(context.Context) ([]scaler.Reservation, error) {
	var out []scaler.Reservation
	for _, r := range m.res {
		if r.State.Live() {
			out = append(out, r)
		}
	}
	sort.Slice(out, func(i, j int) bool {
		if !out[i].CreatedAt.Equal(out[j].CreatedAt) {
			return out[i].CreatedAt.Before(out[j].CreatedAt)
		}
		return out[i].ID < out[j].ID
	})
	return out, nil
}

func (m *memStore) Reservation(_ context.Context, id string) (scaler.Reservation, error) {
	r, ok := m.res[id]
	if !ok {
		return r, scaler.ErrNotFound
	}
	return r, nil
}

func (m *memStore) Commit(_ context.Context, c scaler.Change) error {
	for _, s := range c.Slots {
		if cur, ok := m.slots[s.Key()]; !ok || cur.Version != s.Version {
			return scaler.ErrConflict
		}
	}
	for _, r := range c.Reservations {
		if cur, ok := m.res[r.ID]; ok && cur.Version != r.Version {
			return scaler.ErrConflict
		}
	}
	for _, s := range c.Slots {
		s.Version++
		m.slots[s.Key()] = s
	}
	for _, r := range c.Reservations {
		r.Version++
		m.res[r.ID] = r
	}
	m.events += len(c.Events)
	return nil
}

// simClock is the simulation's time: it moves only when the run loop sets
// it. The reconciler is driven with ReconcileOnce, so its tickers never fire.
type simClock struct{ now time.Time }

func (c *simClock) Now() time.Time                        { return c.now }
func (c *simClock) NewTicker(time.Duration) scaler.Ticker { return stoppedTicker{} }

type stoppedTicker struct{}

func (stoppedTicker) C() <-chan time.Time { return nil }
func (stoppedTicker) Stop()               {}
