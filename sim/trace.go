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
}

// TraceHeader is the first line of a trace file.
const TraceHeader = "submit_seconds,duration_seconds,system,features"

// ReadTrace parses a CSV trace: a header line (TraceHeader), then one build
// per line. Features are separated by spaces (or ';'); blank lines and lines
// starting with '#' are skipped. Builds are returned ordered by submit time.
func ReadTrace(r io.Reader) ([]Build, error) {
	sc := bufio.NewScanner(r)
	var out []Build
	line := 0
	header := false
	for sc.Scan() {
		line++
		t := strings.TrimSpace(sc.Text())
		if t == "" || strings.HasPrefix(t, "#") {
			continue
		}
		if !header {
			header = true
			if t == TraceHeader {
				continue
			}
			return nil, fmt.Errorf("line %d: want header %q", line, TraceHeader)
		}
		f := strings.Split(t, ",")
		if len(f) < 3 || len(f) > 4 {
			return nil, fmt.Errorf("line %d: want 4 comma-separated fields (%s)", line, TraceHeader)
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
		if len(f) == 4 {
			b.Features = strings.FieldsFunc(f[3], func(r rune) bool { return r == ' ' || r == ';' })
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

// WriteTrace writes builds in the format ReadTrace reads.
func WriteTrace(w io.Writer, builds []Build) error {
	bw := bufio.NewWriter(w)
	fmt.Fprintln(bw, TraceHeader)
	for _, b := range builds {
		fmt.Fprintf(bw, "%s,%s,%s,%s\n", fmtSec(b.Submit), fmtSec(b.Duration), b.System, strings.Join(b.Features, " "))
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
		for range n {
			sub := t + time.Duration(rng.Float64()*float64(o.Spread))
			dur := float64(o.MedianBuild) * math.Exp(rng.NormFloat64())
			dur = math.Min(math.Max(dur, float64(5*time.Second)), float64(2*time.Hour))
			out = append(out, Build{Submit: sub.Truncate(time.Second), Duration: time.Duration(dur).Truncate(time.Second), System: o.System})
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
