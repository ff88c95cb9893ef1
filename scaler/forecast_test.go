package scaler

import (
	"strings"
	"testing"
	"time"
)

func TestEstimateBuilds(t *testing.T) {
	for _, tt := range []struct {
		hist []int
		want int
	}{
		{nil, 1},      // no history: one builder hides a boot
		{[]int{0}, 0}, // the last evaluation built nothing
		{[]int{4}, 4}, // one evaluation: its count
		{[]int{4, 4, 4}, 4},
		{[]int{6, 0}, 4}, // the newest weighs twice the one before: (6 + 0/2) / 1.5
		{[]int{0, 6}, 2}, // (0 + 3) / 1.5
		{[]int{99999}, MaxForecastBuilds},
	} {
		if got := EstimateBuilds(tt.hist); got != tt.want {
			t.Errorf("EstimateBuilds(%v) = %d, want %d", tt.hist, got, tt.want)
		}
	}
}

// TestForecastFor: a new reservation counts against the latest forecast of
// its source and pool made before it whose TTL runs, withdrawn or not.
func TestForecastFor(t *testing.T) {
	fs := []Forecast{
		{ID: "old", Source: "p", Pool: "x86", CreatedAt: t0.Add(-time.Hour), ExpiresAt: t0.Add(-30 * time.Minute)},
		{ID: "cur", Source: "p", Pool: "x86", CreatedAt: t0.Add(-5 * time.Minute), ExpiresAt: t0.Add(25 * time.Minute), WithdrawnAt: t0.Add(-time.Minute)},
		{ID: "prev", Source: "p", Pool: "x86", CreatedAt: t0.Add(-10 * time.Minute), ExpiresAt: t0.Add(20 * time.Minute)},
		{ID: "arm", Source: "p", Pool: "arm", CreatedAt: t0.Add(-time.Minute), ExpiresAt: t0.Add(29 * time.Minute)},
		{ID: "later", Source: "p", Pool: "x86", CreatedAt: t0.Add(time.Minute), ExpiresAt: t0.Add(31 * time.Minute)},
	}
	name := func(i int) string {
		if i < 0 {
			return "none"
		}
		return fs[i].ID
	}
	for _, tt := range []struct {
		r    Reservation
		want string
	}{
		{Reservation{Source: "p", Pool: "x86", CreatedAt: t0}, "cur"},
		{Reservation{Source: "p", Pool: "arm", CreatedAt: t0}, "arm"},
		{Reservation{Source: "q", Pool: "x86", CreatedAt: t0}, "none"},
		{Reservation{Pool: "x86", CreatedAt: t0}, "none"},
		{Reservation{Source: "p", Pool: "x86", CreatedAt: t0.Add(-45 * time.Minute)}, "old"},
		{Reservation{Source: "p", Pool: "x86", CreatedAt: t0.Add(-25 * time.Minute)}, "none"}, // old's TTL had passed, prev not made yet
	} {
		if got := name(ForecastFor(fs, tt.r)); got != tt.want {
			t.Errorf("ForecastFor(%s/%s at %v) = %s, want %s", tt.r.Source, tt.r.Pool, tt.r.CreatedAt.Sub(t0), got, tt.want)
		}
	}
}

// TestForecastForOverlap: two evaluations of one project overlap. Their
// builds fill the older forecast first, then the newer; beyond both, the
// newer counts them.
func TestForecastForOverlap(t *testing.T) {
	fs := []Forecast{
		{ID: "a", Source: "p", Pool: "x86", Builds: 2, CreatedAt: t0.Add(-3 * time.Minute), ExpiresAt: t0.Add(time.Hour), WithdrawnAt: t0.Add(-time.Second)},
		{ID: "b", Source: "p", Pool: "x86", Builds: 3, CreatedAt: t0.Add(-2 * time.Minute), ExpiresAt: t0.Add(time.Hour)},
	}
	var got []string
	for range 7 {
		i := ForecastFor(fs, Reservation{Source: "p", Pool: "x86", CreatedAt: t0})
		fs[i].Arrived++
		got = append(got, fs[i].ID)
	}
	if want := "a a b b b b b"; strings.Join(got, " ") != want {
		t.Errorf("seven builds counted against %v, want %s", got, want)
	}
}
