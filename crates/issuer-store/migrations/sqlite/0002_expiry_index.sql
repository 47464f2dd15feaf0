-- The expiry sweeper's scan: only pending issuances, by deadline. Non-unique, so it need not
-- lead with tenant_id even when the table is distributed by tenant.
CREATE INDEX issuances_pending_expiry_idx ON issuances (expires_at) WHERE status = 'pending';
