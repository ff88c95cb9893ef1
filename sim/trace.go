// Package sim replays a trace of Nix builds against the daemon's own scaling
// policy (scaler.Plan, applied by scaler.Reconciler) on a simulated clock,
// with a simulated provider and load balancer, and against baseline policies
// on the same trace. See docs/simulation.md.
package sim

import (
	"bufio"
	"fmt"
	"io"
	"math"
	"math/rand/v2"
	"sort"
	"strconv"
	"strings"
	"time"
)

// Build is one line of a trace: a build that asks for a builder at Submit
// (from the start of the trace) and runs for Duration once it has one.
type Build struct {
	Submit   time.Duration
	Duration time.Duration
	System   string
	Features []string
	// Source, when set, is the project whose evaluation, started at
	// EvalStart, produced the build: the replay sends a forecast for it
	// then, as the Buildbot extension does, and withdraws it when the
	// evaluation's first build is submitted.
	EvalStart time.Duration
	Source    string
}

// TraceHeader is the first line of a trace file; TraceHeaderEval is the
// first line of one whose builds may name their evaluation.
const (
	TraceHeader     = "submit_seconds,duration_seconds,system,features"
	TraceHeaderEval = TraceHeader + ",eval_start_seconds,source"
)

// ReadTrace parses a CSV trace: a header line (TraceHeader or
// TraceHeaderEval), then one build per line. Features are separated by
// spaces (or ';'); blank lines and lines starting with '#' are skipped.
// Under TraceHeaderEval a line may end with its evaluation's start and
// source (both, or neither). Builds are returned ordered by submit time.
func ReadTrace(r io.Reader) ([]Build, error) {
	sc := bufio.NewScanner(r)
	var out []Build
	line := 0
	header := false
	fields := 4
	for sc.Scan() {
		line++
		t := strings.TrimSpace(sc.Text())
		if t == "" || strings.HasPrefix(t, "#") {
			continue
		}
		if !header {
			header = true
			switch t {
			case TraceHeader:
				continue
			case TraceHeaderEval:
				fields = 6
				continue
			}
			return nil, fmt.Errorf("line %d: want header %q (or %q)", line, TraceHeader, TraceHeaderEval)
		}
		f := strings.Split(t, ",")
		if len(f) < 3 || len(f) > fields {
			return nil, fmt.Errorf("line %d: want at most %d comma-separated fields", line, fields)
		}
		sub, err1 := strconv.ParseFloat(f[0], 64)
		dur, err2 := strconv.ParseFloat(f[1], 64)
		if err1 != nil || err2 != nil || sub < 0 || dur < 0 || math.IsNaN(sub) || math.IsNaN(dur) {
			return nil, fmt.Errorf("line %d: submit_seconds and duration_seconds must be non-negative numbers", line)
		}
		b := Build{Submit: seconds(sub), Duration: seconds(dur), System: strings.TrimSpace(f[2])}
		if b.System == "" {
			return nil, fmt.Errorf("line %d: system is empty", line)
		}
		if len(f) >= 4 {
			b.Features = strings.FieldsFunc(f[3], func(r rune) bool { return r == ' ' || r == ';' })
		}
		if err := readEval(&b, f); err != nil {
			return nil, fmt.Errorf("line %d: %w", line, err)
		}
		out = append(out, b)
	}
	if err := sc.Err(); err != nil {
		return nil, err
	}
	if !header {
		return nil, fmt.Errorf("empty trace: want header %q", TraceHeader)
	}
	sort.SliceStable(out, func(i, j int) bool { return out[i].Submit < out[j].Submit })
	return out, nil
}

// readEval reads a line's evaluation fields (5 and 6) into b.
func readEval(b *Build, f []string) error {
	if len(f) < 5 || strings.TrimSpace(f[4]) == "" && (len(f) < 6 || strings.TrimSpace(f[5]) == "") {
		return nil
	}
	if len(f) < 6 || strings.TrimSpace(f[5]) == "" {
		return fmt.Errorf("eval_start_seconds without a source: give both, or neither")
	}
	ev, err := strconv.ParseFloat(strings.TrimSpace(f[4]), 64)
	if err != nil || ev < 0 || math.IsNaN(ev) || seconds(ev) > b.Submit {
		return fmt.Errorf("eval_start_seconds must be a non-negative number no later than submit_seconds")
	}
	b.EvalStart, b.Source = seconds(ev), strings.TrimSpace(f[5])
	return nil
}

// WriteTrace writes builds in the format ReadTrace reads: with
// TraceHeaderEval when some build names its evaluation.
func WriteTrace(w io.Writer, builds []Build) error {
	bw := bufio.NewWriter(w)
	eval := false
	for _, b := range builds {
		eval = eval || b.Source != ""
	}
	if !eval {
		fmt.Fprintln(bw, TraceHeader)
	} else {
		fmt.Fprintln(bw, TraceHeaderEval)
	}
	for _, b := range builds {
		fmt.Fprintf(bw, "%s,%s,%s,%s", fmtSec(b.Submit), fmtSec(b.Duration), b.System, strings.Join(b.Features, " "))
		switch {
		case b.Source != "":
			fmt.Fprintf(bw, ",%s,%s", fmtSec(b.EvalStart), b.Source)
		case eval:
			fmt.Fprint(bw, ",,")
		}
		fmt.Fprintln(bw)
	}
	return bw.Flush()
}

func seconds(s float64) time.Duration { return time.Duration(math.Round(s * float64(time.Second))) }

func fmtSec(d time.Duration) string { return strconv.FormatFloat(d.Seconds(), 'f', -1, 64) }

// GenOptions shapes a generated CI trace.
type GenOptions struct {
	Days int
	Seed uint64
	// PushesPerHour is the mean rate of pushes in working hours (08–19 on
	// weekdays); nights get NightFactor of it and weekends WeekendFactor.
	PushesPerHour float64
	NightFactor   float64
	WeekendFactor float64
	// BuildsPerPush is the mean number of builds one push starts (at least 1).
	BuildsPerPush float64
	// Spread is how long after the push its builds are submitted (uniform),
	// as Nix reaches each derivation.
	Spread time.Duration
	// MedianBuild is the median build duration (log-normal, sigma 1).
	MedianBuild time.Duration
	System      string
	// StartWeekday is the weekday of day 0 (time.Monday by default).
	StartWeekday time.Weekday
	// EvalMedian, when positive, gives every push an evaluation first, as
	// buildbot-nix runs one: its builds are submitted after it, which
	// takes a log-normal time of this median (sigma 0.5, at least 10 s).
	// The push belongs to one of Projects projects (the builds' Source),
	// and its build count follows the project's (ProjectSpread).
	EvalMedian time.Duration
	Projects   int
	// ProjectSpread is how much a project's build count varies between
	// its pushes (σ of a log-normal around the project's typical count,
	// which is BuildsPerPush times a log-normal of σ 0.5).
	ProjectSpread float64
}

// DefaultGen is a small team's CI: bursty pushes in working hours.
var DefaultGen = GenOptions{Days: 1, Seed: 1, PushesPerHour: 4, NightFactor: 0.05, WeekendFactor: 0.1,
	BuildsPerPush: 6, Spread: 90 * time.Second, MedianBuild: 3 * time.Minute, System: "x86_64-linux", StartWeekday: time.Monday}

// Generate draws a trace: pushes arrive as a Poisson process whose rate
// follows working hours, and each push submits a burst of builds.
func Generate(o GenOptions) []Build {
	rng := rand.New(rand.NewPCG(o.Seed, 0x9e3779b97f4a7c15))
	var out []Build
	horizon := time.Duration(max(o.Days, 1)) * 24 * time.Hour
	t := time.Duration(0)
	peak := o.PushesPerHour
	if peak <= 0 {
		return nil
	}
	// Each project's typical build count (with evaluations only).
	var projects []float64
	if o.EvalMedian > 0 {
		for range max(o.Projects, 1) {
			projects = append(projects, math.Max(o.BuildsPerPush, 1)*math.Exp(0.5*rng.NormFloat64()))
		}
	}
	for {
		// Thinning: draw at the peak rate, keep with rate(t)/peak.
		t += seconds(rng.ExpFloat64() * 3600 / peak)
		if t >= horizon {
			break
		}
		if rng.Float64() > rateFactor(o, t) {
			continue
		}
		n := 1 + int(math.Round(rng.ExpFloat64()*math.Max(o.BuildsPerPush-1, 0)))
		// Without evaluations no extra number is drawn, so that a seed's
		// trace stays what it was.
		start, source := t, ""
		if o.EvalMedian > 0 {
			p := rng.IntN(len(projects))
			source = fmt.Sprintf("project-%d", p+1)
			eval := float64(o.EvalMedian) * math.Exp(0.5*rng.NormFloat64())
			start = t + time.Duration(math.Max(eval, float64(10*time.Second)))
			// A project's pushes rebuild much the same derivations: its
			// count varies around the project's own.
			n = max(1, int(math.Round(projects[p]*math.Exp(o.ProjectSpread*rng.NormFloat64()))))
		}
		for range n {
			sub := start + time.Duration(rng.Float64()*float64(o.Spread))
			dur := float64(o.MedianBuild) * math.Exp(rng.NormFloat64())
			dur = math.Min(math.Max(dur, float64(5*time.Second)), float64(2*time.Hour))
			b := Build{Submit: sub.Truncate(time.Second), Duration: time.Duration(dur).Truncate(time.Second), System: o.System}
			if source != "" {
				b.EvalStart, b.Source = t.Truncate(time.Second), source
			}
			out = append(out, b)
		}
	}
	sort.SliceStable(out, func(i, j int) bool { return out[i].Submit < out[j].Submit })
	return out
}

func rateFactor(o GenOptions, t time.Duration) float64 {
	day := int(t / (24 * time.Hour))
	wd := (o.StartWeekday + time.Weekday(day%7)) % 7
	hour := int(t%(24*time.Hour)) / int(time.Hour)
	f := 1.0
	if hour < 8 || hour >= 19 {
		f = o.NightFactor
	}
	if wd == time.Saturday || wd == time.Sunday {
		f *= o.WeekendFactor
	}
	return f
}
