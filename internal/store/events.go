package store

import (
	"context"
	"database/sql"
	"fmt"
	"strings"
	"time"

	"guardianproject.dev/ops/nix-builder-autoscaler/scaler"
)

// EventFilter selects events for Events. Zero fields do not filter.
type EventFilter struct {
	Since         time.Time // events at or after this time
	Pool          string
	Slot          string
	ReservationID string
	// Limit keeps only the newest Limit matching events (still returned
	// oldest first), like tail -n; 0 = all.
	Limit int
	// Before keeps only events logged before the one with this sequence
	// number (a page's oldest), so that pages walk back through the log;
	// 0 = up to the newest.
	Before int64
}

// LoggedEvent is an event with its sequence number in the log: the order
// events were written in, unique, never reused.
type LoggedEvent struct {
	Seq int64
	scaler.Event
}

// insertEvents appends evs inside tx. An event without a time gets the
// current one, so callers that do not care need not fetch a clock.
func (db *DB) insertEvents(ctx context.Context, tx *sql.Tx, evs []scaler.Event) error {
	if len(evs) == 0 {
		return nil
	}
	stmt, err := tx.PrepareContext(ctx, `INSERT INTO events
		(at, kind, pool, slot, instance_id, reservation_id, actor, reason)
		VALUES (?, ?, ?, ?, ?, ?, ?, ?)`)
	if err != nil {
		return fmt.Errorf("append events: %w", err)
	}
	defer stmt.Close()
	for _, ev := range evs {
		at := ev.At
		if at.IsZero() {
			at = db.clock.Now()
		}
		if _, err := stmt.ExecContext(ctx, at.UnixNano(), ev.Kind, ev.Pool, ev.Slot,
			ev.InstanceID, ev.ReservationID, ev.Actor, ev.Reason); err != nil {
			return fmt.Errorf("append event %s: %w", ev.Kind, err)
		}
	}
	return nil
}

// Events returns the events f selects, oldest first (in the order they were
// written).
func (db *DB) Events(ctx context.Context, f EventFilter) ([]scaler.Event, error) {
	les, err := db.LoggedEvents(ctx, f)
	if err != nil {
		return nil, err
	}
	var out []scaler.Event // nil when nothing matches, as before
	for _, le := range les {
		out = append(out, le.Event)
	}
	return out, nil
}

// LoggedEvents is Events with each event's sequence number.
func (db *DB) LoggedEvents(ctx context.Context, f EventFilter) ([]LoggedEvent, error) {
	var where []string
	var args []any
	if !f.Since.IsZero() {
		where = append(where, "at >= ?")
		args = append(args, f.Since.UnixNano())
	}
	for _, c := range []struct{ col, val string }{
		{"pool", f.Pool}, {"slot", f.Slot}, {"reservation_id", f.ReservationID},
	} {
		if c.val != "" {
			where = append(where, c.col+" = ?")
			args = append(args, c.val)
		}
	}
	if f.Before > 0 {
		where = append(where, "seq < ?")
		args = append(args, f.Before)
	}
	q := "SELECT seq, at, kind, pool, slot, instance_id, reservation_id, actor, reason FROM events"
	if len(where) > 0 {
		q += " WHERE " + strings.Join(where, " AND ")
	}
	if f.Limit > 0 {
		q = "SELECT * FROM (" + q + " ORDER BY seq DESC LIMIT ?) ORDER BY seq"
		args = append(args, f.Limit)
	} else {
		q += " ORDER BY seq"
	}
	rows, err := db.r.QueryContext(ctx, q, args...)
	if err != nil {
		return nil, fmt.Errorf("list events: %w", err)
	}
	defer rows.Close()
	var out []LoggedEvent
	for rows.Next() {
		var ev scaler.Event
		var seq, at int64
		if err := rows.Scan(&seq, &at, &ev.Kind, &ev.Pool, &ev.Slot, &ev.InstanceID,
			&ev.ReservationID, &ev.Actor, &ev.Reason); err != nil {
			return nil, fmt.Errorf("list events: %w", err)
		}
		ev.At = fromNanos(at)
		out = append(out, LoggedEvent{Seq: seq, Event: ev})
	}
	if err := rows.Err(); err != nil {
		return nil, fmt.Errorf("list events: %w", err)
	}
	return out, nil
}

// PruneEvents deletes events older than before and reports how many, so the
// append-only log does not grow without bound.
func (db *DB) PruneEvents(ctx context.Context, before time.Time) (int64, error) {
	res, err := db.w.ExecContext(ctx, "DELETE FROM events WHERE at < ?", nanos(before))
	if err != nil {
		return 0, fmt.Errorf("prune events: %w", err)
	}
	n, err := res.RowsAffected()
	if err != nil {
		return 0, fmt.Errorf("prune events: %w", err)
	}
	return n, nil
}

// PruneReservations deletes reservations that ended (released, failed or
// expired) before before. Live reservations are never pruned; a release
// tombstone goes with the others, long after its build.
func (db *DB) PruneReservations(ctx context.Context, before time.Time) (int64, error) {
	res, err := db.w.ExecContext(ctx, "DELETE FROM reservations WHERE state NOT IN ('pending', 'ready') AND ended_at < ?", nanos(before))
	if err != nil {
		return 0, fmt.Errorf("prune reservations: %w", err)
	}
	n, err := res.RowsAffected()
	if err != nil {
		return 0, fmt.Errorf("prune reservations: %w", err)
	}
	return n, nil
}
