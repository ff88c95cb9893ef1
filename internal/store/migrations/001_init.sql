-- Times are unix nanoseconds, 0 for "never"; STRICT so a wrong type from a
-- future bug fails loudly instead of being stored and misread later.

CREATE TABLE slots (
	pool          TEXT    NOT NULL,
	name          TEXT    NOT NULL,
	state         TEXT    NOT NULL,
	instance_id   TEXT    NOT NULL DEFAULT '',
	launch_id     TEXT    NOT NULL DEFAULT '',
	address       TEXT    NOT NULL DEFAULT '',
	instance_type TEXT    NOT NULL DEFAULT '',
	market        TEXT    NOT NULL DEFAULT '',
	state_since   INTEGER NOT NULL DEFAULT 0,
	last_active   INTEGER NOT NULL DEFAULT 0,
	weight        INTEGER NOT NULL,
	drain_reason  TEXT    NOT NULL DEFAULT '',
	version       INTEGER NOT NULL,
	PRIMARY KEY (pool, name)
) STRICT;

CREATE TABLE reservations (
	id          TEXT    NOT NULL PRIMARY KEY,
	pool        TEXT    NOT NULL,
	system      TEXT    NOT NULL,
	features    TEXT    NOT NULL DEFAULT '[]',
	owner       TEXT    NOT NULL DEFAULT '',
	state       TEXT    NOT NULL,
	slot        TEXT    NOT NULL DEFAULT '',
	lease_ns    INTEGER NOT NULL DEFAULT 0,
	created_at  INTEGER NOT NULL DEFAULT 0,
	expires_at  INTEGER NOT NULL DEFAULT 0,
	assigned_at INTEGER NOT NULL DEFAULT 0,
	ended_at    INTEGER NOT NULL DEFAULT 0,
	reason      TEXT    NOT NULL DEFAULT '',
	version     INTEGER NOT NULL
) STRICT;

-- The reconciler reads live reservations on every pass.
CREATE INDEX reservations_state ON reservations (state);
-- Operator listings are newest first with a limit, over a table that keeps
-- every ended reservation.
CREATE INDEX reservations_created ON reservations (created_at);

CREATE TABLE events (
	seq            INTEGER PRIMARY KEY AUTOINCREMENT,
	at             INTEGER NOT NULL,
	kind           TEXT    NOT NULL,
	pool           TEXT    NOT NULL DEFAULT '',
	slot           TEXT    NOT NULL DEFAULT '',
	instance_id    TEXT    NOT NULL DEFAULT '',
	reservation_id TEXT    NOT NULL DEFAULT '',
	actor          TEXT    NOT NULL DEFAULT '',
	reason         TEXT    NOT NULL DEFAULT ''
) STRICT;

-- Since filters and pruning both select by time.
CREATE INDEX events_at ON events (at);
