package main

import (
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"guardianproject.dev/ops/nix-builder-autoscaler/internal/api"
)

// pagedAPI serves n reservations and n events in the daemon's pages; with
// huge, the reservations carry a 30 KB reason and owner and 500 features,
// as a hostile client could once store. A cursor is the index to go on
// from.
func pagedAPI(n int, huge bool) http.Handler {
	now := time.Now()
	long := "x"
	var features []string
	if huge {
		long = strings.Repeat("x", 30<<10)
		for i := range 500 {
			features = append(features, fmt.Sprintf("feature-%d", i))
		}
	}
	limit := func(r *http.Request) int {
		if l, err := strconv.Atoi(r.URL.Query().Get("limit")); err == nil && l > 0 {
			return min(l, api.MaxPageSize)
		}
		return api.DefaultPageSize
	}
	mux := http.NewServeMux()
	mux.HandleFunc("GET /v1/reservations", func(w http.ResponseWriter, r *http.Request) {
		from, _ := strconv.Atoi(r.URL.Query().Get("cursor"))
		out := api.ReservationList{Reservations: []api.Reservation{}}
		i := from
		for ; i < n && len(out.Reservations) < limit(r); i++ {
			out.Reservations = append(out.Reservations, api.Reservation{ID: fmt.Sprintf("res-%04d", i), State: "failed", Pool: "x86",
				System: "x86_64-linux", Features: features, Owner: long, Reason: long, CreatedAt: now, ExpiresAt: now})
		}
		if i < n {
			out.Next = strconv.Itoa(i)
		}
		json.NewEncoder(w).Encode(out)
	})
	mux.HandleFunc("GET /v1/events", func(w http.ResponseWriter, r *http.Request) {
		end := n
		if c := r.URL.Query().Get("cursor"); c != "" {
			end, _ = strconv.Atoi(c)
		}
		start := max(0, end-limit(r))
		out := api.EventList{Events: []api.Event{}}
		for i := start; i < end; i++ {
			out.Events = append(out.Events, api.Event{At: now, Kind: fmt.Sprintf("ev-%04d", i), Reason: long})
		}
		if start > 0 {
			out.Next = strconv.Itoa(start)
		}
		json.NewEncoder(w).Encode(out)
	})
	return mux
}

func servePaged(t *testing.T, h http.Handler) string {
	t.Helper()
	dir, err := os.MkdirTemp("", "nba-ctl") // short: socket paths are limited
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	ln, err := net.Listen("unix", filepath.Join(dir, "d.sock"))
	if err != nil {
		t.Fatal(err)
	}
	srv := httptest.NewUnstartedServer(h)
	srv.Listener.Close()
	srv.Listener = ln
	srv.Start()
	t.Cleanup(srv.Close)
	return ln.Addr().String()
}

// TestListsFollowPages: reservations and events show one page by default
// and say there is more; --limit and --all follow the daemon's cursors.
func TestListsFollowPages(t *testing.T) {
	const n = 2*api.MaxPageSize + 30
	sock := servePaged(t, pagedAPI(n, false))
	for _, c := range []struct {
		args   []string
		prefix string
		rows   int
		more   bool
	}{
		{[]string{"reservations"}, "res-", api.DefaultPageSize, true},
		{[]string{"reservations", "--limit", "1500"}, "res-", 1500, true},
		{[]string{"reservations", "--all"}, "res-", n, false},
		{[]string{"reservations", "--cursor", strconv.Itoa(n - 10)}, "res-", 10, false},
		{[]string{"events"}, "ev-", api.DefaultPageSize, true},
		{[]string{"events", "--all"}, "ev-", n, false},
	} {
		code, stdout, stderr := runCLI(t, append([]string{"--socket", sock}, c.args...)...)
		if code != 0 {
			t.Fatalf("%v: exit %d: %s", c.args, code, stderr)
		}
		var got int
		for _, l := range strings.Split(stdout, "\n") {
			if strings.Contains(l, c.prefix) {
				got++
			}
		}
		if got != c.rows {
			t.Errorf("%v: %d rows, want %d", c.args, got, c.rows)
		}
		if c.more != strings.Contains(stderr, "--cursor") {
			t.Errorf("%v: stderr %q; want a hint at more: %v", c.args, stderr, c.more)
		}
	}
	code, stdout, _ := runCLI(t, "--socket", sock, "events", "--all")
	if code != 0 || !strings.Contains(stdout, "ev-0000") || strings.Index(stdout, "ev-0000") > strings.Index(stdout, fmt.Sprintf("ev-%04d", n-1)) {
		t.Errorf("events --all: not every event, oldest first")
	}
	if code, _, stderr := runCLI(t, "--socket", sock, "reservations", "--all", "--limit", "5"); code != 2 || !strings.Contains(stderr, "--limit or --all") {
		t.Errorf("--all with --limit: exit %d, %s; want a usage error", code, stderr)
	}
}

// TestTableCellsAreClipped: a table shows at most maxCell runes of a value,
// so a 30 KB reason or 500 features do not widen every row.
func TestTableCellsAreClipped(t *testing.T) {
	sock := servePaged(t, pagedAPI(5, true))
	for _, cmd := range []string{"reservations", "events"} {
		code, stdout, stderr := runCLI(t, "--socket", sock, cmd)
		if code != 0 {
			t.Fatalf("%s: exit %d: %s", cmd, code, stderr)
		}
		const columns = 12
		for _, l := range strings.Split(stdout, "\n") {
			if n := len([]rune(l)); n > columns*(maxCell+2) {
				t.Errorf("%s: a line of %d runes, more than %d columns of %d", cmd, n, columns, maxCell)
			}
		}
		if !strings.Contains(stdout, "…") {
			t.Errorf("%s: long values are not marked as cut", cmd)
		}
	}
}
