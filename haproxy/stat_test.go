package haproxy

import (
	"bufio"
	"flag"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"

	"guardianproject.dev/ops/nix-builder-autoscaler/haproxy/haproxytest"
	"guardianproject.dev/ops/nix-builder-autoscaler/internal/testwait"
)

var captureRuntime = flag.Bool("capture-runtime", false,
	"capture runtime-API answers of the installed HAProxy into testdata/runtime/ (go test ./haproxy -run TestCaptureRuntime -capture-runtime)")

// Captured outputs of HAProxy 2.6.12 (Debian 12), written by TestCaptureRuntime.
const (
	capturedStat         = "testdata/runtime/show-stat-2.6.12.csv"
	capturedStatServers  = "testdata/runtime/show-stat-servers-2.6.12.csv"
	capturedServersState = "testdata/runtime/show-servers-state-2.6.12.txt"
)

// TestCaptureRuntime starts a HAProxy with servers in every state the
// daemon meets and saves its `show stat` and `show servers state` answers.
// It runs only with -capture-runtime.
func TestCaptureRuntime(t *testing.T) {
	if !*captureRuntime {
		t.Skip("run with -capture-runtime to capture testdata/runtime/ from the installed HAProxy")
	}
	out, err := exec.Command(haproxytest.Binary(t), "-v").Output()
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(string(out), "version 2.6.12") {
		t.Fatalf("the captures are named for HAProxy 2.6.12; this is %s", strings.SplitN(string(out), "\n", 2)[0])
	}
	b := startBanner(t)
	closed := haproxytest.FreePort(t)
	agent := startAgent(t, map[string]string{
		"x86/slot7": "drain",
		"x86/slot8": "ready down #binding i-0123",
	})
	fe := haproxytest.FreePort(t)
	cfg := testGlobal + fmt.Sprintf(`
frontend nba_x86
    bind 127.0.0.1:%[1]d
    default_backend nba_x86

backend nba_x86
    balance leastconn
    option tcp-check
    tcp-check expect rstring ^SSH-2\.0-
    default-server check inter 100ms fall 2 rise 1 maxconn 4 weight 100
    # UP with a session
    server slot1 slot.nba.invalid:22 init-addr last,192.0.2.1 disabled
    # DRAIN (CLI)
    server slot2 slot.nba.invalid:22 init-addr last,192.0.2.1 disabled
    # MAINT at the placeholder
    server slot3 slot.nba.invalid:22 init-addr last,192.0.2.1 disabled
    # MAINT (resolution): no address at all
    server slot4 slot.nba.invalid:22 init-addr none disabled
    # DOWN: ready, but nothing listens
    server slot5 slot.nba.invalid:22 init-addr last,192.0.2.1 disabled
    # MAINT at an IPv6 address
    server slot6 slot.nba.invalid:22 init-addr last,192.0.2.1 disabled
    # DRAIN (agent)
    server slot7 slot.nba.invalid:22 init-addr last,192.0.2.1 disabled agent-check agent-addr 127.0.0.1 agent-port %[2]d agent-inter 100ms agent-send "x86/slot7\n"
    # DOWN (agent)
    server slot8 slot.nba.invalid:22 init-addr last,192.0.2.1 disabled agent-check agent-addr 127.0.0.1 agent-port %[2]d agent-inter 100ms agent-send "x86/slot8\n"

`, fe, agent.Port) + poolBackend("arm", 0, 1) + fmt.Sprintf("    # no check\n    server slot2 %s no-check\n\n", b.Addr) + spoaBackend(b.Addr)
	h := haproxytest.Start(t, haproxytest.Dir(t), cfg)
	for _, cmd := range []string{
		fmt.Sprintf("set server nba_x86/slot1 addr 127.0.0.1 port %d", b.Port),
		"set server nba_x86/slot1 state ready",
		fmt.Sprintf("set server nba_x86/slot2 addr 127.0.0.1 port %d", b.Port),
		"set server nba_x86/slot2 state drain",
		fmt.Sprintf("set server nba_x86/slot5 addr 127.0.0.1 port %d", closed),
		"set server nba_x86/slot5 state ready",
		fmt.Sprintf("set server nba_x86/slot6 addr ::1 port %d", b.Port),
		fmt.Sprintf("set server nba_x86/slot7 addr 127.0.0.1 port %d", b.Port),
		fmt.Sprintf("set server nba_x86/slot8 addr 127.0.0.1 port %d", b.Port),
	} {
		t.Logf("%s: %s", cmd, strings.TrimSpace(h.Cmd(cmd)))
	}
	want := map[string]string{"nba_x86/slot1": "UP", "nba_x86/slot2": "DRAIN", "nba_x86/slot5": "DOWN",
		"nba_x86/slot7": "DRAIN (agent)", "nba_x86/slot8": "DOWN (agent)", "nba_spoa/spoa1": "UP"}
	var conn net.Conn
	defer func() {
		if conn != nil {
			conn.Close()
		}
	}()
	var last string
	if !testwait.Poll(testwait.Bound, func() bool {
		last = h.Cmd("show stat")
		stats, err := ParseStat(last)
		if err != nil {
			t.Fatal(err)
		}
		ok := true
		slot1Up := false
		for _, s := range stats {
			w, found := want[s.Proxy()+"/"+s.Server()]
			if found && s.Status() != w {
				ok = false
			}
			slot1Up = slot1Up || s.Proxy() == "nba_x86" && s.Server() == "slot1" && s.Status() == "UP"
		}
		if conn == nil && slot1Up {
			// A session on slot1, once it is UP.
			c, err := net.DialTimeout("tcp", fmt.Sprintf("127.0.0.1:%d", fe), testwait.Bound)
			if err == nil {
				_ = c.SetReadDeadline(time.Now().Add(testwait.Bound))
				if line, err := bufio.NewReader(c).ReadString('\n'); err == nil && strings.HasPrefix(line, "SSH-2.0-") {
					conn = c
				} else {
					c.Close()
				}
			}
		}
		return ok && conn != nil
	}) {
		t.Fatalf("servers did not reach the wanted states in %v:\n%s", testwait.Bound, last)
	}
	if err := os.MkdirAll("testdata/runtime", 0o755); err != nil {
		t.Fatal(err)
	}
	for path, cmd := range map[string]string{
		capturedStat:         "show stat",
		capturedStatServers:  statServersCmd,
		capturedServersState: "show servers state",
	} {
		if err := os.WriteFile(path, []byte(h.Cmd(cmd)), 0o644); err != nil {
			t.Fatal(err)
		}
		t.Logf("wrote %s (%s)", path, cmd)
	}
}

func readCapture(t *testing.T, path string) string {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatalf("%v (recapture with: go test ./haproxy -run TestCaptureRuntime -capture-runtime)", err)
	}
	return string(b)
}

// The servers of the captured configuration (see TestCaptureRuntime).
var capturedServers = []struct {
	proxy, server, status, checkStatus string
	addr                               string // regexp
	scur                               int64
	up                                 bool
}{
	{"nba_x86", "slot1", "UP", "L7OK", `^127\.0\.0\.1:\d+$`, 1, true},
	{"nba_x86", "slot2", "DRAIN", "L7OK", `^127\.0\.0\.1:\d+$`, 0, true},
	{"nba_x86", "slot3", "MAINT", "", `^192\.0\.2\.1:22$`, 0, false},
	{"nba_x86", "slot4", "MAINT (resolution)", "", `^$`, 0, false},
	{"nba_x86", "slot5", "DOWN", "L4CON", `^127\.0\.0\.1:\d+$`, 0, false},
	{"nba_x86", "slot6", "MAINT", "", `^\[::1\]:\d+$`, 0, false},
	{"nba_x86", "slot7", "DRAIN (agent)", "L7OK", `^127\.0\.0\.1:\d+$`, 0, true},
	{"nba_x86", "slot8", "DOWN (agent)", "L7OK", `^127\.0\.0\.1:\d+$`, 0, false},
	{"nba_arm", "slot1", "MAINT", "", `^192\.0\.2\.1:22$`, 0, false},
	{"nba_arm", "slot2", "no check", "", `^127\.0\.0\.1:\d+$`, 0, true},
	{"nba_spoa", "spoa1", "UP", "L4OK", `^127\.0\.0\.1:\d+$`, 0, true},
}

func TestParseStatCaptured(t *testing.T) {
	for _, path := range []string{capturedStat, capturedStatServers} {
		t.Run(filepath.Base(path), func(t *testing.T) {
			stats, err := ParseStat(readCapture(t, path))
			if err != nil {
				t.Fatal(err)
			}
			byName := map[string]Stat{}
			var proxyLines int
			for _, s := range stats {
				if !s.IsServer() {
					proxyLines++
					if s.Server() != "FRONTEND" && s.Server() != "BACKEND" {
						t.Errorf("non-server line %s/%s", s.Proxy(), s.Server())
					}
					continue
				}
				byName[s.Proxy()+"/"+s.Server()] = s
			}
			if path == capturedStatServers && proxyLines != 0 {
				t.Errorf("%q printed %d frontend/backend lines, want servers only", statServersCmd, proxyLines)
			}
			if path == capturedStat && proxyLines == 0 {
				t.Error("show stat printed no frontend/backend lines")
			}
			if len(byName) != len(capturedServers) {
				t.Errorf("got %d servers, want %d", len(byName), len(capturedServers))
			}
			for _, w := range capturedServers {
				s, ok := byName[w.proxy+"/"+w.server]
				if !ok {
					t.Errorf("%s/%s missing", w.proxy, w.server)
					continue
				}
				if s.Status() != w.status || s.Int("scur") != w.scur || !regexp.MustCompile(w.addr).MatchString(s.Addr()) ||
					strings.TrimPrefix(s.Str("check_status"), "* ") != w.checkStatus {
					t.Errorf("%s/%s: status %q scur %d addr %q check_status %q; want %q %d %s %q", w.proxy, w.server,
						s.Status(), s.Int("scur"), s.Addr(), s.Str("check_status"), w.status, w.scur, w.addr, w.checkStatus)
				}
				if !s.Has("addr") || !s.Has("scur") {
					t.Errorf("%s/%s lacks the addr or scur column", w.proxy, w.server)
				}
				if w.proxy != SPOABackend {
					if got := serverUp(s.Status(), s.Str("check_status")); got != w.up {
						t.Errorf("%s/%s (%s): serverUp = %v, want %v", w.proxy, w.server, s.Status(), got, w.up)
					}
				}
			}
		})
	}
}

func TestParseServersStateCaptured(t *testing.T) {
	states, err := ParseServersState(readCapture(t, capturedServersState))
	if err != nil {
		t.Fatal(err)
	}
	got := map[string]ServerState{}
	for _, s := range states {
		got[s.Backend()+"/"+s.Server()] = s
	}
	for _, w := range capturedServers {
		s, ok := got[w.proxy+"/"+w.server]
		if !ok {
			t.Errorf("%s/%s missing", w.proxy, w.server)
			continue
		}
		if !regexp.MustCompile(w.addr).MatchString(s.Addr()) {
			t.Errorf("%s/%s: Addr %q, want %s", w.proxy, w.server, s.Addr(), w.addr)
		}
	}
	if s := got["nba_x86/slot3"]; s.AdminState() != 0x05 || s.OpState() != 0 || s.Str("srv_fqdn") != "slot.nba.invalid" {
		t.Errorf("slot3 (disabled): admin %d op %d fqdn %q; want 5 (forced maintenance, declared disabled), 0 (stopped), slot.nba.invalid",
			s.AdminState(), s.OpState(), s.Str("srv_fqdn"))
	}
	if s := got["nba_x86/slot1"]; s.OpState() != 2 || s.AdminState()&0x23 != 0 {
		t.Errorf("slot1 (up): admin %d op %d; want no maintenance bit, 2 (running)", s.AdminState(), s.OpState())
	}
	if s := got["nba_x86/slot4"]; s.Str("srv_addr") != "-" || s.AdminState()&0x20 == 0 {
		t.Errorf("slot4 (init-addr none): srv_addr %q admin %d; want -, the resolution bit", s.Str("srv_addr"), s.AdminState())
	}
}

func TestParseStatColumns(t *testing.T) {
	for _, tc := range []struct {
		name string
		in   string
		want []string // proxy/server status addr scur, one per line
	}{
		{"reordered and extra columns",
			"# status,new_column,svname,addr,pxname,scur,another\n" +
				"UP,x,slot1,10.0.0.1:22,nba_x86,3,y\n" +
				"MAINT,,slot2,,nba_x86,,\n",
			[]string{"nba_x86/slot1 UP 10.0.0.1:22 3", "nba_x86/slot2 MAINT  0"}},
		{"no addr column (older HAProxy)",
			"# pxname,svname,scur,status\nnba_x86,slot1,2,UP 1/3\n",
			[]string{"nba_x86/slot1 UP 1/3  2"}},
		{"short and long lines, trailing comma, blank lines",
			"# pxname,svname,status,scur,\n\nnba_x86,slot1\nnba_x86,slot2,DOWN,1,extra,more\n\n",
			[]string{"nba_x86/slot1  0", "nba_x86/slot2 DOWN 1"}},
		{"quoted field with a comma",
			"# pxname,svname,agent_desc,status\nnba_x86,slot1,\"i-1, c7i\",UP\n",
			[]string{"nba_x86/slot1 UP 0"}},
		{"non-numeric counter reads 0",
			"# pxname,svname,status,scur\nnba_x86,slot1,UP,lots\n",
			[]string{"nba_x86/slot1 UP 0"}},
		{"CRLF line ends",
			"# pxname,svname,status,scur\r\nnba_x86,slot1,UP,1\r\n",
			[]string{"nba_x86/slot1 UP 1"}},
		{"non-canonical IPv6 address",
			"# pxname,svname,status,addr\nnba_x86,slot1,UP,[fd7a:0:0::1]:22\n",
			[]string{"nba_x86/slot1 UP [fd7a::1]:22 0"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			stats, err := ParseStat(tc.in)
			if err != nil {
				t.Fatal(err)
			}
			var got []string
			for _, s := range stats {
				line := s.Proxy() + "/" + s.Server() + " " + s.Status()
				if s.Has("addr") {
					line += " " + s.Addr()
				} else if strings.Contains(tc.name, "older") {
					line += " "
				}
				got = append(got, fmt.Sprintf("%s %d", line, s.Int("scur")))
			}
			if strings.Join(got, "\n") != strings.Join(tc.want, "\n") {
				t.Errorf("got\n%s\nwant\n%s", strings.Join(got, "\n"), strings.Join(tc.want, "\n"))
			}
		})
	}
	stats, _ := ParseStat("# pxname,svname,agent_desc,status\nnba_x86,slot1,\"i-1, c7i\",UP\n")
	if got := stats[0].Str("agent_desc"); got != "i-1, c7i" {
		t.Errorf("quoted agent_desc = %q", got)
	}
}

func TestParseErrors(t *testing.T) {
	for _, in := range []string{
		"",
		"\n\n",
		"Permission denied\n\n",
		"Unknown command, but maybe one of the following ones is a better match:\n  help\n\n",
		"pxname,svname\nnba_x86,slot1\n",
		"# a,b,c\n1,2,3\n",
	} {
		if stats, err := ParseStat(in); err == nil {
			t.Errorf("ParseStat(%q) = %v, want an error", in, stats)
		} else if strings.HasPrefix(in, "Permission") && !strings.Contains(err.Error(), "Permission denied") {
			t.Errorf("ParseStat(%q) error %q does not quote the answer", in, err)
		}
	}
	for _, in := range []string{
		"",
		"Can't find backend.\n\n",
		"1\nbe_id be_name\n",
		"1\n# a b c\n1 2 3\n",
		"# be_id be_name srv_id srv_name\n3 nba_x86 1 slot1\n",
	} {
		if states, err := ParseServersState(in); err == nil {
			t.Errorf("ParseServersState(%q) = %v, want an error", in, states)
		}
	}
	// Extra and missing values on a servers-state line.
	states, err := ParseServersState("1\n# be_id be_name srv_id srv_name srv_addr srv_port\n3 nba_x86 1 slot1 10.0.0.1 22 extra\n3 nba_x86 2 slot2\n\n")
	if err != nil {
		t.Fatal(err)
	}
	if len(states) != 2 || states[0].Addr() != "10.0.0.1:22" || states[1].Addr() != "" || states[1].Server() != "slot2" {
		t.Errorf("states = %+v", states)
	}
}

var fuzzSeeds = []string{
	"",
	"#",
	"# pxname,svname\n",
	"# pxname,svname,status,addr,scur\nnba_x86,slot1,UP,[::1]:22,1\n",
	"# pxname,svname,qcur,status,type\nnba_x86,slot1,1,UP,2\nnba_x86,BACKEND,2,UP,1\n",
	"# pxname,svname,\"status\nx,\"y,\"\"\"\n",
	"1\n# be_id be_name srv_id srv_name srv_addr\n3 nba_x86 1 slot1 10.0.0.1\n",
	"1\n#\n",
	"\x00\xff,\n# \n,,,,\n",
}

func FuzzParseStat(f *testing.F) {
	for _, s := range fuzzSeeds {
		f.Add(s)
	}
	for _, p := range []string{capturedStat, capturedStatServers} {
		if b, err := os.ReadFile(p); err == nil {
			f.Add(string(b))
		}
	}
	f.Fuzz(func(t *testing.T, in string) {
		stats, err := ParseStat(in)
		if err != nil {
			return
		}
		// The fast path (no quotes, no CR) reads what encoding/csv reads.
		if header, body, err := splitHeader(in, "show stat", 0); err == nil && !strings.ContainsAny(body, "\"\r") {
			names, _ := readCSVLine(header)
			for i := range names {
				names[i] = strings.TrimSpace(names[i])
			}
			index := map[string]int{}
			for i, n := range names {
				if _, dup := index[n]; !dup {
					index[n] = i
				}
			}
			fast := splitStat(body, names, index)
			slow, err := csvStat(body, names, index)
			if err != nil {
				t.Fatalf("csv failed where the fast path did not: %v", err)
			}
			if len(fast) != len(slow) {
				t.Fatalf("fast path: %d lines, csv: %d", len(fast), len(slow))
			}
			for i := range fast {
				if !slices.Equal(fast[i].fields(), slow[i].fields()) {
					t.Fatalf("line %d: fast %q, csv %q", i, fast[i].fields(), slow[i].fields())
				}
			}
		}
		for _, s := range stats {
			_, _, _, _, _ = s.Proxy(), s.Server(), s.Status(), s.Addr(), s.IsServer()
			_, _ = s.Int("scur"), s.Int("qcur")
			_ = serverUp(s.Status(), s.Str("check_status"))
		}
	})
}

func FuzzParseServersState(f *testing.F) {
	for _, s := range fuzzSeeds {
		f.Add(s)
	}
	if b, err := os.ReadFile(capturedServersState); err == nil {
		f.Add(string(b))
	}
	f.Fuzz(func(t *testing.T, in string) {
		states, err := ParseServersState(in)
		if err != nil {
			return
		}
		for _, s := range states {
			_, _, _, _, _ = s.Backend(), s.Server(), s.Addr(), s.OpState(), s.AdminState()
		}
	})
}

// TestParseGarbage feeds random bytes and mutations of the captures to the
// parsers: none may panic.
func TestParseGarbage(t *testing.T) {
	var inputs []string
	for _, p := range []string{capturedStat, capturedServersState} {
		b := readCapture(t, p)
		for i := 0; i < len(b); i += 37 {
			inputs = append(inputs, b[:i], b[i:], b[:i]+"\"\x00,\n"+b[i:])
		}
	}
	seed := uint32(1)
	for range 300 {
		var sb strings.Builder
		for range 200 {
			seed = seed*1664525 + 1013904223
			const chars = "#,\n \"ab1-:[]/\x00\xff"
			sb.WriteByte(chars[int(seed>>24)%len(chars)])
		}
		inputs = append(inputs, sb.String(), "# pxname,svname\n"+sb.String(), "1\n# be_name srv_name srv_addr srv_port\n"+sb.String())
	}
	for _, in := range inputs {
		func() {
			defer func() {
				if r := recover(); r != nil {
					t.Fatalf("panic on %q: %v", in, r)
				}
			}()
			if stats, err := ParseStat(in); err == nil {
				for _, s := range stats {
					_, _ = s.Addr(), serverUp(s.Status(), s.Str("check_status"))
				}
			}
			if states, err := ParseServersState(in); err == nil {
				for _, s := range states {
					_ = s.Addr()
				}
			}
		}()
	}
}
