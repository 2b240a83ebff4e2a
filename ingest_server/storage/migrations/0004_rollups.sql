-- Rollups that need window functions (durations between state changes) or joins, as tables the
-- server refreshes for the local days touched since its last refresh (storage.py). Names and
-- columns are a contract other components read.

-- (day, minutes) pieces of [t_start, t_end) split at district-local midnights.
CREATE OR REPLACE FUNCTION campus_day_minutes(t_start timestamptz, t_end timestamptz, tz text)
RETURNS TABLE (day date, minutes double precision) LANGUAGE sql STABLE AS $$
    SELECT g::date,
           extract(epoch FROM least(t_end, (g + interval '1 day') AT TIME ZONE tz)
                              - greatest(t_start, g AT TIME ZONE tz)) / 60
    FROM generate_series((t_start AT TIME ZONE tz)::date::timestamp,
                         (t_end AT TIME ZONE tz)::date::timestamp, interval '1 day') AS g
    WHERE t_end > t_start
      AND least(t_end, (g + interval '1 day') AT TIME ZONE tz) > greatest(t_start, g AT TIME ZONE tz)
$$;

CREATE TABLE IF NOT EXISTS board_power_daily (
    day date NOT NULL, school_id text NOT NULL, device_id text NOT NULL,
    on_minutes double precision NOT NULL,
    PRIMARY KEY (day, school_id, device_id)
);
CREATE TABLE IF NOT EXISTS board_input_daily (
    day date NOT NULL, school_id text NOT NULL, device_id text NOT NULL, source text NOT NULL,
    minutes double precision NOT NULL,
    PRIMARY KEY (day, school_id, device_id, source)
);
CREATE TABLE IF NOT EXISTS device_online_daily (
    day date NOT NULL, school_id text NOT NULL, device_id text NOT NULL,
    online_minutes double precision NOT NULL,
    PRIMARY KEY (day, school_id, device_id)
);
CREATE TABLE IF NOT EXISTS library_daily (
    day date NOT NULL, school_id text NOT NULL, grade text,
    loans bigint NOT NULL, returns bigint NOT NULL
);
CREATE INDEX IF NOT EXISTS library_daily_day_idx ON library_daily (day, school_id);
CREATE TABLE IF NOT EXISTS library_top_items (
    school_id text NOT NULL, item_id text NOT NULL, loans bigint NOT NULL,
    last_loan timestamptz NOT NULL,
    PRIMARY KEY (school_id, item_id)
);

-- Where the last refresh got to (received_at of events, time of presence rows).
CREATE TABLE IF NOT EXISTS rollup_state (
    id           boolean PRIMARY KEY DEFAULT true CHECK (id),
    refreshed_to timestamptz NOT NULL DEFAULT '-infinity'
);
INSERT INTO rollup_state DEFAULT VALUES ON CONFLICT DO NOTHING;

-- A state holds from its event until the device's next one; a state older than this before a
-- refreshed day is not looked for.
CREATE OR REPLACE FUNCTION campus_lookback() RETURNS interval LANGUAGE sql IMMUTABLE
AS $$ SELECT interval '7 days' $$;

-- Recomputes the table rollups for local days lo..hi (the simple ones too, where they are
-- tables: campus_refresh_simple comes from the backend's next migration).
CREATE OR REPLACE FUNCTION campus_refresh_rollups(lo date, hi date)
RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    tz text := (SELECT district_tz FROM storage_config);
    t0 timestamptz := lo::timestamp AT TIME ZONE tz;
    t1 timestamptz := (hi + 1)::timestamp AT TIME ZONE tz;
    t_now timestamptz := least(now(), t1);
BEGIN
    DELETE FROM board_power_daily WHERE day BETWEEN lo AND hi;
    INSERT INTO board_power_daily (day, school_id, device_id, on_minutes)
    SELECT m.day, s.school_id, s.device_id, sum(m.minutes)
    FROM (SELECT school_id, device_id, time, data->>'state' AS state,
                 coalesce(lead(time) OVER w, t_now) AS until
          FROM events
          WHERE type = 'board.power' AND time >= t0 - campus_lookback() AND time < t1
          WINDOW w AS (PARTITION BY device_id ORDER BY time, seq)) AS s,
         campus_day_minutes(greatest(s.time, t0), least(s.until, t1), tz) AS m
    WHERE s.state = 'on'
    GROUP BY 1, 2, 3;

    DELETE FROM board_input_daily WHERE day BETWEEN lo AND hi;
    INSERT INTO board_input_daily (day, school_id, device_id, source, minutes)
    SELECT m.day, s.school_id, s.device_id, s.source, sum(m.minutes)
    FROM (SELECT school_id, device_id, time, data->>'source' AS source,
                 coalesce(lead(time) OVER w, t_now) AS until
          FROM events
          WHERE type = 'board.input' AND time >= t0 - campus_lookback() AND time < t1
          WINDOW w AS (PARTITION BY device_id ORDER BY time, seq)) AS s,
         campus_day_minutes(greatest(s.time, t0), least(s.until, t1), tz) AS m
    GROUP BY 1, 2, 3, 4;

    DELETE FROM device_online_daily WHERE day BETWEEN lo AND hi;
    INSERT INTO device_online_daily (day, school_id, device_id, online_minutes)
    SELECT m.day, s.school_id, s.device_id, sum(m.minutes)
    FROM (SELECT school_id, device_id, time, state,
                 coalesce(lead(time) OVER w, t_now) AS until
          FROM device_presence
          WHERE time >= t0 - campus_lookback() AND time < t1
          WINDOW w AS (PARTITION BY device_id ORDER BY time)) AS s,
         campus_day_minutes(greatest(s.time, t0), least(s.until, t1), tz) AS m
    WHERE s.state = 'online'
    GROUP BY 1, 2, 3;

    DELETE FROM library_daily WHERE day BETWEEN lo AND hi;
    INSERT INTO library_daily (day, school_id, grade, loans, returns)
    SELECT (e.time AT TIME ZONE tz)::date, e.school_id, d.grade,
           count(*) FILTER (WHERE e.type = 'library.loan'),
           count(*) FILTER (WHERE e.type = 'library.return')
    FROM events AS e LEFT JOIN devices AS d USING (device_id)
    WHERE e.type IN ('library.loan', 'library.return') AND e.time >= t0 AND e.time < t1
    GROUP BY 1, 2, 3;

    -- All-time per school, so recomputed whole for the schools that lent in these days.
    DELETE FROM library_top_items WHERE school_id IN (
        SELECT school_id FROM events
        WHERE type = 'library.loan' AND time >= t0 AND time < t1);
    INSERT INTO library_top_items (school_id, item_id, loans, last_loan)
    SELECT school_id, data->>'item_id', count(*), max(time)
    FROM events
    WHERE type = 'library.loan' AND school_id IN (
        SELECT school_id FROM events WHERE type = 'library.loan' AND time >= t0 AND time < t1)
    GROUP BY 1, 2;

    PERFORM campus_refresh_simple(lo, hi);
END
$$;

-- Refreshes the days touched since the last call (plus today and yesterday, whose open
-- intervals grow with the clock). Returns how many days it refreshed.
CREATE OR REPLACE FUNCTION campus_refresh_touched(max_days integer DEFAULT 400)
RETURNS integer LANGUAGE plpgsql AS $$
DECLARE
    tz text := (SELECT district_tz FROM storage_config);
    -- Rows commit up to a few seconds after their received_at: look a margin back.
    mark timestamptz := (SELECT refreshed_to FROM rollup_state) - interval '5 minutes';
    started timestamptz := clock_timestamp();
    today date := (now() AT TIME ZONE tz)::date;
    d date;
    n integer := 0;
BEGIN
    FOR d IN
        SELECT day FROM (
            SELECT DISTINCT (time AT TIME ZONE tz)::date AS day FROM events
            WHERE received_at >= mark
            UNION SELECT (time AT TIME ZONE tz)::date FROM device_presence WHERE time >= mark
            UNION VALUES (today), (today - 1)) AS touched
        ORDER BY day DESC LIMIT max_days
    LOOP
        -- A state change also changes the following days' durations up to the lookback.
        PERFORM campus_refresh_rollups(d, d + 1);
        n := n + 1;
    END LOOP;
    UPDATE rollup_state SET refreshed_to = started;
    RETURN n;
END
$$;
