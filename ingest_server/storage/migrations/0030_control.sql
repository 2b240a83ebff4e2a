-- The control plane (issue 5): commands to devices with their outcome, and each device's
-- desired configuration with what the device last reported about it.

CREATE TABLE IF NOT EXISTS commands (
    id         text        PRIMARY KEY,
    device_id  text        NOT NULL,
    school_id  text        NOT NULL,
    name       text        NOT NULL,
    args       jsonb       NOT NULL DEFAULT '{}',
    created_at timestamptz NOT NULL DEFAULT now(),
    expires_at timestamptz NOT NULL,
    status     text        NOT NULL DEFAULT 'pending'
               CHECK (status IN ('pending', 'sent', 'ok', 'error', 'rejected', 'expired')),
    detail     jsonb,
    sent_at    timestamptz,
    acked_at   timestamptz,
    created_by text
);
CREATE INDEX IF NOT EXISTS commands_device_created_idx ON commands (device_id, created_at DESC);
-- the sender's and the expiry sweep's work list stays small: only open commands are in it
CREATE INDEX IF NOT EXISTS commands_open_idx ON commands (expires_at)
    WHERE status IN ('pending', 'sent');

CREATE TABLE IF NOT EXISTS device_config (
    device_id         text        PRIMARY KEY,
    school_id         text        NOT NULL,
    version           integer     NOT NULL CHECK (version >= 1),
    document          jsonb       NOT NULL,
    status            text        NOT NULL DEFAULT 'pending'
                      CHECK (status IN ('pending', 'applied', 'rejected', 'rolled_back')),
    detail            text,
    updated_at        timestamptz NOT NULL DEFAULT now(),
    acked_at          timestamptz,
    -- the version last published (retained) to the broker; behind `version` until it is
    published_version integer,
    published_at      timestamptz
);
