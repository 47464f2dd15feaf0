//! Webhooks: the endpoint use cases of tenants, with the typed bodies that the REST API and its
//! OpenAPI document share, and the dispatcher that delivers the outbox.
//!
//! Every replica runs a dispatcher. It claims due deliveries with a lease, so replicas share
//! the work without doing any twice and a crashed replica's claims return when their lease
//! ends; it is woken by the event hub when something commits (so delivery follows a change
//! within milliseconds) and polls once a second in case a wake-up was lost.

use std::{
    collections::{HashMap, hash_map::Entry},
    sync::Arc,
    time::Duration,
};

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use issuer_coordination::events::News;
use issuer_domain::{
    Error, ErrorCode, FieldViolation,
    ids::TenantId,
    model::Scope,
    ports::{Clock, CodeSealer, Store},
    service::Principal,
    webhook::{self, AttemptRecord, DeliveryState, WebhookDelivery, WebhookEndpoint},
};
use issuer_webhooks::{Attempt, Delivery, NetworkPolicy, Outcome, RetrySchedule, WebhookSecret};
use serde::Serialize;
use serde_json::Value;
use tokio::sync::{Semaphore, broadcast};
use tracing::Instrument;
use utoipa::ToSchema;
use uuid::Uuid;

use crate::view::{rfc3339, rfc3339_opt};

/// How long a claimed delivery stays with its dispatcher before another may take it.
const LEASE: chrono::Duration = chrono::Duration::seconds(60);
const CLAIM_BATCH: u32 = 128;
const MAX_OVERLAP_SECS: i64 = 7 * 24 * 3600;
const DEFAULT_OVERLAP_SECS: i64 = 24 * 3600;

/// The webhook event types.
#[derive(ToSchema)]
pub enum WebhookEventType {
    #[serde(rename = "issuance.created")]
    Created,
    #[serde(rename = "issuance.accepted")]
    Accepted,
    #[serde(rename = "issuance.rejected")]
    Rejected,
    #[serde(rename = "issuance.error")]
    Error,
    #[serde(rename = "issuance.offer_retrieved")]
    OfferRetrieved,
    #[serde(rename = "credential.revoked")]
    CredentialRevoked,
    #[serde(rename = "credential.suspended")]
    CredentialSuspended,
    #[serde(rename = "credential.reinstated")]
    CredentialReinstated,
}

#[derive(ToSchema)]
#[schema(as = DeliveryState)]
#[serde(rename_all = "snake_case")]
pub enum DeliveryStateSchema {
    Pending,
    Delivered,
    Failed,
}

/// A webhook endpoint.
#[derive(Debug, Clone, Serialize, ToSchema)]
#[schema(as = WebhookEndpoint)]
pub struct EndpointView {
    pub id: String,
    pub url: String,
    #[schema(value_type = Vec<WebhookEventType>)]
    pub event_types: Vec<String>,
    pub enabled: bool,
    /// Why the service disabled it (`gone`, `failing`); `null` otherwise.
    pub disabled_reason: Option<String>,
    /// Since when deliveries have been failing; `null` while they succeed.
    #[serde(serialize_with = "rfc3339_opt")]
    #[schema(value_type = Option<String>, format = DateTime)]
    pub failing_since: Option<DateTime<Utc>>,
    #[serde(serialize_with = "rfc3339")]
    #[schema(value_type = String, format = DateTime)]
    pub created_at: DateTime<Utc>,
    #[serde(serialize_with = "rfc3339")]
    #[schema(value_type = String, format = DateTime)]
    pub updated_at: DateTime<Utc>,
}

impl From<&WebhookEndpoint> for EndpointView {
    fn from(e: &WebhookEndpoint) -> Self {
        Self {
            id: e.id.to_string(),
            url: e.url.clone(),
            event_types: e.event_types.clone(),
            enabled: e.enabled,
            disabled_reason: e.disabled_reason.clone(),
            failing_since: e.failing_since,
            created_at: e.created_at,
            updated_at: e.updated_at,
        }
    }
}

/// A webhook endpoint with its signing secret, shown only when created or rotated.
#[derive(Debug, Clone, Serialize, ToSchema)]
#[schema(as = WebhookEndpointWithSecret)]
pub struct EndpointWithSecret {
    #[serde(flatten)]
    pub endpoint: EndpointView,
    /// `whsec_…` (Standard Webhooks).
    pub secret: String,
    /// After a rotation: until when the previous secret still signs too.
    #[serde(
        skip_serializing_if = "Option::is_none",
        serialize_with = "rfc3339_opt"
    )]
    #[schema(value_type = Option<String>, format = DateTime)]
    pub previous_secret_expires_at: Option<DateTime<Utc>>,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
#[schema(as = WebhookEndpointList)]
pub struct EndpointList {
    pub webhook_endpoints: Vec<EndpointView>,
}

/// One webhook message to one endpoint, with its attempts so far.
#[derive(Debug, Clone, Serialize, ToSchema)]
#[schema(as = WebhookDelivery)]
pub struct DeliveryView {
    pub id: String,
    pub issuance_id: String,
    pub sequence: i64,
    #[schema(value_type = WebhookEventType)]
    pub event_type: String,
    /// The `webhook-id` header: the same on every attempt.
    pub webhook_id: String,
    #[schema(value_type = DeliveryStateSchema)]
    pub state: &'static str,
    pub attempts: i64,
    /// When `pending`: the next attempt.
    #[serde(serialize_with = "rfc3339_opt")]
    #[schema(value_type = Option<String>, format = DateTime)]
    pub next_attempt_at: Option<DateTime<Utc>>,
    /// HTTP status of the last attempt.
    pub last_status: Option<i64>,
    pub last_error: Option<String>,
    pub last_latency_ms: Option<i64>,
    #[serde(serialize_with = "rfc3339")]
    #[schema(value_type = String, format = DateTime)]
    pub created_at: DateTime<Utc>,
    #[serde(serialize_with = "rfc3339")]
    #[schema(value_type = String, format = DateTime)]
    pub updated_at: DateTime<Utc>,
}

impl From<&WebhookDelivery> for DeliveryView {
    fn from(d: &WebhookDelivery) -> Self {
        Self {
            id: d.id.to_string(),
            issuance_id: d.issuance_id.to_string(),
            sequence: d.sequence,
            event_type: d.event_type.clone(),
            webhook_id: d.message_id.clone(),
            state: d.state.as_str(),
            attempts: d.attempts,
            next_attempt_at: (d.state == DeliveryState::Pending).then_some(d.next_attempt_at),
            last_status: d.last_status,
            last_error: d.last_error.clone(),
            last_latency_ms: d.last_latency_ms,
            created_at: d.created_at,
            updated_at: d.updated_at,
        }
    }
}

#[derive(Debug, Clone, Serialize, ToSchema)]
#[schema(as = WebhookDeliveryList)]
pub struct DeliveryList {
    pub deliveries: Vec<DeliveryView>,
}

/// Register an endpoint.
#[derive(Debug, Clone, PartialEq, Eq, ToSchema)]
#[schema(as = CreateWebhookEndpoint)]
pub struct CreateEndpoint {
    /// `https` URL (at most 2048 characters).
    pub url: String,
    /// Default: every type but `issuance.created`.
    #[schema(value_type = Option<Vec<WebhookEventType>>)]
    pub event_types: Option<Vec<String>>,
}

impl CreateEndpoint {
    /// Reads and checks a request body; every bad field is reported.
    pub fn parse(body: &Value, policy: &NetworkPolicy) -> Result<Self, Error> {
        let mut violations = Vec::new();
        let url = check_url(body.get("url").unwrap_or(&Value::Null), policy)
            .map_err(|v| violations.push(v))
            .ok();
        let event_types = event_types(body.get("event_types"))
            .map_err(|v| violations.push(v))
            .ok();
        match (url, event_types) {
            (Some(url), Some(event_types)) => Ok(Self { url, event_types }),
            _ => Err(Error::invalid(violations)),
        }
    }
}

/// Change an endpoint; absent fields stay. Enabling clears the service's disabling.
#[derive(Debug, Clone, PartialEq, Eq, ToSchema)]
#[schema(as = UpdateWebhookEndpoint)]
pub struct UpdateEndpoint {
    pub url: Option<String>,
    #[schema(value_type = Option<Vec<WebhookEventType>>)]
    pub event_types: Option<Vec<String>>,
    pub enabled: Option<bool>,
}

impl UpdateEndpoint {
    /// Reads and checks a request body; every bad field is reported.
    pub fn parse(body: &Value, policy: &NetworkPolicy) -> Result<Self, Error> {
        let mut violations = Vec::new();
        let url = body
            .get("url")
            .and_then(|url| check_url(url, policy).map_err(|v| violations.push(v)).ok());
        let event_types = event_types(body.get("event_types"))
            .map_err(|v| violations.push(v))
            .ok()
            .flatten();
        let enabled = match body.get("enabled") {
            None | Some(Value::Null) => None,
            Some(Value::Bool(b)) => Some(*b),
            Some(_) => {
                violations.push(FieldViolation::new("enabled", "must be a boolean"));
                None
            }
        };
        if violations.is_empty() {
            Ok(Self {
                url,
                event_types,
                enabled,
            })
        } else {
            Err(Error::invalid(violations))
        }
    }
}

/// Rotate the secret; the old one keeps signing beside the new for `overlap_secs`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ToSchema)]
pub struct RotateSecret {
    /// 0 to 604800 (a week); default 86400.
    #[schema(minimum = 0, maximum = 604800)]
    pub overlap_secs: Option<i64>,
}

impl RotateSecret {
    /// Reads a request body (`null` when there was none).
    pub fn parse(body: &Value) -> Result<Self, Error> {
        let overlap_secs = match body.get("overlap_secs") {
            None | Some(Value::Null) => None,
            Some(v) => Some(
                v.as_i64()
                    .filter(|s| (0..=MAX_OVERLAP_SECS).contains(s))
                    .ok_or_else(|| {
                        Error::invalid_field(
                            "overlap_secs",
                            format!("must be an integer from 0 to {MAX_OVERLAP_SECS}"),
                        )
                    })?,
            ),
        };
        Ok(Self { overlap_secs })
    }
}

fn check_url(url: &Value, policy: &NetworkPolicy) -> Result<String, FieldViolation> {
    let url = url
        .as_str()
        .filter(|u| u.len() <= 2048)
        .ok_or_else(|| FieldViolation::new("url", "must be a URL of at most 2048 characters"))?;
    policy
        .check_url(url)
        .map_err(|e| FieldViolation::new("url", e.to_string()))?;
    Ok(url.to_owned())
}

fn event_types(v: Option<&Value>) -> Result<Option<Vec<String>>, FieldViolation> {
    let Some(v) = v.filter(|v| !v.is_null()) else {
        return Ok(None);
    };
    let list = v.as_array().filter(|a| !a.is_empty()).ok_or_else(|| {
        FieldViolation::new("event_types", "must be a non-empty array of event types")
    })?;
    let mut out = Vec::new();
    for (i, t) in list.iter().enumerate() {
        match t.as_str().filter(|t| webhook::ALL_TYPES.contains(t)) {
            Some(t) if !out.iter().any(|o| o == t) => out.push(t.to_owned()),
            Some(_) => {}
            None => {
                return Err(FieldViolation::new(
                    format!("event_types[{i}]"),
                    format!("must be one of {}", webhook::ALL_TYPES.join(", ")),
                ));
            }
        }
    }
    Ok(Some(out))
}

fn parse_id(id: &str) -> Result<Uuid, Error> {
    Uuid::parse_str(id).map_err(|_| Error::not_found("webhook endpoint"))
}

/// A tenant's webhook endpoints: register, read, change, delete, rotate the secret, and the
/// delivery log with manual retry. Scope `webhooks:manage`.
pub struct WebhookEndpoints {
    pub store: Arc<dyn Store>,
    pub sealer: Arc<dyn CodeSealer>,
    pub clock: Arc<dyn Clock>,
    /// Which URLs an endpoint may have.
    pub policy: Arc<NetworkPolicy>,
    /// Wakes this replica's dispatcher (manual retries).
    pub wake: broadcast::Sender<()>,
}

impl WebhookEndpoints {
    async fn endpoint(&self, who: &Principal, id: &str) -> Result<WebhookEndpoint, Error> {
        who.require(Scope::WebhooksManage)?;
        self.store
            .get_webhook_endpoint(who.tenant_id, parse_id(id)?)
            .await?
            .ok_or_else(|| Error::not_found("webhook endpoint"))
    }

    /// Registers an endpoint; the answer carries its secret, this once.
    pub async fn create(&self, who: &Principal, body: &Value) -> Result<EndpointWithSecret, Error> {
        who.require(Scope::WebhooksManage)?;
        let request = CreateEndpoint::parse(body, &self.policy)?;
        let secret = WebhookSecret::generate();
        let now = self.clock.now();
        let endpoint = WebhookEndpoint {
            tenant_id: who.tenant_id,
            id: Uuid::new_v4(),
            url: request.url,
            event_types: request
                .event_types
                .unwrap_or_else(|| webhook::DEFAULT_TYPES.map(str::to_owned).to_vec()),
            secret_sealed: self.sealer.seal(secret.expose()),
            previous_secret_sealed: None,
            previous_secret_expires_at: None,
            enabled: true,
            disabled_reason: None,
            failing_since: None,
            created_at: now,
            updated_at: now,
        };
        self.store.insert_webhook_endpoint(&endpoint).await?;
        tracing::info!(tenant_id = %who.tenant_id, endpoint_id = %endpoint.id, "webhook endpoint registered");
        Ok(EndpointWithSecret {
            endpoint: EndpointView::from(&endpoint),
            secret: secret.expose().to_owned(),
            previous_secret_expires_at: None,
        })
    }

    pub async fn list(&self, who: &Principal) -> Result<EndpointList, Error> {
        who.require(Scope::WebhooksManage)?;
        let all = self.store.list_webhook_endpoints(who.tenant_id).await?;
        Ok(EndpointList {
            webhook_endpoints: all.iter().map(EndpointView::from).collect(),
        })
    }

    pub async fn get(&self, who: &Principal, id: &str) -> Result<EndpointView, Error> {
        Ok(EndpointView::from(&self.endpoint(who, id).await?))
    }

    /// Changes `url`, `event_types` or `enabled`; enabling clears the service's disabling.
    pub async fn update(
        &self,
        who: &Principal,
        id: &str,
        body: &Value,
    ) -> Result<EndpointView, Error> {
        let mut e = self.endpoint(who, id).await?;
        let change = UpdateEndpoint::parse(body, &self.policy)?;
        if let Some(url) = change.url {
            e.url = url;
        }
        if let Some(types) = change.event_types {
            e.event_types = types;
        }
        match change.enabled {
            None => {}
            Some(true) => {
                e.enabled = true;
                e.disabled_reason = None;
                e.failing_since = None;
            }
            Some(false) => {
                e.enabled = false;
                e.disabled_reason = Some("disabled by the tenant".to_owned());
            }
        }
        e.updated_at = self.clock.now();
        if !self.store.update_webhook_endpoint(&e).await? {
            return Err(Error::not_found("webhook endpoint"));
        }
        Ok(EndpointView::from(&e))
    }

    pub async fn delete(&self, who: &Principal, id: &str) -> Result<(), Error> {
        who.require(Scope::WebhooksManage)?;
        if self
            .store
            .delete_webhook_endpoint(who.tenant_id, parse_id(id)?)
            .await?
        {
            Ok(())
        } else {
            Err(Error::not_found("webhook endpoint"))
        }
    }

    /// A new secret; the old one keeps signing beside it for `overlap_secs` (default a day),
    /// so receivers can switch without losing a message.
    pub async fn rotate_secret(
        &self,
        who: &Principal,
        id: &str,
        body: &Value,
    ) -> Result<EndpointWithSecret, Error> {
        let mut e = self.endpoint(who, id).await?;
        let overlap = RotateSecret::parse(body)?
            .overlap_secs
            .unwrap_or(DEFAULT_OVERLAP_SECS);
        let secret = WebhookSecret::generate();
        let now = self.clock.now();
        e.previous_secret_sealed = Some(std::mem::replace(
            &mut e.secret_sealed,
            self.sealer.seal(secret.expose()),
        ));
        e.previous_secret_expires_at = Some(now + chrono::Duration::seconds(overlap));
        e.updated_at = now;
        if !self.store.update_webhook_endpoint(&e).await? {
            return Err(Error::not_found("webhook endpoint"));
        }
        tracing::info!(tenant_id = %who.tenant_id, endpoint_id = %e.id, "webhook secret rotated");
        Ok(EndpointWithSecret {
            endpoint: EndpointView::from(&e),
            secret: secret.expose().to_owned(),
            previous_secret_expires_at: e.previous_secret_expires_at,
        })
    }

    pub async fn deliveries(&self, who: &Principal, id: &str) -> Result<DeliveryList, Error> {
        let e = self.endpoint(who, id).await?;
        let all = self.store.list_deliveries(who.tenant_id, e.id, 100).await?;
        Ok(DeliveryList {
            deliveries: all.iter().map(DeliveryView::from).collect(),
        })
    }

    /// Sends a delivery again now, whatever its state.
    pub async fn retry(&self, who: &Principal, id: &str, delivery: &str) -> Result<(), Error> {
        let e = self.endpoint(who, id).await?;
        let delivery = Uuid::parse_str(delivery).map_err(|_| Error::not_found("delivery"))?;
        if !e.enabled {
            return Err(Error::new(
                ErrorCode::InvalidState,
                "the endpoint is disabled; enable it before retrying its deliveries",
            )
            .with("status", "disabled"));
        }
        if self
            .store
            .retry_delivery(who.tenant_id, e.id, delivery, self.clock.now())
            .await?
        {
            let _ = self.wake.send(());
            Ok(())
        } else {
            Err(Error::not_found("delivery"))
        }
    }
}

/// What the dispatcher needs of the outbox: due deliveries, their endpoints, and a place to
/// record each attempt.
#[async_trait]
pub trait DeliveryOutbox: Send + Sync + 'static {
    async fn claim(
        &self,
        now: DateTime<Utc>,
        lease_until: DateTime<Utc>,
        limit: u32,
    ) -> Result<Vec<WebhookDelivery>, Error>;
    async fn endpoint(&self, tenant: TenantId, id: Uuid) -> Result<Option<WebhookEndpoint>, Error>;
    async fn record(&self, attempt: &AttemptRecord) -> Result<(), Error>;
}

#[async_trait]
impl DeliveryOutbox for Arc<dyn Store> {
    async fn claim(
        &self,
        now: DateTime<Utc>,
        lease_until: DateTime<Utc>,
        limit: u32,
    ) -> Result<Vec<WebhookDelivery>, Error> {
        self.claim_deliveries(now, lease_until, limit).await
    }

    async fn endpoint(&self, tenant: TenantId, id: Uuid) -> Result<Option<WebhookEndpoint>, Error> {
        self.get_webhook_endpoint(tenant, id).await
    }

    async fn record(&self, attempt: &AttemptRecord) -> Result<(), Error> {
        self.record_attempt(attempt).await
    }
}

/// Where the dispatcher sends its requests.
#[async_trait]
pub trait WebhookTransport: Send + Sync + 'static {
    async fn send(&self, delivery: &Delivery) -> Attempt;
}

#[async_trait]
impl WebhookTransport for issuer_webhooks::Sender {
    async fn send(&self, delivery: &Delivery) -> Attempt {
        issuer_webhooks::Sender::send(self, delivery).await
    }
}

/// The dispatcher: delivers the outbox on every replica.
pub struct Dispatcher {
    pub outbox: Arc<dyn DeliveryOutbox>,
    pub transport: Arc<dyn WebhookTransport>,
    pub sealer: Arc<dyn CodeSealer>,
    pub clock: Arc<dyn Clock>,
    pub schedule: RetrySchedule,
    /// Attempts in flight at once on this replica.
    pub concurrency: usize,
    /// An endpoint failing this long is disabled.
    pub disable_after: chrono::Duration,
    /// Wakes the dispatcher (manual retries, finished attempts).
    pub wake: broadcast::Sender<()>,
}

impl Dispatcher {
    /// Delivers the outbox until `stop` turns true, then lets the attempts under way finish.
    ///
    /// A claim is never cut short: a dispatcher stopped between its claim and the attempts
    /// would leave the claimed deliveries to wait out their lease before another replica could
    /// take them.
    pub async fn run(
        self: Arc<Self>,
        mut news: broadcast::Receiver<News>,
        mut stop: tokio::sync::watch::Receiver<bool>,
    ) {
        let mut wake = self.wake.subscribe();
        let permits = Arc::new(Semaphore::new(self.concurrency));
        while !*stop.borrow() {
            loop {
                let now = self.clock.now();
                // Claim no more than can start now, so that no lease runs out waiting for a
                // permit.
                let free = permits.available_permits().min(CLAIM_BATCH as usize) as u32;
                if free == 0 {
                    break;
                }
                let claimed = match self.outbox.claim(now, now + LEASE, free).await {
                    Ok(c) => c,
                    Err(e) => {
                        tracing::warn!(error = %e.chain(), "claiming webhook deliveries failed");
                        break;
                    }
                };
                let full = claimed.len() as u32 == free;
                // A batch mostly shares a few endpoints: load each once.
                let mut endpoints: HashMap<(TenantId, Uuid), Option<Arc<WebhookEndpoint>>> =
                    HashMap::new();
                for d in claimed {
                    let key = (d.tenant_id, d.endpoint_id);
                    if let Entry::Vacant(slot) = endpoints.entry(key) {
                        let loaded = match self.outbox.endpoint(d.tenant_id, d.endpoint_id).await {
                            Ok(e) => e.filter(|e| e.enabled).map(Arc::new),
                            Err(e) => {
                                tracing::warn!(error = %e.chain(), "loading a webhook endpoint failed; the lease will expire");
                                None
                            }
                        };
                        slot.insert(loaded);
                    }
                    let Some(endpoint) = endpoints[&key].clone() else {
                        continue;
                    };
                    let Ok(permit) = permits.clone().acquire_owned().await else {
                        return;
                    };
                    let me = self.clone();
                    tokio::spawn(async move {
                        me.attempt(&endpoint, d).await;
                        drop(permit);
                        // A free permit may mean a backlog can move on.
                        let _ = me.wake.send(());
                    });
                }
                if !full {
                    break;
                }
            }
            // Coalesce a burst of commits into one claim round.
            tokio::time::sleep(Duration::from_millis(20)).await;
            let mut pending = false;
            while news.try_recv().is_ok() || wake.try_recv().is_ok() {
                pending = true;
            }
            if pending {
                continue;
            }
            tokio::select! {
                _ = news.recv() => {}
                _ = wake.recv() => {}
                _ = stop.changed() => {}
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
        }
        // Every permit back means every attempt started has been recorded.
        let _ = permits
            .acquire_many(u32::try_from(self.concurrency).unwrap_or(u32::MAX))
            .await;
    }

    /// One attempt of one delivery, recorded whatever happens; in the trace of the request
    /// that caused the delivery. Returns what was recorded.
    pub async fn attempt(&self, endpoint: &WebhookEndpoint, d: WebhookDelivery) -> AttemptRecord {
        let span = tracing::info_span!(
            "webhook.deliver",
            otel.kind = "client",
            otel.status_code = tracing::field::Empty,
            tenant_id = %d.tenant_id,
            endpoint_id = %d.endpoint_id,
            delivery_id = %d.id,
            webhook_id = %d.message_id,
            event_type = %d.event_type,
            attempt = d.attempts + 1,
            http.response.status_code = tracing::field::Empty,
        );
        crate::telemetry::continue_stored_trace(&span, d.traceparent.as_deref());
        self.attempt_in(endpoint, d).instrument(span).await
    }

    /// The secrets that sign now: the current one, and the previous one while it overlaps.
    fn secrets(&self, endpoint: &WebhookEndpoint, now: DateTime<Utc>) -> Vec<WebhookSecret> {
        let previous = endpoint
            .previous_secret_sealed
            .as_ref()
            .filter(|_| endpoint.previous_secret_expires_at.is_some_and(|t| t > now));
        let mut secrets = Vec::new();
        for s in std::iter::once(&endpoint.secret_sealed).chain(previous) {
            match self.sealer.open(s).map(|s| WebhookSecret::parse(&s)) {
                Ok(Ok(secret)) => secrets.push(secret),
                _ => {
                    tracing::error!(endpoint_id = %endpoint.id, "a webhook secret does not open with the server secret")
                }
            }
        }
        secrets
    }

    async fn attempt_in(&self, endpoint: &WebhookEndpoint, d: WebhookDelivery) -> AttemptRecord {
        let delivery = Delivery {
            url: endpoint.url.clone(),
            msg_id: d.message_id.clone(),
            body: d.payload.to_string().into_bytes(),
            secrets: self.secrets(endpoint, self.clock.now()),
            // The receiver continues the trace from this attempt.
            traceparent: crate::telemetry::traceparent(&tracing::Span::current()),
        };
        let result = self.transport.send(&delivery).await;
        let span = tracing::Span::current();
        if let Some(status) = result.status {
            span.record("http.response.status_code", status);
        }
        if !matches!(result.outcome, Outcome::Delivered) {
            span.record("otel.status_code", "ERROR");
        }
        tracing::info!(
            tenant_id = %d.tenant_id,
            endpoint_id = %d.endpoint_id,
            delivery_id = %d.id,
            webhook_id = %d.message_id,
            attempt = d.attempts + 1,
            status = result.status,
            outcome = ?result.outcome,
            latency_ms = result.latency.as_millis() as u64,
            "webhook attempt"
        );
        let record = self.outcome(endpoint, &d, result, self.clock.now());
        crate::metrics::webhook_attempt(match record.state {
            DeliveryState::Delivered => "delivered",
            DeliveryState::Pending => "retry",
            DeliveryState::Failed => "failed",
        });
        if let Err(e) = self.outbox.record(&record).await {
            tracing::warn!(error = %e.chain(), "recording a webhook attempt failed; the lease will expire");
        }
        record
    }

    /// What an attempt's result means: delivered, retried later, failed, and whether the
    /// endpoint is to be disabled (`gone` after a 410, `failing` after failing too long).
    fn outcome(
        &self,
        endpoint: &WebhookEndpoint,
        d: &WebhookDelivery,
        result: Attempt,
        at: DateTime<Utc>,
    ) -> AttemptRecord {
        let attempts_made = u32::try_from(d.attempts + 1).unwrap_or(u32::MAX);
        let (state, next, mut disable) = match result.outcome {
            Outcome::Delivered => (DeliveryState::Delivered, None, None),
            Outcome::Gone => (DeliveryState::Failed, None, Some("gone".to_owned())),
            Outcome::Refused => (DeliveryState::Failed, None, None),
            Outcome::Retry => {
                let jitter: f64 = rand::random();
                match self
                    .schedule
                    .next_delay(attempts_made, result.retry_after, jitter)
                {
                    Some(delay) => (
                        DeliveryState::Pending,
                        Some(
                            at + chrono::Duration::from_std(delay)
                                .unwrap_or(chrono::Duration::hours(1)),
                        ),
                        None,
                    ),
                    None => (DeliveryState::Failed, None, None),
                }
            }
        };
        if state != DeliveryState::Delivered
            && disable.is_none()
            && endpoint
                .failing_since
                .is_some_and(|since| at - since > self.disable_after)
        {
            disable = Some("failing".to_owned());
        }
        AttemptRecord {
            tenant_id: d.tenant_id,
            delivery_id: d.id,
            endpoint_id: d.endpoint_id,
            claimed_until: d.next_attempt_at,
            at,
            status: result.status.map(i64::from),
            error: result.error,
            latency_ms: result.latency.as_millis() as i64,
            state,
            next_attempt_at: next,
            disable_endpoint: disable,
        }
    }
}

/// The dispatcher against fake ports: what it records for each way an attempt can go.
#[cfg(test)]
mod dispatcher_tests {
    use std::sync::Mutex;

    use chrono::TimeZone;
    use issuer_domain::ids::IssuanceId;

    use super::*;
    use crate::test_support::FixedClock;

    /// Seals nothing: the tests look at what the transport gets.
    struct PlainSealer;

    impl CodeSealer for PlainSealer {
        fn seal(&self, plaintext: &str) -> String {
            plaintext.to_owned()
        }
        fn open(&self, sealed: &str) -> Result<String, Error> {
            Ok(sealed.to_owned())
        }
        fn digest(&self, value: &str) -> String {
            value.to_owned()
        }
    }

    #[derive(Default)]
    struct FakeOutbox {
        recorded: Mutex<Vec<AttemptRecord>>,
    }

    #[async_trait]
    impl DeliveryOutbox for FakeOutbox {
        async fn claim(
            &self,
            _: DateTime<Utc>,
            _: DateTime<Utc>,
            _: u32,
        ) -> Result<Vec<WebhookDelivery>, Error> {
            Ok(Vec::new())
        }
        async fn endpoint(&self, _: TenantId, _: Uuid) -> Result<Option<WebhookEndpoint>, Error> {
            Ok(None)
        }
        async fn record(&self, attempt: &AttemptRecord) -> Result<(), Error> {
            self.recorded.lock().unwrap().push(attempt.clone());
            Ok(())
        }
    }

    /// Answers every request with `answer`; keeps how many secrets signed each.
    struct FakeTransport {
        answer: Attempt,
        signed_with: Mutex<Vec<usize>>,
    }

    #[async_trait]
    impl WebhookTransport for FakeTransport {
        async fn send(&self, delivery: &Delivery) -> Attempt {
            self.signed_with
                .lock()
                .unwrap()
                .push(delivery.secrets.len());
            self.answer.clone()
        }
    }

    fn t0() -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 12, 1, 9, 0, 0).unwrap()
    }

    fn answer(outcome: Outcome, status: Option<u16>) -> Attempt {
        Attempt {
            outcome,
            status,
            latency: std::time::Duration::from_millis(12),
            error: (status != Some(200)).then(|| format!("status {status:?}")),
            retry_after: None,
        }
    }

    fn endpoint() -> WebhookEndpoint {
        WebhookEndpoint {
            tenant_id: TenantId::new(),
            id: Uuid::new_v4(),
            url: "https://hooks.example/in".into(),
            event_types: vec![webhook::ISSUANCE_ACCEPTED.into()],
            secret_sealed: WebhookSecret::generate().expose().to_owned(),
            previous_secret_sealed: Some(WebhookSecret::generate().expose().to_owned()),
            previous_secret_expires_at: Some(t0() + chrono::Duration::hours(1)),
            enabled: true,
            disabled_reason: None,
            failing_since: None,
            created_at: t0(),
            updated_at: t0(),
        }
    }

    fn delivery(e: &WebhookEndpoint, attempts: i64) -> WebhookDelivery {
        WebhookDelivery {
            tenant_id: e.tenant_id,
            id: Uuid::new_v4(),
            endpoint_id: e.id,
            issuance_id: IssuanceId::new(),
            sequence: 3,
            event_type: webhook::ISSUANCE_ACCEPTED.into(),
            message_id: "msg_1_3".into(),
            payload: serde_json::json!({"type": "issuance.accepted"}),
            state: DeliveryState::Pending,
            attempts,
            next_attempt_at: t0() + LEASE,
            last_status: None,
            last_error: None,
            last_latency_ms: None,
            traceparent: None,
            created_at: t0(),
            updated_at: t0(),
        }
    }

    fn dispatcher(
        answer: Attempt,
        now: DateTime<Utc>,
    ) -> (Dispatcher, Arc<FakeOutbox>, Arc<FakeTransport>) {
        let outbox = Arc::new(FakeOutbox::default());
        let transport = Arc::new(FakeTransport {
            answer,
            signed_with: Mutex::new(Vec::new()),
        });
        let dispatcher = Dispatcher {
            outbox: outbox.clone(),
            transport: transport.clone(),
            sealer: Arc::new(PlainSealer),
            clock: Arc::new(FixedClock(now)),
            schedule: RetrySchedule::parse("1m,10m").unwrap(),
            concurrency: 4,
            disable_after: chrono::Duration::hours(120),
            wake: broadcast::channel(4).0,
        };
        (dispatcher, outbox, transport)
    }

    #[tokio::test]
    async fn a_delivery_is_recorded_under_its_lease_and_signed_by_both_secrets_in_the_overlap() {
        let e = endpoint();
        let (disp, outbox, transport) = dispatcher(answer(Outcome::Delivered, Some(200)), t0());
        let d = delivery(&e, 0);
        let record = disp.attempt(&e, d.clone()).await;
        assert_eq!(record.state, DeliveryState::Delivered);
        assert_eq!(record.claimed_until, d.next_attempt_at);
        assert_eq!((record.status, record.latency_ms), (Some(200), 12));
        assert_eq!(outbox.recorded.lock().unwrap().as_slice(), [record]);
        assert_eq!(*transport.signed_with.lock().unwrap(), [2]);

        // After the overlap only the current secret signs.
        let (disp, _, transport) = dispatcher(
            answer(Outcome::Delivered, Some(200)),
            t0() + chrono::Duration::hours(2),
        );
        disp.attempt(&e, delivery(&e, 0)).await;
        assert_eq!(*transport.signed_with.lock().unwrap(), [1]);
    }

    #[tokio::test]
    async fn failures_are_retried_on_the_schedule_then_given_up() {
        let e = endpoint();
        let (disp, _, _) = dispatcher(answer(Outcome::Retry, Some(503)), t0());
        let first = disp.attempt(&e, delivery(&e, 0)).await;
        assert_eq!(first.state, DeliveryState::Pending);
        let due = first.next_attempt_at.unwrap() - t0();
        assert!(
            (54..=66).contains(&due.num_seconds()),
            "1m, jittered: {due}"
        );
        let second = disp.attempt(&e, delivery(&e, 1)).await;
        let due = second.next_attempt_at.unwrap() - t0();
        assert!(
            (540..=660).contains(&due.num_seconds()),
            "10m, jittered: {due}"
        );
        let last = disp.attempt(&e, delivery(&e, 2)).await;
        assert_eq!(
            (last.state, last.next_attempt_at),
            (DeliveryState::Failed, None)
        );
        assert_eq!(last.disable_endpoint, None);
    }

    #[tokio::test]
    async fn gone_or_failing_too_long_disables_the_endpoint() {
        let e = endpoint();
        let (disp, _, _) = dispatcher(answer(Outcome::Gone, Some(410)), t0());
        let gone = disp.attempt(&e, delivery(&e, 0)).await;
        assert_eq!(
            (gone.state, gone.disable_endpoint.as_deref()),
            (DeliveryState::Failed, Some("gone"))
        );

        let failing = WebhookEndpoint {
            failing_since: Some(t0() - chrono::Duration::hours(121)),
            ..endpoint()
        };
        let (disp, _, _) = dispatcher(answer(Outcome::Retry, Some(500)), t0());
        let record = disp.attempt(&failing, delivery(&failing, 1)).await;
        assert_eq!(record.disable_endpoint.as_deref(), Some("failing"));
        let (disp, _, _) = dispatcher(answer(Outcome::Delivered, Some(200)), t0());
        let recovered = disp.attempt(&failing, delivery(&failing, 1)).await;
        assert_eq!(recovered.disable_endpoint, None, "a success is no failure");
    }
}
