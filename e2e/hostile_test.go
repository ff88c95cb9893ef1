package e2e

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"guardianproject.dev/ops/nix-builder-autoscaler/haproxy"
	"guardianproject.dev/ops/nix-builder-autoscaler/haproxy/haproxytest"
	"guardianproject.dev/ops/nix-builder-autoscaler/internal/api"
	"guardianproject.dev/ops/nix-builder-autoscaler/internal/config"
	"guardianproject.dev/ops/nix-builder-autoscaler/internal/testwait"
)

// Connections the hostile neighbour holds (issue figures): slow API
// clients, idle SPOE and agent-check connections.
const (
	hostileAPIConns   = 20000
	hostileSPOAConns  = 1000
	hostileAgentConns = 500
)

// hostileStack is the daemon binary (its own process, so its descriptors
// and memory are its own) with a TCP API, and a real HAProxy.
type hostileStack struct {
	t                         *testing.T
	d                         *daemonProc
	hp                        *haproxytest.Instance
	sock, api, token          string
	agent, spoa, frontend     string
	metrics                   string
	autoscalerctl, configPath string
}

func startHostileStack(t *testing.T) *hostileStack {
	dir := shortDir(t)
	hdir := haproxytest.Dir(t)
	port := func() string { return fmt.Sprintf("127.0.0.1:%d", lowPort(t)) }
	s := &hostileStack{t: t, sock: filepath.Join(dir, "d.sock"), api: port(), token: "hostile-test-token",
		agent: port(), spoa: port(), frontend: port(), metrics: port()}
	tokenFile := filepath.Join(dir, "token")
	if err := os.WriteFile(tokenFile, []byte(s.token+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	text := fmt.Sprintf(`[daemon]
socket = %[1]q
state_dir = "%[2]s/state"
listen = %[3]q
token_file = %[4]q
metrics_listen = %[10]q
reconcile_interval = "1s"

[haproxy]
runtime_socket = "%[5]s/admin.sock"
agent_listen = %[6]q
spoa_listen = %[7]q
stats_listen = %[8]q
state_file = "%[5]s/state"
log = "stdout"
placeholder = "127.0.0.254:9"
hold = "10s"
check_interval = "200ms"

[[pool]]
name = "x86"
systems = ["x86_64-linux"]
provider = "local"
frontend = %[9]q
min_builders = 1
max_builders = 2
max_jobs = 1
`, s.sock, dir, s.api, tokenFile, hdir, s.agent, s.spoa, port(), s.frontend, s.metrics)
	s.configPath = filepath.Join(dir, "config.toml")
	if err := os.WriteFile(s.configPath, []byte(text), 0o600); err != nil {
		t.Fatal(err)
	}
	cfg, err := config.Parse([]byte(text))
	if err != nil {
		t.Fatal(err)
	}
	s.hp = startHAProxy(t, hdir, cfg, nil)
	s.d = startDaemon(t, s.configPath, dir)
	s.autoscalerctl = filepath.Join(filepath.Dir(binary), "autoscalerctl")
	build := exec.Command("go", "build", "-o", s.autoscalerctl, "guardianproject.dev/ops/nix-builder-autoscaler/cmd/autoscalerctl")
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("build autoscalerctl: %v\n%s", err, out)
	}
	return s
}

// serverStatus returns show stat's status of every server of pool x86 that
// has a builder (an address other than the placeholder).
func (s *hostileStack) serverStatus() map[string]string {
	out := s.hp.Cmd("show stat")
	lines := strings.Split(strings.TrimSpace(out), "\n")
	if len(lines) == 0 {
		return nil
	}
	header := strings.Split(strings.TrimPrefix(lines[0], "# "), ",")
	col := map[string]int{}
	for i, h := range header {
		col[h] = i
	}
	got := map[string]string{}
	for _, l := range lines[1:] {
		f := strings.Split(l, ",")
		if len(f) < len(header) || f[0] != haproxy.Backend("x86") || f[1] == "BACKEND" || f[1] == "FRONTEND" || f[col["addr"]] == "127.0.0.254:9" {
			continue
		}
		got[f[1]] = f[col["status"]]
	}
	return got
}

// procFDs and procRSS read the daemon's open descriptors and resident memory.
func procFDs(t *testing.T, pid int) int {
	ents, err := os.ReadDir(fmt.Sprintf("/proc/%d/fd", pid))
	if err != nil {
		t.Fatal(err)
	}
	return len(ents)
}

func procRSS(t *testing.T, pid int) int64 {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		t.Fatal(err)
	}
	for _, l := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(l, "VmRSS:"); ok {
			kb, _ := strconv.ParseInt(strings.TrimSpace(strings.TrimSuffix(strings.TrimSpace(v), "kB")), 10, 64)
			return kb << 10
		}
	}
	t.Fatal("no VmRSS")
	return 0
}

// holderEnv names, for a re-run of this test binary, the connections it is
// to open and hold (see runHolder): "addr mode count".
const holderEnv = "NBA_E2E_HOLD"

// holderMax is the most connections one holder process opens: each process
// has its own open-file limit.
const holderMax = 5000

// hold has other processes (this test binary, run again) open n
// connections to addr and keep them until the returned function kills them.
// mode "api" sends the start of an HTTP request, "idle" nothing.
// Connections the daemon closes stay closed: the neighbour holds what it
// can, it does not churn.
func hold(t *testing.T, addr, mode string, n int) func() {
	var procs []*exec.Cmd
	stop := func() {
		for _, p := range procs {
			_ = p.Process.Kill()
			_ = p.Wait()
		}
		procs = nil
	}
	t.Cleanup(stop)
	held := 0
	for n > 0 {
		k := min(n, holderMax)
		n -= k
		cmd := exec.Command(os.Args[0])
		cmd.Env = append(os.Environ(), fmt.Sprintf("%s=%s %s %d", holderEnv, addr, mode, k))
		cmd.Stderr = os.Stderr
		out, err := cmd.StdoutPipe()
		if err != nil {
			t.Fatal(err)
		}
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		procs = append(procs, cmd)
		line, err := bufio.NewReader(out).ReadString('\n')
		if err != nil {
			t.Fatalf("holder for %s: %v", addr, err)
		}
		got, _ := strconv.Atoi(strings.TrimSpace(line))
		held += got
	}
	t.Logf("holding %d connections to %s (%s)", held, addr, mode)
	return stop
}

// runHolder is the holder process: it opens the connections its
// environment names, prints how many it holds, and holds them until it is
// killed: the test kills it by PID.
func runHolder() {
	spec := os.Getenv(holderEnv)
	if spec == "" {
		return
	}
	var addr, mode string
	var n int
	if _, err := fmt.Sscanf(spec, "%s %s %d", &addr, &mode, &n); err != nil {
		fmt.Fprintln(os.Stderr, "holder:", err)
		os.Exit(2)
	}
	var mu sync.Mutex
	var conns []net.Conn
	var wg sync.WaitGroup
	sem := make(chan struct{}, 64)
	for i := range n {
		sem <- struct{}{}
		wg.Go(func() {
			defer func() { <-sem }()
			c, err := net.DialTimeout("tcp", addr, 30*time.Second)
			if err != nil {
				return // the listen queue overflowed: the kernel refused it
			}
			if mode == "api" {
				// Half stop inside the headers, half send whole headers
				// of a request whose body never comes; none shows a token.
				msg := "POST /v1/reservations HTTP/1.1\r\nHost: x\r\n"
				if i%2 == 1 {
					msg += "Content-Length: 1000\r\n\r\n"
				}
				_ = c.SetWriteDeadline(time.Now().Add(5 * time.Second))
				_, _ = c.Write([]byte(msg))
			}
			mu.Lock()
			conns = append(conns, c)
			mu.Unlock()
		})
	}
	wg.Wait()
	fmt.Println(len(conns))
	// Held until killed; a parent that died leaves us reparented, and the
	// test's cleanup kills us by PID before that.
	select {}
}

// TestHostileNeighbour: while another local process holds 20,000 slow
// connections to the TCP API, 1,000 idle SPOE connections and 500 idle
// agent-check connections, HAProxy keeps every builder UP, autoscalerctl
// status answers, a reservation made over TCP becomes ready and a builder
// connection through HAProxy reaches a builder. Afterwards the daemon's
// descriptors and memory go back to where they were.
func TestHostileNeighbour(t *testing.T) {
	s := startHostileStack(t)
	pid := s.d.cmd.Process.Pid
	ctx, cancel := context.WithTimeout(context.Background(), testwait.Bound) // a hang guard
	defer cancel()
	tcp := api.NewHTTPClient("http://"+s.api, s.token)

	first := s.reserve(ctx, tcp, "before")
	testwait.Until(t, "the warm builder UP in HAProxy", func() bool { return s.serverStatus()[first.Slot] == "UP" })
	fdsBefore, rssBefore := procFDs(t, pid), procRSS(t, pid)
	t.Logf("daemon before the attack: %s", s.memstats())

	releaseAPI := hold(t, s.api, "api", hostileAPIConns)
	releaseSPOA := hold(t, s.spoa, "idle", hostileSPOAConns)
	releaseAgent := hold(t, s.agent, "idle", hostileAgentConns)
	fdsPeak := procFDs(t, pid)

	// Every check HAProxy ran during the attack kept the server UP, over
	// several agent and health check intervals.
	for range 50 {
		for slot, st := range s.serverStatus() {
			if st != "UP" {
				t.Errorf("server %s is %s during the attack, want UP", slot, st)
			}
		}
		time.Sleep(100 * time.Millisecond)
	}
	out, err := exec.CommandContext(ctx, s.autoscalerctl, "--socket", s.sock, "status").CombinedOutput()
	if err != nil {
		t.Errorf("autoscalerctl status during the attack: %v\n%s", err, out)
	}
	second := s.reserve(ctx, tcp, "during")
	if second.Slot == first.Slot {
		t.Fatalf("both reservations on %s; max_jobs = 1 should need a second builder", first.Slot)
	}
	testwait.Until(t, "the new builder UP in HAProxy", func() bool { return s.serverStatus()[second.Slot] == "UP" })
	if _, err := tcp.Release(ctx, "before"); err != nil {
		t.Fatal(err)
	}
	banner, err := s.builderBanner()
	if err != nil || !strings.HasPrefix(banner, "SSH-2.0-") {
		t.Errorf("a builder connection through HAProxy during the attack: %q, %v", banner, err)
	}
	fdsPeak = max(fdsPeak, procFDs(t, pid))
	rssPeak := procRSS(t, pid)

	releaseAPI()
	releaseSPOA()
	releaseAgent()
	var fdsAfter int
	testwait.Until(t, "the daemon's descriptors back to their level", func() bool {
		fdsAfter = procFDs(t, pid)
		return fdsAfter <= fdsBefore+8
	})
	// The daemon returns what the flood made it take once its listeners
	// have had room for a while (internal/daemon: reliefAfter).
	var rssAfter int64
	testwait.Until(t, "the daemon's memory back to its level", func() bool {
		rssAfter = procRSS(t, pid)
		return rssAfter <= rssBefore+16<<20
	})
	t.Logf("daemon after the attack: %s", s.memstats())
	t.Logf("daemon fds: before %d, peak %d, after %d; RSS: before %.1f MiB, during %.1f MiB, after %.1f MiB",
		fdsBefore, fdsPeak, fdsAfter, mib(rssBefore), mib(rssPeak), mib(rssAfter))
	// The caps bound the descriptors; what the attack costs in memory
	// is bounded by them too.
	if limit := fdsBefore + 1024 + 512 + 256 + 64 + 64; fdsPeak > limit {
		t.Errorf("daemon held %d descriptors during the attack, more than its listeners' caps allow (%d)", fdsPeak, limit)
	}
	s.d.stop(t)
}

func mib(b int64) float64 { return float64(b) / (1 << 20) }

func (s *hostileStack) reserve(ctx context.Context, c *api.Client, id string) api.Reservation {
	s.t.Helper()
	if _, _, err := c.CreateReservation(ctx, api.CreateReservationRequest{ID: id, System: "x86_64-linux"}); err != nil {
		s.t.Fatalf("reserve %s: %v", id, err)
	}
	r, err := c.WaitReady(ctx, id, 10*time.Second)
	if err != nil || r.State != "ready" {
		s.t.Fatalf("reservation %s = %+v, %v; want ready", id, r, err)
	}
	return r
}

// builderBanner connects through HAProxy's frontend (the SPOE agent picks
// the builder) and reads the builder's SSH banner.
func (s *hostileStack) builderBanner() (string, error) {
	c, err := net.DialTimeout("tcp", s.frontend, testwait.Bound)
	if err != nil {
		return "", err
	}
	defer c.Close()
	_ = c.SetReadDeadline(time.Now().Add(testwait.Bound))
	line, err := bufio.NewReader(c).ReadString('\n')
	return strings.TrimSpace(line), err
}

func (s *hostileStack) memstats() string {
	resp, err := http.Get("http://" + s.metrics + "/metrics")
	if err != nil {
		return err.Error()
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	var out []string
	for _, l := range strings.Split(string(b), "\n") {
		for _, k := range []string{"go_memstats_heap_inuse_bytes ", "go_memstats_heap_idle_bytes ", "go_memstats_heap_released_bytes ", "go_memstats_stack_inuse_bytes ", "go_goroutines ", "go_memstats_sys_bytes "} {
			if strings.HasPrefix(l, k) {
				out = append(out, l)
			}
		}
	}
	return strings.Join(out, "; ")
}
