-- meshd coordinator schema (PostgreSQL). Portable types only (see crates.md): flags are INTEGER, times are BIGINT unix
-- seconds, hashes are hex TEXT, lists are JSON TEXT, every integer is BIGINT (one Rust type, i64, on both backends).
-- Keep in step with ../sqlite/0001_create_schema.sql.

CREATE TABLE settings (
    key   TEXT PRIMARY KEY NOT NULL,
    value TEXT NOT NULL
);

CREATE TABLE api_keys (
    id          TEXT PRIMARY KEY NOT NULL,
    secret_hash TEXT NOT NULL,
    description TEXT NOT NULL DEFAULT '',
    created_at  BIGINT NOT NULL
);

CREATE TABLE join_tokens (
    id          TEXT PRIMARY KEY NOT NULL,
    secret_hash TEXT NOT NULL,
    created_at  BIGINT NOT NULL,
    expires_at  BIGINT,
    max_uses    BIGINT,
    uses        BIGINT NOT NULL DEFAULT 0,
    revoked_at  BIGINT,
    tags        TEXT NOT NULL DEFAULT '[]'
);

-- Sequences never hand out a value twice: node ids are never reused.
CREATE TABLE nodes (
    id              BIGSERIAL PRIMARY KEY,
    name            TEXT NOT NULL UNIQUE,
    ip              BIGINT NOT NULL UNIQUE,
    public_key      TEXT NOT NULL UNIQUE,
    kind            TEXT NOT NULL,
    credential_hash TEXT,
    endpoints       TEXT NOT NULL DEFAULT '[]',
    online_streams  BIGINT NOT NULL DEFAULT 0,
    last_seen       BIGINT,
    tags            TEXT NOT NULL DEFAULT '[]',
    token_id        TEXT,
    created_at      BIGINT NOT NULL
);

-- Versions come from the sequence while the writer holds the global advisory lock, so version order is commit order
-- (see coordinator/src/store/mod.rs): a reader that saw version V has seen every change below V.
CREATE TABLE changes (
    version    BIGSERIAL PRIMARY KEY,
    node_id    BIGINT NOT NULL,
    kind       TEXT NOT NULL,
    created_at BIGINT NOT NULL
);

CREATE TABLE audit_log (
    id     BIGSERIAL PRIMARY KEY,
    at     BIGINT NOT NULL,
    actor  TEXT NOT NULL,
    action TEXT NOT NULL,
    target TEXT NOT NULL,
    detail TEXT NOT NULL DEFAULT ''
);
