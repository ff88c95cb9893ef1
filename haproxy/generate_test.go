package haproxy

import (
	"bufio"
	"bytes"
	"encoding/csv"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/negasus/haproxy-spoe-go/action"
	"github.com/negasus/haproxy-spoe-go/agent"
	"github.com/negasus/haproxy-spoe-go/logger"
	"github.com/negasus/haproxy-spoe-go/request"

	"guardianproject.dev/ops/nix-builder-autoscaler/haproxy/haproxytest"
	"guardianproject.dev/ops/nix-builder-autoscaler/internal/testwait"
	"guardianproject.dev/ops/nix-builder-autoscaler/spoa/wire"
)

var updateGolden = flag.Bool("update", false, "rewrite testdata/golden/*.cfg and *.spoe.conf from the generator's output")

// goldenCases are the golden inputs; each has a <name>.cfg and
// <name>.spoe.conf under testdata/golden rendered with goldenSPOEPath.
var goldenCases = []string{"one-pool", "two-pools"}

const goldenSPOEPath = "/etc/haproxy/nba-spoe.conf"

// goldenSpec is the Spec the daemon makes of testdata/golden/<name>.toml, a
// config file of the daemon's, with its defaults filled in. The daemon's
// haproxy-config command renders the .toml files into the same golden files
// (its tests check), so the two stay in step.
func goldenSpec(t *testing.T, name string) *Spec {
	t.Helper()
	switch name {
	case "one-pool":
		return &Spec{
			Cluster:       "nix-builders",
			RuntimeSocket: "/run/haproxy/admin.sock",
			StateFile:     "/var/lib/haproxy/nix-builder-autoscaler.state",
			Log:           "/dev/log",
			Placeholder:   "192.0.2.1:22",
			AgentListen:   "127.0.0.1:5555",
			SPOAListen:    "127.0.0.1:12345",
			StatsListen:   "127.0.0.1:8404",
			Hold:          3 * time.Minute,
			CheckInterval: time.Second,
			AgentInterval: 10 * time.Second,
			Pools:         []PoolSpec{{Name: "x86", Frontend: "0.0.0.0:2222", MaxBuilders: 3, MaxJobs: 2}},
		}
	case "two-pools":
		return &Spec{
			Cluster:       "ci-builders",
			RuntimeSocket: "/run/haproxy/nba.sock",
			StateFile:     "/var/lib/haproxy/nba.state",
			Log:           "stdout",
			Placeholder:   "192.0.2.1:22",
			AgentListen:   "0.0.0.0:5600",
			SPOAListen:    "[::1]:12400",
			StatsListen:   "127.0.0.1:8405",
			Hold:          5 * time.Minute,
			CheckInterval: 2 * time.Second,
			AgentInterval: 10 * time.Second,
			Pools: []PoolSpec{
				{Name: "x86", Frontend: "0.0.0.0:2222", MaxBuilders: 4, MaxJobs: 4},
				{Name: "arm", Frontend: "[::]:2223", MaxBuilders: 2, MaxJobs: 1},
			},
		}
	}
	t.Fatalf("no golden spec %q", name)
	return nil
}

func TestGenerateGolden(t *testing.T) {
	for _, name := range goldenCases {
		t.Run(name, func(t *testing.T) {
			files, err := Generate(*goldenSpec(t, name), Options{SPOEPath: goldenSPOEPath})
			if err != nil {
				t.Fatal(err)
			}
			for _, f := range []struct {
				path string
				got  []byte
			}{
				{filepath.Join("testdata", "golden", name+".cfg"), files.HAProxyCfg},
				{filepath.Join("testdata", "golden", name+".spoe.conf"), files.SPOEConf},
			} {
				if *updateGolden {
					if err := os.WriteFile(f.path, f.got, 0o644); err != nil {
						t.Fatal(err)
					}
					continue
				}
				want, err := os.ReadFile(f.path)
				if err != nil {
					t.Fatalf("%v (run go test ./haproxy -run TestGenerateGolden -update to create it)", err)
				}
				if !bytes.Equal(f.got, want) {
					t.Errorf("%s differs from the generator's output (if the change is intended, rerun with -update):\n%s",
						f.path, lineDiff(string(want), string(f.got)))
				}
			}
		})
	}
}

// lineDiff shows the first lines where want and got differ.
func lineDiff(want, got string) string {
	w, g := strings.Split(want, "\n"), strings.Split(got, "\n")
	var b strings.Builder
	shown := 0
	for i := 0; i < max(len(w), len(g)) && shown < 10; i++ {
		var wl, gl string
		if i < len(w) {
			wl = w[i]
		}
		if i < len(g) {
			gl = g[i]
		}
		if wl != gl {
			fmt.Fprintf(&b, "line %d:\n  want %q\n  got  %q\n", i+1, wl, gl)
			shown++
		}
	}
	return b.String()
}

// TestGenerateContract checks the pieces other parts of the project rely
// on, independent of the golden files.
func TestGenerateContract(t *testing.T) {
	files, err := Generate(*goldenSpec(t, "two-pools"), Options{SPOEPath: goldenSPOEPath})
	if err != nil {
		t.Fatal(err)
	}
	cfg, spoe := string(files.HAProxyCfg), string(files.SPOEConf)
	for _, want := range []string{
		"log stdout format raw local0 info\n",
		"stats socket /run/haproxy/nba.sock mode 660 level admin expose-fd listeners\n",
		"server-state-file /var/lib/haproxy/nba.state\n",
		"load-server-state-from-file global\n",
		"frontend " + Backend("x86") + "\n",
		"frontend " + Backend("arm") + "\n",
		"    bind [::]:2223\n",
		"filter spoe engine " + Engine("arm") + " config " + goldenSPOEPath + "\n",
		// hold 5m: processing 310s, inspect-delay 320s.
		"tcp-request inspect-delay 320s\n",
		"tcp-request content send-spoe-group " + Engine("x86") + " " + SPOEGroup + " if { nbsrv(nba_spoa) gt 0 }\n",
		"tcp-request content reject if { var(sess.nba.verdict) -m str reject }\n",
		"use-server %[var(sess.nba.slot)] if { var(sess.nba.slot) -m found }\n",
		"tcp-check expect rstring ^SSH-2\\.0-\n",
		// 0.0.0.0 (listen everywhere) is reached on loopback.
		"agent-addr 127.0.0.1 agent-port 5600 agent-inter 10s maxconn 4 weight 100\n",
		`    server slot4 ` + PlaceholderHost + `:22 init-addr last,` + Placeholder + ` disabled agent-send "x86/slot4\n"` + "\n",
		`    server slot2 ` + PlaceholderHost + `:22 init-addr last,` + Placeholder + ` disabled agent-send "arm/slot2\n"` + "\n",
		"backend " + SPOABackend + "\n",
		"    server spoa1 [::1]:12400 check",
		"timeout server 330s\n",
		"stats show-legends\n",
		"    bind 127.0.0.1:8405\n",
	} {
		if !strings.Contains(cfg, want) {
			t.Errorf("haproxy.cfg lacks %q", want)
		}
	}
	if strings.Contains(cfg, "server slot5") || strings.Contains(cfg, `"arm/slot3`) {
		t.Error("haproxy.cfg has more servers than max_builders")
	}
	for _, want := range []string{
		"[" + Engine("x86") + "]\n",
		"[" + Engine("arm") + "]\n",
		"timeout processing 310s\n",
		"option var-prefix " + wire.VarPrefix + "\n",
		"option set-on-error " + SPOEVarError + "\n",
		"option continue-on-error\n",
		"use-backend " + SPOABackend + "\n",
		"spoe-message " + wire.Message + "\n",
		"    args pool=str(arm) src=src sport=src_port be=str(nba_arm) q=queue(nba_arm) beconn=be_conn(nba_arm) nbsrv=nbsrv(nba_arm) id=uuid()\n",
		"spoe-group " + SPOEGroup + "\n    messages " + wire.Message + "\n",
	} {
		if !strings.Contains(spoe, want) {
			t.Errorf("SPOE file lacks %q", want)
		}
	}
}

func TestHoldTimeouts(t *testing.T) {
	for _, hold := range []time.Duration{time.Millisecond, 2 * time.Second, 3 * time.Minute, 30 * time.Minute} {
		got := HoldTimeouts(hold)
		if !(got.Hold < got.Processing && got.Processing <= got.InspectDelay && got.InspectDelay < got.SPOAServer) {
			t.Errorf("HoldTimeouts(%s) = %+v: want hold < processing <= inspect-delay < SPOA server timeout", hold, got)
		}
		if got.SPOAServer <= SPOEIdleTimeout {
			t.Errorf("HoldTimeouts(%s).SPOAServer = %s, want above SPOE timeout idle %s", hold, got.SPOAServer, SPOEIdleTimeout)
		}
	}
	got := HoldTimeouts(3 * time.Minute)
	want := Timeouts{Hold: 3 * time.Minute, Processing: 190 * time.Second, InspectDelay: 200 * time.Second, SPOAServer: 210 * time.Second}
	if got != want {
		t.Errorf("HoldTimeouts(3m) = %+v, want %+v", got, want)
	}
}

func TestFormatDuration(t *testing.T) {
	for _, tc := range []struct {
		d    time.Duration
		want string
	}{
		{0, "0"},
		{time.Microsecond, "1ms"},
		{1500 * time.Millisecond, "1500ms"},
		{time.Second, "1s"},
		{190 * time.Second, "190s"},
		{2 * time.Minute, "2m"},
		{24 * time.Hour, "24h"},
		{90 * time.Minute, "90m"},
	} {
		if got := formatDuration(tc.d); got != tc.want {
			t.Errorf("formatDuration(%s) = %q, want %q", tc.d, got, tc.want)
		}
	}
}

func TestGenerateRejects(t *testing.T) {
	for _, tc := range []struct {
		name   string
		edit   func(*Spec, *Options)
		key    string
		substr string
	}{
		{"no frontend", func(c *Spec, _ *Options) { c.Pools[0].Frontend = "" }, `pool[0] (name "x86").frontend`, "is required"},
		{"bad frontend", func(c *Spec, _ *Options) { c.Pools[0].Frontend = "2222" }, `pool[0] (name "x86").frontend`, "not host:port"},
		{"frontend port 0", func(c *Spec, _ *Options) { c.Pools[0].Frontend = "0.0.0.0:0" }, `pool[0] (name "x86").frontend`, "1 to 65535"},
		{"same frontend twice", func(c *Spec, _ *Options) { c.Pools[1].Frontend = "127.0.0.1:2222" }, `pool[1] (name "arm").frontend`, "overlaps"},
		{"frontend on the agent port", func(c *Spec, _ *Options) { c.Pools[1].Frontend = "127.0.0.1:5600" }, `pool[1] (name "arm").frontend`, "haproxy.agent_listen"},
		{"stats on the SPOA port", func(c *Spec, _ *Options) { c.StatsListen = "[::1]:12400" }, "haproxy.stats_listen", "haproxy.spoa_listen"},
		{"bad agent address", func(c *Spec, _ *Options) { c.AgentListen = "localhost" }, "haproxy.agent_listen", "not host:port"},
		{"bad SPOA address", func(c *Spec, _ *Options) { c.SPOAListen = "127.0.0.1:x" }, "haproxy.spoa_listen", "not a number"},
		{"bad stats address", func(c *Spec, _ *Options) { c.StatsListen = ":::" }, "haproxy.stats_listen", "not host:port"},
		{"zero hold", func(c *Spec, _ *Options) { c.Hold = 0 }, "haproxy.hold", "more than zero"},
		{"hold beyond the session timeout", func(c *Spec, _ *Options) { c.Hold = SessionTimeout }, "haproxy.hold", "too long"},
		{"zero check interval", func(c *Spec, _ *Options) { c.CheckInterval = 0 }, "haproxy.check_interval", "more than zero"},
		{"no runtime socket", func(c *Spec, _ *Options) { c.RuntimeSocket = "" }, "haproxy.runtime_socket", "is required"},
		{"runtime socket with a space", func(c *Spec, _ *Options) { c.RuntimeSocket = "/run/my haproxy.sock" }, "haproxy.runtime_socket", "without spaces"},
		{"relative state file", func(c *Spec, _ *Options) { c.StateFile = "nba.state" }, "haproxy.state_file", "absolute"},
		{"no log", func(c *Spec, _ *Options) { c.Log = "" }, "haproxy.log", "is required"},
		{"log with a hash", func(c *Spec, _ *Options) { c.Log = "/dev/log#x" }, "haproxy.log", "cannot be written"},
		{"no slots", func(c *Spec, _ *Options) { c.Pools[1].MaxBuilders = 0 }, `pool[1] (name "arm").max_builders`, "at least 1"},
		{"no jobs", func(c *Spec, _ *Options) { c.Pools[0].MaxJobs = 0 }, `pool[0] (name "x86").max_jobs`, "at least 1"},
		{"pool name with a space", func(c *Spec, _ *Options) { c.Pools[0].Name = "x 86" }, `pool[0] (name "x 86").name`, "proxy name"},
		{"no pools", func(c *Spec, _ *Options) { c.Pools = nil }, "pool", "at least one"},
		{"no SPOE path", func(_ *Spec, o *Options) { o.SPOEPath = "" }, "SPOE file path", "is required"},
		{"relative SPOE path", func(_ *Spec, o *Options) { o.SPOEPath = "nba-spoe.conf" }, "SPOE file path", "absolute"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			spec := goldenSpec(t, "two-pools")
			opts := Options{SPOEPath: goldenSPOEPath}
			tc.edit(spec, &opts)
			files, err := Generate(*spec, opts)
			var ps Problems
			if !errors.As(err, &ps) {
				t.Fatalf("Generate = %d bytes, %v; want Problems", len(files.HAProxyCfg), err)
			}
			for _, p := range ps {
				if p.Key == tc.key && strings.Contains(p.Message, tc.substr) {
					return
				}
			}
			t.Errorf("problems lack %s: ...%s...; got:\n%v", tc.key, tc.substr, err)
		})
	}
}

func TestGenerateProblemText(t *testing.T) {
	spec := goldenSpec(t, "two-pools")
	spec.Hold = 25 * time.Hour
	spec.Pools[1].MaxJobs = 0
	_, err := Generate(*spec, Options{SPOEPath: goldenSPOEPath})
	want := "haproxy.hold: 25h is too long: hold < SPOE timeout processing (90010s) <= tcp-request inspect-delay (90020s) < timeout client (24h) must hold; lower it\n" +
		`pool[1] (name "arm").max_jobs: must be at least 1: it is each server's maxconn`
	if err == nil || err.Error() != want {
		t.Errorf("Generate error:\n%v\nwant:\n%s", err, want)
	}
}

func TestGenerateWithoutStatsPage(t *testing.T) {
	spec := goldenSpec(t, "one-pool")
	spec.StatsListen = ""
	files, err := Generate(*spec, Options{SPOEPath: goldenSPOEPath})
	if err != nil {
		t.Fatal(err)
	}
	if bytes.Contains(files.HAProxyCfg, []byte("stats enable")) || bytes.Contains(files.HAProxyCfg, []byte("nba_stats")) {
		t.Errorf("stats_listen = \"\" still renders a stats page:\n%s", files.HAProxyCfg)
	}
}

// writeGenerated generates spec into dir: the SPOE file where haproxy.cfg
// says, and a server-state file with no servers in it (a missing or empty
// one draws a warning).
func writeGenerated(t *testing.T, dir string, spec *Spec) Files {
	t.Helper()
	spec.StateFile = filepath.Join(dir, "state")
	if err := os.WriteFile(spec.StateFile, []byte("1\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	files, err := Generate(*spec, Options{SPOEPath: filepath.Join(dir, "nba-spoe.conf")})
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "nba-spoe.conf"), files.SPOEConf, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "haproxy.cfg"), files.HAProxyCfg, 0o600); err != nil {
		t.Fatal(err)
	}
	return files
}

// TestGeneratedConfigsPassHAProxyCheck runs `haproxy -c` on both golden
// configs, with warnings treated as errors.
func TestGeneratedConfigsPassHAProxyCheck(t *testing.T) {
	bin := haproxytest.Binary(t)
	for _, name := range goldenCases {
		t.Run(name, func(t *testing.T) {
			dir := haproxytest.Dir(t)
			writeGenerated(t, dir, goldenSpec(t, name))
			out, err := exec.Command(bin, "-c", "-dW", "-f", filepath.Join(dir, "haproxy.cfg")).CombinedOutput()
			if err != nil {
				cfg, _ := os.ReadFile(filepath.Join(dir, "haproxy.cfg"))
				spoe, _ := os.ReadFile(filepath.Join(dir, "nba-spoe.conf"))
				t.Fatalf("haproxy -c -dW: %v\n%s\n--- haproxy.cfg:\n%s\n--- nba-spoe.conf:\n%s", err, out, cfg, spoe)
			}
		})
	}
}

// liveSpec is one pool (pool "x86", three slots) on free loopback ports,
// its runtime socket in dir as haproxytest wants it.
func liveSpec(t *testing.T, dir string, hold time.Duration) *Spec {
	t.Helper()
	return &Spec{
		Cluster:       "nix-builders",
		RuntimeSocket: filepath.Join(dir, "admin.sock"),
		StateFile:     filepath.Join(dir, "state"),
		Log:           "stdout",
		Placeholder:   fmt.Sprintf("%s:%d", Placeholder, PlaceholderPort),
		AgentListen:   fmt.Sprintf("127.0.0.1:%d", haproxytest.FreePort(t)),
		SPOAListen:    fmt.Sprintf("127.0.0.1:%d", haproxytest.FreePort(t)),
		StatsListen:   fmt.Sprintf("127.0.0.1:%d", haproxytest.FreePort(t)),
		Hold:          hold,
		CheckInterval: 200 * time.Millisecond,
		Pools: []PoolSpec{{
			Name:        "x86",
			Frontend:    fmt.Sprintf("127.0.0.1:%d", haproxytest.FreePort(t)),
			MaxBuilders: 3,
			MaxJobs:     2,
		}},
	}
}

// startGenerated generates spec into dir and runs HAProxy on it, with one
// line added to its defaults: `timeout check`. Without it a health check
// must finish within its inter (200ms for the builders here, 1s for the SPOE
// agent), and on a busy machine the stand-ins (goroutines, not sshd) may not
// answer that soon: servers would flap DOWN under the test. Connecting is
// still bounded by inter.
func startGenerated(t *testing.T, dir string, spec *Spec) *haproxytest.Instance {
	t.Helper()
	files := writeGenerated(t, dir, spec)
	text := string(files.HAProxyCfg)
	if strings.Count(text, "\ndefaults\n") != 1 || strings.Contains(text, "timeout check") {
		t.Fatalf("the generated config changed: startGenerated adds `timeout check` to its one defaults section:\n%s", text)
	}
	text = strings.Replace(text, "\ndefaults\n", "\ndefaults\n    timeout check 1m\n", 1)
	return haproxytest.Start(t, dir, text)
}

// stats is `show stat` read by column name, keyed "proxy/server".
func stats(t *testing.T, h *haproxytest.Instance) map[string]map[string]string {
	t.Helper()
	out := strings.TrimPrefix(h.Cmd("show stat"), "# ")
	r := csv.NewReader(strings.NewReader(out))
	r.FieldsPerRecord = -1
	rows, err := r.ReadAll()
	if err != nil || len(rows) < 2 {
		t.Fatalf("show stat: %v\n%s", err, out)
	}
	m := map[string]map[string]string{}
	for _, row := range rows[1:] {
		rec := map[string]string{}
		for i, col := range rows[0] {
			if i < len(row) {
				rec[col] = row[i]
			}
		}
		m[rec["pxname"]+"/"+rec["svname"]] = rec
	}
	return m
}

// waitStatus waits until the server's status starts with want.
func waitStatus(t *testing.T, h *haproxytest.Instance, server, want string) {
	t.Helper()
	var got string
	if !testwait.Poll(testwait.Bound, func() bool {
		got = stats(t, h)[server]["status"]
		return strings.HasPrefix(got, want)
	}) {
		t.Fatalf("%s status %q after %v, want %s: stuck", server, got, testwait.Bound, want)
	}
}

// fakeAgent is an agent-check responder: it records each line HAProxy sends
// and answers from replies (default "maint").
type fakeAgent struct {
	mu      sync.Mutex
	seen    map[string]bool
	replies map[string]string
}

func startFakeAgent(t *testing.T, addr string) *fakeAgent {
	t.Helper()
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	a := &fakeAgent{seen: map[string]bool{}, replies: map[string]string{}}
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				// A hang guard: HAProxy sends its line at once, but a busy
				// machine may take seconds to run this goroutine.
				_ = c.SetDeadline(time.Now().Add(testwait.Bound))
				line, err := bufio.NewReader(c).ReadString('\n')
				if err != nil {
					return
				}
				a.mu.Lock()
				a.seen[line] = true
				reply, ok := a.replies[strings.TrimSuffix(line, "\n")]
				a.mu.Unlock()
				if !ok {
					reply = "maint"
				}
				_, _ = io.WriteString(c, reply+"\n")
			}()
		}
	}()
	return a
}

func (a *fakeAgent) set(slot, reply string) {
	a.mu.Lock()
	defer a.mu.Unlock()
	a.replies[slot] = reply
}

func (a *fakeAgent) saw(line string) bool {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.seen[line]
}

// startFakeBuilder listens like sshd: it sends an SSH banner and keeps the
// connection open until the client closes it. It returns the port.
func startFakeBuilder(t *testing.T) int {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				_ = c.SetDeadline(time.Now().Add(time.Minute))
				if _, err := io.WriteString(c, "SSH-2.0-fake-builder\r\n"); err != nil {
					return
				}
				_, _ = io.Copy(io.Discard, c)
			}()
		}
	}()
	return ln.Addr().(*net.TCPAddr).Port
}

func TestGeneratedConfigRuns(t *testing.T) {
	dir := haproxytest.Dir(t)
	spec := liveSpec(t, dir, 3*time.Minute)
	ag := startFakeAgent(t, spec.AgentListen)
	h := startGenerated(t, dir, spec)

	st := stats(t, h)
	for _, key := range []string{"nba_x86/FRONTEND", "nba_x86/BACKEND", "nba_spoa/BACKEND", "nba_spoa/spoa1", "nba_stats/FRONTEND"} {
		if st[key] == nil {
			t.Errorf("show stat lacks %s", key)
		}
	}
	if got := st["nba_x86/FRONTEND"]["status"]; got != "OPEN" {
		t.Errorf("frontend status %q, want OPEN", got)
	}
	for n := 1; n <= 3; n++ {
		key := fmt.Sprintf("nba_x86/slot%d", n)
		if got := st[key]["status"]; got != "MAINT" {
			t.Errorf("%s status %q, want MAINT", key, got)
		}
		if got, want := st[key]["addr"], Placeholder+":22"; got != want {
			t.Errorf("%s addr %q, want %q", key, got, want)
		}
	}
	if st["nba_x86/slot4"] != nil {
		t.Error("a fourth slot exists; max_builders is 3")
	}

	// Each server's agent check identifies its slot with one line.
	testwait.Until(t, "the agent to get x86/slot1, x86/slot2 and x86/slot3", func() bool {
		return ag.saw("x86/slot1\n") && ag.saw("x86/slot2\n") && ag.saw("x86/slot3\n")
	})

	resp, err := http.Get("http://" + spec.StatsListen + "/")
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK || !bytes.Contains(body, []byte("nba_x86")) {
		t.Errorf("stats page: %s, %d bytes; want 200 listing nba_x86", resp.Status, len(body))
	}
	resp, err = http.Get("http://" + spec.StatsListen + "/;csv")
	if err != nil {
		t.Fatal(err)
	}
	body, _ = io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK || !bytes.Contains(body, []byte("last_agt")) {
		t.Errorf("stats CSV: %s; want 200 with a last_agt column", resp.Status)
	}

	// A slot's address survives a restart through the server-state file
	// (init-addr last); with an IP address on the server line instead of
	// PlaceholderHost, HAProxy 2.6 would restore only the port.
	if out := h.Cmd("set server nba_x86/slot2 addr 127.0.0.9 port 2022"); !strings.Contains(out, "changed") {
		t.Fatalf("set server addr: %s", out)
	}
	state := h.Cmd("show servers state")
	if err := os.WriteFile(spec.StateFile, []byte(state), 0o600); err != nil {
		t.Fatal(err)
	}
	h.Restart()
	st = stats(t, h)
	if got := st["nba_x86/slot2"]["addr"]; got != "127.0.0.9:2022" {
		t.Errorf("after a restart slot2 addr %q, want 127.0.0.9:2022 from the state file", got)
	}
	if got, want := st["nba_x86/slot1"]["addr"], Placeholder+":22"; got != want {
		t.Errorf("after a restart slot1 addr %q, want %q", got, want)
	}
}

// fakeSPOA answers the SPOE messages of the generated config with whatever
// answer returns; it records each message's arguments.
type fakeSPOA struct {
	ln     net.Listener
	answer func(args map[string]string) (name, value string)
	msgs   chan map[string]string

	mu    sync.Mutex
	conns []net.Conn
}

func startFakeSPOA(t *testing.T, addr string) *fakeSPOA {
	t.Helper()
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	s := &fakeSPOA{msgs: make(chan map[string]string, 16)}
	s.ln = &trackingListener{Listener: ln, s: s}
	t.Cleanup(s.kill)
	go func() { _ = agent.New(s.handle, logger.NewNop()).Serve(s.ln) }()
	return s
}

func (s *fakeSPOA) handle(req *request.Request) {
	msg, err := req.Messages.GetByName(wire.Message)
	if err != nil {
		return
	}
	args := map[string]string{}
	for _, item := range msg.KV.Data() {
		args[item.Name] = fmt.Sprint(item.Value) // copies: the frame buffer is reused
	}
	s.msgs <- args
	s.mu.Lock()
	answer := s.answer
	s.mu.Unlock()
	if answer == nil {
		return
	}
	if name, value := answer(args); name != "" {
		req.Actions.SetVar(action.ScopeSession, name, value)
	}
}

func (s *fakeSPOA) setAnswer(f func(args map[string]string) (name, value string)) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.answer = f
}

// kill closes the listener and every connection HAProxy opened: the agent
// is gone.
func (s *fakeSPOA) kill() {
	s.ln.Close()
	s.closeConns()
}

func (s *fakeSPOA) closeConns() {
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, c := range s.conns {
		c.Close()
	}
}

type trackingListener struct {
	net.Listener
	s *fakeSPOA
}

func (l *trackingListener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err == nil {
		l.s.mu.Lock()
		l.s.conns = append(l.s.conns, c)
		l.s.mu.Unlock()
	}
	return c, err
}

// next returns the arguments of the next SPOE message HAProxy sends.
func (s *fakeSPOA) next(t *testing.T) map[string]string {
	t.Helper()
	select {
	case args := <-s.msgs:
		return args
	case <-time.After(testwait.Bound):
		t.Fatalf("the SPOA got no message in %v: stuck", testwait.Bound)
		return nil
	}
}

// dialBanner connects to addr and reads the first line, giving up after
// wait (a hang guard). It returns the line ("" if the connection was closed
// first) and the local port. It may run on any goroutine.
func dialBanner(addr string, wait time.Duration) (line string, port int, err error) {
	c, err := net.DialTimeout("tcp", addr, wait)
	if err != nil {
		return "", 0, err
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(wait))
	line, err = bufio.NewReader(c).ReadString('\n')
	return line, c.LocalAddr().(*net.TCPAddr).Port, err
}

// waitLog waits for a traffic log line matching re.
func waitLog(t *testing.T, h *haproxytest.Instance, re *regexp.Regexp) string {
	t.Helper()
	var m string
	if !testwait.Poll(testwait.Bound, func() bool {
		m = re.FindString(h.Log())
		return m != ""
	}) {
		t.Fatalf("no log line matches %s after %v; log:\n%s", re, testwait.Bound, h.Log())
	}
	return m
}

// spoeLab is HAProxy on the generated configuration with a fake
// agent-check responder, a fake SPOE agent (its health check passing) and a
// fake builder.
type spoeLab struct {
	h        *haproxytest.Instance
	ag       *fakeAgent
	spoa     *fakeSPOA
	builder  int    // the fake builder's port
	frontend string // the pool's frontend address
}

func startSPOELab(t *testing.T, hold time.Duration) *spoeLab {
	t.Helper()
	dir := haproxytest.Dir(t)
	spec := liveSpec(t, dir, hold)
	l := &spoeLab{
		ag:       startFakeAgent(t, spec.AgentListen),
		spoa:     startFakeSPOA(t, spec.SPOAListen),
		builder:  startFakeBuilder(t),
		frontend: spec.Pools[0].Frontend,
	}
	l.h = startGenerated(t, dir, spec)
	waitStatus(t, l.h, "nba_spoa/spoa1", "UP")
	return l
}

// bootSlot2 does what the daemon does when slot2's builder has booted: it
// sets the server's address and has the agent say ready. It returns once
// HAProxy has the server UP.
func (l *spoeLab) bootSlot2(t *testing.T) {
	t.Helper()
	if out := l.h.Cmd(fmt.Sprintf("set server nba_x86/slot2 addr 127.0.0.1 port %d", l.builder)); !strings.Contains(out, "changed") {
		t.Fatalf("set server addr: %s", out)
	}
	l.ag.set("x86/slot2", "up ready 100% maxconn:2")
	waitStatus(t, l.h, "nba_x86/slot2", "UP")
}

// TestGeneratedSPOE drives the generated frontend with a fake SPOE agent: a
// connection held while its builder comes up gets through, a "reject"
// verdict closes the connection, and a dead agent (health check down) is not
// asked at all (TestGeneratedSPOEAgentFails: a failing agent). The hold is
// long so that timeout processing (hold + 10s) never ends a hold the test
// makes, however busy the machine.
func TestGeneratedSPOE(t *testing.T) {
	const hold = time.Minute
	l := startSPOELab(t, hold)

	t.Run("held until a slot is ready", func(t *testing.T) {
		release := make(chan string)
		l.spoa.setAnswer(func(map[string]string) (string, string) { return wire.VarSlot, <-release })
		type result struct {
			line string
			port int
			err  error
		}
		done := make(chan result, 1)
		start := time.Now()
		go func() {
			line, port, err := dialBanner(l.frontend, testwait.Bound)
			done <- result{line, port, err}
		}()
		args := l.spoa.next(t)
		want := map[string]string{wire.ArgPool: "x86", wire.ArgSrc: "127.0.0.1", wire.ArgBackend: "nba_x86",
			wire.ArgQueue: "0", wire.ArgBeConn: "0", wire.ArgNbSrv: "0"}
		for k, v := range want {
			if args[k] != v {
				t.Errorf("message arg %s = %q, want %q (all: %v)", k, args[k], v, args)
			}
		}
		if len(args[wire.ArgID]) != 36 || args[wire.ArgSport] == "" {
			t.Errorf("message args %s/%s = %q/%q, want a UUID and a port", wire.ArgID, wire.ArgSport, args[wire.ArgID], args[wire.ArgSport])
		}

		// While the agent holds its answer, the builder boots: its address
		// is set and the agent says ready. The connection is still waiting
		// for the agent then: it got nothing and was not closed.
		l.bootSlot2(t)
		select {
		case r := <-done:
			t.Fatalf("the connection ended (%q, %v) while the agent held its answer; want it held until the answer", r.line, r.err)
		default:
		}
		release <- "slot2"

		r := <-done
		if !strings.HasPrefix(r.line, "SSH-2.0-") {
			t.Fatalf("held connection got %q, %v; want the builder's SSH banner", r.line, r.err)
		}
		t.Logf("banner %s after the connect", time.Since(start))
		if args[wire.ArgSport] != strconv.Itoa(r.port) {
			t.Errorf("message sport %q, want the client's port %d", args[wire.ArgSport], r.port)
		}
		line := waitLog(t, l.h, regexp.MustCompile(fmt.Sprintf(`127\.0\.0\.1:%d .* nba_x86 nba_x86/slot2 .*`, r.port)))
		for _, want := range []string{" slot=slot2 ", " verdict=- ", " spoe_err=-"} {
			if !strings.Contains(line, want) {
				t.Errorf("log line lacks %q: %s", want, line)
			}
		}
		// The agent's processing time (the hold) is logged; how long it
		// was depends on the machine, so it is only shown.
		if m := regexp.MustCompile(` spoe_ms=(\d+) `).FindStringSubmatch(line); m == nil {
			t.Errorf("log line lacks the agent's processing time spoe_ms=<ms>: %s", line)
		} else {
			t.Logf("spoe_ms=%s", m[1])
		}
	})

	t.Run("reject", func(t *testing.T) {
		l.spoa.setAnswer(func(map[string]string) (string, string) { return wire.VarVerdict, wire.VerdictReject })
		line, port, err := dialBanner(l.frontend, testwait.Bound)
		l.spoa.next(t)
		if line != "" || !errors.Is(err, io.EOF) {
			t.Errorf("rejected connection got %q, %v; want it closed without data", line, err)
		}
		got := waitLog(t, l.h, regexp.MustCompile(fmt.Sprintf(`127\.0\.0\.1:%d .*`, port)))
		if !strings.Contains(got, " verdict=reject ") {
			t.Errorf("log line lacks verdict=reject: %s", got)
		}
	})

	t.Run("no agent: balance leastconn", func(t *testing.T) {
		l.spoa.kill()
		// The frontend asks the agent only while its health check passes
		// (1s interval, 2 failures).
		waitStatus(t, l.h, "nba_spoa/spoa1", "DOWN")
		start := time.Now()
		line, port, err := dialBanner(l.frontend, testwait.Bound)
		if !strings.HasPrefix(line, "SSH-2.0-") {
			t.Fatalf("without an agent the connection got %q, %v; want the up builder's banner", line, err)
		}
		t.Logf("banner %s after the connect", time.Since(start))
		// Not asked at all: no SPOE variable is set. An agent asked and not
		// reached would have cost timeout processing and set spoe_err.
		got := waitLog(t, l.h, regexp.MustCompile(fmt.Sprintf(`127\.0\.0\.1:%d .*`, port)))
		for _, want := range []string{" nba_x86/slot2 ", " slot=- ", " verdict=- ", " spoe_ms=- ", " spoe_err=-"} {
			if !strings.Contains(got, want) {
				t.Errorf("log line lacks %q: %s", want, got)
			}
		}
		select {
		case args := <-l.spoa.msgs:
			t.Errorf("the dead agent got a message: %v", args)
		default:
		}
	})
}

// TestGeneratedSPOEAgentFails: the agent's connection drops mid-answer.
// HAProxy 2.6 waits out timeout processing, sets txn.nba.err = 1 (timeout),
// and goes on: balance leastconn picks the up builder. The hold is short so
// that timeout processing (hold + 10s) is.
func TestGeneratedSPOEAgentFails(t *testing.T) {
	const hold = time.Millisecond
	l := startSPOELab(t, hold)
	l.bootSlot2(t)
	l.spoa.setAnswer(func(map[string]string) (string, string) {
		l.spoa.closeConns()
		return "", ""
	})
	start := time.Now()
	line, port, err := dialBanner(l.frontend, testwait.Bound)
	if !strings.HasPrefix(line, "SSH-2.0-") {
		t.Fatalf("with a failing agent the connection got %q, %v; want the up builder's banner", line, err)
	}
	t.Logf("banner %s after the connect (timeout processing %s)", time.Since(start), HoldTimeouts(hold).Processing)
	l.spoa.next(t) // the agent was asked
	// spoe_err=1: SPOE's timeout processing ended the wait, not the dropped
	// connection.
	got := waitLog(t, l.h, regexp.MustCompile(fmt.Sprintf(`127\.0\.0\.1:%d .*`, port)))
	for _, want := range []string{" nba_x86/slot2 ", " slot=- ", " verdict=- ", " spoe_err=1"} {
		if !strings.Contains(got, want) {
			t.Errorf("log line lacks %q: %s", want, got)
		}
	}
}
