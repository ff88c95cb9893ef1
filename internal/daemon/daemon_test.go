package daemon

import (
	"bufio"
	"context"
	"fmt"
	"net"
	"os"
	"strings"
	"testing"
	"time"

	"guardianproject.dev/ops/nix-builder-autoscaler/internal/api"
	"guardianproject.dev/ops/nix-builder-autoscaler/internal/config"
	"guardianproject.dev/ops/nix-builder-autoscaler/scaler"
	"guardianproject.dev/ops/nix-builder-autoscaler/scaler/local"
	"guardianproject.dev/ops/nix-builder-autoscaler/scaler/scalertest"
)

const envBuilder = "NBA_DAEMON_TEST_BUILDER"

// TestMain lets the test binary double as the local stand-in builder.
func TestMain(m *testing.M) {
	if os.Getenv(envBuilder) == "1" {
		os.Exit(local.BuilderMain(os.Args[1:]))
	}
	os.Exit(m.Run())
}

var t0 = time.Date(2026, 11, 26, 12, 0, 0, 0, time.UTC)

// shortDir is a temporary directory with a path short enough for a unix
// socket (t.TempDir can exceed the 108-byte limit).
func shortDir(t *testing.T) string {
	t.Helper()
	dir, err := os.MkdirTemp("", "nba")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	return dir
}

func testConfig(t *testing.T, pool string) *config.Config {
	t.Helper()
	dir := shortDir(t)
	text := fmt.Sprintf(`
[daemon]
socket = "%[1]s/d.sock"
state_dir = "%[1]s/state"
metrics_listen = ""
reconcile_interval = "10s"

[[pool]]
name = "x86"
systems = ["x86_64-linux"]
provider = "local"
%[2]s
`, dir, pool)
	cfg, err := config.Parse([]byte(text))
	if err != nil {
		t.Fatalf("config: %v", err)
	}
	return cfg
}

type harness struct {
	t     *testing.T
	d     *Daemon
	clock *scalertest.Clock
	c     *api.Client
}

func start(t *testing.T, cfg *config.Config) *harness {
	t.Helper()
	clock := scalertest.NewClock(t0)
	ctx, cancel := context.WithCancel(context.Background())
	d, err := New(ctx, cfg, Options{Clock: clock, BuilderCommand: []string{os.Args[0]}, BuilderEnv: []string{envBuilder + "=1"}})
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- d.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("daemon Run: %v", err)
		}
		tctx, tcancel := context.WithTimeout(context.Background(), 20*time.Second)
		defer tcancel()
		if err := d.TerminateAll(tctx); err != nil {
			t.Errorf("terminate builders: %v", err)
		}
	})
	select {
	case <-d.Ready():
	case err := <-done:
		t.Fatalf("daemon did not start: %v", err)
	}
	return &harness{t: t, d: d, clock: clock, c: api.NewUnixClient(cfg.Daemon.Socket)}
}

// waitFor polls cond (bounded) until it holds; the bound only limits how
// long a broken build hangs, it is not a timing assertion.
func (h *harness) waitFor(what string, cond func() bool) {
	h.t.Helper()
	for i := 0; i < 3000; i++ {
		if cond() {
			return
		}
		time.Sleep(10 * time.Millisecond)
	}
	h.t.Fatalf("timed out waiting for %s", what)
}

func (h *harness) slot(name string) scaler.Slot {
	h.t.Helper()
	s, err := h.d.Store().Slot(context.Background(), scaler.SlotKey{Pool: "x86", Slot: name})
	if err != nil {
		h.t.Fatal(err)
	}
	return s
}

func (h *harness) slotState(name string) scaler.SlotState { return h.slot(name).State }

// reconcile runs one round and lets the chain of follow-up rounds settle.
func (h *harness) reconcile() {
	h.t.Helper()
	if err := h.d.Reconciler().Reconcile(context.Background()); err != nil {
		h.t.Fatalf("reconcile: %v", err)
	}
	if err := h.d.Reconciler().Reconcile(context.Background()); err != nil {
		h.t.Fatalf("reconcile: %v", err)
	}
}

func banner(t *testing.T, addr string) string {
	t.Helper()
	conn, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		t.Fatalf("dial builder %s: %v", addr, err)
	}
	defer conn.Close()
	_ = conn.SetDeadline(time.Now().Add(5 * time.Second))
	line, err := bufio.NewReader(conn).ReadString('\n')
	if err != nil {
		t.Fatalf("read banner from %s: %v", addr, err)
	}
	return strings.TrimSpace(line)
}

func TestReservationLaunchesAndIdleBuilderDrains(t *testing.T) {
	h := start(t, testConfig(t, `max_builders = 2
idle_timeout = "5m"`))
	ctx := context.Background()

	r, created, err := h.c.CreateReservation(ctx, api.CreateReservationRequest{ID: "build-1", System: "x86_64-linux", Owner: "test"})
	if err != nil || !created || r.State != "pending" {
		t.Fatalf("create = %+v, %v, %v; want a new pending reservation", r, created, err)
	}
	wctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	r, err = h.c.WaitReady(wctx, r.ID, 10*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	if r.State != "ready" || r.Slot != "slot1" || r.Address == "" || r.InstanceID == "" {
		t.Fatalf("reservation = %+v; want ready on slot1 with an address", r)
	}
	if got := banner(t, r.Address); !strings.HasPrefix(got, "SSH-2.0-") {
		t.Fatalf("builder banner = %q", got)
	}
	if st := h.slotState("slot2"); st != scaler.Empty {
		t.Fatalf("slot2 = %s; one reservation needs one builder", st)
	}

	if _, err := h.c.Release(ctx, r.ID); err != nil {
		t.Fatal(err)
	}
	h.clock.Advance(4 * time.Minute)
	h.reconcile()
	if st := h.slotState("slot1"); st != scaler.Ready {
		t.Fatalf("slot1 = %s before idle_timeout; want ready", st)
	}
	instance := h.slot("slot1").InstanceID
	h.clock.Advance(time.Minute)
	h.reconcile()
	h.waitFor("slot1 empty after idle drain", func() bool { return h.slotState("slot1") == scaler.Empty })

	evs, err := h.c.Events(ctx, api.EventQuery{Slot: "slot1", Limit: 100})
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
	ins, err := h.d.provs["x86"].List(ctx)
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
	h := start(t, testConfig(t, `max_builders = 2
min_builders = 1
idle_timeout = "5m"`))
	h.waitFor("min_builders builder ready", func() bool { return h.slotState("slot1") == scaler.Ready })
	h.clock.Advance(time.Hour)
	h.reconcile()
	if st := h.slotState("slot1"); st != scaler.Ready {
		t.Fatalf("slot1 = %s an hour idle with min_builders = 1; want ready", st)
	}
	if st := h.slotState("slot2"); st != scaler.Empty {
		t.Fatalf("slot2 = %s; want empty", st)
	}
}

func TestLeaseExpiryFreesCapacity(t *testing.T) {
	h := start(t, testConfig(t, `max_builders = 1`))
	ctx := context.Background()
	a, _, err := h.c.CreateReservation(ctx, api.CreateReservationRequest{ID: "a", System: "x86_64-linux", Lease: "2m"})
	if err != nil {
		t.Fatal(err)
	}
	wctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	if a, err = h.c.WaitReady(wctx, a.ID, 10*time.Second); err != nil || a.State != "ready" {
		t.Fatalf("a = %+v, %v", a, err)
	}
	b, _, err := h.c.CreateReservation(ctx, api.CreateReservationRequest{ID: "b", System: "x86_64-linux", Lease: "10m"})
	if err != nil {
		t.Fatal(err)
	}
	h.reconcile()
	if b, _ = h.c.Reservation(ctx, "b", 0); b.State != "pending" {
		t.Fatalf("b = %s while a holds the only builder; want pending", b.State)
	}
	// a's build died without releasing: after its lease, b gets the builder.
	h.clock.Advance(2 * time.Minute)
	h.reconcile()
	if a, _ = h.c.Reservation(ctx, "a", 0); a.State != "expired" {
		t.Fatalf("a = %s after its lease; want expired", a.State)
	}
	if b, err = h.c.WaitReady(wctx, "b", 10*time.Second); err != nil || b.State != "ready" || b.Slot != "slot1" {
		t.Fatalf("b = %+v, %v; want ready on slot1", b, err)
	}
}
