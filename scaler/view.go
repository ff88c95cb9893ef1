package scaler

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"time"
)

// View is the fleet as one reconcile round left it: every slot, the live
// reservations and the load balancer's servers. The reconciler publishes a
// new View after every round (Views); the agent-check responder, the SPOE
// agent, the API's reads and long polls and the metrics all read the
// current one, so none of them queries the database on its hot path and
// all of them see the same fleet. A View is never changed once published:
// readers share it without locks and must not modify what it holds.
type View struct {
	// Version increases by one with every published view.
	Version uint64
	// At is when the round that built it began.
	At time.Time
	// Generation is the store's write count (see Generationer) read
	// before the rows of this view were: every write counted up to it is
	// in the view.
	Generation uint64
	// Slots of every pool, ordered by pool and slot number.
	Slots []Slot
	// Reservations are the live (pending or ready) reservations, oldest
	// first.
	Reservations []Reservation
	// Servers and ServersKnown are Observed's: the load balancer as the
	// round saw it, with the states the round pushed applied.
	Servers      map[SlotKey]ServerStatus
	ServersKnown bool

	slotIndex map[SlotKey]int
	resIndex  map[string]int
	perSlot   map[SlotKey]int
}

// NewView indexes slots and live reservations into a View.
func NewView(version uint64, at time.Time, gen uint64, slots []Slot, live []Reservation, servers map[SlotKey]ServerStatus, serversKnown bool) *View {
	v := &View{Version: version, At: at, Generation: gen, Slots: slots, Reservations: live, Servers: servers, ServersKnown: serversKnown,
		slotIndex: make(map[SlotKey]int, len(slots)), resIndex: make(map[string]int, len(live)), perSlot: map[SlotKey]int{}}
	for i, s := range slots {
		v.slotIndex[s.Key()] = i
	}
	for i, r := range live {
		v.resIndex[r.ID] = i
		if r.State == Assigned {
			v.perSlot[SlotKey{Pool: r.Pool, Slot: r.Slot}]++
		}
	}
	return v
}

// Slot returns the slot named key.
func (v *View) Slot(key SlotKey) (Slot, bool) {
	i, ok := v.slotIndex[key]
	if !ok {
		return Slot{}, false
	}
	return v.Slots[i], true
}

// Reservation returns the live reservation id; an ended (or unknown) one is
// not in the view.
func (v *View) Reservation(id string) (Reservation, bool) {
	i, ok := v.resIndex[id]
	if !ok {
		return Reservation{}, false
	}
	return v.Reservations[i], true
}

// Assigned counts the live reservations assigned to the slot.
func (v *View) Assigned(key SlotKey) int { return v.perSlot[key] }

// Views holds the current View and wakes those waiting for the next one.
// The zero value has no view yet; Current then returns nil.
type Views struct {
	mu      sync.Mutex
	cur     *View
	changed chan struct{}
}

// Current returns the latest view, or nil before the first round.
func (vs *Views) Current() *View {
	vs.mu.Lock()
	defer vs.mu.Unlock()
	return vs.cur
}

// Next returns the current view (nil before the first) and a channel that
// is closed when a newer one is published. Taking both at once means a view
// published between reading and waiting still wakes the waiter.
func (vs *Views) Next() (*View, <-chan struct{}) {
	vs.mu.Lock()
	defer vs.mu.Unlock()
	if vs.changed == nil {
		vs.changed = make(chan struct{})
	}
	return vs.cur, vs.changed
}

// publish makes v current and wakes every waiter.
func (vs *Views) publish(v *View) {
	vs.mu.Lock()
	defer vs.mu.Unlock()
	vs.cur = v
	if vs.changed != nil {
		close(vs.changed)
	}
	vs.changed = make(chan struct{})
}

// ErrNoView is returned by Views.Slot before the first round published.
var ErrNoView = errors.New("no fleet view yet: the first reconcile round has not finished")

// Slot returns the slot named key in the current view: the read of the
// agent-check responder, once per check. It fails with ErrNoView before the
// first view and wraps ErrNotFound for a slot the view does not have.
func (vs *Views) Slot(_ context.Context, key SlotKey) (Slot, error) {
	v := vs.Current()
	if v == nil {
		return Slot{}, ErrNoView
	}
	s, ok := v.Slot(key)
	if !ok {
		return Slot{}, fmt.Errorf("slot %s: %w", key, ErrNotFound)
	}
	return s, nil
}
