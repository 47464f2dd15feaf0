-- What the OID4VCI flow needs: per-tenant transaction-code policy, the redemption state of each
-- offer's codes, the wallet's notification id, and the set of nonces already used in proofs.
ALTER TABLE tenants ADD COLUMN require_tx_code INTEGER NOT NULL DEFAULT 0
    CHECK (require_tx_code IN (0, 1));

ALTER TABLE issuances ADD COLUMN tx_code_hash TEXT;
ALTER TABLE issuances ADD COLUMN tx_code_failures INTEGER NOT NULL DEFAULT 0;
ALTER TABLE issuances ADD COLUMN code_redeemed_at TEXT;
ALTER TABLE issuances ADD COLUMN notification_id TEXT;

CREATE TABLE used_nonces (
    tenant_id  TEXT NOT NULL,
    -- SHA-256 of the nonce: proofs quote nonces, the table need not.
    nonce_hash TEXT NOT NULL,
    expires_at TEXT NOT NULL,
    CONSTRAINT used_nonces_pkey PRIMARY KEY (tenant_id, nonce_hash)
) STRICT;

CREATE INDEX used_nonces_expires_at_idx ON used_nonces (expires_at);
