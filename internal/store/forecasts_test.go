package store

import (
	"context"
	"errors"
	"maps"
	"slices"
	"testing"
	"time"

	"guardianproject.dev/ops/nix-builder-autoscaler/scaler"
)

// TestForecasts: a forecast is stored once per id; a reservation of its
// source and pool counts against the latest one whose TTL runs, withdrawn
// or not; history reads per source, or every source with "".
func TestForecasts(t *testing.T) {
	ctx := context.Background()
	db, _ := openTest(t)
	t0 := time.Now().UTC().Truncate(time.Second)
	mk := func(id, source, pool string, at time.Time) scaler.Forecast {
		f, created, err := db.CreateForecast(ctx, scaler.Forecast{ID: id, Source: source, Pool: pool, Builds: 3,
			CreatedAt: at, ExpiresAt: at.Add(30 * time.Minute)}, scaler.Event{At: at, Kind: scaler.EvForecast})
		if err != nil || !created {
			t.Fatalf("CreateForecast(%s) = %v, %v", id, created, err)
		}
		return f
	}
	mk("old", "p", "x86", t0.Add(-2*time.Hour))
	mk("f1", "p", "x86", t0.Add(-10*time.Minute))
	mk("f2", "p", "x86", t0.Add(-5*time.Minute))
	mk("q", "q", "x86", t0.Add(-time.Minute))
	if _, created, err := db.CreateForecast(ctx, scaler.Forecast{ID: "f1", Source: "other"}, scaler.Event{At: t0}); err != nil || created {
		t.Errorf("a second create of f1: created %v, %v; want the first one back", created, err)
	}
	if _, err := db.WithdrawForecast(ctx, "f2", scaler.Event{At: t0.Add(-time.Minute), Kind: scaler.EvForecastWithdrawn}); err != nil {
		t.Fatal(err)
	}
	if _, err := db.WithdrawForecast(ctx, "nope", scaler.Event{At: t0}); !errors.Is(err, scaler.ErrNotFound) {
		t.Errorf("withdrawing an unknown forecast: %v, want ErrNotFound", err)
	}
	for i, src := range []string{"p", "p", "", "q"} {
		r := scaler.Reservation{ID: "r" + string(rune('0'+i)), Pool: "x86", System: "x86_64-linux", Source: src, State: scaler.Pending,
			CreatedAt: t0, ExpiresAt: t0.Add(time.Hour)}
		if _, _, err := db.CreateReservation(ctx, r, scaler.Event{At: t0, Kind: scaler.EvCreated}); err != nil {
			t.Fatal(err)
		}
	}
	arrived := map[string]int{}
	for _, id := range []string{"old", "f1", "f2", "q"} {
		f, err := db.Forecast(ctx, id)
		if err != nil {
			t.Fatal(err)
		}
		arrived[id] = f.Arrived
	}
	if want := map[string]int{"old": 0, "f1": 2, "f2": 0, "q": 1}; !maps.Equal(arrived, want) {
		t.Errorf("arrived = %v, want %v (the oldest forecast of each source still expecting builds)", arrived, want)
	}
	if r, err := db.Reservation(ctx, "r0"); err != nil || r.Source != "p" {
		t.Errorf("reservation r0 = %+v, %v; want its source kept", r, err)
	}
	if h, _ := db.ForecastHistory(ctx, "p", "x86", 8); !slices.Equal(h, []int{0, 2, 0}) {
		t.Errorf("history of p = %v, want [0 2 0], newest first", h)
	}
	if h, _ := db.ForecastHistory(ctx, "", "x86", 2); !slices.Equal(h, []int{1, 0}) {
		t.Errorf("history of every source = %v, want [1 0]", h)
	}
	open, err := db.Forecasts(ctx)
	if err != nil {
		t.Fatal(err)
	}
	var ids []string
	for _, f := range open {
		ids = append(ids, f.ID)
	}
	if !slices.Equal(ids, []string{"f1", "f2", "q"}) {
		t.Errorf("Forecasts() = %v, want f1, f2 (withdrawn a minute ago) and q; not old (ended over an hour ago)", ids)
	}
}
