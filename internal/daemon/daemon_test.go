package daemon_test

import (
	"context"
	"os"
	"strings"
	"testing"
	"time"

	"guardianproject.dev/ops/nix-builder-autoscaler/internal/api"
	"guardianproject.dev/ops/nix-builder-autoscaler/internal/daemon/daemontest"
	"guardianproject.dev/ops/nix-builder-autoscaler/scaler"
	"guardianproject.dev/ops/nix-builder-autoscaler/scaler/local"
)

// TestMain lets the test binary double as the local stand-in builder.
func TestMain(m *testing.M) {
	daemontest.MaybeRunBuilder()
	os.Exit(m.Run())
}

// harness adds this package's helpers to the shared one.
type harness struct {
	*daemontest.Harness
	t *testing.T
}

// start runs the daemon with one local pool; pool is more TOML for it.
func start(t *testing.T, pool string) *harness {
	t.Helper()
	return &harness{Harness: daemontest.Start(t, daemontest.Config(t, pool)), t: t}
}

func (h *harness) slot(name string) scaler.Slot {
	h.t.Helper()
	s, err := h.Daemon.Store().Slot(context.Background(), scaler.SlotKey{Pool: "x86", Slot: name})
	if err != nil {
		h.t.Fatal(err)
	}
	return s
}

func (h *harness) slotState(name string) scaler.SlotState { return h.slot(name).State }

// reconcile runs one round and lets the chain of follow-up rounds settle.
func (h *harness) reconcile() {
	h.t.Helper()
	if err := h.Daemon.Reconciler().Reconcile(context.Background()); err != nil {
		h.t.Fatalf("reconcile: %v", err)
	}
	if err := h.Daemon.Reconciler().Reconcile(context.Background()); err != nil {
		h.t.Fatalf("reconcile: %v", err)
	}
}

func TestReservationLaunchesAndIdleBuilderDrains(t *testing.T) {
	h := start(t, `max_builders = 2
idle_timeout = "5m"`)
	ctx := context.Background()

	r, created, err := h.Client.CreateReservation(ctx, api.CreateReservationRequest{ID: "build-1", System: "x86_64-linux", Owner: "test"})
	if err != nil || !created || r.State != "pending" {
		t.Fatalf("create = %+v, %v, %v; want a new pending reservation", r, created, err)
	}
	wctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	r, err = h.Client.WaitReady(wctx, r.ID, 10*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	if r.State != "ready" || r.Slot != "slot1" || r.Address == "" || r.InstanceID == "" {
		t.Fatalf("reservation = %+v; want ready on slot1 with an address", r)
	}
	if got, err := local.ReadBanner(ctx, r.Address, 5*time.Second); err != nil || !strings.HasPrefix(got, "SSH-2.0-") {
		t.Fatalf("builder banner = %q, %v", got, err)
	}
	if st := h.slotState("slot2"); st != scaler.Empty {
		t.Fatalf("slot2 = %s; one reservation needs one builder", st)
	}

	if _, err := h.Client.Release(ctx, r.ID); err != nil {
		t.Fatal(err)
	}
	h.Clock.Advance(4 * time.Minute)
	h.reconcile()
	if st := h.slotState("slot1"); st != scaler.Ready {
		t.Fatalf("slot1 = %s before idle_timeout; want ready", st)
	}
	instance := h.slot("slot1").InstanceID
	h.Clock.Advance(time.Minute)
	h.reconcile()
	h.WaitFor("slot1 empty after idle drain", func() bool { return h.slotState("slot1") == scaler.Empty })

	evs, err := h.Client.Events(ctx, api.EventQuery{Slot: "slot1", Limit: 100})
	if err != nil {
		t.Fatal(err)
	}
	var kinds []string
	for _, e := range evs.Events {
		kinds = append(kinds, e.Kind)
	}
	want := "launched booted bound ready assigned released drained terminated emptied"
	if got := strings.Join(kinds, " "); got != want {
		t.Errorf("slot1 events = %q, want %q", got, want)
	}
	ins, err := h.Daemon.Provider("x86").List(ctx)
	if err != nil {
		t.Fatal(err)
	}
	for _, in := range ins {
		if in.ID == instance && in.State != scaler.InstanceTerminated {
			t.Errorf("instance %s is %s after drain; want terminated", in.ID, in.State)
		}
	}
}

func TestMinBuildersKeepsOneAlive(t *testing.T) {
	h := start(t, `max_builders = 2
min_builders = 1
idle_timeout = "5m"`)
	h.WaitFor("min_builders builder ready", func() bool { return h.slotState("slot1") == scaler.Ready })
	h.Clock.Advance(time.Hour)
	h.reconcile()
	if st := h.slotState("slot1"); st != scaler.Ready {
		t.Fatalf("slot1 = %s an hour idle with min_builders = 1; want ready", st)
	}
	if st := h.slotState("slot2"); st != scaler.Empty {
		t.Fatalf("slot2 = %s; want empty", st)
	}
}

func TestLeaseExpiryFreesCapacity(t *testing.T) {
	h := start(t, `max_builders = 1`)
	ctx := context.Background()
	a, _, err := h.Client.CreateReservation(ctx, api.CreateReservationRequest{ID: "a", System: "x86_64-linux", Lease: "2m"})
	if err != nil {
		t.Fatal(err)
	}
	wctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	if a, err = h.Client.WaitReady(wctx, a.ID, 10*time.Second); err != nil || a.State != "ready" {
		t.Fatalf("a = %+v, %v", a, err)
	}
	b, _, err := h.Client.CreateReservation(ctx, api.CreateReservationRequest{ID: "b", System: "x86_64-linux", Lease: "10m"})
	if err != nil {
		t.Fatal(err)
	}
	h.reconcile()
	if b, _ = h.Client.Reservation(ctx, "b", 0); b.State != "pending" {
		t.Fatalf("b = %s while a holds the only builder; want pending", b.State)
	}
	// a's build died without releasing: after its lease, b gets the builder.
	h.Clock.Advance(2 * time.Minute)
	h.reconcile()
	if a, _ = h.Client.Reservation(ctx, "a", 0); a.State != "expired" {
		t.Fatalf("a = %s after its lease; want expired", a.State)
	}
	if b, err = h.Client.WaitReady(wctx, "b", 10*time.Second); err != nil || b.State != "ready" || b.Slot != "slot1" {
		t.Fatalf("b = %+v, %v; want ready on slot1", b, err)
	}
}
