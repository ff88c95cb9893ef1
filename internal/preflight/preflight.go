// Package preflight checks, before the daemon is trusted with money, that
// every outside thing a configuration relies on answers as it must: AWS
// credentials and region, each pool's launch as a DryRun RunInstances
// (IAM, launch template, AMI, tags at launch), its instance types'
// offerings in its subnets' zones, the Spot service-linked role, the
// Tailscale LocalAPI and API key, and HAProxy's runtime socket. Every
// call is read-only or DryRun: preflight launches and changes nothing.
//
// A Check is a function that returns result lines; Run runs a list of
// them. A new check (say, of an SQS interruption queue) is one more
// function in that list.
package preflight

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"strings"
	"text/tabwriter"
)

// Status is a result line's verdict.
type Status string

// Statuses. SKIP is for a check that does not apply to the configuration,
// or that could not be made because an earlier one failed (the detail
// says which); it does not fail the preflight.
const (
	Pass Status = "PASS"
	Fail Status = "FAIL"
	Skip Status = "SKIP"
)

// Result is one line of the report. Detail says what was found, and for a
// failure what to change.
type Result struct {
	Check  string `json:"check"`
	Pool   string `json:"pool"`
	Status Status `json:"result"`
	Detail string `json:"detail"`
}

// Check makes one or more related checks. It reports every problem as a
// FAIL line rather than returning an error.
type Check func(ctx context.Context) []Result

// Report is the outcome of Run.
type Report struct {
	Results []Result
}

// Run runs the checks in order (checks that depend on each other are one
// Check) and collects their lines.
func Run(ctx context.Context, checks []Check) Report {
	var r Report
	for _, c := range checks {
		r.Results = append(r.Results, c(ctx)...)
	}
	return r
}

// OK reports whether no line failed.
func (r Report) OK() bool { return r.count(Fail) == 0 }

func (r Report) count(s Status) int {
	n := 0
	for _, l := range r.Results {
		if l.Status == s {
			n++
		}
	}
	return n
}

// Summary is the report's last line.
func (r Report) Summary() string {
	verdict := "ready"
	if !r.OK() {
		verdict = "NOT ready: fix the FAIL lines"
	}
	return fmt.Sprintf("preflight: %d PASS, %d FAIL, %d SKIP: %s", r.count(Pass), r.count(Fail), r.count(Skip), verdict)
}

// WriteTable prints the report as aligned columns and the summary.
func (r Report) WriteTable(w io.Writer) error {
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "CHECK\tPOOL\tRESULT\tDETAIL")
	for _, l := range r.Results {
		pool := l.Pool
		if pool == "" {
			pool = "-"
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\n", l.Check, pool, l.Status, oneLine(l.Detail))
	}
	if err := tw.Flush(); err != nil {
		return err
	}
	_, err := fmt.Fprintln(w, r.Summary())
	return err
}

// WriteJSON prints {"ok": bool, "results": [...]} for scripts.
func (r Report) WriteJSON(w io.Writer) error {
	results := r.Results
	if results == nil {
		results = []Result{}
	}
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	return enc.Encode(struct {
		OK      bool     `json:"ok"`
		Results []Result `json:"results"`
	}{r.OK(), results})
}

// oneLine keeps a table row on one line whatever an error message holds.
func oneLine(s string) string {
	return strings.Join(strings.Fields(s), " ")
}

func pass(check, pool, format string, args ...any) Result {
	return Result{Check: check, Pool: pool, Status: Pass, Detail: fmt.Sprintf(format, args...)}
}

func fail(check, pool, format string, args ...any) Result {
	return Result{Check: check, Pool: pool, Status: Fail, Detail: fmt.Sprintf(format, args...)}
}

func skip(check, pool, format string, args ...any) Result {
	return Result{Check: check, Pool: pool, Status: Skip, Detail: fmt.Sprintf(format, args...)}
}
