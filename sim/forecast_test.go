package sim

import (
	"bytes"
	"slices"
	"strings"
	"testing"
	"time"
)

// evalTrace is two evaluations of one project, an hour apart, each taking
// 2 minutes and then submitting 4 builds of 10 minutes.
func evalTrace() []Build {
	var out []Build
	for _, start := range []time.Duration{time.Hour, 2 * time.Hour} {
		for i := range 4 {
			out = append(out, Build{Submit: start + 2*time.Minute + time.Duration(i)*time.Second, Duration: 10 * time.Minute,
				System: "x86_64-linux", EvalStart: start, Source: "github:o/r"})
		}
	}
	return out
}

// TestForecastsHideTheBoot: replayed as the Buildbot extension sends them,
// forecasts launch builders during the evaluation. The first evaluation of
// a project is estimated at one build; the second at what the first
// produced, so its builds wait for no boot. Without forecasts
// (forecast_max_builders = 0) every burst waits a boot.
func TestForecastsHideTheBoot(t *testing.T) {
	cfg := testConfig()
	cfg.Pools[0].Policy.ForecastMaxBuilders = cfg.Pools[0].Policy.MaxBuilders
	with, err := Run(cfg, evalTrace())
	if err != nil {
		t.Fatal(err)
	}
	cfg.Pools[0].Policy.ForecastMaxBuilders = 0
	without, err := Run(cfg, evalTrace())
	if err != nil {
		t.Fatal(err)
	}
	if without.Wait.P50 < 20 {
		t.Fatalf("without forecasts: wait p50 %.0f s; want about a boot (the test's premise)", without.Wait.P50)
	}
	// The first evaluation's builds beyond the first builder's two wait a
	// boot: 2 of 8.
	if with.Wait.P50 != 0 || with.Wait.Mean > without.Wait.Mean/2 {
		t.Errorf("with forecasts: wait p50 %.0f s, mean %.1f s; want 0, and at most half the %.1f s mean without", with.Wait.P50, with.Wait.Mean, without.Wait.Mean)
	}
}

func TestEvalTraceRoundTrip(t *testing.T) {
	trace := append(evalTrace(), Build{Submit: 3 * time.Hour, Duration: time.Minute, System: "x86_64-linux"})
	var b bytes.Buffer
	if err := WriteTrace(&b, trace); err != nil {
		t.Fatal(err)
	}
	if !strings.HasPrefix(b.String(), TraceHeaderEval+"\n") {
		t.Fatalf("a trace with evaluations starts %q, want the header %q", strings.SplitN(b.String(), "\n", 2)[0], TraceHeaderEval)
	}
	got, err := ReadTrace(&b)
	if err != nil {
		t.Fatal(err)
	}
	if !slices.EqualFunc(got, trace, func(a, b Build) bool {
		return a.Submit == b.Submit && a.EvalStart == b.EvalStart && a.Source == b.Source && a.System == b.System
	}) {
		t.Errorf("round trip changed the trace:\n%+v\nwant\n%+v", got, trace)
	}
	for _, bad := range []string{
		TraceHeaderEval + "\n10,2,x86_64-linux,,5\n",        // a start without a source
		TraceHeaderEval + "\n10,2,x86_64-linux,,,p\n",       // a source without a start
		TraceHeaderEval + "\n10,2,x86_64-linux,,11,p\n",     // evaluated after it was submitted
		TraceHeaderEval + "\n10,2,x86_64-linux,,x,p\n",      // not a number
		TraceHeader + "\n10,2,x86_64-linux,,5,p\n",          // evaluation fields under the old header
		TraceHeaderEval + "\n10,2,x86_64-linux,,5,p,more\n", // too many fields
	} {
		if _, err := ReadTrace(strings.NewReader(bad)); err == nil {
			t.Errorf("ReadTrace(%q): no error", bad)
		}
	}
}

// TestGenerateEvaluations: with EvalMedian, every build names its push's
// evaluation, which starts before it; without, the trace is what it was.
func TestGenerateEvaluations(t *testing.T) {
	g := DefaultGen
	plain := Generate(g)
	g.EvalMedian, g.Projects = 2*time.Minute, 3
	evald := Generate(g)
	if len(evald) == 0 || len(plain) == 0 {
		t.Fatal("empty traces")
	}
	projects := map[string]bool{}
	for _, b := range evald {
		if b.Source == "" || b.EvalStart+10*time.Second > b.Submit {
			t.Fatalf("build %+v: want a source and an evaluation of at least 10 s before it", b)
		}
		projects[b.Source] = true
	}
	if len(projects) != 3 {
		t.Errorf("projects = %v, want 3", projects)
	}
	for _, b := range plain {
		if b.Source != "" {
			t.Fatalf("a trace without evaluations has %+v", b)
		}
	}
}
