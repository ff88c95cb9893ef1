package e2e

import (
	"context"
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"guardianproject.dev/ops/nix-builder-autoscaler/clock"
	"guardianproject.dev/ops/nix-builder-autoscaler/haproxy"
	"guardianproject.dev/ops/nix-builder-autoscaler/haproxy/haproxytest"
	"guardianproject.dev/ops/nix-builder-autoscaler/internal/api"
	"guardianproject.dev/ops/nix-builder-autoscaler/internal/config"
	"guardianproject.dev/ops/nix-builder-autoscaler/internal/daemon"
	"guardianproject.dev/ops/nix-builder-autoscaler/internal/daemon/daemontest"
	"guardianproject.dev/ops/nix-builder-autoscaler/internal/testwait"
	"guardianproject.dev/ops/nix-builder-autoscaler/scaler"
)

// Benchmarks of the whole stack: the daemon in-process (real clock, local
// stand-in builders) and a real HAProxy running the configuration generated
// from the same file. No timing is asserted; the figures are reported with
// b.ReportMetric. bench/README.md says how to run them and what each figure
// means; docs/performance.md has results.

// benchStack is stack (haproxy_test.go) for benchmarks: any testing.TB, a
// chosen check_interval, and a hook that edits the generated haproxy.cfg
// before HAProxy starts.
type benchStack struct {
	tb       testing.TB
	h        *daemontest.Harness
	hp       *haproxytest.Instance
	cfg      *config.Config
	reg      *prometheus.Registry // the daemon's metrics
	frontend string
}

// startBenchStack starts HAProxy on the configuration generated for pool x86
// (pool is extra TOML for it) with the given hold and check_interval, after
// an optional edit of haproxy.cfg, then the daemon in-process (opts change
// its options after the stack's own).
func startBenchStack(tb testing.TB, pool, hold, checkInterval string, edit func(string) string, opts ...daemontest.Option) *benchStack {
	tb.Helper()
	dir := haproxytest.Dir(tb)
	port := func() int { return haproxytest.FreePort(tb) }
	frontend := fmt.Sprintf("127.0.0.1:%d", port())
	cfg := daemontest.ConfigWithDaemon(tb, fmt.Sprintf(`
[haproxy]
runtime_socket = "%[1]s/admin.sock"
agent_listen = "127.0.0.1:%[2]d"
spoa_listen = "127.0.0.1:%[3]d"
stats_listen = "127.0.0.1:%[4]d"
state_file = "%[1]s/state"
log = "stdout"
placeholder = "127.0.0.254:9"
hold = "%[5]s"
check_interval = "%[6]s"`, dir, port(), port(), port(), hold, checkInterval), fmt.Sprintf("frontend = %q\n%s", frontend, pool))
	hp := startHAProxy(tb, dir, cfg, edit)
	reg := prometheus.NewRegistry()
	h := daemontest.Start(tb, cfg, append([]daemontest.Option{func(o *daemon.Options) {
		o.Clock = clock.Real{}
		o.KickBatch = 0 // the product's batch window, on the real clock
		o.Registry = reg
	}}, opts...)...)
	return &benchStack{tb: tb, h: h, hp: hp, cfg: cfg, reg: reg, frontend: frontend}
}

// startHAProxy runs a real HAProxy in dir on the configuration generated
// from cfg, changed by edit (as text) if edit is not nil.
func startHAProxy(tb testing.TB, dir string, cfg *config.Config, edit func(string) string) *haproxytest.Instance {
	tb.Helper()
	spoePath := filepath.Join(dir, "nba-spoe.conf")
	files, err := haproxy.Generate(cfg.HAProxySpec(), haproxy.Options{SPOEPath: spoePath})
	if err != nil {
		tb.Fatal(err)
	}
	if err := os.WriteFile(spoePath, files.SPOEConf, 0o600); err != nil {
		tb.Fatal(err)
	}
	hcfg := string(files.HAProxyCfg)
	if edit != nil {
		hcfg = edit(hcfg)
	}
	return haproxytest.Start(tb, dir, hcfg)
}

// benchWithoutSPOE removes, as text, the lines of the generated haproxy.cfg that
// ask the SPOE agent: `filter spoe ...` and `tcp-request content
// send-spoe-group ...`. Everything else stays (the inspect delay, the reject
// rule and use-server on variables that are now never set, the SPOA
// backend), so HAProxy balances by leastconn alone.
func benchWithoutSPOE(tb testing.TB) func(string) string {
	return func(cfg string) string {
		var out []string
		removed := 0
		for _, l := range strings.Split(cfg, "\n") {
			t := strings.TrimSpace(l)
			if strings.HasPrefix(t, "filter spoe ") || strings.HasPrefix(t, "tcp-request content send-spoe-group ") {
				removed++
				continue
			}
			out = append(out, l)
		}
		if removed != 2 {
			tb.Fatalf("removed %d SPOE lines from the generated config, want 2 (filter, send-spoe-group); has the template changed?", removed)
		}
		return strings.Join(out, "\n")
	}
}

// serverStat returns show stat's fields for server x86/slot, nil if absent.
func (s *benchStack) serverStat(slot string) map[string]string {
	return s.proxyStat(haproxy.Backend("x86"), slot)
}

// proxyStat returns show stat's fields for proxy/server, nil if absent.
func (s *benchStack) proxyStat(proxy, server string) map[string]string {
	out := s.hp.Cmd("show stat")
	lines := strings.Split(strings.TrimSpace(out), "\n")
	if len(lines) == 0 || !strings.HasPrefix(lines[0], "# ") {
		return nil
	}
	header := strings.Split(strings.TrimPrefix(lines[0], "# "), ",")
	for _, l := range lines[1:] {
		f := strings.Split(l, ",")
		if len(f) >= 2 && f[0] == proxy && f[1] == server {
			m := map[string]string{}
			for i, h := range header {
				if i < len(f) {
					m[h] = f[i]
				}
			}
			return m
		}
	}
	return nil
}

// waitUp waits until HAProxy routes to x86/slot.
func (s *benchStack) waitUp(slot string) {
	s.tb.Helper()
	testwait.Until(s.tb, "x86/"+slot+" UP in HAProxy", func() bool { return s.serverStat(slot)["status"] == "UP" })
}

// benchDurs collects durations and reports percentiles of them.
type benchDurs []time.Duration

func (d benchDurs) pct(p float64) time.Duration {
	if len(d) == 0 {
		return 0
	}
	s := slices.Clone(d)
	slices.Sort(s)
	return s[min(len(s)-1, int(p*float64(len(s))))]
}

func (d benchDurs) max() time.Duration {
	if len(d) == 0 {
		return 0
	}
	return slices.Max(d)
}

func benchMS(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }

// BenchmarkHAProxyConnections measures new connections per second through
// the HAProxy frontend, each one: dial, read the builder's SSH banner,
// close; with 1, 4 and 16 clients (goroutines) at once. Two stacks run side
// by side, identical but for HAProxy's config:
//
//   - spoe: the generated config, every connection steered by the SPOE
//     agent (min_builders = 2, so both builders are up; max_jobs = 64);
//   - plain: the same generated config with the SPOE filter and
//     send-spoe-group lines removed (benchWithoutSPOE), so HAProxy balances by
//     leastconn alone.
//
// The b.N connections of each are made in alternating chunks (spoe, plain,
// spoe, ...), so that a busy neighbour on a shared machine slows both alike.
// Both log every connection to HAProxy's stdout (the generated log line).
//
// Figures, per stack (spoe-, plain-): conns/s; the client's dial-to-banner
// time (banner-p50/p99-ms); CPU time per connection of HAProxy (haproxy-cpu),
// of this process (go-cpu: the clients and the daemon with its SPOE agent)
// and of the builders, from /proc (10 ms ticks). ratio is spoe/plain
// conns/s. For spoe, from HAProxy's own log line (spoe_ms=
// %[var(txn.nba.ptime)], SPOE's processing time in whole ms):
// spoe-ms-p50/p99/max; unsteered, the connections without a slot variable;
// held, those the agent held before answering (its decisions counter,
// result held_routed).
func BenchmarkHAProxyConnections(b *testing.B) {
	const pool = "max_builders = 2\nmin_builders = 2\nmax_jobs = 64"
	spoe := startBenchStack(b, pool, "10s", "1s", nil)
	plain := startBenchStack(b, pool, "10s", "1s", benchWithoutSPOE(b))
	for _, s := range []*benchStack{spoe, plain} {
		s.waitUp("slot1")
		s.waitUp("slot2")
		// One more round, so the SPOE agent's view has both servers up.
		if _, err := s.h.Client.Reconcile(context.Background()); err != nil {
			b.Fatal(err)
		}
	}
	for _, clients := range []int{1, 4, 16} {
		b.Run(fmt.Sprintf("clients=%d", clients), func(b *testing.B) {
			benchConnections(b, clients, spoe, plain)
		})
	}
}

// benchConnStats accumulates one stack's chunks.
type benchConnStats struct {
	elapsed time.Duration
	lat     benchDurs
	cpu     benchCPU
}

const benchConnChunk = 500

func benchConnections(b *testing.B, clients int, spoe, plain *benchStack) {
	logFrom := len(spoe.hp.Log())
	heldFrom := spoe.counter("nix_builder_autoscaler_spoa_decisions_total", "result", "held_routed")
	stats := map[*benchStack]*benchConnStats{spoe: {}, plain: {}}
	b.ResetTimer()
	for done := 0; done < b.N; done += benchConnChunk {
		n := min(benchConnChunk, b.N-done)
		for _, s := range []*benchStack{spoe, plain} {
			st := stats[s]
			before := s.cpu()
			elapsed, lat := s.connections(b, clients, n)
			after := s.cpu()
			st.elapsed += elapsed
			st.lat = append(st.lat, lat...)
			st.cpu.haproxy += after.haproxy - before.haproxy
			st.cpu.self += after.self - before.self
			st.cpu.builders += after.builders - before.builders
		}
	}
	b.StopTimer()
	rate := func(s *benchStack) float64 { return float64(b.N) / stats[s].elapsed.Seconds() }
	perConn := func(d time.Duration) float64 { return float64(d.Microseconds()) / float64(b.N) }
	for _, v := range []struct {
		name string
		s    *benchStack
	}{{"spoe", spoe}, {"plain", plain}} {
		st := stats[v.s]
		b.ReportMetric(rate(v.s), v.name+"-conns/s")
		b.ReportMetric(benchMS(st.lat.pct(0.50)), v.name+"-banner-p50-ms")
		b.ReportMetric(benchMS(st.lat.pct(0.99)), v.name+"-banner-p99-ms")
		b.ReportMetric(perConn(st.cpu.haproxy), v.name+"-haproxy-cpu-µs/conn")
		b.ReportMetric(perConn(st.cpu.self), v.name+"-go-cpu-µs/conn")
		b.ReportMetric(perConn(st.cpu.builders), v.name+"-builders-cpu-µs/conn")
	}
	b.ReportMetric(rate(spoe)/rate(plain), "ratio")

	// HAProxy logs a connection when it ends; wait for all of them.
	var log string
	for range 500 {
		log = spoe.hp.Log()[logFrom:]
		if strings.Count(log, " spoe_ms=") >= b.N {
			break
		}
		time.Sleep(10 * time.Millisecond)
	}
	var spoeMS benchDurs
	unsteered, lines := 0, 0
	for l := range strings.Lines(log) {
		slot, ok1 := benchLogField(l, "slot")
		ptime, ok2 := benchLogField(l, "spoe_ms")
		if !ok1 || !ok2 {
			continue
		}
		lines++
		if slot == "-" {
			unsteered++
		}
		if v, err := strconv.Atoi(ptime); err == nil { // "-": no SPOE processing time
			spoeMS = append(spoeMS, time.Duration(v)*time.Millisecond)
		}
	}
	if len(spoeMS) == 0 {
		b.Fatalf("no spoe_ms in HAProxy's log for %d connections", b.N)
	}
	b.ReportMetric(benchMS(spoeMS.pct(0.50)), "spoe-ms-p50")
	b.ReportMetric(benchMS(spoeMS.pct(0.99)), "spoe-ms-p99")
	b.ReportMetric(benchMS(spoeMS.max()), "spoe-ms-max")
	b.ReportMetric(float64(unsteered), "unsteered")
	b.ReportMetric(spoe.counter("nix_builder_autoscaler_spoa_decisions_total", "result", "held_routed")-heldFrom, "held")
	if missing := b.N - lines; missing > 0 {
		b.Logf("%d of %d connections have no log line (HAProxy drops log lines when its stdout is full)", missing, b.N)
	}
}

// benchLogField returns the value of " name=value" in HAProxy's log line l.
func benchLogField(l, name string) (string, bool) {
	_, v, ok := strings.Cut(l, " "+name+"=")
	if !ok {
		return "", false
	}
	if i := strings.IndexAny(v, " \n"); i >= 0 {
		v = v[:i]
	}
	return v, true
}

// connections makes n connections through the frontend from clients
// goroutines and returns how long they took and each one's dial-to-banner
// time.
func (s *benchStack) connections(b *testing.B, clients, n int) (time.Duration, benchDurs) {
	lat := make(benchDurs, n)
	var next atomic.Int64
	var wg sync.WaitGroup
	start := time.Now()
	for range clients {
		wg.Add(1)
		go func() {
			defer wg.Done()
			buf := make([]byte, 64)
			for {
				i := int(next.Add(1) - 1)
				if i >= n {
					return
				}
				t0 := time.Now()
				c, err := net.DialTimeout("tcp", s.frontend, 5*time.Second)
				if err != nil {
					b.Errorf("dial: %v", err)
					return
				}
				_ = c.SetReadDeadline(time.Now().Add(10 * time.Second))
				m, err := benchReadLine(c, buf)
				lat[i] = time.Since(t0)
				c.Close()
				if err != nil || !strings.HasPrefix(string(buf[:m]), "SSH-2.0-") {
					b.Errorf("connection %d: %q, %v; want the builder's banner", i, buf[:m], err)
					return
				}
			}
		}()
	}
	wg.Wait()
	return time.Since(start), lat
}

// counter returns the sum of the daemon's counter name over the series
// whose label has value.
func (s *benchStack) counter(name, label, value string) float64 {
	mfs, err := s.reg.Gather()
	if err != nil {
		s.tb.Fatal(err)
	}
	sum := 0.0
	for _, mf := range mfs {
		if mf.GetName() != name {
			continue
		}
		for _, m := range mf.GetMetric() {
			for _, l := range m.GetLabel() {
				if l.GetName() == label && l.GetValue() == value {
					sum += m.GetCounter().GetValue()
				}
			}
		}
	}
	return sum
}

// benchCPU is CPU time (user + system) used so far.
type benchCPU struct {
	haproxy  time.Duration
	self     time.Duration // the benchmark's clients and the daemon, with its SPOE agent
	builders time.Duration
}

func (s *benchStack) cpu() benchCPU {
	var c benchCPU
	for _, l := range strings.Split(s.hp.Cmd("show info"), "\n") {
		if v, ok := strings.CutPrefix(l, "Pid: "); ok {
			pid, _ := strconv.Atoi(strings.TrimSpace(v))
			c.haproxy = benchProcCPU(pid)
		}
	}
	c.self = benchProcCPU(os.Getpid())
	recs, _ := filepath.Glob(filepath.Join(s.cfg.Daemon.StateDir, "local", "instances", "*.json"))
	for _, f := range recs {
		b, err := os.ReadFile(f)
		if err != nil {
			continue
		}
		var r struct {
			PID int `json:"pid"`
		}
		if json.Unmarshal(b, &r) == nil && r.PID > 0 {
			c.builders += benchProcCPU(r.PID)
		}
	}
	return c
}

// benchProcCPU returns the user + system time of process pid (0 if unknown),
// assuming the usual 100 clock ticks per second.
func benchProcCPU(pid int) time.Duration {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0
	}
	_, rest, ok := strings.Cut(string(b), ") ")
	f := strings.Fields(rest)
	if !ok || len(f) < 13 {
		return 0
	}
	utime, _ := strconv.ParseInt(f[11], 10, 64)
	stime, _ := strconv.ParseInt(f[12], 10, 64)
	return time.Duration(utime+stime) * 10 * time.Millisecond
}

// benchReadLine reads up to and including '\n' into buf and returns its length.
func benchReadLine(c net.Conn, buf []byte) (int, error) {
	n := 0
	for n < len(buf) {
		m, err := c.Read(buf[n:])
		n += m
		if i := strings.IndexByte(string(buf[:n]), '\n'); i >= 0 {
			return i + 1, nil
		}
		if err != nil {
			return n, err
		}
	}
	return n, fmt.Errorf("no line end in %d bytes", n)
}

// BenchmarkReachableToReady measures, for one new builder, how long after it
// becomes reachable (answers with its SSH banner) HAProxy's check passes,
// its slot is ready, the reservation that asked for it (created before the
// launch) is ready, HAProxy routes to it, and a connection made through
// HAProxy when the reservation was ready is served. Each iteration: create
// a reservation (which launches slot1), observe, then (not timed) release,
// drain, and wait until the slot is empty and HAProxy has it in
// maintenance.
//
// "Reachable" is observed by the benchmark itself: it connects to the
// builder's address directly and takes the moment the banner arrives.
// Two kinds of boot:
//
//   - boot=refusing: a launch_command that starts the stand-in 2 s after
//     printing its address, so the port refuses connections until then, like
//     a machine whose sshd is not up yet. The benchmark retries every 2 ms.
//   - boot=accepting: the local stand-in with boot_delay 2s. It listens at
//     once and answers after the delay, so a connection made during boot
//     (HAProxy's health check too) gets the banner the moment it boots.
//
// And two histories of the slot's HAProxy server:
//
//   - slot=fresh: HAProxy is restarted between iterations (not timed), so
//     the server has no earlier check result, as for a slot's first builder.
//   - slot=reused: the server keeps the result of its previous builder's
//     last check. Here builders are the stand-in with a 2 s boot delay,
//     started by a launch_command, and a terminated builder keeps
//     answering for 3 s, as a machine does while it shuts down; so the
//     server's last check before maintenance passed. HAProxy hides that
//     result while the server is in maintenance and shows it again when
//     the agent takes the server out (DOWN (agent)), before any check ran on
//     the new address; the daemon takes that leftover L7OK for the new
//     builder's, so figures can be negative (ready before reachable). See
//     docs/performance.md.
//
// Figures, each from reachable, p50 and max over the iterations:
// check (the first passing health check after a failing one on the new
// address), slot (the store says ready), res (the reservation's long poll
// answered ready), up (HAProxy's server status UP: the reconciler pushed
// it, or the agent check said ready), served (the banner came through the frontend); boot is creation →
// reachable; ready-before-reachable counts the iterations whose slot was
// ready before the builder was reachable. NBA_BENCH_TRACE=1 prints each
// iteration's show stat timeline to stderr.
func BenchmarkReachableToReady(b *testing.B) {
	for _, c := range []struct{ check, boot, slot string }{
		{"1s", "refusing", "fresh"},
		{"1s", "accepting", "fresh"},
		{"200ms", "refusing", "fresh"},
		{"200ms", "accepting", "fresh"},
		{"1s", "accepting", "reused"},
	} {
		b.Run(fmt.Sprintf("check=%s/boot=%s/slot=%s", c.check, c.boot, c.slot), func(b *testing.B) {
			benchReachable(b, c.check, c.boot, c.slot == "fresh")
		})
	}
}

var benchTrace = os.Getenv("NBA_BENCH_TRACE") != ""

type benchReachSample struct {
	boot, check, slot, res, up, served time.Duration
}

func benchReachable(b *testing.B, check, boot string, fresh bool) {
	pool := "max_builders = 1\nmax_jobs = 4\n[pool.local]\n"
	var launch, terminate string
	hook := haproxytest.Dir(b)
	// Runs last (cleanups are LIFO): whatever the daemon left running.
	b.Cleanup(func() { benchKillPIDFiles(hook) })
	switch {
	case boot == "refusing":
		port := haproxytest.FreePort(b)
		launch = fmt.Sprintf(`setsid sh -c 'sleep 2; exec %[1]s local-builder --listen 127.0.0.1:%[2]d --marker {{.InstanceID}}' </dev/null >/dev/null 2>&1 &
echo $! > %[3]s/{{.InstanceID}}.pid
echo 127.0.0.1:%[2]d`, binary, port, hook)
	case !fresh:
		// Terminated builders keep answering for 3 s, as a machine does
		// while it shuts down: HAProxy's last check of it passes.
		launch = fmt.Sprintf(`setsid %[1]s local-builder --listen 127.0.0.1:0 --boot-delay 2s --addr-file %[2]s/{{.InstanceID}}.addr --marker {{.InstanceID}} </dev/null >/dev/null 2>&1 &
echo $! > %[2]s/{{.InstanceID}}.pid
i=0; while [ ! -s %[2]s/{{.InstanceID}}.addr ] && [ $i -lt 200 ]; do sleep 0.05; i=$((i+1)); done
cat %[2]s/{{.InstanceID}}.addr`, binary, hook)
		terminate = fmt.Sprintf(`(sleep 3; kill $(cat %s/{{.InstanceID}}.pid)) </dev/null >/dev/null 2>&1 &`, hook)
	default:
		pool += `boot_delay = "2s"`
	}
	if launch != "" {
		if terminate == "" {
			terminate = fmt.Sprintf(`kill $(cat %s/{{.InstanceID}}.pid) 2>/dev/null; true`, hook)
		}
		pool += fmt.Sprintf("launch_command = '''%s'''\nterminate_command = '''%s'''", launch, terminate)
	}
	s := startBenchStack(b, pool, "60s", check, nil)
	if !fresh {
		// A first builder (not measured) leaves its check result behind.
		s.launchOnce(b, "reach-0")
		s.reset(b, "reach-0", false)
	}
	interval, err := time.ParseDuration(check)
	if err != nil {
		b.Fatal(err)
	}
	var samples []benchReachSample
	i := 0
	for b.Loop() {
		i++
		id := fmt.Sprintf("reach-%d", i)
		// HAProxy's checks and the daemon's rounds tick every interval;
		// start at a random phase of them, so that their waits are sampled
		// rather than the same every time.
		b.StopTimer()
		time.Sleep(rand.N(interval))
		b.StartTimer()
		samples = append(samples, s.launchOnce(b, id))
		b.StopTimer()
		s.reset(b, id, fresh)
		b.StartTimer()
	}
	report := func(name string, f func(benchReachSample) time.Duration) {
		var d benchDurs
		for _, x := range samples {
			d = append(d, f(x))
		}
		b.ReportMetric(benchMS(d.pct(0.5)), name+"-p50-ms")
		b.ReportMetric(benchMS(d.pct(0.99)), name+"-p99-ms")
		b.ReportMetric(benchMS(d.max()), name+"-max-ms")
	}
	report("boot", func(x benchReachSample) time.Duration { return x.boot })
	report("check", func(x benchReachSample) time.Duration { return x.check })
	report("slot", func(x benchReachSample) time.Duration { return x.slot })
	report("res", func(x benchReachSample) time.Duration { return x.res })
	report("up", func(x benchReachSample) time.Duration { return x.up })
	report("served", func(x benchReachSample) time.Duration { return x.served })
	early := 0
	for _, x := range samples {
		if x.slot < 0 {
			early++
		}
	}
	b.ReportMetric(float64(early), "ready-before-reachable")
}

// launchOnce creates reservation id with no builder running and times the
// builder's way to ready, from the moment it is reachable.
func (s *benchStack) launchOnce(b *testing.B, id string) benchReachSample {
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	key := scaler.SlotKey{Pool: "x86", Slot: "slot1"}
	created := time.Now()
	if _, _, err := s.h.Client.CreateReservation(ctx, api.CreateReservationRequest{ID: id, System: "x86_64-linux"}); err != nil {
		b.Fatal(err)
	}
	resReady := make(chan time.Time, 1)
	go func() {
		r, err := s.h.Client.WaitReady(ctx, id, 30*time.Second)
		at := time.Now()
		if err != nil || r.State != "ready" {
			b.Errorf("reservation %s = %+v, %v; want ready", id, r, err)
			at = time.Time{}
		}
		resReady <- at
	}()
	reached := make(chan time.Time, 1)
	served := make(chan time.Time, 1)
	var tReach, tCheck, tSlot, tRes, tUp, tServed time.Time
	probing, checkFailed := false, false // checkFailed: a failing or running check was seen
	for tReach.IsZero() || tSlot.IsZero() || tRes.IsZero() || tUp.IsZero() || tServed.IsZero() || tCheck.IsZero() {
		if ctx.Err() != nil {
			b.Fatalf("%s: not all seen within 60s: reach %v check %v slot %v res %v up %v served %v",
				id, tReach, tCheck, tSlot, tRes, tUp, tServed)
		}
		now := time.Now()
		sl, err := s.h.Daemon.Store().Slot(ctx, key)
		if err != nil {
			b.Fatal(err)
		}
		if !probing && sl.Address != "" && sl.State != scaler.Empty {
			probing = true
			go func(addr string) { reached <- benchProbeBanner(ctx, addr) }(sl.Address)
		}
		if tSlot.IsZero() && sl.State == scaler.Ready {
			tSlot = now
		}
		st := s.serverStat("slot1")
		if benchTrace {
			fmt.Fprintf(os.Stderr, "%s +%v slot=%s addr=%s st=%s/%s chk=%s last_chk=%q agent=%s last_agt=%q\n", id, time.Since(created).Round(time.Millisecond), sl.State, st["addr"], st["status"], st["check_status"], st["check_code"], st["last_chk"], st["agent_status"], st["last_agt"])

		}
		if tCheck.IsZero() && sl.Address != "" && st["addr"] == sl.Address && !strings.HasPrefix(st["status"], "MAINT") {
			// Only a pass after a failure or after a check seen running
			// ("* ...") counts: the status may be left over from the
			// previous builder. (In maintenance HAProxy shows no check
			// status at all.)
			cs := st["check_status"]
			switch strings.TrimPrefix(cs, "* ") {
			case "L4OK", "L6OK", "L7OK":
				if checkFailed && !strings.HasPrefix(cs, "* ") {
					tCheck = now
				}
			}
			if strings.HasPrefix(cs, "* ") || !strings.HasSuffix(cs, "OK") {
				checkFailed = true
			}
		}
		if tUp.IsZero() && st["status"] == "UP" && st["addr"] == sl.Address {
			tUp = now
		}
		select {
		case tReach = <-reached:
		case tRes = <-resReady:
			if tRes.IsZero() {
				b.FailNow()
			}
			// A client that was told "ready" connects now.
			go func() { served <- s.dialFrontend(ctx) }()
		case tServed = <-served:
			if tServed.IsZero() {
				b.Fatalf("%s: the connection made when the reservation was ready got no banner", id)
			}
		case <-time.After(2 * time.Millisecond):
		}
	}
	if benchTrace {
		fmt.Fprintf(os.Stderr, "%s: from creation: reachable %v check %v slot %v res %v up %v served %v\n", id,
			tReach.Sub(created), tCheck.Sub(created), tSlot.Sub(created), tRes.Sub(created), tUp.Sub(created), tServed.Sub(created))
	}
	return benchReachSample{boot: tReach.Sub(created), check: tCheck.Sub(tReach), slot: tSlot.Sub(tReach),
		res: tRes.Sub(tReach), up: tUp.Sub(tReach), served: tServed.Sub(tReach)}
}

// benchProbeBanner connects to addr until the SSH banner arrives, and returns
// when it did (zero if ctx ended first). A listening but booting stand-in
// accepts and answers when it boots; a refusing one is retried every 2 ms.
func benchProbeBanner(ctx context.Context, addr string) time.Time {
	buf := make([]byte, 64)
	for ctx.Err() == nil {
		c, err := net.DialTimeout("tcp", addr, time.Second)
		if err != nil {
			time.Sleep(2 * time.Millisecond)
			continue
		}
		dl, _ := ctx.Deadline()
		_ = c.SetReadDeadline(dl)
		n, err := benchReadLine(c, buf)
		at := time.Now()
		c.Close()
		if err == nil && strings.HasPrefix(string(buf[:n]), "SSH-2.0-") {
			return at
		}
		time.Sleep(2 * time.Millisecond)
	}
	return time.Time{}
}

// dialFrontend connects through HAProxy and returns when the banner came.
func (s *benchStack) dialFrontend(ctx context.Context) time.Time {
	c, err := net.DialTimeout("tcp", s.frontend, 5*time.Second)
	if err != nil {
		return time.Time{}
	}
	defer c.Close()
	dl, _ := ctx.Deadline()
	_ = c.SetReadDeadline(dl)
	buf := make([]byte, 64)
	n, err := benchReadLine(c, buf)
	if err != nil || !strings.HasPrefix(string(buf[:n]), "SSH-2.0-") {
		return time.Time{}
	}
	return time.Now()
}

// reset releases reservation id, drains slot1, waits until it is empty and
// in maintenance, and with fresh restarts HAProxy (forgetting check
// results).
func (s *benchStack) reset(b *testing.B, id string, fresh bool) {
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	if _, err := s.h.Client.Release(ctx, id); err != nil {
		b.Fatal(err)
	}
	if _, err := s.h.Client.Drain(ctx, "x86", "slot1"); err != nil {
		b.Fatal(err)
	}
	for {
		sl, err := s.h.Daemon.Store().Slot(ctx, scaler.SlotKey{Pool: "x86", Slot: "slot1"})
		if err != nil {
			b.Fatal(err)
		}
		if sl.State == scaler.Empty {
			break
		}
		if ctx.Err() != nil {
			b.Fatalf("slot1 still %s a minute after draining", sl.State)
		}
		time.Sleep(10 * time.Millisecond)
	}
	// HAProxy must have taken the server out (the agent says maint for an
	// empty slot) before the next launch, so that nothing seen then is left
	// over from this builder.
	for !strings.HasPrefix(s.serverStat("slot1")["status"], "MAINT") {
		if ctx.Err() != nil {
			b.Fatalf("x86/slot1 not in maintenance a minute after its slot became empty")
		}
		time.Sleep(10 * time.Millisecond)
	}
	if fresh {
		s.hp.Restart()
		// The daemon's SPOE agent must be back in HAProxy's view before the
		// next connection needs it.
		for {
			if strings.HasPrefix(s.proxyStat(haproxy.SPOABackend, "spoa1")["status"], "UP") {
				break
			}
			if ctx.Err() != nil {
				b.Fatalf("the SPOE agent's server not UP a minute after HAProxy restarted")
			}
			time.Sleep(10 * time.Millisecond)
		}
	}
}

// benchKillPIDFiles kills the processes whose pids are in dir/*.pid.
func benchKillPIDFiles(dir string) {
	files, _ := filepath.Glob(filepath.Join(dir, "*.pid"))
	for _, f := range files {
		b, err := os.ReadFile(f)
		if err != nil {
			continue
		}
		if pid, err := strconv.Atoi(strings.TrimSpace(string(b))); err == nil && pid > 0 {
			_ = syscall.Kill(pid, syscall.SIGKILL)
		}
	}
}
