package main

import (
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/spf13/pflag"

	"guardianproject.dev/ops/nix-builder-autoscaler/internal/config"
	"guardianproject.dev/ops/nix-builder-autoscaler/internal/daemon"
	"guardianproject.dev/ops/nix-builder-autoscaler/sim"
)

const simulateUsage = `usage: nix-builder-autoscaler simulate --config FILE --trace FILE [--seed N] [--json]
           [--sweep KEY=V1,V2,... [--svg OUT.svg]] [cloud flags]
       nix-builder-autoscaler simulate --generate [--days N] [--seed N] [--pushes-per-hour F]
           [--builds-per-push F] [--median-build D] [--system S] > trace.csv

Replays a trace of builds against the daemon's own scaling policy on a
simulated clock and cloud, and against baseline policies. KEY is one of
idle_timeout (a duration or auto), billing_minimum, warm_pool, min_builders,
max_builders, reservations_per_builder, reconcile_interval. See
docs/simulation.md.
`

// simulateOpts are simulate's flags.
type simulateOpts struct {
	cfgPath, tracePath, sweep, svg, market *string
	seed                                   *uint64
	asJSON, noBaselines, gen               *bool
	spot, od                               *float64
	env                                    sim.Env
	g                                      sim.GenOptions
}

func simulateCmd(args []string, stdout, stderr io.Writer) int {
	fs, o := simulateFlags(stderr)
	if code, ok := parseFlags(fs, args, stdout, stderr, "simulate --config FILE --trace FILE [--seed N] [--json] [--sweep KEY=V1,V2,... --svg OUT]"); !ok {
		return code
	}
	if *o.gen {
		o.g.Seed = *o.seed
		if err := sim.WriteTrace(stdout, sim.Generate(o.g)); err != nil {
			fmt.Fprintln(stderr, "simulate:", err)
			return 1
		}
		return 0
	}
	if *o.cfgPath == "" || *o.tracePath == "" || fs.NArg() != 0 {
		fs.Usage()
		return 2
	}
	cfg, trace, code := loadSimulation(o, stderr)
	if code != 0 {
		return code
	}
	base := simConfig(cfg, o.env, *o.seed)
	rep := sim.Report{Trace: filepath.Base(*o.tracePath), Seed: *o.seed, Env: o.env}
	runs, labels, code := sweepRuns(base, *o.sweep, stderr)
	if code != 0 {
		return code
	}
	if *o.sweep != "" {
		rep.Sweep = *o.sweep
	}
	for i, c := range runs {
		r, err := sim.Run(c, trace)
		if err != nil {
			fmt.Fprintln(stderr, "simulate:", err)
			return 1
		}
		r.Policy = labels[i]
		rep.Policy = append(rep.Policy, r)
	}
	if !*o.noBaselines {
		maxB := 1
		if len(base.Pools) > 0 {
			maxB = base.Pools[0].Policy.MaxBuilders
		}
		for _, bl := range sim.DefaultBaselines(maxB) {
			rep.Baselines = append(rep.Baselines, sim.RunBaseline(base, bl, trace))
		}
	}
	rep.LowerBound = sim.LowerBound(base, trace)
	return writeSimReport(&rep, o, stdout, stderr)
}

// simulateFlags defines simulate's flags on a new flag set.
func simulateFlags(stderr io.Writer) (*pflag.FlagSet, *simulateOpts) {
	fs := pflag.NewFlagSet("simulate", pflag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.Usage = func() { fmt.Fprint(stderr, simulateUsage); fs.PrintDefaults() }
	o := &simulateOpts{env: sim.DefaultEnv, g: sim.DefaultGen}
	o.cfgPath = fs.String("config", "", "the daemon's config file (its pools and timeouts are simulated)")
	o.tracePath = fs.String("trace", "", "trace CSV: "+sim.TraceHeader+" (or "+sim.TraceHeaderEval+")")
	o.seed = fs.Uint64("seed", 1, "random seed (same trace and seed: byte-identical output)")
	o.asJSON = fs.Bool("json", false, "print the report as JSON")
	o.sweep = fs.String("sweep", "", "KEY=V1,V2,... run the policy once per value")
	o.svg = fs.String("svg", "", "write a chart of cost against p95 wait to this SVG file")
	o.noBaselines = fs.Bool("no-baselines", false, "skip the baseline policies")
	env := &o.env
	o.market = fs.String("market", "", "spot or on-demand (default: the first pool's ec2.market, else spot)")
	o.spot = fs.Float64("price-spot", env.PricePerHour["spot"], "hourly price of a spot builder")
	o.od = fs.Float64("price-on-demand", env.PricePerHour["on-demand"], "hourly price of an on-demand builder")
	fs.Float64Var(&env.InterruptionsPerHour, "interruptions-per-hour", env.InterruptionsPerHour, "spot interruption rate per builder-hour")
	fs.DurationVar(&env.InterruptionWarning, "interruption-warning", env.InterruptionWarning, "how long before an interruption the daemon is warned (0: not at all, found after the fact)")
	fs.Float64Var(&env.CapacityErrorRate, "capacity-error-rate", env.CapacityErrorRate, "fraction of launches failing for capacity")
	fs.DurationVar(&env.LaunchToRunning.Min, "running-min", env.LaunchToRunning.Min, "launch to running: minimum")
	fs.DurationVar(&env.LaunchToRunning.Mean, "running-mean", env.LaunchToRunning.Mean, "launch to running: mean")
	fs.DurationVar(&env.RunningToReachable.Min, "ssh-min", env.RunningToReachable.Min, "running to sshd answering: minimum")
	fs.DurationVar(&env.RunningToReachable.Mean, "ssh-mean", env.RunningToReachable.Mean, "running to sshd answering: mean (NixOS AMIs: ~60s)")
	o.gen = fs.Bool("generate", false, "write a generated trace to stdout instead of simulating")
	g := &o.g
	fs.IntVar(&g.Days, "days", g.Days, "generate: days of trace (day 0 is a Monday)")
	fs.Float64Var(&g.PushesPerHour, "pushes-per-hour", g.PushesPerHour, "generate: pushes per working hour")
	fs.Float64Var(&g.BuildsPerPush, "builds-per-push", g.BuildsPerPush, "generate: mean builds per push")
	fs.DurationVar(&g.MedianBuild, "median-build", g.MedianBuild, "generate: median build duration")
	fs.DurationVar(&g.Spread, "spread", g.Spread, "generate: a push's builds are submitted within this time")
	fs.Float64Var(&g.NightFactor, "night-factor", g.NightFactor, "generate: night push rate, relative")
	fs.Float64Var(&g.WeekendFactor, "weekend-factor", g.WeekendFactor, "generate: weekend push rate, relative")
	fs.StringVar(&g.System, "system", g.System, "generate: system of every build")
	fs.DurationVar(&g.EvalMedian, "eval-median", g.EvalMedian, "generate: median evaluation before a push's builds (0: none; with it, forecasts are replayed)")
	fs.IntVar(&g.Projects, "projects", 3, "generate: with --eval-median, how many projects push")
	fs.Float64Var(&g.ProjectSpread, "project-spread", 0.3, "generate: with --eval-median, how much a project's build count varies between pushes (log-normal σ)")
	return fs, o
}

// loadSimulation reads the config and the trace and settles the market
// and prices in o.env; a non-zero code is the exit status of a failure,
// already reported on stderr.
func loadSimulation(o *simulateOpts, stderr io.Writer) (*config.Config, []sim.Build, int) {
	cfg, err := config.Load(*o.cfgPath)
	if err != nil {
		fmt.Fprintf(stderr, "simulate: %s: %v\n", *o.cfgPath, err)
		return nil, nil, 1
	}
	f, err := os.Open(*o.tracePath)
	if err != nil {
		fmt.Fprintln(stderr, "simulate:", err)
		return nil, nil, 1
	}
	trace, err := sim.ReadTrace(f)
	f.Close()
	if err != nil {
		fmt.Fprintf(stderr, "simulate: %s: %v\n", *o.tracePath, err)
		return nil, nil, 1
	}
	env := &o.env
	env.PricePerHour = map[string]float64{"spot": *o.spot, "on-demand": *o.od}
	env.Market = *o.market
	if env.Market == "" {
		env.Market = "spot"
		if len(cfg.Pools) > 0 && cfg.Pools[0].EC2.Market != "" {
			env.Market = cfg.Pools[0].EC2.Market
		}
	}
	if _, ok := env.PricePerHour[env.Market]; !ok {
		fmt.Fprintf(stderr, "simulate: --market must be spot or on-demand, not %q\n", env.Market)
		return nil, nil, 2
	}
	return cfg, trace, 0
}

// sweepRuns are the policy runs and their labels: base alone, or one per
// value of sweep (KEY=V1,V2,...); a non-zero code is the exit status of a
// bad sweep, already reported on stderr.
func sweepRuns(base sim.Config, sweep string, stderr io.Writer) ([]sim.Config, []string, int) {
	if sweep == "" {
		return []sim.Config{base}, []string{"policy (config)"}, 0
	}
	key, vals, ok := strings.Cut(sweep, "=")
	if !ok || vals == "" {
		fmt.Fprintln(stderr, "simulate: --sweep wants KEY=V1,V2,...")
		return nil, nil, 2
	}
	var runs []sim.Config
	var labels []string
	for _, v := range strings.Split(vals, ",") {
		c, err := applySweep(base, key, strings.TrimSpace(v))
		if err != nil {
			fmt.Fprintln(stderr, "simulate:", err)
			return nil, nil, 2
		}
		runs = append(runs, c)
		labels = append(labels, "policy "+key+"="+strings.TrimSpace(v))
	}
	return runs, labels, 0
}

// writeSimReport writes the SVG chart if asked for, and the report as text
// or JSON; it returns the exit status.
func writeSimReport(rep *sim.Report, o *simulateOpts, stdout, stderr io.Writer) int {
	if *o.svg != "" {
		var b strings.Builder
		err := rep.WriteSVG(&b)
		if err == nil {
			err = os.WriteFile(*o.svg, []byte(b.String()), 0o644)
		}
		if err != nil {
			fmt.Fprintln(stderr, "simulate:", err)
			return 1
		}
	}
	var err error
	if *o.asJSON {
		err = rep.WriteJSON(stdout)
	} else {
		err = rep.WriteText(stdout)
	}
	if err != nil {
		fmt.Fprintln(stderr, "simulate:", err)
		return 1
	}
	return 0
}

// simConfig is the daemon's policy as daemon.Policy builds it, with the
// pools' routing and the reconcile interval.
func simConfig(cfg *config.Config, env sim.Env, seed uint64) sim.Config {
	pol := daemon.Policy(cfg)
	c := sim.Config{Policy: pol, Interval: cfg.Daemon.ReconcileInterval.D(), Env: env, Seed: seed}
	for i, p := range cfg.Pools {
		c.Pools = append(c.Pools, sim.Pool{Policy: pol.Pools[i], Systems: p.Systems, Features: p.Features})
	}
	return c
}

// applySweep returns a copy of c with key set to v in every pool.
func applySweep(c sim.Config, key, v string) (sim.Config, error) {
	out := c
	out.Pools = append([]sim.Pool(nil), c.Pools...)
	dur := func() (time.Duration, error) {
		d, err := time.ParseDuration(v)
		if err != nil {
			return 0, fmt.Errorf("--sweep %s: %q is not a duration (e.g. 5m)", key, v)
		}
		return d, nil
	}
	num := func() (int, error) {
		n, err := strconv.Atoi(v)
		if err != nil || n < 0 {
			return 0, fmt.Errorf("--sweep %s: %q is not a non-negative integer", key, v)
		}
		return n, nil
	}
	if key == "reconcile_interval" {
		d, err := dur()
		out.Interval = d
		return out, err
	}
	for i := range out.Pools {
		pp := &out.Pools[i].Policy
		var err error
		switch key {
		case "idle_timeout":
			pp.IdleAuto = v == "auto"
			if !pp.IdleAuto {
				pp.IdleTimeout, err = dur()
			}
		case "billing_minimum":
			pp.BillingMinimum, err = dur()
		case "warm_pool":
			pp.WarmPool, err = num()
		case "min_builders":
			pp.MinBuilders, err = num()
		case "max_builders":
			pp.MaxBuilders, err = num()
		case "reservations_per_builder":
			pp.ReservationsPerBuilder, err = num()
			pp.ReservationsPerBuilder = max(pp.ReservationsPerBuilder, 1)
		case "forecast_max_builders":
			pp.ForecastMaxBuilders, err = num()
		default:
			return out, fmt.Errorf("--sweep: unknown key %q", key)
		}
		if err != nil {
			return out, err
		}
	}
	out.Policy.Pools = nil
	for _, p := range out.Pools {
		out.Policy.Pools = append(out.Policy.Pools, p.Policy)
	}
	return out, nil
}
