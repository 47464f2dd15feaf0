-- Every table carries tenant_id and leads its primary key and indexes with it, so the schema can
-- later be distributed by tenant. Constraints are named so the store maps errors by name.

CREATE TABLE tenants (
    id                     UUID        NOT NULL,
    name                   TEXT        NOT NULL,
    default_offer_ttl_secs BIGINT      NOT NULL,
    max_offer_ttl_secs     BIGINT      NOT NULL,
    created_at             TIMESTAMPTZ NOT NULL,
    CONSTRAINT tenants_pkey PRIMARY KEY (id)
);

CREATE TABLE api_clients (
    tenant_id   UUID        NOT NULL,
    client_id   TEXT        NOT NULL,
    secret_hash TEXT        NOT NULL,
    -- Space separated scope names.
    scopes      TEXT        NOT NULL,
    active      BOOLEAN     NOT NULL,
    created_at  TIMESTAMPTZ NOT NULL,
    updated_at  TIMESTAMPTZ NOT NULL,
    CONSTRAINT api_clients_pkey PRIMARY KEY (tenant_id, client_id),
    -- The token endpoint looks a client up before it knows the tenant.
    CONSTRAINT api_clients_client_id_key UNIQUE (client_id)
);

CREATE TABLE issuances (
    tenant_id                   UUID        NOT NULL,
    id                          UUID        NOT NULL,
    client_request_id           TEXT        NOT NULL,
    request_fingerprint         TEXT        NOT NULL,
    credential_configuration_id TEXT        NOT NULL,
    status                      TEXT        NOT NULL,
    reason                      TEXT,
    -- NULL once purged.
    payload                     JSONB,
    delivery                    TEXT        NOT NULL,
    email                       TEXT,
    grant_type                  TEXT        NOT NULL,
    offer_id                    TEXT        NOT NULL,
    pre_authorized_code_hash    TEXT        NOT NULL,
    pre_authorized_code_sealed  TEXT        NOT NULL,
    expires_at                  TIMESTAMPTZ NOT NULL,
    created_at                  TIMESTAMPTZ NOT NULL,
    updated_at                  TIMESTAMPTZ NOT NULL,
    CONSTRAINT issuances_pkey PRIMARY KEY (tenant_id, id),
    -- The idempotency guarantee: insert_issuance relies on this constraint, not on a lock.
    CONSTRAINT issuances_client_request_id_key UNIQUE (tenant_id, client_request_id),
    -- Wallets present offer ids and codes without a tenant.
    CONSTRAINT issuances_offer_id_key UNIQUE (offer_id),
    CONSTRAINT issuances_code_hash_key UNIQUE (pre_authorized_code_hash),
    CONSTRAINT issuances_status_check
        CHECK (status IN ('pending', 'accepted', 'rejected', 'error')),
    CONSTRAINT issuances_delivery_check
        CHECK (delivery IN ('email', 'none', 'link', 'qr'))
);

-- Serves the status-filtered list, newest first.
CREATE INDEX issuances_tenant_status_id_idx ON issuances (tenant_id, status, id);

CREATE TABLE issuance_events (
    tenant_id       UUID        NOT NULL,
    issuance_id     UUID        NOT NULL,
    sequence        BIGINT      NOT NULL,
    -- Identity values are handed out at insert, not at commit: an outbox reader must allow for
    -- a lower value becoming visible after a higher one.
    global_sequence BIGINT      GENERATED ALWAYS AS IDENTITY,
    kind            TEXT        NOT NULL,
    status          TEXT        NOT NULL,
    reason          TEXT,
    occurred_at     TIMESTAMPTZ NOT NULL,
    CONSTRAINT issuance_events_pkey PRIMARY KEY (tenant_id, issuance_id, sequence),
    CONSTRAINT issuance_events_issuance_fkey
        FOREIGN KEY (tenant_id, issuance_id) REFERENCES issuances (tenant_id, id),
    CONSTRAINT issuance_events_sequence_check CHECK (sequence > 0),
    CONSTRAINT issuance_events_status_check
        CHECK (status IN ('pending', 'accepted', 'rejected', 'error'))
);

CREATE INDEX issuance_events_tenant_global_sequence_idx
    ON issuance_events (tenant_id, global_sequence);
-- The one index not led by tenant_id: outbox readers scan all tenants in global order.
CREATE INDEX issuance_events_global_sequence_idx ON issuance_events (global_sequence);
