package daemon_test

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"guardianproject.dev/ops/nix-builder-autoscaler/clock"
	"guardianproject.dev/ops/nix-builder-autoscaler/internal/api"
	"guardianproject.dev/ops/nix-builder-autoscaler/internal/daemon"
	"guardianproject.dev/ops/nix-builder-autoscaler/internal/daemon/daemontest"
	"guardianproject.dev/ops/nix-builder-autoscaler/scaler"
)

// launchRecorder is a provider that notes when Launch is called and starts
// nothing, so a benchmark measures the daemon's path to the call, not a
// machine's boot.
type launchRecorder struct {
	mu     sync.Mutex
	n      atomic.Int64
	called chan time.Time
}

func (p *launchRecorder) Launch(ctx context.Context, req scaler.LaunchRequest) (scaler.Instance, error) {
	at := time.Now()
	select {
	case p.called <- at:
	default:
	}
	return scaler.Instance{ID: fmt.Sprintf("bench-%d", p.n.Add(1)), Pool: req.Pool, Slot: req.Slot, LaunchID: req.LaunchID,
		State: scaler.InstancePending}, nil
}

func (p *launchRecorder) Terminate(ctx context.Context, id string) error { return nil }

func (p *launchRecorder) List(ctx context.Context) ([]scaler.Instance, error) { return nil, nil }

func benchDaemon(b *testing.B, pool string, prov scaler.Provider) *daemontest.Harness {
	b.Helper()
	return daemontest.Start(b, daemontest.Config(b, pool), func(o *daemon.Options) {
		o.Providers = map[string]scaler.Provider{"x86": prov}
		o.Clock = clock.Real{}
		o.KickBatch = 0 // the product's batch window, on the real clock
		// Logging every request would measure the terminal.
		o.Logger = slog.New(slog.NewTextHandler(io.Discard, nil))
	})
}

// BenchmarkReservationToLaunch measures the time from POST /v1/reservations
// (no capacity) to the provider's Launch call; it reports p50 and p99.
func BenchmarkReservationToLaunch(b *testing.B) {
	prov := &launchRecorder{called: make(chan time.Time, 1)}
	h := benchDaemon(b, "max_builders = 1", prov)
	d, c := h.Daemon, h.Client
	ctx := context.Background()
	key := scaler.SlotKey{Pool: "x86", Slot: "slot1"}
	var lat []time.Duration
	i := 0
	for b.Loop() {
		i++
		start := time.Now()
		if _, _, err := c.CreateReservation(ctx, api.CreateReservationRequest{ID: fmt.Sprintf("r%d", i), System: "x86_64-linux"}); err != nil {
			b.Fatal(err)
		}
		select {
		case at := <-prov.called:
			lat = append(lat, at.Sub(start))
		case <-time.After(10 * time.Second):
			b.Fatal("no launch within 10s")
		}
		// Reset for the next round: release, and free the slot as if the
		// instance had been terminated.
		b.StopTimer()
		if _, err := c.Release(ctx, fmt.Sprintf("r%d", i)); err != nil {
			b.Fatal(err)
		}
		for {
			s, err := d.Store().Slot(ctx, key)
			if err != nil {
				b.Fatal(err)
			}
			if s.InstanceID == "" {
				continue // the launch is still being recorded
			}
			s = scaler.Slot{Pool: s.Pool, Name: s.Name, State: scaler.Empty, StateSince: time.Now(), Weight: s.Weight, Version: s.Version}
			if err := d.Store().Commit(ctx, scaler.Change{Slots: []scaler.Slot{s}}); err == nil {
				break
			}
		}
		b.StartTimer()
	}
	slices.Sort(lat)
	pct := func(p float64) float64 {
		return float64(lat[min(len(lat)-1, int(p*float64(len(lat))))].Microseconds()) / 1000
	}
	b.ReportMetric(pct(0.50), "p50-ms")
	b.ReportMetric(pct(0.99), "p99-ms")
	b.ReportMetric(float64(lat[len(lat)-1].Microseconds())/1000, "max-ms")
}

// BenchmarkCreateRelease measures reservation create + release over the
// unix socket, each a durable SQLite commit, one client at a time.
func BenchmarkCreateRelease(b *testing.B) {
	c := benchDaemon(b, "max_builders = 1", &launchRecorder{called: make(chan time.Time, 1)}).Client
	ctx := context.Background()
	i := 0
	start := time.Now()
	for b.Loop() {
		i++
		id := fmt.Sprintf("cr%d", i)
		if _, _, err := c.CreateReservation(ctx, api.CreateReservationRequest{ID: id, System: "x86_64-linux"}); err != nil {
			b.Fatal(err)
		}
		if _, err := c.Release(ctx, id); err != nil {
			b.Fatal(err)
		}
	}
	b.ReportMetric(float64(i)/time.Since(start).Seconds(), "pairs/s")
}

// BenchmarkCreateReleaseParallel is BenchmarkCreateRelease with several
// clients at once, as when many builds start together.
func BenchmarkCreateReleaseParallel(b *testing.B) {
	c := benchDaemon(b, "max_builders = 1", &launchRecorder{called: make(chan time.Time, 1)}).Client
	ctx := context.Background()
	var n atomic.Int64
	b.SetParallelism(4)
	start := time.Now()
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			id := fmt.Sprintf("p%d", n.Add(1))
			if _, _, err := c.CreateReservation(ctx, api.CreateReservationRequest{ID: id, System: "x86_64-linux"}); err != nil {
				b.Error(err)
				return
			}
			if _, err := c.Release(ctx, id); err != nil {
				b.Error(err)
				return
			}
		}
	})
	b.ReportMetric(float64(n.Load())/time.Since(start).Seconds(), "pairs/s")
}
