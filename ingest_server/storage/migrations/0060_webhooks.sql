-- Vendor webhooks (docs/webhooks.md): the seq the server gave each vendor event id, so a
-- retried delivery gets the same seq and is stored once; and each webhook device's next seq.
CREATE TABLE IF NOT EXISTS webhook_event_ids (
    source      text        NOT NULL,
    event_id    text        NOT NULL CHECK (length(event_id) BETWEEN 1 AND 256),
    device_id   text        NOT NULL,
    seq         bigint      NOT NULL CHECK (seq >= 0),
    received_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (source, event_id)
);
CREATE TABLE IF NOT EXISTS webhook_device_seq (
    device_id text   PRIMARY KEY,
    next_seq  bigint NOT NULL CHECK (next_seq >= 0)
);
