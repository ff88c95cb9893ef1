package e2e

import (
	"bufio"
	"context"
	"net"
	"strings"
	"testing"
	"time"

	"guardianproject.dev/ops/nix-builder-autoscaler/haproxy"
	"guardianproject.dev/ops/nix-builder-autoscaler/haproxy/haproxytest"
	"guardianproject.dev/ops/nix-builder-autoscaler/internal/api"
	"guardianproject.dev/ops/nix-builder-autoscaler/internal/config"
	"guardianproject.dev/ops/nix-builder-autoscaler/internal/daemon/daemontest"
	"guardianproject.dev/ops/nix-builder-autoscaler/internal/testwait"
)

// stack is the daemon (in-process, real clock, local stand-in builders) and
// a real HAProxy running the configuration generated from the same file.
type stack struct {
	t        *testing.T
	h        *daemontest.Harness
	hp       *haproxytest.Instance
	cfg      *config.Config
	frontend string
}

// startStack starts HAProxy, then the daemon, with 200ms checks. pool is
// extra TOML for pool x86, hold the SPOE hold.
func startStack(t *testing.T, pool, hold string) *stack {
	t.Helper()
	return startStackWith(t, pool, hold)
}

// startStackWith is startStack with opts changing the daemon's options.
func startStackWith(t *testing.T, pool, hold string, opts ...daemontest.Option) *stack {
	t.Helper()
	b := startBenchStack(t, pool, hold, "200ms", nil, opts...)
	return &stack{t: t, h: b.h, hp: b.hp, cfg: b.cfg, frontend: b.frontend}
}

// stat returns show stat's fields for server x86/slot.
func (s *stack) stat(slot string) map[string]string {
	s.t.Helper()
	out := s.hp.Cmd("show stat")
	lines := strings.Split(strings.TrimSpace(out), "\n")
	if len(lines) == 0 || !strings.HasPrefix(lines[0], "# ") {
		s.t.Fatalf("show stat: %q", out)
	}
	header := strings.Split(strings.TrimPrefix(lines[0], "# "), ",")
	for _, l := range lines[1:] {
		f := strings.Split(l, ",")
		if len(f) >= 2 && f[0] == haproxy.Backend("x86") && f[1] == slot {
			m := map[string]string{}
			for i, h := range header {
				if i < len(f) {
					m[h] = f[i]
				}
			}
			return m
		}
	}
	s.t.Fatalf("show stat has no server %s/%s", haproxy.Backend("x86"), slot)
	return nil
}

// waitStat waits until show stat's field of x86/slot satisfies ok.
func (s *stack) waitStat(slot, field string, ok func(string) bool) {
	s.t.Helper()
	var last string
	if !testwait.Poll(testwait.Bound, func() bool {
		last = s.stat(slot)[field]
		return ok(last)
	}) {
		s.t.Fatalf("show stat %s %s = %q after %v; never became what the test waits for", slot, field, last, testwait.Bound)
	}
}

func is(want string) func(string) bool { return func(got string) bool { return got == want } }

func hasPrefix(p string) func(string) bool {
	return func(got string) bool { return strings.HasPrefix(got, p) }
}

// dial connects through the HAProxy frontend and reads the builder's
// banner; the connection stays open until the test ends or it is closed.
// The read is bounded by testwait.Bound, a hang guard: every caller expects
// a banner, or the connection closed by a hold far shorter than that.
func (s *stack) dial() (net.Conn, string, error) {
	c, err := net.DialTimeout("tcp", s.frontend, testwait.Bound)
	if err != nil {
		return nil, "", err
	}
	s.t.Cleanup(func() { c.Close() })
	_ = c.SetReadDeadline(time.Now().Add(testwait.Bound))
	line, err := bufio.NewReader(c).ReadString('\n')
	return c, strings.TrimSpace(line), err
}

func (s *stack) reserve(id string) api.Reservation {
	s.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), testwait.Bound) // a hang guard
	defer cancel()
	if _, _, err := s.h.Client.CreateReservation(ctx, api.CreateReservationRequest{ID: id, System: "x86_64-linux"}); err != nil {
		s.t.Fatal(err)
	}
	r, err := s.h.Client.WaitReady(ctx, id, 10*time.Second)
	if err != nil || r.State != "ready" {
		s.t.Fatalf("reservation %s = %+v, %v; want ready", id, r, err)
	}
	return r
}

// TestAgentCheckAndOperatorThroughHAProxy: the daemon owns each server's
// state and weight in HAProxy: it pushes them through the runtime API as it
// decides them (a reservation is ready once its server is UP), its agent
// check answers the same (with the instance in last_agt), operator commands
// reach HAProxy at once, and a change made behind its back is undone.
func TestAgentCheckAndOperatorThroughHAProxy(t *testing.T) {
	s := startStack(t, "max_builders = 2\nmax_jobs = 3", "10s")
	s.waitStat("slot1", "status", is("MAINT"))
	r := s.reserve("agent-1")
	if r.Slot != "slot1" {
		t.Fatalf("reservation on %s, want slot1", r.Slot)
	}
	s.waitStat("slot1", "status", is("UP"))
	st := s.stat("slot1")
	if st["weight"] != "100" || st["slim"] != "3" || st["addr"] != r.Address {
		t.Fatalf("slot1 weight %s slim %s addr %s; want 100, 3 (max_jobs), %s", st["weight"], st["slim"], st["addr"], r.Address)
	}
	// The agent's description comes with its first check after the push
	// (agent_interval).
	s.waitStat("slot1", "last_agt", func(v string) bool { return strings.Contains(v, r.InstanceID) })
	if got := s.stat("slot2")["status"]; got != "MAINT" {
		t.Errorf("empty slot2 is %s, want MAINT", got)
	}
	ctx := context.Background()
	if _, err := s.h.Client.SetWeight(ctx, "x86", "slot1", 50); err != nil {
		t.Fatal(err)
	}
	s.waitStat("slot1", "weight", is("50"))
	// A runtime-API change behind the daemon's back does not stick: the
	// next round sees the server disagree with its slot and pushes again
	// (the agent check would too).
	s.hp.Cmd("set weight nba_x86/slot1 7")
	s.waitStat("slot1", "weight", is("50"))
	if _, err := s.h.Client.Drain(ctx, "x86", "slot1"); err != nil {
		t.Fatal(err)
	}
	s.waitStat("slot1", "status", hasPrefix("DRAIN"))
	if _, err := s.h.Client.Undrain(ctx, "x86", "slot1"); err != nil {
		t.Fatal(err)
	}
	s.waitStat("slot1", "status", is("UP"))
}

// TestSteeringAndSPOAFailure: a reserved build's connections go to its slot;
// with the SPOE agent gone, connections still flow and the daemon says the
// agent is down.
func TestSteeringAndSPOAFailure(t *testing.T) {
	s := startStack(t, "max_builders = 2\nmax_jobs = 4\nmin_builders = 2", "10s")
	s.waitStat("slot1", "status", is("UP"))
	s.waitStat("slot2", "status", is("UP"))
	r := s.reserve("steer-1")
	// Let the SPOA see the assignment (its view refreshes every round).
	if _, err := s.h.Client.Reconcile(context.Background()); err != nil {
		t.Fatal(err)
	}
	for i := 0; i < 3; i++ {
		if _, banner, err := s.dial(); err != nil || !strings.HasPrefix(banner, "SSH-2.0-") {
			t.Fatalf("connection %d: %q, %v", i, banner, err)
		}
	}
	s.waitStat(r.Slot, "scur", is("3"))
	want := "nba_x86/" + r.Slot
	for _, l := range strings.Split(s.hp.Log(), "\n") {
		if strings.Contains(l, "nba_x86 nba_x86/") && !strings.Contains(l, want) {
			t.Errorf("a connection went elsewhere than the reserved slot %s: %s", r.Slot, l)
		}
	}

	s.h.Daemon.StopSPOA()
	testwait.Until(t, "daemon reports the SPOE agent down", func() bool {
		st, err := s.h.Client.Status(context.Background())
		return err == nil && st.HAProxy.SPOAUp != nil && !*st.HAProxy.SPOAUp
	})
	if _, banner, err := s.dial(); err != nil || !strings.HasPrefix(banner, "SSH-2.0-") {
		t.Fatalf("with the SPOE agent down: %q, %v; want HAProxy to balance by itself", banner, err)
	}
}

// TestScaleFromZeroThroughHAProxy: with no builder and no reservation, a
// connection is held while a builder is launched and is then served by it.
func TestScaleFromZeroThroughHAProxy(t *testing.T) {
	// The hold is long: only a stuck launch should make it run out.
	s := startStack(t, "max_builders = 2\n[pool.local]\nboot_delay = \"1s\"", "2m")
	_, banner, err := s.dial()
	if err != nil || !strings.HasPrefix(banner, "SSH-2.0-") {
		t.Fatalf("held connection: %q, %v; want the new builder's banner", banner, err)
	}
	slots, err := s.h.Client.Slots(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if slots.Slots[0].State != "ready" {
		t.Fatalf("slot1 = %s; the held connection should have launched it", slots.Slots[0].State)
	}
}

// TestHoldLimitRejects: when no builder comes up within the hold, the
// connection is closed and HAProxy's log says why.
func TestHoldLimitRejects(t *testing.T) {
	s := startStack(t, "max_builders = 1\n[pool.local]\nboot_delay = \"1h\"", "2s")
	c, banner, err := s.dial()
	if err == nil {
		t.Fatalf("connection got %q; want it closed after the hold", banner)
	}
	c.Close()
	testwait.Until(t, "HAProxy's log line for the rejected connection", func() bool {
		return strings.Contains(s.hp.Log(), "verdict=reject")
	})
}

// TestHAProxyRestartRebinds: after HAProxy restarts and forgets the builder
// addresses, one reconcile round writes them again and connections work.
func TestHAProxyRestartRebinds(t *testing.T) {
	s := startStack(t, "max_builders = 2\nmin_builders = 1", "10s")
	s.waitStat("slot1", "status", is("UP"))
	addr := s.stat("slot1")["addr"]
	// The daemon's own rounds (every 10s) may bind slot1 again between the
	// restart and the look at it: restart again then. Only HAProxy that
	// remembers the address through every restart fails the test.
	forgot := false
	for range 5 {
		s.hp.Restart()
		if s.stat("slot1")["addr"] != addr {
			forgot = true
			break
		}
	}
	if !forgot {
		t.Fatalf("after 5 restarts slot1 still points at %s; the test needs HAProxy to forget it", addr)
	}
	if _, err := s.h.Client.Reconcile(context.Background()); err != nil {
		t.Fatal(err)
	}
	if got := s.stat("slot1")["addr"]; got != addr {
		t.Fatalf("after one reconcile slot1 points at %s, want %s", got, addr)
	}
	s.waitStat("slot1", "status", is("UP"))
	if _, banner, err := s.dial(); err != nil || !strings.HasPrefix(banner, "SSH-2.0-") {
		t.Fatalf("connection after restart: %q, %v", banner, err)
	}
}

// TestQueuedConnectionLaunchesABuilder: with the SPOE agent gone, HAProxy
// balances by itself, and a connection that finds the one builder at
// max_jobs waits in the backend's queue. The daemon counts it as demand
// (with the reservation that builder serves, two builders are wanted):
// it launches a second builder, and HAProxy hands the queued connection
// to it.
func TestQueuedConnectionLaunchesABuilder(t *testing.T) {
	// The local builder boots after a second, so that the status read
	// below comes while the connection still waits; HAProxy's queue
	// timeout (1m) is raised so that no slow machine drops it first.
	b := startBenchStack(t, "max_builders = 2\nmax_jobs = 1\n[pool.local]\nboot_delay = \"1s\"", "10s", "200ms", func(cfg string) string {
		if !strings.Contains(cfg, "timeout queue 1m\n") {
			t.Fatalf("the generated config has no `timeout queue 1m`; has the template changed?\n%s", cfg)
		}
		return strings.Replace(cfg, "timeout queue 1m\n", "timeout queue 10m\n", 1)
	})
	s := &stack{t: t, h: b.h, hp: b.hp, cfg: b.cfg, frontend: b.frontend}
	ctx := context.Background()
	s.h.Daemon.StopSPOA()
	testwait.Until(t, "HAProxy to see the SPOE agent down", func() bool {
		return strings.HasPrefix(b.proxyStat(haproxy.SPOABackend, "spoa1")["status"], "DOWN")
	})

	// A reserved build takes slot1's one job.
	if r := s.reserve("queued-1"); r.Slot != "slot1" {
		t.Fatalf("reservation on %s, want slot1", r.Slot)
	}
	s.waitStat("slot1", "slim", is("1"))
	if _, banner, err := s.dial(); err != nil || !strings.HasPrefix(banner, "SSH-2.0-") {
		t.Fatalf("the build's connection: %q, %v", banner, err)
	}
	// Another connection waits in the backend's queue.
	c, err := net.DialTimeout("tcp", s.frontend, testwait.Bound)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	served := make(chan string, 1)
	go func() {
		_ = c.SetReadDeadline(time.Now().Add(testwait.Bound)) // a hang guard
		line, _ := bufio.NewReader(c).ReadString('\n')
		served <- strings.TrimSpace(line)
	}()
	testwait.Until(t, "the second connection queued in HAProxy", func() bool {
		return b.proxyStat(haproxy.Backend("x86"), "BACKEND")["qcur"] == "1"
	})

	// The next round (here forced; the daemon's own comes within
	// reconcile_interval) sees it and launches slot2.
	if _, err := s.h.Client.Reconcile(ctx); err != nil {
		t.Fatal(err)
	}
	if st, err := s.h.Client.Status(ctx); err != nil {
		t.Fatal(err)
	} else if q := st.Pools[0].QueuedConnections; q != 1 {
		select {
		case line := <-served:
			t.Logf("status read after the queued connection was served (%q); queued_connections %d not checked", line, q)
			served <- line
		default:
			t.Errorf("status queued_connections = %d while a connection waits in HAProxy's queue; want 1", q)
		}
	}
	ev, err := s.h.Client.Events(ctx, api.EventQuery{Pool: "x86", Slot: "slot2"})
	if err != nil {
		t.Fatal(err)
	}
	launched := ""
	for _, e := range ev.Events {
		if e.Kind == "launched" {
			launched = e.Reason
		}
	}
	if !strings.Contains(launched, "2 need a builder") {
		t.Fatalf("slot2 launch reason %q (events %+v); want one for 2 needing a builder: the reservation and the queued connection", launched, ev.Events)
	}
	select {
	case line := <-served:
		if !strings.HasPrefix(line, "SSH-2.0-") {
			t.Fatalf("the queued connection got %q; want the new builder's banner", line)
		}
	case <-time.After(testwait.Bound): // a hang guard
		t.Fatalf("the queued connection still waits %v after slot2 was launched: stuck", testwait.Bound)
	}
	s.waitStat("slot2", "scur", is("1"))
	s.waitStat("slot1", "scur", is("1"))
}
