// Package daemontest starts the daemon in-process for tests: a short
// temporary directory for the unix socket, a configuration with one local
// pool, a manual clock, and the test binary itself as the local stand-in
// builder. A package that uses it makes its TestMain
//
//	func TestMain(m *testing.M) {
//		daemontest.MaybeRunBuilder()
//		os.Exit(m.Run())
//	}
package daemontest

import (
	"context"
	"log/slog"
	"os"
	"sync"
	"testing"
	"time"

	"guardianproject.dev/ops/nix-builder-autoscaler/clock/clocktest"
	"guardianproject.dev/ops/nix-builder-autoscaler/internal/api"
	"guardianproject.dev/ops/nix-builder-autoscaler/internal/config"
	"guardianproject.dev/ops/nix-builder-autoscaler/internal/daemon"
	"guardianproject.dev/ops/nix-builder-autoscaler/internal/syncbuf"
	"guardianproject.dev/ops/nix-builder-autoscaler/internal/testwait"
	"guardianproject.dev/ops/nix-builder-autoscaler/scaler/local"
)

// EnvBuilder, set to "1", makes the test binary run as a local stand-in
// builder (see MaybeRunBuilder). Start passes it to the builders it launches.
const EnvBuilder = "NBA_DAEMONTEST_BUILDER"

// T0 is where the harness's manual clock starts.
var T0 = time.Date(2026, 11, 26, 12, 0, 0, 0, time.UTC)

// MaybeRunBuilder runs the local stand-in builder and exits when this
// process was started as one (EnvBuilder is "1"); otherwise it returns.
// Call it first in TestMain.
func MaybeRunBuilder() {
	if os.Getenv(EnvBuilder) == "1" {
		os.Exit(local.BuilderMain(os.Args[1:]))
	}
}

// ShortDir is a temporary directory, removed when the test ends, with a path
// short enough for a unix socket (tb.TempDir can exceed the 108-byte limit).
func ShortDir(tb testing.TB) string {
	tb.Helper()
	dir, err := os.MkdirTemp("", "nba")
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { os.RemoveAll(dir) })
	return dir
}

// Config parses a configuration whose socket and state are in a new
// ShortDir, with one local pool "x86" for x86_64-linux; pool is more TOML
// for that pool (its keys, then tables such as [pool.local]).
func Config(tb testing.TB, pool string) *config.Config {
	tb.Helper()
	return ConfigWithDaemon(tb, "", pool)
}

// ConfigWithDaemon is Config with daemon as more TOML keys for [daemon].
func ConfigWithDaemon(tb testing.TB, daemon, pool string) *config.Config {
	tb.Helper()
	return ConfigProvider(tb, "local", daemon, pool)
}

// Option changes the daemon.Options Start would use: by default a manual
// clock at T0, a logger into a buffer shown when the test fails, and the
// test binary (with EnvBuilder) as the local stand-in builder.
type Option func(*daemon.Options)

// Harness is a daemon running in-process.
type Harness struct {
	Daemon *daemon.Daemon
	// Clock is the daemon's manual clock; nil if an Option replaced it.
	Clock *clocktest.Clock
	// Client talks to the daemon over its unix socket.
	Client *api.Client
	Socket string

	tb   testing.TB
	stop func()
}

// Start runs the daemon for cfg until the test ends, and returns once it
// accepts connections. When the test ends the daemon is stopped, every
// builder it started is terminated, and, if the test failed, its log is
// shown.
func Start(tb testing.TB, cfg *config.Config, opts ...Option) *Harness {
	tb.Helper()
	logs := &syncbuf.Buffer{}
	logger := slog.New(slog.NewTextHandler(logs, nil))
	clock := clocktest.New(T0)
	o := daemon.Options{
		Clock:          clock,
		Logger:         logger,
		BuilderCommand: []string{os.Args[0]},
		BuilderEnv:     []string{EnvBuilder + "=1"},
		// Nothing advances the manual clock by the batch window.
		KickBatch: -1,
	}
	for _, opt := range opts {
		opt(&o)
	}
	h := &Harness{Client: api.NewUnixClient(cfg.Daemon.Socket), Socket: cfg.Daemon.Socket, tb: tb}
	if o.Clock == clock {
		h.Clock = clock
	}

	ctx, cancel := context.WithCancel(context.Background())
	d, err := daemon.New(ctx, cfg, o)
	if err != nil {
		cancel()
		tb.Fatal(err)
	}
	h.Daemon = d
	done := make(chan error, 1)
	go func() { done <- d.Run(ctx) }()

	var once sync.Once
	h.stop = func() {
		once.Do(func() {
			cancel()
			select {
			case err := <-done:
				if err != nil {
					tb.Errorf("daemon Run: %v", err)
				}
			case <-time.After(testwait.Bound):
				tb.Errorf("daemon Run did not return within %v of its context ending", testwait.Bound)
			}
		})
	}
	tb.Cleanup(func() {
		h.stop()
		tctx, tcancel := context.WithTimeout(context.Background(), testwait.Bound)
		defer tcancel()
		if err := d.TerminateAll(tctx); err != nil {
			tb.Errorf("terminate builders: %v", err)
		}
		if tb.Failed() && o.Logger == logger {
			tb.Logf("daemon log:\n%s", logs.String())
		}
	})

	select {
	case <-d.Ready():
	case err := <-done:
		done <- err // for the cleanup's stop
		tb.Fatalf("daemon did not start: %v", err)
	case <-time.After(testwait.Bound):
		tb.Fatalf("daemon not ready within %v", testwait.Bound)
	}
	return h
}

// Stop stops the daemon (it is idempotent); the builders keep running until
// the test ends.
func (h *Harness) Stop() { h.stop() }

// WaitFor polls cond until it holds (testwait.Until: the bound is a hang
// guard, not a timing assertion).
func (h *Harness) WaitFor(what string, cond func() bool) {
	h.tb.Helper()
	testwait.Until(h.tb, what, cond)
}
