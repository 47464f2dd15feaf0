-- Webhook endpoints and the outbox of deliveries, written in the same transaction as the event
-- each delivery announces.
CREATE TABLE webhook_endpoints (
    tenant_id                  TEXT    NOT NULL,
    id                         TEXT    NOT NULL,
    url                        TEXT    NOT NULL,
    -- Space-separated webhook types.
    event_types                TEXT    NOT NULL,
    secret_sealed              TEXT    NOT NULL,
    previous_secret_sealed     TEXT,
    previous_secret_expires_at TEXT,
    enabled                    INTEGER NOT NULL CHECK (enabled IN (0, 1)),
    disabled_reason            TEXT,
    failing_since              TEXT,
    created_at                 TEXT    NOT NULL,
    updated_at                 TEXT    NOT NULL,
    CONSTRAINT webhook_endpoints_pkey PRIMARY KEY (tenant_id, id)
) STRICT;

CREATE TABLE webhook_deliveries (
    tenant_id       TEXT    NOT NULL,
    id              TEXT    NOT NULL,
    endpoint_id     TEXT    NOT NULL,
    issuance_id     TEXT    NOT NULL,
    sequence        INTEGER NOT NULL,
    event_type      TEXT    NOT NULL,
    message_id      TEXT    NOT NULL,
    payload         TEXT    NOT NULL,
    state           TEXT    NOT NULL CHECK (state IN ('pending', 'delivered', 'failed')),
    attempts        INTEGER NOT NULL DEFAULT 0,
    next_attempt_at TEXT    NOT NULL,
    last_status     INTEGER,
    last_error      TEXT,
    last_latency_ms INTEGER,
    created_at      TEXT    NOT NULL,
    updated_at      TEXT    NOT NULL,
    CONSTRAINT webhook_deliveries_pkey PRIMARY KEY (tenant_id, id),
    CONSTRAINT webhook_deliveries_endpoint_fkey FOREIGN KEY (tenant_id, endpoint_id)
        REFERENCES webhook_endpoints (tenant_id, id) ON DELETE CASCADE,
    CONSTRAINT webhook_deliveries_once_key UNIQUE (tenant_id, endpoint_id, issuance_id, sequence)
) STRICT;

CREATE INDEX webhook_deliveries_due_idx ON webhook_deliveries (next_attempt_at) WHERE state = 'pending';
CREATE INDEX webhook_deliveries_endpoint_idx ON webhook_deliveries (tenant_id, endpoint_id, created_at);

CREATE TABLE webhook_attempts (
    tenant_id   TEXT    NOT NULL,
    delivery_id TEXT    NOT NULL,
    attempt     INTEGER NOT NULL,
    at          TEXT    NOT NULL,
    status      INTEGER,
    error       TEXT,
    latency_ms  INTEGER NOT NULL,
    CONSTRAINT webhook_attempts_pkey PRIMARY KEY (tenant_id, delivery_id, attempt),
    CONSTRAINT webhook_attempts_delivery_fkey FOREIGN KEY (tenant_id, delivery_id)
        REFERENCES webhook_deliveries (tenant_id, id) ON DELETE CASCADE
) STRICT;
