package store

import (
	"context"
	"database/sql"
	"fmt"

	"guardianproject.dev/ops/nix-builder-autoscaler/scaler"
)

// Intents returns the intents the reconciler has not applied yet, in the
// order they were recorded.
func (db *DB) Intents(ctx context.Context) ([]scaler.Intent, error) {
	rows, err := db.r.QueryContext(ctx, "SELECT id, kind, pool, slot, weight, at, actor FROM intents ORDER BY rowid")
	if err != nil {
		return nil, fmt.Errorf("list intents: %w", err)
	}
	defer rows.Close()
	var out []scaler.Intent
	for rows.Next() {
		var in scaler.Intent
		var kind string
		var at int64
		if err := rows.Scan(&in.ID, &kind, &in.Pool, &in.Slot, &in.Weight, &at, &in.Actor); err != nil {
			return nil, fmt.Errorf("list intents: %w", err)
		}
		in.Kind, in.At = scaler.IntentKind(kind), fromNanos(at)
		out = append(out, in)
	}
	if err := rows.Err(); err != nil {
		return nil, fmt.Errorf("list intents: %w", err)
	}
	return out, nil
}

// writeIntents records add and deletes the intents named by done, in tx.
// Recording an id that exists is an error: ids are random, so a clash is a
// bug, not a retry.
func writeIntents(ctx context.Context, tx *sql.Tx, add []scaler.Intent, done []string) error {
	for _, in := range add {
		if in.ID == "" {
			return fmt.Errorf("intent %s %s: empty id", in.Kind, in.Key())
		}
		if _, err := tx.ExecContext(ctx, "INSERT INTO intents (id, kind, pool, slot, weight, at, actor) VALUES (?, ?, ?, ?, ?, ?, ?)",
			in.ID, string(in.Kind), in.Pool, in.Slot, in.Weight, nanos(in.At), in.Actor); err != nil {
			return fmt.Errorf("record intent %s: %w", in.ID, err)
		}
	}
	for _, id := range done {
		if _, err := tx.ExecContext(ctx, "DELETE FROM intents WHERE id = ?", id); err != nil {
			return fmt.Errorf("delete intent %s: %w", id, err)
		}
	}
	return nil
}

// Generation counts the writes of slots, reservations and intents committed
// through this DB (Commit, CreateReservation, EnsureSlots) since it was
// opened; pruning ended reservations and old events does not count, as no
// reader of live rows sees it. A reader that saw Generation g
// before reading rows has seen every write counted up to g; the fleet view
// records it so that the API can tell whether the view already holds its
// own latest write.
func (db *DB) Generation() uint64 { return db.gen.Load() }
