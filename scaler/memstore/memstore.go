// Package memstore is an in-memory scaler.Store: the simulator's state, and
// the store of tests that need no SQLite.
package memstore

import (
	"context"
	"fmt"
	"slices"
	"sort"
	"sync"
	"time"

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
	intents []scaler.Intent   // oldest first
	fcs     []scaler.Forecast // oldest first
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
		r := &c.Reservations[i]
		if _, ok := m.res[r.ID]; !ok {
			m.arrive(*r)
		}
		r.Version++
		m.res[r.ID] = *r
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

// arrive counts a new reservation against the forecast of its source and
// pool (scaler.ForecastFor).
func (m *Store) arrive(r scaler.Reservation) {
	if i := scaler.ForecastFor(m.fcs, r); i >= 0 {
		m.fcs[i].Arrived++
	}
}

// CreateForecast stores f unless a forecast with its id exists; then it
// returns that one and created=false.
func (m *Store) CreateForecast(_ context.Context, f scaler.Forecast) (scaler.Forecast, bool, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if f.ID == "" {
		return scaler.Forecast{}, false, fmt.Errorf("create forecast: empty id")
	}
	for _, x := range m.fcs {
		if x.ID == f.ID {
			return x, false, nil
		}
	}
	m.fcs = append(m.fcs, f)
	m.gen++
	return f, true, nil
}

// WithdrawForecast marks the forecast withdrawn at at (once: a second
// withdrawal keeps the first time).
func (m *Store) WithdrawForecast(_ context.Context, id string, at time.Time) (scaler.Forecast, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	for i := range m.fcs {
		if m.fcs[i].ID == id {
			if m.fcs[i].WithdrawnAt.IsZero() {
				m.fcs[i].WithdrawnAt = at
				m.gen++
			}
			return m.fcs[i], nil
		}
	}
	return scaler.Forecast{}, fmt.Errorf("forecast %s: %w", id, scaler.ErrNotFound)
}

// Forecasts returns the forecasts made within a TTL and a
// scaler.ForecastRecent of the latest one, oldest first: the store has no
// clock, and this keeps every forecast open or recently ended.
func (m *Store) Forecasts(context.Context) ([]scaler.Forecast, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if len(m.fcs) == 0 {
		return nil, nil
	}
	since := m.fcs[len(m.fcs)-1].CreatedAt.Add(-scaler.MaxForecastTTL - scaler.ForecastRecent)
	var out []scaler.Forecast
	for _, f := range m.fcs {
		if f.CreatedAt.After(since) {
			out = append(out, f)
		}
	}
	return out, nil
}

// ForecastHistory returns how many reservations arrived after each of the
// last n forecasts of source ("": any) in pool, newest first.
func (m *Store) ForecastHistory(_ context.Context, source, pool string, n int) ([]int, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	var out []int
	for i := len(m.fcs) - 1; i >= 0 && len(out) < n; i-- {
		if f := m.fcs[i]; (source == "" || f.Source == source) && f.Pool == pool {
			out = append(out, f.Arrived)
		}
	}
	return out, nil
}
