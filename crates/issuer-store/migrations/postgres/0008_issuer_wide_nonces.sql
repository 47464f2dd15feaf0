-- Nonces come from one unauthenticated endpoint for the whole issuer, so a nonce spent in one
-- tenant must be refused in every other: the key is the nonce alone. This is the one table not
-- led by tenant_id; distributed by tenant it would become a table distributed by nonce_hash.
-- tenant_id stays as a record of who spent the nonce.
ALTER TABLE used_nonces DROP CONSTRAINT used_nonces_pkey;
DELETE FROM used_nonces a USING used_nonces b
    WHERE a.nonce_hash = b.nonce_hash AND a.ctid < b.ctid;
ALTER TABLE used_nonces ADD CONSTRAINT used_nonces_pkey PRIMARY KEY (nonce_hash);
