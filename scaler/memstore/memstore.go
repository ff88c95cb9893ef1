// Package memstore is an in-memory scaler.Store: the simulator's state, and
// the store of tests that need no SQLite.
package memstore

import (
	"context"
	"fmt"
	"sort"
	"sync"

	"guardianproject.dev/ops/nix-builder-autoscaler/scaler"
)

// Store is an in-memory scaler.Store with the same optimistic-concurrency
// contract as the SQLite store (internal/store): a row is written only if
// its Version is the stored one, and the stored Version then goes up by one.
// It is safe for concurrent use.
type Store struct {
	mu    sync.Mutex
	slots map[scaler.SlotKey]scaler.Slot
	res   map[string]scaler.Reservation
}

// New returns a store with slot1..slotN of every pool (N = MaxBuilders),
// each made by empty and then named.
func New(pools []scaler.PoolPolicy, empty func() scaler.Slot) *Store {
	m := &Store{slots: map[scaler.SlotKey]scaler.Slot{}, res: map[string]scaler.Reservation{}}
	for _, p := range pools {
		for i := 1; i <= p.MaxBuilders; i++ {
			s := empty()
			s.Pool, s.Name = p.Name, fmt.Sprintf("slot%d", i)
			m.slots[s.Key()] = s
		}
	}
	return m
}

func (m *Store) Slots(context.Context) ([]scaler.Slot, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
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

func (m *Store) Slot(_ context.Context, k scaler.SlotKey) (scaler.Slot, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	s, ok := m.slots[k]
	if !ok {
		return s, scaler.ErrNotFound
	}
	return s, nil
}

func (m *Store) LiveReservations(context.Context) ([]scaler.Reservation, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
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

func (m *Store) Reservation(_ context.Context, id string) (scaler.Reservation, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	r, ok := m.res[id]
	if !ok {
		return r, scaler.ErrNotFound
	}
	return r, nil
}

func (m *Store) Commit(_ context.Context, c scaler.Change) error {
	m.mu.Lock()
	defer m.mu.Unlock()
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
	return nil
}
