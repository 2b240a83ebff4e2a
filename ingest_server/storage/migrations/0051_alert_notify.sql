-- Alert notifications (issue 19): an outbox in the database. The notifier reads alert_events
-- after its cursor, writes one row per (event, receiver) here in the same transaction as it
-- moves the cursor, and a sender delivers the rows with retries; nothing is lost while a
-- receiver is down, and a crash at any point leaves either the rows or the cursor unmoved.

CREATE TABLE IF NOT EXISTS alert_notify_cursor (
    id            smallint PRIMARY KEY DEFAULT 1 CHECK (id = 1),
    -- the last alert_events.id routed (its delivery rows are in alert_notifications)
    last_event_id bigint   NOT NULL DEFAULT 0
);
INSERT INTO alert_notify_cursor (id, last_event_id) VALUES (1, 0) ON CONFLICT (id) DO NOTHING;

CREATE TABLE IF NOT EXISTS alert_notifications (
    id         bigserial   PRIMARY KEY,
    event_id   bigint      NOT NULL REFERENCES alert_events (id) ON DELETE CASCADE,
    alert_id   bigint      NOT NULL,
    -- the receiver's name (from the routes file, or webhook-N / smtp): never its URL or secret
    receiver   text        NOT NULL,
    -- pending: to send; sent: the receiver took it; failed: gave up (last_error says why);
    -- dropped: not sent by policy (info in quiet hours)
    status     text        NOT NULL DEFAULT 'pending'
               CHECK (status IN ('pending', 'sent', 'failed', 'dropped')),
    -- what the receiver is told, as the alert was at this transition
    payload    jsonb       NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    -- when it became due (after quiet hours): the retry window counts from here
    due_at     timestamptz NOT NULL DEFAULT now(),
    -- not tried before this (quiet hours, then backoff after a failed attempt)
    not_before timestamptz NOT NULL DEFAULT now(),
    attempts   integer     NOT NULL DEFAULT 0,
    last_error text,
    sent_at    timestamptz,
    UNIQUE (event_id, receiver)
);
CREATE INDEX IF NOT EXISTS alert_notifications_pending_idx
    ON alert_notifications (receiver, alert_id, id) WHERE status = 'pending';
CREATE INDEX IF NOT EXISTS alert_notifications_alert_idx ON alert_notifications (alert_id, id);
