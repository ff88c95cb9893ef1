package memstore

import (
	"context"
	"errors"
	"testing"
	"time"

	"guardianproject.dev/ops/nix-builder-autoscaler/scaler"
)

// TestOptimisticConcurrency: the contract of the SQLite store, which the
// reconciler's conflict handling relies on.
func TestOptimisticConcurrency(t *testing.T) {
	ctx := context.Background()
	t0 := time.Date(2026, 12, 1, 0, 0, 0, 0, time.UTC)
	m := New([]scaler.PoolPolicy{{Name: "x86", MaxBuilders: 2}}, func() scaler.Slot {
		return scaler.Slot{State: scaler.Empty, StateSince: t0, Weight: scaler.DefaultWeight}
	})
	slots, err := m.Slots(ctx)
	if err != nil || len(slots) != 2 || slots[0].Name != "slot1" || slots[1].Name != "slot2" {
		t.Fatalf("Slots = %+v, %v; want slot1, slot2", slots, err)
	}
	a, b := slots[0], slots[0]
	a.State = scaler.Launching
	if err := m.Commit(ctx, scaler.Change{Slots: []scaler.Slot{a}, Events: []scaler.Event{{Kind: "x"}}}); err != nil {
		t.Fatal(err)
	}
	b.State = scaler.Draining // written from the same, now stale, version
	if err := m.Commit(ctx, scaler.Change{Slots: []scaler.Slot{b}}); !errors.Is(err, scaler.ErrConflict) {
		t.Fatalf("stale write = %v, want ErrConflict", err)
	}
	got, _ := m.Slot(ctx, a.Key())
	if got.State != scaler.Launching || got.Version != a.Version+1 {
		t.Errorf("slot = %s v%d, want launching v%d", got.State, got.Version, a.Version+1)
	}

	r := scaler.Reservation{ID: "r1", Pool: "x86", State: scaler.Pending, CreatedAt: t0}
	if err := m.Commit(ctx, scaler.Change{Reservations: []scaler.Reservation{r}}); err != nil {
		t.Fatal(err)
	}
	if live, _ := m.LiveReservations(ctx); len(live) != 1 || live[0].Version != 1 {
		t.Fatalf("live = %+v", live)
	}
	r.State = scaler.Released // still version 0: stale
	if err := m.Commit(ctx, scaler.Change{Reservations: []scaler.Reservation{r}}); !errors.Is(err, scaler.ErrConflict) {
		t.Errorf("stale reservation write = %v, want ErrConflict", err)
	}
	if _, err := m.Reservation(ctx, "nope"); !errors.Is(err, scaler.ErrNotFound) {
		t.Errorf("unknown reservation = %v, want ErrNotFound", err)
	}
}
