-- Plain PostgreSQL: the counting rollups are tables too, refreshed with the others.

CREATE TABLE IF NOT EXISTS card_taps_daily (
    day date NOT NULL, school_id text NOT NULL, device_id text NOT NULL, taps bigint NOT NULL,
    PRIMARY KEY (day, school_id, device_id)
);
CREATE TABLE IF NOT EXISTS attendance_daily (
    day date NOT NULL, school_id text NOT NULL, class_id text,
    checkins bigint NOT NULL, on_time bigint NOT NULL, late bigint NOT NULL,
    outside_period bigint NOT NULL
);
CREATE INDEX IF NOT EXISTS attendance_daily_day_idx ON attendance_daily (day, school_id);
CREATE TABLE IF NOT EXISTS env_5min (
    bucket timestamptz NOT NULL, school_id text NOT NULL, device_id text NOT NULL,
    metric text NOT NULL, avg double precision NOT NULL, min double precision NOT NULL,
    max double precision NOT NULL, samples bigint NOT NULL,
    PRIMARY KEY (bucket, school_id, device_id, metric)
);

CREATE OR REPLACE FUNCTION campus_refresh_simple(lo date, hi date)
RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    tz text := (SELECT district_tz FROM storage_config);
    t0 timestamptz := lo::timestamp AT TIME ZONE tz;
    t1 timestamptz := (hi + 1)::timestamp AT TIME ZONE tz;
BEGIN
    DELETE FROM card_taps_daily WHERE day BETWEEN lo AND hi;
    INSERT INTO card_taps_daily (day, school_id, device_id, taps)
    SELECT (time AT TIME ZONE tz)::date, school_id, device_id, count(*)
    FROM events WHERE type = 'card.tap' AND time >= t0 AND time < t1
    GROUP BY 1, 2, 3;

    DELETE FROM attendance_daily WHERE day BETWEEN lo AND hi;
    INSERT INTO attendance_daily (day, school_id, class_id, checkins, on_time, late,
                                  outside_period)
    SELECT (time AT TIME ZONE tz)::date, school_id, data->>'class_id', count(*),
           count(*) FILTER (WHERE coalesce(data->>'status', 'on_time') = 'on_time'),
           count(*) FILTER (WHERE data->>'status' = 'late'),
           count(*) FILTER (WHERE data->>'status' = 'outside_period')
    FROM events WHERE type = 'attendance.checkin' AND time >= t0 AND time < t1
    GROUP BY 1, 2, 3;

    DELETE FROM env_5min WHERE bucket >= t0 AND bucket < t1;
    INSERT INTO env_5min (bucket, school_id, device_id, metric, avg, min, max, samples)
    SELECT date_bin('5 minutes', time, timestamptz '2000-01-01 00:00+00'), school_id, device_id,
           metric, avg(value), min(value), max(value), count(*)
    FROM readings WHERE time >= t0 AND time < t1
    GROUP BY 1, 2, 3, 4;
END
$$;
