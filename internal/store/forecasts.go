package store

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"time"

	"guardianproject.dev/ops/nix-builder-autoscaler/scaler"
)

const forecastColumns = `id, source, pool, system, features, builds, estimated, arrived,
	created_at, expires_at, withdrawn_at`

func scanForecast(sc scanner) (scaler.Forecast, error) {
	var f scaler.Forecast
	var features string
	var estimated int
	var created, expires, withdrawn int64
	if err := sc.Scan(&f.ID, &f.Source, &f.Pool, &f.System, &features, &f.Builds, &estimated, &f.Arrived,
		&created, &expires, &withdrawn); err != nil {
		return scaler.Forecast{}, err
	}
	var err error
	if f.Features, err = decodeFeatures(features); err != nil {
		return scaler.Forecast{}, fmt.Errorf("forecast %s: %w", f.ID, err)
	}
	f.Estimated = estimated != 0
	f.CreatedAt, f.ExpiresAt, f.WithdrawnAt = fromNanos(created), fromNanos(expires), fromNanos(withdrawn)
	return f, nil
}

func (db *DB) queryForecasts(ctx context.Context, q string, args ...any) ([]scaler.Forecast, error) {
	rows, err := db.r.QueryContext(ctx, q, args...)
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	var out []scaler.Forecast
	for rows.Next() {
		f, err := scanForecast(rows)
		if err != nil {
			return nil, err
		}
		out = append(out, f)
	}
	return out, rows.Err()
}

// Forecasts returns the forecasts open or ended within
// scaler.ForecastRecent, oldest first: what the planner looks at.
func (db *DB) Forecasts(ctx context.Context) ([]scaler.Forecast, error) {
	since := nanos(db.clock.Now().Add(-scaler.ForecastRecent))
	fs, err := db.queryForecasts(ctx, "SELECT "+forecastColumns+
		" FROM forecasts WHERE expires_at > ? AND (withdrawn_at = 0 OR withdrawn_at > ?) ORDER BY created_at, id", since, since)
	if err != nil {
		return nil, fmt.Errorf("list forecasts: %w", err)
	}
	return fs, nil
}

// RecentForecasts returns at most limit forecasts, newest first, open or
// ended: what an operator lists.
func (db *DB) RecentForecasts(ctx context.Context, limit int) ([]scaler.Forecast, error) {
	return db.ForecastPage(ctx, limit, ListKey{})
}

// ForecastPage returns at most limit forecasts after the one at after (zero:
// from the newest), newest first by creation time, then by id descending.
func (db *DB) ForecastPage(ctx context.Context, limit int, after ListKey) ([]scaler.Forecast, error) {
	q, args := "SELECT "+forecastColumns+" FROM forecasts", []any{}
	if !after.IsZero() {
		w, a := after.where()
		q, args = q+" WHERE "+w, a
	}
	fs, err := db.queryForecasts(ctx, q+" ORDER BY created_at DESC, id DESC LIMIT ?", append(args, limit)...)
	if err != nil {
		return nil, fmt.Errorf("list forecasts: %w", err)
	}
	return fs, nil
}

// Forecast returns one forecast, or an error wrapping scaler.ErrNotFound.
func (db *DB) Forecast(ctx context.Context, id string) (scaler.Forecast, error) {
	f, err := scanForecast(db.r.QueryRowContext(ctx, "SELECT "+forecastColumns+" FROM forecasts WHERE id = ?", id))
	if errors.Is(err, sql.ErrNoRows) {
		return scaler.Forecast{}, fmt.Errorf("get forecast %s: %w", id, scaler.ErrNotFound)
	}
	if err != nil {
		return scaler.Forecast{}, fmt.Errorf("get forecast %s: %w", id, err)
	}
	return f, nil
}

// ForecastHistory returns how many reservations arrived after each of the
// last n forecasts of source ("": any) in pool, newest first
// (scaler.Estimate).
func (db *DB) ForecastHistory(ctx context.Context, source, pool string, n int) ([]int, error) {
	rows, err := db.r.QueryContext(ctx, "SELECT arrived FROM forecasts WHERE (? = '' OR source = ?) AND pool = ? ORDER BY created_at DESC LIMIT ?",
		source, source, pool, n)
	if err != nil {
		return nil, fmt.Errorf("forecast history: %w", err)
	}
	defer rows.Close()
	var out []int
	for rows.Next() {
		var a int
		if err := rows.Scan(&a); err != nil {
			return nil, fmt.Errorf("forecast history: %w", err)
		}
		out = append(out, a)
	}
	return out, rows.Err()
}

// CreateForecast stores f with its event, unless a forecast with f.ID
// exists: then it returns the stored one and created=false, and writes
// nothing (a client retrying a POST gets the same forecast back).
func (db *DB) CreateForecast(ctx context.Context, f scaler.Forecast, ev scaler.Event) (scaler.Forecast, bool, error) {
	if f.ID == "" {
		return scaler.Forecast{}, false, errors.New("create forecast: empty id")
	}
	features, err := encodeFeatures(f.Features)
	if err != nil {
		return scaler.Forecast{}, false, fmt.Errorf("create forecast %s: %w", f.ID, err)
	}
	tx, err := db.w.BeginTx(ctx, nil)
	if err != nil {
		return scaler.Forecast{}, false, fmt.Errorf("create forecast %s: %w", f.ID, err)
	}
	defer tx.Rollback()
	existing, err := scanForecast(tx.QueryRowContext(ctx, "SELECT "+forecastColumns+" FROM forecasts WHERE id = ?", f.ID))
	switch {
	case err == nil:
		return existing, false, nil
	case !errors.Is(err, sql.ErrNoRows):
		return scaler.Forecast{}, false, fmt.Errorf("create forecast %s: %w", f.ID, err)
	}
	estimated := 0
	if f.Estimated {
		estimated = 1
	}
	if _, err := tx.ExecContext(ctx, "INSERT INTO forecasts ("+forecastColumns+") VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
		f.ID, f.Source, f.Pool, f.System, features, f.Builds, estimated, f.Arrived,
		nanos(f.CreatedAt), nanos(f.ExpiresAt), nanos(f.WithdrawnAt)); err != nil {
		return scaler.Forecast{}, false, fmt.Errorf("create forecast %s: %w", f.ID, err)
	}
	if err := db.insertEvents(ctx, tx, []scaler.Event{ev}); err != nil {
		return scaler.Forecast{}, false, fmt.Errorf("create forecast %s: %w", f.ID, err)
	}
	if err := tx.Commit(); err != nil {
		return scaler.Forecast{}, false, fmt.Errorf("create forecast %s: commit: %w", f.ID, err)
	}
	db.gen.Add(1)
	f.Features, _ = decodeFeatures(features)
	f.CreatedAt, f.ExpiresAt, f.WithdrawnAt = fromNanos(nanos(f.CreatedAt)), fromNanos(nanos(f.ExpiresAt)), fromNanos(nanos(f.WithdrawnAt))
	return f, true, nil
}

// WithdrawForecast marks the forecast withdrawn (once: withdrawing again
// changes nothing) with its event, and returns it.
func (db *DB) WithdrawForecast(ctx context.Context, id string, ev scaler.Event) (scaler.Forecast, error) {
	tx, err := db.w.BeginTx(ctx, nil)
	if err != nil {
		return scaler.Forecast{}, fmt.Errorf("withdraw forecast %s: %w", id, err)
	}
	defer tx.Rollback()
	res, err := tx.ExecContext(ctx, "UPDATE forecasts SET withdrawn_at = ? WHERE id = ? AND withdrawn_at = 0", nanos(ev.At), id)
	if err != nil {
		return scaler.Forecast{}, fmt.Errorf("withdraw forecast %s: %w", id, err)
	}
	changed, err := res.RowsAffected()
	if err != nil {
		return scaler.Forecast{}, fmt.Errorf("withdraw forecast %s: %w", id, err)
	}
	f, err := scanForecast(tx.QueryRowContext(ctx, "SELECT "+forecastColumns+" FROM forecasts WHERE id = ?", id))
	if errors.Is(err, sql.ErrNoRows) {
		return scaler.Forecast{}, fmt.Errorf("withdraw forecast %s: %w", id, scaler.ErrNotFound)
	}
	if err != nil {
		return scaler.Forecast{}, fmt.Errorf("withdraw forecast %s: %w", id, err)
	}
	if changed == 0 {
		return f, nil
	}
	if err := db.insertEvents(ctx, tx, []scaler.Event{ev}); err != nil {
		return scaler.Forecast{}, fmt.Errorf("withdraw forecast %s: %w", id, err)
	}
	if err := tx.Commit(); err != nil {
		return scaler.Forecast{}, fmt.Errorf("withdraw forecast %s: commit: %w", id, err)
	}
	db.gen.Add(1)
	return f, nil
}

// arrive counts a new reservation, in tx, against the forecast of its
// source and pool that scaler.ForecastFor picks: the oldest still
// expecting builds, else the latest.
func arrive(ctx context.Context, tx *sql.Tx, r scaler.Reservation) error {
	if r.Source == "" {
		return nil
	}
	at := nanos(r.CreatedAt)
	_, err := tx.ExecContext(ctx, `UPDATE forecasts SET arrived = arrived + 1 WHERE id = (
		SELECT id FROM forecasts WHERE source = ? AND pool = ? AND created_at <= ? AND expires_at > ?
		ORDER BY arrived < builds DESC, CASE WHEN arrived < builds THEN created_at ELSE -created_at END, id LIMIT 1)`,
		r.Source, r.Pool, at, at)
	if err != nil {
		return fmt.Errorf("count it against its forecast: %w", err)
	}
	return nil
}

// PruneForecasts deletes forecasts made before before, and returns how
// many it deleted; estimates read only the last few of each source.
func (db *DB) PruneForecasts(ctx context.Context, before time.Time) (int64, error) {
	res, err := db.w.ExecContext(ctx, "DELETE FROM forecasts WHERE created_at < ?", nanos(before))
	if err != nil {
		return 0, fmt.Errorf("prune forecasts: %w", err)
	}
	return res.RowsAffected()
}
