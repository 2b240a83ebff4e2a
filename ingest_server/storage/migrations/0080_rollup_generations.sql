-- A generation per rollup table, bumped by every statement that changes the table, in that
-- statement's transaction: the API compares it (with the trigger's own catalogue row) before
-- serving an answer it rendered earlier, so a repeated rollup request skips the rendering and
-- a changed table is never answered from before its change (web/api/answer_cache.py).
--
-- Only ordinary tables carry the trigger: the rollups that are views over TimescaleDB's
-- continuous aggregates change with every event and are always read afresh.
CREATE TABLE IF NOT EXISTS campus_rollup_generations (
    relid oid PRIMARY KEY,
    gen bigint NOT NULL DEFAULT 0
);

CREATE OR REPLACE FUNCTION campus_rollup_changed() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    -- the row lock is held to commit, so two writers of one table take turns here; readers
    -- see the new generation exactly when they see the rows it stands for
    INSERT INTO campus_rollup_generations AS g (relid, gen) VALUES (TG_RELID, 1)
    ON CONFLICT (relid) DO UPDATE SET gen = g.gen + 1;
    RETURN NULL;
END
$$;

DO $$
DECLARE
    r text;
BEGIN
    FOREACH r IN ARRAY ARRAY['card_taps_daily', 'attendance_daily', 'env_5min',
                             'board_power_daily', 'board_input_daily', 'device_online_daily',
                             'library_daily']
    LOOP
        IF (SELECT relkind FROM pg_class WHERE oid = to_regclass(r)) IN ('r', 'p') THEN
            EXECUTE format('DROP TRIGGER IF EXISTS campus_rollup_generation ON %I', r);
            EXECUTE format('CREATE TRIGGER campus_rollup_generation'
                           ' AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON %I'
                           ' FOR EACH STATEMENT EXECUTE FUNCTION campus_rollup_changed()', r);
            -- fires in session_replication_role = replica too (a restore, a replica apply)
            EXECUTE format('ALTER TABLE %I ENABLE ALWAYS TRIGGER campus_rollup_generation', r);
            INSERT INTO campus_rollup_generations (relid) VALUES (to_regclass(r)::oid)
            ON CONFLICT (relid) DO NOTHING;
        END IF;
    END LOOP;
END
$$;
