-- Device groups and staged fleet rollouts (issue 18): tags on devices (and on the enrolment
-- codes that hand them out), rollouts of a config or a command to a target, and each target
-- device's outcome. The commands and device_config tables stay the only way to a device.

ALTER TABLE devices ADD COLUMN IF NOT EXISTS tags text[] NOT NULL DEFAULT '{}';
CREATE INDEX IF NOT EXISTS devices_tags_idx ON devices USING gin (tags);
ALTER TABLE enrolment_codes ADD COLUMN IF NOT EXISTS tags text[] NOT NULL DEFAULT '{}';

CREATE TABLE IF NOT EXISTS rollouts (
    id                bigserial   PRIMARY KEY,
    what              text        NOT NULL CHECK (what IN ('config', 'command')),
    target            jsonb       NOT NULL,
    -- the desired config (what PUT config takes), or the command's name, args and time to live
    config            jsonb,
    command_name      text,
    command_args      jsonb,
    command_ttl_s     integer,
    canary            integer     NOT NULL CHECK (canary >= 0),
    batch_size        integer     NOT NULL CHECK (batch_size >= 1),
    pause_s           double precision NOT NULL CHECK (pause_s >= 0),
    max_failure_share double precision NOT NULL CHECK (max_failure_share BETWEEN 0 AND 1),
    device_timeout_s  integer     NOT NULL CHECK (device_timeout_s >= 1),
    state             text        NOT NULL DEFAULT 'running'
                      CHECK (state IN ('running', 'paused', 'halted', 'done', 'aborted')),
    reason            text,
    -- batches issued so far (the canary is batch 1), and when the newest one settled
    batches           integer     NOT NULL DEFAULT 0,
    settled_at        timestamptz,
    total             integer     NOT NULL,
    created_at        timestamptz NOT NULL DEFAULT now(),
    updated_at        timestamptz NOT NULL DEFAULT now(),
    finished_at       timestamptz,
    created_by        text,
    CHECK ((what = 'config') = (config IS NOT NULL)),
    CHECK ((what = 'command') = (command_name IS NOT NULL))
);
CREATE INDEX IF NOT EXISTS rollouts_open_idx ON rollouts (id)
    WHERE state IN ('running', 'paused', 'halted');

CREATE TABLE IF NOT EXISTS rollout_devices (
    rollout_id     bigint      NOT NULL REFERENCES rollouts (id) ON DELETE CASCADE,
    device_id      text        NOT NULL,
    school_id      text        NOT NULL,
    -- the order devices are issued in (canary first); batch is null until issued
    position       integer     NOT NULL,
    batch          integer,
    outcome        text        NOT NULL DEFAULT 'pending'
                   CHECK (outcome IN ('pending', 'sent', 'ok', 'failed', 'skipped')),
    detail         text,
    command_id     text,
    config_version integer,
    attempts       integer     NOT NULL DEFAULT 0,
    issued_at      timestamptz,
    settled_at     timestamptz,
    PRIMARY KEY (rollout_id, device_id),
    UNIQUE (rollout_id, position)
);
-- the runner's work list: devices issued to and not yet settled
CREATE INDEX IF NOT EXISTS rollout_devices_open_idx ON rollout_devices (rollout_id, device_id)
    WHERE batch IS NOT NULL AND outcome IN ('pending', 'sent');
