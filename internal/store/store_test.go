package store

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"guardianproject.dev/ops/nix-builder-autoscaler/internal/testwait"
	"guardianproject.dev/ops/nix-builder-autoscaler/scaler"
)

func openTest(t testing.TB) (*DB, string) {
	t.Helper()
	path := filepath.Join(t.TempDir(), "state", "autoscaler.db")
	db, err := Open(context.Background(), path)
	if err != nil {
		t.Fatalf("Open: %v", err)
	}
	t.Cleanup(func() {
		if err := db.Close(); err != nil {
			t.Errorf("Close: %v", err)
		}
	})
	return db, path
}

// zone is not UTC, so the tests see that times come back in UTC.
var zone = time.FixedZone("test", 2*3600)

var t0 = time.Date(2025, 3, 1, 12, 0, 0, 123456789, zone)

func allEvents(t *testing.T, db *DB) []scaler.Event {
	t.Helper()
	evs, err := db.Events(context.Background(), EventFilter{})
	if err != nil {
		t.Fatalf("Events: %v", err)
	}
	return evs
}

func TestOpenSettings(t *testing.T) {
	db, path := openTest(t)
	ctx := context.Background()
	tests := []struct {
		pragma string
		want   string
	}{
		{"journal_mode", "wal"},
		{"synchronous", "2"}, // FULL
		{"busy_timeout", "5000"},
		{"foreign_keys", "1"},
	}
	for _, tt := range tests {
		var got string
		if err := db.w.QueryRowContext(ctx, "PRAGMA "+tt.pragma).Scan(&got); err != nil {
			t.Fatalf("PRAGMA %s: %v", tt.pragma, err)
		}
		if got != tt.want {
			t.Errorf("PRAGMA %s = %q, want %q", tt.pragma, got, tt.want)
		}
	}
	if _, err := db.r.ExecContext(ctx, "DELETE FROM events"); err == nil {
		t.Error("write through the read pool succeeded, want read-only")
	}
	fi, err := os.Stat(filepath.Dir(path))
	if err != nil {
		t.Fatal(err)
	}
	if got := fi.Mode().Perm(); got != 0o750 {
		t.Errorf("directory mode = %o, want 750", got)
	}
	if err := db.IntegrityCheck(ctx); err != nil {
		t.Errorf("IntegrityCheck: %v", err)
	}
}

func TestSlotRoundTrip(t *testing.T) {
	tests := []struct {
		name string
		in   scaler.Slot
	}{
		{"every field", scaler.Slot{
			State:        scaler.Ready,
			InstanceID:   "i-0123456789abcdef0",
			LaunchID:     "launch-1",
			Address:      "100.64.0.7:22",
			InstanceType: "c7i.4xlarge",
			Market:       "spot",
			StateSince:   t0,
			LastActive:   t0.Add(90 * time.Second),
			Weight:       37,
			DrainReason:  "operator",
		}},
		{"zero times and strings", scaler.Slot{State: scaler.Launching, Weight: 0}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			db, _ := openTest(t)
			ctx := context.Background()
			if err := db.EnsureSlots(ctx, map[string]int{"x86": 1}, t0); err != nil {
				t.Fatal(err)
			}
			key := scaler.SlotKey{Pool: "x86", Slot: "slot1"}
			fresh, err := db.Slot(ctx, key)
			if err != nil {
				t.Fatal(err)
			}
			wantFresh := scaler.Slot{Pool: "x86", Name: "slot1", State: scaler.Empty,
				Weight: scaler.DefaultWeight, StateSince: t0.UTC(), Version: 1}
			if !reflect.DeepEqual(fresh, wantFresh) {
				t.Fatalf("new slot = %+v, want %+v", fresh, wantFresh)
			}

			in := tt.in
			in.Pool, in.Name, in.Version = "x86", "slot1", fresh.Version
			if err := db.Commit(ctx, scaler.Change{Slots: []scaler.Slot{in}}); err != nil {
				t.Fatal(err)
			}
			want := in
			want.StateSince = in.StateSince.UTC()
			want.LastActive = in.LastActive.UTC()
			if in.StateSince.IsZero() {
				want.StateSince = time.Time{}
			}
			if in.LastActive.IsZero() {
				want.LastActive = time.Time{}
			}
			want.Version = 2
			got, err := db.Slot(ctx, key)
			if err != nil {
				t.Fatal(err)
			}
			if !reflect.DeepEqual(got, want) {
				t.Errorf("Slot = %+v\nwant  %+v", got, want)
			}
			all, err := db.Slots(ctx)
			if err != nil {
				t.Fatal(err)
			}
			if len(all) != 1 || !reflect.DeepEqual(all[0], want) {
				t.Errorf("Slots = %+v, want [%+v]", all, want)
			}
		})
	}
}

func fullReservation(id string) scaler.Reservation {
	return scaler.Reservation{
		ID:         id,
		Pool:       "x86",
		System:     "x86_64-linux",
		Features:   []string{"kvm", "nixos-test"},
		Owner:      "proj/nix-build#42",
		State:      scaler.Assigned,
		Slot:       "slot3",
		Lease:      10 * time.Minute,
		CreatedAt:  t0,
		ExpiresAt:  t0.Add(10 * time.Minute),
		AssignedAt: t0.Add(time.Second),
		EndedAt:    t0.Add(time.Hour),
		Reason:     "because",
	}
}

// stored is r as the store gives it back.
func stored(r scaler.Reservation, version int64) scaler.Reservation {
	utc := func(t time.Time) time.Time {
		if t.IsZero() {
			return time.Time{}
		}
		return t.UTC()
	}
	r.CreatedAt, r.ExpiresAt = utc(r.CreatedAt), utc(r.ExpiresAt)
	r.AssignedAt, r.EndedAt = utc(r.AssignedAt), utc(r.EndedAt)
	if len(r.Features) == 0 {
		r.Features = nil
	}
	r.Version = version
	return r
}

func TestReservationRoundTrip(t *testing.T) {
	tests := []struct {
		name string
		in   scaler.Reservation
	}{
		{"every field", fullReservation("r1")},
		{"nil features, zero times", scaler.Reservation{ID: "r2", Pool: "arm", System: "aarch64-linux", State: scaler.Pending}},
		{"empty features", scaler.Reservation{ID: "r3", Features: []string{}, State: scaler.Pending, CreatedAt: t0}},
		{"odd feature strings", scaler.Reservation{ID: "r4", Features: []string{`a"b`, "c,d", "ü"}, State: scaler.Pending}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			db, _ := openTest(t)
			ctx := context.Background()
			want := stored(tt.in, 1)
			created, ok, err := db.CreateReservation(ctx, tt.in, scaler.Event{Kind: scaler.EvCreated, ReservationID: tt.in.ID})
			if err != nil || !ok {
				t.Fatalf("CreateReservation = %v, %v", ok, err)
			}
			if !reflect.DeepEqual(created, want) {
				t.Errorf("CreateReservation returned %+v\nwant %+v", created, want)
			}
			got, err := db.Reservation(ctx, tt.in.ID)
			if err != nil {
				t.Fatal(err)
			}
			if !reflect.DeepEqual(got, want) {
				t.Errorf("Reservation = %+v\nwant %+v", got, want)
			}

			// Every column is written by Commit too.
			upd := fullReservation(tt.in.ID)
			upd.Pool, upd.Features, upd.State, upd.Reason = "other", []string{"big-parallel"}, scaler.Released, "done"
			upd.Version = got.Version
			if err := db.Commit(ctx, scaler.Change{Reservations: []scaler.Reservation{upd}}); err != nil {
				t.Fatal(err)
			}
			got, err = db.Reservation(ctx, tt.in.ID)
			if err != nil {
				t.Fatal(err)
			}
			if want := stored(upd, 2); !reflect.DeepEqual(got, want) {
				t.Errorf("after Commit: %+v\nwant %+v", got, want)
			}
		})
	}
}

func TestNotFound(t *testing.T) {
	db, _ := openTest(t)
	ctx := context.Background()
	if _, err := db.Slot(ctx, scaler.SlotKey{Pool: "x", Slot: "slot1"}); !errors.Is(err, scaler.ErrNotFound) {
		t.Errorf("Slot: err = %v, want ErrNotFound", err)
	}
	if _, err := db.Reservation(ctx, "nope"); !errors.Is(err, scaler.ErrNotFound) {
		t.Errorf("Reservation: err = %v, want ErrNotFound", err)
	}
}

func slotKeys(t *testing.T, db *DB) []string {
	t.Helper()
	slots, err := db.Slots(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	var keys []string
	for _, s := range slots {
		keys = append(keys, s.Key().String())
	}
	return keys
}

// setState moves a slot to state through Commit, as the reconciler would.
func setState(t *testing.T, db *DB, pool, name string, state scaler.SlotState) {
	t.Helper()
	ctx := context.Background()
	s, err := db.Slot(ctx, scaler.SlotKey{Pool: pool, Slot: name})
	if err != nil {
		t.Fatal(err)
	}
	s.State = state
	if err := db.Commit(ctx, scaler.Change{Slots: []scaler.Slot{s}}); err != nil {
		t.Fatal(err)
	}
}

func TestEnsureSlots(t *testing.T) {
	db, _ := openTest(t)
	ctx := context.Background()
	// Steps run in order on one database.
	steps := []struct {
		name   string
		before func()
		pools  map[string]int
		want   []string
	}{
		{name: "create", pools: map[string]int{"x86": 2, "arm": 1},
			want: []string{"arm/slot1", "x86/slot1", "x86/slot2"}},
		{name: "grow", pools: map[string]int{"x86": 4, "arm": 1},
			want: []string{"arm/slot1", "x86/slot1", "x86/slot2", "x86/slot3", "x86/slot4"}},
		{name: "shrink keeps busy slot", pools: map[string]int{"x86": 2, "arm": 1},
			before: func() { setState(t, db, "x86", "slot4", scaler.Ready) },
			want:   []string{"arm/slot1", "x86/slot1", "x86/slot2", "x86/slot4"}},
		{name: "removed pool keeps busy slot", pools: map[string]int{"x86": 2},
			before: func() { setState(t, db, "arm", "slot1", scaler.Draining) },
			want:   []string{"arm/slot1", "x86/slot1", "x86/slot2", "x86/slot4"}},
		{name: "emptied surplus slots go", pools: map[string]int{"x86": 2},
			before: func() {
				setState(t, db, "x86", "slot4", scaler.Empty)
				setState(t, db, "arm", "slot1", scaler.Empty)
			},
			want: []string{"x86/slot1", "x86/slot2"}},
		{name: "zero slots", pools: map[string]int{"x86": 0}, want: nil},
	}
	for _, st := range steps {
		if st.before != nil {
			st.before()
		}
		if err := db.EnsureSlots(ctx, st.pools, t0); err != nil {
			t.Fatalf("%s: EnsureSlots: %v", st.name, err)
		}
		if got := slotKeys(t, db); !slices.Equal(got, st.want) {
			t.Errorf("%s: slots = %v, want %v", st.name, got, st.want)
		}
	}
	if err := db.EnsureSlots(ctx, map[string]int{"x86": -1}, t0); err == nil {
		t.Error("EnsureSlots with a negative count succeeded")
	}
}

func TestEnsureSlotsKeepsExisting(t *testing.T) {
	db, _ := openTest(t)
	ctx := context.Background()
	if err := db.EnsureSlots(ctx, map[string]int{"x86": 1}, t0); err != nil {
		t.Fatal(err)
	}
	s, _ := db.Slot(ctx, scaler.SlotKey{Pool: "x86", Slot: "slot1"})
	s.Weight = 5
	c := scaler.Change{Slots: []scaler.Slot{s}}
	if err := db.Commit(ctx, c); err != nil {
		t.Fatal(err)
	}
	if err := db.EnsureSlots(ctx, map[string]int{"x86": 2}, t0.Add(time.Hour)); err != nil {
		t.Fatal(err)
	}
	got, _ := db.Slot(ctx, scaler.SlotKey{Pool: "x86", Slot: "slot1"})
	if want := c.Slots[0]; !reflect.DeepEqual(got, want) {
		t.Errorf("existing slot changed: %+v, want %+v", got, want)
	}
}

func TestSlotsOrder(t *testing.T) {
	db, _ := openTest(t)
	if err := db.EnsureSlots(context.Background(), map[string]int{"b": 2, "a": 11}, t0); err != nil {
		t.Fatal(err)
	}
	want := []string{"a/slot1", "a/slot2", "a/slot3", "a/slot4", "a/slot5", "a/slot6",
		"a/slot7", "a/slot8", "a/slot9", "a/slot10", "a/slot11", "b/slot1", "b/slot2"}
	if got := slotKeys(t, db); !slices.Equal(got, want) {
		t.Errorf("Slots order = %v, want %v", got, want)
	}
	names := []string{"slot10", "other", "slot2", "slot1", "slotx"}
	slices.SortFunc(names, compareSlotNames)
	if want := []string{"slot1", "slot2", "slot10", "other", "slotx"}; !slices.Equal(names, want) {
		t.Errorf("compareSlotNames order = %v, want %v", names, want)
	}
}

func TestCreateReservationIdempotent(t *testing.T) {
	db, _ := openTest(t)
	ctx := context.Background()
	first := fullReservation("same")
	got1, created, err := db.CreateReservation(ctx, first, scaler.Event{Kind: scaler.EvCreated, ReservationID: "same"})
	if err != nil || !created {
		t.Fatalf("first create: created=%v err=%v", created, err)
	}
	second := fullReservation("same")
	second.Owner, second.Pool = "someone else", "arm"
	got2, created, err := db.CreateReservation(ctx, second, scaler.Event{Kind: scaler.EvCreated, ReservationID: "same"})
	if err != nil || created {
		t.Fatalf("second create: created=%v err=%v, want false, nil", created, err)
	}
	if !reflect.DeepEqual(got2, got1) {
		t.Errorf("second create returned %+v, want the first %+v", got2, got1)
	}
	if evs := allEvents(t, db); len(evs) != 1 {
		t.Errorf("events = %d, want 1", len(evs))
	}
}

func TestCreateReservationConcurrent(t *testing.T) {
	db, _ := openTest(t)
	ctx := context.Background()
	const n = 16
	type result struct {
		r       scaler.Reservation
		created bool
		err     error
	}
	results := make([]result, n)
	var wg sync.WaitGroup
	start := make(chan struct{})
	for i := range n {
		wg.Go(func() {
			<-start
			r := fullReservation("race")
			r.Owner = "caller" + strconv.Itoa(i)
			got, created, err := db.CreateReservation(ctx, r, scaler.Event{Kind: scaler.EvCreated, ReservationID: "race"})
			results[i] = result{got, created, err}
		})
	}
	close(start)
	wg.Wait()
	createdCount := 0
	var winner scaler.Reservation
	for i, res := range results {
		if res.err != nil {
			t.Fatalf("caller %d: %v", i, res.err)
		}
		if res.created {
			createdCount++
			winner = res.r
		}
	}
	if createdCount != 1 {
		t.Fatalf("created by %d callers, want 1", createdCount)
	}
	for i, res := range results {
		if !reflect.DeepEqual(res.r, winner) {
			t.Errorf("caller %d got %+v, want the winner's %+v", i, res.r, winner)
		}
	}
	if evs := allEvents(t, db); len(evs) != 1 {
		t.Errorf("events = %d, want 1", len(evs))
	}
}

func TestCommitConflict(t *testing.T) {
	ctx := context.Background()
	tests := []struct {
		name   string
		change func(s scaler.Slot, r scaler.Reservation) scaler.Change
	}{
		{"stale reservation after a good slot", func(s scaler.Slot, r scaler.Reservation) scaler.Change {
			r.Version--
			return scaler.Change{Slots: []scaler.Slot{s}, Reservations: []scaler.Reservation{r}}
		}},
		{"stale slot before a good reservation", func(s scaler.Slot, r scaler.Reservation) scaler.Change {
			s.Version++
			return scaler.Change{Slots: []scaler.Slot{s}, Reservations: []scaler.Reservation{r}}
		}},
		{"second of two slots stale", func(s scaler.Slot, r scaler.Reservation) scaler.Change {
			s2 := s
			s2.Name, s2.Version = "slot2", 7
			return scaler.Change{Slots: []scaler.Slot{s, s2}, Reservations: []scaler.Reservation{r}}
		}},
		{"deleted slot", func(s scaler.Slot, r scaler.Reservation) scaler.Change {
			s.Name = "slot9"
			return scaler.Change{Slots: []scaler.Slot{s}, Reservations: []scaler.Reservation{r}}
		}},
		{"unknown reservation", func(s scaler.Slot, r scaler.Reservation) scaler.Change {
			r.ID = "ghost"
			return scaler.Change{Slots: []scaler.Slot{s}, Reservations: []scaler.Reservation{r}}
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			db, _ := openTest(t)
			if err := db.EnsureSlots(ctx, map[string]int{"x86": 2}, t0); err != nil {
				t.Fatal(err)
			}
			r0, _, err := db.CreateReservation(ctx, scaler.Reservation{ID: "r", Pool: "x86", State: scaler.Pending}, scaler.Event{Kind: scaler.EvCreated})
			if err != nil {
				t.Fatal(err)
			}
			s0, _ := db.Slot(ctx, scaler.SlotKey{Pool: "x86", Slot: "slot1"})
			beforeSlots, _ := db.Slots(ctx)
			beforeEvents := allEvents(t, db)

			s, r := s0, r0
			s.State, s.InstanceID = scaler.Ready, "i-1"
			r.State, r.Slot = scaler.Assigned, "slot1"
			c := tt.change(s, r)
			c.Events = []scaler.Event{{Kind: scaler.EvAssigned, ReservationID: "r"}, {Kind: scaler.EvReady}}
			versions := func() []int64 {
				var v []int64
				for _, s := range c.Slots {
					v = append(v, s.Version)
				}
				for _, r := range c.Reservations {
					v = append(v, r.Version)
				}
				return v
			}
			wantVersions := versions()

			err = db.Commit(ctx, c)
			if !errors.Is(err, scaler.ErrConflict) {
				t.Fatalf("Commit err = %v, want ErrConflict", err)
			}
			if got := versions(); !slices.Equal(got, wantVersions) {
				t.Errorf("versions after failed Commit = %v, want unchanged %v", got, wantVersions)
			}
			gotSlots, _ := db.Slots(ctx)
			if !reflect.DeepEqual(gotSlots, beforeSlots) {
				t.Errorf("slots changed:\n%+v\nwant %+v", gotSlots, beforeSlots)
			}
			gotR, _ := db.Reservation(ctx, "r")
			if !reflect.DeepEqual(gotR, r0) {
				t.Errorf("reservation changed: %+v, want %+v", gotR, r0)
			}
			if got := allEvents(t, db); !reflect.DeepEqual(got, beforeEvents) {
				t.Errorf("events = %+v, want %+v", got, beforeEvents)
			}
		})
	}
}

func TestCommitVersions(t *testing.T) {
	db, _ := openTest(t)
	ctx := context.Background()
	if err := db.EnsureSlots(ctx, map[string]int{"x86": 1}, t0); err != nil {
		t.Fatal(err)
	}
	s, _ := db.Slot(ctx, scaler.SlotKey{Pool: "x86", Slot: "slot1"})
	r, _, err := db.CreateReservation(ctx, scaler.Reservation{ID: "r", State: scaler.Pending}, scaler.Event{Kind: scaler.EvCreated})
	if err != nil {
		t.Fatal(err)
	}
	c := scaler.Change{Slots: []scaler.Slot{s}, Reservations: []scaler.Reservation{r}}
	for want := int64(2); want <= 4; want++ {
		c.Slots[0].Weight++
		if err := db.Commit(ctx, c); err != nil {
			t.Fatalf("commit to version %d: %v", want, err)
		}
		if c.Slots[0].Version != want || c.Reservations[0].Version != want {
			t.Errorf("in-place versions = %d, %d, want %d", c.Slots[0].Version, c.Reservations[0].Version, want)
		}
		gs, _ := db.Slot(ctx, s.Key())
		gr, _ := db.Reservation(ctx, "r")
		if gs.Version != want || gr.Version != want {
			t.Errorf("stored versions = %d, %d, want %d", gs.Version, gr.Version, want)
		}
		if !reflect.DeepEqual(gs, c.Slots[0]) {
			t.Errorf("stored slot %+v, want caller's %+v", gs, c.Slots[0])
		}
	}
	// A writer still holding the old version loses.
	if err := db.Commit(ctx, scaler.Change{Slots: []scaler.Slot{s}}); !errors.Is(err, scaler.ErrConflict) {
		t.Errorf("stale commit err = %v, want ErrConflict", err)
	}
}

func TestEventsFilterAndPrune(t *testing.T) {
	db, _ := openTest(t)
	ctx := context.Background()
	at := func(m int) time.Time { return t0.Add(time.Duration(m) * time.Minute) }
	evs := []scaler.Event{
		{At: at(0), Kind: scaler.EvCreated, Pool: "x86", ReservationID: "r1", Actor: "api"},
		{At: at(1), Kind: scaler.EvLaunched, Pool: "x86", Slot: "slot1", InstanceID: "i-1", Actor: "reconciler", Reason: "demand"},
		{At: at(2), Kind: scaler.EvAssigned, Pool: "x86", Slot: "slot1", ReservationID: "r1", Actor: "reconciler"},
		{At: at(3), Kind: scaler.EvLaunched, Pool: "arm", Slot: "slot1", InstanceID: "i-2", Actor: "reconciler"},
		// Out of time order: Events follows write order, not At.
		{At: at(1), Kind: scaler.EvReleased, Pool: "x86", Slot: "slot1", ReservationID: "r1", Actor: "api"},
	}
	if err := db.Commit(ctx, scaler.Change{Events: evs[:3]}); err != nil {
		t.Fatal(err)
	}
	if err := db.Commit(ctx, scaler.Change{Events: evs[3:]}); err != nil {
		t.Fatal(err)
	}
	want := func(idx ...int) []scaler.Event {
		var out []scaler.Event
		for _, i := range idx {
			e := evs[i]
			e.At = e.At.UTC()
			out = append(out, e)
		}
		return out
	}
	tests := []struct {
		name string
		f    EventFilter
		want []scaler.Event
	}{
		{"all", EventFilter{}, want(0, 1, 2, 3, 4)},
		{"since", EventFilter{Since: at(2)}, want(2, 3)},
		{"pool", EventFilter{Pool: "arm"}, want(3)},
		{"slot", EventFilter{Pool: "x86", Slot: "slot1"}, want(1, 2, 4)},
		{"reservation", EventFilter{ReservationID: "r1"}, want(0, 2, 4)},
		{"limit keeps newest", EventFilter{Limit: 2}, want(3, 4)},
		{"limit with filter", EventFilter{ReservationID: "r1", Limit: 2}, want(2, 4)},
		{"no match", EventFilter{Pool: "nope"}, nil},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := db.Events(ctx, tt.f)
			if err != nil {
				t.Fatal(err)
			}
			if !reflect.DeepEqual(got, tt.want) {
				t.Errorf("Events(%+v) =\n%+v\nwant\n%+v", tt.f, got, tt.want)
			}
		})
	}

	// Zero At is filled in with the current time.
	before := time.Now()
	if err := db.Commit(ctx, scaler.Change{Events: []scaler.Event{{Kind: scaler.EvHeartbeat}}}); err != nil {
		t.Fatal(err)
	}
	got, _ := db.Events(ctx, EventFilter{Limit: 1})
	if len(got) != 1 || got[0].At.Before(before.Truncate(0)) || got[0].At.After(time.Now()) {
		t.Errorf("event with zero At stored as %+v, want now", got)
	}

	n, err := db.PruneEvents(ctx, at(2))
	if err != nil {
		t.Fatal(err)
	}
	if n != 3 {
		t.Errorf("PruneEvents deleted %d, want 3", n)
	}
	got, _ = db.Events(ctx, EventFilter{})
	if len(got) != 3 || !reflect.DeepEqual(got[:2], want(2, 3)) {
		t.Errorf("after prune: %+v, want events 2, 3 and the heartbeat", got)
	}
}

func TestReservationQueries(t *testing.T) {
	db, _ := openTest(t)
	ctx := context.Background()
	mk := []struct {
		id    string
		pool  string
		state scaler.ReservationState
		min   int
	}{
		{"a", "x86", scaler.Released, 0},
		{"b", "x86", scaler.Pending, 3},
		{"c", "arm", scaler.Assigned, 1},
		{"d", "x86", scaler.Assigned, 2},
		{"e", "arm", scaler.Expired, 4},
		{"f", "x86", scaler.Pending, 3}, // same time as b: id breaks the tie
	}
	for _, m := range mk {
		r := scaler.Reservation{ID: m.id, Pool: m.pool, State: m.state, CreatedAt: t0.Add(time.Duration(m.min) * time.Minute)}
		if _, _, err := db.CreateReservation(ctx, r, scaler.Event{Kind: scaler.EvCreated, ReservationID: m.id}); err != nil {
			t.Fatal(err)
		}
	}
	ids := func(rs []scaler.Reservation) []string {
		var out []string
		for _, r := range rs {
			out = append(out, r.ID)
		}
		return out
	}
	live, err := db.LiveReservations(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if got, want := ids(live), []string{"c", "d", "b", "f"}; !slices.Equal(got, want) {
		t.Errorf("LiveReservations = %v, want %v", got, want)
	}
	tests := []struct {
		name string
		f    ReservationFilter
		want []string
	}{
		{"all newest first", ReservationFilter{}, []string{"e", "f", "b", "d", "c", "a"}},
		{"states", ReservationFilter{States: []scaler.ReservationState{scaler.Released, scaler.Expired}}, []string{"e", "a"}},
		{"pool", ReservationFilter{Pool: "arm"}, []string{"e", "c"}},
		{"pool and state", ReservationFilter{Pool: "x86", States: []scaler.ReservationState{scaler.Pending}}, []string{"f", "b"}},
		{"limit", ReservationFilter{Limit: 2}, []string{"e", "f"}},
		{"no match", ReservationFilter{Pool: "none"}, nil},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			rs, err := db.Reservations(ctx, tt.f)
			if err != nil {
				t.Fatal(err)
			}
			if got := ids(rs); !slices.Equal(got, tt.want) {
				t.Errorf("Reservations(%+v) = %v, want %v", tt.f, got, tt.want)
			}
		})
	}
}

func TestReopenKeepsDataAndSchema(t *testing.T) {
	ctx := context.Background()
	path := filepath.Join(t.TempDir(), "db")
	db, err := Open(ctx, path)
	if err != nil {
		t.Fatal(err)
	}
	if _, _, err := db.CreateReservation(ctx, fullReservation("keep"), scaler.Event{Kind: scaler.EvCreated}); err != nil {
		t.Fatal(err)
	}
	if err := db.Close(); err != nil {
		t.Fatal(err)
	}
	db, err = Open(ctx, path)
	if err != nil {
		t.Fatalf("reopen: %v", err)
	}
	defer db.Close()
	if _, err := db.Reservation(ctx, "keep"); err != nil {
		t.Errorf("after reopen: %v", err)
	}
	ms, _ := migrations()
	var n int
	if err := db.r.QueryRowContext(ctx, "SELECT COUNT(*) FROM schema_migrations").Scan(&n); err != nil {
		t.Fatal(err)
	}
	if n != len(ms) {
		t.Errorf("schema_migrations rows = %d, want %d", n, len(ms))
	}
}

func TestMigrateAppliesOnlyNew(t *testing.T) {
	ctx := context.Background()
	db, _ := openTest(t)
	ms, err := migrations()
	if err != nil {
		t.Fatal(err)
	}
	// Two made-up migrations after the embedded ones.
	n := len(ms)
	m2 := migration{version: n + 1, name: "900_test.sql", sql: "CREATE TABLE extra (x INTEGER NOT NULL);"}
	m3 := migration{version: n + 2, name: "901_test.sql", sql: "INSERT INTO extra VALUES (3);"}
	// 001 was applied by Open; running it again would fail (tables exist),
	// so success shows it was skipped.
	if err := db.migrate(ctx, append(ms, m2)); err != nil {
		t.Fatalf("migrate to 2: %v", err)
	}
	if err := db.migrate(ctx, append(ms, m2, m3)); err != nil {
		t.Fatalf("migrate to 3: %v", err)
	}
	var rows, versions int
	if err := db.w.QueryRowContext(ctx, "SELECT COUNT(*) FROM extra").Scan(&rows); err != nil {
		t.Fatal(err)
	}
	if err := db.w.QueryRowContext(ctx, "SELECT COUNT(*) FROM schema_migrations").Scan(&versions); err != nil {
		t.Fatal(err)
	}
	if rows != 1 || versions != n+2 {
		t.Errorf("extra rows = %d, schema versions = %d; want 1, %d", rows, versions, n+2)
	}

	// A failing migration leaves no trace.
	bad := migration{version: n + 3, name: "902_bad.sql", sql: "CREATE TABLE half (x INTEGER); SELECT nonsense FROM nowhere;"}
	if err := db.migrate(ctx, append(ms, m2, m3, bad)); err == nil {
		t.Fatal("bad migration succeeded")
	}
	var half int
	db.w.QueryRowContext(ctx, "SELECT COUNT(*) FROM sqlite_schema WHERE name = 'half'").Scan(&half)
	if err := db.w.QueryRowContext(ctx, "SELECT COUNT(*) FROM schema_migrations").Scan(&versions); err != nil {
		t.Fatal(err)
	}
	if half != 0 || versions != n+2 {
		t.Errorf("after failed migration: table half exists=%d, versions=%d; want 0, %d", half, versions, n+2)
	}
}

func TestNewerSchemaRefused(t *testing.T) {
	ctx := context.Background()
	path := filepath.Join(t.TempDir(), "db")
	db, err := Open(ctx, path)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := db.w.ExecContext(ctx, "INSERT INTO schema_migrations (version, applied_at) VALUES (999, 0)"); err != nil {
		t.Fatal(err)
	}
	db.Close()
	ms, _ := migrations()
	_, err = Open(ctx, path)
	want := fmt.Sprintf("database %s was written by a newer version (schema 999, this binary knows %d)", path, ms[len(ms)-1].version)
	if err == nil || err.Error() != want {
		t.Errorf("Open err = %v, want %q", err, want)
	}
}

// TestHelperProcess is the child of TestCrashDurability: it commits
// reservations in a loop and reports each id only after Commit returned.
func TestHelperProcess(t *testing.T) {
	path := os.Getenv("STORE_CRASH_HELPER_DB")
	if path == "" {
		t.Skip("helper process for TestCrashDurability")
	}
	ctx := context.Background()
	db, err := Open(ctx, path)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(2)
	}
	if err := db.EnsureSlots(ctx, map[string]int{"x86": 1}, time.Now()); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(2)
	}
	for i := range 100000 {
		id := "crash-" + strconv.Itoa(i)
		r, _, err := db.CreateReservation(ctx, scaler.Reservation{ID: id, Pool: "x86", State: scaler.Pending, CreatedAt: time.Now()}, scaler.Event{Kind: scaler.EvCreated, ReservationID: id})
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(2)
		}
		slot, err := db.Slot(ctx, scaler.SlotKey{Pool: "x86", Slot: "slot1"})
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(2)
		}
		slot.LastActive = time.Now()
		r.State, r.EndedAt = scaler.Released, time.Now()
		if err := db.Commit(ctx, scaler.Change{
			Slots:        []scaler.Slot{slot},
			Reservations: []scaler.Reservation{r},
			Events:       []scaler.Event{{Kind: scaler.EvReleased, ReservationID: id}},
		}); err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(2)
		}
		fmt.Println("committed", id) // os.Stdout is unbuffered
	}
	os.Exit(0)
}

func TestCrashDurability(t *testing.T) {
	if testing.Short() {
		t.Skip("starts a child process")
	}
	path := filepath.Join(t.TempDir(), "crash.db")
	cmd := exec.Command(os.Args[0], "-test.run=^TestHelperProcess$", "-test.count=1")
	cmd.Env = append(os.Environ(), "STORE_CRASH_HELPER_DB="+path)
	var stderr strings.Builder
	cmd.Stderr = &stderr
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	// Bound the test if the child never gets going (a hang guard).
	watchdog := time.AfterFunc(testwait.Bound, func() { cmd.Process.Kill() })
	defer watchdog.Stop()

	var ids []string
	sc := bufio.NewScanner(out)
	killed := false
	for sc.Scan() {
		id, ok := strings.CutPrefix(sc.Text(), "committed ")
		if !ok {
			continue
		}
		ids = append(ids, id)
		if len(ids) == 25 && !killed {
			// Kill sends SIGKILL: no deferred code, no Close, likely mid-transaction.
			if err := cmd.Process.Kill(); err != nil {
				t.Fatal(err)
			}
			killed = true
		}
	}
	// Lines printed between our read and the kill are committed too; the
	// scanner read them all before EOF.
	cmd.Wait()
	if !killed {
		t.Fatalf("child exited after %d commits without being killed; stderr: %s", len(ids), stderr.String())
	}

	db, err := Open(context.Background(), path)
	if err != nil {
		t.Fatalf("reopen after kill: %v", err)
	}
	defer db.Close()
	if err := db.IntegrityCheck(context.Background()); err != nil {
		t.Error(err)
	}
	for _, id := range ids {
		r, err := db.Reservation(context.Background(), id)
		if err != nil {
			t.Errorf("committed %s lost: %v", id, err)
			continue
		}
		if r.State != scaler.Released || r.Version != 2 {
			t.Errorf("%s: state %s version %d, want released at version 2", id, r.State, r.Version)
		}
	}
	t.Logf("%d committed ids survived SIGKILL", len(ids))
}

// BenchmarkCreateRelease measures one reservation's write path: the create
// and the release, each a durable (fsynced) transaction with one event.
func BenchmarkCreateRelease(b *testing.B) {
	db, _ := openTest(b)
	ctx := context.Background()
	i := 0
	for b.Loop() {
		i++
		id := "bench-" + strconv.Itoa(i)
		now := time.Now()
		r, _, err := db.CreateReservation(ctx, scaler.Reservation{
			ID: id, Pool: "x86", System: "x86_64-linux", Features: []string{"kvm"},
			State: scaler.Pending, Lease: 10 * time.Minute, CreatedAt: now, ExpiresAt: now.Add(10 * time.Minute),
		}, scaler.Event{Kind: scaler.EvCreated, ReservationID: id, Actor: "api"})
		if err != nil {
			b.Fatal(err)
		}
		r.State, r.EndedAt = scaler.Released, time.Now()
		if err := db.Commit(ctx, scaler.Change{
			Reservations: []scaler.Reservation{r},
			Events:       []scaler.Event{{Kind: scaler.EvReleased, ReservationID: id, Actor: "api"}},
		}); err != nil {
			b.Fatal(err)
		}
	}
}

func TestSlotZoneRoundTrip(t *testing.T) {
	ctx := context.Background()
	db, _ := openTest(t)
	if err := db.EnsureSlots(ctx, map[string]int{"x86": 1}, time.Now()); err != nil {
		t.Fatal(err)
	}
	s, err := db.Slot(ctx, scaler.SlotKey{Pool: "x86", Slot: "slot1"})
	if err != nil {
		t.Fatal(err)
	}
	s.State, s.InstanceID, s.InstanceType, s.Market, s.Zone = scaler.Launching, "i-1", "c7i.large", "spot", "eu-central-1a"
	if err := db.Commit(ctx, scaler.Change{Slots: []scaler.Slot{s}}); err != nil {
		t.Fatal(err)
	}
	got, err := db.Slot(ctx, s.Key())
	if err != nil || got.Zone != "eu-central-1a" || got.Market != "spot" || got.InstanceType != "c7i.large" {
		t.Fatalf("slot after commit = %+v, %v; want zone, market and type kept", got, err)
	}
}

func TestPruneReservations(t *testing.T) {
	ctx := context.Background()
	db, _ := openTest(t)
	now := time.Date(2026, 11, 26, 12, 0, 0, 0, time.UTC)
	mk := func(id string, st scaler.ReservationState, ended time.Time) {
		t.Helper()
		r := scaler.Reservation{ID: id, Pool: "x86", System: "x86_64-linux", State: st, CreatedAt: now.Add(-48 * time.Hour), EndedAt: ended}
		if _, _, err := db.CreateReservation(ctx, r, scaler.Event{Kind: scaler.EvCreated}); err != nil {
			t.Fatal(err)
		}
	}
	mk("old-released", scaler.Released, now.Add(-40*time.Hour))
	mk("old-failed", scaler.Failed, now.Add(-40*time.Hour))
	mk("new-released", scaler.Released, now.Add(-time.Hour))
	mk("old-pending", scaler.Pending, time.Time{})
	n, err := db.PruneReservations(ctx, now.Add(-24*time.Hour))
	if err != nil || n != 2 {
		t.Fatalf("pruned %d, %v; want 2", n, err)
	}
	for id, want := range map[string]bool{"old-released": false, "old-failed": false, "new-released": true, "old-pending": true} {
		_, err := db.Reservation(ctx, id)
		if got := err == nil; got != want {
			t.Errorf("%s kept = %v, want %v", id, got, want)
		}
	}
}
