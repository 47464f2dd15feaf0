-- Retention: ended issuances are found by when they last changed, and their webhook deliveries
-- by issuance, so a purge pass touches only what it deletes.
CREATE INDEX issuances_ended_updated_at_idx ON issuances (updated_at) WHERE status <> 'pending';
CREATE INDEX webhook_deliveries_issuance_idx ON webhook_deliveries (tenant_id, issuance_id);
