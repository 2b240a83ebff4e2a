-- Storage settings, the registry columns enrolment fills, and the presence history.

-- One row: the district's time zone (days in rollups are local days) and how many days of
-- partitions plain PostgreSQL keeps ready ahead of now.
CREATE TABLE IF NOT EXISTS storage_config (
    id               boolean PRIMARY KEY DEFAULT true CHECK (id),
    district_tz      text    NOT NULL DEFAULT 'Asia/Shanghai',
    partitions_ahead integer NOT NULL DEFAULT 7 CHECK (partitions_ahead BETWEEN 1 AND 366)
);
INSERT INTO storage_config DEFAULT VALUES ON CONFLICT DO NOTHING;

-- Per table: partition/chunk width, when to compress (TimescaleDB), when to drop.
CREATE TABLE IF NOT EXISTS storage_policy (
    table_name     text     PRIMARY KEY,
    chunk_interval interval NOT NULL,
    compress_after interval,            -- null: never compress
    retain_for     interval             -- null: keep forever
);
INSERT INTO storage_policy VALUES
    ('events',   interval '1 day', interval '7 days', interval '730 days'),
    ('readings', interval '1 day', interval '7 days', interval '400 days')
ON CONFLICT DO NOTHING;

ALTER TABLE devices
    ADD COLUMN IF NOT EXISTS room     text,
    ADD COLUMN IF NOT EXISTS class_id text,
    ADD COLUMN IF NOT EXISTS grade    text,
    ADD COLUMN IF NOT EXISTS name     text;

-- Every state message as it arrived (devices keeps only the latest).
CREATE TABLE IF NOT EXISTS device_presence (
    time      timestamptz NOT NULL,
    school_id text        NOT NULL,
    device_id text        NOT NULL,
    state     text        NOT NULL,
    boot      bigint
);
CREATE INDEX IF NOT EXISTS device_presence_device_time_idx ON device_presence (device_id, time);
CREATE INDEX IF NOT EXISTS device_presence_time_idx ON device_presence (time);
