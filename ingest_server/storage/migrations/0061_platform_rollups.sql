-- Campus-card payments and school health checks, rolled up per day on read: set-returning
-- functions over the events of the requested district-local days (the time range reaches the
-- events' time index), the same on plain PostgreSQL and TimescaleDB. Names and columns are a
-- contract the API reads (/api/v1/rollups/card-purchases, /api/v1/rollups/health-checks).

-- Payments per school, merchant and day: how many, and their sum in fen (integers: no rounding).
CREATE OR REPLACE FUNCTION campus_card_purchases_daily(lo date, hi date)
RETURNS TABLE (day date, school_id text, merchant text, purchases bigint, amount_fen bigint)
LANGUAGE plpgsql STABLE AS $$
DECLARE
    tz text := (SELECT district_tz FROM storage_config);
BEGIN
    RETURN QUERY
    SELECT (e.time AT TIME ZONE tz)::date, e.school_id, e.data->>'merchant', count(*),
           sum((e.data->>'amount_fen')::bigint)::bigint
    FROM events AS e
    WHERE e.type = 'card.purchase'
      AND e.time >= lo::timestamp AT TIME ZONE tz AND e.time < (hi + 1)::timestamp AT TIME ZONE tz
    GROUP BY 1, 2, 3;
END
$$;

-- Morning checks per school, class and day: distinct students, checks, fevers (a temperature
-- at or above fever_c, or "fever" among the symptoms) and how many checks named each symptom.
-- Per-class aggregates only; the API withholds classes with fewer than its minimum of students.
CREATE OR REPLACE FUNCTION campus_health_checks_daily(lo date, hi date, fever_c double precision)
RETURNS TABLE (day date, school_id text, class_id text, students bigint, checks bigint,
               fevers bigint, symptoms jsonb)
LANGUAGE plpgsql STABLE AS $$
DECLARE
    tz text := (SELECT district_tz FROM storage_config);
BEGIN
    RETURN QUERY
    WITH c AS (
        SELECT (e.time AT TIME ZONE tz)::date AS d, e.school_id AS s, e.data->>'class_id' AS k,
               e.data->>'student_hash' AS student,
               (e.data->>'temperature_c')::double precision AS temp,
               coalesce(e.data->'symptoms', '[]'::jsonb) AS sym
        FROM events AS e
        WHERE e.type = 'health.check'
          AND e.time >= lo::timestamp AT TIME ZONE tz
          AND e.time < (hi + 1)::timestamp AT TIME ZONE tz
    ), counts AS (
        SELECT x.d, x.s, x.k, jsonb_object_agg(x.symptom, x.n) AS by_symptom
        FROM (SELECT c.d, c.s, c.k, t.symptom, count(*) AS n
              FROM c, jsonb_array_elements_text(
                  CASE WHEN jsonb_typeof(c.sym) = 'array' THEN c.sym ELSE '[]'::jsonb END
              ) AS t(symptom)
              GROUP BY 1, 2, 3, 4) AS x
        GROUP BY 1, 2, 3
    )
    SELECT c.d, c.s, c.k, count(DISTINCT c.student), count(*),
           count(*) FILTER (WHERE c.temp >= fever_c OR c.sym ? 'fever'),
           coalesce(counts.by_symptom, '{}'::jsonb)
    FROM c LEFT JOIN counts ON counts.d = c.d AND counts.s = c.s
                           AND counts.k IS NOT DISTINCT FROM c.k
    GROUP BY c.d, c.s, c.k, counts.by_symptom;
END
$$;
