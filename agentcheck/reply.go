package agentcheck

import (
	"strconv"
	"strings"

	"guardianproject.dev/ops/nix-builder-autoscaler/scaler"
)

// Reply is the agent-check answer for slot s of a pool whose builders run
// maxJobs jobs at once, without the line end (Serve appends "\n"). It
// implements docs/design.md §3.2:
//
//	empty, launching, terminating  maint
//	booting                        down #booting <instance-id>
//	binding                        ready down #binding <instance-id>
//	ready                          up ready <weight>% maxconn:<max_jobs> #<instance-id> <type> <market>
//	draining                       drain
//	any other state                maint
//
// booting says only "down": the server stays in the MAINT it entered with
// "maint" while launching, so HAProxy runs no health check toward the
// placeholder address (the builder's is not known yet). binding says
// "ready" as well as "down" (DESIGN says only "down"): without "ready" the
// server would stay in the MAINT it got from the
// config's `disabled` or from the slot's earlier "maint", and HAProxy runs no
// health check on a server in MAINT, so the SSH check that moves the slot
// from binding to ready would never run. "ready" clears MAINT; "down" keeps
// the server DOWN ("DOWN (agent)") however well its SSH check goes, so no
// connection reaches a builder before the reconciler calls it ready. The
// health check's own verdict is in show stat's check_status (L7OK once sshd
// answers), which is what a readiness probe must read in binding: status
// stays "DOWN (agent)" until this function answers "up".
//
// The weight is the operator's weight (clamped to 0..256) as a percentage of
// the configured `weight 100`, so HAProxy's weight equals the operator's.
// "maxconn:" is left out when maxJobs < 1: a server maxconn of 0 means
// unlimited in HAProxy (configuration manual, server maxconn).
//
// HAProxy keeps a "#" description only after a health word (up, down); it
// then shows in show stat's last_agt. "drain" and "maint" therefore carry
// none: adding "up" to "drain" just to show one would also raise a slot that
// drains before it was ever ready. See the package documentation.
func Reply(s scaler.Slot, maxJobs int) string {
	switch s.State {
	case scaler.Booting:
		return "down #" + describe(string(s.State), s.InstanceID)
	case scaler.Binding:
		return "ready down #" + describe(string(s.State), s.InstanceID)
	case scaler.Ready:
		w := min(max(s.Weight, 0), scaler.MaxWeight)
		var b strings.Builder
		b.WriteString("up ready ")
		b.WriteString(strconv.Itoa(w))
		b.WriteString("%")
		if maxJobs > 0 {
			b.WriteString(" maxconn:")
			b.WriteString(strconv.Itoa(maxJobs))
		}
		if d := describe(s.InstanceID, s.InstanceType, s.Market); d != "" {
			b.WriteString(" #")
			b.WriteString(d)
		}
		return b.String()
	case scaler.Draining:
		return "drain"
	default: // empty, launching, terminating, and anything unknown
		return "maint"
	}
}

// maxField bounds each word of a description.
const maxField = 64

// describe joins the non-empty words, each cut to maxField bytes and stripped
// of anything that could end or break the reply line.
func describe(words ...string) string {
	var out []string
	for _, w := range words {
		w = strings.Map(func(r rune) rune {
			if r < 0x21 || r == 0x7f || r == '#' || r == ',' || r > 0x7e {
				return -1
			}
			return r
		}, w)
		if len(w) > maxField {
			w = w[:maxField]
		}
		if w != "" {
			out = append(out, w)
		}
	}
	return strings.Join(out, " ")
}
