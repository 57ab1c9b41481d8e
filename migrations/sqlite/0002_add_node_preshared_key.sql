-- Pairs with a node whose preshared_key is 1 mix a preshared key into their WireGuard handshake (stock devices are
-- registered with one by default). Flags are INTEGER (0/1), see 0001. Keep in step with ../postgres/0002.
ALTER TABLE nodes ADD COLUMN preshared_key BIGINT NOT NULL DEFAULT 0;
