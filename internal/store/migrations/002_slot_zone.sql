-- Where each builder runs (availability zone), recorded with its type and
-- market so that costs can be traced per launch.
ALTER TABLE slots ADD COLUMN zone TEXT NOT NULL DEFAULT '';
