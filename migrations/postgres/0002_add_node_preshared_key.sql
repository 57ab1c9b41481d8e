-- Pairs with a node whose preshared_key is 1 mix a preshared key into their WireGuard handshake (stock devices are
-- registered with one by default). Flags are BIGINT 0/1 (one Rust type on both backends), see 0001. Keep in step with
-- ../sqlite/0002_add_node_preshared_key.sql.
ALTER TABLE nodes ADD COLUMN preshared_key BIGINT NOT NULL DEFAULT 0;
