package sim

import (
	"encoding/json"
	"fmt"
	"io"
	"math"
	"strings"
	"text/tabwriter"
)

// Report is a whole simulate run: the daemon's policy (once per sweep value)
// against the baselines and the lower bound, on one trace and seed.
type Report struct {
	Trace      string   `json:"trace"`
	Seed       uint64   `json:"seed"`
	Env        Env      `json:"env"`
	Sweep      string   `json:"sweep,omitempty"`
	Policy     []Result `json:"policy"`
	Baselines  []Result `json:"baselines"`
	LowerBound Result   `json:"lower_bound"`
}

// WriteJSON writes the report as indented JSON.
func (r Report) WriteJSON(w io.Writer) error {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	return enc.Encode(r)
}

// WriteText writes the report as a table.
func (r Report) WriteText(w io.Writer) error {
	fmt.Fprintf(w, "trace %s, seed %d, %d builds, %.1f build-hours; market %s at %.4f/h\n\n",
		r.Trace, r.Seed, r.LowerBound.Builds, r.LowerBound.BuildSeconds/3600, r.Env.Market, r.Env.Price())
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintln(tw, "policy\tcost\t×LB\tbilled h\tutil\twait mean\tp50\tp95\tmax\tboot p95\tqueue p95\tqueue max\tlaunches\tcap.err\tinterrupts\treruns\tfailed\t")
	row := func(x Result) {
		ratio := "-"
		if r.LowerBound.Cost > 0 {
			ratio = fmt.Sprintf("%.2f", x.Cost/r.LowerBound.Cost)
		}
		fmt.Fprintf(tw, "%s\t%.4f\t%s\t%.2f\t%.0f%%\t%.1f\t%.0f\t%.0f\t%.0f\t%.0f\t%.0f\t%.0f\t%d\t%d\t%d\t%d\t%d\t\n",
			x.Policy, x.Cost, ratio, x.BilledSeconds/3600, x.Utilisation*100, x.Wait.Mean, x.Wait.P50, x.Wait.P95, x.Wait.Max,
			x.BootWait.P95, x.QueueWait.P95, x.QueueWait.Max, x.Launches, x.CapacityErrors, x.Interruptions, x.Reruns, x.Failed)
	}
	for _, x := range r.Policy {
		row(x)
	}
	for _, x := range r.Baselines {
		row(x)
	}
	row(r.LowerBound)
	if err := tw.Flush(); err != nil {
		return err
	}
	for _, x := range r.Policy {
		if len(x.IdlePolicy) == 0 {
			continue
		}
		fmt.Fprintf(w, "\nidle policy of %s:\n", x.Policy)
		for _, s := range x.IdlePolicy {
			fmt.Fprintf(w, "  %s\n", s)
		}
	}
	return nil
}

// WriteSVG draws cost against p95 wait: one point per sweep value of the
// daemon's policy (joined by a line), the baselines as grey points, and the
// lower bound as a dashed line.
func (r Report) WriteSVG(w io.Writer) error {
	const W, H, ml, mr, mt, mb = 720.0, 480.0, 70.0, 30.0, 40.0, 50.0
	maxX, maxY := 1.0, r.LowerBound.Cost
	for _, x := range r.Policy {
		maxX, maxY = math.Max(maxX, x.Wait.P95), math.Max(maxY, x.Cost)
	}
	// Baselines far off the policy's range would squash it: they are
	// listed under the chart instead.
	var shown []Result
	var off []string
	limX, limY := 4*maxX, 4*maxY
	for _, x := range r.Baselines {
		if len(r.Policy) > 0 && (x.Wait.P95 > limX || x.Cost > limY) {
			off = append(off, fmt.Sprintf("%s: cost %.4f, p95 wait %.0f s", x.Policy, x.Cost, x.Wait.P95))
			continue
		}
		shown = append(shown, x)
		maxX, maxY = math.Max(maxX, x.Wait.P95), math.Max(maxY, x.Cost)
	}
	maxX, maxY = niceCeil(maxX*1.1), niceCeil(math.Max(maxY*1.1, 1e-6))
	px := func(v float64) float64 { return ml + v/maxX*(W-ml-mr) }
	py := func(v float64) float64 { return H - mb - v/maxY*(H-mt-mb) }
	var b strings.Builder
	fmt.Fprintf(&b, `<svg xmlns="http://www.w3.org/2000/svg" width="%.0f" height="%.0f" viewBox="0 0 %.0f %.0f" font-family="sans-serif" font-size="12">`+"\n", W, H, W, H)
	fmt.Fprintf(&b, `<rect width="100%%" height="100%%" fill="white"/>`+"\n")
	fmt.Fprintf(&b, `<text x="%.0f" y="22" font-size="14">cost against p95 reservation wait — %s (seed %d)</text>`+"\n", ml, esc(r.Trace), r.Seed)
	for i := 0; i <= 5; i++ {
		xv, yv := maxX*float64(i)/5, maxY*float64(i)/5
		fmt.Fprintf(&b, `<line x1="%.1f" y1="%.1f" x2="%.1f" y2="%.1f" stroke="#eee"/>`+"\n", px(xv), py(0), px(xv), py(maxY))
		fmt.Fprintf(&b, `<line x1="%.1f" y1="%.1f" x2="%.1f" y2="%.1f" stroke="#eee"/>`+"\n", px(0), py(yv), px(maxX), py(yv))
		fmt.Fprintf(&b, `<text x="%.1f" y="%.1f" text-anchor="middle">%g</text>`+"\n", px(xv), H-mb+16, round2(xv))
		fmt.Fprintf(&b, `<text x="%.1f" y="%.1f" text-anchor="end">%g</text>`+"\n", ml-6, py(yv)+4, round4(yv))
	}
	fmt.Fprintf(&b, `<line x1="%.1f" y1="%.1f" x2="%.1f" y2="%.1f" stroke="black"/>`+"\n", px(0), py(0), px(maxX), py(0))
	fmt.Fprintf(&b, `<line x1="%.1f" y1="%.1f" x2="%.1f" y2="%.1f" stroke="black"/>`+"\n", px(0), py(0), px(0), py(maxY))
	fmt.Fprintf(&b, `<text x="%.1f" y="%.1f" text-anchor="middle">p95 wait (s)</text>`+"\n", (W+ml-mr)/2, H-12)
	fmt.Fprintf(&b, `<text x="16" y="%.1f" transform="rotate(-90 16 %.1f)" text-anchor="middle">cost (%s)</text>`+"\n", (H-mb+mt)/2, (H-mb+mt)/2, esc(r.Env.Market))
	lb := py(r.LowerBound.Cost)
	fmt.Fprintf(&b, `<line x1="%.1f" y1="%.1f" x2="%.1f" y2="%.1f" stroke="green" stroke-dasharray="6 4"/><text x="%.1f" y="%.1f" fill="green" text-anchor="end">lower bound</text>`+"\n", px(0), lb, px(maxX), lb, px(maxX), lb-4)
	for i, o := range off {
		fmt.Fprintf(&b, `<text x="%.1f" y="%.1f" fill="#555" font-size="10">off chart: %s</text>`+"\n", ml+10, mt+14+12*float64(i), esc(o))
	}
	for _, x := range shown {
		fmt.Fprintf(&b, `<circle cx="%.1f" cy="%.1f" r="4" fill="#888"/><text x="%.1f" y="%.1f" fill="#555">%s</text>`+"\n", px(x.Wait.P95), py(x.Cost), px(x.Wait.P95)+6, py(x.Cost)-6, esc(x.Policy))
	}
	var pts []string
	for _, x := range r.Policy {
		pts = append(pts, fmt.Sprintf("%.1f,%.1f", px(x.Wait.P95), py(x.Cost)))
	}
	if len(pts) > 1 {
		fmt.Fprintf(&b, `<polyline points="%s" fill="none" stroke="#1f5fbf"/>`+"\n", strings.Join(pts, " "))
	}
	for _, x := range r.Policy {
		fmt.Fprintf(&b, `<circle cx="%.1f" cy="%.1f" r="5" fill="#1f5fbf"/><text x="%.1f" y="%.1f" fill="#1f5fbf">%s</text>`+"\n", px(x.Wait.P95), py(x.Cost), px(x.Wait.P95)+7, py(x.Cost)+14, esc(x.Policy))
	}
	b.WriteString("</svg>\n")
	_, err := io.WriteString(w, b.String())
	return err
}

func niceCeil(x float64) float64 {
	if x <= 0 {
		return 1
	}
	p := math.Pow(10, math.Floor(math.Log10(x)))
	for _, m := range []float64{1, 2, 2.5, 5, 10} {
		if m*p >= x {
			return m * p
		}
	}
	return 10 * p
}

func esc(s string) string {
	return strings.NewReplacer("&", "&amp;", "<", "&lt;", ">", "&gt;", `"`, "&quot;").Replace(s)
}
