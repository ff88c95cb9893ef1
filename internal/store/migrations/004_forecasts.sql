-- Demand forecasts (an evaluation started; its builds follow), and the
-- source a reservation comes from, which matches it to a forecast.
ALTER TABLE reservations ADD COLUMN source TEXT NOT NULL DEFAULT '';

CREATE TABLE forecasts (
	id           TEXT    NOT NULL PRIMARY KEY,
	source       TEXT    NOT NULL,
	pool         TEXT    NOT NULL,
	system       TEXT    NOT NULL DEFAULT '',
	features     TEXT    NOT NULL DEFAULT '[]',
	builds       INTEGER NOT NULL,
	estimated    INTEGER NOT NULL DEFAULT 0,
	arrived      INTEGER NOT NULL DEFAULT 0,
	created_at   INTEGER NOT NULL,
	expires_at   INTEGER NOT NULL,
	withdrawn_at INTEGER NOT NULL DEFAULT 0
) STRICT;

-- A new reservation looks up the latest forecast of its source and pool;
-- an estimate reads the last few of them.
CREATE INDEX forecasts_source ON forecasts (source, pool, created_at);
