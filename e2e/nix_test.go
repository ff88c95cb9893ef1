package e2e

import (
	"context"
	"fmt"
	"path/filepath"
	"testing"
	"time"

	"guardianproject.dev/ops/nix-builder-autoscaler/e2e/nixbuilder"
	"guardianproject.dev/ops/nix-builder-autoscaler/internal/api"
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
	s := startStack(t, pool, "60s")
	stateDir := filepath.Join(s.cfg.Daemon.StateDir, "local")
	env.TrackStateDir(stateDir)

	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	res, err := env.BuildWith(ctx, s.frontend, nixbuilder.BuildOptions{Sleep: 5 * time.Second})
	if err != nil {
		t.Fatalf("nix-build through HAProxy: %v\n%s", err, res.Output)
	}
	built := time.Now()
	t.Logf("built %v in %s through %s", res.OutPaths, res.Duration.Round(time.Millisecond), s.frontend)

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
		if e.Kind == scaler.EvDrained || e.Kind == scaler.EvTerminated {
			t.Fatalf("slot1 %s at %s while the build (5s, idle_timeout 3s) held its session", e.Kind, e.At)
		}
	}
	if instance == "" {
		t.Fatalf("no builder was launched on slot1; events: %+v", evs())
	}
	waitFor(t, "the idle builder drained and terminated", func() bool {
		slots, err := s.h.Client.Slots(context.Background())
		return err == nil && slots.Slots[0].State == "empty"
	})
	for _, e := range evs() {
		if (e.Kind == scaler.EvDrained || e.Kind == scaler.EvTerminated) && e.At.Before(built.Add(-time.Second)) {
			t.Errorf("slot1 %s at %s, before the build ended at %s", e.Kind, e.At, built)
		}
	}
	if b, err := nixbuilder.ReadBuilder(stateDir, instance); err == nil {
		t.Errorf("builder %s still has its directory after termination: %+v", instance, b)
	}
}
