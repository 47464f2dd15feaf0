-- Credential status after issuance (IETF Token Status List): revocation and suspension.

-- The credentials an accepted issuance gave its wallet: their status, how many copies, and when
-- they expire (retention keeps a revocable issuance until then).
ALTER TABLE issuances ADD COLUMN credential_status TEXT;
ALTER TABLE issuances ADD COLUMN credentials_issued BIGINT NOT NULL DEFAULT 0;
ALTER TABLE issuances ADD COLUMN credential_expires_at TIMESTAMPTZ;

-- Status lists, shared by every tenant. `allocated` counts the allocations handed out; the n-th
-- gets index permutation(seed, n), so an index is never handed out twice.
CREATE TABLE status_lists (
    id UUID PRIMARY KEY,
    size BIGINT NOT NULL CHECK (size >= 2),
    allocated BIGINT NOT NULL DEFAULT 0 CHECK (allocated <= size),
    seed TEXT NOT NULL,
    created_at TIMESTAMPTZ NOT NULL
);
CREATE INDEX status_lists_open_idx ON status_lists (created_at, id) WHERE allocated < size;

-- One entry per issued credential copy: 0 valid, 1 revoked, 2 suspended. Entries outlive their
-- issuance (retention), since a revoked credential must stay revoked in its list.
CREATE TABLE status_entries (
    list_id UUID NOT NULL REFERENCES status_lists (id),
    idx BIGINT NOT NULL,
    tenant_id UUID NOT NULL,
    issuance_id UUID NOT NULL,
    status BIGINT NOT NULL DEFAULT 0,
    updated_at TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (list_id, idx)
);
CREATE INDEX status_entries_issuance_idx ON status_entries (tenant_id, issuance_id);
-- What publishing a list reads: its entries that are not valid, and after a change the entries
-- changed since the last read.
CREATE INDEX status_entries_set_idx ON status_entries (list_id, idx, status) WHERE status <> 0;
CREATE INDEX status_entries_changed_idx ON status_entries (list_id, updated_at);
