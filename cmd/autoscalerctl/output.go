package main

import (
	"fmt"
	"io"
	"slices"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"
	"unicode/utf8"

	"guardianproject.dev/ops/nix-builder-autoscaler/internal/api"
)

// table writes aligned columns under a header.
type table struct{ tw *tabwriter.Writer }

func newTable(w io.Writer, header ...string) *table {
	t := &table{tw: tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)}
	t.row(header...)
	return t
}

func (t *table) row(cells ...string) {
	for i, c := range cells {
		if i > 0 {
			io.WriteString(t.tw, "\t")
		}
		io.WriteString(t.tw, clip(cell(c), maxCell))
	}
	io.WriteString(t.tw, "\n")
}

// maxCell bounds what a table prints of one value, in runes: one long
// value (a reason, an owner, a list of features) would otherwise widen its
// column, and so every row of the table. --json and the single-item views
// show values whole.
const maxCell = 80

// clip cuts s to at most n runes, ending it with "…" when cut.
func clip(s string, n int) string {
	if utf8.RuneCountInString(s) <= n {
		return s
	}
	r := []rune(s)
	return string(r[:n-1]) + "…"
}

func (t *table) flush() error { return t.tw.Flush() }

// cell makes a value from the daemon safe for one table cell on a terminal:
// control characters (tabs, newlines, escapes) become spaces, and an empty
// value shows as "-".
func cell(s string) string {
	if s == "" {
		return "-"
	}
	return strings.Map(func(r rune) rune {
		if r < 0x20 || r == 0x7f || (r >= 0x80 && r < 0xa0) {
			return ' '
		}
		return r
	}, s)
}

// humanDuration shows d, rounded, in at most two units: 42s, 3m12s, 5m,
// 2h5m, 3d4h.
func humanDuration(d time.Duration) string {
	if d < 0 {
		d = -d
	}
	s := int64(d.Round(time.Second) / time.Second)
	two := func(a int64, ua string, b int64, ub string) string {
		if b == 0 {
			return fmt.Sprintf("%d%s", a, ua)
		}
		return fmt.Sprintf("%d%s%d%s", a, ua, b, ub)
	}
	switch {
	case s < 60:
		return fmt.Sprintf("%ds", s)
	case s < 3600:
		return two(s/60, "m", s%60, "s")
	case s < 86400:
		return two(s/3600, "h", s%3600/60, "m")
	default:
		return two(s/86400, "d", s%86400/3600, "h")
	}
}

// relTime shows t relative to now: "3m12s ago", "in 8m", or "-" for the
// zero time.
func relTime(t, now time.Time) string {
	if t.IsZero() {
		return "-"
	}
	d := now.Sub(t)
	switch {
	case d >= -time.Second/2 && d < time.Second/2:
		return "now"
	case d > 0:
		return humanDuration(d) + " ago"
	default:
		return "in " + humanDuration(d)
	}
}

func relTimePtr(t *time.Time, now time.Time) string {
	if t == nil {
		return "-"
	}
	return relTime(*t, now)
}

func seconds(s float64) time.Duration {
	return time.Duration(s * float64(time.Second))
}

// list joins a string list for a cell.
func list(l []string) string { return strings.Join(l, ",") }

// slotStateOrder is the lifecycle order of slot states, for counts. It is
// scaler.SlotStates as strings, written out because autoscalerctl may not
// import scaler (deps_test.go); mirror_test.go keeps the two equal.
var slotStateOrder = []string{"empty", "launching", "booting", "binding", "ready", "draining", "terminating"}

// counts shows a by-state count map as "ready=2 booting=1", known states in
// lifecycle order first, zero counts left out.
func counts(m map[string]int, order []string) string {
	var parts []string
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	slices.SortFunc(keys, func(a, b string) int {
		ia, ib := slices.Index(order, a), slices.Index(order, b)
		if ia < 0 {
			ia = len(order)
		}
		if ib < 0 {
			ib = len(order)
		}
		if ia != ib {
			return ia - ib
		}
		return strings.Compare(a, b)
	})
	for _, k := range keys {
		if m[k] != 0 {
			parts = append(parts, k+"="+strconv.Itoa(m[k]))
		}
	}
	return strings.Join(parts, " ")
}

func printStatus(w io.Writer, st api.Status, now time.Time) error {
	if len(st.Pools) == 0 {
		fmt.Fprintln(w, "no pools")
	} else {
		t := newTable(w, "POOL", "SYSTEMS", "FEATURES", "BUILDERS", "WARM", "RES/BUILDER", "SLOTS", "RESERVATIONS", "HELD", "QUEUED")
		for _, p := range st.Pools {
			t.row(p.Name, list(p.Systems), list(p.Features),
				fmt.Sprintf("%d..%d", p.MinBuilders, p.MaxBuilders),
				strconv.Itoa(p.WarmPool), strconv.Itoa(p.ReservationsPerBuilder),
				counts(p.Slots, slotStateOrder), counts(p.Reservations, reservationStates), strconv.Itoa(p.HeldConnections), strconv.Itoa(p.QueuedConnections))
		}
		if err := t.flush(); err != nil {
			return err
		}
	}
	fmt.Fprintln(w)
	printHAProxy(w, st.HAProxy)
	return printReconcile(w, st.Reconcile, now)
}

func printHAProxy(w io.Writer, h api.HAProxyStatus) {
	if !h.Enabled {
		fmt.Fprintln(w, "haproxy: not configured (builders are probed directly)")
		return
	}
	state := "up"
	if !h.Up {
		state = "UNREACHABLE"
		if h.Error != "" {
			state += " (" + cell(h.Error) + ")"
		}
	}
	spoa := "unknown"
	if h.SPOAUp != nil {
		spoa = map[bool]string{true: "up", false: "DOWN (HAProxy balances without it)"}[*h.SPOAUp]
	}
	fmt.Fprintf(w, "haproxy: %s; spoe agent: %s\n", state, spoa)
}

func printReconcile(w io.Writer, rs api.ReconcileStatus, now time.Time) error {
	var err error
	if rs.LastAt.IsZero() {
		_, err = fmt.Fprintf(w, "reconcile: no round yet\n")
	} else {
		_, err = fmt.Fprintf(w, "reconcile: round %d, %s, took %s\n", rs.Rounds, relTime(rs.LastAt, now),
			seconds(rs.DurationSeconds).Round(time.Millisecond))
	}
	if err == nil && rs.LastError != "" {
		_, err = fmt.Fprintf(w, "reconcile: last error: %s\n", cell(rs.LastError))
	}
	return err
}

func printSlots(w io.Writer, slots []api.Slot, now time.Time) error {
	if len(slots) == 0 {
		_, err := fmt.Fprintln(w, "no slots")
		return err
	}
	t := newTable(w, "POOL", "SLOT", "STATE", "SINCE", "WEIGHT", "RES", "INSTANCE", "TYPE", "MARKET", "ADDRESS", "LAST-ACTIVE", "DRAIN-REASON")
	for _, s := range slots {
		t.row(s.Pool, s.Slot, s.State, relTime(s.Since, now), strconv.Itoa(s.Weight), strconv.Itoa(s.Reservations),
			s.InstanceID, s.InstanceType, s.Market, s.Address, relTime(s.LastActive, now), s.DrainReason)
	}
	return t.flush()
}

func live(state string) bool { return state == "pending" || state == "ready" }

func printReservations(w io.Writer, rs []api.Reservation, now time.Time) error {
	if len(rs) == 0 {
		_, err := fmt.Fprintln(w, "no reservations")
		return err
	}
	t := newTable(w, "ID", "STATE", "POOL", "SLOT", "OWNER", "SYSTEM", "FEATURES", "CREATED", "EXPIRES", "ENDED", "WAITED", "REASON")
	for _, r := range rs {
		expires := "-"
		if live(r.State) {
			expires = relTime(r.ExpiresAt, now)
		}
		t.row(r.ID, r.State, r.Pool, r.Slot, r.Owner, r.System, list(r.Features),
			relTime(r.CreatedAt, now), expires, relTimePtr(r.EndedAt, now),
			humanDuration(seconds(r.WaitSeconds)), r.Reason)
	}
	return t.flush()
}

// keyValues writes "key value" lines, the values aligned; flush writes
// them out.
func keyValues(w io.Writer) (kv func(k, v string), flush func() error) {
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	return func(k, v string) { fmt.Fprintf(tw, "%s\t%s\n", k, cell(v)) }, tw.Flush
}

// printReservation shows one reservation as "key value" lines.
func printReservation(w io.Writer, r api.Reservation, now time.Time) error {
	kv, flush := keyValues(w)
	kv("id", r.ID)
	kv("state", r.State)
	kv("pool", r.Pool)
	if r.Slot != "" {
		kv("slot", r.Slot)
	}
	if r.Address != "" {
		kv("address", r.Address)
	}
	if r.InstanceID != "" {
		kv("instance", r.InstanceID)
	}
	kv("system", r.System)
	kv("features", list(r.Features))
	kv("owner", r.Owner)
	lease := r.Lease
	if live(r.State) {
		lease += ", expires " + relTime(r.ExpiresAt, now)
	}
	kv("lease", lease)
	kv("created", relTime(r.CreatedAt, now))
	if r.EndedAt != nil {
		kv("ended", relTimePtr(r.EndedAt, now))
	}
	kv("waited", humanDuration(seconds(r.WaitSeconds)))
	if r.Reason != "" {
		kv("reason", r.Reason)
	}
	return flush()
}

func printEvents(w io.Writer, evs []api.Event, now time.Time) error {
	if len(evs) == 0 {
		_, err := fmt.Fprintln(w, "no events")
		return err
	}
	t := newTable(w, "TIME", "AGE", "KIND", "POOL", "SLOT", "INSTANCE", "RESERVATION", "ACTOR", "REASON")
	for _, e := range evs {
		t.row(e.At.Local().Format("2006-01-02 15:04:05"), relTime(e.At, now), e.Kind, e.Pool, e.Slot,
			e.InstanceID, e.ReservationID, e.Actor, e.Reason)
	}
	return t.flush()
}
