package e2e

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"guardianproject.dev/ops/nix-builder-autoscaler/internal/api"
	"guardianproject.dev/ops/nix-builder-autoscaler/internal/store"
	"guardianproject.dev/ops/nix-builder-autoscaler/internal/testwait"
	"guardianproject.dev/ops/nix-builder-autoscaler/scaler"
	"guardianproject.dev/ops/nix-builder-autoscaler/scaler/local"
)

// TestCrashWhileLaunching kills the daemon (SIGKILL) while a launch command
// is still running. The instance it leaves behind must be found again by its
// launch id and the acknowledged reservation must still be served.
func TestCrashWhileLaunching(t *testing.T) {
	dir := shortDir(t)
	hook := filepath.Join(dir, "hook")
	// The launch command takes a while, like RunInstances plus a slow API:
	// it goes on only once the test has created hook/go, after the kill, so
	// the kill always cuts it off. The builder it then starts outlives the
	// daemon, like an EC2 instance. (Both waits give up after 2 minutes, a
	// hang guard as in testwait.)
	launch := fmt.Sprintf(`mkdir -p %[1]s; touch %[1]s/{{.InstanceID}}.started
i=0; while [ ! -e %[1]s/go ] && [ $i -lt 2400 ]; do sleep 0.05; i=$((i+1)); done
setsid %[2]s local-builder --listen 127.0.0.1:0 --addr-file %[1]s/{{.InstanceID}}.addr --marker {{.InstanceID}} </dev/null >/dev/null 2>&1 &
echo $! > %[1]s/{{.InstanceID}}.pid
i=0; while [ ! -s %[1]s/{{.InstanceID}}.addr ] && [ $i -lt 2400 ]; do sleep 0.05; i=$((i+1)); done
cat %[1]s/{{.InstanceID}}.addr`, hook, binary)
	// Find the builder by its command line, not only by the pid file: a
	// launch cut off between starting the builder and writing the file
	// must not leak it.
	terminate := fmt.Sprintf(`kill $(cat %[1]s/{{.InstanceID}}.pid) 2>/dev/null; pkill -f -- '--marker {{.InstanceID}}'; true`, hook)
	cfg := writeConfig(t, dir, fmt.Sprintf(`max_builders = 2
boot_timeout = "3s"
[pool.local]
launch_command = '''%s'''
terminate_command = '''%s'''`, launch, terminate))

	d := startDaemon(t, cfg, dir)
	c := api.NewUnixClient(filepath.Join(dir, "d.sock"))
	ctx := context.Background()
	r, _, err := c.CreateReservation(ctx, api.CreateReservationRequest{ID: "acked-1", System: "x86_64-linux", Owner: "crash test"})
	if err != nil || r.State != "pending" {
		t.Fatalf("create: %+v %v", r, err)
	}
	// Kill as soon as the launch command has started (the slot is launching).
	testwait.Until(t, "launch command started", func() bool {
		m, _ := filepath.Glob(filepath.Join(hook, "*.started"))
		return len(m) == 1
	})
	d.kill()
	db := openStore(t, dir)
	s, err := db.Slot(ctx, scaler.SlotKey{Pool: "x86", Slot: "slot1"})
	if err != nil || s.State != scaler.Launching || s.LaunchID == "" || s.InstanceID != "" {
		t.Fatalf("after kill slot1 = %+v (%v); want launching with a launch id and no instance yet", s, err)
	}
	db.Close()
	// The cut-off launch command goes on, with no daemon to hear from it;
	// the launches after the restart do not wait.
	if err := os.WriteFile(filepath.Join(hook, "go"), nil, 0o600); err != nil {
		t.Fatal(err)
	}

	d = startDaemon(t, cfg, dir)
	rctx, cancel := context.WithTimeout(ctx, testwait.Bound) // a hang guard
	defer cancel()
	r, err = c.WaitReady(rctx, "acked-1", 10*time.Second)
	if err != nil || r.State != "ready" {
		t.Fatalf("acknowledged reservation after restart = %+v, %v; want ready", r, err)
	}
	// The half-launched instance was adopted (its launch id) and, never
	// having produced an address, was terminated at boot_timeout; no builder
	// process is left that no slot owns.
	evs, err := c.Events(ctx, api.EventQuery{Limit: 1000})
	if err != nil {
		t.Fatal(err)
	}
	var adopted string
	for _, e := range evs.Events {
		if e.Kind == scaler.EvAdopted {
			adopted = e.InstanceID
		}
	}
	if adopted == "" {
		t.Errorf("no adoption event; events: %+v", evs.Events)
	}
	testwait.Until(t, "only the serving builder alive", func() bool { return len(aliveBuilders(t, hook)) == 1 })
	slots, err := c.Slots(ctx)
	if err != nil {
		t.Fatal(err)
	}
	assertConsistent(t, slots, r)
	d.stop(t)
}

// TestCrashWhileReady kills the daemon while a reservation holds a ready
// builder: after restart the same reservation is on the same builder, which
// kept running, and nothing was launched twice.
func TestCrashWhileReady(t *testing.T) {
	dir := shortDir(t)
	cfg := writeConfig(t, dir, "max_builders = 2")
	d := startDaemon(t, cfg, dir)
	c := api.NewUnixClient(filepath.Join(dir, "d.sock"))
	ctx, cancel := context.WithTimeout(context.Background(), testwait.Bound) // a hang guard
	defer cancel()
	if _, _, err := c.CreateReservation(ctx, api.CreateReservationRequest{ID: "acked-2", System: "x86_64-linux"}); err != nil {
		t.Fatal(err)
	}
	before, err := c.WaitReady(ctx, "acked-2", 10*time.Second)
	if err != nil || before.State != "ready" {
		t.Fatalf("reservation = %+v, %v", before, err)
	}
	d.kill()
	d = startDaemon(t, cfg, dir)
	if _, err := c.Reconcile(ctx); err != nil {
		t.Fatal(err)
	}
	after, err := c.Reservation(ctx, "acked-2", 0)
	if err != nil {
		t.Fatal(err)
	}
	if after.State != "ready" || after.Slot != before.Slot || after.InstanceID != before.InstanceID || after.Address != before.Address {
		t.Fatalf("after restart reservation = %+v; want it unchanged from %+v", after, before)
	}
	if got, err := local.ReadBanner(ctx, after.Address, testwait.Bound); err != nil || !strings.HasPrefix(got, "SSH-2.0-") {
		t.Fatalf("builder banner after restart = %q, %v", got, err)
	}
	evs, err := c.Events(ctx, api.EventQuery{Limit: 1000})
	if err != nil {
		t.Fatal(err)
	}
	launches := 0
	for _, e := range evs.Events {
		if e.Kind == scaler.EvLaunched {
			launches++
		}
	}
	if launches != 1 {
		t.Errorf("%d launches; the restart must take over the running builder, not launch another", launches)
	}
	slots, err := c.Slots(ctx)
	if err != nil {
		t.Fatal(err)
	}
	assertConsistent(t, slots, after)
	if _, err := c.Release(ctx, "acked-2"); err != nil {
		t.Fatal(err)
	}
	d.stop(t)
}

// assertConsistent checks that the reservation is on a ready slot holding
// its instance, and that no other slot claims it.
func assertConsistent(t *testing.T, slots api.SlotList, r api.Reservation) {
	t.Helper()
	holders := 0
	for _, s := range slots.Slots {
		if s.Reservations > 0 {
			holders++
			if s.Slot != r.Slot || s.State != "ready" || s.InstanceID != r.InstanceID {
				t.Errorf("slot %+v holds a reservation; want only %s (ready, %s)", s, r.Slot, r.InstanceID)
			}
		}
		if s.State != "empty" && s.State != "ready" {
			t.Errorf("slot %s is %s; want empty or ready", s.Slot, s.State)
		}
	}
	if holders != 1 {
		t.Errorf("%d slots hold reservations; want 1", holders)
	}
}

// aliveBuilders returns the pids of hook-started builders still running,
// found by their command line (their addr file is under hook).
func aliveBuilders(t *testing.T, hook string) []int {
	t.Helper()
	procs, _ := filepath.Glob("/proc/[0-9]*/cmdline")
	var alive []int
	for _, f := range procs {
		b, err := os.ReadFile(f)
		if err != nil || !strings.Contains(string(b), "local-builder") || !strings.Contains(string(b), hook+"/") {
			continue
		}
		pid, err := strconv.Atoi(filepath.Base(filepath.Dir(f)))
		if err == nil && !zombie(pid) {
			alive = append(alive, pid)
		}
	}
	return alive
}

func zombie(pid int) bool {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return true
	}
	s := string(b)
	i := strings.LastIndexByte(s, ')')
	return i < 0 || i+2 >= len(s) || s[i+2] == 'Z'
}

func openStore(t *testing.T, dir string) *store.DB {
	t.Helper()
	db, err := store.Open(context.Background(), filepath.Join(dir, "state", "state.db"))
	if err != nil {
		t.Fatal(err)
	}
	if err := db.IntegrityCheck(context.Background()); err != nil {
		t.Fatalf("database after kill -9: %v", err)
	}
	return db
}
