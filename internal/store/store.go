// Package store keeps the daemon's state (slots, reservations, the event log)
// in SQLite, so a restarted daemon knows which instances it launched and
// which builds hold capacity.
//
// Every write is one transaction on a single connection: SQLite allows one
// writer at a time anyway, and serializing in the pool turns what would be
// SQLITE_BUSY retries into plain queueing. Reads use a separate read-only
// pool, which WAL lets run while a write is in progress.
package store

import (
	"context"
	"database/sql"
	"embed"
	"errors"
	"fmt"
	"io/fs"
	"net/url"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync/atomic"
	"time"

	_ "github.com/mattn/go-sqlite3" // registers the "sqlite3" driver

	"guardianproject.dev/ops/nix-builder-autoscaler/clock"
)

//go:embed migrations/*.sql
var migrationFS embed.FS

// DB is the daemon's state database. Its methods are safe for concurrent use.
type DB struct {
	clock clock.Clock
	path  string
	w     *sql.DB // one connection: all writes queue here
	r     *sql.DB // read-only pool
	// gen counts committed writes of slots, reservations and intents (see
	// Generation).
	gen atomic.Uint64
}

// Option changes how Open sets up the store.
type Option func(*DB)

// WithClock stamps migrations, and events given without a time, from c
// (default clock.Real).
func WithClock(c clock.Clock) Option { return func(db *DB) { db.clock = c } }

// Open opens (creating if needed) the database at path and brings its schema
// up to date.
func Open(ctx context.Context, path string, opts ...Option) (*DB, error) {
	if path == "" {
		return nil, errors.New("open store: empty path")
	}
	abs, err := filepath.Abs(path)
	if err != nil {
		return nil, fmt.Errorf("open store %s: %w", path, err)
	}
	if err := os.MkdirAll(filepath.Dir(abs), 0o750); err != nil {
		return nil, fmt.Errorf("open store %s: create directory: %w", path, err)
	}
	// SQLite would create the file world-readable (subject to umask); create
	// it ourselves so the state, and the -wal/-shm files SQLite derives their
	// mode from, stay readable by the daemon's group only.
	f, err := os.OpenFile(abs, os.O_RDWR|os.O_CREATE, 0o640)
	if err != nil {
		return nil, fmt.Errorf("open store %s: %w", path, err)
	}
	f.Close()

	// synchronous=FULL: in WAL mode NORMAL may lose the last commits on power
	// loss, and a reservation the API acknowledged must not vanish.
	// txlock=immediate takes the write lock at BEGIN, so a transaction that
	// reads before it writes can never fail to upgrade its lock.
	w, err := sql.Open("sqlite3", dsn(abs, url.Values{
		"_journal_mode": {"WAL"},
		"_synchronous":  {"FULL"},
		"_busy_timeout": {"5000"},
		"_foreign_keys": {"on"},
		"_txlock":       {"immediate"},
		// Reuse prepared statements: preparing every query was a sixth of
		// the CPU time of a create+release.
		"_stmt_cache_size": {"32"},
	}))
	if err != nil {
		return nil, fmt.Errorf("open store %s: %w", path, err)
	}
	w.SetMaxOpenConns(1)
	// Keep the one connection forever: reopening it would redo the pragmas
	// and drop SQLite's page cache for nothing.
	w.SetMaxIdleConns(1)
	w.SetConnMaxLifetime(0)
	w.SetConnMaxIdleTime(0)

	db := &DB{path: path, w: w, clock: clock.Real{}}
	for _, o := range opts {
		o(db)
	}
	if err := db.checkJournal(ctx); err != nil {
		w.Close()
		return nil, fmt.Errorf("open store %s: %w", path, err)
	}
	ms, err := migrations()
	if err != nil {
		w.Close()
		return nil, fmt.Errorf("open store %s: %w", path, err)
	}
	if err := db.migrate(ctx, ms); err != nil {
		w.Close()
		return nil, err // names the file already
	}

	// The read pool is opened after the writer switched the file to WAL, so
	// readers never see (or try to change) the rollback journal mode.
	r, err := sql.Open("sqlite3", dsn(abs, url.Values{
		"mode":             {"ro"},
		"_busy_timeout":    {"5000"},
		"_foreign_keys":    {"on"},
		"_stmt_cache_size": {"32"},
	}))
	if err != nil {
		w.Close()
		return nil, fmt.Errorf("open store %s: %w", path, err)
	}
	r.SetMaxOpenConns(4)
	r.SetMaxIdleConns(4)
	if err := r.PingContext(ctx); err != nil {
		r.Close()
		w.Close()
		return nil, fmt.Errorf("open store %s: read pool: %w", path, err)
	}
	db.r = r
	return db, nil
}

// dsn builds a file: URI, escaping the path so a '?' or '#' in it cannot be
// read as the start of the query.
func dsn(abs string, q url.Values) string {
	u := url.URL{Scheme: "file", Path: filepath.ToSlash(abs), RawQuery: q.Encode()}
	return u.String()
}

// checkJournal fails when WAL could not be enabled (e.g. on a network file
// system), because the read pool and the durability settings assume it.
func (db *DB) checkJournal(ctx context.Context) error {
	var mode string
	if err := db.w.QueryRowContext(ctx, "PRAGMA journal_mode").Scan(&mode); err != nil {
		return fmt.Errorf("read journal mode: %w", err)
	}
	if !strings.EqualFold(mode, "wal") {
		return fmt.Errorf("journal mode is %q, want wal (is the file system local?)", mode)
	}
	return nil
}

// Close closes the database. The write connection closes last so SQLite can
// checkpoint the WAL into the main file.
func (db *DB) Close() error {
	var errs []error
	if db.r != nil {
		if err := db.r.Close(); err != nil {
			errs = append(errs, fmt.Errorf("close store read pool: %w", err))
		}
	}
	if err := db.w.Close(); err != nil {
		errs = append(errs, fmt.Errorf("close store: %w", err))
	}
	return errors.Join(errs...)
}

// IntegrityCheck runs SQLite's full consistency check; the daemon can run it
// at start so a damaged file is reported before it is trusted.
func (db *DB) IntegrityCheck(ctx context.Context) error {
	rows, err := db.r.QueryContext(ctx, "PRAGMA integrity_check")
	if err != nil {
		return fmt.Errorf("integrity check: %w", err)
	}
	defer rows.Close()
	var msgs []string
	for rows.Next() {
		var m string
		if err := rows.Scan(&m); err != nil {
			return fmt.Errorf("integrity check: %w", err)
		}
		msgs = append(msgs, m)
	}
	if err := rows.Err(); err != nil {
		return fmt.Errorf("integrity check: %w", err)
	}
	if len(msgs) == 1 && msgs[0] == "ok" {
		return nil
	}
	if len(msgs) > 5 {
		msgs = append(msgs[:5], fmt.Sprintf("... (%d more)", len(msgs)-5))
	}
	return fmt.Errorf("integrity check of %s failed: %s", db.path, strings.Join(msgs, "; "))
}

type migration struct {
	version int
	name    string
	sql     string
}

// migrations returns the embedded migrations in version order. Their names
// are NNN_description.sql; the number is the schema version.
func migrations() ([]migration, error) {
	ents, err := fs.ReadDir(migrationFS, "migrations")
	if err != nil {
		return nil, fmt.Errorf("read migrations: %w", err)
	}
	var ms []migration
	for _, e := range ents {
		num, _, ok := strings.Cut(e.Name(), "_")
		v, err := strconv.Atoi(num)
		if !ok || err != nil || v <= 0 || !strings.HasSuffix(e.Name(), ".sql") {
			return nil, fmt.Errorf("migration %s: name must be NNN_description.sql", e.Name())
		}
		b, err := fs.ReadFile(migrationFS, "migrations/"+e.Name())
		if err != nil {
			return nil, fmt.Errorf("read migration %s: %w", e.Name(), err)
		}
		ms = append(ms, migration{version: v, name: e.Name(), sql: string(b)})
	}
	slices.SortFunc(ms, func(a, b migration) int { return a.version - b.version })
	for i := 1; i < len(ms); i++ {
		if ms[i].version == ms[i-1].version {
			return nil, fmt.Errorf("migrations %s and %s share version %d", ms[i-1].name, ms[i].name, ms[i].version)
		}
	}
	return ms, nil
}

// migrate applies ms (in version order), each in its own transaction,
// skipping those the file has seen, and refuses a file a newer binary has
// already migrated: an older binary would misread (or silently undo) what the
// newer one wrote.
func (db *DB) migrate(ctx context.Context, ms []migration) error {
	known := 0
	if len(ms) > 0 {
		known = ms[len(ms)-1].version
	}
	if _, err := db.w.ExecContext(ctx, `CREATE TABLE IF NOT EXISTS schema_migrations (
		version    INTEGER NOT NULL PRIMARY KEY,
		applied_at INTEGER NOT NULL
	)`); err != nil {
		return fmt.Errorf("migrate %s: create schema_migrations: %w", db.path, err)
	}
	var newest sql.NullInt64
	if err := db.w.QueryRowContext(ctx, "SELECT MAX(version) FROM schema_migrations").Scan(&newest); err != nil {
		return fmt.Errorf("migrate %s: read schema version: %w", db.path, err)
	}
	if int(newest.Int64) > known {
		return fmt.Errorf("database %s was written by a newer version (schema %d, this binary knows %d)", db.path, newest.Int64, known)
	}
	for _, m := range ms {
		if err := db.apply(ctx, m); err != nil {
			return fmt.Errorf("migrate %s: %w", db.path, err)
		}
	}
	return nil
}

func (db *DB) apply(ctx context.Context, m migration) error {
	tx, err := db.w.BeginTx(ctx, nil)
	if err != nil {
		return fmt.Errorf("migration %s: %w", m.name, err)
	}
	defer tx.Rollback()
	// Checked inside the transaction: another process may have applied it
	// since we looked.
	var n int
	if err := tx.QueryRowContext(ctx, "SELECT COUNT(*) FROM schema_migrations WHERE version = ?", m.version).Scan(&n); err != nil {
		return fmt.Errorf("migration %s: %w", m.name, err)
	}
	if n > 0 {
		return nil
	}
	if _, err := tx.ExecContext(ctx, m.sql); err != nil {
		return fmt.Errorf("migration %s: %w", m.name, err)
	}
	if _, err := tx.ExecContext(ctx, "INSERT INTO schema_migrations (version, applied_at) VALUES (?, ?)", m.version, db.clock.Now().UnixNano()); err != nil {
		return fmt.Errorf("migration %s: record: %w", m.name, err)
	}
	if err := tx.Commit(); err != nil {
		return fmt.Errorf("migration %s: commit: %w", m.name, err)
	}
	return nil
}

// nanos encodes a time for storage; the zero time is 0 so "never" reads back
// as the zero time rather than as year 1 overflowed into an odd instant.
func nanos(t time.Time) int64 {
	if t.IsZero() {
		return 0
	}
	return t.UnixNano()
}

// fromNanos decodes a stored time in UTC, so values read back compare equal
// whatever the daemon's local zone.
func fromNanos(n int64) time.Time {
	if n == 0 {
		return time.Time{}
	}
	return time.Unix(0, n).UTC()
}

// scanner is the Scan method shared by *sql.Row and *sql.Rows.
type scanner interface {
	Scan(dest ...any) error
}
