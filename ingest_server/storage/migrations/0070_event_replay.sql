-- The uplink contract's `replay: true` (backlog an agent sends after an outage) stored per event,
-- so backlog can be told from live data without comparing times (API and export filter on it).
-- One file for both backends: on plain PostgreSQL the column is added to the partitioned parent
-- and every partition (new daily partitions are made LIKE events, so they get it too); on
-- TimescaleDB to the hypertable and its chunks, compressed ones included (those read the default;
-- filter them with `replay IS NOT DISTINCT FROM x`, not `replay = x`: TimescaleDB 2.23's
-- vectorised filter fails the latter there, see web/api/data.py where()). A constant default on
-- PostgreSQL 11+ is metadata only: no table rewrite, no long lock on a big events table; rows
-- stored before this migration read as false (they were not told apart).
ALTER TABLE events ADD COLUMN IF NOT EXISTS replay boolean NOT NULL DEFAULT false;
