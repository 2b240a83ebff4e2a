-- TimescaleDB: the counting rollups are continuous aggregates (real-time: recent rows not yet
-- materialised are added at query time), behind views with the contract's names and columns.
-- The district time zone is read once, here: changing it means recreating these views.

CREATE OR REPLACE FUNCTION campus_refresh_simple(lo date, hi date)
RETURNS void LANGUAGE sql AS $$ SELECT $$;

DO $$
DECLARE
    tz text := (SELECT district_tz FROM storage_config);
BEGIN
    EXECUTE format($q$
        CREATE MATERIALIZED VIEW card_taps_daily_agg
        WITH (timescaledb.continuous, timescaledb.materialized_only = false) AS
        SELECT time_bucket('1 day', time, %L) AS bucket, school_id, device_id,
               count(*) AS taps
        FROM events WHERE type = 'card.tap'
        GROUP BY 1, 2, 3 WITH NO DATA$q$, tz);
    EXECUTE format($q$
        CREATE VIEW card_taps_daily AS
        SELECT (bucket AT TIME ZONE %L)::date AS day, school_id, device_id, taps
        FROM card_taps_daily_agg$q$, tz);

    EXECUTE format($q$
        CREATE MATERIALIZED VIEW attendance_daily_agg
        WITH (timescaledb.continuous, timescaledb.materialized_only = false) AS
        SELECT time_bucket('1 day', time, %L) AS bucket, school_id,
               data->>'class_id' AS class_id, count(*) AS checkins,
               count(*) FILTER (WHERE coalesce(data->>'status', 'on_time') = 'on_time')
                   AS on_time,
               count(*) FILTER (WHERE data->>'status' = 'late') AS late,
               count(*) FILTER (WHERE data->>'status' = 'outside_period') AS outside_period
        FROM events WHERE type = 'attendance.checkin'
        GROUP BY 1, 2, 3 WITH NO DATA$q$, tz);
    EXECUTE format($q$
        CREATE VIEW attendance_daily AS
        SELECT (bucket AT TIME ZONE %L)::date AS day, school_id, class_id, checkins, on_time,
               late, outside_period
        FROM attendance_daily_agg$q$, tz);
END
$$;

CREATE MATERIALIZED VIEW env_5min_agg
WITH (timescaledb.continuous, timescaledb.materialized_only = false) AS
SELECT time_bucket('5 minutes', time) AS bucket, school_id, device_id, metric,
       avg(value) AS avg, min(value) AS min, max(value) AS max, count(*) AS samples
FROM readings
GROUP BY 1, 2, 3, 4 WITH NO DATA;
CREATE VIEW env_5min AS
SELECT bucket, school_id, device_id, metric, avg, min, max, samples FROM env_5min_agg;

-- Materialise the last 30 days every 15 minutes; newer rows are real-time. A bucket that is
-- below the materialisation watermark but outside this window is NOT shown from raw rows, so
-- the window must cover backlog replays (agents buffer for days); older late data needs a
-- manual refresh_continuous_aggregate. Retention drops raw chunks, not these.
SELECT add_continuous_aggregate_policy(v, start_offset => interval '30 days',
                                       end_offset => interval '1 hour',
                                       schedule_interval => interval '15 minutes')
FROM unnest(ARRAY['card_taps_daily_agg', 'attendance_daily_agg', 'env_5min_agg']) AS v;
