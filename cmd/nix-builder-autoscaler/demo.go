package main

import (
	"context"
	_ "embed"
	"fmt"
	"io"
	"os"
	"strings"
	"time"

	"github.com/spf13/pflag"

	"guardianproject.dev/ops/nix-builder-autoscaler/internal/api"
	"guardianproject.dev/ops/nix-builder-autoscaler/internal/config"
	"guardianproject.dev/ops/nix-builder-autoscaler/internal/daemon"
	"guardianproject.dev/ops/nix-builder-autoscaler/scaler/local"
)

// demoConfig is the embedded default the demo runs on; STATE is replaced by
// a fresh temporary directory.
//
//go:embed demo.toml
var demoConfig string

func demo(args []string, stdout, stderr io.Writer) int {
	fs := pflag.NewFlagSet("demo", pflag.ContinueOnError)
	fs.SetOutput(stderr)
	once := fs.Bool("once", false, "exit after the walk-through instead of serving until Ctrl-C")
	dir := fs.String("state-dir", "", "state directory (default: a new temporary directory)")
	verbose := fs.BoolP("verbose", "v", false, "show the daemon's log")
	if err := fs.Parse(args); err != nil {
		return 2
	}
	if *dir == "" {
		d, err := os.MkdirTemp("", "nba-demo-")
		if err != nil {
			fmt.Fprintf(stderr, "demo: %v\n", err)
			return 1
		}
		*dir = d
		if *once {
			defer os.RemoveAll(d)
		}
	}
	cfg, err := config.Parse([]byte(strings.ReplaceAll(demoConfig, "STATE", *dir)))
	if err != nil {
		fmt.Fprintf(stderr, "demo: embedded config: %v\n", err)
		return 1
	}
	logw := io.Discard
	if *verbose {
		logw = stderr
	}
	ctx, stop := signalContext()
	defer stop()
	d, err := daemon.New(ctx, cfg, daemon.Options{Logger: newLogger(cfg.Daemon, logw)})
	if err != nil {
		fmt.Fprintf(stderr, "demo: %v\n", err)
		return 1
	}
	runCtx, cancel := context.WithCancel(ctx)
	done := make(chan error, 1)
	go func() { done <- d.Run(runCtx) }()
	defer func() {
		cancel()
		<-done
		// The demo owns its builders: stop them so nothing outlives it.
		stopDemoBuilders(d)
	}()
	select {
	case <-d.Ready():
	case err := <-done:
		fmt.Fprintf(stderr, "demo: %v\n", err)
		return 1
	}
	say := func(format string, a ...any) { fmt.Fprintf(stdout, format+"\n", a...) }
	sock := cfg.Daemon.Socket
	say("nix-builder-autoscaler demo: daemon up (state in %s)", *dir)
	say("  in another shell:  go run ./cmd/autoscalerctl --socket %s slots", sock)
	c := api.NewUnixClient(sock)
	if err := walkThrough(ctx, c, cfg, say); err != nil {
		fmt.Fprintf(stderr, "demo: %v\n", err)
		return 1
	}
	if *once {
		return 0
	}
	say("the daemon keeps serving; reserve by hand with:")
	say("  go run ./cmd/autoscalerctl --socket %s reserve --system x86_64-linux --wait", sock)
	say("Ctrl-C stops it (and the demo's builders)")
	<-ctx.Done()
	return 0
}

// walkThrough takes one reservation from nothing to a ready builder, opens a
// connection to it, releases it and watches the builder drain away.
func walkThrough(ctx context.Context, c *api.Client, cfg *config.Config, say func(string, ...any)) error {
	start := time.Now()
	elapsed := func() string { return fmt.Sprintf("[%5.1fs]", time.Since(start).Seconds()) }
	r, _, err := c.CreateReservation(ctx, api.CreateReservationRequest{System: "x86_64-linux", Owner: "demo", Lease: "5m"})
	if err != nil {
		return err
	}
	say("%s reservation %s created: %s (no builder yet, so one is launched)", elapsed(), r.ID, r.State)
	seen := 0
	showEvents := func() error {
		evs, err := c.Events(ctx, api.EventQuery{Limit: 1000})
		if err != nil {
			return err
		}
		for _, e := range evs.Events[min(seen, len(evs.Events)):] {
			what := strings.TrimSpace(strings.Join([]string{e.Pool + "/" + e.Slot, e.InstanceID, e.ReservationID, e.Reason}, " "))
			say("%s   event %-10s %s", elapsed(), e.Kind, what)
		}
		seen = len(evs.Events)
		return nil
	}
	for r.State == "pending" {
		if r, err = c.Reservation(ctx, r.ID, time.Second); err != nil {
			return err
		}
		if err := showEvents(); err != nil {
			return err
		}
	}
	if r.State != "ready" {
		return fmt.Errorf("reservation ended %s: %s", r.State, r.Reason)
	}
	say("%s reservation ready on %s/%s at %s after %.1fs", elapsed(), r.Pool, r.Slot, r.Address, r.WaitSeconds)
	banner, err := local.ReadBanner(ctx, r.Address, 5*time.Second)
	if err != nil {
		return fmt.Errorf("builder banner: %w", err)
	}
	say("%s connected to the builder: %q", elapsed(), banner)
	if _, err := c.Release(ctx, r.ID); err != nil {
		return err
	}
	say("%s released; the builder drains after idle_timeout %s", elapsed(), cfg.Pools[0].IdleTimeout)
	deadline := time.Now().Add(cfg.Pools[0].IdleTimeout.D() + time.Minute)
	for time.Now().Before(deadline) {
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(time.Second):
		}
		if err := showEvents(); err != nil {
			return err
		}
		slots, err := c.Slots(ctx)
		if err != nil {
			return err
		}
		allEmpty := true
		for _, s := range slots.Slots {
			allEmpty = allEmpty && s.State == "empty"
		}
		if allEmpty {
			say("%s every slot is empty again: no builder, no cost", elapsed())
			return nil
		}
	}
	return fmt.Errorf("builder did not drain within idle_timeout + 1m")
}

// stopDemoBuilders terminates whatever builders the demo left running.
func stopDemoBuilders(d *daemon.Daemon) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := d.TerminateAll(ctx); err != nil {
		fmt.Fprintf(os.Stderr, "demo: stopping builders: %v\n", err)
	}
}
