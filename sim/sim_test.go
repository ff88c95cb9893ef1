package sim

import (
	"bytes"
	"os"
	"strings"
	"testing"
	"time"

	"guardianproject.dev/ops/nix-builder-autoscaler/scaler"
)

func testConfig() Config {
	return Config{
		Policy: scaler.Policy{PendingTimeout: time.Hour, OrphanGrace: 2 * time.Minute},
		Pools: []Pool{{Systems: []string{"x86_64-linux"}, Policy: scaler.PoolPolicy{Name: "x86", MaxBuilders: 8,
			ReservationsPerBuilder: 2, IdleTimeout: 5 * time.Minute, DrainTimeout: 2 * time.Hour,
			LaunchTimeout: 5 * time.Minute, BootTimeout: 10 * time.Minute, BindTimeout: 5 * time.Minute}}},
		Interval: 10 * time.Second,
		Env:      DefaultEnv,
		Seed:     1,
	}
}

// smallTrace is two bursty working hours, generated.
func smallTrace() []Build {
	g := DefaultGen
	g.Seed = 7
	g.PushesPerHour = 6
	all := Generate(g)
	var out []Build
	for _, b := range all {
		if b.Submit >= 9*time.Hour && b.Submit < 11*time.Hour {
			b.Submit -= 9 * time.Hour
			out = append(out, b)
		}
	}
	return out
}

func report(t *testing.T, cfg Config, trace []Build) []byte {
	t.Helper()
	r, err := Run(cfg, trace)
	if err != nil {
		t.Fatal(err)
	}
	rep := Report{Trace: "small", Seed: cfg.Seed, Env: cfg.Env, Policy: []Result{r}, LowerBound: LowerBound(cfg, trace)}
	for _, bl := range DefaultBaselines(8) {
		rep.Baselines = append(rep.Baselines, RunBaseline(cfg, bl, trace))
	}
	var b bytes.Buffer
	if err := rep.WriteJSON(&b); err != nil {
		t.Fatal(err)
	}
	if err := rep.WriteText(&b); err != nil {
		t.Fatal(err)
	}
	if err := rep.WriteSVG(&b); err != nil {
		t.Fatal(err)
	}
	return b.Bytes()
}

func TestDeterministic(t *testing.T) {
	trace := smallTrace()
	if len(trace) < 20 {
		t.Fatalf("trace too small: %d builds", len(trace))
	}
	cfg := testConfig()
	cfg.Env.InterruptionsPerHour = 0.5 // exercise interruptions and reruns
	cfg.Env.CapacityErrorRate = 0.1
	a, b := report(t, cfg, trace), report(t, cfg, trace)
	if !bytes.Equal(a, b) {
		t.Fatal("same trace and seed gave different output")
	}
	cfg.Seed = 2
	if c := report(t, cfg, trace); bytes.Equal(a, c) {
		t.Error("a different seed gave the same output")
	}
}

func TestAllBuildsServed(t *testing.T) {
	trace := smallTrace()
	r, err := Run(testConfig(), trace)
	if err != nil {
		t.Fatal(err)
	}
	if r.Builds != len(trace) || r.Completed != len(trace) || r.Failed != 0 {
		t.Fatalf("builds %d completed %d failed %d, want all %d completed", r.Builds, r.Completed, r.Failed, len(trace))
	}
	if r.Launches == 0 || r.BilledSeconds <= 0 || r.Rounds == 0 {
		t.Fatalf("no launches, billing or rounds: %+v", r)
	}
	lb := LowerBound(testConfig(), trace)
	if r.BilledSeconds < lb.BilledSeconds {
		t.Fatalf("billed %.0fs below the lower bound %.0fs", r.BilledSeconds, lb.BilledSeconds)
	}
	if r.Utilisation <= 0 || r.Utilisation > 1 {
		t.Fatalf("utilisation %v", r.Utilisation)
	}
	// Waits split exactly into boot and queueing.
	if r.BootWait.Max > r.Wait.Max || r.QueueWait.Max > r.Wait.Max {
		t.Fatalf("boot/queue waits exceed the wait: %+v", r)
	}
}

// TestRunsDaemonPolicy shows that the simulation is driven by scaler.Plan
// through scaler.Reconciler: changing the policy's settings changes the
// outcome the way Plan's rules say it must.
func TestRunsDaemonPolicy(t *testing.T) {
	trace := smallTrace()
	run := func(mod func(*scaler.PoolPolicy)) Result {
		cfg := testConfig()
		mod(&cfg.Pools[0].Policy)
		r, err := Run(cfg, trace)
		if err != nil {
			t.Fatal(err)
		}
		return r
	}
	short := run(func(p *scaler.PoolPolicy) { p.IdleTimeout = 30 * time.Second })
	long := run(func(p *scaler.PoolPolicy) { p.IdleTimeout = 30 * time.Minute })
	if !(short.BilledSeconds < long.BilledSeconds && short.Launches > long.Launches) {
		t.Errorf("idle_timeout 30s: billed %.0fs, %d launches; 30m: %.0fs, %d launches; want fewer billed and more launches with the shorter",
			short.BilledSeconds, short.Launches, long.BilledSeconds, long.Launches)
	}
	// A builder is kept idle until its billing minimum.
	paid := run(func(p *scaler.PoolPolicy) { p.IdleTimeout, p.BillingMinimum = 10*time.Second, 10*time.Minute })
	unpaid := run(func(p *scaler.PoolPolicy) { p.IdleTimeout = 10 * time.Second })
	if !(paid.BilledSeconds > unpaid.BilledSeconds && paid.Launches < unpaid.Launches) {
		t.Errorf("billing_minimum 10m: billed %.0fs, %d launches; 0: %.0fs, %d launches; want more billed and fewer launches with it",
			paid.BilledSeconds, paid.Launches, unpaid.BilledSeconds, unpaid.Launches)
	}
	// Plan keeps min_builders up for the whole run.
	minB := run(func(p *scaler.PoolPolicy) { p.MinBuilders = 2 })
	if minB.BilledSeconds < 2*Horizon(trace).Seconds() {
		t.Errorf("min_builders 2 billed %.0fs, want at least 2 × %.0fs", minB.BilledSeconds, Horizon(trace).Seconds())
	}
	// Plan never launches beyond max_builders: one builder, one build at
	// a time, so the builds queue.
	one := run(func(p *scaler.PoolPolicy) { p.MaxBuilders, p.ReservationsPerBuilder = 1, 1 })
	if one.QueueWait.Max <= long.QueueWait.Max {
		t.Errorf("max_builders 1: max queue wait %.0fs, want more than %.0fs", one.QueueWait.Max, long.QueueWait.Max)
	}
	// Plan fails reservations after pending_timeout when no builder may start.
	none := run(func(p *scaler.PoolPolicy) { p.MaxBuilders = 0 })
	if none.Failed != len(trace) || none.Launches != 0 {
		t.Errorf("max_builders 0: %d failed, %d launches; want all %d failed by pending_timeout, none launched", none.Failed, none.Launches, len(trace))
	}
	// A warm pool trades money for boot wait.
	warm := run(func(p *scaler.PoolPolicy) { p.WarmPool = 2 })
	base := run(func(*scaler.PoolPolicy) {})
	if !(warm.BootWait.Mean < base.BootWait.Mean && warm.Cost > base.Cost) {
		t.Errorf("warm_pool 2: boot wait %.1fs cost %.4f; 0: %.1fs %.4f", warm.BootWait.Mean, warm.Cost, base.BootWait.Mean, base.Cost)
	}
}

func TestTraceRoundTrip(t *testing.T) {
	trace := smallTrace()
	trace[0].Features = []string{"kvm", "big-parallel"}
	var b bytes.Buffer
	if err := WriteTrace(&b, trace); err != nil {
		t.Fatal(err)
	}
	got, err := ReadTrace(&b)
	if err != nil {
		t.Fatal(err)
	}
	if len(got) != len(trace) || got[0].System != trace[0].System || strings.Join(got[0].Features, ",") != "kvm,big-parallel" ||
		got[5].Submit != trace[5].Submit || got[5].Duration != trace[5].Duration {
		t.Fatalf("round trip changed the trace: %+v vs %+v", got[:1], trace[:1])
	}
	for _, bad := range []string{"", "a,b\n", TraceHeader + "\n1,x,x86_64-linux,\n", TraceHeader + "\n-1,2,x86_64-linux,\n", TraceHeader + "\n1,2,,\n"} {
		if _, err := ReadTrace(strings.NewReader(bad)); err == nil {
			t.Errorf("ReadTrace(%q): no error", bad)
		}
	}
}

func TestGenerateQuietNightsAndWeekends(t *testing.T) {
	g := DefaultGen
	g.Days = 7
	trace := Generate(g)
	var work, night, weekend int
	for _, b := range trace {
		day, hour := int(b.Submit/(24*time.Hour)), int(b.Submit%(24*time.Hour)/time.Hour)
		switch {
		case day >= 5:
			weekend++
		case hour < 8 || hour >= 19:
			night++
		default:
			work++
		}
	}
	if work < 5*night || work < 5*weekend || work == 0 {
		t.Fatalf("working hours %d, nights %d, weekend %d: want busy working hours", work, night, weekend)
	}
	if a, b := Generate(g), Generate(g); len(a) != len(b) || a[len(a)-1].Submit != b[len(b)-1].Submit || a[len(a)-1].Duration != b[len(b)-1].Duration {
		t.Fatal("generator not deterministic")
	}
}

func TestSampleTraces(t *testing.T) {
	for _, name := range []string{"testdata/bursty-day.csv", "testdata/steady-day.csv"} {
		f, err := os.Open(name)
		if err != nil {
			t.Fatal(err)
		}
		trace, err := ReadTrace(f)
		f.Close()
		if err != nil || len(trace) < 100 {
			t.Fatalf("%s: %d builds, %v", name, len(trace), err)
		}
	}
}

// TestAutoIdleFromMeasuredBoots: with idle_timeout auto the reconciler
// measures the simulated boots, and the result says what idle timeout that
// gave: the boots' cost (about 30 s to SSH, 20 s of it billed, by
// DefaultEnv) raised to the 60 s billing minimum.
func TestAutoIdleFromMeasuredBoots(t *testing.T) {
	cfg := testConfig()
	cfg.Pools[0].Policy.IdleAuto, cfg.Pools[0].Policy.BillingMinimum = true, time.Minute
	r, err := Run(cfg, smallTrace())
	if err != nil {
		t.Fatal(err)
	}
	want := "x86: idle_timeout auto = 1m from measured boot "
	if len(r.IdlePolicy) != 1 || !strings.HasPrefix(r.IdlePolicy[0], want) ||
		!strings.Contains(r.IdlePolicy[0], "raised to the billing minimum 1m (1m to 2m during the run); billing minimum 1m") {
		t.Errorf("IdlePolicy = %q; want %q..., raised to the billing minimum, 2m before the first boot", r.IdlePolicy, want)
	}
	cfg.Pools[0].Policy.IdleAuto = false
	if r, _ = Run(cfg, smallTrace()); len(r.IdlePolicy) != 1 || r.IdlePolicy[0] != "x86: idle_timeout 5m; billing minimum 1m" {
		t.Errorf("IdlePolicy with idle_timeout 5m = %q", r.IdlePolicy)
	}
}

// TestInterruptionWarningSavesReruns: with EC2's two-minute warning the
// daemon drains the warned builder and moves its reservations to a
// replacement, so fewer builds are lost with their builder than when the
// interruption is found after the fact.
func TestInterruptionWarningSavesReruns(t *testing.T) {
	trace := smallTrace()
	cfg := testConfig()
	cfg.Env.InterruptionsPerHour = 2 // many interruptions on a small trace
	cfg.Env.InterruptionWarning = 0
	before, err := Run(cfg, trace)
	if err != nil {
		t.Fatal(err)
	}
	cfg.Env.InterruptionWarning = 2 * time.Minute
	after, err := Run(cfg, trace)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("without warning: %d interruptions, %d reruns, p95 wait %.0fs; with: %d, %d, %.0fs",
		before.Interruptions, before.Reruns, before.Wait.P95, after.Interruptions, after.Reruns, after.Wait.P95)
	if before.Reruns == 0 || after.Reruns >= before.Reruns {
		t.Errorf("reruns with a warning = %d, without = %d; want fewer with it", after.Reruns, before.Reruns)
	}
	if after.Completed != after.Builds {
		t.Errorf("with a warning: %d of %d builds completed", after.Completed, after.Builds)
	}
}
