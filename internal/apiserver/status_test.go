package apiserver

import (
	"encoding/json"
	"strings"
	"testing"
	"time"

	"guardianproject.dev/ops/nix-builder-autoscaler/scaler"
)

// TestReconcilePhasesOnTheWire: the status's reconcile section carries the
// round's phases in seconds, under the names docs/cli.md gives them.
func TestReconcilePhasesOnTheWire(t *testing.T) {
	ms := time.Millisecond
	st := scaler.RoundStatus{At: time.Date(2026, 12, 1, 12, 0, 0, 0, time.UTC), Duration: 20 * ms, Rounds: 7,
		Phases: scaler.RoundPhases{Observe: 9 * ms, Store: ms, List: 9 * ms, Servers: 4 * ms, Plan: 2 * ms, Apply: 5 * ms, Publish: 3 * ms, Push: ms}}
	b, err := json.Marshal(reconcileView(st))
	if err != nil {
		t.Fatal(err)
	}
	want := `"phases_seconds":{"observe":0.009,"store":0.001,"list":0.009,"servers":0.004,"plan":0.002,"apply":0.005,"publish":0.003,"push":0.001}`
	if !strings.Contains(string(b), want) {
		t.Errorf("reconcile status = %s\nwant it to hold %s", b, want)
	}
}
