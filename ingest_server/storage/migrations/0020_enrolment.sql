-- Enrolment (issue 5): single-use codes an administrator hands out, and the MQTT credentials a
-- device receives with one. Neither a code nor a password is stored: only a SHA-256 of each code
-- (random and long enough that no stretching is needed) and a Mosquitto PBKDF2-SHA512 hash of
-- each password, so the broker's password file can be written from this table.

-- The registry columns an administrator sets; another branch adds them too, hence IF NOT EXISTS.
ALTER TABLE devices ADD COLUMN IF NOT EXISTS room     text;
ALTER TABLE devices ADD COLUMN IF NOT EXISTS class_id text;
ALTER TABLE devices ADD COLUMN IF NOT EXISTS grade    text;
ALTER TABLE devices ADD COLUMN IF NOT EXISTS name     text;

CREATE TABLE IF NOT EXISTS enrolment_codes (
    id          bigserial PRIMARY KEY,
    code_sha256 bytea       NOT NULL UNIQUE,
    school_id   text        NOT NULL,
    room        text,
    kind        text,
    -- re-enrolment of a replaced device: it keeps its device_id and history
    replaces    text,
    created_at  timestamptz NOT NULL DEFAULT now(),
    expires_at  timestamptz NOT NULL,
    used_at     timestamptz,
    device_id   text,
    CHECK (expires_at > created_at)
);
CREATE INDEX IF NOT EXISTS enrolment_codes_open_idx ON enrolment_codes (expires_at)
    WHERE used_at IS NULL;

CREATE TABLE IF NOT EXISTS device_credentials (
    id            bigserial PRIMARY KEY,
    device_id     text        NOT NULL,
    school_id     text        NOT NULL,
    -- MQTT username is the device_id; this is mosquitto_passwd's "$7$" PBKDF2-SHA512 form
    password_hash text        NOT NULL CHECK (password_hash LIKE '$7$%'),
    code_id       bigint      REFERENCES enrolment_codes (id),
    hardware_ids  jsonb       NOT NULL DEFAULT '{}'::jsonb,
    agent_version text,
    created_at    timestamptz NOT NULL DEFAULT now(),
    revoked_at    timestamptz
);
-- At most one live credential per device: re-enrolment revokes the old one in the same commit.
CREATE UNIQUE INDEX IF NOT EXISTS device_credentials_live_key ON device_credentials (device_id)
    WHERE revoked_at IS NULL;
