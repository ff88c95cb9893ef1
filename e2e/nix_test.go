package e2e

import (
	"context"
	"fmt"
	"path/filepath"
	"testing"
	"time"

	"guardianproject.dev/ops/nix-builder-autoscaler/e2e/nixbuilder"
	"guardianproject.dev/ops/nix-builder-autoscaler/internal/api"
	"guardianproject.dev/ops/nix-builder-autoscaler/internal/testwait"
	"guardianproject.dev/ops/nix-builder-autoscaler/scaler"
)

// TestNixBuildThroughHAProxy is the whole product on one machine: a real
// Nix client builds through the HAProxy frontend while the daemon scales
// from zero; the builder is a real sshd with a Nix store (in its own network
// namespace when possible), launched and terminated by the daemon through
// its launch and terminate commands. The build outlives idle_timeout, and
// the builder is drained only after the build's session closed.
func TestNixBuildThroughHAProxy(t *testing.T) {
	if err := nixbuilder.Check(); err != nil {
		t.Fatalf("nix builders cannot run here: %v (scripts/test installs nix-bin and openssh-server)", err)
	}
	env := nixbuilder.Setup(t)
	pool := fmt.Sprintf(`max_builders = 2
max_jobs = 4
idle_timeout = "3s"
[pool.local]
launch_command = '''%s'''
terminate_command = '''%s'''`, env.LaunchCommand(), env.TerminateCommand())
	s := startStack(t, pool, "2m") // a long hold: only a stuck launch runs it out
	stateDir := filepath.Join(s.cfg.Daemon.StateDir, "local")
	env.TrackStateDir(stateDir)

	ctx, cancel := context.WithTimeout(context.Background(), testwait.Bound) // a hang guard
	defer cancel()
	// Rounds run all through the build (the periodic ones are 10s apart,
	// and may all miss it): each one that sees the builder idle for 3s
	// would drain it, so the session must keep it busy.
	type built struct {
		res *nixbuilder.Result
		err error
	}
	done := make(chan built, 1)
	go func() {
		res, err := env.BuildWith(ctx, s.frontend, nixbuilder.BuildOptions{Sleep: 5 * time.Second, Stamp: true})
		done <- built{res, err}
	}()
	var b built
	testwait.Until(t, "nix-build to finish", func() bool {
		if _, err := s.h.Client.Reconcile(ctx); err != nil && ctx.Err() == nil {
			t.Errorf("reconcile during the build: %v", err)
		}
		select {
		case b = <-done:
			return true
		default:
			return false
		}
	})
	res, err := b.res, b.err
	if err != nil {
		t.Fatalf("nix-build through HAProxy: %v\n%s", err, res.Output)
	}
	t.Logf("built %v in %s through %s", res.OutPaths, res.Duration.Round(time.Millisecond), s.frontend)
	// When the build ended on the builder, by the machine's clock, which
	// the daemon's events use too: its session was open until then, so no
	// drain or termination may come before. (An order of two moments, not
	// a duration: a slow machine only moves the drain later.)
	if len(res.Spans) != 1 {
		t.Fatalf("stamped build: %d spans, want 1", len(res.Spans))
	}
	buildEnd := res.Spans[0].End

	evs := func() []api.Event {
		list, err := s.h.Client.Events(context.Background(), api.EventQuery{Slot: "slot1", Limit: 100})
		if err != nil {
			t.Fatal(err)
		}
		return list.Events
	}
	var instance string
	for _, e := range evs() {
		if e.Kind == scaler.EvLaunched {
			instance = e.InstanceID
		}
	}
	if instance == "" {
		t.Fatalf("no builder was launched on slot1; events: %+v", evs())
	}
	testwait.Until(t, "the idle builder drained and terminated", func() bool {
		slots, err := s.h.Client.Slots(context.Background())
		return err == nil && slots.Slots[0].State == "empty"
	})
	var drained, terminated bool
	for _, e := range evs() {
		if e.Kind != scaler.EvDrained && e.Kind != scaler.EvTerminated {
			continue
		}
		drained = drained || e.Kind == scaler.EvDrained
		terminated = terminated || e.Kind == scaler.EvTerminated
		if e.At.Before(buildEnd) {
			t.Errorf("slot1 %s at %s, while the build (5s, idle_timeout 3s) held its session: it ended at %s", e.Kind, e.At, buildEnd)
		}
	}
	if !drained || !terminated {
		t.Errorf("slot1 emptied; drained %v, terminated %v, want both (the idle builder %s drained, then terminated); events: %+v", drained, terminated, instance, evs())
	}
	if b, err := nixbuilder.ReadBuilder(stateDir, instance); err == nil {
		t.Errorf("builder %s still has its directory after termination: %+v", instance, b)
	}
}
