-- Webhook endpoints and the outbox of deliveries, written in the same transaction as the event
-- each delivery announces.
CREATE TABLE webhook_endpoints (
    tenant_id                  UUID        NOT NULL,
    id                         UUID        NOT NULL,
    url                        TEXT        NOT NULL,
    -- Space-separated webhook types.
    event_types                TEXT        NOT NULL,
    secret_sealed              TEXT        NOT NULL,
    previous_secret_sealed     TEXT,
    previous_secret_expires_at TIMESTAMPTZ,
    enabled                    BOOLEAN     NOT NULL,
    disabled_reason            TEXT,
    failing_since              TIMESTAMPTZ,
    created_at                 TIMESTAMPTZ NOT NULL,
    updated_at                 TIMESTAMPTZ NOT NULL,
    CONSTRAINT webhook_endpoints_pkey PRIMARY KEY (tenant_id, id)
);

CREATE TABLE webhook_deliveries (
    tenant_id       UUID        NOT NULL,
    id              UUID        NOT NULL,
    endpoint_id     UUID        NOT NULL,
    issuance_id     UUID        NOT NULL,
    sequence        BIGINT      NOT NULL,
    event_type      TEXT        NOT NULL,
    message_id      TEXT        NOT NULL,
    payload         JSONB       NOT NULL,
    state           TEXT        NOT NULL,
    attempts        BIGINT      NOT NULL DEFAULT 0,
    -- Due time while pending; also the lease of a dispatcher that claimed it.
    next_attempt_at TIMESTAMPTZ NOT NULL,
    last_status     BIGINT,
    last_error      TEXT,
    last_latency_ms BIGINT,
    created_at      TIMESTAMPTZ NOT NULL,
    updated_at      TIMESTAMPTZ NOT NULL,
    CONSTRAINT webhook_deliveries_pkey PRIMARY KEY (tenant_id, id),
    CONSTRAINT webhook_deliveries_endpoint_fkey FOREIGN KEY (tenant_id, endpoint_id)
        REFERENCES webhook_endpoints (tenant_id, id) ON DELETE CASCADE,
    CONSTRAINT webhook_deliveries_once_key UNIQUE (tenant_id, endpoint_id, issuance_id, sequence),
    CONSTRAINT webhook_deliveries_state_check CHECK (state IN ('pending', 'delivered', 'failed'))
);

-- The dispatchers' scan: due pending deliveries.
CREATE INDEX webhook_deliveries_due_idx ON webhook_deliveries (next_attempt_at) WHERE state = 'pending';
CREATE INDEX webhook_deliveries_endpoint_idx ON webhook_deliveries (tenant_id, endpoint_id, created_at);

CREATE TABLE webhook_attempts (
    tenant_id   UUID        NOT NULL,
    delivery_id UUID        NOT NULL,
    attempt     BIGINT      NOT NULL,
    at          TIMESTAMPTZ NOT NULL,
    status      BIGINT,
    error       TEXT,
    latency_ms  BIGINT      NOT NULL,
    CONSTRAINT webhook_attempts_pkey PRIMARY KEY (tenant_id, delivery_id, attempt),
    CONSTRAINT webhook_attempts_delivery_fkey FOREIGN KEY (tenant_id, delivery_id)
        REFERENCES webhook_deliveries (tenant_id, id) ON DELETE CASCADE
);
