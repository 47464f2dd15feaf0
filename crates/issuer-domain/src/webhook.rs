//! Webhooks as data: endpoints, deliveries (the transactional outbox), which issuance events
//! become which webhook types, and the payload (DESIGN §9).
//!
//! A delivery row is written in the same transaction as the event it announces, one per
//! matching enabled endpoint, so an event is never committed without its webhooks nor a webhook
//! queued for an event that rolled back.

use std::{fmt, str::FromStr};

use chrono::{DateTime, SecondsFormat, Utc};
use serde_json::{Value, json};
use uuid::Uuid;

use crate::{
    ids::{IssuanceId, TenantId},
    model::{EventKind, Issuance, IssuanceEvent, IssuanceStatus},
};

pub const ISSUANCE_ACCEPTED: &str = "issuance.accepted";
pub const ISSUANCE_REJECTED: &str = "issuance.rejected";
pub const ISSUANCE_ERROR: &str = "issuance.error";
pub const ISSUANCE_CREATED: &str = "issuance.created";
pub const ISSUANCE_OFFER_RETRIEVED: &str = "issuance.offer_retrieved";
pub const CREDENTIAL_REVOKED: &str = "credential.revoked";
pub const CREDENTIAL_SUSPENDED: &str = "credential.suspended";
pub const CREDENTIAL_REINSTATED: &str = "credential.reinstated";

/// What an endpoint receives when it names no types: the outcomes.
pub const DEFAULT_TYPES: [&str; 3] = [ISSUANCE_ACCEPTED, ISSUANCE_REJECTED, ISSUANCE_ERROR];
/// Every type an endpoint may ask for.
pub const ALL_TYPES: [&str; 8] = [
    ISSUANCE_ACCEPTED,
    ISSUANCE_REJECTED,
    ISSUANCE_ERROR,
    ISSUANCE_CREATED,
    ISSUANCE_OFFER_RETRIEVED,
    CREDENTIAL_REVOKED,
    CREDENTIAL_SUSPENDED,
    CREDENTIAL_REINSTATED,
];

/// The webhook type an event announces, if any: status changes by their new status, changes of
/// the issued credentials' status, and the opt-in `created` and `offer_retrieved`.
pub fn event_type(event: &IssuanceEvent, status_changed: bool) -> Option<&'static str> {
    if status_changed {
        return match event.status {
            IssuanceStatus::Accepted => Some(ISSUANCE_ACCEPTED),
            IssuanceStatus::Rejected => Some(ISSUANCE_REJECTED),
            IssuanceStatus::Error => Some(ISSUANCE_ERROR),
            IssuanceStatus::Pending => None,
        };
    }
    match event.kind {
        EventKind::Created => Some(ISSUANCE_CREATED),
        EventKind::OfferRetrieved => Some(ISSUANCE_OFFER_RETRIEVED),
        EventKind::CredentialRevoked => Some(CREDENTIAL_REVOKED),
        EventKind::CredentialSuspended => Some(CREDENTIAL_SUSPENDED),
        EventKind::CredentialReinstated => Some(CREDENTIAL_REINSTATED),
        EventKind::Cancelled
        | EventKind::Expired
        | EventKind::TokenIssued
        | EventKind::CredentialIssued
        | EventKind::CredentialAccepted
        | EventKind::CredentialDeleted
        | EventKind::CredentialFailure
        | EventKind::EmailSent
        | EventKind::EmailFailed => None,
    }
}

/// The body: `{type, timestamp, data{issuance_id, client_request_id,
/// credential_configuration_id, status, reason?, credential_status?, sequence}}`. No payload
/// values: webhooks carry the outcome, not the credential.
pub fn payload(issuance: &Issuance, event: &IssuanceEvent, event_type: &str) -> Value {
    let mut data = json!({
        "issuance_id": issuance.id.to_string(),
        "client_request_id": issuance.client_request_id,
        "credential_configuration_id": issuance.credential_configuration_id,
        "status": event.status.as_str(),
        "sequence": event.sequence,
    });
    if let Some(reason) = &event.reason {
        data["reason"] = reason.clone().into();
    }
    if let Some(credential) = &issuance.credential {
        data["credential_status"] = credential.status.as_str().into();
    }
    json!({
        "type": event_type,
        "timestamp": event.occurred_at.to_rfc3339_opts(SecondsFormat::Millis, true),
        "data": data,
    })
}

/// `webhook-id`: one per event, the same on every retry and for every endpoint.
pub fn message_id(issuance: IssuanceId, sequence: i64) -> String {
    format!("msg_{}_{sequence}", issuance.0.simple())
}

/// A tenant's webhook endpoint.
#[derive(Debug, Clone, PartialEq)]
pub struct WebhookEndpoint {
    pub tenant_id: TenantId,
    pub id: Uuid,
    pub url: String,
    pub event_types: Vec<String>,
    /// The signing secret, sealed with the server secret (it must be used again, so it cannot
    /// be hashed).
    pub secret_sealed: String,
    /// The secret before the last rotation, still signing until `previous_secret_expires_at`.
    pub previous_secret_sealed: Option<String>,
    pub previous_secret_expires_at: Option<DateTime<Utc>>,
    pub enabled: bool,
    /// Why the service disabled it (`gone` after a 410, `failing` after days of failures).
    pub disabled_reason: Option<String>,
    /// Start of the current run of failed attempts.
    pub failing_since: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeliveryState {
    Pending,
    Delivered,
    Failed,
}

impl DeliveryState {
    pub const fn as_str(self) -> &'static str {
        match self {
            DeliveryState::Pending => "pending",
            DeliveryState::Delivered => "delivered",
            DeliveryState::Failed => "failed",
        }
    }
}

impl fmt::Display for DeliveryState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for DeliveryState {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "pending" => Ok(DeliveryState::Pending),
            "delivered" => Ok(DeliveryState::Delivered),
            "failed" => Ok(DeliveryState::Failed),
            other => Err(format!("unknown delivery state `{other}`")),
        }
    }
}

/// One webhook message to one endpoint, with its delivery state.
#[derive(Debug, Clone, PartialEq)]
pub struct WebhookDelivery {
    pub tenant_id: TenantId,
    pub id: Uuid,
    pub endpoint_id: Uuid,
    pub issuance_id: IssuanceId,
    pub sequence: i64,
    pub event_type: String,
    pub message_id: String,
    pub payload: Value,
    pub state: DeliveryState,
    pub attempts: i64,
    pub next_attempt_at: DateTime<Utc>,
    pub last_status: Option<i64>,
    pub last_error: Option<String>,
    pub last_latency_ms: Option<i64>,
    /// The W3C `traceparent` of the request that caused the delivery, when it was traced.
    pub traceparent: Option<String>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// The result of one attempt, as the dispatcher records it.
#[derive(Debug, Clone, PartialEq)]
pub struct AttemptRecord {
    pub tenant_id: TenantId,
    pub delivery_id: Uuid,
    pub endpoint_id: Uuid,
    /// The lease the attempt ran under (the delivery's `next_attempt_at` when claimed): a
    /// result that comes back after another dispatcher took the delivery over is dropped.
    pub claimed_until: DateTime<Utc>,
    pub at: DateTime<Utc>,
    pub status: Option<i64>,
    pub error: Option<String>,
    pub latency_ms: i64,
    /// The delivery's state after this attempt.
    pub state: DeliveryState,
    /// When to try again, while `Pending`.
    pub next_attempt_at: Option<DateTime<Utc>>,
    /// Disable the endpoint for this reason (410, or failing for too long).
    pub disable_endpoint: Option<String>,
}
