-- Postgres keeps one plan per prepared statement for a connection's lifetime when a generic plan
-- looks as good as a custom one, and always so for the lookups behind foreign keys. Planned while
-- a table is still small, a lookup by (tenant_id, id) could pick a secondary index that begins
-- with tenant_id alone over the primary key, and then scan every row of the tenant on each insert
-- of an event or a webhook attempt. Secondary indexes now lead with the column that sets them
-- apart, so that only the primary key matches a lookup by (tenant_id, id).

-- Serves the status-filtered list, newest first.
DROP INDEX issuances_tenant_status_id_idx;
CREATE INDEX issuances_status_tenant_id_idx ON issuances (status, tenant_id, id);

-- Idempotency; `ON CONFLICT (tenant_id, client_request_id)` infers it in either column order.
ALTER TABLE issuances DROP CONSTRAINT issuances_client_request_id_key;
ALTER TABLE issuances ADD CONSTRAINT issuances_client_request_id_key
    UNIQUE (client_request_id, tenant_id);

-- Serves an endpoint's delivery list and the cascade when an endpoint is deleted.
DROP INDEX webhook_deliveries_endpoint_idx;
CREATE INDEX webhook_deliveries_endpoint_idx
    ON webhook_deliveries (endpoint_id, tenant_id, created_at);

-- One delivery per endpoint and event.
ALTER TABLE webhook_deliveries DROP CONSTRAINT webhook_deliveries_once_key;
ALTER TABLE webhook_deliveries ADD CONSTRAINT webhook_deliveries_once_key
    UNIQUE (issuance_id, sequence, endpoint_id, tenant_id);

-- No query reads a tenant's events in global order; the index only competed with the primary
-- key for lookups of one issuance's events, and cost every event insert.
DROP INDEX issuance_events_tenant_global_sequence_idx;
