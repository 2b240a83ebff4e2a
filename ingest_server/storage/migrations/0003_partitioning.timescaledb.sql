-- TimescaleDB: events and readings become hypertables (chunk width, compression and retention
-- from storage_policy; change them later with ingest_server.storage.set_policy). Data already
-- stored is carried over.

CREATE EXTENSION IF NOT EXISTS timescaledb;

ALTER TABLE events RENAME TO events_v1;
ALTER INDEX events_device_seq_key RENAME TO events_v1_device_seq_key;
ALTER INDEX events_time_idx RENAME TO events_v1_time_idx;
ALTER INDEX events_school_time_idx RENAME TO events_v1_school_time_idx;
CREATE TABLE events (LIKE events_v1 INCLUDING DEFAULTS);

ALTER TABLE readings RENAME TO readings_v1;
ALTER INDEX readings_metric_time_idx RENAME TO readings_v1_metric_time_idx;
ALTER INDEX readings_device_metric_time_idx RENAME TO readings_v1_device_metric_time_idx;
CREATE TABLE readings (LIKE readings_v1 INCLUDING DEFAULTS);

SELECT create_hypertable(t, by_range('time', p.chunk_interval), create_default_indexes => false)
FROM (VALUES ('events'), ('readings')) AS v (t) JOIN storage_policy p ON p.table_name = v.t;

-- A hypertable's unique index must hold the time column: identity stays (device_id, seq),
-- which the writer enforces (see writer.py); this index also makes that check an index probe.
CREATE UNIQUE INDEX events_device_seq_time_key ON events (device_id, seq, time);
CREATE INDEX events_time_idx ON events (time);
CREATE INDEX events_school_time_idx ON events (school_id, time);
-- Which days changed since the last rollup refresh; BRIN because received_at only grows.
CREATE INDEX events_received_at_brin ON events USING brin (received_at);
CREATE INDEX readings_metric_time_idx ON readings (metric, time);
CREATE INDEX readings_device_metric_time_idx ON readings (device_id, metric, time);

INSERT INTO events SELECT * FROM events_v1;
INSERT INTO readings SELECT * FROM readings_v1;
DROP TABLE events_v1;
DROP TABLE readings_v1;

-- Compressed per device, newest first: queries read one device's recent history.
ALTER TABLE events SET (timescaledb.compress, timescaledb.compress_segmentby = 'device_id',
                        timescaledb.compress_orderby = 'time DESC, seq DESC');
ALTER TABLE readings SET (timescaledb.compress,
                          timescaledb.compress_segmentby = 'device_id, metric',
                          timescaledb.compress_orderby = 'time DESC');

SELECT add_compression_policy(table_name::regclass, compress_after)
FROM storage_policy WHERE table_name IN ('events', 'readings') AND compress_after IS NOT NULL;
SELECT add_retention_policy(table_name::regclass, retain_for)
FROM storage_policy WHERE table_name IN ('events', 'readings') AND retain_for IS NOT NULL;
