package apiserver

import (
	"context"
	"fmt"
	"net/http"
	"net/url"
	"slices"
	"testing"
	"time"

	"guardianproject.dev/ops/nix-builder-autoscaler/internal/api"
	"guardianproject.dev/ops/nix-builder-autoscaler/internal/store"
	"guardianproject.dev/ops/nix-builder-autoscaler/scaler"
)

// walk follows a list's pages from path (with query q) and returns each
// page's answer, decoded into T, in order.
func walk[T any](t *testing.T, ts *testServer, path string, q url.Values, next func(T) string) (pages []T) {
	t.Helper()
	for range 1000 {
		a := ts.do("GET", path+"?"+q.Encode(), "")
		if a.status != http.StatusOK {
			t.Fatalf("GET %s?%s: %d %s", path, q.Encode(), a.status, a.body)
		}
		p := decodeStrict[T](t, a)
		pages = append(pages, p)
		c := next(p)
		if c == "" {
			return pages
		}
		q.Set("cursor", c)
	}
	t.Fatalf("GET %s: more than 1000 pages", path)
	return nil
}

// TestReservationPages: GET /v1/reservations answers DefaultPageSize
// reservations by default (it had no limit), newest first, and following
// next returns every reservation exactly once, also those created at the
// same instant, and none created after the walk began.
func TestReservationPages(t *testing.T) {
	ts := newTestServer(t)
	ctx := context.Background()
	const n = 2*api.DefaultPageSize + 37
	var want []string
	for i := range n {
		// Groups of reservations share a creation time: the order must
		// not depend on the time alone.
		at := serverT0.Add(time.Duration(i/10) * time.Second)
		id := fmt.Sprintf("p%03d", (i*7919)%n)
		r := scaler.Reservation{ID: id, Pool: "x86", System: "x86_64-linux", State: scaler.Released, Lease: time.Minute,
			CreatedAt: at, ExpiresAt: at.Add(time.Minute), EndedAt: at}
		if _, _, err := ts.db.CreateReservation(ctx, r, scaler.Event{At: at, Kind: scaler.EvCreated, ReservationID: id}); err != nil {
			t.Fatal(err)
		}
		want = append(want, id)
	}

	pages := walk(t, ts, "/v1/reservations", url.Values{}, func(l api.ReservationList) string { return l.Next })
	if len(pages[0].Reservations) != api.DefaultPageSize || pages[0].Next == "" {
		t.Fatalf("first page without limit: %d reservations, next %q; want %d and a next", len(pages[0].Reservations), pages[0].Next, api.DefaultPageSize)
	}
	var got []string
	var prev *api.Reservation
	for i, p := range pages {
		for _, r := range p.Reservations {
			if prev != nil && (r.CreatedAt.After(prev.CreatedAt) || r.CreatedAt.Equal(prev.CreatedAt) && r.ID > prev.ID) {
				t.Errorf("page %d: %s (%s) after %s (%s): not newest first", i, r.ID, r.CreatedAt, prev.ID, prev.CreatedAt)
			}
			got = append(got, r.ID)
			prev = &r
		}
		if i == len(pages)-1 && p.Next != "" {
			t.Errorf("last page has next %q", p.Next)
		}
	}
	slices.Sort(got)
	slices.Sort(want)
	if !slices.Equal(got, want) {
		t.Errorf("walking the pages gave %d ids (%d distinct), want each of %d once", len(got), len(slices.Compact(slices.Clone(got))), len(want))
	}

	// A walk with a filter and a small page, while new reservations arrive.
	q := url.Values{"limit": {"7"}, "state": {"released"}, "pool": {"x86"}}
	a := ts.do("GET", "/v1/reservations?"+q.Encode(), "")
	first := decodeStrict[api.ReservationList](t, a)
	ts.createReservation(`{"id":"late","system":"x86_64-linux"}`)
	q.Set("cursor", first.Next)
	rest := walk(t, ts, "/v1/reservations", q, func(l api.ReservationList) string { return l.Next })
	count := len(first.Reservations)
	for _, p := range rest {
		if len(p.Reservations) > 7 {
			t.Errorf("page of %d with limit 7", len(p.Reservations))
		}
		for _, r := range p.Reservations {
			if r.ID == "late" {
				t.Errorf("a reservation created after the first page showed up in a later one")
			}
		}
		count += len(p.Reservations)
	}
	if count != n {
		t.Errorf("filtered walk: %d reservations, want %d", count, n)
	}
}

// TestPageBounds: limit is bounded by MaxPageSize and a cursor must be one
// of the list it is given to.
func TestPageBounds(t *testing.T) {
	ts := newTestServer(t)
	for _, path := range []string{"/v1/reservations", "/v1/events", "/v1/forecasts"} {
		wantError(t, ts.do("GET", path+fmt.Sprintf("?limit=%d", api.MaxPageSize+1), ""), http.StatusBadRequest, api.CodeBadRequest,
			fmt.Sprintf("limit: must be an integer from 1 to %d", api.MaxPageSize))
		wantError(t, ts.do("GET", path+"?limit=-1", ""), http.StatusBadRequest, api.CodeBadRequest, "limit:")
		if a := ts.do("GET", path+fmt.Sprintf("?limit=%d", api.MaxPageSize), ""); a.status != http.StatusOK {
			t.Errorf("GET %s?limit=%d: %d %s", path, api.MaxPageSize, a.status, a.body)
		}
		for _, c := range []string{"garbage!", "eDox", encodeCursor("x", "1"), encodeCursor(cursorEvents, "abc"), encodeCursor(cursorReservations, "12")} {
			wantError(t, ts.do("GET", path+"?cursor="+url.QueryEscape(c), ""), http.StatusBadRequest, api.CodeBadRequest, "cursor: not a cursor of this list")
		}
	}
}

// TestEventPages: the event log in pages, newest page first and each page
// oldest first, walks every event once.
func TestEventPages(t *testing.T) {
	ts := newTestServer(t)
	ctx := context.Background()
	var evs []scaler.Event
	for i := range 250 {
		evs = append(evs, scaler.Event{At: serverT0.Add(time.Duration(i/3) * time.Second), Kind: scaler.EvDrained, Pool: "x86", Reason: fmt.Sprintf("e%03d", i)})
	}
	if err := ts.db.Commit(ctx, scaler.Change{Events: evs}); err != nil {
		t.Fatal(err)
	}
	all := ts.events(store.EventFilter{Pool: "x86"})
	pages := walk(t, ts, "/v1/events", url.Values{"pool": {"x86"}}, func(l api.EventList) string { return l.Next })
	if len(pages[0].Events) != api.DefaultPageSize || pages[0].Next == "" {
		t.Fatalf("first page without limit: %d events, next %q", len(pages[0].Events), pages[0].Next)
	}
	var got []string
	for i := len(pages) - 1; i >= 0; i-- {
		for _, e := range pages[i].Events {
			got = append(got, e.Reason)
		}
	}
	var want []string
	for _, e := range all {
		want = append(want, e.Reason)
	}
	if !slices.Equal(got, want) {
		t.Errorf("events walked back in pages and put together = %d events, want the %d of the log in order", len(got), len(want))
	}
}

// TestForecastPages: forecasts in pages, each once.
func TestForecastPages(t *testing.T) {
	ts := newTestServer(t)
	const n = 130
	for i := range n {
		ts.forecast("POST", "/v1/forecasts", fmt.Sprintf(`{"id":"f%03d","source":"s%d","pool":"x86","builds":1}`, i, i), http.StatusCreated)
		if i%4 == 0 {
			ts.clock.Advance(time.Second)
		}
	}
	pages := walk(t, ts, "/v1/forecasts", url.Values{"limit": {"40"}}, func(l api.ForecastList) string { return l.Next })
	seen := map[string]int{}
	for _, p := range pages {
		for _, f := range p.Forecasts {
			seen[f.ID]++
		}
	}
	if len(pages) != 4 || len(seen) != n {
		t.Errorf("%d pages with %d distinct forecasts, want 4 pages with %d", len(pages), len(seen), n)
	}
	for id, c := range seen {
		if c != 1 {
			t.Errorf("forecast %s seen %d times", id, c)
		}
	}
}
