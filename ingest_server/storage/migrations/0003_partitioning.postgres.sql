-- Plain PostgreSQL: events and readings become range-partitioned on time, one partition per
-- district-local day, with a DEFAULT partition so no timestamp is ever refused. Partitions
-- ahead of now and retention are the server's job (ingest_server/storage.py). Data already
-- stored is carried over: partitions are made for its days within retention, the rest lands in
-- DEFAULT.

-- Creates the daily partitions of tbl covering [lo, hi), moving any rows for those days out of
-- the DEFAULT partition first. Returns how many partitions it created.
CREATE OR REPLACE FUNCTION campus_ensure_partitions(tbl text, lo timestamptz, hi timestamptz)
RETURNS integer LANGUAGE plpgsql AS $$
DECLARE
    tz text := (SELECT district_tz FROM storage_config);
    d date := (lo AT TIME ZONE tz)::date;
    last date := ((hi - interval '1 microsecond') AT TIME ZONE tz)::date;
    p_lo timestamptz;
    p_hi timestamptz;
    part text;
    made integer := 0;
BEGIN
    IF last - d > 3660 THEN
        RAISE EXCEPTION 'refusing to create % partitions of % at once', last - d + 1, tbl;
    END IF;
    WHILE d <= last LOOP
        part := format('%s_p%s', tbl, to_char(d, 'YYYYMMDD'));
        IF to_regclass(part) IS NULL THEN
            p_lo := d::timestamp AT TIME ZONE tz;
            p_hi := (d + 1)::timestamp AT TIME ZONE tz;
            EXECUTE format('CREATE TABLE %I (LIKE %I INCLUDING DEFAULTS)', part, tbl);
            EXECUTE format(
                'WITH moved AS (DELETE FROM %I WHERE time >= $1 AND time < $2 RETURNING *)'
                ' INSERT INTO %I SELECT * FROM moved', tbl || '_default', part)
                USING p_lo, p_hi;
            EXECUTE format('ALTER TABLE %I ATTACH PARTITION %I FOR VALUES FROM (%L) TO (%L)',
                           tbl, part, p_lo, p_hi);
            made := made + 1;
        END IF;
        d := d + 1;
    END LOOP;
    RETURN made;
END
$$;

-- Drops the daily partitions of tbl that end at or before cutoff, and DEFAULT rows before it.
-- Returns how many partitions it dropped.
CREATE OR REPLACE FUNCTION campus_drop_partitions(tbl text, cutoff timestamptz)
RETURNS integer LANGUAGE plpgsql AS $$
DECLARE
    part record;
    dropped integer := 0;
BEGIN
    FOR part IN
        SELECT c.relname, pg_get_expr(c.relpartbound, c.oid) AS bound
        FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
        WHERE i.inhparent = tbl::regclass AND c.relname <> tbl || '_default'
    LOOP
        -- bound reads FOR VALUES FROM ('...') TO ('...')
        IF substring(part.bound FROM $re$TO \('([^']+)'\)$re$)::timestamptz <= cutoff THEN
            EXECUTE format('DROP TABLE %I', part.relname);
            dropped := dropped + 1;
        END IF;
    END LOOP;
    EXECUTE format('DELETE FROM %I WHERE time < $1', tbl || '_default') USING cutoff;
    RETURN dropped;
END
$$;

ALTER TABLE events RENAME TO events_v1;
ALTER INDEX events_device_seq_key RENAME TO events_v1_device_seq_key;
ALTER INDEX events_time_idx RENAME TO events_v1_time_idx;
ALTER INDEX events_school_time_idx RENAME TO events_v1_school_time_idx;
CREATE TABLE events (LIKE events_v1 INCLUDING DEFAULTS) PARTITION BY RANGE (time);
CREATE TABLE events_default PARTITION OF events DEFAULT;

ALTER TABLE readings RENAME TO readings_v1;
ALTER INDEX readings_metric_time_idx RENAME TO readings_v1_metric_time_idx;
ALTER INDEX readings_device_metric_time_idx RENAME TO readings_v1_device_metric_time_idx;
CREATE TABLE readings (LIKE readings_v1 INCLUDING DEFAULTS) PARTITION BY RANGE (time);
CREATE TABLE readings_default PARTITION OF readings DEFAULT;

DO $$
DECLARE
    t text;
    lo timestamptz;
    hi timestamptz;
    keep interval;
BEGIN
    FOREACH t IN ARRAY ARRAY['events', 'readings'] LOOP
        SELECT retain_for INTO keep FROM storage_policy WHERE table_name = t;
        EXECUTE format('SELECT min(time), max(time) FROM %I', t || '_v1') INTO lo, hi;
        -- Only days with data, within retention and not beyond the partitions made ahead:
        -- older or stranger timestamps go to DEFAULT.
        -- (greatest and least skip nulls: an empty table must stay empty of partitions)
        IF lo IS NOT NULL THEN
            lo := greatest(lo, now() - coalesce(keep, interval '100 years'));
            hi := least(hi, now() + interval '1 day');
        END IF;
        IF lo <= hi THEN
            PERFORM campus_ensure_partitions(t, lo, hi + interval '1 microsecond');
        END IF;
        PERFORM campus_ensure_partitions(
            t, now(), now() + (SELECT partitions_ahead FROM storage_config) * interval '1 day');
    END LOOP;
END
$$;

INSERT INTO events SELECT * FROM events_v1;
INSERT INTO readings SELECT * FROM readings_v1;
DROP TABLE events_v1;
DROP TABLE readings_v1;

-- A partitioned unique index must hold the partition key: identity stays (device_id, seq),
-- which the writer enforces (see writer.py); this index also makes that check an index probe.
CREATE UNIQUE INDEX events_device_seq_time_key ON events (device_id, seq, time);
CREATE INDEX events_time_idx ON events (time);
CREATE INDEX events_school_time_idx ON events (school_id, time);
-- Which days changed since the last rollup refresh; BRIN because received_at only grows.
CREATE INDEX events_received_at_brin ON events USING brin (received_at);
CREATE INDEX readings_metric_time_idx ON readings (metric, time);
CREATE INDEX readings_device_metric_time_idx ON readings (device_id, metric, time);
