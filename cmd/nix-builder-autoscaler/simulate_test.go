package main

import (
	"bytes"
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"guardianproject.dev/ops/nix-builder-autoscaler/sim"
)

const (
	simConfigFile = "../../sim/testdata/sim.toml"
	simTraceFile  = "../../sim/testdata/bursty-day.csv"
)

func TestSimulateDeterministicJSON(t *testing.T) {
	run := func() []byte {
		var out, errb bytes.Buffer
		if code := simulateCmd([]string{"--config", simConfigFile, "--trace", simTraceFile, "--seed", "3", "--json"}, &out, &errb); code != 0 {
			t.Fatalf("exit %d: %s", code, errb.String())
		}
		return out.Bytes()
	}
	a, b := run(), run()
	if !bytes.Equal(a, b) {
		t.Fatal("same trace and seed: different output")
	}
	var rep struct {
		Policy []struct {
			Builds    int     `json:"builds"`
			Completed int     `json:"completed"`
			Cost      float64 `json:"cost"`
		} `json:"policy"`
		Baselines  []json.RawMessage `json:"baselines"`
		LowerBound struct {
			Cost float64 `json:"cost"`
		} `json:"lower_bound"`
	}
	if err := json.Unmarshal(a, &rep); err != nil {
		t.Fatal(err)
	}
	if len(rep.Policy) != 1 || rep.Policy[0].Builds == 0 || rep.Policy[0].Completed != rep.Policy[0].Builds ||
		len(rep.Baselines) != 4 || rep.Policy[0].Cost < rep.LowerBound.Cost {
		t.Fatalf("unexpected report: %s", a)
	}
}

func TestSimulateSweepSVG(t *testing.T) {
	svg := filepath.Join(t.TempDir(), "sweep.svg")
	var out, errb bytes.Buffer
	code := simulateCmd([]string{"--config", simConfigFile, "--trace", simTraceFile, "--no-baselines",
		"--sweep", "idle_timeout=1m,10m", "--svg", svg}, &out, &errb)
	if code != 0 {
		t.Fatalf("exit %d: %s", code, errb.String())
	}
	for _, want := range []string{"policy idle_timeout=1m", "policy idle_timeout=10m", "lower bound"} {
		if !strings.Contains(out.String(), want) {
			t.Errorf("output lacks %q:\n%s", want, out.String())
		}
	}
	b, err := os.ReadFile(svg)
	if err != nil || !bytes.HasPrefix(b, []byte("<svg")) || !bytes.Contains(b, []byte("idle_timeout=10m")) {
		t.Fatalf("svg: %v\n%.300s", err, b)
	}
}

// TestSimulateIdlePolicy: the report says which idle timeout each policy
// run used; sim.toml's EC2 pool has the defaults, idle_timeout auto and a
// 60 s billing minimum.
func TestSimulateIdlePolicy(t *testing.T) {
	var out, errb bytes.Buffer
	code := simulateCmd([]string{"--config", simConfigFile, "--trace", simTraceFile, "--no-baselines",
		"--sweep", "idle_timeout=auto,5m"}, &out, &errb)
	if code != 0 {
		t.Fatalf("exit %d: %s", code, errb.String())
	}
	for _, want := range []string{"idle policy of policy idle_timeout=auto:\n  x86: idle_timeout auto = ",
		"idle policy of policy idle_timeout=5m:\n  x86: idle_timeout 5m; billing minimum 1m\n"} {
		if !strings.Contains(out.String(), want) {
			t.Errorf("output lacks %q:\n%s", want, out.String())
		}
	}
}

func TestSimulateGenerateAndUsage(t *testing.T) {
	var out, errb bytes.Buffer
	if code := simulateCmd([]string{"--generate", "--seed", "5"}, &out, &errb); code != 0 {
		t.Fatalf("exit %d: %s", code, errb.String())
	}
	if !strings.HasPrefix(out.String(), "submit_seconds,duration_seconds,system,features\n") || strings.Count(out.String(), "\n") < 10 {
		t.Fatalf("generated trace: %.200s", out.String())
	}
	for _, args := range [][]string{{}, {"--config", simConfigFile}, {"--config", simConfigFile, "--trace", simTraceFile, "--sweep", "bogus=1"}} {
		out.Reset()
		errb.Reset()
		if code := simulateCmd(args, &out, &errb); code != 2 {
			t.Errorf("%v: exit %d, want 2", args, code)
		}
	}
}

// TestSimulateEvaluations: a generated trace with evaluations replays its
// forecasts; swept off (forecast_max_builders=0) the builds wait longer.
func TestSimulateEvaluations(t *testing.T) {
	trace := filepath.Join(t.TempDir(), "eval.csv")
	var out, errb bytes.Buffer
	if code := simulateCmd([]string{"--generate", "--seed", "3", "--eval-median", "2m", "--spread", "10s", "--builds-per-push", "4"}, &out, &errb); code != 0 {
		t.Fatalf("generate: exit %d: %s", code, errb.String())
	}
	if !strings.HasPrefix(out.String(), sim.TraceHeaderEval+"\n") {
		t.Fatalf("generated trace with evaluations: %.200s", out.String())
	}
	if err := os.WriteFile(trace, out.Bytes(), 0o644); err != nil {
		t.Fatal(err)
	}
	out.Reset()
	if code := simulateCmd([]string{"--config", simConfigFile, "--trace", trace, "--no-baselines", "--json",
		"--sweep", "forecast_max_builders=0,16"}, &out, &errb); code != 0 {
		t.Fatalf("exit %d: %s", code, errb.String())
	}
	var rep struct {
		Policy []struct {
			Wait struct {
				Mean float64 `json:"mean"`
			} `json:"wait"`
		} `json:"policy"`
	}
	if err := json.Unmarshal(out.Bytes(), &rep); err != nil {
		t.Fatal(err)
	}
	if len(rep.Policy) != 2 || rep.Policy[1].Wait.Mean >= rep.Policy[0].Wait.Mean {
		t.Errorf("mean wait without forecasts, with: %v; want two runs, shorter with", rep.Policy)
	}
}
