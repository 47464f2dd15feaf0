//! Webhooks: endpoint management for tenants, and the dispatcher that delivers the outbox.
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
use tracing::Instrument;

use issuer_domain::{
    Error, FieldViolation,
    ids::TenantId,
    model::Scope,
    service::Principal,
    webhook::{self, AttemptRecord, DeliveryState, WebhookDelivery, WebhookEndpoint},
};
use issuer_webhooks::{Delivery, Outcome, WebhookSecret};
use serde_json::{Value, json};
use tokio::sync::Semaphore;
use uuid::Uuid;

use crate::{app::App, view::format_time};

/// How long a claimed delivery stays with its dispatcher before another may take it.
const LEASE: chrono::Duration = chrono::Duration::seconds(60);
const CLAIM_BATCH: u32 = 128;
const MAX_OVERLAP_SECS: i64 = 7 * 24 * 3600;

/// An endpoint as the API shows it (never its secret).
pub fn endpoint_view(e: &WebhookEndpoint) -> Value {
    json!({
        "id": e.id.to_string(),
        "url": e.url,
        "event_types": e.event_types,
        "enabled": e.enabled,
        "disabled_reason": e.disabled_reason,
        "failing_since": e.failing_since.as_ref().map(format_time),
        "created_at": format_time(&e.created_at),
        "updated_at": format_time(&e.updated_at),
    })
}

pub fn delivery_view(d: &WebhookDelivery) -> Value {
    json!({
        "id": d.id.to_string(),
        "issuance_id": d.issuance_id.to_string(),
        "sequence": d.sequence,
        "event_type": d.event_type,
        "webhook_id": d.message_id,
        "state": d.state.as_str(),
        "attempts": d.attempts,
        "next_attempt_at": (d.state == DeliveryState::Pending).then(|| format_time(&d.next_attempt_at)),
        "last_status": d.last_status,
        "last_error": d.last_error,
        "last_latency_ms": d.last_latency_ms,
        "created_at": format_time(&d.created_at),
        "updated_at": format_time(&d.updated_at),
    })
}

fn parse_id(id: &str) -> Result<Uuid, Error> {
    Uuid::parse_str(id).map_err(|_| Error::not_found("webhook endpoint"))
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

impl App {
    fn check_webhook_url(&self, url: &Value) -> Result<String, FieldViolation> {
        let url = url.as_str().filter(|u| u.len() <= 2048).ok_or_else(|| {
            FieldViolation::new("url", "must be a URL of at most 2048 characters")
        })?;
        self.webhook_sender
            .policy()
            .check_url(url)
            .map_err(|e| FieldViolation::new("url", e.to_string()))?;
        Ok(url.to_owned())
    }

    async fn endpoint(&self, who: &Principal, id: &str) -> Result<WebhookEndpoint, Error> {
        who.require(Scope::WebhooksManage)?;
        self.store
            .get_webhook_endpoint(who.tenant_id, parse_id(id)?)
            .await?
            .ok_or_else(|| Error::not_found("webhook endpoint"))
    }

    /// Registers an endpoint; the answer carries its secret, this once.
    pub async fn create_webhook_endpoint(
        &self,
        who: &Principal,
        body: &Value,
    ) -> Result<Value, Error> {
        who.require(Scope::WebhooksManage)?;
        let mut violations = Vec::new();
        let url = self
            .check_webhook_url(body.get("url").unwrap_or(&Value::Null))
            .map_err(|v| violations.push(v))
            .ok();
        let types = event_types(body.get("event_types"))
            .map_err(|v| violations.push(v))
            .ok();
        let (Some(url), Some(types)) = (url, types) else {
            return Err(Error::invalid(violations));
        };
        let secret = WebhookSecret::generate();
        let now = self.clock.now();
        let endpoint = WebhookEndpoint {
            tenant_id: who.tenant_id,
            id: Uuid::new_v4(),
            url,
            event_types: types
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
        let mut view = endpoint_view(&endpoint);
        view["secret"] = secret.expose().into();
        Ok(view)
    }

    pub async fn list_webhook_endpoints(&self, who: &Principal) -> Result<Value, Error> {
        who.require(Scope::WebhooksManage)?;
        let all = self.store.list_webhook_endpoints(who.tenant_id).await?;
        Ok(json!({"webhook_endpoints": all.iter().map(endpoint_view).collect::<Vec<_>>()}))
    }

    pub async fn get_webhook_endpoint(&self, who: &Principal, id: &str) -> Result<Value, Error> {
        Ok(endpoint_view(&self.endpoint(who, id).await?))
    }

    /// Changes `url`, `event_types` or `enabled`; enabling clears the service's disabling.
    pub async fn update_webhook_endpoint(
        &self,
        who: &Principal,
        id: &str,
        body: &Value,
    ) -> Result<Value, Error> {
        let mut e = self.endpoint(who, id).await?;
        let mut violations = Vec::new();
        if let Some(url) = body.get("url") {
            match self.check_webhook_url(url) {
                Ok(url) => e.url = url,
                Err(v) => violations.push(v),
            }
        }
        match event_types(body.get("event_types")) {
            Ok(Some(types)) => e.event_types = types,
            Ok(None) => {}
            Err(v) => violations.push(v),
        }
        match body.get("enabled") {
            None | Some(Value::Null) => {}
            Some(Value::Bool(true)) => {
                e.enabled = true;
                e.disabled_reason = None;
                e.failing_since = None;
            }
            Some(Value::Bool(false)) => {
                e.enabled = false;
                e.disabled_reason = Some("disabled by the tenant".to_owned());
            }
            Some(_) => violations.push(FieldViolation::new("enabled", "must be a boolean")),
        }
        if !violations.is_empty() {
            return Err(Error::invalid(violations));
        }
        e.updated_at = self.clock.now();
        if !self.store.update_webhook_endpoint(&e).await? {
            return Err(Error::not_found("webhook endpoint"));
        }
        Ok(endpoint_view(&e))
    }

    pub async fn delete_webhook_endpoint(&self, who: &Principal, id: &str) -> Result<(), Error> {
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
    pub async fn rotate_webhook_secret(
        &self,
        who: &Principal,
        id: &str,
        body: &Value,
    ) -> Result<Value, Error> {
        let mut e = self.endpoint(who, id).await?;
        let overlap = match body.get("overlap_secs") {
            None | Some(Value::Null) => 24 * 3600,
            Some(v) => v
                .as_i64()
                .filter(|s| (0..=MAX_OVERLAP_SECS).contains(s))
                .ok_or_else(|| {
                    Error::invalid_field(
                        "overlap_secs",
                        format!("must be an integer from 0 to {MAX_OVERLAP_SECS}"),
                    )
                })?,
        };
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
        let mut view = endpoint_view(&e);
        view["secret"] = secret.expose().into();
        view["previous_secret_expires_at"] = e
            .previous_secret_expires_at
            .as_ref()
            .map(format_time)
            .into();
        Ok(view)
    }

    pub async fn list_webhook_deliveries(&self, who: &Principal, id: &str) -> Result<Value, Error> {
        let e = self.endpoint(who, id).await?;
        let all = self.store.list_deliveries(who.tenant_id, e.id, 100).await?;
        Ok(json!({"deliveries": all.iter().map(delivery_view).collect::<Vec<_>>()}))
    }

    /// Sends a delivery again now, whatever its state.
    pub async fn retry_webhook_delivery(
        &self,
        who: &Principal,
        id: &str,
        delivery: &str,
    ) -> Result<(), Error> {
        let e = self.endpoint(who, id).await?;
        let delivery = Uuid::parse_str(delivery).map_err(|_| Error::not_found("delivery"))?;
        if !e.enabled {
            return Err(Error::new(
                issuer_domain::ErrorCode::InvalidState,
                "the endpoint is disabled; enable it before retrying its deliveries",
            )
            .with("status", "disabled"));
        }
        if self
            .store
            .retry_delivery(who.tenant_id, e.id, delivery, self.clock.now())
            .await?
        {
            self.hub_wake();
            Ok(())
        } else {
            Err(Error::not_found("delivery"))
        }
    }

    fn hub_wake(&self) {
        let _ = self.dispatch_wake.send(());
    }
}

/// Delivers the outbox until `stop` turns true, then lets the attempts under way finish.
///
/// A claim is never cut short: a dispatcher stopped between its claim and the attempts would
/// leave the claimed deliveries to wait out their lease before another replica could take them.
pub async fn dispatch(app: Arc<App>, mut stop: tokio::sync::watch::Receiver<bool>) {
    let mut news = app.hub.subscribe();
    let mut wake = app.dispatch_wake.subscribe();
    let concurrency = app.settings.webhook_concurrency;
    let permits = Arc::new(Semaphore::new(concurrency));
    while !*stop.borrow() {
        loop {
            let now = app.clock.now();
            // Claim no more than can start now, so that no lease runs out waiting for a permit.
            let free = permits.available_permits().min(CLAIM_BATCH as usize) as u32;
            if free == 0 {
                break;
            }
            let claimed = match app.store.claim_deliveries(now, now + LEASE, free).await {
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
                    let loaded = match app
                        .store
                        .get_webhook_endpoint(d.tenant_id, d.endpoint_id)
                        .await
                    {
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
                let app = app.clone();
                tokio::spawn(async move {
                    attempt(&app, &endpoint, d).await;
                    drop(permit);
                    // A free permit may mean a backlog can move on.
                    let _ = app.dispatch_wake.send(());
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
        .acquire_many(u32::try_from(concurrency).unwrap_or(u32::MAX))
        .await;
}

/// One attempt of one delivery, recorded whatever happens; in the trace of the request that
/// caused the delivery.
async fn attempt(app: &App, endpoint: &WebhookEndpoint, d: WebhookDelivery) {
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
    attempt_in(app, endpoint, d).instrument(span).await;
}

async fn attempt_in(app: &App, endpoint: &WebhookEndpoint, d: WebhookDelivery) {
    let now = app.clock.now();
    let mut secrets = Vec::new();
    let sealed = std::iter::once(Some(&endpoint.secret_sealed)).chain(std::iter::once(
        endpoint
            .previous_secret_sealed
            .as_ref()
            .filter(|_| endpoint.previous_secret_expires_at.is_some_and(|t| t > now)),
    ));
    for s in sealed.flatten() {
        match app.sealer.open(s).map(|s| WebhookSecret::parse(&s)) {
            Ok(Ok(secret)) => secrets.push(secret),
            _ => {
                tracing::error!(endpoint_id = %endpoint.id, "a webhook secret does not open with the server secret")
            }
        }
    }
    let delivery = Delivery {
        url: endpoint.url.clone(),
        msg_id: d.message_id.clone(),
        body: d.payload.to_string().into_bytes(),
        secrets,
        // The receiver continues the trace from this attempt.
        traceparent: crate::telemetry::traceparent(&tracing::Span::current()),
    };
    let result = app.webhook_sender.send(&delivery).await;
    let span = tracing::Span::current();
    if let Some(status) = result.status {
        span.record("http.response.status_code", status);
    }
    if !matches!(result.outcome, Outcome::Delivered) {
        span.record("otel.status_code", "ERROR");
    }
    let at = app.clock.now();
    let attempts_made = u32::try_from(d.attempts + 1).unwrap_or(u32::MAX);
    let (state, next, mut disable) = match result.outcome {
        Outcome::Delivered => (DeliveryState::Delivered, None, None),
        Outcome::Gone => (DeliveryState::Failed, None, Some("gone".to_owned())),
        Outcome::Refused => (DeliveryState::Failed, None, None),
        Outcome::Retry => {
            let jitter: f64 = rand::random();
            match app
                .webhook_schedule
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
    crate::metrics::webhook_attempt(match state {
        DeliveryState::Delivered => "delivered",
        DeliveryState::Pending => "retry",
        DeliveryState::Failed => "failed",
    });
    if state != DeliveryState::Delivered
        && disable.is_none()
        && endpoint.failing_since.is_some_and(|since| {
            at - since > chrono::Duration::hours(app.settings.webhook_disable_after_hours)
        })
    {
        disable = Some("failing".to_owned());
    }
    tracing::info!(
        tenant_id = %d.tenant_id,
        endpoint_id = %d.endpoint_id,
        delivery_id = %d.id,
        webhook_id = %d.message_id,
        attempt = attempts_made,
        status = result.status,
        outcome = ?result.outcome,
        latency_ms = result.latency.as_millis() as u64,
        "webhook attempt"
    );
    let record = AttemptRecord {
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
    };
    if let Err(e) = app.store.record_attempt(&record).await {
        tracing::warn!(error = %e.chain(), "recording a webhook attempt failed; the lease will expire");
    }
}
