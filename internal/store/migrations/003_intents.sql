-- Operator and client requests to change a slot (drain, undrain, weight,
-- released), recorded by the API and applied, then deleted, by the
-- reconciler: the only writer of slot rows. Applied in insertion order.
CREATE TABLE intents (
	id     TEXT    NOT NULL PRIMARY KEY,
	kind   TEXT    NOT NULL,
	pool   TEXT    NOT NULL,
	slot   TEXT    NOT NULL,
	weight INTEGER NOT NULL DEFAULT 0,
	at     INTEGER NOT NULL,
	actor  TEXT    NOT NULL DEFAULT ''
) STRICT;
