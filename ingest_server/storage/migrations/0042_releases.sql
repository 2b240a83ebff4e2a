-- Signed agent releases (update_agent): the wheel and its detached Ed25519 signature by the
-- district's release key over "version + sha256" (schemas/release.py). The server checks the
-- signature with the public key when a release is added; agents check it again before install.
CREATE TABLE IF NOT EXISTS releases (
    version text PRIMARY KEY CHECK (version ~ '^[0-9][0-9A-Za-z.+_-]{0,63}$'),
    sha256 text NOT NULL CHECK (sha256 ~ '^[0-9a-f]{64}$'),
    signature text NOT NULL,
    size bigint NOT NULL CHECK (size > 0),
    wheel bytea NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    created_by text
);
