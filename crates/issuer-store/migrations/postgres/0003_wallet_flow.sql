-- What the OID4VCI flow needs: per-tenant transaction-code policy, the redemption state of each
-- offer's codes, the wallet's notification id, and the set of nonces already used in proofs.
ALTER TABLE tenants ADD COLUMN require_tx_code BOOLEAN NOT NULL DEFAULT FALSE;

ALTER TABLE issuances
    ADD COLUMN tx_code_hash     TEXT,
    ADD COLUMN tx_code_failures BIGINT      NOT NULL DEFAULT 0,
    ADD COLUMN code_redeemed_at TIMESTAMPTZ,
    ADD COLUMN notification_id  TEXT;

CREATE TABLE used_nonces (
    tenant_id  UUID        NOT NULL,
    -- SHA-256 of the nonce: proofs quote nonces, the table need not.
    nonce_hash TEXT        NOT NULL,
    expires_at TIMESTAMPTZ NOT NULL,
    CONSTRAINT used_nonces_pkey PRIMARY KEY (tenant_id, nonce_hash)
);

CREATE INDEX used_nonces_expires_at_idx ON used_nonces (expires_at);
