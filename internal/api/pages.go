package api

import "context"

// A list endpoint answers one page at a time (DefaultPageSize items, at
// most MaxPageSize), with a cursor to the next page in Next. These follow
// the cursors for callers that want more than a page; each page is a
// bounded answer, so no single answer exceeds the client's size limit.

// pageSize is the limit of the next request of a walk that wants n items
// in all (n <= 0: every item) and has got so far.
func pageSize(n, got int) int {
	if n <= 0 {
		return MaxPageSize
	}
	return min(n-got, MaxPageSize)
}

// ListReservations lists up to n reservations (n <= 0: all), newest first,
// from q.Cursor on (q.Limit is ignored), following the daemon's pages. The
// result's Next continues after the last one it has, or is empty when
// there are no more.
func (c *Client) ListReservations(ctx context.Context, q ReservationQuery, n int) (ReservationList, error) {
	out := ReservationList{Reservations: []Reservation{}}
	for {
		q.Limit = pageSize(n, len(out.Reservations))
		l, err := c.Reservations(ctx, q)
		if err != nil {
			return out, err
		}
		out.Reservations = append(out.Reservations, l.Reservations...)
		out.Next = l.Next
		if l.Next == "" || n > 0 && len(out.Reservations) >= n {
			return out, nil
		}
		q.Cursor = l.Next
	}
}

// ListEvents returns up to n of the newest events that match (n <= 0:
// all), oldest first, before q.Cursor (q.Limit is ignored), following the
// daemon's pages back through the log. The result's Next continues with
// the events before the oldest it has, or is empty when there are none.
func (c *Client) ListEvents(ctx context.Context, q EventQuery, n int) (EventList, error) {
	var pages [][]Event
	got := 0
	var next string
	for {
		q.Limit = pageSize(n, got)
		l, err := c.Events(ctx, q)
		if err != nil {
			return EventList{Events: []Event{}}, err
		}
		pages = append(pages, l.Events)
		got += len(l.Events)
		next = l.Next
		if l.Next == "" || n > 0 && got >= n {
			break
		}
		q.Cursor = l.Next
	}
	// Each page is older than the one before it.
	out := EventList{Events: make([]Event, 0, got), Next: next}
	for i := len(pages) - 1; i >= 0; i-- {
		out.Events = append(out.Events, pages[i]...)
	}
	return out, nil
}
