package agentcheck

import (
	"encoding/csv"
	"errors"
	"fmt"
	"html"
	"io"
	"net"
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"guardianproject.dev/ops/nix-builder-autoscaler/haproxy/haproxytest"
	"guardianproject.dev/ops/nix-builder-autoscaler/internal/testwait"
	"guardianproject.dev/ops/nix-builder-autoscaler/scaler"
)

const banner = "SSH-2.0-OpenSSH_9.2 agentcheck-test\r\n"

// sshStandIn serves an SSH banner on a loopback port until the test ends.
func sshStandIn(t *testing.T) int {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	wg.Go(func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			_ = c.SetDeadline(time.Now().Add(time.Second))
			_, _ = io.WriteString(c, banner)
			c.Close()
		}
	})
	t.Cleanup(func() {
		ln.Close()
		wg.Wait()
	})
	return ln.Addr().(*net.TCPAddr).Port
}

const haproxyConfig = `global
    log stdout format raw local0 info
    stats socket DIR/admin.sock mode 600 level admin
    stats timeout 30s
    server-state-file DIR/haproxy.state

defaults
    mode tcp
    log global
    timeout connect 1s
    timeout client 30s
    timeout server 30s
    timeout queue 5s
    # Without it a check must finish within its inter (200ms), and a busy
    # machine may not run the responder or the SSH stand-in that soon.
    timeout check 1m
    load-server-state-from-file global

frontend nba_x86
    bind 127.0.0.1:{{fe}}
    bind 127.0.0.1:{{steer}}
    default_backend nba_x86

backend nba_x86
    balance leastconn
    # Connections to the steer port are pinned to slot1, the way the SPOE
    # agent's use-server rule pins them.
    use-server slot1 if { dst_port {{steer}} }
    option tcp-check
    tcp-check expect rstring ^SSH-2\.0-
    default-server check inter 200ms fall 2 rise 1 agent-check agent-addr 127.0.0.1 agent-port {{agent}} agent-inter 200ms weight 100
    server slot1 192.0.2.1:22 init-addr last,192.0.2.1 disabled agent-send "x86/slot1\n"
    server slot2 192.0.2.1:22 init-addr last,192.0.2.1 disabled agent-send "x86/slot2\n"
    server slot3 192.0.2.1:22 init-addr last,192.0.2.1 disabled agent-send "x86/slot3\n"
    # Not disabled and pointing at a live sshd: only the agent keeps them out.
    server stray1 127.0.0.1:{{ssh}} agent-send "x86/slot9\n"
    server stray2 127.0.0.1:{{ssh}} agent-send "arm/slot1\n"
    server stray3 127.0.0.1:{{ssh}} agent-send "garbage\n"

listen stats
    mode http
    bind 127.0.0.1:{{stats}}
    stats enable
    stats uri /
`

type haproxyLab struct {
	t     *testing.T
	step  string // for messages
	h     *haproxytest.Instance
	fe    int // frontend port (leastconn)
	steer int // frontend port pinned to slot1 (use-server)
	stats int // stats page port
}

// begin names the step that the next failures belong to.
func (l *haproxyLab) begin(step string) {
	l.step = step
	l.t.Logf("step: %s", step)
}

// row returns slot's show stat line of backend nba_x86, by column name.
func (l *haproxyLab) row(srv string) map[string]string {
	l.t.Helper()
	out := l.h.Cmd("show stat")
	recs, err := csv.NewReader(strings.NewReader(strings.TrimPrefix(out, "# "))).ReadAll()
	if err != nil || len(recs) < 2 {
		l.t.Fatalf("show stat: %v\n%s", err, out)
	}
	hdr := recs[0]
	for _, rec := range recs[1:] {
		if len(rec) < 2 || rec[0] != "nba_x86" || rec[1] != srv {
			continue
		}
		m := map[string]string{}
		for i, name := range hdr {
			if i < len(rec) {
				m[name] = rec[i]
			}
		}
		return m
	}
	l.t.Fatalf("show stat has no nba_x86/%s:\n%s", srv, out)
	return nil
}

// wait polls show stat until want holds for srv's row.
func (l *haproxyLab) wait(srv, what string, want func(map[string]string) bool) map[string]string {
	l.t.Helper()
	var r map[string]string
	if !testwait.Poll(testwait.Bound, func() bool {
		r = l.row(srv)
		return want(r)
	}) {
		l.t.Fatalf("%s: nba_x86/%s: still waiting for %s after %v: stuck; show stat has status=%q weight=%q slim=%q check_status=%q agent_status=%q agent_desc=%q last_agt=%q",
			l.step, srv, what, testwait.Bound, r["status"], r["weight"], r["slim"], r["check_status"], r["agent_status"], r["agent_desc"], r["last_agt"])
	}
	return r
}

// dial connects to a frontend port and returns what came back before the
// connection closed. A connection that gets nothing must be closed at once,
// not queued (the config's timeout queue is 5s): the backend's queue has
// never held a connection (show stat's qmax is 0).
func (l *haproxyLab) dial(port int) string {
	l.t.Helper()
	c, err := net.DialTimeout("tcp", fmt.Sprintf("127.0.0.1:%d", port), testwait.Bound)
	if err != nil {
		l.t.Fatal(err)
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(testwait.Bound))
	b, err := io.ReadAll(c)
	if err != nil {
		l.t.Fatalf("%s: read from frontend :%d: %v (got %q)", l.step, port, err, b)
	}
	if q := l.row("BACKEND")["qmax"]; q != "0" {
		l.t.Errorf("%s: frontend :%d: backend nba_x86 queued connections (qmax %q), want them closed at once", l.step, port, q)
	}
	return string(b)
}

// settled waits until HAProxy has applied an agent answer for key that the
// responder gave after this call: lookups of one server run one at a
// time, so the second lookup that begins after now comes after HAProxy
// processed the first one's answer.
func settled(t *testing.T, f *fakeSlots, key scaler.SlotKey) {
	t.Helper()
	n := f.lookupsOf(key)
	testwait.Until(t, fmt.Sprintf("two more agent checks of %s", key), func() bool { return f.lookupsOf(key) >= n+2 })
}

func (l *haproxyLab) page() string {
	l.t.Helper()
	c := &http.Client{Timeout: testwait.Bound}
	resp, err := c.Get(fmt.Sprintf("http://127.0.0.1:%d/", l.stats))
	if err != nil {
		l.t.Fatal(err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
	if err != nil {
		l.t.Fatal(err)
	}
	return html.UnescapeString(string(b))
}

// TestHAProxy drives a real HAProxy 2.6 with the responder and checks what
// each slot state does to the server.
func TestHAProxy(t *testing.T) {
	haproxytest.Binary(t)
	ssh := sshStandIn(t)
	k1 := scaler.SlotKey{Pool: "x86", Slot: "slot1"}
	f := newFakeSlots(
		scaler.Slot{Pool: "x86", Name: "slot1", State: scaler.Empty, Weight: scaler.DefaultWeight},
		scaler.Slot{Pool: "x86", Name: "slot2", State: scaler.Empty, Weight: scaler.DefaultWeight},
		// slot3 is not in the store: an unknown identity.
	)
	reg := prometheus.NewRegistry()
	s := New(f, map[string]int{"x86": 4}, testLogger(t), reg, nil)
	// Hang guards only: the limits are not under test here, and a read
	// timeout on a busy machine would answer "maint".
	s.readTimeout, s.lookupTimeout, s.writeTimeout = testwait.Bound, testwait.Bound, testwait.Bound
	agentAddr, _ := serve(t, s)
	_, agentPort, _ := net.SplitHostPort(agentAddr)

	l := &haproxyLab{t: t, fe: haproxytest.FreePort(t), steer: haproxytest.FreePort(t), stats: haproxytest.FreePort(t)}
	cfg := strings.NewReplacer("{{fe}}", fmt.Sprint(l.fe), "{{steer}}", fmt.Sprint(l.steer), "{{stats}}", fmt.Sprint(l.stats),
		"{{agent}}", agentPort, "{{ssh}}", fmt.Sprint(ssh)).Replace(haproxyConfig)
	l.h = haproxytest.Start(t, haproxytest.Dir(t), cfg)
	if out := l.h.Cmd(fmt.Sprintf("set server nba_x86/slot1 addr 127.0.0.1 port %d", ssh)); !strings.Contains(out, "changed") {
		t.Fatalf("set server addr: %q", out)
	}

	status := func(want string) func(map[string]string) bool {
		return func(r map[string]string) bool { return r["status"] == want }
	}
	// maintByAgent: MAINT, and the last agent reply had no health word.
	maintByAgent := func(r map[string]string) bool {
		return r["status"] == "MAINT" && r["agent_status"] == "CHECKED"
	}
	set := func(change func(*scaler.Slot)) { f.update(k1, change) }

	{
		l.begin("unknown identities")
		for _, srv := range []string{"stray1", "stray2", "stray3", "slot3"} {
			l.wait(srv, "MAINT from the agent", maintByAgent)
		}
		l.wait("slot2", "MAINT for an empty slot", maintByAgent)
	}

	{
		l.begin("empty")
		l.wait("slot1", "MAINT", maintByAgent)
	}

	{
		l.begin("launching")
		set(func(s *scaler.Slot) { s.State, s.InstanceID, s.LaunchID = scaler.Launching, "", "l-1" })
		settled(t, f, k1)
		l.wait("slot1", "MAINT", maintByAgent)
	}

	{
		l.begin("booting")
		set(func(s *scaler.Slot) {
			s.State, s.InstanceID, s.InstanceType, s.Market = scaler.Booting, "i-1", "c7i.large", "spot"
		})
		// Still MAINT: no health check runs toward the placeholder address
		// before the builder's own address is bound.
		l.wait("slot1", "MAINT with the phase and no check", func(r map[string]string) bool {
			return strings.HasPrefix(r["status"], "MAINT") && r["last_agt"] == "via agent : down (booting i-1)" && r["check_status"] == ""
		})
		if got := l.dial(l.fe); got != "" {
			t.Errorf("frontend answered %q for a booting slot, want a closed connection", got)
		}
	}

	{
		l.begin("binding")
		set(func(s *scaler.Slot) { s.State, s.Address = scaler.Binding, fmt.Sprintf("127.0.0.1:%d", ssh) })
		// The SSH check runs and passes, but the agent holds the server down.
		r := l.wait("slot1", "DOWN (agent) with a passing SSH check", func(r map[string]string) bool {
			return r["status"] == "DOWN (agent)" && r["last_agt"] == "via agent : down (binding i-1)" && r["check_status"] == "L7OK"
		})
		if r["agent_status"] != "L7STS" {
			t.Errorf("agent_status = %q, want L7STS", r["agent_status"])
		}
		if got := l.dial(l.fe); got != "" {
			t.Errorf("frontend answered %q for a binding slot, want a closed connection", got)
		}
		if got := l.dial(l.steer); got != "" {
			t.Errorf("use-server reached a binding slot: %q", got)
		}
	}

	{
		l.begin("ready")
		set(func(s *scaler.Slot) { s.State = scaler.Ready })
		r := l.wait("slot1", "UP", status("UP"))
		want := map[string]string{"weight": "100", "uweight": "100", "slim": "4",
			"last_agt": "via agent : up (i-1 c7i.large spot)", "agent_status": "L7OK", "agent_desc": "Layer7 check passed"}
		for k, v := range want {
			if r[k] != v {
				t.Errorf("%s = %q, want %q", k, r[k], v)
			}
		}
		if got := l.dial(l.fe); got != banner {
			t.Errorf("frontend answered %q, want the builder's banner", got)
		}
		// The stats page shows the health check, not the agent, for an UP
		// server (documented in the package comment).
		if p := l.page(); strings.Contains(p, "i-1 c7i.large spot") {
			t.Errorf("stats page now shows the up description: update the package documentation")
		}
	}

	{
		l.begin("store error keeps the last state")
		before := checks(t, reg)[ResultError]
		f.setErr(errors.New("database is locked"))
		settled(t, f, k1)
		testwait.Until(t, "16 store errors counted", func() bool { return checks(t, reg)[ResultError] >= before+16 })
		r := l.row("slot1")
		if r["status"] != "UP" || r["weight"] != "100" || r["slim"] != "4" {
			t.Errorf("after store errors: status=%q weight=%q slim=%q, want UP 100 4", r["status"], r["weight"], r["slim"])
		}
		if r["agent_status"] != "L7RSP" {
			t.Errorf("agent_status = %q, want L7RSP (no reply)", r["agent_status"])
		}
		if got := l.dial(l.fe); got != banner {
			t.Errorf("frontend answered %q during store errors, want the banner", got)
		}
		f.setErr(nil)
		l.wait("slot1", "the agent answering again", func(r map[string]string) bool { return r["agent_status"] == "L7OK" })
	}

	{
		l.begin("weights")
		for _, w := range []int{50, 200, 256} {
			set(func(s *scaler.Slot) { s.Weight = w })
			l.wait("slot1", fmt.Sprintf("weight %d", w), func(r map[string]string) bool {
				return r["status"] == "UP" && r["weight"] == fmt.Sprint(w) && r["uweight"] == fmt.Sprint(w)
			})
		}
		set(func(s *scaler.Slot) { s.Weight = 200 })
		l.wait("slot1", "weight 200", func(r map[string]string) bool { return r["weight"] == "200" })
	}

	{
		l.begin("operator changes are overridden")
		// Silence the agent so the operator's change is visible first.
		before := checks(t, reg)[ResultError]
		f.setErr(errors.New("paused"))
		settled(t, f, k1)
		testwait.Until(t, "12 store errors counted", func() bool { return checks(t, reg)[ResultError] >= before+12 })
		l.h.Cmd("set weight nba_x86/slot1 10")
		l.h.Cmd("set server nba_x86/slot1 state maint")
		r := l.row("slot1")
		if r["status"] != "MAINT" || r["weight"] != "10" {
			t.Fatalf("operator change not applied: status=%q weight=%q", r["status"], r["weight"])
		}
		f.setErr(nil)
		l.wait("slot1", "UP with the agent's weight 200", func(r map[string]string) bool {
			return r["status"] == "UP" && r["weight"] == "200"
		})
		l.h.Cmd("set server nba_x86/slot1 state drain")
		l.wait("slot1", "UP again after an operator drain", status("UP"))
	}

	{
		l.begin("weight 0 stops new traffic")
		set(func(s *scaler.Slot) { s.Weight = 0 })
		r := l.wait("slot1", "weight 0", func(r map[string]string) bool { return r["weight"] == "0" })
		if r["status"] != "UP" || r["slim"] != "4" {
			t.Errorf("status=%q slim=%q, want UP 4", r["status"], r["slim"])
		}
		if got := l.dial(l.fe); got != "" {
			t.Errorf("frontend sent a connection to a weight-0 server: %q", got)
		}
		// use-server ignores the weight (documented hazard for the SPOE agent).
		if got := l.dial(l.steer); got != banner {
			t.Errorf("use-server to a weight-0 server: %q, want the banner (HAProxy changed: update the package documentation)", got)
		}
	}

	{
		l.begin("draining")
		set(func(s *scaler.Slot) { s.State, s.Weight, s.DrainReason = scaler.Draining, 100, "idle" })
		r := l.wait("slot1", "DRAIN (agent)", status("DRAIN (agent)"))
		if r["slim"] != "4" {
			t.Errorf("slim = %q, want 4", r["slim"])
		}
		if got := l.dial(l.fe); got != "" {
			t.Errorf("frontend sent a connection to a draining server: %q", got)
		}
		if got := l.dial(l.steer); got != banner {
			t.Errorf("use-server to a draining server: %q, want the banner (HAProxy changed: update the package documentation)", got)
		}
		l.h.Cmd("set server nba_x86/slot1 state ready")
		l.wait("slot1", "DRAIN again after an operator ready", status("DRAIN (agent)"))
	}

	{
		l.begin("terminating")
		set(func(s *scaler.Slot) { s.State = scaler.Terminating })
		l.wait("slot1", "MAINT", maintByAgent)
		if got := l.dial(l.steer); got != "" {
			t.Errorf("use-server reached a server in MAINT: %q", got)
		}
	}

	{
		l.begin("empty again")
		set(func(s *scaler.Slot) { *s = scaler.Slot{State: scaler.Empty, Weight: scaler.DefaultWeight} })
		l.wait("slot1", "MAINT", maintByAgent)
	}

	for _, srv := range []string{"stray1", "stray2", "stray3", "slot2", "slot3"} {
		if r := l.row(srv); r["status"] != "MAINT" {
			t.Errorf("%s: status %q at the end, want MAINT", srv, r["status"])
		}
	}
	got := checks(t, reg)
	for _, res := range []string{ResultOK, ResultUnknown, ResultBadIdentity, ResultError} {
		if got[res] == 0 {
			t.Errorf("agent_checks_total{result=%q} = 0, want > 0 (all: %v)", res, got)
		}
	}
}
