package api_test

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"net/http/httptest"
	"slices"
	"strconv"
	"sync"
	"testing"
	"time"

	"guardianproject.dev/ops/nix-builder-autoscaler/internal/api"
)

// pagingFake serves n reservations (newest first, ids r<i>, i descending)
// and n events (e<i>, oldest first) in pages, the daemon's way: a cursor
// is the index to go on from; it records each request's limit.
type pagingFake struct {
	n      int
	mu     sync.Mutex
	limits []int
}

func (f *pagingFake) limit(w http.ResponseWriter, r *http.Request) (int, bool) {
	l := api.DefaultPageSize
	if s := r.URL.Query().Get("limit"); s != "" {
		l, _ = strconv.Atoi(s)
	}
	f.mu.Lock()
	f.limits = append(f.limits, l)
	f.mu.Unlock()
	if l < 1 || l > api.MaxPageSize {
		w.WriteHeader(http.StatusBadRequest)
		return 0, false
	}
	return l, true
}

func (f *pagingFake) handler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /v1/reservations", func(w http.ResponseWriter, r *http.Request) {
		l, ok := f.limit(w, r)
		if !ok {
			return
		}
		from, _ := strconv.Atoi(r.URL.Query().Get("cursor")) // 0: the newest
		out := api.ReservationList{Reservations: []api.Reservation{}}
		i := from
		for ; i < f.n && len(out.Reservations) < l; i++ {
			out.Reservations = append(out.Reservations, api.Reservation{ID: fmt.Sprintf("r%d", f.n-1-i)})
		}
		if i < f.n {
			out.Next = strconv.Itoa(i)
		}
		json.NewEncoder(w).Encode(out)
	})
	mux.HandleFunc("GET /v1/events", func(w http.ResponseWriter, r *http.Request) {
		l, ok := f.limit(w, r)
		if !ok {
			return
		}
		end := f.n // events before index end
		if c := r.URL.Query().Get("cursor"); c != "" {
			end, _ = strconv.Atoi(c)
		}
		start := max(0, end-l)
		out := api.EventList{Events: []api.Event{}}
		for i := start; i < end; i++ {
			out.Events = append(out.Events, api.Event{Kind: fmt.Sprintf("e%d", i)})
		}
		if start > 0 {
			out.Next = strconv.Itoa(start)
		}
		json.NewEncoder(w).Encode(out)
	})
	return mux
}

// TestClientFollowsPages: ListReservations and ListEvents follow the
// cursors: all items once in order, or the n wanted, never asking for a
// page above MaxPageSize.
func TestClientFollowsPages(t *testing.T) {
	f := &pagingFake{n: 2*api.MaxPageSize + 150}
	srv := httptest.NewServer(f.handler())
	t.Cleanup(srv.Close)
	c := api.NewHTTPClient(srv.URL, "")
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()

	all, err := c.ListReservations(ctx, api.ReservationQuery{}, 0)
	if err != nil {
		t.Fatal(err)
	}
	if len(all.Reservations) != f.n || all.Next != "" {
		t.Fatalf("all reservations: %d, next %q; want %d and no next", len(all.Reservations), all.Next, f.n)
	}
	for i, r := range all.Reservations {
		if want := fmt.Sprintf("r%d", f.n-1-i); r.ID != want {
			t.Fatalf("reservation %d is %s, want %s", i, r.ID, want)
		}
	}
	some, err := c.ListReservations(ctx, api.ReservationQuery{}, api.MaxPageSize+5)
	if err != nil {
		t.Fatal(err)
	}
	if len(some.Reservations) != api.MaxPageSize+5 || some.Next == "" {
		t.Errorf("%d reservations: got %d, next %q; want them and a next", api.MaxPageSize+5, len(some.Reservations), some.Next)
	}

	evs, err := c.ListEvents(ctx, api.EventQuery{}, 0)
	if err != nil {
		t.Fatal(err)
	}
	var kinds []string
	for _, e := range evs.Events {
		kinds = append(kinds, e.Kind)
	}
	var want []string
	for i := range f.n {
		want = append(want, fmt.Sprintf("e%d", i))
	}
	if !slices.Equal(kinds, want) || evs.Next != "" {
		t.Errorf("all events: %d in this order %v..., want %d oldest first", len(kinds), kinds[:min(3, len(kinds))], f.n)
	}
	last, err := c.ListEvents(ctx, api.EventQuery{}, 3)
	if err != nil {
		t.Fatal(err)
	}
	if len(last.Events) != 3 || last.Events[2].Kind != fmt.Sprintf("e%d", f.n-1) || last.Next == "" {
		t.Errorf("last 3 events: %+v next %q", last.Events, last.Next)
	}
	for _, l := range f.limits {
		if l > api.MaxPageSize {
			t.Errorf("asked for a page of %d", l)
		}
	}
}
