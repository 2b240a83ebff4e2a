-- Alerts (issue 19): one row per alert with its lifecycle, and every transition kept as history.
-- The rule engine (ingest_server/alerts/) opens, resolves and re-opens alerts; people acknowledge
-- and resolve them through the API; the notifier reads alert_events in id order to tell people.

CREATE TABLE IF NOT EXISTS alerts (
    id              bigserial   PRIMARY KEY,
    rule            text        NOT NULL,
    severity        text        NOT NULL CHECK (severity IN ('info', 'warning', 'critical')),
    state           text        NOT NULL DEFAULT 'open'
                    CHECK (state IN ('open', 'acknowledged', 'resolved')),
    school_id       text        NOT NULL,
    device_id       text        NOT NULL,
    room            text,
    opened_at       timestamptz NOT NULL DEFAULT now(),
    -- when the condition was last seen true (the engine's hysteresis reads it)
    last_seen_at    timestamptz NOT NULL DEFAULT now(),
    acknowledged_at timestamptz,
    acknowledged_by text,
    resolved_at     timestamptz,
    -- 'auto' when the condition cleared, else the name of the token that resolved it
    resolved_by     text,
    message         text        NOT NULL,
    detail          jsonb       NOT NULL DEFAULT '{}'
);
-- one alert per rule and device that is not resolved
CREATE UNIQUE INDEX IF NOT EXISTS alerts_one_open_idx ON alerts (rule, device_id)
    WHERE state <> 'resolved';
CREATE INDEX IF NOT EXISTS alerts_school_state_idx ON alerts (school_id, state, opened_at DESC);
CREATE INDEX IF NOT EXISTS alerts_opened_idx ON alerts (opened_at DESC);

CREATE TABLE IF NOT EXISTS alert_events (
    id         bigserial   PRIMARY KEY,
    alert_id   bigint      NOT NULL REFERENCES alerts (id) ON DELETE CASCADE,
    -- opened | acknowledged | resolved | reopened
    transition text        NOT NULL
               CHECK (transition IN ('opened', 'acknowledged', 'resolved', 'reopened')),
    at         timestamptz NOT NULL DEFAULT now(),
    by_whom    text
);
CREATE INDEX IF NOT EXISTS alert_events_alert_idx ON alert_events (alert_id, id);
