package main

// These tests run autoscalerctl against the real daemon, started in-process
// with a manual clock and local stand-in builders (this test binary, run
// again as one; see daemontest).

import (
	"bytes"
	"encoding/json"
	"net"
	"os"
	"path/filepath"
	"reflect"
	"slices"
	"strings"
	"testing"
	"time"

	"guardianproject.dev/ops/nix-builder-autoscaler/internal/api"
	"guardianproject.dev/ops/nix-builder-autoscaler/internal/daemon/daemontest"
)

// TestMain lets the test binary double as the local stand-in builder.
func TestMain(m *testing.M) {
	daemontest.MaybeRunBuilder()
	os.Exit(m.Run())
}

type daemonHarness struct {
	*daemontest.Harness
	t *testing.T
}

// startDaemon starts the daemon with one local pool of two builders. The
// daemon is stopped, and every builder it started terminated, when the test
// ends.
func startDaemon(t *testing.T) *daemonHarness {
	t.Helper()
	return &daemonHarness{Harness: daemontest.Start(t, daemontest.Config(t, "max_builders = 2")), t: t}
}

// ctl runs autoscalerctl in-process against the daemon's socket, with the
// NBA_* environment cleared (and runCLIGuarded's hang guard).
func (h *daemonHarness) ctl(args ...string) (code int, stdout, stderr string) {
	h.t.Helper()
	return ctlAt(h.t, h.Socket, args...)
}

func ctlAt(t *testing.T, sock string, args ...string) (code int, stdout, stderr string) {
	t.Helper()
	return runCLIGuarded(t, append([]string{"--socket", sock}, args...)...)
}

// ok runs a command that must succeed and returns its stdout, which must
// contain every one of want.
func (h *daemonHarness) ok(args []string, want ...string) string {
	h.t.Helper()
	code, stdout, stderr := h.ctl(args...)
	if code != exitOK {
		h.t.Fatalf("autoscalerctl %s: exit code %d, want 0; stderr:\n%s\nstdout:\n%s", strings.Join(args, " "), code, stderr, stdout)
	}
	for _, w := range want {
		if !strings.Contains(stdout, w) {
			h.t.Errorf("autoscalerctl %s: stdout does not contain %q:\n%s", strings.Join(args, " "), w, stdout)
		}
	}
	return stdout
}

// okJSON runs a command with --json that must succeed and decodes its
// stdout into out, strictly.
func (h *daemonHarness) okJSON(out any, args ...string) {
	h.t.Helper()
	args = append(slices.Clone(args), "--json")
	code, stdout, stderr := h.ctl(args...)
	if code != exitOK {
		h.t.Fatalf("autoscalerctl %s: exit code %d, want 0; stderr:\n%s\nstdout:\n%s", strings.Join(args, " "), code, stderr, stdout)
	}
	if stderr != "" {
		h.t.Errorf("autoscalerctl %s: stderr = %q, want nothing with --json", strings.Join(args, " "), stderr)
	}
	// Start from the zero value: fields left out of the answer (omitempty)
	// must not keep what an earlier command put there.
	reflect.ValueOf(out).Elem().SetZero()
	dec := json.NewDecoder(strings.NewReader(stdout))
	dec.DisallowUnknownFields()
	if err := dec.Decode(out); err != nil {
		h.t.Fatalf("autoscalerctl %s: stdout is not a %T: %v\n%s", strings.Join(args, " "), out, err, stdout)
	}
	if dec.More() {
		h.t.Errorf("autoscalerctl %s: more than one JSON value on stdout:\n%s", strings.Join(args, " "), stdout)
	}
}

func findSlot(t *testing.T, l api.SlotList, name string) api.Slot {
	t.Helper()
	for _, s := range l.Slots {
		if s.Pool == "x86" && s.Slot == name {
			return s
		}
	}
	t.Fatalf("no slot x86/%s in %+v", name, l.Slots)
	return api.Slot{}
}

// TestDaemonEveryCommand runs every command, as a table and with --json,
// through a reservation's life on the real daemon.
func TestDaemonEveryCommand(t *testing.T) {
	h := startDaemon(t)

	// health
	if out := h.ok([]string{"health"}); out != "ok\n" {
		t.Errorf("health: stdout = %q, want %q", out, "ok\n")
	}
	var health map[string]string
	h.okJSON(&health, "health")
	if health["status"] != "ok" {
		t.Errorf("health --json = %v, want status ok", health)
	}

	// status, before any reservation
	h.ok([]string{"status"}, "POOL", "x86", "x86_64-linux", "0..2", "empty=2", "reconcile:")
	var st api.Status
	h.okJSON(&st, "status")
	if len(st.Pools) != 1 || st.Pools[0].Name != "x86" || st.Pools[0].MaxBuilders != 2 || st.Pools[0].Slots["empty"] != 2 {
		t.Errorf("status --json pools = %+v, want x86 with 2 empty slots", st.Pools)
	}

	// slots
	h.ok([]string{"slots"}, "POOL", "SLOT", "slot1", "slot2", "empty", "100")
	var slots api.SlotList
	h.okJSON(&slots, "slots")
	if len(slots.Slots) != 2 {
		t.Fatalf("slots --json = %+v, want 2 slots", slots.Slots)
	}
	for _, s := range slots.Slots {
		if s.State != "empty" || s.Weight != 100 {
			t.Errorf("slot %s/%s = %s weight %d, want empty weight 100", s.Pool, s.Slot, s.State, s.Weight)
		}
	}

	// reservations, none yet
	h.ok([]string{"reservations"}, "no reservations")
	var rl api.ReservationList
	h.okJSON(&rl, "reservations", "--state", "pending,ready", "--pool", "x86", "--limit", "5")
	if rl.Reservations == nil || len(rl.Reservations) != 0 {
		t.Errorf("reservations --json = %#v, want an empty list", rl.Reservations)
	}

	// events: whatever the start logged, the output parses
	h.ok([]string{"events"})
	var evs api.EventList
	h.okJSON(&evs, "events", "--limit", "10")
	if evs.Events == nil {
		t.Errorf("events --json: events is null, want a list")
	}

	// reserve --wait: the local builder launches and the reservation is
	// assigned to it. The wait is longer than ctl's hang guard: the
	// builder's boot takes what it takes on a busy machine.
	code, out, stderr := h.ctl("reserve", "--system", "x86_64-linux", "--id", "cli-1", "--owner", "ctl-test", "--wait", "--wait-timeout", "10m")
	if code != exitOK {
		t.Fatalf("reserve --wait: exit code %d, want 0; stderr:\n%s\nstdout:\n%s", code, stderr, out)
	}
	if want := "reservation cli-1 created; waiting up to 10m0s for a slot...\n"; stderr != want {
		t.Errorf("reserve --wait: stderr = %q, want %q", stderr, want)
	}
	for _, want := range []string{"cli-1", "ready", "slot1", "x86_64-linux", "ctl-test", "address", "127.0.0.1:"} {
		if !strings.Contains(out, want) {
			t.Errorf("reserve --wait: stdout does not contain %q:\n%s", want, out)
		}
	}
	// Asking again with the same id gives the same reservation.
	var res api.Reservation
	h.okJSON(&res, "reserve", "--system", "x86_64-linux", "--id", "cli-1", "--owner", "ctl-test", "--wait", "--wait-timeout", "10m")
	if res.ID != "cli-1" || res.State != "ready" || res.Slot != "slot1" || res.Pool != "x86" || res.Address == "" || res.InstanceID == "" {
		t.Fatalf("reserve --json (again) = %+v, want cli-1 ready on x86/slot1 with address and instance", res)
	}
	instance, address := res.InstanceID, res.Address

	// reservations shows it, and the filters filter.
	h.ok([]string{"reservations", "--state", "ready", "--pool", "x86", "--limit", "5"}, "ID", "cli-1", "ready", "slot1", "ctl-test")
	h.ok([]string{"reservations", "--state", "pending"}, "no reservations")
	h.ok([]string{"reservations", "--pool", "arm"}, "no reservations")
	h.okJSON(&rl, "reservations", "--state", "pending,ready", "--pool", "x86", "--limit", "5")
	if len(rl.Reservations) != 1 || rl.Reservations[0].ID != "cli-1" || rl.Reservations[0].State != "ready" ||
		rl.Reservations[0].Address != address || rl.Reservations[0].InstanceID != instance {
		t.Errorf("reservations --json = %+v, want only cli-1 ready at %s (%s)", rl.Reservations, address, instance)
	}
	h.okJSON(&rl, "reservations", "--state", "released")
	if len(rl.Reservations) != 0 {
		t.Errorf("reservations --state released --json = %+v, want none", rl.Reservations)
	}

	// events of the launch and the assignment
	h.ok([]string{"events", "--slot", "x86/slot1", "--limit", "50"}, "KIND", "launched", "ready", "assigned", instance)
	h.okJSON(&evs, "events", "--reservation", "cli-1")
	var kinds []string
	for _, e := range evs.Events {
		if e.ReservationID != "cli-1" {
			t.Errorf("events --reservation cli-1 --json: event %+v is of another reservation", e)
		}
		kinds = append(kinds, e.Kind)
	}
	if !slices.Contains(kinds, "created") || !slices.Contains(kinds, "assigned") {
		t.Errorf("events of cli-1 = %q, want created and assigned", kinds)
	}
	h.okJSON(&evs, "events", "--pool", "x86", "--slot", "slot1", "--limit", "2")
	if len(evs.Events) != 2 {
		t.Errorf("events --limit 2 --json: %d events, want 2", len(evs.Events))
	}
	for _, e := range evs.Events {
		if e.Pool != "x86" || e.Slot != "slot1" {
			t.Errorf("events --slot slot1 --json: event %+v is of another slot", e)
		}
	}

	// status and slots count it.
	h.ok([]string{"status"}, "empty=1 ready=1", "ready=1")
	h.okJSON(&st, "status")
	if p := st.Pools[0]; p.Slots["ready"] != 1 || p.Slots["empty"] != 1 || p.Reservations["ready"] != 1 {
		t.Errorf("status --json pool = %+v, want 1 ready and 1 empty slot, 1 ready reservation", p)
	}
	if st.Reconcile.Rounds == 0 || st.Reconcile.LastAt.IsZero() {
		t.Errorf("status --json reconcile = %+v, want rounds run", st.Reconcile)
	}
	h.ok([]string{"slots"}, "slot1", "ready", instance, address)
	h.okJSON(&slots, "slots")
	if s := findSlot(t, slots, "slot1"); s.State != "ready" || s.Reservations != 1 || s.InstanceID != instance || s.Address != address {
		t.Errorf("slots --json slot1 = %+v, want ready with 1 reservation on %s at %s", s, instance, address)
	}

	// drain and undrain the slot holding cli-1, as a table and as JSON.
	h.ok([]string{"drain", "x86/slot1"}, "slot1", "draining", "operator", instance)
	h.ok([]string{"undrain", "x86/slot1"}, "slot1", "ready")
	var sl api.Slot
	h.okJSON(&sl, "drain", "x86/slot1")
	if sl.Pool != "x86" || sl.Slot != "slot1" || sl.State != "draining" || sl.DrainReason != "operator" || sl.InstanceID != instance {
		t.Errorf("drain --json = %+v, want x86/slot1 draining for operator", sl)
	}
	// The answer counts the reservations the slot holds, as slots does.
	if sl.Reservations != 1 {
		t.Errorf("drain --json: reservations = %d, want 1 (cli-1 is on slot1, as slots --json shows)", sl.Reservations)
	}
	h.okJSON(&slots, "slots")
	if s := findSlot(t, slots, "slot1"); s.State != "draining" || s.Reservations != 1 {
		t.Errorf("slots --json after drain: slot1 = %+v, want draining, still holding cli-1", s)
	}
	h.okJSON(&sl, "undrain", "x86/slot1")
	if sl.Slot != "slot1" || sl.State != "ready" || sl.DrainReason != "" {
		t.Errorf("undrain --json = %+v, want slot1 ready without a drain reason", sl)
	}
	// Undraining a ready slot is fine.
	h.ok([]string{"undrain", "x86/slot1"}, "ready")

	// weight
	h.ok([]string{"weight", "x86/slot1", "75"}, "slot1", "75")
	h.okJSON(&sl, "weight", "x86/slot1", "50")
	if sl.Slot != "slot1" || sl.Weight != 50 {
		t.Errorf("weight --json = %+v, want slot1 weight 50", sl)
	}
	h.okJSON(&slots, "slots")
	if s := findSlot(t, slots, "slot1"); s.Weight != 50 {
		t.Errorf("slots --json after weight 50: slot1 weight = %d", s.Weight)
	}
	if s := findSlot(t, slots, "slot2"); s.Weight != 100 {
		t.Errorf("slots --json after weight of slot1: slot2 weight = %d, want 100", s.Weight)
	}
	h.okJSON(&sl, "weight", "x86/slot2", "0") // an empty slot takes a weight too
	if sl.Slot != "slot2" || sl.Weight != 0 || sl.State != "empty" {
		t.Errorf("weight x86/slot2 0 --json = %+v", sl)
	}

	// heartbeat extends the lease from the daemon's now.
	h.ok([]string{"heartbeat", "cli-1"}, "reservation cli-1 (ready) now expires")
	h.Clock.Advance(time.Minute)
	h.okJSON(&res, "heartbeat", "cli-1")
	if want := h.Clock.Now().Add(10 * time.Minute); res.ID != "cli-1" || res.State != "ready" || !res.ExpiresAt.Equal(want) {
		t.Errorf("heartbeat --json = %+v, want cli-1 ready expiring %v", res, want)
	}

	// reconcile-now runs a round.
	h.ok([]string{"reconcile-now"}, "reconcile: round ")
	var rs1, rs2 api.ReconcileStatus
	h.okJSON(&rs1, "reconcile-now")
	h.okJSON(&rs2, "reconcile-now")
	if rs1.Rounds == 0 || rs2.Rounds <= rs1.Rounds || rs2.LastError != "" || !rs2.LastAt.Equal(h.Clock.Now()) {
		t.Errorf("reconcile-now --json twice = %+v then %+v, want a clean new round each time at %v", rs1, rs2, h.Clock.Now())
	}

	// release, and release again (not an error)
	h.ok([]string{"release", "cli-1"}, "released reservation cli-1")
	releasedAt := h.Clock.Now()
	h.Clock.Advance(time.Second)
	h.ok([]string{"release", "cli-1"}, "released reservation cli-1")
	h.okJSON(&res, "release", "cli-1")
	if res.ID != "cli-1" || res.State != "released" || res.EndedAt == nil || !res.EndedAt.Equal(releasedAt) ||
		res.Slot != "" || res.Address != "" {
		t.Errorf("release --json (third time) = %+v, want cli-1 released at %v, no slot", res, releasedAt)
	}
	h.okJSON(&rl, "reservations", "--state", "released")
	if len(rl.Reservations) != 1 || rl.Reservations[0].ID != "cli-1" {
		t.Errorf("reservations --state released --json = %+v, want cli-1", rl.Reservations)
	}
	h.okJSON(&slots, "slots")
	if s := findSlot(t, slots, "slot1"); s.Reservations != 0 {
		t.Errorf("slots --json after release: slot1 = %+v, want no reservations", s)
	}
	h.okJSON(&evs, "events", "--reservation", "cli-1", "--limit", "1")
	if len(evs.Events) != 1 || evs.Events[0].Kind != "released" {
		t.Errorf("newest event of cli-1 = %+v, want released", evs.Events)
	}

	// A release of an id the daemon never saw answers too (a tombstone).
	h.okJSON(&res, "release", "never-made")
	if res.ID != "never-made" || res.State != "released" {
		t.Errorf("release never-made --json = %+v, want released", res)
	}
}

// TestDaemonErrorAnswers checks the exit codes and messages of commands the
// daemon refuses, or that never reach it.
func TestDaemonErrorAnswers(t *testing.T) {
	h := startDaemon(t)

	tests := []struct {
		args       []string
		wantCode   int
		wantStderr string // exact unless wantPrefix
		wantPrefix bool
	}{
		// The daemon's own messages, exit 1.
		{args: []string{"drain", "x86/slot1"}, wantCode: exitAPIError,
			wantStderr: "autoscalerctl: slot x86/slot1 is empty; only a ready slot can be drained\n"},
		{args: []string{"undrain", "x86/slot2"}, wantCode: exitAPIError,
			wantStderr: "autoscalerctl: slot x86/slot2 is empty; only a draining slot can be undrained\n"},
		{args: []string{"drain", "x86/slot9"}, wantCode: exitAPIError,
			wantStderr: "autoscalerctl: no slot x86/slot9; `autoscalerctl slots` lists them\n"},
		{args: []string{"weight", "arm/slot1", "10"}, wantCode: exitAPIError,
			wantStderr: "autoscalerctl: no slot arm/slot1; `autoscalerctl slots` lists them\n"},
		{args: []string{"heartbeat", "nope"}, wantCode: exitAPIError,
			wantStderr: "autoscalerctl: no reservation \"nope\"\n"},
		{args: []string{"reserve", "--system", "x86_64-linux", "--pool", "arm"}, wantCode: exitAPIError,
			wantStderr: "autoscalerctl: pool: no pool named \"arm\"; configured: x86 (systems x86_64-linux; features )\n"},
		{args: []string{"reserve", "--system", "x86_64-linux", "--lease", "48h"}, wantCode: exitAPIError,
			wantStderr: "autoscalerctl: lease: 48h0m0s is longer than max_lease 24h0m0s; ask for less and heartbeat\n"},
		{args: []string{"reserve", "--system", "X86"}, wantCode: exitAPIError,
			wantStderr: "autoscalerctl: system: \"X86\" is not a Nix system name like \"x86_64-linux\"\n"},
		// Usage errors never reach the daemon, exit 2.
		{args: []string{"weight", "x86/slot1", "300"}, wantCode: exitUsage,
			wantStderr: "autoscalerctl: weight must be an integer 0..256, not \"300\"\nRun 'autoscalerctl help weight' for usage.\n"},
		{args: []string{"weight", "x86/slot1", "-1"}, wantCode: exitUsage,
			wantStderr: "autoscalerctl: weight must be an integer 0..256, not \"-1\"\nRun 'autoscalerctl help weight' for usage.\n"},
		{args: []string{"drain", "slot1"}, wantCode: exitUsage,
			wantStderr: "autoscalerctl: slot must be <pool>/<slot>, e.g. x86/slot1, not \"slot1\"", wantPrefix: true},
		// A system no pool serves: the reservation fails at once, exit 4.
		{args: []string{"reserve", "--system", "riscv64-linux", "--id", "cli-rv", "--wait", "--wait-timeout", "60s"}, wantCode: exitNotReady,
			wantStderr: "autoscalerctl: reservation cli-rv is failed: no pool serves system riscv64-linux with features []; configured: x86 (systems x86_64-linux; features )\n"},
	}
	for _, tt := range tests {
		t.Run(strings.Join(tt.args, " "), func(t *testing.T) {
			code, stdout, stderr := ctlAt(t, h.Socket, tt.args...)
			if code != tt.wantCode {
				t.Errorf("exit code = %d, want %d; stderr %q", code, tt.wantCode, stderr)
			}
			if tt.wantPrefix && !strings.HasPrefix(stderr, tt.wantStderr) || !tt.wantPrefix && stderr != tt.wantStderr {
				t.Errorf("stderr = %q, want %q", stderr, tt.wantStderr)
			}
			if tt.wantCode != exitNotReady && stdout != "" {
				t.Errorf("stdout = %q, want nothing", stdout)
			}
		})
	}

	// weight 300 did not change the slot; the refused drain did not either.
	var slots api.SlotList
	h.okJSON(&slots, "slots")
	if s := findSlot(t, slots, "slot1"); s.Weight != 100 || s.State != "empty" {
		t.Errorf("slot1 = %+v after refused commands, want empty with weight 100", s)
	}

	// The failed reservation is shown, and with --json the answer still
	// parses (exit 4 all the same).
	var out, errb bytes.Buffer
	code := run([]string{"--socket", h.Socket, "reserve", "--system", "riscv64-linux", "--id", "cli-rv2", "--wait", "--json"}, &out, &errb)
	if code != exitNotReady {
		t.Errorf("reserve --wait --json for riscv64-linux: exit code %d, want %d; stderr %q", code, exitNotReady, errb.String())
	}
	var res api.Reservation
	if err := json.Unmarshal(out.Bytes(), &res); err != nil {
		t.Fatalf("reserve --wait --json for riscv64-linux: stdout is not a Reservation: %v\n%s", err, out.String())
	}
	if res.ID != "cli-rv2" || res.State != "failed" || !strings.Contains(res.Reason, "no pool serves system riscv64-linux") || res.EndedAt == nil {
		t.Errorf("failed reservation = %+v", res)
	}
	if !strings.Contains(errb.String(), "reservation cli-rv2 is failed") {
		t.Errorf("stderr = %q, want the failure", errb.String())
	}
	var rl api.ReservationList
	h.okJSON(&rl, "reservations", "--state", "failed")
	if len(rl.Reservations) != 2 {
		t.Errorf("reservations --state failed --json = %+v, want cli-rv2 and cli-rv", rl.Reservations)
	}
	h.ok([]string{"reservations", "--state", "failed"}, "cli-rv", "cli-rv2", "failed", "riscv64-linux", "no pool serves")

	// Reusing a failed id with other parameters is a conflict.
	code, _, stderr := h.ctl("reserve", "--system", "x86_64-linux", "--id", "cli-rv")
	if want := "autoscalerctl: reservation cli-rv already exists with other parameters"; code != exitAPIError || !strings.HasPrefix(stderr, want) {
		t.Errorf("reserve with a failed id: exit code %d, stderr %q; want %d and %q", code, stderr, exitAPIError, want)
	}
	// Heartbeating an ended reservation is refused.
	code, _, stderr = h.ctl("heartbeat", "cli-rv")
	if want := "autoscalerctl: reservation cli-rv is failed ("; code != exitAPIError || !strings.HasPrefix(stderr, want) {
		t.Errorf("heartbeat of a failed reservation: exit code %d, stderr %q; want %d and %q", code, stderr, exitAPIError, want)
	}
}

// TestDaemonUnreachable checks that a command with no daemon behind the
// socket exits 3 and names the socket.
func TestDaemonUnreachable(t *testing.T) {
	h := startDaemon(t)
	var res api.Reservation
	h.okJSON(&res, "reserve", "--system", "x86_64-linux", "--id", "cli-2")
	if res.ID != "cli-2" || (res.State != "pending" && res.State != "ready") {
		t.Fatalf("reserve --json = %+v, want cli-2 live", res)
	}
	h.Stop()
	dir := filepath.Dir(h.Socket)

	// A stale socket file: it exists, but nothing accepts on it.
	stale := filepath.Join(dir, "stale.sock")
	ln, err := net.Listen("unix", stale)
	if err != nil {
		t.Fatal(err)
	}
	ln.(*net.UnixListener).SetUnlinkOnClose(false)
	ln.Close()
	if _, err := os.Stat(stale); err != nil {
		t.Fatalf("stale socket file: %v", err)
	}

	for _, tc := range []struct {
		name, sock string
		args       []string
	}{
		{"stopped daemon release", h.Socket, []string{"release", "cli-2"}},
		{"stopped daemon release --json", h.Socket, []string{"release", "--json", "cli-2"}},
		{"stopped daemon status", h.Socket, []string{"status"}},
		// A wait far longer than the hang guard: the command must notice
		// nothing listens, not wait for its timeout.
		{"stopped daemon reserve --wait", h.Socket, []string{"reserve", "--system", "x86_64-linux", "--wait", "--wait-timeout", "10m"}},
		{"nothing at path", filepath.Join(dir, "none.sock"), []string{"release", "cli-2"}},
		{"stale socket", stale, []string{"release", "cli-2"}},
		{"stale socket health", stale, []string{"health"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			code, stdout, stderr := ctlAt(t, tc.sock, tc.args...)
			if code != exitUnreachable {
				t.Errorf("exit code = %d, want %d; stderr %q", code, exitUnreachable, stderr)
			}
			want := "autoscalerctl: cannot reach the daemon at unix socket " + tc.sock + ": "
			if !strings.HasPrefix(stderr, want) || !strings.Contains(stderr, "use --socket or --url") {
				t.Errorf("stderr = %q, want prefix %q and the --socket hint", stderr, want)
			}
			if stdout != "" {
				t.Errorf("stdout = %q, want nothing", stdout)
			}
		})
	}
}

// TestDaemonForecast: a forecast alone launches a builder, a reservation of
// its source consumes it, and it can be listed and withdrawn.
func TestDaemonForecast(t *testing.T) {
	h := startDaemon(t)
	h.ok([]string{"forecast", "--source", "github:o/r", "--system", "x86_64-linux", "--builds", "1", "--id", "eval-1", "--ttl", "20m"},
		"eval-1", "open", "github:o/r", "x86")
	var f api.Forecast
	h.okJSON(&f, "forecast", "--source", "github:o/r", "--system", "x86_64-linux", "--builds", "1", "--id", "eval-1", "--ttl", "20m")
	if f.ID != "eval-1" || f.Builds != 1 || f.Remaining != 1 || f.State != "open" {
		t.Errorf("forecast --json = %+v, want eval-1 open with 1 build remaining", f)
	}
	h.WaitFor("a builder launched for the forecast alone", func() bool {
		var slots api.SlotList
		h.okJSON(&slots, "slots")
		return slices.ContainsFunc(slots.Slots, func(s api.Slot) bool { return s.State != "empty" })
	})

	h.ok([]string{"reserve", "--system", "x86_64-linux", "--source", "github:o/r", "--id", "b1", "--wait"}, "ready")
	var l api.ForecastList
	h.okJSON(&l, "forecasts")
	if len(l.Forecasts) != 1 || l.Forecasts[0].Arrived != 1 || l.Forecasts[0].Remaining != 0 {
		t.Errorf("forecasts --json = %+v, want eval-1 with its build arrived", l.Forecasts)
	}
	h.ok([]string{"forecasts"}, "ID", "eval-1", "ARRIVED")
	h.ok([]string{"withdraw-forecast", "eval-1"}, "withdrawn")
	h.ok([]string{"withdraw-forecast", "eval-1"}, "withdrawn")
	if code, _, stderr := h.ctl("withdraw-forecast", "nope"); code == exitOK || !strings.Contains(stderr, `no forecast "nope"`) {
		t.Errorf("withdraw-forecast nope: exit %d, stderr %q; want a failure naming it", code, stderr)
	}
	if code, _, stderr := h.ctl("forecast", "--source", "s", "--system", "x86_64-linux"); code != exitUsage || !strings.Contains(stderr, "--id is required") {
		t.Errorf("forecast without --id: exit %d, stderr %q; want a usage error", code, stderr)
	}
}
