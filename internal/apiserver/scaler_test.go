package apiserver

import (
	"context"
	"log/slog"
	"sync"
	"testing"

	"guardianproject.dev/ops/nix-builder-autoscaler/clock"
	"guardianproject.dev/ops/nix-builder-autoscaler/internal/config"
	"guardianproject.dev/ops/nix-builder-autoscaler/scaler"
)

// testScaler is the real reconciler over the test's store, with no provider
// and no load balancer, so that it launches and terminates nothing: what it
// does is apply the intents the API records (drain, undrain, weight,
// released) and the reservations' deadlines. Its rounds run in the goroutine
// that calls Reconcile, one at a time; Kick only counts.
type testScaler struct {
	rec *scaler.Reconciler

	mu    sync.Mutex // one round at a time
	kmu   sync.Mutex
	kicks int
}

func newTestScaler(tb testing.TB, st scaler.Store, pools []config.Pool, clk clock.Clock) *testScaler {
	tb.Helper()
	var pol scaler.Policy
	for _, p := range pools {
		pol.Pools = append(pol.Pools, scaler.PoolPolicy{Name: p.Name, MaxBuilders: p.MaxBuilders, ReservationsPerBuilder: 1,
			IdleTimeout: p.IdleTimeout.D(), IdleAuto: p.IdleTimeout.IsAuto(), DrainTimeout: p.DrainTimeout.D(), LaunchTimeout: p.LaunchTimeout.D(),
			BootTimeout: p.BootTimeout.D(), BindTimeout: p.BindTimeout.D()})
	}
	return &testScaler{rec: scaler.New(scaler.Options{Store: st, Policy: pol, Clock: clk, Views: &scaler.Views{},
		Logger: slog.New(slog.DiscardHandler)})}
}

func (s *testScaler) Kick() {
	s.kmu.Lock()
	defer s.kmu.Unlock()
	s.kicks++
}

func (s *testScaler) count() int {
	s.kmu.Lock()
	defer s.kmu.Unlock()
	return s.kicks
}

// Reconcile runs one round. A round that fails only because there is no
// provider to launch with has still applied the intents.
func (s *testScaler) Reconcile(ctx context.Context) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	_, err := s.rec.ReconcileOnce(ctx)
	return err
}

func (s *testScaler) Status() scaler.RoundStatus { return s.rec.Status() }

func (s *testScaler) Result(id string) (scaler.IntentResult, bool) { return s.rec.Result(id) }

func (s *testScaler) Views() *scaler.Views { return s.rec.Views() }
