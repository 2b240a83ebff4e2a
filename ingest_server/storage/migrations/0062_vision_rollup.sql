-- Vision screenings (health.vision) per school, class and day, rolled up on read like the morning
-- checks of 0061: distinct students, screenings, screenings with either eye below 5.0 (the
-- five-grade notation's normal), and each eye's mean acuity. Per-class aggregates only; the API
-- withholds classes with fewer than its minimum of students.
CREATE OR REPLACE FUNCTION campus_health_vision_daily(lo date, hi date)
RETURNS TABLE (day date, school_id text, class_id text, students bigint, screenings bigint,
               reduced bigint, mean_left double precision, mean_right double precision)
LANGUAGE plpgsql STABLE AS $$
DECLARE
    tz text := (SELECT district_tz FROM storage_config);
BEGIN
    RETURN QUERY
    SELECT (e.time AT TIME ZONE tz)::date, e.school_id, e.data->>'class_id',
           count(DISTINCT e.data->>'student_hash'), count(*),
           count(*) FILTER (WHERE least((e.data->>'left_acuity')::numeric,
                                        (e.data->>'right_acuity')::numeric) < 5.0),
           round(avg((e.data->>'left_acuity')::numeric), 2)::double precision,
           round(avg((e.data->>'right_acuity')::numeric), 2)::double precision
    FROM events AS e
    WHERE e.type = 'health.vision'
      AND e.time >= lo::timestamp AT TIME ZONE tz AND e.time < (hi + 1)::timestamp AT TIME ZONE tz
    GROUP BY 1, 2, 3;
END
$$;
