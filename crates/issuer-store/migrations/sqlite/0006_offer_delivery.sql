-- How a tenant appears to recipients, in offer emails and on the landing page.
ALTER TABLE tenants ADD COLUMN display_name TEXT;
ALTER TABLE tenants ADD COLUMN logo_url TEXT;
ALTER TABLE tenants ADD COLUMN support_contact TEXT;

-- The email outbox: one row per issuance with delivery `email`, written in the transaction that
-- creates the issuance.
CREATE TABLE email_deliveries (
    tenant_id       TEXT    NOT NULL,
    issuance_id     TEXT    NOT NULL,
    state           TEXT    NOT NULL CHECK (state IN ('pending', 'sent', 'failed', 'cancelled')),
    attempts        INTEGER NOT NULL DEFAULT 0,
    next_attempt_at TEXT    NOT NULL,
    last_error      TEXT,
    sent_at         TEXT,
    created_at      TEXT    NOT NULL,
    updated_at      TEXT    NOT NULL,
    CONSTRAINT email_deliveries_pkey PRIMARY KEY (tenant_id, issuance_id),
    CONSTRAINT email_deliveries_issuance_fkey FOREIGN KEY (tenant_id, issuance_id)
        REFERENCES issuances (tenant_id, id) ON DELETE CASCADE
) STRICT;

CREATE INDEX email_deliveries_due_idx ON email_deliveries (next_attempt_at) WHERE state = 'pending';
