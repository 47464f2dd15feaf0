//! Ports: what the use cases need from the outside world. Adapters implement them
//! (`issuer-store` for `Store`, `issuer-coordination` for `IdempotencyLock`, `issuer-auth` for
//! `CodeSealer`).

use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use uuid::Uuid;

use crate::{
    error::Result,
    ids::{IssuanceId, TenantId},
    lifecycle::{Transition, TransitionOutcome, TxCodeAttempt},
    model::{
        ApiClient, Branding, EmailDelivery, InsertOutcome, Issuance, IssuanceEvent, ListFilter,
        Purged, RateLimit, StoreGauges, Tenant,
    },
    status::StatusBlock,
    webhook::{AttemptRecord, WebhookDelivery, WebhookEndpoint},
};

/// Durable state. Every read and write of tenant data is scoped by `TenantId`; the only
/// unscoped lookups are those a caller makes before it knows its tenant (a client id at the
/// token endpoint, an offer id from a wallet).
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Reachability check for readiness.
    async fn ping(&self) -> Result<()>;
    /// Outbox backlogs and pool usage, for metrics.
    async fn gauges(&self) -> Result<StoreGauges>;

    async fn insert_tenant(&self, tenant: &Tenant) -> Result<()>;
    async fn get_tenant(&self, id: TenantId) -> Result<Option<Tenant>>;
    async fn count_tenants(&self) -> Result<u64>;
    /// Replaces the tenant's branding; `false` when there is no such tenant.
    async fn update_tenant_branding(&self, id: TenantId, branding: &Branding) -> Result<bool>;
    /// Sets (or with `None` clears) the rate limit of the tenant's API clients; `false` when
    /// there is no such tenant.
    async fn update_tenant_rate_limit(
        &self,
        id: TenantId,
        limit: Option<RateLimit>,
    ) -> Result<bool>;

    /// Fails with `AlreadyExists` when the client id is taken.
    async fn insert_client(&self, client: &ApiClient) -> Result<()>;
    async fn find_client(&self, client_id: &str) -> Result<Option<ApiClient>>;
    /// Replaces a client's secret hash; `false` when there is no such client in the tenant.
    async fn update_client_secret(
        &self,
        tenant: TenantId,
        client_id: &str,
        secret_hash: &str,
    ) -> Result<bool>;

    /// Inserts the issuance and its first event in one transaction, with its webhook and email
    /// outbox rows. When the tenant already has an issuance with the same
    /// `client_request_id`, nothing is written and that one is returned: the database, not a
    /// lock, decides idempotency. A group of one of [`Self::insert_issuances`].
    async fn insert_issuance(
        &self,
        issuance: &Issuance,
        first_event: &IssuanceEvent,
    ) -> Result<InsertOutcome> {
        self.insert_issuances(&[(issuance.clone(), first_event.clone())])
            .await?
            .pop()
            .unwrap_or_else(|| Err(crate::Error::internal("an insert got no outcome")))
    }
    /// Several creates at once (a batch), each written as [`Self::insert_issuance`] writes it,
    /// in a few multi-row statements and transactions instead of one each. The
    /// (tenant, `client_request_id`) keys are distinct. One outcome per item, in order: an item
    /// that cannot be written fails alone.
    async fn insert_issuances(
        &self,
        items: &[(Issuance, IssuanceEvent)],
    ) -> Result<Vec<Result<InsertOutcome>>>;
    async fn get_issuance(&self, tenant: TenantId, id: IssuanceId) -> Result<Option<Issuance>>;
    async fn find_issuance_by_request_id(
        &self,
        tenant: TenantId,
        client_request_id: &str,
    ) -> Result<Option<Issuance>>;
    /// Newest first, at most `filter.limit`.
    async fn list_issuances(&self, tenant: TenantId, filter: &ListFilter) -> Result<Vec<Issuance>>;
    async fn find_issuance_by_offer_id(&self, offer_id: &str) -> Result<Option<Issuance>>;
    /// The issuance whose pre-authorized code hashes to `code_hash`.
    async fn find_issuance_by_code_hash(&self, code_hash: &str) -> Result<Option<Issuance>>;
    /// Reserves one transaction-code attempt before the code is compared: counts it atomically
    /// while the issuance still has `attempt.version` and fewer than `attempt.max_attempts`
    /// were made, and returns the count after it; `None` otherwise. Of any number of concurrent
    /// callers, at most `max_attempts` in all get `Some`. The count is no change of state: the
    /// version stays.
    async fn reserve_tx_code_attempt(&self, attempt: &TxCodeAttempt) -> Result<Option<i64>>;
    /// Marks a nonce used by `tenant`; `false` when it was used before, in any tenant: nonces
    /// are issued for the whole issuer.
    async fn use_nonce(
        &self,
        tenant: TenantId,
        nonce_hash: &str,
        expires_at: DateTime<Utc>,
    ) -> Result<bool>;
    /// Forgets at most `limit` used nonces that expired before `now`; returns how many.
    async fn purge_used_nonces(&self, now: DateTime<Utc>, limit: u32) -> Result<u64>;
    /// Deletes at most `limit` issuances that ended (left `pending`) and last changed before
    /// `ended_before`, with their events, email rows, webhook deliveries and attempts, all in
    /// one transaction; returns what it deleted. Concurrent callers (replicas) take disjoint
    /// issuances, and an issuance changing at that moment is left for the next pass. An
    /// issuance whose credentials are valid or suspended stays until they expired before
    /// `ended_before` (its backend may still revoke them); status-list entries always stay.
    async fn purge_ended(&self, ended_before: DateTime<Utc>, limit: u32) -> Result<Purged>;
    /// Applies a transition planned by the lifecycle (`Issuance::plan`), all or nothing, in one
    /// transaction: writes the issuance as `transition.after`, appends `transition.event`,
    /// applies its email change and queues its webhook for every matching enabled endpoint —
    /// only while the stored issuance still has `transition.expected_version` (otherwise
    /// `Stale`) and, for an email attempt, while the email row is still pending under the
    /// attempt's lease (otherwise `EmailLeaseLost`). The store decides no rule.
    async fn transition(&self, transition: &Transition) -> Result<TransitionOutcome>;
    /// Pending issuances whose `expires_at` is at or before `now`, oldest first, at most `limit`.
    async fn overdue_pending(
        &self,
        now: DateTime<Utc>,
        limit: u32,
    ) -> Result<Vec<(TenantId, IssuanceId)>>;
    async fn insert_webhook_endpoint(&self, endpoint: &WebhookEndpoint) -> Result<()>;
    async fn list_webhook_endpoints(&self, tenant: TenantId) -> Result<Vec<WebhookEndpoint>>;
    async fn get_webhook_endpoint(
        &self,
        tenant: TenantId,
        id: Uuid,
    ) -> Result<Option<WebhookEndpoint>>;
    /// Replaces the endpoint's mutable fields; `false` when it does not exist.
    async fn update_webhook_endpoint(&self, endpoint: &WebhookEndpoint) -> Result<bool>;
    /// Deletes the endpoint and its deliveries; `false` when it does not exist.
    async fn delete_webhook_endpoint(&self, tenant: TenantId, id: Uuid) -> Result<bool>;
    /// Takes up to `limit` pending deliveries due at `now` whose endpoint is enabled, leasing
    /// them until `lease_until` (their `next_attempt_at`), so that no other dispatcher takes
    /// them meanwhile and a crashed one's deliveries come back when the lease ends.
    async fn claim_deliveries(
        &self,
        now: DateTime<Utc>,
        lease_until: DateTime<Utc>,
        limit: u32,
    ) -> Result<Vec<WebhookDelivery>>;
    /// Records an attempt: the delivery's new state, the attempt log, and the endpoint's
    /// failure bookkeeping, in one transaction — only while the delivery is still pending under
    /// the attempt's lease (`claimed_until`); a late result is dropped.
    async fn record_attempt(&self, attempt: &AttemptRecord) -> Result<()>;
    /// An endpoint's deliveries, newest first.
    async fn list_deliveries(
        &self,
        tenant: TenantId,
        endpoint: Uuid,
        limit: u32,
    ) -> Result<Vec<WebhookDelivery>>;
    /// Makes a delivery due now again (manual retry); `false` when it does not exist.
    async fn retry_delivery(
        &self,
        tenant: TenantId,
        endpoint: Uuid,
        id: Uuid,
        now: DateTime<Utc>,
    ) -> Result<bool>;
    /// Takes up to `limit` pending emails due at `now`, leasing them until `lease_until` (their
    /// `next_attempt_at`), as [`Store::claim_deliveries`] does for webhooks.
    async fn claim_emails(
        &self,
        now: DateTime<Utc>,
        lease_until: DateTime<Utc>,
        limit: u32,
    ) -> Result<Vec<EmailDelivery>>;
    /// The email outbox rows of those of `ids` that have one (delivery `email`), in any order.
    async fn get_email_deliveries(
        &self,
        tenant: TenantId,
        ids: &[IssuanceId],
    ) -> Result<Vec<EmailDelivery>>;
    /// Events of one issuance with `sequence > after`, in order.
    async fn list_events(
        &self,
        tenant: TenantId,
        issuance: IssuanceId,
        after: i64,
    ) -> Result<Vec<IssuanceEvent>>;

    /// Reserves `count` status-list allocations: from the oldest list with room, opening new
    /// lists of `list_size` entries (with a fresh random id and permutation key) as lists
    /// fill. Each allocation is handed out once, across replicas; an allocation whose
    /// credential is never issued is simply never used (nothing is reused). The blocks map
    /// allocations to indices ([`StatusBlock::refs`]).
    async fn allocate_status(&self, count: i64, list_size: i64) -> Result<Vec<StatusBlock>>;
    /// A status list's size and its entries: without `changed_since`, every entry whose status
    /// is not valid (0); with it, every entry (of any status) last changed at or after it.
    /// `None` when there is no such list.
    async fn status_list(
        &self,
        list_id: Uuid,
        changed_since: Option<DateTime<Utc>>,
    ) -> Result<Option<StatusListContent>>;
    /// The lists holding entries of the issuance's credentials.
    async fn status_lists_of(&self, tenant: TenantId, issuance: IssuanceId) -> Result<Vec<Uuid>>;
}

/// What a status list holds, as a store reads it to publish it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatusListContent {
    pub size: i64,
    /// `(idx, status value)` of the entries asked for, in no particular order.
    pub entries: Vec<(i64, u8)>,
}

/// A lock failed to answer (Redis down, timeout). Callers fall back to the database.
#[derive(Debug, thiserror::Error)]
#[error("idempotency lock unavailable: {0}")]
pub struct LockError(pub String);

/// Proof of holding a lock; releasing needs it so nobody releases a lock taken over by another.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LockToken(pub String);

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LockAttempt {
    Acquired(LockToken),
    /// Held by someone else.
    Busy,
}

/// Short-lived mutual exclusion per idempotency key. It only spares duplicate work and lets a
/// concurrent duplicate wait for the first request; correctness never depends on it.
///
/// Keys are taken in groups, so that a batch of creates costs one round trip to a shared lock,
/// not one per item; a single key is a group of one. A request never waits while it holds
/// keys: it takes the free ones, and for the others waits until their holders are done, then
/// lets the store decide (the first request's row exists by then). So duplicates waiting for
/// one key proceed together, not one after another, and two groups sharing keys never wait on
/// each other.
#[async_trait]
pub trait IdempotencyLock: Send + Sync + 'static {
    /// Takes every free key of `keys` for `ttl` under one token; a key held by another is
    /// `Busy`. One attempt per key, in order.
    async fn acquire_many(
        &self,
        keys: &[String],
        ttl: Duration,
    ) -> Result<Vec<LockAttempt>, LockError>;
    /// Waits until no one holds any of `keys`, for up to `wait`; `false` when some still are.
    async fn wait_released(&self, keys: &[String], wait: Duration) -> Result<bool, LockError>;
    /// Releases each of `keys` that `token` still holds.
    async fn release_many(&self, keys: &[String], token: &LockToken) -> Result<(), LockError>;
    async fn ping(&self) -> Result<(), LockError>;

    /// Takes `key` for `ttl` if it is free.
    async fn acquire(&self, key: &str, ttl: Duration) -> Result<LockAttempt, LockError> {
        let mut attempts = self.acquire_many(&[key.to_owned()], ttl).await?;
        Ok(attempts.pop().unwrap_or(LockAttempt::Busy))
    }

    /// Releases `key` if `token` still holds it.
    async fn release(&self, key: &str, token: &LockToken) -> Result<(), LockError> {
        self.release_many(&[key.to_owned()], token).await
    }
}

/// Remembers single-use values (the `jti` of DPoP proofs) across replicas until they expire,
/// so that a captured proof cannot be replayed on any replica within its acceptance window.
#[async_trait]
pub trait ReplayCache: Send + Sync + 'static {
    /// Records `key` until `until`; `false` when it is already recorded (a replay). An error
    /// means the cache cannot answer; callers then refuse the value rather than accept a
    /// possible replay.
    async fn first_use(&self, key: &str, until: DateTime<Utc>) -> Result<bool, LockError>;
}

/// Encrypts secrets that must be shown again later (the pre-authorized code in a repeatedly
/// fetched offer) so the database alone never reveals them.
pub trait CodeSealer: Send + Sync + 'static {
    fn seal(&self, plaintext: &str) -> String;
    fn open(&self, sealed: &str) -> Result<String>;
    /// A keyed digest (base64url) for secrets that are only ever compared, never shown again:
    /// short ones like transaction codes cannot be brute-forced from the database alone.
    fn digest(&self, value: &str) -> String;
}

/// Announces that an issuance has new events, after they are committed. Fire and forget: a
/// lost announcement only delays watchers until they re-read the store, never loses an event.
pub trait EventNotifier: Send + Sync + 'static {
    fn notify(&self, tenant: TenantId, issuance: IssuanceId);
    /// Announces that entries of these status lists changed, so that every replica publishes
    /// them afresh. Lost announcements are caught up when a list's token is revalidated.
    fn status_lists_changed(&self, _lists: &[Uuid]) {}
}

/// A notifier for contexts nobody watches (provisioning, tests of other parts).
#[derive(Debug, Clone, Copy, Default)]
pub struct NoNotifier;

impl EventNotifier for NoNotifier {
    fn notify(&self, _: TenantId, _: IssuanceId) {}
}

pub trait Clock: Send + Sync + 'static {
    fn now(&self) -> DateTime<Utc>;
}

/// The wall clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> DateTime<Utc> {
        Utc::now()
    }
}
