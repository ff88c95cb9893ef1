package haproxy

import (
	"bufio"
	"errors"
	"fmt"
	"net"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"guardianproject.dev/ops/nix-builder-autoscaler/haproxy/haproxytest"
	"guardianproject.dev/ops/nix-builder-autoscaler/internal/testwait"
	"guardianproject.dev/ops/nix-builder-autoscaler/scaler"
	"guardianproject.dev/ops/nix-builder-autoscaler/spoa/wire"
)

var placeholderAddr = fmt.Sprintf("%s:%d", Placeholder, PlaceholderPort)

// waitServer polls Servers until cond holds for key.
func waitServer(t *testing.T, r *Readiness, key scaler.SlotKey, what string, cond func(scaler.ServerStatus) bool) scaler.ServerStatus {
	t.Helper()
	var last scaler.ServerStatus
	if !testwait.Poll(testwait.Bound, func() bool {
		servers, err := r.Servers(t.Context())
		if err != nil {
			t.Fatalf("Servers: %v", err)
		}
		last = servers[key]
		return cond(last)
	}) {
		t.Fatalf("%s: %s still not reached after %v: stuck; last %+v", key, what, testwait.Bound, last)
	}
	return last
}

// serverStat returns HAProxy's own show stat line of proxy/server.
func serverStat(t *testing.T, h *haproxytest.Instance, proxy, server string) Stat {
	t.Helper()
	for _, s := range mustStats(t, h) {
		if s.Proxy() == proxy && s.Server() == server {
			return s
		}
	}
	t.Fatalf("no server %s/%s in show stat", proxy, server)
	return Stat{}
}

func TestReadinessAgainstHAProxy(t *testing.T) {
	b := startBanner(t)
	fe := haproxytest.FreePort(t)
	closed := haproxytest.FreePort(t)
	h := haproxytest.Start(t, haproxytest.Dir(t),
		testGlobal+poolBackend("x86", fe, 2)+poolBackend("arm", 0, 1)+spoaBackend(b.Addr))
	reg := prometheus.NewPedanticRegistry()
	c := NewClient(h.Socket, testwait.Bound)
	r := NewReadiness(c, []string{"x86", "arm"}, "192.0.2.1:22", time.Second, nil, reg)
	ctx := t.Context()
	slot1 := scaler.SlotKey{Pool: "x86", Slot: "slot1"}
	slot2 := scaler.SlotKey{Pool: "x86", Slot: "slot2"}

	// At start every slot is in maintenance at the placeholder.
	servers, err := r.Servers(ctx)
	if err != nil {
		t.Fatal(err)
	}
	want := map[scaler.SlotKey]scaler.ServerStatus{
		slot1:                        {Addr: placeholderAddr, Maint: true, Weight: 100},
		slot2:                        {Addr: placeholderAddr, Maint: true, Weight: 100},
		{Pool: "arm", Slot: "slot1"}: {Addr: placeholderAddr, Maint: true, Weight: 100},
	}
	if fmt.Sprint(servers) != fmt.Sprint(want) {
		t.Errorf("Servers at start = %v, want %v", servers, want)
	}
	if up, known := r.SPOAUp(); !up || !known {
		t.Errorf("SPOAUp = %v, %v; want up (its check passes against the banner)", up, known)
	}

	// Bind writes the address; the server stays in maintenance.
	if err := r.Bind(ctx, slot1, b.Addr); err != nil {
		t.Fatal(err)
	}
	if got := waitServer(t, r, slot1, "bound", func(s scaler.ServerStatus) bool { return s.Addr == b.Addr }); got.Up {
		t.Errorf("a server in maintenance is Up: %+v", got)
	}

	// Out of maintenance, its SSH check passes: Up.
	if out, err := c.Exec(ctx, "set server nba_x86/slot1 state ready"); err != nil || strings.TrimSpace(out) != "" {
		t.Fatalf("state ready: %q, %v", out, err)
	}
	waitServer(t, r, slot1, "Up", func(s scaler.ServerStatus) bool { return s.Up })

	// A server leaving maintenance is shown "UP" by HAProxy before its
	// first check; Readiness waits for that check. slot2 points at a closed
	// port, so it must never be reported Up: watched from right after it
	// left maintenance until HAProxy's checks took it DOWN.
	if err := r.Bind(ctx, slot2, fmt.Sprintf("127.0.0.1:%d", closed)); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Exec(ctx, "set server nba_x86/slot2 state ready"); err != nil {
		t.Fatal(err)
	}
	rounds := 0
	testwait.Until(t, "HAProxy to check slot2 and mark it DOWN", func() bool {
		servers, err := r.Servers(ctx)
		if err != nil {
			t.Fatal(err)
		}
		rounds++
		if servers[slot2].Up {
			t.Fatalf("slot2 (nothing listens) reported Up: %+v; HAProxy: %s", servers[slot2], serverStat(t, h, "nba_x86", "slot2").Status())
		}
		return strings.HasPrefix(serverStat(t, h, "nba_x86", "slot2").Status(), "DOWN")
	})
	t.Logf("slot2 not Up in %d reads until HAProxy marked it DOWN", rounds)

	// A session held through the frontend shows in Sessions and the gauge.
	conn, err := net.DialTimeout("tcp", fmt.Sprintf("127.0.0.1:%d", fe), testwait.Bound)
	if err != nil {
		t.Fatal(err)
	}
	_ = conn.SetReadDeadline(time.Now().Add(testwait.Bound))
	line, err := bufio.NewReader(conn).ReadString('\n')
	if err != nil || !strings.HasPrefix(line, "SSH-2.0-test") {
		t.Fatalf("banner through the frontend: %q, %v", line, err)
	}
	waitServer(t, r, slot1, "one session", func(s scaler.ServerStatus) bool { return s.Sessions == 1 })
	checkMetrics(t, reg, `
nix_builder_autoscaler_haproxy_queued_connections{pool="arm"} 0
nix_builder_autoscaler_haproxy_queued_connections{pool="x86"} 0
nix_builder_autoscaler_haproxy_server_sessions{pool="arm",slot="slot1"} 0
nix_builder_autoscaler_haproxy_server_sessions{pool="x86",slot="slot1"} 1
nix_builder_autoscaler_haproxy_server_sessions{pool="x86",slot="slot2"} 0
nix_builder_autoscaler_haproxy_up 1
nix_builder_autoscaler_spoa_up 1
`)
	conn.Close()
	waitServer(t, r, slot1, "no session", func(s scaler.ServerStatus) bool { return s.Sessions == 0 })

	// Bind("") restores the placeholder.
	if err := r.Bind(ctx, slot1, ""); err != nil {
		t.Fatal(err)
	}
	waitServer(t, r, slot1, "placeholder", func(s scaler.ServerStatus) bool { return s.Addr == placeholderAddr })

	// Bind refuses what is not ip:port before asking HAProxy.
	for _, addr := range []string{"builder.example:22", "100.64.0.1", "100.64.0.1:ssh", "100.64.0.1:70000"} {
		err := r.Bind(ctx, slot2, addr)
		if err == nil {
			t.Errorf("Bind(%q) succeeded", addr)
		} else if addr == "builder.example:22" && !strings.Contains(err.Error(), "hostnames are not accepted") {
			t.Errorf("Bind(%q) = %v, want it to say hostnames are not accepted", addr, err)
		}
	}
	// An unknown slot: HAProxy's answer, quoted.
	err = r.Bind(ctx, scaler.SlotKey{Pool: "x86", Slot: "slot9"}, b.Addr)
	if !errors.Is(err, ErrNotFound) || !strings.Contains(err.Error(), "No such server.") {
		t.Errorf("Bind(unknown slot) = %v, want ErrNotFound quoting HAProxy", err)
	}
	if v, ok := gaugeValue(t, reg, "nix_builder_autoscaler_haproxy_up"); !ok || v != 1 {
		t.Error("haproxy_up dropped after HAProxy refused a command")
	}

	// HAProxy stopped: Servers fails, and the metrics say so.
	if err := r.Bind(ctx, slot2, b.Addr); err != nil {
		t.Fatal(err)
	}
	h.Stop()
	if _, err := r.Servers(ctx); !errors.Is(err, ErrUnreachable) {
		t.Errorf("Servers with HAProxy stopped = %v, want ErrUnreachable", err)
	}
	if up, known := r.SPOAUp(); up || known {
		t.Errorf("SPOAUp with HAProxy stopped = %v, %v; want unknown", up, known)
	}
	checkMetrics(t, reg, `
nix_builder_autoscaler_haproxy_up 0
`)

	// After a restart (no state file) every server is back at the
	// placeholder: this is how the daemon notices it must bind again.
	h.Restart()
	servers, err = r.Servers(ctx)
	if err != nil {
		t.Fatal(err)
	}
	for k, s := range servers {
		if s.Addr != placeholderAddr || s.Up {
			t.Errorf("after restart %s = %+v, want down at %s", k, s, placeholderAddr)
		}
	}
	if len(servers) != 3 {
		t.Errorf("after restart %d servers, want 3", len(servers))
	}
}

// metrics gathers reg and writes the named families (all when none is
// named) one sample per line, `name{label="value",...} value`, sorted.
func metrics(t *testing.T, reg prometheus.Gatherer, names ...string) string {
	t.Helper()
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	var lines []string
	for _, mf := range mfs {
		if len(names) > 0 && !slices.Contains(names, mf.GetName()) {
			continue
		}
		for _, m := range mf.GetMetric() {
			var labels []string
			for _, l := range m.GetLabel() {
				labels = append(labels, fmt.Sprintf("%s=%q", l.GetName(), l.GetValue()))
			}
			name := mf.GetName()
			if len(labels) > 0 {
				name += "{" + strings.Join(labels, ",") + "}"
			}
			lines = append(lines, fmt.Sprintf("%s %g", name, m.GetGauge().GetValue()))
		}
	}
	slices.Sort(lines)
	return strings.Join(lines, "\n")
}

func checkMetrics(t *testing.T, reg prometheus.Gatherer, want string, names ...string) {
	t.Helper()
	if got := metrics(t, reg, names...); got != strings.TrimSpace(want) {
		t.Errorf("metrics:\n%s\nwant:\n%s", got, strings.TrimSpace(want))
	}
}

// gaugeValue gathers reg and returns the value of the named unlabelled gauge.
func gaugeValue(t *testing.T, reg prometheus.Gatherer, name string) (float64, bool) {
	t.Helper()
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() == name && len(mf.GetMetric()) == 1 {
			return mf.GetMetric()[0].GetGauge().GetValue(), true
		}
	}
	return 0, false
}

// TestReadinessWithAgent shows how agent-check replies (docs/design.md §3.2) and
// the SSH check combine into Up on HAProxy 2.6.12, for servers declared
// `disabled` like the generated ones.
func TestReadinessWithAgent(t *testing.T) {
	b := startBanner(t)
	agent := startAgent(t, map[string]string{
		"x86/slot1": "down #binding i-1",            // stays MAINT: no check runs
		"x86/slot2": "drain",                        // leaves MAINT; DRAIN once the check passes
		"x86/slot3": "up ready 100% maxconn:2 #i-3", // UP once the check passes
		"x86/slot4": "ready down #binding i-4",      // check runs and passes, but DOWN (agent)
		"x86/slot5": "maint",                        // MAINT
	})
	cfg := testGlobal + fmt.Sprintf(`backend nba_x86
    balance leastconn
    option tcp-check
    tcp-check expect rstring ^SSH-2\.0-
    default-server check inter 100ms fall 2 rise 1 agent-check agent-addr 127.0.0.1 agent-port %d agent-inter 100ms maxconn 2 weight 100
`, agent.Port)
	for i := 1; i <= 5; i++ {
		cfg += fmt.Sprintf("    server slot%d slot.nba.invalid:22 init-addr last,%s disabled agent-send \"x86/slot%d\\n\"\n", i, Placeholder, i)
	}
	h := haproxytest.Start(t, haproxytest.Dir(t), cfg)
	r := NewReadiness(NewClient(h.Socket, testwait.Bound), []string{"x86"}, "192.0.2.1:22", time.Second, nil, nil)
	for i := 1; i <= 5; i++ {
		if err := r.Bind(t.Context(), scaler.SlotKey{Pool: "x86", Slot: fmt.Sprintf("slot%d", i)}, b.Addr); err != nil {
			t.Fatal(err)
		}
	}
	want := map[string]bool{"slot1": false, "slot2": true, "slot3": true, "slot4": false, "slot5": false}
	// slot2 and slot3 come up once their SSH checks pass; slot4's check
	// passes too, while its agent holds it down.
	testwait.Until(t, "slot2 and slot3 Up, and slot4's SSH check passed", func() bool {
		servers, err := r.Servers(t.Context())
		if err != nil {
			t.Fatal(err)
		}
		chk := strings.TrimPrefix(serverStat(t, h, "nba_x86", "slot4").Str("check_status"), "* ")
		return servers[scaler.SlotKey{Pool: "x86", Slot: "slot2"}].Up && servers[scaler.SlotKey{Pool: "x86", Slot: "slot3"}].Up && chk == "L7OK"
	})
	// Then every slot's agent answers again, so HAProxy has applied an
	// answer of each given after that.
	asked := map[string]int{}
	for slot := range want {
		asked[slot] = agent.Answered("x86/" + slot)
	}
	testwait.Until(t, "two more agent checks of every slot", func() bool {
		for slot, n := range asked {
			if agent.Answered("x86/"+slot) < n+2 {
				return false
			}
		}
		return true
	})
	servers, err := r.Servers(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	for slot, up := range want {
		if got := servers[scaler.SlotKey{Pool: "x86", Slot: slot}]; got.Up != up || got.Addr != b.Addr {
			t.Errorf("%s = %+v, want Up %v at %s\n%s", slot, got, up, b.Addr, h.Cmd("show stat -1 4 -1"))
		}
	}
}

func TestReadinessSPOA(t *testing.T) {
	b := startBanner(t)
	closed := haproxytest.FreePort(t)
	for _, tc := range []struct {
		name        string
		spoa        string
		up, known   bool
		wantMetrics string
	}{
		{"agent up", spoaBackend(b.Addr), true, true, "nix_builder_autoscaler_spoa_up 1\n"},
		{"agent down", spoaBackend(fmt.Sprintf("127.0.0.1:%d", closed)), false, true, "nix_builder_autoscaler_spoa_up 0\n"},
		{"no agent backend", "", false, false, ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			h := haproxytest.Start(t, haproxytest.Dir(t), testGlobal+poolBackend("x86", 0, 1)+tc.spoa)
			reg := prometheus.NewPedanticRegistry()
			r := NewReadiness(NewClient(h.Socket, testwait.Bound), []string{"x86"}, "192.0.2.1:22", time.Second, nil, reg)
			var up, known bool
			// The check needs a round (inter 100ms) to see the agent down.
			if !testwait.Poll(testwait.Bound, func() bool {
				if _, err := r.Servers(t.Context()); err != nil {
					t.Fatal(err)
				}
				up, known = r.SPOAUp()
				return up == tc.up && known == tc.known
			}) {
				t.Errorf("SPOAUp = %v, %v after %v; want %v, %v", up, known, testwait.Bound, tc.up, tc.known)
			}
			checkMetrics(t, reg, tc.wantMetrics, "nix_builder_autoscaler_spoa_up")
		})
	}
}

// TestReadinessOneCallPerRound: one `show stat` gives the servers and the
// queues (a pool's backend queue plus its servers' queues; other backends'
// are not counted); only a HAProxy without the addr column costs a second
// call.
func TestReadinessOneCallPerRound(t *testing.T) {
	for _, tc := range []struct {
		name  string
		stat  string
		calls []string
	}{
		{"addr column (2.6.12)",
			"# pxname,svname,qcur,status,scur,check_status,addr,type\n" +
				"nba_x86,slot1,1,UP,2,L7OK,100.64.0.7:22,2\n" +
				"nba_x86,slot2,0,DOWN 1/2,0,L7OK,[fd7a::1]:22,2\n" +
				"nba_x86,BACKEND,3,UP,2,,,1\n" +
				"nba_spoa,spoa1,,UP,0,L4OK,127.0.0.1:9000,2\n" +
				"nba_spoa,BACKEND,5,UP,0,,,1\n" +
				"other,web1,7,UP,9,L7OK,10.0.0.1:80,2\n" +
				"other,BACKEND,9,UP,9,,,1\n",
			[]string{StatCmd}},
		{"no addr column: one more call",
			"# pxname,svname,qcur,status,scur,check_status,type\n" +
				"nba_x86,slot1,1,UP,2,L7OK,2\n" +
				"nba_x86,slot2,0,DOWN 1/2,0,L7OK,2\n" +
				"nba_x86,BACKEND,3,UP,2,,1\n" +
				"nba_spoa,spoa1,,UP,0,L4OK,2\n" +
				"nba_spoa,BACKEND,5,UP,0,,1\n" +
				"other,web1,7,UP,9,L7OK,2\n" +
				"other,BACKEND,9,UP,9,,1\n",
			[]string{StatCmd, "show servers state"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			f := startFakeSocket(t, func(cmd string) string {
				switch cmd {
				case StatCmd:
					return tc.stat + "\n"
				case "show servers state":
					return "1\n# be_id be_name srv_id srv_name srv_addr srv_op_state srv_admin_state srv_uweight srv_iweight srv_time_since_last_change srv_check_status srv_check_result srv_check_health srv_check_state srv_agent_state bk_f_forced_id srv_f_forced_id srv_fqdn srv_port\n" +
						"3 nba_x86 1 slot1 100.64.0.7 2 0 100 100 5 15 3 2 6 0 0 0 slot.nba.invalid 22\n" +
						"3 nba_x86 2 slot2 fd7a::1 0 0 100 100 5 15 3 2 6 0 0 0 slot.nba.invalid 22\n\n"
				}
				return "Unknown command\n\n"
			})
			reg := prometheus.NewPedanticRegistry()
			r := NewReadiness(NewClient(f.Path, testwait.Bound), []string{"x86"}, "192.0.2.1:22", time.Second, nil, reg)
			servers, queued, err := r.ServersAndQueues(t.Context())
			if err != nil {
				t.Fatal(err)
			}
			want := map[scaler.SlotKey]scaler.ServerStatus{
				{Pool: "x86", Slot: "slot1"}: {Addr: "100.64.0.7:22", Up: true, Healthy: true, Sessions: 2},
				// DOWN 1/2 with a passing check: healthy, not yet up.
				{Pool: "x86", Slot: "slot2"}: {Addr: "[fd7a::1]:22", Up: false, Healthy: true, Sessions: 0},
			}
			if fmt.Sprint(servers) != fmt.Sprint(want) {
				t.Errorf("Servers = %v, want %v", servers, want)
			}
			if want := map[string]int{"x86": 4}; fmt.Sprint(queued) != fmt.Sprint(want) {
				t.Errorf("queued = %v, want %v (backend 3 + slot1 1)", queued, want)
			}
			if got := f.Commands(); strings.Join(got, "|") != strings.Join(tc.calls, "|") {
				t.Errorf("commands sent = %q, want %q", got, tc.calls)
			}
			checkMetrics(t, reg, `
nix_builder_autoscaler_haproxy_queued_connections{pool="x86"} 4
`, "nix_builder_autoscaler_haproxy_queued_connections")
		})
	}
}

func TestReadinessBindCommands(t *testing.T) {
	f := startFakeSocket(t, func(cmd string) string {
		if strings.Contains(cmd, "slot9") {
			return "No such server.\n\n"
		}
		return "IP changed from '192.0.2.1' to 'x', port changed from '22' to 'y' by 'stats socket command'\n\n"
	})
	r := NewReadiness(NewClient(f.Path, testwait.Bound), []string{"x86"}, "192.0.2.1:22", time.Second, nil, nil)
	for _, tc := range []struct {
		slot, addr, cmd string
	}{
		{"slot1", "100.64.0.7:22", "set server nba_x86/slot1 addr 100.64.0.7 port 22"},
		{"slot2", "[fd7a:115c:a1e0::1]:2222", "set server nba_x86/slot2 addr fd7a:115c:a1e0::1 port 2222"},
		{"slot1", "", "set server nba_x86/slot1 addr 192.0.2.1 port 22"},
	} {
		if err := r.Bind(t.Context(), scaler.SlotKey{Pool: "x86", Slot: tc.slot}, tc.addr); err != nil {
			t.Errorf("Bind(%s, %q): %v", tc.slot, tc.addr, err)
		}
		if got := f.Commands(); got[len(got)-1] != tc.cmd {
			t.Errorf("Bind(%s, %q) sent %q, want %q", tc.slot, tc.addr, got[len(got)-1], tc.cmd)
		}
	}
	err := r.Bind(t.Context(), scaler.SlotKey{Pool: "x86", Slot: "slot9"}, "100.64.0.7:22")
	var ce *CommandError
	if !errors.As(err, &ce) || !errors.Is(err, ErrNotFound) || !strings.Contains(err.Error(), "x86/slot9") {
		t.Errorf("Bind(unknown) = %v, want a CommandError naming the slot", err)
	}
}

func TestReadinessHAProxyRefuses(t *testing.T) {
	// A socket at level user answers "Permission denied" to set server, but
	// show stat works; an answer that is no table fails Servers with a quote.
	f := startFakeSocket(t, func(cmd string) string { return "Permission denied\n\n" })
	reg := prometheus.NewPedanticRegistry()
	r := NewReadiness(NewClient(f.Path, testwait.Bound), []string{"x86"}, "192.0.2.1:22", time.Second, nil, reg)
	_, err := r.Servers(t.Context())
	var ce *CommandError
	if !errors.As(err, &ce) || !strings.Contains(err.Error(), "Permission denied") {
		t.Errorf("Servers = %v, want a CommandError quoting HAProxy", err)
	}
	checkMetrics(t, reg, `
nix_builder_autoscaler_haproxy_up 0
`)
	if err := r.Bind(t.Context(), scaler.SlotKey{Pool: "x86", Slot: "slot1"}, "100.64.0.7:22"); !errors.As(err, &ce) || !strings.Contains(err.Error(), "Permission denied") {
		t.Errorf("Bind = %v, want a CommandError quoting HAProxy", err)
	}
}

func TestServerUp(t *testing.T) {
	for _, tc := range []struct {
		status, check string
		up            bool
	}{
		{"UP", "L7OK", true},
		{"UP", "* L7OK", true},
		{"UP 1/3", "L4CON", true}, // still in rotation, counting down
		{"UP 1/3", "INI", false},  // just left maintenance, no check yet
		{"UP 1/3", "* INI", false},
		{"DRAIN", "L7OK", true},
		{"DRAIN (agent)", "L7OK", true},
		{"DOWN", "L4CON", false},
		{"DOWN 1/2", "L7OK", false}, // counting up to rise
		{"DOWN (agent)", "L7OK", false},
		{"NOLB", "L7OK", false},
		{"NOLB 1/2", "L7OK", false},
		{"MAINT", "", false},
		{"MAINT (resolution)", "", false},
		{"MAINT (via nba_x86/slot1)", "", false},
		{"no check", "", true},
		{"", "", false},
	} {
		if got := serverUp(tc.status, tc.check); got != tc.up {
			t.Errorf("serverUp(%q, %q) = %v, want %v", tc.status, tc.check, got, tc.up)
		}
	}
}

func TestCheckPassed(t *testing.T) {
	for status, want := range map[string]bool{"L7OK": true, "* L7OK": true, "L4OK": true, "L6OK": true,
		"INI": false, "L4CON": false, "L7RSP": false, "L4TOUT": false, "": false, "* INI": false} {
		if got := checkPassed(status); got != want {
			t.Errorf("checkPassed(%q) = %v, want %v", status, got, want)
		}
	}
}

// TestReusedSlotNotHealthyFromStaleCheck: HAProxy shows a server's last
// check result (the previous builder's L7OK) right after `set server addr`;
// the new builder counts as healthy only once a check of it failed or ran,
// or after 3 check intervals.
func TestReusedSlotNotHealthyFromStaleCheck(t *testing.T) {
	var mu sync.Mutex
	row := "DOWN (agent),L7OK"
	f := startFakeSocket(t, func(cmd string) string {
		mu.Lock()
		defer mu.Unlock()
		if cmd == StatCmd {
			st, chk, _ := strings.Cut(row, ",")
			return "# pxname,svname,status,scur,check_status,addr,type\n" +
				"nba_x86,slot1," + st + ",0," + chk + ",10.0.0.9:22,2\n\n"
		}
		return "\n" // set server addr: accepted
	})
	set := func(status, check string) {
		mu.Lock()
		row = status + "," + check
		mu.Unlock()
	}
	r := NewReadiness(NewClient(f.Path, testwait.Bound), []string{"x86"}, "192.0.2.1:22", time.Hour, nil, nil)
	key := scaler.SlotKey{Pool: "x86", Slot: "slot1"}
	healthy := func() bool {
		t.Helper()
		m, err := r.Servers(t.Context())
		if err != nil {
			t.Fatal(err)
		}
		return m[key].Healthy
	}
	if !healthy() {
		t.Fatal("a slot this daemon never bound reports HAProxy's check as is")
	}
	if err := r.Bind(t.Context(), key, "10.0.0.9:22"); err != nil {
		t.Fatal(err)
	}
	if healthy() {
		t.Fatal("right after a bind, the previous builder's L7OK counted as the new builder's")
	}
	set("DOWN (agent)", "L4CON") // the new builder's first check fails
	if healthy() {
		t.Fatal("failing check reported healthy")
	}
	set("DOWN (agent)", "L7OK") // and then passes
	if !healthy() {
		t.Fatal("a passing check after a failing one is the new builder's; want healthy")
	}
}

// TestQuiesce: on a real HAProxy, Quiesce puts a draining slot's server in
// maintenance and counts the session still open on it; the agent's "drain"
// answers turn that into drain, not up; the count drops to 0 once the
// session ends; an agent "ready" (an operator's undrain) brings it back up.
func TestQuiesce(t *testing.T) {
	b := startBanner(t)
	var reply atomic.Value
	reply.Store("up ready 100% maxconn:2 #i-1")
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var answered atomic.Int64
	serveLines(t, l, testwait.Bound, func(string) (string, bool) {
		defer answered.Add(1)
		return reply.Load().(string) + "\n", true
	})
	fe := haproxytest.FreePort(t)
	cfg := testGlobal + fmt.Sprintf(`frontend fe
    bind 127.0.0.1:%d
    default_backend nba_x86

backend nba_x86
    balance leastconn
    option tcp-check
    tcp-check expect rstring ^SSH-2\.0-
    default-server check inter 100ms fall 2 rise 1 agent-check agent-addr 127.0.0.1 agent-port %d agent-inter 100ms maxconn 2 weight 100
    server slot1 slot.nba.invalid:22 init-addr last,%s disabled agent-send "x86/slot1\n"
`, fe, l.Addr().(*net.TCPAddr).Port, Placeholder)
	h := haproxytest.Start(t, haproxytest.Dir(t), cfg)
	r := NewReadiness(NewClient(h.Socket, testwait.Bound), []string{"x86"}, placeholderAddr, time.Second, nil, nil)
	key := scaler.SlotKey{Pool: "x86", Slot: "slot1"}
	if err := r.Bind(t.Context(), key, b.Addr); err != nil {
		t.Fatal(err)
	}
	waitServer(t, r, key, "up", func(s scaler.ServerStatus) bool { return s.Up })

	session, err := net.Dial("tcp", fmt.Sprintf("127.0.0.1:%d", fe))
	if err != nil {
		t.Fatal(err)
	}
	defer session.Close()
	_ = session.SetReadDeadline(time.Now().Add(testwait.Bound))
	if line, err := bufio.NewReader(session).ReadString('\n'); err != nil || !strings.HasPrefix(line, "SSH-2.0-") {
		t.Fatalf("session through HAProxy: %q, %v", line, err)
	}
	reply.Store("drain") // the slot is draining, as the daemon's agent says then
	waitServer(t, r, key, "draining with the session", func(s scaler.ServerStatus) bool { return s.Sessions == 1 })

	n, err := r.Quiesce(t.Context(), key)
	if err != nil || n != 1 {
		t.Fatalf("Quiesce with a session open = %d, %v; want 1", n, err)
	}
	// Let a few agent checks answer "drain" meanwhile.
	seen := answered.Load()
	testwait.Until(t, "three more agent answers", func() bool { return answered.Load() >= seen+3 })
	// HAProxy 2.6 lifts forced maintenance on the agent's next state
	// answer; "drain" still keeps balancing away (weight 0).
	if st := serverStat(t, h, "nba_x86", "slot1").Status(); !strings.HasPrefix(st, "MAINT") && !strings.HasPrefix(st, "DRAIN") {
		t.Fatalf("after Quiesce and the agent's drain answers, status %q; want MAINT or DRAIN", st)
	}

	session.Close()
	if !testwait.Poll(testwait.Bound, func() bool {
		if n, err = r.Quiesce(t.Context(), key); err != nil {
			t.Fatal(err)
		}
		return n == 0
	}) {
		t.Fatalf("Quiesce after the session closed = %d after %v; want 0", n, testwait.Bound)
	}

	reply.Store("up ready 100% maxconn:2 #i-1")
	waitServer(t, r, key, "up again after an agent ready", func(s scaler.ServerStatus) bool { return s.Up })

	if _, err := r.Quiesce(t.Context(), scaler.SlotKey{Pool: "x86", Slot: "slot9"}); err == nil {
		t.Error("Quiesce of a server HAProxy does not have succeeded")
	}
}

func mustStats(t *testing.T, h *haproxytest.Instance) []Stat {
	t.Helper()
	stats, err := ParseStat(h.Cmd("show stat"))
	if err != nil {
		t.Fatal(err)
	}
	return stats
}

// TestReadinessQueuedOnGeneratedConfig: on HAProxy running the generated
// configuration, with one builder up whose maxconn (max_jobs, from the
// agent check) is 1 and taken, connections that come next wait in a queue,
// and Readiness reads them as the pool's queued connections, each once: one
// the SPOE agent sent to the full slot waits in that server's queue, one
// HAProxy balanced itself (the agent set no slot) in the backend's. They
// leave the count as they are served: the backend's queue by a builder
// that comes up, a server's only by that server.
func TestReadinessQueuedOnGeneratedConfig(t *testing.T) {
	l := startSPOELab(t, time.Minute)
	if out := l.h.Cmd(fmt.Sprintf("set server nba_x86/slot2 addr 127.0.0.1 port %d", l.builder)); !strings.Contains(out, "changed") {
		t.Fatalf("set server addr: %s", out)
	}
	l.ag.set("x86/slot2", "up ready 100% maxconn:1")
	testwait.Until(t, "slot2 UP with maxconn 1 (the agent's)", func() bool {
		st := stats(t, l.h)["nba_x86/slot2"]
		return st["status"] == "UP" && st["slim"] == "1"
	})
	reg := prometheus.NewPedanticRegistry()
	r := NewReadiness(NewClient(l.h.Socket, testwait.Bound), []string{"x86"}, placeholderAddr, 200*time.Millisecond, nil, reg)
	slot2 := scaler.SlotKey{Pool: "x86", Slot: "slot2"}
	waitServer(t, r, slot2, "up", func(s scaler.ServerStatus) bool { return s.Up })
	queued := func() map[string]int {
		t.Helper()
		_, q, err := r.ServersAndQueues(t.Context())
		if err != nil {
			t.Fatal(err)
		}
		return q
	}
	if q := queued(); len(q) != 0 {
		t.Fatalf("queued before any connection = %v, want none", q)
	}
	waitQueued := func(what string, n int) {
		t.Helper()
		var last map[string]int
		if !testwait.Poll(testwait.Bound, func() bool {
			last = queued()
			return last["x86"] == n && len(last) == min(n, 1)
		}) {
			t.Fatalf("%s: queued %v after %v, want x86: %d; show stat: slot2 qcur %s, backend qcur %s", what, last, testwait.Bound,
				n, stats(t, l.h)["nba_x86/slot2"]["qcur"], stats(t, l.h)["nba_x86/BACKEND"]["qcur"])
		}
	}
	// dial connects through the frontend; the banner, or the error, comes
	// on the channel once the builder serves the connection.
	dial := func() (net.Conn, chan error) {
		t.Helper()
		c, err := net.DialTimeout("tcp", l.frontend, testwait.Bound)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
		served := make(chan error, 1)
		go func() {
			_ = c.SetReadDeadline(time.Now().Add(testwait.Bound)) // a hang guard
			line, err := bufio.NewReader(c).ReadString('\n')
			if err == nil && !strings.HasPrefix(line, "SSH-2.0-") {
				err = fmt.Errorf("not a banner: %q", line)
			}
			served <- err
		}()
		return c, served
	}

	l.spoa.setAnswer(func(map[string]string) (string, string) { return wire.VarSlot, "slot2" })
	c1, served1 := dial()
	l.spoa.next(t)
	if err := <-served1; err != nil {
		t.Fatalf("first connection: %v", err)
	}
	// The agent sends the next one to slot2 too (its view lags): it waits
	// in slot2's queue.
	c2, served2 := dial()
	l.spoa.next(t)
	waitQueued("a connection sent to the full slot", 1)
	if st := stats(t, l.h); st["nba_x86/slot2"]["qcur"] != "1" || st["nba_x86/BACKEND"]["qcur"] != "0" {
		t.Errorf("show stat qcur: slot2 %s, backend %s; want 1 (use-server queues on the server), 0",
			st["nba_x86/slot2"]["qcur"], st["nba_x86/BACKEND"]["qcur"])
	}
	// No slot from the agent: HAProxy balances, and the connection waits
	// in the backend's queue, which does not count the server's.
	l.spoa.setAnswer(func(map[string]string) (string, string) { return "", "" })
	c3, served3 := dial()
	l.spoa.next(t)
	waitQueued("one more connection balanced by HAProxy", 2)
	if st := stats(t, l.h); st["nba_x86/slot2"]["qcur"] != "1" || st["nba_x86/BACKEND"]["qcur"] != "1" {
		t.Errorf("show stat qcur: slot2 %s, backend %s; want 1, 1", st["nba_x86/slot2"]["qcur"], st["nba_x86/BACKEND"]["qcur"])
	}
	checkMetrics(t, reg, `
nix_builder_autoscaler_haproxy_queued_connections{pool="x86"} 2
`, "nix_builder_autoscaler_haproxy_queued_connections")
	if q := r.Queued(); q["x86"] != 2 {
		t.Errorf("Queued() = %v, want the last read's x86: 2", q)
	}

	// A second builder comes up (slot3): the connection in the backend's
	// queue goes to it; the one sent to slot2 stays in slot2's queue.
	if out := l.h.Cmd(fmt.Sprintf("set server nba_x86/slot3 addr 127.0.0.1 port %d", l.builder)); !strings.Contains(out, "changed") {
		t.Fatalf("set server addr: %s", out)
	}
	l.ag.set("x86/slot3", "up ready 100% maxconn:1")
	if err := <-served3; err != nil {
		t.Fatalf("the connection in the backend's queue, once slot3 is up: %v", err)
	}
	if st := stats(t, l.h); st["nba_x86/slot3"]["scur"] != "1" || st["nba_x86/slot2"]["qcur"] != "1" {
		t.Errorf("slot3 scur %s, slot2 qcur %s; want 1 (the backend's queued connection went to the new server), 1 (the one sent to slot2 waits for slot2)",
			st["nba_x86/slot3"]["scur"], st["nba_x86/slot2"]["qcur"])
	}
	waitQueued("the backend's queued connection served by the new builder", 1)

	// slot2's session ends: the connection in its queue takes its place.
	c1.Close()
	if err := <-served2; err != nil {
		t.Fatalf("the connection in slot2's queue, once slot2 has room: %v", err)
	}
	waitQueued("every queued connection served", 0)
	checkMetrics(t, reg, `
nix_builder_autoscaler_haproxy_queued_connections{pool="x86"} 0
`, "nix_builder_autoscaler_haproxy_queued_connections")
	c2.Close()
	c3.Close()
}
