//! Tracing and metrics around any [`Store`], so that the stores themselves only store: every
//! call is a client span `store.<method>` with `db.system`, and committed status changes are
//! counted (`issuer_issuance_status_changes_total`).

use issuer_domain::{
    error::Result,
    ids::{IssuanceId, TenantId},
    lifecycle::{Transition, TransitionOutcome, TxCodeAttempt},
    model::{
        ApiClient, Branding, EmailDelivery, InsertOutcome, Issuance, IssuanceEvent, ListFilter,
        Purged, RateLimit, StoreGauges, Tenant,
    },
    ports::{StatusListContent, Store},
    status::StatusBlock,
    webhook::{AttemptRecord, WebhookDelivery, WebhookEndpoint},
};
use tracing::Instrument;
use uuid::Uuid;

use chrono::{DateTime, Utc};

/// A store whose calls are traced and counted.
#[derive(Debug, Clone)]
pub struct Metered<S> {
    inner: S,
    system: &'static str,
}

impl<S> Metered<S> {
    /// Wraps `inner`; `system` is its OpenTelemetry `db.system` (`postgresql`, `sqlite`).
    pub fn new(inner: S, system: &'static str) -> Self {
        Self { inner, system }
    }

    pub fn inner(&self) -> &S {
        &self.inner
    }
}

/// Counts a committed status change (the reasons are the service's own few words, so the
/// labels stay bounded).
fn count_status_change((t,): (&Transition,), outcome: &Result<TransitionOutcome>) {
    if let Ok(TransitionOutcome::Applied(_)) = outcome
        && let Some((status, reason)) = t.status_change()
    {
        metrics::counter!(
            "issuer_issuance_status_changes_total",
            "status" => status.as_str(),
            "reason" => reason.map(|r| r.as_str()).unwrap_or_default()
        )
        .increment(1);
    }
}

/// The store's methods, each in a span named after it; `after f` also calls
/// `f((args..,), &out)`.
macro_rules! metered {
    ($( fn $name:ident(&self $(, $arg:ident : $ty:ty)*) -> $ret:ty $(, after $hook:path)?; )*) => {
        #[async_trait::async_trait]
        impl<S: Store> Store for Metered<S> {
            $(
                async fn $name(&self $(, $arg: $ty)*) -> $ret {
                    let span = tracing::info_span!(
                        concat!("store.", stringify!($name)),
                        db.system = self.system,
                        otel.kind = "client",
                    );
                    // Every argument is a reference or `Copy`: kept for the hook.
                    let _args = ($($arg,)*);
                    let out = self.inner.$name($($arg),*).instrument(span).await;
                    $( $hook(_args, &out); )?
                    out
                }
            )*
        }
    };
}

metered! {
    fn ping(&self) -> Result<()>;
    fn gauges(&self) -> Result<StoreGauges>;
    fn insert_tenant(&self, tenant: &Tenant) -> Result<()>;
    fn get_tenant(&self, id: TenantId) -> Result<Option<Tenant>>;
    fn count_tenants(&self) -> Result<u64>;
    fn update_tenant_branding(&self, id: TenantId, branding: &Branding) -> Result<bool>;
    fn update_tenant_rate_limit(&self, id: TenantId, limit: Option<RateLimit>) -> Result<bool>;
    fn insert_client(&self, client: &ApiClient) -> Result<()>;
    fn find_client(&self, client_id: &str) -> Result<Option<ApiClient>>;
    fn update_client_secret(&self, tenant: TenantId, client_id: &str, secret_hash: &str) -> Result<bool>;
    fn insert_issuance(&self, issuance: &Issuance, first_event: &IssuanceEvent) -> Result<InsertOutcome>;
    fn insert_issuances(&self, items: &[(Issuance, IssuanceEvent)]) -> Result<Vec<Result<InsertOutcome>>>;
    fn get_issuance(&self, tenant: TenantId, id: IssuanceId) -> Result<Option<Issuance>>;
    fn find_issuance_by_request_id(&self, tenant: TenantId, client_request_id: &str) -> Result<Option<Issuance>>;
    fn list_issuances(&self, tenant: TenantId, filter: &ListFilter) -> Result<Vec<Issuance>>;
    fn find_issuance_by_offer_id(&self, offer_id: &str) -> Result<Option<Issuance>>;
    fn find_issuance_by_code_hash(&self, code_hash: &str) -> Result<Option<Issuance>>;
    fn reserve_tx_code_attempt(&self, attempt: &TxCodeAttempt) -> Result<Option<i64>>;
    fn use_nonce(&self, tenant: TenantId, nonce_hash: &str, expires_at: DateTime<Utc>) -> Result<bool>;
    fn purge_used_nonces(&self, now: DateTime<Utc>, limit: u32) -> Result<u64>;
    fn purge_ended(&self, ended_before: DateTime<Utc>, limit: u32) -> Result<Purged>;
    fn transition(&self, transition: &Transition) -> Result<TransitionOutcome>, after count_status_change;
    fn overdue_pending(&self, now: DateTime<Utc>, limit: u32) -> Result<Vec<(TenantId, IssuanceId)>>;
    fn insert_webhook_endpoint(&self, endpoint: &WebhookEndpoint) -> Result<()>;
    fn list_webhook_endpoints(&self, tenant: TenantId) -> Result<Vec<WebhookEndpoint>>;
    fn get_webhook_endpoint(&self, tenant: TenantId, id: Uuid) -> Result<Option<WebhookEndpoint>>;
    fn update_webhook_endpoint(&self, endpoint: &WebhookEndpoint) -> Result<bool>;
    fn delete_webhook_endpoint(&self, tenant: TenantId, id: Uuid) -> Result<bool>;
    fn claim_deliveries(&self, now: DateTime<Utc>, lease_until: DateTime<Utc>, limit: u32) -> Result<Vec<WebhookDelivery>>;
    fn record_attempt(&self, attempt: &AttemptRecord) -> Result<()>;
    fn list_deliveries(&self, tenant: TenantId, endpoint: Uuid, limit: u32) -> Result<Vec<WebhookDelivery>>;
    fn retry_delivery(&self, tenant: TenantId, endpoint: Uuid, id: Uuid, now: DateTime<Utc>) -> Result<bool>;
    fn claim_emails(&self, now: DateTime<Utc>, lease_until: DateTime<Utc>, limit: u32) -> Result<Vec<EmailDelivery>>;
    fn get_email_deliveries(&self, tenant: TenantId, ids: &[IssuanceId]) -> Result<Vec<EmailDelivery>>;
    fn list_events(&self, tenant: TenantId, issuance: IssuanceId, after: i64) -> Result<Vec<IssuanceEvent>>;
    fn allocate_status(&self, count: i64, list_size: i64) -> Result<Vec<StatusBlock>>;
    fn status_list(&self, list_id: Uuid, changed_since: Option<DateTime<Utc>>) -> Result<Option<StatusListContent>>;
    fn status_lists_of(&self, tenant: TenantId, issuance: IssuanceId) -> Result<Vec<Uuid>>;
}
