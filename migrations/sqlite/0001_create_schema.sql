-- meshd coordinator schema (SQLite). Portable types only (see crates.md): flags are INTEGER, times are BIGINT unix
-- seconds, hashes are hex TEXT, lists are JSON TEXT. Keep in step with ../postgres/0001_create_schema.sql.

-- Key/value settings written by `serve` (public URL, certificate fingerprint, network) and read by the CLI.
CREATE TABLE settings (
    key   TEXT PRIMARY KEY NOT NULL,
    value TEXT NOT NULL
);

-- Admin API keys: only the SHA-256 of the secret is stored.
CREATE TABLE api_keys (
    id          TEXT PRIMARY KEY NOT NULL,
    secret_hash TEXT NOT NULL,
    description TEXT NOT NULL DEFAULT '',
    created_at  BIGINT NOT NULL
);

-- Join tokens: only the SHA-256 of the secret is stored. max_uses NULL = unlimited (reusable).
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

-- AUTOINCREMENT: node ids are never reused, even after the newest node is deleted.
-- credential_hash NULL = a plain WireGuard device registered by an admin (it never calls the API).
CREATE TABLE nodes (
    id              INTEGER PRIMARY KEY AUTOINCREMENT,
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

-- The change log: one row per change to a node, appended in the same transaction as the change. The version is the
-- map version streamed to nodes; AUTOINCREMENT keeps versions growing even after old rows are pruned.
CREATE TABLE changes (
    version    INTEGER PRIMARY KEY AUTOINCREMENT,
    node_id    BIGINT NOT NULL,
    kind       TEXT NOT NULL,
    created_at BIGINT NOT NULL
);

CREATE TABLE audit_log (
    id     INTEGER PRIMARY KEY AUTOINCREMENT,
    at     BIGINT NOT NULL,
    actor  TEXT NOT NULL,
    action TEXT NOT NULL,
    target TEXT NOT NULL,
    detail TEXT NOT NULL DEFAULT ''
);
