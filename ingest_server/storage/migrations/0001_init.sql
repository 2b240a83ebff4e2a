-- campus-edge storage, version 1. Table and column names in events, readings, devices and
-- quarantine are part of the contract (ARCHITECTURE.md section 5): add columns, never rename.

CREATE TABLE IF NOT EXISTS events (
    time        timestamptz NOT NULL,
    school_id   text        NOT NULL,
    device_id   text        NOT NULL,
    device_kind text        NOT NULL,
    seq         bigint      NOT NULL,
    type        text        NOT NULL,
    data        jsonb       NOT NULL,
    received_at timestamptz NOT NULL DEFAULT now(),
    synced      boolean     NOT NULL DEFAULT true
);
-- (device_id, seq) is an event's identity: the writer relies on this index to drop resends.
CREATE UNIQUE INDEX IF NOT EXISTS events_device_seq_key ON events (device_id, seq);
CREATE INDEX IF NOT EXISTS events_time_idx ON events (time);
CREATE INDEX IF NOT EXISTS events_school_time_idx ON events (school_id, time);

CREATE TABLE IF NOT EXISTS readings (
    time      timestamptz      NOT NULL,
    school_id text             NOT NULL,
    device_id text             NOT NULL,
    metric    text             NOT NULL,
    value     double precision NOT NULL
);
CREATE INDEX IF NOT EXISTS readings_metric_time_idx ON readings (metric, time);
CREATE INDEX IF NOT EXISTS readings_device_metric_time_idx ON readings (device_id, metric, time);

CREATE TABLE IF NOT EXISTS devices (
    device_id     text PRIMARY KEY,
    school_id     text        NOT NULL,
    kind          text,                 -- null until the first uplink (state may come first)
    first_seen    timestamptz NOT NULL DEFAULT now(),
    last_seen     timestamptz NOT NULL DEFAULT now(),
    min_seq       bigint,
    max_seq       bigint,
    event_count   bigint      NOT NULL DEFAULT 0,
    -- seqs between the lowest and highest stored that never arrived
    missing       bigint GENERATED ALWAYS AS (
                      coalesce(max_seq - min_seq + 1 - event_count, 0)) STORED,
    state         text,
    state_at      timestamptz,
    boot          bigint,
    agent_version text
);

-- Text of a payload for people reading quarantine in psql: UTF-8 as is, anything else with
-- its bytes escaped (encode(..., 'escape')). IMMUTABLE because the database encoding is fixed.
CREATE OR REPLACE FUNCTION campus_payload_text(payload bytea) RETURNS text
LANGUAGE plpgsql IMMUTABLE STRICT PARALLEL SAFE AS $$
BEGIN
    RETURN convert_from(payload, 'UTF8');
EXCEPTION WHEN character_not_in_repertoire OR untranslatable_character THEN
    RETURN encode(payload, 'escape');
END
$$;

CREATE TABLE IF NOT EXISTS quarantine (
    id           bigserial PRIMARY KEY,
    received_at  timestamptz NOT NULL DEFAULT now(),
    topic        text        NOT NULL,
    payload      bytea       NOT NULL,
    reason       text        NOT NULL,
    device_id    text,
    seq          bigint,
    payload_text text GENERATED ALWAYS AS (campus_payload_text(payload)) STORED
);
CREATE INDEX IF NOT EXISTS quarantine_received_at_idx ON quarantine (received_at);
CREATE INDEX IF NOT EXISTS quarantine_device_idx ON quarantine (device_id, seq);
