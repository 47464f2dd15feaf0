-- A tenant's own rate limit for each of its API clients (both NULL: the service default).
ALTER TABLE tenants ADD COLUMN rate_limit_per_sec INTEGER
    CHECK (rate_limit_per_sec IS NULL OR rate_limit_per_sec >= 1);
ALTER TABLE tenants ADD COLUMN rate_limit_burst INTEGER
    CHECK (rate_limit_burst IS NULL OR rate_limit_burst >= 1);
