-- API tokens (issue 4): only a SHA-256 of each token is kept; the token itself is shown once.
CREATE TABLE IF NOT EXISTS api_tokens (
    id           bigserial PRIMARY KEY,
    name         text        NOT NULL,
    token_sha256 bytea       NOT NULL UNIQUE,
    scopes       text[]      NOT NULL CHECK (scopes <@ ARRAY['read', 'admin']::text[]),
    created_at   timestamptz NOT NULL DEFAULT now(),
    last_used_at timestamptz,
    revoked_at   timestamptz
);
