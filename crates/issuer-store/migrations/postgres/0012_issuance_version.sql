-- The version of an issuance: the sequence of its last event. A new issuance is at version 1
-- (its `created` event); every change adds one, and applies only while the version it was
-- planned from is still current (compare-and-set).
ALTER TABLE issuances ADD COLUMN version BIGINT NOT NULL DEFAULT 1;
UPDATE issuances SET version = (
    SELECT MAX(e.sequence) FROM issuance_events e
    WHERE e.tenant_id = issuances.tenant_id AND e.issuance_id = issuances.id
) WHERE EXISTS (
    SELECT 1 FROM issuance_events e
    WHERE e.tenant_id = issuances.tenant_id AND e.issuance_id = issuances.id AND e.sequence > 1
);
