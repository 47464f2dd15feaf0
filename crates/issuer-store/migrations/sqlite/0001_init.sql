-- The SQLite twin of the Postgres schema, for single-node deployments and tests. Ids are
-- lowercase hyphenated UUID text, so text order is UUID order (the list is ordered by id).
-- Timestamps are RFC 3339 UTC text with fixed-width microseconds, so text order is time order.
-- STRICT makes SQLite reject values of the wrong type instead of silently storing them.

CREATE TABLE tenants (
    id                     TEXT    NOT NULL,
    name                   TEXT    NOT NULL,
    default_offer_ttl_secs INTEGER NOT NULL,
    max_offer_ttl_secs     INTEGER NOT NULL,
    created_at             TEXT    NOT NULL,
    CONSTRAINT tenants_pkey PRIMARY KEY (id)
) STRICT;

CREATE TABLE api_clients (
    tenant_id   TEXT    NOT NULL,
    client_id   TEXT    NOT NULL,
    secret_hash TEXT    NOT NULL,
    -- Space separated scope names.
    scopes      TEXT    NOT NULL,
    active      INTEGER NOT NULL,
    created_at  TEXT    NOT NULL,
    updated_at  TEXT    NOT NULL,
    CONSTRAINT api_clients_pkey PRIMARY KEY (tenant_id, client_id),
    -- The token endpoint looks a client up before it knows the tenant.
    CONSTRAINT api_clients_client_id_key UNIQUE (client_id),
    CONSTRAINT api_clients_active_check CHECK (active IN (0, 1))
) STRICT;

CREATE TABLE issuances (
    tenant_id                   TEXT NOT NULL,
    id                          TEXT NOT NULL,
    client_request_id           TEXT NOT NULL,
    request_fingerprint         TEXT NOT NULL,
    credential_configuration_id TEXT NOT NULL,
    status                      TEXT NOT NULL,
    reason                      TEXT,
    -- JSON text; NULL once purged.
    payload                     TEXT,
    delivery                    TEXT NOT NULL,
    email                       TEXT,
    grant_type                  TEXT NOT NULL,
    offer_id                    TEXT NOT NULL,
    pre_authorized_code_hash    TEXT NOT NULL,
    pre_authorized_code_sealed  TEXT NOT NULL,
    expires_at                  TEXT NOT NULL,
    created_at                  TEXT NOT NULL,
    updated_at                  TEXT NOT NULL,
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
) STRICT;

-- Serves the status-filtered list, newest first.
CREATE INDEX issuances_tenant_status_id_idx ON issuances (tenant_id, status, id);

CREATE TABLE issuance_events (
    -- SQLite's rowid is the cheapest store-assigned, ever-increasing counter; AUTOINCREMENT
    -- keeps it from reusing the values of deleted rows.
    global_sequence INTEGER PRIMARY KEY AUTOINCREMENT,
    tenant_id       TEXT    NOT NULL,
    issuance_id     TEXT    NOT NULL,
    sequence        INTEGER NOT NULL,
    kind            TEXT    NOT NULL,
    status          TEXT    NOT NULL,
    reason          TEXT,
    occurred_at     TEXT    NOT NULL,
    CONSTRAINT issuance_events_sequence_key UNIQUE (tenant_id, issuance_id, sequence),
    CONSTRAINT issuance_events_issuance_fkey
        FOREIGN KEY (tenant_id, issuance_id) REFERENCES issuances (tenant_id, id),
    CONSTRAINT issuance_events_sequence_check CHECK (sequence > 0),
    CONSTRAINT issuance_events_status_check
        CHECK (status IN ('pending', 'accepted', 'rejected', 'error'))
) STRICT;

CREATE INDEX issuance_events_tenant_global_sequence_idx
    ON issuance_events (tenant_id, global_sequence);
