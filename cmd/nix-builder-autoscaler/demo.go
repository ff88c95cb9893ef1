package main

import (
	"bufio"
	"context"
	_ "embed"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/spf13/pflag"

	"guardianproject.dev/ops/nix-builder-autoscaler/haproxy"
	"guardianproject.dev/ops/nix-builder-autoscaler/internal/api"
	"guardianproject.dev/ops/nix-builder-autoscaler/internal/childproc"
	"guardianproject.dev/ops/nix-builder-autoscaler/internal/config"
	"guardianproject.dev/ops/nix-builder-autoscaler/internal/daemon"
)

// demoConfig is the embedded default the demo runs on. STATE is replaced by
// a fresh temporary directory and the PORT_* words by free loopback ports.
//
//go:embed demo.toml
var demoConfig string

type demoFlags struct {
	once, verbose bool
	dir           string
}

func demo(args []string, stdout, stderr io.Writer) int {
	fs := pflag.NewFlagSet("demo", pflag.ContinueOnError)
	fs.SetOutput(stderr)
	var f demoFlags
	fs.BoolVar(&f.once, "once", false, "exit after the walk-through instead of serving until Ctrl-C")
	fs.StringVar(&f.dir, "state-dir", "", "state directory (default: a new temporary directory)")
	fs.BoolVarP(&f.verbose, "verbose", "v", false, "show the daemon's log")
	if code, ok := parseFlags(fs, args, stdout, stderr, "demo [--once] [--state-dir DIR] [--verbose]"); !ok {
		return code
	}
	ctx, stop := signalContext()
	defer stop()
	err := runDemo(ctx, f, stdout, stderr)
	if ctx.Err() != nil {
		// Ctrl-C or SIGTERM is how the demo is meant to end; whatever it
		// was doing then stopped with the context, which is no failure.
		// runDemo has stopped HAProxy and the builders by now.
		fmt.Fprintln(stdout, "demo: stopped; HAProxy and the builders it started are gone")
		return 0
	}
	if err != nil {
		fmt.Fprintf(stderr, "demo: %v\n", err)
		return 1
	}
	return 0
}

func runDemo(ctx context.Context, f demoFlags, stdout, stderr io.Writer) error {
	say := func(format string, a ...any) { fmt.Fprintf(stdout, format+"\n", a...) }
	haproxyBin, err := findHAProxy(say)
	if err != nil {
		return err
	}
	if f.dir == "" {
		d, err := os.MkdirTemp("", "nba-demo-")
		if err != nil {
			return err
		}
		f.dir = d
		if f.once {
			defer os.RemoveAll(d)
		}
	}
	text := strings.ReplaceAll(demoConfig, "STATE", f.dir)
	for _, w := range []string{"PORT_FRONTEND", "PORT_AGENT", "PORT_SPOA", "PORT_STATS"} {
		p, err := freePort()
		if err != nil {
			return err
		}
		text = strings.ReplaceAll(text, w, fmt.Sprint(p))
	}
	cfg, err := config.Parse([]byte(text))
	if err != nil {
		return fmt.Errorf("embedded config: %w", err)
	}
	// Events from before this run (a --state-dir used before) are not
	// this run's story; the walk shows only those from now on.
	start := time.Now()

	// HAProxy first, on the configuration generated from the same file.
	hp, err := startDemoHAProxy(haproxyBin, cfg, f.dir)
	if err != nil {
		return err
	}
	defer hp.stop()

	logw := io.Discard
	if f.verbose {
		logw = stderr
	}
	// Stand-ins die with the demo, even when it is killed (childproc).
	d, err := daemon.New(ctx, cfg, daemon.Options{Logger: newLogger(cfg.Daemon, logw), StartStandin: childproc.Start})
	if err != nil {
		return err
	}
	runCtx, cancel := context.WithCancel(ctx)
	done := make(chan error, 1)
	go func() { done <- d.Run(runCtx) }()
	defer func() {
		cancel()
		<-done
		// The demo owns its builders: stop them so nothing outlives it.
		tctx, tcancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer tcancel()
		if err := d.TerminateAll(tctx); err != nil {
			fmt.Fprintf(stderr, "demo: stopping builders: %v\n", err)
		}
	}()
	select {
	case <-d.Ready():
	case err := <-done:
		return err
	}
	pool := cfg.Pools[0]
	say("nix-builder-autoscaler demo (state in %s)", f.dir)
	say("  HAProxy frontend (Nix connects here): %s", pool.Frontend)
	say("  HAProxy stats page:                   http://%s/", cfg.HAProxy.StatsListen)
	say("  HAProxy log:                          %s", hp.logPath)
	say("  autoscalerctl:                        go run ./cmd/autoscalerctl --socket %s status", cfg.Daemon.Socket)
	w := &walk{ctx: ctx, c: api.NewUnixClient(cfg.Daemon.Socket), hc: haproxy.NewClient(cfg.HAProxy.RuntimeSocket, 5*time.Second),
		cfg: cfg, say: say, start: start}
	if err := w.run(); err != nil {
		return err
	}
	if f.once {
		return nil
	}
	say("")
	say("The daemon and HAProxy keep running. Try:")
	say("  ssh -p %s -o StrictHostKeyChecking=no 127.0.0.1   (a connection scales a builder up from zero)", portOf(pool.Frontend))
	say("  go run ./cmd/autoscalerctl --socket %s reserve --system x86_64-linux --wait", cfg.Daemon.Socket)
	say("Ctrl-C stops everything the demo started.")
	<-ctx.Done()
	return nil
}

// findHAProxy returns the haproxy binary; as root on Debian it installs the
// package when it is missing, otherwise it says how.
func findHAProxy(say func(string, ...any)) (string, error) {
	if p, err := exec.LookPath("haproxy"); err == nil {
		return p, nil
	}
	_, debian := os.Stat("/etc/debian_version")
	if os.Geteuid() != 0 || debian != nil {
		return "", errors.New("haproxy is not installed; install it (Debian/Ubuntu: sudo apt-get install haproxy) and run the demo again")
	}
	say("haproxy is not installed; installing Debian's package (apt-get install haproxy) ...")
	for _, args := range [][]string{{"update", "-qq"}, {"install", "-y", "-qq", "haproxy"}} {
		cmd := exec.Command("apt-get", args...)
		cmd.Env = append(os.Environ(), "DEBIAN_FRONTEND=noninteractive")
		if out, err := cmd.CombinedOutput(); err != nil {
			return "", fmt.Errorf("apt-get %s: %v\n%s", strings.Join(args, " "), err, out)
		}
	}
	return exec.LookPath("haproxy")
}

func freePort() (int, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, err
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port, nil
}

func portOf(hostport string) string {
	_, p, _ := net.SplitHostPort(hostport)
	return p
}

type demoHAProxy struct {
	cmd     *exec.Cmd
	done    chan struct{}
	logPath string
}

// startDemoHAProxy writes the generated config into dir and runs HAProxy
// in the foreground, logging to dir/haproxy.log.
func startDemoHAProxy(bin string, cfg *config.Config, dir string) (*demoHAProxy, error) {
	spoePath := filepath.Join(dir, "nba-spoe.conf")
	files, err := haproxy.Generate(cfg.HAProxySpec(), haproxy.Options{SPOEPath: spoePath})
	if err != nil {
		return nil, err
	}
	cfgPath := filepath.Join(dir, "haproxy.cfg")
	if err := os.WriteFile(spoePath, files.SPOEConf, 0o600); err != nil {
		return nil, err
	}
	if err := os.WriteFile(cfgPath, files.HAProxyCfg, 0o600); err != nil {
		return nil, err
	}
	// An empty state file keeps HAProxy from warning that it is missing.
	if err := os.WriteFile(cfg.HAProxy.StateFile, []byte("1\n"), 0o600); err != nil {
		return nil, err
	}
	logPath := filepath.Join(dir, "haproxy.log")
	logf, err := os.Create(logPath)
	if err != nil {
		return nil, err
	}
	defer logf.Close()
	cmd := exec.Command(bin, "-db", "-f", cfgPath)
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	// Its own process group keeps a terminal's ^C for the demo, which
	// stops HAProxy in order; childproc kills it should the demo die.
	if err := childproc.Start(cmd); err != nil {
		return nil, fmt.Errorf("start haproxy: %w", err)
	}
	h := &demoHAProxy{cmd: cmd, done: make(chan struct{}), logPath: logPath}
	go func() { _ = cmd.Wait(); close(h.done) }()
	// HAProxy starts in milliseconds; a machine busy with other work can
	// make that seconds. The bound only keeps a broken start from hanging.
	const startBound = time.Minute
	for deadline := time.Now().Add(startBound); time.Now().Before(deadline); {
		if c, err := net.Dial("unix", cfg.HAProxy.RuntimeSocket); err == nil {
			c.Close()
			return h, nil
		}
		select {
		case <-h.done:
			b, _ := os.ReadFile(logPath)
			return nil, fmt.Errorf("haproxy exited at start:\n%s", b)
		case <-time.After(10 * time.Millisecond):
		}
	}
	h.stop()
	return nil, fmt.Errorf("haproxy's runtime socket did not answer within %v", startBound)
}

func (h *demoHAProxy) stop() {
	_ = syscall.Kill(-h.cmd.Process.Pid, syscall.SIGTERM)
	select {
	case <-h.done:
	case <-time.After(5 * time.Second):
		_ = syscall.Kill(-h.cmd.Process.Pid, syscall.SIGKILL)
		<-h.done
	}
}

// walk is the demo's scripted workload.
type walk struct {
	ctx   context.Context
	c     *api.Client
	hc    *haproxy.Client
	cfg   *config.Config
	say   func(string, ...any)
	start time.Time
	seen  int
}

func (w *walk) at() string { return fmt.Sprintf("[%5.1fs]", time.Since(w.start).Seconds()) }

// events prints the event log entries not shown yet.
func (w *walk) events() error {
	evs, err := w.c.Events(w.ctx, api.EventQuery{Limit: 1000, Since: w.start})
	if err != nil {
		return err
	}
	for _, e := range evs.Events[min(w.seen, len(evs.Events)):] {
		what := strings.TrimSpace(strings.Join([]string{e.Pool + "/" + e.Slot, e.InstanceID, e.ReservationID, e.Reason}, " "))
		w.say("%s   event %-10s %s", w.at(), e.Kind, what)
	}
	w.seen = len(evs.Events)
	return nil
}

// servers prints HAProxy's view of the pool's servers, as on its stats page.
func (w *walk) servers() {
	stats, err := w.hc.ShowStat(w.ctx)
	if err != nil {
		w.say("%s   haproxy: %v", w.at(), err)
		return
	}
	for _, s := range stats {
		if !s.IsServer() || s.Proxy() != haproxy.Backend(w.cfg.Pools[0].Name) {
			continue
		}
		w.say("%s   haproxy %-6s %-14s weight %-3s sessions %-2s %-21s %s", w.at(), s.Server(), s.Status(),
			s.Str("weight"), s.Str("scur"), s.Addr(), s.Str("last_agt"))
	}
}

// poll shows events and HAProxy's servers every second until done says so.
func (w *walk) poll(limit time.Duration, done func() (bool, error)) error {
	deadline := time.Now().Add(limit)
	for time.Now().Before(deadline) {
		if err := w.events(); err != nil {
			return err
		}
		ok, err := done()
		if err != nil || ok {
			return err
		}
		select {
		case <-w.ctx.Done():
			return w.ctx.Err()
		case <-time.After(time.Second):
		}
	}
	return fmt.Errorf("gave up after %s", limit)
}

func (w *walk) run() error {
	pool := w.cfg.Pools[0]
	// 1. A connection with no builder anywhere: HAProxy holds it, the SPOE
	// agent asks for a builder, and the connection is served once one is up.
	w.say("%s 1. a connection arrives at the frontend with no builder running", w.at())
	type result struct {
		banner string
		err    error
	}
	first := make(chan result, 1)
	var conns []net.Conn
	var mu sync.Mutex
	defer func() {
		mu.Lock()
		defer mu.Unlock()
		for _, c := range conns {
			c.Close()
		}
	}()
	dial := func() (string, error) {
		c, err := net.DialTimeout("tcp", pool.Frontend, 5*time.Second)
		if err != nil {
			return "", err
		}
		mu.Lock()
		conns = append(conns, c)
		mu.Unlock()
		_ = c.SetReadDeadline(time.Now().Add(w.cfg.HAProxy.Hold.D() + 10*time.Second))
		line, err := bufio.NewReader(c).ReadString('\n')
		return strings.TrimSpace(line), err
	}
	go func() {
		b, err := dial()
		first <- result{b, err}
	}()
	var got result
	err := w.poll(2*time.Minute, func() (bool, error) {
		select {
		case got = <-first:
			return true, nil
		default:
			return false, nil
		}
	})
	if err != nil {
		return err
	}
	if got.err != nil {
		return fmt.Errorf("held connection: %w", got.err)
	}
	w.say("%s    HAProxy held it until a builder was up; it answered %q", w.at(), got.banner)
	w.servers()

	// 2. A Buildbot build reserves capacity before it builds.
	r, _, err := w.c.CreateReservation(w.ctx, api.CreateReservationRequest{System: "x86_64-linux", Owner: "demo build #1", Lease: "5m"})
	if err != nil {
		return err
	}
	w.say("%s 2. a build reserves capacity: reservation %s is %s", w.at(), r.ID, r.State)
	r, err = w.c.WaitReady(w.ctx, r.ID, 30*time.Second)
	if err != nil {
		return err
	}
	if r.State != "ready" {
		return fmt.Errorf("reservation ended %s: %s", r.State, r.Reason)
	}
	_ = w.events()
	w.say("%s    reservation ready on %s/%s (%s) after %.1fs", w.at(), r.Pool, r.Slot, r.Address, r.WaitSeconds)

	// 3. The build's connections go through HAProxy, steered to its slot.
	for i := 0; i < 3; i++ {
		if _, err := dial(); err != nil {
			return fmt.Errorf("connection through HAProxy: %w", err)
		}
	}
	w.say("%s 3. three more connections through the frontend, steered by the SPOE agent:", w.at())
	w.servers()

	// 4. The build ends: connections close, the reservation is released,
	// and after idle_timeout the builder drains and is terminated.
	mu.Lock()
	for _, c := range conns {
		c.Close()
	}
	conns = nil
	mu.Unlock()
	if _, err := w.c.Release(w.ctx, r.ID); err != nil {
		return err
	}
	w.say("%s 4. the build is done: connections closed, reservation released; idle_timeout is %s", w.at(), pool.IdleTimeout)
	err = w.poll(pool.IdleTimeout.D()+time.Minute, func() (bool, error) {
		slots, err := w.c.Slots(w.ctx)
		if err != nil {
			return false, err
		}
		for _, s := range slots.Slots {
			if s.State != "empty" {
				return false, nil
			}
		}
		return true, nil
	})
	if err != nil {
		return err
	}
	w.servers()
	w.say("%s every slot is empty again: no builder, no cost", w.at())
	return nil
}
