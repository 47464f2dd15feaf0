-- How a tenant appears to recipients, in offer emails and on the landing page.
ALTER TABLE tenants ADD COLUMN display_name TEXT;
ALTER TABLE tenants ADD COLUMN logo_url TEXT;
ALTER TABLE tenants ADD COLUMN support_contact TEXT;

-- The email outbox: one row per issuance with delivery `email`, written in the statement that
-- creates the issuance; mailers on every replica claim due rows with a lease.
CREATE TABLE email_deliveries (
    tenant_id       UUID        NOT NULL,
    issuance_id     UUID        NOT NULL,
    state           TEXT        NOT NULL,
    attempts        BIGINT      NOT NULL DEFAULT 0,
    next_attempt_at TIMESTAMPTZ NOT NULL,
    last_error      TEXT,
    sent_at         TIMESTAMPTZ,
    created_at      TIMESTAMPTZ NOT NULL,
    updated_at      TIMESTAMPTZ NOT NULL,
    CONSTRAINT email_deliveries_pkey PRIMARY KEY (tenant_id, issuance_id),
    CONSTRAINT email_deliveries_issuance_fkey FOREIGN KEY (tenant_id, issuance_id)
        REFERENCES issuances (tenant_id, id) ON DELETE CASCADE,
    CONSTRAINT email_deliveries_state_check
        CHECK (state IN ('pending', 'sent', 'failed', 'cancelled'))
);

CREATE INDEX email_deliveries_due_idx ON email_deliveries (next_attempt_at) WHERE state = 'pending';
