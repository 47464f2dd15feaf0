-- When an offer was first fetched: `offer_retrieved` is recorded once, so later fetches are
-- reads only and an anonymous link holder cannot grow the event log.
ALTER TABLE issuances ADD COLUMN offer_retrieved_at TEXT;
