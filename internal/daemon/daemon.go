// Package daemon wires the autoscaler together: store, providers,
// readiness, reconciler, API and metrics listeners. Tests start it in-process.
package daemon

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/exec"
	"strings"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"guardianproject.dev/ops/nix-builder-autoscaler/agentcheck"
	"guardianproject.dev/ops/nix-builder-autoscaler/clock"
	"guardianproject.dev/ops/nix-builder-autoscaler/haproxy"
	"guardianproject.dev/ops/nix-builder-autoscaler/internal/api"
	"guardianproject.dev/ops/nix-builder-autoscaler/internal/apiserver"
	"guardianproject.dev/ops/nix-builder-autoscaler/internal/config"
	"guardianproject.dev/ops/nix-builder-autoscaler/internal/connlimit"
	"guardianproject.dev/ops/nix-builder-autoscaler/internal/metrics"
	"guardianproject.dev/ops/nix-builder-autoscaler/internal/store"
	"guardianproject.dev/ops/nix-builder-autoscaler/scaler"
	ec2prov "guardianproject.dev/ops/nix-builder-autoscaler/scaler/ec2"
	"guardianproject.dev/ops/nix-builder-autoscaler/scaler/local"
	"guardianproject.dev/ops/nix-builder-autoscaler/spoa"
)

// OrphanGrace is how long an untracked instance of this cluster lives before
// it is terminated: longer than any launch call takes to be recorded.
const OrphanGrace = 2 * time.Minute

// Options holds what tests (or main) inject; zero values pick the defaults.
type Options struct {
	Clock    clock.Clock
	Logger   *slog.Logger
	Registry *prometheus.Registry
	// Providers overrides the configured provider per pool.
	Providers map[string]scaler.Provider
	// Readiness overrides the readiness implementation.
	Readiness scaler.Readiness
	// BuilderCommand runs a local stand-in builder; default: this executable
	// with the "local-builder" subcommand.
	BuilderCommand []string
	BuilderEnv     []string
	// StartStandin starts a local stand-in builder's process (nil:
	// exec.Cmd.Start); see local.Options.StartStandin.
	StartStandin func(*exec.Cmd) error
	// EC2 builds the EC2 provider of a region instead of the AWS SDK (tests
	// pass one over a fake).
	EC2 func(region, endpoint string, pools map[string]ec2prov.PoolOptions) scaler.Provider
	// KickBatch is the reconciler's batch window for events (0:
	// scaler.KickBatch; negative: none, for a manual clock).
	KickBatch time.Duration
}

// Daemon is a running (or ready to run) autoscaler.
type Daemon struct {
	cfg   *config.Config
	o     Options
	log   *slog.Logger
	db    *store.DB
	rec   *scaler.Reconciler
	api   *apiserver.Server
	reg   *prometheus.Registry
	ready chan struct{}
	token string
	provs map[string]scaler.Provider
	// queues are the interruption queues Run reads, one per region that has one.
	queues []*ec2prov.Queue

	// With HAProxy: its runtime-API readiness, the SPOE agent and the
	// agent-check responder (nil without).
	hap       *haproxy.Readiness
	spoa      *spoa.Agent
	agent     *agentcheck.Server
	stopSPOA  context.CancelFunc
	spoaMu    sync.Mutex
	spoaAddr  net.Addr
	agentAddr net.Addr
}

// New opens the state and builds every part; nothing listens until Run.
func New(ctx context.Context, cfg *config.Config, o Options) (*Daemon, error) {
	if o.Clock == nil {
		o.Clock = clock.Real{}
	}
	if o.Logger == nil {
		o.Logger = slog.Default()
	}
	if o.Registry == nil {
		o.Registry = prometheus.NewRegistry()
		o.Registry.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	}
	d := &Daemon{cfg: cfg, o: o, log: o.Logger, reg: o.Registry, ready: make(chan struct{})}
	if cfg.Daemon.Listen != "" {
		b, err := config.ReadSecretFile(cfg.Daemon.TokenFile, "token_file")
		if err != nil {
			return nil, fmt.Errorf("read token_file: %w", err)
		}
		d.token = strings.TrimSpace(string(b))
		if d.token == "" {
			return nil, fmt.Errorf("token_file %s is empty; put a long random token in it", cfg.Daemon.TokenFile)
		}
	}
	if err := os.MkdirAll(cfg.Daemon.StateDir, 0o750); err != nil {
		return nil, fmt.Errorf("create state_dir: %w", err)
	}
	db, err := store.Open(ctx, cfg.Daemon.DatabasePath(), store.WithClock(o.Clock))
	if err != nil {
		return nil, err
	}
	d.db = db
	sizes := map[string]int{}
	for _, p := range cfg.Pools {
		sizes[p.Name] = p.MaxBuilders
	}
	if err := db.EnsureSlots(ctx, sizes, o.Clock.Now()); err != nil {
		db.Close()
		return nil, err
	}
	providers, err := d.providers()
	if err != nil {
		db.Close()
		return nil, err
	}
	d.provs = providers
	readiness := o.Readiness
	sopts := scaler.Options{
		Store: db, Providers: providers, Policy: Policy(cfg), Clock: o.Clock,
		Interval: cfg.Daemon.ReconcileInterval.D(), Logger: o.Logger, Recorder: metrics.NewReconciler(o.Registry),
		KickBatch: o.KickBatch, Views: &scaler.Views{},
	}
	aopts := apiserver.Options{Store: db, Pools: cfg.Pools, Reservations: cfg.Reservations, Clock: o.Clock, Logger: o.Logger}
	if cfg.HAProxy.Enabled() {
		var names []string
		maxJobs := map[string]int{}
		for _, p := range cfg.Pools {
			names = append(names, p.Name)
			maxJobs[p.Name] = p.MaxJobs
		}
		d.hap = haproxy.NewReadiness(haproxy.NewClient(cfg.HAProxy.RuntimeSocket, cfg.HAProxy.Timeout.D()), names, cfg.HAProxy.Placeholder, cfg.HAProxy.CheckInterval.D(), o.Clock, o.Registry)
		if readiness == nil {
			readiness = d.hap
		}
		d.spoa = spoa.New(spoa.Options{MaxJobs: maxJobs, Hold: cfg.HAProxy.Hold.D(), Kick: func() { d.rec.Kick() }, Clock: o.Clock,
			Logger: o.Logger, Registerer: o.Registry})
		d.agent = agentcheck.New(sopts.Views, maxJobs, o.Logger, o.Registry, o.Clock)
		sopts.OnPublish, sopts.Held = d.spoa.Update, d.spoa.Held
		// Poll HAProxy as often as it checks builders while they settle.
		sopts.FastInterval = min(cfg.HAProxy.CheckInterval.D(), scaler.DefaultFastInterval)
		aopts.Held, aopts.Queued = d.spoa.Held, d.hap.Queued
		aopts.HAProxy = d.haproxyStatus
	}
	if readiness == nil {
		readiness = local.NewProber(2 * time.Second)
	}
	sopts.Readiness = readiness
	d.rec = scaler.New(sopts)
	aopts.Scaler, aopts.Views = d.rec, sopts.Views
	d.api = apiserver.New(aopts)
	return d, nil
}

func (d *Daemon) haproxyStatus() api.HAProxyStatus {
	st := api.HAProxyStatus{Enabled: true}
	st.Up, st.Error = d.hap.Up()
	if up, known := d.hap.SPOAUp(); known {
		st.SPOAUp = &up
	}
	return st
}

// TerminateAll terminates every instance the providers list. Only for
// owners of throwaway fleets (the demo, tests): a daemon stop never calls it.
func (d *Daemon) TerminateAll(ctx context.Context) error {
	var errs []error
	seen := map[scaler.Provider]bool{}
	for _, p := range d.provs {
		if seen[p] {
			continue
		}
		seen[p] = true
		ins, err := p.List(ctx)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		for _, in := range ins {
			if !in.State.Gone() {
				errs = append(errs, p.Terminate(ctx, in.ID))
			}
		}
	}
	return errors.Join(errs...)
}

// Ready is closed once every listener accepts connections.
func (d *Daemon) Ready() <-chan struct{} { return d.ready }

// Store is the daemon's state (tests inspect it).
func (d *Daemon) Store() *store.DB { return d.db }

// Provider is the provider of pool (tests inspect it); nil for an unknown pool.
func (d *Daemon) Provider(pool string) scaler.Provider { return d.provs[pool] }

// Reconciler is the daemon's reconciler.
func (d *Daemon) Reconciler() *scaler.Reconciler { return d.rec }

// Handler is the unauthenticated API handler (what the unix socket serves).
func (d *Daemon) Handler() http.Handler { return d.api.Handler() }

// Run serves until ctx ends, then stops cleanly. Stopping never terminates a
// builder: they keep serving and the next start takes them over.
func (d *Daemon) Run(ctx context.Context) error {
	defer d.db.Close()
	var servers []*http.Server
	var lns []net.Listener
	closeAll := func() {
		for _, l := range lns {
			l.Close()
		}
	}
	ls := newListeners(d.o.Clock)
	defer ls.stop()
	ul, err := ListenUnix(d.cfg.Daemon.Socket, d.cfg.Daemon.SocketGroup)
	if err != nil {
		return err
	}
	lns = append(lns, ls.limit("api_socket", ul, maxSocketConns))
	servers = append(servers, limitedHTTP(d.api.Handler()))
	if d.cfg.Daemon.Listen != "" {
		tl, err := net.Listen("tcp", d.cfg.Daemon.Listen)
		if err != nil {
			closeAll()
			return fmt.Errorf("listen on daemon.listen %s: %w", d.cfg.Daemon.Listen, err)
		}
		lns = append(lns, ls.limit("api", tl, maxAPIConns))
		// Marked busy only once authenticated: a connection that has not
		// shown the token stays the first to go when the listener is full.
		srv := newHTTPServer(apiserver.RequireToken(d.token, connlimit.Mark(d.api.Handler())))
		connlimit.Serve(srv)
		servers = append(servers, srv)
	}
	if d.cfg.Daemon.MetricsListen != "" {
		ml, err := net.Listen("tcp", d.cfg.Daemon.MetricsListen)
		if err != nil {
			closeAll()
			return fmt.Errorf("listen on daemon.metrics_listen %s: %w", d.cfg.Daemon.MetricsListen, err)
		}
		lns = append(lns, ls.limit("metrics", ml, maxMetricsConns))
		mux := http.NewServeMux()
		mux.Handle("GET /metrics", promhttp.HandlerFor(d.reg, promhttp.HandlerOpts{Registry: d.reg}))
		msrv := limitedHTTP(mux)
		// A scrape is one bounded answer: a client that stops reading it
		// must not keep its connection busy (never evicted) for ever.
		msrv.WriteTimeout = metricsWriteTimeout
		servers = append(servers, msrv)
	}
	runCtx, cancel := context.WithCancel(ctx)
	defer cancel()
	var wg sync.WaitGroup
	if d.agent != nil {
		al, err := listenLoopback("haproxy.agent_listen", d.cfg.HAProxy.AgentListen, d.log)
		if err != nil {
			closeAll()
			return err
		}
		sl, err := listenLoopback("haproxy.spoa_listen", d.cfg.HAProxy.SPOAListen, d.log)
		if err != nil {
			al.Close()
			closeAll()
			return err
		}
		d.agentAddr, d.spoaAddr = al.Addr(), sl.Addr()
		al, sl = ls.limit("agent_check", al, agentcheck.MaxConns), ls.limit("spoa", sl, maxSPOAConns)
		spoaCtx, stopSPOA := context.WithCancel(runCtx)
		d.spoaMu.Lock()
		d.stopSPOA = stopSPOA
		d.spoaMu.Unlock()
		wg.Add(2)
		go func() {
			defer wg.Done()
			if err := d.agent.Serve(runCtx, al); err != nil {
				d.log.Error("agent-check responder stopped", "err", err)
			}
		}()
		go func() {
			defer wg.Done()
			if err := d.spoa.Serve(spoaCtx, sl); err != nil {
				d.log.Error("SPOE agent stopped; HAProxy balances without it", "err", err)
			}
		}()
		addrs := []string{al.Addr().String(), sl.Addr().String()}
		d.log.Info("haproxy integration", "runtime_socket", d.cfg.HAProxy.RuntimeSocket, "agent_check", addrs[0], "spoa", addrs[1])
	}
	checkFDs(d.log, ls.sum)
	if d.reg != nil {
		metrics.RegisterShared(d.reg, ls.m)
	}
	errc := make(chan error, len(servers)+1)
	for i, srv := range servers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := srv.Serve(lns[i]); err != nil && !errors.Is(err, http.ErrServerClosed) {
				errc <- fmt.Errorf("serve %s: %w", lns[i].Addr(), err)
			}
		}()
	}
	for _, q := range d.queues {
		wg.Go(func() { _ = q.Run(runCtx) })
	}
	wg.Add(2)
	go func() {
		defer wg.Done()
		_ = d.rec.Run(runCtx)
	}()
	go func() {
		defer wg.Done()
		d.pruneEvents(runCtx)
	}()
	addrs := make([]string, len(lns))
	for i, l := range lns {
		addrs[i] = l.Addr().String()
	}
	d.log.Info("daemon started", "listen", strings.Join(addrs, " "), "database", d.cfg.Daemon.DatabasePath(), "pools", len(d.cfg.Pools))
	close(d.ready)
	var runErr error
	select {
	case <-ctx.Done():
	case runErr = <-errc:
	}
	d.log.Info("daemon stopping; builders keep running")
	shutCtx, shutCancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer shutCancel()
	for _, srv := range servers {
		_ = srv.Shutdown(shutCtx)
	}
	cancel()
	wg.Wait()
	_ = os.Remove(d.cfg.Daemon.Socket)
	return runErr
}

func newHTTPServer(h http.Handler) *http.Server {
	return &http.Server{Handler: h, ReadHeaderTimeout: 10 * time.Second, MaxHeaderBytes: 16 << 10, IdleTimeout: 2 * time.Minute}
}

func (d *Daemon) pruneEvents(ctx context.Context) {
	t := d.o.Clock.NewTicker(time.Hour)
	defer t.Stop()
	for {
		before := d.o.Clock.Now().Add(-d.cfg.Daemon.EventRetention.D())
		n, err := d.db.PruneEvents(ctx, before)
		if err != nil && ctx.Err() == nil {
			d.log.Error("prune event log", "err", err)
		} else if n > 0 {
			d.log.Info("pruned event log", "events", n)
		}
		// Ended reservations go with their events, so the database does not
		// grow with every build ever run.
		if n, err := d.db.PruneReservations(ctx, before); err != nil && ctx.Err() == nil {
			d.log.Error("prune ended reservations", "err", err)
		} else if n > 0 {
			d.log.Info("pruned ended reservations", "reservations", n)
		}
		// Forecasts too: an estimate reads only a source's last few.
		if n, err := d.db.PruneForecasts(ctx, before); err != nil && ctx.Err() == nil {
			d.log.Error("prune forecasts", "err", err)
		} else if n > 0 {
			d.log.Info("pruned forecasts", "forecasts", n)
		}
		select {
		case <-ctx.Done():
			return
		case <-t.C():
		}
	}
}

// StopSPOA stops the SPOE agent and closes HAProxy's connections to it, as
// if it had crashed; HAProxy goes on without it. For fault tests.
func (d *Daemon) StopSPOA() {
	d.spoaMu.Lock()
	defer d.spoaMu.Unlock()
	if d.stopSPOA != nil {
		d.stopSPOA()
	}
}

// AgentAddr and SPOAAddr are where the agent-check responder and the SPOE
// agent listen once Run started them (nil without HAProxy).
func (d *Daemon) AgentAddr() net.Addr { return d.agentAddr }
func (d *Daemon) SPOAAddr() net.Addr  { return d.spoaAddr }
