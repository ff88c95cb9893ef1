package e2e

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"guardianproject.dev/ops/nix-builder-autoscaler/haproxy"
	"guardianproject.dev/ops/nix-builder-autoscaler/haproxy/haproxytest"
	"guardianproject.dev/ops/nix-builder-autoscaler/internal/api"
	"guardianproject.dev/ops/nix-builder-autoscaler/internal/config"
	"guardianproject.dev/ops/nix-builder-autoscaler/internal/daemon/daemontest"
	"guardianproject.dev/ops/nix-builder-autoscaler/internal/testwait"
)

// The fleet of BenchmarkIdleFleet: fleetPools pools of fleetSlots slots,
// fleetUp builders kept up in each by min_builders.
const (
	fleetPools = 4
	fleetSlots = 64
	fleetUp    = 32
)

// fleetSettle is waited after the fleet is up and before the idle window:
// the last servers' rise and the daemon's fast-interval rounds (while some
// server was not yet UP) end within a couple of check intervals, and they
// are start-up, not idle, cost.
const fleetSettle = 5 * time.Second

// BenchmarkIdleFleet measures what a large idle fleet costs the daemon:
// 4 pools × 64 slots (256 HAProxy servers), 32 builders up in each (128),
// haproxy.check_interval 1s, local stand-in builders, a real HAProxy on the
// generated configuration, and no reservation and no traffic.
//
// The daemon runs as its own process (the binary TestMain builds), so that
// its CPU time, read from /proc, is its own alone: not the benchmark's, not
// HAProxy's, not the builders'. After the fleet is up (every slot ready in
// the store and every builder's server UP in HAProxy) and has settled:
//
//   - idle window (FLEET_IDLE, default 60s): nothing is asked of the
//     daemon but, at either end, a metrics scrape and a status read. Figures: daemon-cpu-%, haproxy-cpu-%
//     and builders-cpu-% (all 128 together), each in percent of one core;
//     agent-checks/s (the daemon's agent_checks_total, all results) and
//     idle-rounds/min (reconcile rounds the daemon ran by itself).
//   - rounds (FLEET_ROUNDS, default 200): POST /v1/reconcile, one every
//     FLEET_ROUND_GAP (100ms), about ten times as often as a settling fleet
//     runs them; its answer is the reconciler's status right after the round
//     it ran (the same view as GET /v1/status's "reconcile"), whose
//     duration_seconds is that round's wall time, observe + plan + apply, as
//     the daemon's clock measured it. Figures: round-p50-ms, round-p99-ms,
//     round-max-ms, and round-cpu-ms, the daemon's CPU time over the phase
//     per round (HTTP, idle load and all); and the p99 of each of the
//     round's phases (observe-p99-ms ... push-p99-ms, as the status's
//     reconcile.phases_seconds names them), to tell where a slow tail goes;
//     round-own-p99-ms, the rounds without their wait for HAProxy (observe
//     cut to the store and provider reads).
//   - HAProxy alone (as many requests, as far apart): the benchmark sends
//     the `show stat` a round sends and times the answer. Figures:
//     haproxy-stat-p50-ms, haproxy-stat-p99-ms: what HAProxy and the
//     machine make the servers phase wait, whatever the daemon does.
//   - burst (as many rounds, one right after the other): a stress figure,
//     where each round also competes with the garbage collection of the
//     ones before it. Figures: burst-p50-ms, burst-p99-ms.
//
// fleet-up-s is how long the fleet took to come up, for context. No figure
// is asserted. bench/fleet.sh runs it and takes medians over runs.
// NBA_BENCH_TRACE=1 prints the daemon's and HAProxy's pids to stderr when
// the idle window begins (the daemon serves no pprof; perf -p can profile
// it).
//
// Everything started is stopped (by pid) when the benchmark ends. If
// NBA_FLEET_PIDS names a file, the pid of every process started (HAProxy,
// the daemon, each builder) is appended to it as it becomes known, and the
// file is removed once all are stopped: a script can kill what is left
// after an abort (a ^C or a test timeout runs no cleanup).
func BenchmarkIdleFleet(b *testing.B) {
	window := fleetEnvDuration(b, "FLEET_IDLE", 60*time.Second)
	rounds := fleetEnvInt(b, "FLEET_ROUNDS", 200)
	gap := fleetEnvDuration(b, "FLEET_ROUND_GAP", 100*time.Millisecond)

	start := time.Now()
	f := startFleet(b)
	f.waitUp()
	upIn := time.Since(start)
	if _, err := f.client.Reconcile(context.Background()); err != nil {
		b.Fatal(err)
	}
	time.Sleep(fleetSettle)
	if benchTrace {
		// Now, not in b.Log (shown when the benchmark ends), so that a
		// profiler can be pointed at the daemon during the window.
		fmt.Fprintf(os.Stderr, "fleet: %d builders ready and UP after %v; daemon pid %d, haproxy pid %d; idle window %v\n",
			fleetPools*fleetUp, upIn.Round(time.Second), f.daemonPID(), f.haproxyPID, window)
	}

	var idle fleetIdle
	durs, burst := roundTimes{phases: map[string]benchDurs{}}, roundTimes{phases: map[string]benchDurs{}}
	var stat benchDurs
	var roundCPU time.Duration
	var steal, total int64
	for b.Loop() {
		w := f.idleWindow(window)
		idle.add(w)
		cpu0 := benchProcCPU(f.daemonPID())
		s0, t0 := machineSteal()
		durs.merge(f.forceRounds(rounds, gap))
		s1, t1 := machineSteal()
		steal, total = steal+s1-s0, total+t1-t0
		roundCPU += benchProcCPU(f.daemonPID()) - cpu0
		stat = append(stat, f.probeStat(rounds, gap)...)
		burst.merge(f.forceRounds(rounds, 0))
	}
	pct := func(cpu time.Duration) float64 { return 100 * cpu.Seconds() / idle.wall.Seconds() }
	b.ReportMetric(pct(idle.daemon), "daemon-cpu-%")
	b.ReportMetric(pct(idle.haproxy), "haproxy-cpu-%")
	b.ReportMetric(pct(idle.builders), "builders-cpu-%")
	b.ReportMetric(idle.checks/idle.wall.Seconds(), "agent-checks/s")
	b.ReportMetric(float64(idle.rounds)/idle.wall.Minutes(), "idle-rounds/min")
	b.ReportMetric(benchMS(durs.total.pct(0.50)), "round-p50-ms")
	b.ReportMetric(benchMS(durs.total.pct(0.99)), "round-p99-ms")
	b.ReportMetric(benchMS(durs.total.max()), "round-max-ms")
	b.ReportMetric(benchMS(roundCPU)/float64(len(durs.total)), "round-cpu-ms")
	for _, ph := range roundPhaseNames {
		b.ReportMetric(benchMS(durs.phases[ph].pct(0.99)), ph+"-p99-ms")
	}
	b.ReportMetric(benchMS(durs.own.pct(0.99)), "round-own-p99-ms")
	b.ReportMetric(benchMS(stat.pct(0.50)), "haproxy-stat-p50-ms")
	b.ReportMetric(benchMS(stat.pct(0.99)), "haproxy-stat-p99-ms")
	if total > 0 {
		b.ReportMetric(100*float64(steal)/float64(total), "steal-%")
	}
	b.ReportMetric(benchMS(burst.total.pct(0.50)), "burst-p50-ms")
	b.ReportMetric(benchMS(burst.total.pct(0.99)), "burst-p99-ms")
	b.ReportMetric(upIn.Seconds(), "fleet-up-s")
}

// roundPhaseNames are the phases of GET /v1/status's
// reconcile.phases_seconds, in the order a round runs them.
var roundPhaseNames = []string{"observe", "store", "list", "servers", "plan", "apply", "publish", "push"}

// fleet is the daemon process, its HAProxy and (through the daemon) the
// stand-in builders.
type fleet struct {
	b          *testing.B
	dir        string // the daemon's socket, state and log
	cfg        *config.Config
	hp         *haproxytest.Instance
	haproxyPID int
	daemon     *exec.Cmd
	exited     chan struct{}
	client     *api.Client
	metrics    string // the daemon's metrics_listen
	pidFile    string // NBA_FLEET_PIDS
	noted      map[int]bool
}

func startFleet(b *testing.B) *fleet {
	b.Helper()
	dir := daemontest.ShortDir(b)
	hdir := haproxytest.Dir(b)
	port := func() int { return haproxytest.FreePort(b) }
	f := &fleet{b: b, dir: dir, metrics: fmt.Sprintf("127.0.0.1:%d", port()), pidFile: os.Getenv("NBA_FLEET_PIDS"), noted: map[int]bool{}}
	if f.pidFile != "" {
		if err := os.WriteFile(f.pidFile, nil, 0o600); err != nil {
			b.Fatal(err)
		}
	}

	var text strings.Builder
	// reconcile_interval is the default, written out because the idle
	// rounds it paces are part of what is measured.
	fmt.Fprintf(&text, `[daemon]
socket = "%[1]s/d.sock"
state_dir = "%[1]s/state"
metrics_listen = %[2]q
reconcile_interval = "10s"

[haproxy]
runtime_socket = "%[3]s/admin.sock"
agent_listen = "127.0.0.1:%[4]d"
spoa_listen = "127.0.0.1:%[5]d"
stats_listen = "127.0.0.1:%[6]d"
state_file = "%[3]s/state"
log = "stdout"
placeholder = "127.0.0.254:9"
check_interval = "1s"
`, dir, f.metrics, hdir, port(), port(), port())
	systems := []string{"x86_64-linux", "aarch64-linux", "i686-linux", "riscv64-linux"}
	for i := range fleetPools {
		fmt.Fprintf(&text, `
[[pool]]
name = "fleet%d"
systems = [%q]
provider = "local"
max_builders = %d
min_builders = %d
frontend = "127.0.0.1:%d"
`, i+1, systems[i], fleetSlots, fleetUp, port())
	}
	path := filepath.Join(dir, "config.toml")
	if err := os.WriteFile(path, []byte(text.String()), 0o600); err != nil {
		b.Fatal(err)
	}
	cfg, err := config.Load(path)
	if err != nil {
		b.Fatalf("config: %v", err)
	}
	f.cfg = cfg
	f.hp = startHAProxy(b, hdir, cfg, nil)
	for l := range strings.Lines(f.hp.Cmd("show info")) {
		if v, ok := strings.CutPrefix(l, "Pid: "); ok {
			f.haproxyPID, _ = strconv.Atoi(strings.TrimSpace(v))
		}
	}
	if f.haproxyPID == 0 {
		b.Fatal("no Pid in HAProxy's show info")
	}
	f.note(f.haproxyPID)

	logf, err := os.Create(filepath.Join(dir, "daemon.log"))
	if err != nil {
		b.Fatal(err)
	}
	defer logf.Close()
	f.daemon = exec.Command(binary, "run", "--config", path)
	f.daemon.Stdout, f.daemon.Stderr = logf, logf
	// Should this process die without its cleanups, the daemon goes too
	// (its builders, in their own process groups, do not: see
	// NBA_FLEET_PIDS).
	f.daemon.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := f.daemon.Start(); err != nil {
		b.Fatal(err)
	}
	f.exited = make(chan struct{})
	go func() {
		_ = f.daemon.Wait()
		close(f.exited)
	}()
	f.note(f.daemon.Process.Pid)
	// Registered after HAProxy's and the directories' cleanups, so it runs
	// before them: the builders' records are still there to be read.
	b.Cleanup(f.stop)

	f.client = api.NewUnixClient(cfg.Daemon.Socket)
	testwait.Until(b, "daemon API", func() bool {
		select {
		case <-f.exited:
			b.Fatalf("daemon exited: %v\n%s", f.daemon.ProcessState, f.logTail())
		default:
		}
		return f.client.Health(context.Background()) == nil
	})
	return f
}

func (f *fleet) daemonPID() int { return f.daemon.Process.Pid }

// note appends pid to NBA_FLEET_PIDS, once.
func (f *fleet) note(pid int) {
	if f.pidFile == "" || f.noted[pid] {
		return
	}
	f.noted[pid] = true
	w, err := os.OpenFile(f.pidFile, os.O_APPEND|os.O_WRONLY|os.O_CREATE, 0o600)
	if err != nil {
		f.b.Fatal(err)
	}
	defer w.Close()
	if _, err := fmt.Fprintln(w, pid); err != nil {
		f.b.Fatal(err)
	}
}

// fleetBuilder is the part of a local instance record this file needs.
type fleetBuilder struct {
	PID    int    `json:"pid"`
	Marker string `json:"marker"`
}

// builders returns the stand-ins the daemon recorded (live or not).
func (f *fleet) builders() []fleetBuilder {
	recs, _ := filepath.Glob(filepath.Join(f.cfg.Daemon.StateDir, "local", "instances", "*.json"))
	var out []fleetBuilder
	for _, p := range recs {
		data, err := os.ReadFile(p)
		if err != nil {
			continue
		}
		var r fleetBuilder
		if json.Unmarshal(data, &r) == nil && r.PID > 0 {
			out = append(out, r)
		}
	}
	return out
}

// alive reports whether pid is still this builder: its record's marker is
// in the process's command line, so a reused pid is never signalled.
func (r fleetBuilder) alive() bool {
	cmdline, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", r.PID))
	return err == nil && r.Marker != "" && strings.Contains(string(cmdline), r.Marker) && !zombie(r.PID)
}

// stop stops the daemon (SIGTERM: it leaves builders running, as in
// production), then kills every builder it recorded. HAProxy is stopped by
// its own cleanup.
func (f *fleet) stop() {
	_ = f.daemon.Process.Signal(syscall.SIGTERM)
	select {
	case <-f.exited:
	case <-time.After(testwait.Bound): // a hang guard
		f.b.Errorf("daemon still running %v after SIGTERM; killing it", testwait.Bound)
		_ = f.daemon.Process.Kill()
		<-f.exited
	}
	if f.b.Failed() {
		f.b.Logf("daemon log (end):\n%s", f.logTail())
	}
	for _, r := range f.builders() {
		if r.alive() {
			_ = syscall.Kill(-r.PID, syscall.SIGKILL)
		}
	}
	// The file is removed only once its processes are gone.
	f.hp.Stop()
	if f.pidFile != "" {
		_ = os.Remove(f.pidFile)
	}
}

func (f *fleet) logTail() string {
	data, _ := os.ReadFile(filepath.Join(f.dir, "daemon.log"))
	lines := strings.SplitAfter(string(data), "\n")
	if len(lines) > 100 {
		lines = lines[len(lines)-100:]
	}
	return strings.Join(lines, "")
}

// waitUp waits until every pool has fleetUp ready slots and HAProxy has as
// many servers UP. Bringing up 128 builders one launch after the other can
// take longer than testwait.Bound on a busy machine, so the bound is on
// progress: it fails only after testwait.Bound without one more builder
// ready or UP.
func (f *fleet) waitUp() {
	want := fleetPools * fleetUp
	progress := -1
	for {
		var ready, up int
		moved := testwait.Poll(testwait.Bound, func() bool {
			select {
			case <-f.exited:
				f.b.Fatalf("daemon exited: %v\n%s", f.daemon.ProcessState, f.logTail())
			default:
			}
			for _, r := range f.builders() {
				f.note(r.PID)
			}
			ready, up = f.readySlots(), f.serversUp()
			return ready+up > progress
		})
		if !moved {
			f.b.Fatalf("fleet stuck: %d of %d slots ready and %d servers UP for %v", ready, want, up, testwait.Bound)
		}
		progress = ready + up
		if ready >= want && up >= want {
			return
		}
	}
}

func (f *fleet) readySlots() int {
	sl, err := f.client.Slots(context.Background())
	if err != nil {
		return 0
	}
	n := 0
	for _, s := range sl.Slots {
		if s.State == "ready" {
			n++
		}
	}
	return n
}

// serversUp counts the pools' servers whose status is UP in HAProxy.
func (f *fleet) serversUp() int {
	backends := map[string]bool{}
	for _, p := range f.cfg.Pools {
		backends[haproxy.Backend(p.Name)] = true
	}
	sc := bufio.NewScanner(strings.NewReader(f.hp.Cmd("show stat")))
	status := -1
	n := 0
	for sc.Scan() {
		fields := strings.Split(sc.Text(), ",")
		if h, ok := strings.CutPrefix(sc.Text(), "# "); ok {
			for i, name := range strings.Split(h, ",") {
				if name == "status" {
					status = i
				}
			}
			continue
		}
		if status < 0 || len(fields) <= status || !backends[fields[0]] {
			continue
		}
		if fields[1] != "BACKEND" && fields[status] == "UP" {
			n++
		}
	}
	return n
}

// fleetIdle accumulates idle windows.
type fleetIdle struct {
	wall                      time.Duration
	daemon, haproxy, builders time.Duration
	checks                    float64
	rounds                    uint64
}

func (a *fleetIdle) add(w fleetIdle) {
	a.wall += w.wall
	a.daemon += w.daemon
	a.haproxy += w.haproxy
	a.builders += w.builders
	a.checks += w.checks
	a.rounds += w.rounds
}

// idleWindow sleeps for d and returns what the daemon, HAProxy and the
// builders did meanwhile.
func (f *fleet) idleWindow(d time.Duration) fleetIdle {
	builders := f.builders()
	buildersCPU := func() time.Duration {
		var sum time.Duration
		for _, r := range builders {
			sum += benchProcCPU(r.PID)
		}
		return sum
	}
	ctx := context.Background()
	st0, err := f.client.Status(ctx)
	if err != nil {
		f.b.Fatal(err)
	}
	checks0 := f.agentChecks()
	t0 := time.Now()
	d0, h0, b0 := benchProcCPU(f.daemonPID()), benchProcCPU(f.haproxyPID), buildersCPU()
	time.Sleep(d)
	d1, h1, b1 := benchProcCPU(f.daemonPID()), benchProcCPU(f.haproxyPID), buildersCPU()
	wall := time.Since(t0)
	checks1 := f.agentChecks()
	st1, err := f.client.Status(ctx)
	if err != nil {
		f.b.Fatal(err)
	}
	return fleetIdle{wall: wall, daemon: d1 - d0, haproxy: h1 - h0, builders: b1 - b0,
		checks: checks1 - checks0, rounds: st1.Reconcile.Rounds - st0.Reconcile.Rounds}
}

// agentChecks scrapes the daemon's nix_builder_autoscaler_agent_checks_total,
// summed over its results.
func (f *fleet) agentChecks() float64 {
	resp, err := http.Get("http://" + f.metrics + "/metrics")
	if err != nil {
		f.b.Fatal(err)
	}
	defer resp.Body.Close()
	sum := 0.0
	sc := bufio.NewScanner(resp.Body)
	for sc.Scan() {
		name, rest, _ := strings.Cut(sc.Text(), " ")
		if name != "nix_builder_autoscaler_agent_checks_total" && !strings.HasPrefix(name, "nix_builder_autoscaler_agent_checks_total{") {
			continue
		}
		v, err := strconv.ParseFloat(strings.TrimSpace(rest), 64)
		if err != nil {
			f.b.Fatalf("metrics line %q: %v", sc.Text(), err)
		}
		sum += v
	}
	if err := sc.Err(); err != nil {
		f.b.Fatal(err)
	}
	return sum
}

// forceRounds runs n reconcile rounds through the API, gap apart (0: one
// right after the other), and returns each one's duration and phases as the
// daemon measured them.
func (f *fleet) forceRounds(n int, gap time.Duration) roundTimes {
	rt := roundTimes{phases: map[string]benchDurs{}}
	for i := range n {
		if i > 0 {
			time.Sleep(gap)
		}
		st, err := f.client.Reconcile(context.Background())
		if err != nil {
			f.b.Fatal(err)
		}
		if st.LastError != "" {
			f.b.Fatalf("reconcile round failed: %s", st.LastError)
		}
		rt.add(st)
	}
	return rt
}

// probeStat sends HAProxy the command a round sends it (the backends and
// servers of `show stat`) n times, gap apart, from the benchmark, and returns how long
// each answer took: what HAProxy and the machine alone make a round wait,
// to compare with the round's servers phase.
func (f *fleet) probeStat(n int, gap time.Duration) benchDurs {
	durs := make(benchDurs, 0, n)
	for range n {
		time.Sleep(gap)
		t := time.Now()
		f.hp.Cmd(haproxy.StatCmd)
		durs = append(durs, time.Since(t))
	}
	return durs
}

// roundTimes are the durations of rounds, whole and per phase; own is each
// round without its wait for HAProxy: the round's time with its observe
// phase cut to the store and provider reads.
type roundTimes struct {
	total, own benchDurs
	phases     map[string]benchDurs
}

func (rt *roundTimes) add(st api.ReconcileStatus) {
	d := func(s float64) time.Duration { return time.Duration(s * float64(time.Second)) }
	rt.total = append(rt.total, d(st.DurationSeconds))
	ph := st.Phases
	rt.own = append(rt.own, d(st.DurationSeconds-ph.Observe+max(ph.Store, ph.List)))
	for name, v := range map[string]float64{
		"observe": ph.Observe, "store": ph.Store, "list": ph.List, "servers": ph.Servers,
		"plan": ph.Plan, "apply": ph.Apply, "publish": ph.Publish, "push": ph.Push,
	} {
		rt.phases[name] = append(rt.phases[name], d(v))
	}
}

func (rt *roundTimes) merge(o roundTimes) {
	rt.total = append(rt.total, o.total...)
	rt.own = append(rt.own, o.own...)
	for k, v := range o.phases {
		rt.phases[k] = append(rt.phases[k], v...)
	}
}

// machineSteal returns the machine's steal time (time a virtual machine's
// CPUs were ready to run but the host ran something else) and all CPU time,
// in ticks, from /proc/stat: stalls of the round tail that no process
// caused show here.
func machineSteal() (steal, total int64) {
	b, err := os.ReadFile("/proc/stat")
	if err != nil {
		return 0, 0
	}
	line, _, _ := strings.Cut(string(b), "\n")
	f := strings.Fields(line)
	for i, v := range f[1:] {
		n, _ := strconv.ParseInt(v, 10, 64)
		total += n
		if i == 7 {
			steal = n
		}
	}
	return steal, total
}

func fleetEnvDuration(b *testing.B, name string, def time.Duration) time.Duration {
	v := os.Getenv(name)
	if v == "" {
		return def
	}
	d, err := time.ParseDuration(v)
	if err != nil || d <= 0 {
		b.Fatalf("%s=%q: want a positive duration like 30s", name, v)
	}
	return d
}

func fleetEnvInt(b *testing.B, name string, def int) int {
	v := os.Getenv(name)
	if v == "" {
		return def
	}
	n, err := strconv.Atoi(v)
	if err != nil || n <= 0 {
		b.Fatalf("%s=%q: want a positive number", name, v)
	}
	return n
}
