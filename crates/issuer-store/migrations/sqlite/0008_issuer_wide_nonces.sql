-- Nonces come from one unauthenticated endpoint for the whole issuer, so a nonce spent in one
-- tenant must be refused in every other: the key is the nonce alone. tenant_id stays as a record
-- of who spent the nonce. SQLite cannot change a primary key in place.
CREATE TABLE used_nonces_new (
    tenant_id  TEXT NOT NULL,
    nonce_hash TEXT NOT NULL,
    expires_at TEXT NOT NULL,
    CONSTRAINT used_nonces_pkey PRIMARY KEY (nonce_hash)
) STRICT;
INSERT OR IGNORE INTO used_nonces_new (tenant_id, nonce_hash, expires_at)
    SELECT tenant_id, nonce_hash, expires_at FROM used_nonces;
DROP TABLE used_nonces;
ALTER TABLE used_nonces_new RENAME TO used_nonces;
CREATE INDEX used_nonces_expires_at_idx ON used_nonces (expires_at);
