package store

import (
	"context"
	"database/sql"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"time"

	"guardianproject.dev/ops/nix-builder-autoscaler/scaler"
)

const reservationColumns = `id, pool, system, features, owner, state, slot, lease_ns,
	created_at, expires_at, assigned_at, ended_at, reason, version, source`

// ReservationFilter selects reservations for Reservations. Zero fields do
// not filter.
type ReservationFilter struct {
	States []scaler.ReservationState
	Pool   string
	Limit  int // at most this many, newest first; 0 = all
	// After starts the list after this reservation (a page's last), in
	// the list's order: newest first by creation time, then by id
	// descending. Zero: from the newest.
	After ListKey
}

// ListKey is a position in a list ordered by creation time and id (newest
// first): the creation time and id of the item a page ended with.
type ListKey struct {
	CreatedAt time.Time
	ID        string
}

// IsZero reports whether k is the start of the list.
func (k ListKey) IsZero() bool { return k.CreatedAt.IsZero() && k.ID == "" }

// where is the condition for rows after k in newest-first order.
func (k ListKey) where() (string, []any) {
	at := nanos(k.CreatedAt)
	return "(created_at < ? OR (created_at = ? AND id < ?))", []any{at, at, k.ID}
}

// encodeFeatures stores features as a JSON array; nil and empty both become
// "[]" so the column never holds "null".
func encodeFeatures(fs []string) (string, error) {
	if len(fs) == 0 {
		return "[]", nil
	}
	b, err := json.Marshal(fs)
	if err != nil {
		return "", err
	}
	return string(b), nil
}

// decodeFeatures returns nil for no features, so a reservation reads back the
// same whether it was written with nil or an empty slice.
func decodeFeatures(s string) ([]string, error) {
	var fs []string
	if err := json.Unmarshal([]byte(s), &fs); err != nil {
		return nil, fmt.Errorf("features %q: %w", s, err)
	}
	if len(fs) == 0 {
		return nil, nil
	}
	return fs, nil
}

func scanReservation(sc scanner) (scaler.Reservation, error) {
	var r scaler.Reservation
	var features, state string
	var lease, created, expires, assigned, ended int64
	err := sc.Scan(&r.ID, &r.Pool, &r.System, &features, &r.Owner, &state, &r.Slot, &lease,
		&created, &expires, &assigned, &ended, &r.Reason, &r.Version, &r.Source)
	if err != nil {
		return scaler.Reservation{}, err
	}
	if r.Features, err = decodeFeatures(features); err != nil {
		return scaler.Reservation{}, fmt.Errorf("reservation %s: %w", r.ID, err)
	}
	r.State = scaler.ReservationState(state)
	r.Lease = time.Duration(lease)
	r.CreatedAt = fromNanos(created)
	r.ExpiresAt = fromNanos(expires)
	r.AssignedAt = fromNanos(assigned)
	r.EndedAt = fromNanos(ended)
	return r, nil
}

// LiveReservations returns the pending and assigned reservations, oldest
// first, which is the order the scaler serves them in.
func (db *DB) LiveReservations(ctx context.Context) ([]scaler.Reservation, error) {
	rs, err := db.queryReservations(ctx, "SELECT "+reservationColumns+
		" FROM reservations WHERE state IN (?, ?) ORDER BY created_at, id",
		string(scaler.Pending), string(scaler.Assigned))
	if err != nil {
		return nil, fmt.Errorf("list live reservations: %w", err)
	}
	return rs, nil
}

// Reservations returns the reservations f selects, newest first.
func (db *DB) Reservations(ctx context.Context, f ReservationFilter) ([]scaler.Reservation, error) {
	var where []string
	var args []any
	if len(f.States) > 0 {
		where = append(where, "state IN (?"+strings.Repeat(", ?", len(f.States)-1)+")")
		for _, s := range f.States {
			args = append(args, string(s))
		}
	}
	if f.Pool != "" {
		where = append(where, "pool = ?")
		args = append(args, f.Pool)
	}
	if !f.After.IsZero() {
		w, a := f.After.where()
		where = append(where, w)
		args = append(args, a...)
	}
	q := "SELECT " + reservationColumns + " FROM reservations"
	if len(where) > 0 {
		q += " WHERE " + strings.Join(where, " AND ")
	}
	q += " ORDER BY created_at DESC, id DESC"
	if f.Limit > 0 {
		q += " LIMIT ?"
		args = append(args, f.Limit)
	}
	rs, err := db.queryReservations(ctx, q, args...)
	if err != nil {
		return nil, fmt.Errorf("list reservations: %w", err)
	}
	return rs, nil
}

func (db *DB) queryReservations(ctx context.Context, q string, args ...any) ([]scaler.Reservation, error) {
	rows, err := db.r.QueryContext(ctx, q, args...)
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	var out []scaler.Reservation
	for rows.Next() {
		r, err := scanReservation(rows)
		if err != nil {
			return nil, err
		}
		out = append(out, r)
	}
	return out, rows.Err()
}

// Reservation returns one reservation, or an error wrapping scaler.ErrNotFound.
func (db *DB) Reservation(ctx context.Context, id string) (scaler.Reservation, error) {
	row := db.r.QueryRowContext(ctx, "SELECT "+reservationColumns+" FROM reservations WHERE id = ?", id)
	r, err := scanReservation(row)
	if errors.Is(err, sql.ErrNoRows) {
		return scaler.Reservation{}, fmt.Errorf("get reservation %s: %w", id, scaler.ErrNotFound)
	}
	if err != nil {
		return scaler.Reservation{}, fmt.Errorf("get reservation %s: %w", id, err)
	}
	return r, nil
}

// CreateReservation stores r with its creation event, unless a reservation
// with r.ID already exists: then it returns the stored one and created=false
// and writes nothing, because a client retries a POST whose answer it lost
// and must get the same reservation back, not a second one.
//
// The returned reservation is what a later read returns (times in UTC,
// Version 1), so the first answer and a retried answer are identical.
func (db *DB) CreateReservation(ctx context.Context, r scaler.Reservation, ev scaler.Event) (scaler.Reservation, bool, error) {
	if r.ID == "" {
		return scaler.Reservation{}, false, errors.New("create reservation: empty id")
	}
	features, err := encodeFeatures(r.Features)
	if err != nil {
		return scaler.Reservation{}, false, fmt.Errorf("create reservation %s: %w", r.ID, err)
	}
	tx, err := db.w.BeginTx(ctx, nil)
	if err != nil {
		return scaler.Reservation{}, false, fmt.Errorf("create reservation %s: %w", r.ID, err)
	}
	defer tx.Rollback()

	// The check and the insert share one write transaction, and writes are
	// serialized, so two concurrent creates of one id cannot both insert.
	existing, err := scanReservation(tx.QueryRowContext(ctx,
		"SELECT "+reservationColumns+" FROM reservations WHERE id = ?", r.ID))
	switch {
	case err == nil:
		return existing, false, nil
	case !errors.Is(err, sql.ErrNoRows):
		return scaler.Reservation{}, false, fmt.Errorf("create reservation %s: %w", r.ID, err)
	}

	r.Version = 1
	_, err = tx.ExecContext(ctx, "INSERT INTO reservations ("+reservationColumns+
		") VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
		r.ID, r.Pool, r.System, features, r.Owner, string(r.State), r.Slot, int64(r.Lease),
		nanos(r.CreatedAt), nanos(r.ExpiresAt), nanos(r.AssignedAt), nanos(r.EndedAt), r.Reason, r.Version, r.Source)
	if err != nil {
		return scaler.Reservation{}, false, fmt.Errorf("create reservation %s: %w", r.ID, err)
	}
	if err := arrive(ctx, tx, r); err != nil {
		return scaler.Reservation{}, false, fmt.Errorf("create reservation %s: %w", r.ID, err)
	}
	if err := db.insertEvents(ctx, tx, []scaler.Event{ev}); err != nil {
		return scaler.Reservation{}, false, fmt.Errorf("create reservation %s: %w", r.ID, err)
	}
	if err := tx.Commit(); err != nil {
		return scaler.Reservation{}, false, fmt.Errorf("create reservation %s: commit: %w", r.ID, err)
	}
	db.gen.Add(1)
	r.Features, _ = decodeFeatures(features)
	r.CreatedAt = fromNanos(nanos(r.CreatedAt))
	r.ExpiresAt = fromNanos(nanos(r.ExpiresAt))
	r.AssignedAt = fromNanos(nanos(r.AssignedAt))
	r.EndedAt = fromNanos(nanos(r.EndedAt))
	return r, true, nil
}

// Commit writes c atomically. Each slot and reservation is written only if
// its stored Version still equals the one in c; otherwise nothing is written
// and the error wraps scaler.ErrConflict, so the caller re-reads and
// re-decides instead of overwriting a concurrent change. On success the
// Version of every element of c.Slots and c.Reservations is incremented in
// place (the slices share the caller's arrays), so the caller's copies match
// the stored rows. The change is on disk when Commit returns.
func (db *DB) Commit(ctx context.Context, c scaler.Change) error {
	if len(c.Slots) == 0 && len(c.Reservations) == 0 && len(c.Events) == 0 && len(c.Intents) == 0 && len(c.DoneIntents) == 0 {
		return nil
	}
	tx, err := db.w.BeginTx(ctx, nil)
	if err != nil {
		return fmt.Errorf("commit: %w", err)
	}
	defer tx.Rollback()

	for _, s := range c.Slots {
		res, err := tx.ExecContext(ctx, `UPDATE slots SET state = ?, instance_id = ?, launch_id = ?,
			address = ?, instance_type = ?, market = ?, zone = ?, state_since = ?, last_active = ?, weight = ?,
			drain_reason = ?, version = version + 1
			WHERE pool = ? AND name = ? AND version = ?`,
			string(s.State), s.InstanceID, s.LaunchID, s.Address, s.InstanceType, s.Market, s.Zone,
			nanos(s.StateSince), nanos(s.LastActive), s.Weight, s.DrainReason,
			s.Pool, s.Name, s.Version)
		if err := checkUpdated(res, err); err != nil {
			return fmt.Errorf("commit: slot %s at version %d: %w", s.Key(), s.Version, err)
		}
	}
	for _, r := range c.Reservations {
		features, err := encodeFeatures(r.Features)
		if err != nil {
			return fmt.Errorf("commit: reservation %s: %w", r.ID, err)
		}
		res, err := tx.ExecContext(ctx, `UPDATE reservations SET pool = ?, system = ?, features = ?,
			owner = ?, state = ?, slot = ?, lease_ns = ?, created_at = ?, expires_at = ?,
			assigned_at = ?, ended_at = ?, reason = ?, version = version + 1
			WHERE id = ? AND version = ?`,
			r.Pool, r.System, features, r.Owner, string(r.State), r.Slot, int64(r.Lease),
			nanos(r.CreatedAt), nanos(r.ExpiresAt), nanos(r.AssignedAt), nanos(r.EndedAt), r.Reason,
			r.ID, r.Version)
		if err := checkUpdated(res, err); err != nil {
			return fmt.Errorf("commit: reservation %s at version %d: %w", r.ID, r.Version, err)
		}
	}
	if err := db.insertEvents(ctx, tx, c.Events); err != nil {
		return fmt.Errorf("commit: %w", err)
	}
	if err := writeIntents(ctx, tx, c.Intents, c.DoneIntents); err != nil {
		return fmt.Errorf("commit: %w", err)
	}
	if err := tx.Commit(); err != nil {
		return fmt.Errorf("commit: %w", err)
	}
	db.gen.Add(1)
	for i := range c.Slots {
		c.Slots[i].Version++
	}
	for i := range c.Reservations {
		c.Reservations[i].Version++
	}
	return nil
}

// checkUpdated turns "no row matched" into scaler.ErrConflict: the row was
// changed (or deleted) since the caller read it.
func checkUpdated(res sql.Result, err error) error {
	if err != nil {
		return err
	}
	n, err := res.RowsAffected()
	if err != nil {
		return err
	}
	if n == 0 {
		return fmt.Errorf("changed since read: %w", scaler.ErrConflict)
	}
	return nil
}
