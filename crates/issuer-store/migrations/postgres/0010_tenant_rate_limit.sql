-- A tenant's own rate limit for each of its API clients (both NULL: the service default).
ALTER TABLE tenants
    ADD COLUMN rate_limit_per_sec BIGINT,
    ADD COLUMN rate_limit_burst   BIGINT,
    ADD CONSTRAINT tenants_rate_limit_check CHECK (
        (rate_limit_per_sec IS NULL) = (rate_limit_burst IS NULL)
        AND (rate_limit_per_sec IS NULL OR (rate_limit_per_sec >= 1 AND rate_limit_burst >= rate_limit_per_sec))
    );
