-- The batch an issuance came in with (bulk creates), so that a batch reads as one operation.
ALTER TABLE issuances ADD COLUMN batch_id TEXT;
CREATE INDEX issuances_batch_idx ON issuances (tenant_id, batch_id, id) WHERE batch_id IS NOT NULL;
