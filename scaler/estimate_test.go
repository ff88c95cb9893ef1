package scaler_test

import (
	"context"
	"fmt"
	"testing"
	"time"

	"guardianproject.dev/ops/nix-builder-autoscaler/scaler"
	"guardianproject.dev/ops/nix-builder-autoscaler/scaler/memstore"
)

// TestEstimate: a source's estimate comes from its own history in the pool;
// a source new to the pool is estimated from every source's there; a pool
// without any history gets 1.
func TestEstimate(t *testing.T) {
	ctx := context.Background()
	st := memstore.New(nil, func() scaler.Slot { return scaler.Slot{} })
	for i, f := range []struct {
		source, pool string
		arrived      int
	}{{"a", "x86", 6}, {"a", "x86", 6}, {"b", "x86", 2}, {"c", "arm", 9}} {
		at := t0.Add(time.Duration(i) * time.Minute)
		if _, _, err := st.CreateForecast(ctx, scaler.Forecast{ID: fmt.Sprint(i), Source: f.source, Pool: f.pool, Builds: 1,
			Arrived: f.arrived, CreatedAt: at, ExpiresAt: at.Add(time.Hour)}); err != nil {
			t.Fatal(err)
		}
	}
	for _, tt := range []struct {
		source, pool string
		want         int
	}{
		{"a", "x86", 6},
		{"b", "x86", 2},
		{"new", "x86", 4}, // newest first: 2, 6, 6 -> (2 + 3 + 1.5) / 1.75
		{"a", "arm", 9},
		{"a", "riscv", 1},
	} {
		got, err := scaler.Estimate(ctx, st, tt.source, tt.pool)
		if err != nil || got != tt.want {
			t.Errorf("Estimate(%s, %s) = %d, %v; want %d", tt.source, tt.pool, got, err, tt.want)
		}
	}
}
