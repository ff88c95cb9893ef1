package daemon_test

import (
	"testing"
	"time"

	"guardianproject.dev/ops/nix-builder-autoscaler/clock/clocktest"
	"guardianproject.dev/ops/nix-builder-autoscaler/internal/api"
	"guardianproject.dev/ops/nix-builder-autoscaler/internal/daemon/daemontest"
	"guardianproject.dev/ops/nix-builder-autoscaler/scaler"
	"guardianproject.dev/ops/nix-builder-autoscaler/scaler/ec2/ec2test"
)

// TestEC2InterruptionWarningDrainsAndReplaces: EC2 marks the Spot builder
// holding a reservation and a session for termination (its two-minute
// warning, found by the round's DescribeSpotInstanceRequests). The round
// that sees it drains the slot and launches the replacement; the
// reservation moves to the replacement once it is ready; the warned
// builder is not terminated while its session is open, and is once it
// closes.
func TestEC2InterruptionWarningDrainsAndReplaces(t *testing.T) {
	fake := ec2test.New()
	fake.Zones = map[string]string{ec2SubnetA: "us-east-1a", ec2SubnetB: "us-east-1b"}
	clock := clocktest.New(daemontest.T0)
	fake.Now = clock.Now
	d := startEC2(t, ec2Config(t, []string{ec2SubnetA, ec2SubnetB}, "ami-0123456789abcdef0", "", ""),
		clock, daemontest.NewReachable(), fake)
	slot2 := scaler.SlotKey{Pool: "x86", Slot: "slot2"}

	d.create("build-1")
	first := d.waitReady("build-1").InstanceID
	d.reach.SetSessions(ec2Slot1, 1)
	clock.Advance(10 * time.Second)
	fake.MarkForTermination(first)
	d.reconcile()

	if s := d.apiSlot(ec2Slot1); s.State != "draining" || s.InstanceID != first {
		t.Errorf("slot1 after the warning's round = %+v; want draining on %s (the agent says drain)", s, first)
	}
	if s := d.slot(ec2Slot1); s.DrainReason != scaler.DrainInterrupted {
		t.Errorf("slot1 drain reason = %q, want %q", s.DrainReason, scaler.DrainInterrupted)
	}
	if n := fake.CallCount(ec2test.OpRun); n != 2 {
		t.Errorf("RunInstances calls after the warning's round = %d, want 2 (the replacement launched in the same round)", n)
	}
	notices := eventsOf(d.events(api.EventQuery{Pool: "x86", Slot: "slot1"}), scaler.EvNotice)
	if want := "interruption warning, reclaimed at " + clock.Now().Add(2*time.Minute).UTC().Format(time.RFC3339); len(notices) != 1 ||
		notices[0].InstanceID != first || notices[0].Reason != want {
		t.Errorf("notice events = %+v, want one for %s: %q", notices, first, want)
	}
	if n := d.metric("nix_builder_autoscaler_interruption_notices_total", map[string]string{"pool": "x86", "kind": "interruption"}); n != 1 {
		t.Errorf("interruption_notices_total{pool=x86,kind=interruption} = %v, want 1", n)
	}

	var r api.Reservation
	d.WaitFor("build-1 moved to the replacement on slot2", func() bool {
		r = d.reservation("build-1")
		return r.State == "ready" && r.Slot == "slot2"
	})
	if r.InstanceID == first || d.slot(slot2).State != scaler.Ready {
		t.Errorf("build-1 = %+v, slot2 %s; want ready on the replacement", r, d.slot(slot2).State)
	}
	if got, want := eventKinds(d.events(api.EventQuery{Reservation: "build-1"})), "created assigned requeued assigned"; got != want {
		t.Errorf("build-1 events = %q, want %q", got, want)
	}

	// The session stays open: the warned builder is not terminated, however
	// many rounds pass.
	for range 3 {
		clock.Advance(20 * time.Second)
		d.reconcile()
	}
	if n := fake.CallCount(ec2test.OpTerminate); n != 0 {
		t.Errorf("TerminateInstances calls with a session open = %d, want none", n)
	}
	if s := d.slot(ec2Slot1); s.State != scaler.Draining {
		t.Errorf("slot1 with a session open = %s, want still draining", s.State)
	}

	d.reach.SetSessions(ec2Slot1, 0)
	d.reconcile()
	d.WaitFor("the warned builder terminated once its session closed", func() bool {
		return fake.CallCount(ec2test.OpTerminate) == 1
	})
	if s := d.slot(slot2); s.State != scaler.Ready || s.InstanceID != r.InstanceID {
		t.Errorf("slot2 = %s on %s, want the replacement still ready", s.State, s.InstanceID)
	}
}
