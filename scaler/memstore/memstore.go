// Package memstore is an in-memory scaler.Store: the simulator's state, and
// the store of tests that need no SQLite.
package memstore

import (
	"context"
	"fmt"
	"slices"
	"sort"
	"sync"

	"guardianproject.dev/ops/nix-builder-autoscaler/scaler"
)

// Store is an in-memory scaler.Store with the same optimistic-concurrency
// contract as the SQLite store (internal/store): a row is written only if
// its Version is the stored one, and the stored Version then goes up by one.
// It is safe for concurrent use.
type Store struct {
	mu      sync.Mutex
	slots   map[scaler.SlotKey]scaler.Slot
	res     map[string]scaler.Reservation
	intents []scaler.Intent // oldest first
	gen     uint64
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
	for _, in := range c.Intents {
		if slices.ContainsFunc(m.intents, func(x scaler.Intent) bool { return x.ID == in.ID }) || in.ID == "" {
			return fmt.Errorf("intent %q: empty or already recorded", in.ID)
		}
	}
	for i := range c.Slots {
		c.Slots[i].Version++
		m.slots[c.Slots[i].Key()] = c.Slots[i]
	}
	for i := range c.Reservations {
		c.Reservations[i].Version++
		m.res[c.Reservations[i].ID] = c.Reservations[i]
	}
	m.intents = append(m.intents, c.Intents...)
	m.intents = slices.DeleteFunc(m.intents, func(x scaler.Intent) bool { return slices.Contains(c.DoneIntents, x.ID) })
	m.gen++
	return nil
}

// Intents returns the intents not yet done, oldest first.
func (m *Store) Intents(context.Context) ([]scaler.Intent, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	return slices.Clone(m.intents), nil
}

// Generation counts committed changes (see internal/store's Generation).
func (m *Store) Generation() uint64 {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.gen
}
