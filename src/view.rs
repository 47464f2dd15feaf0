//! The public shape of an issuance, shared by the REST JSON and the gRPC message so both
//! adapters always show the same fields.

use chrono::{DateTime, SecondsFormat, Utc};
use issuer_domain::{
    Error,
    model::{
        Delivery, EmailDelivery, EmailState, EventKind, Issuance, IssuanceEvent, IssuanceStatus,
        Scope,
    },
    ports::Store,
    service::{IssuanceService, Principal},
    status::CredentialStatus,
};

/// The views of issuances of one tenant as `who` may see them, each with its offer email's
/// state. The offer itself is a secret of `issuance:write`: whoever holds it can redeem it.
pub async fn issuance_views<I: std::borrow::Borrow<Issuance>>(
    service: &IssuanceService,
    store: &dyn Store,
    who: &Principal,
    issuances: &[I],
) -> Result<Vec<IssuanceView>, Error> {
    let Some(first) = issuances.first().map(Borrow::borrow) else {
        return Ok(Vec::new());
    };
    let emailed: Vec<_> = issuances
        .iter()
        .map(Borrow::borrow)
        .filter(|i| i.delivery == Delivery::Email)
        .map(|i| i.id)
        .collect();
    let emails = if emailed.is_empty() {
        Vec::new()
    } else {
        store
            .get_email_deliveries(first.tenant_id, &emailed)
            .await?
    };
    let emails: std::collections::HashMap<_, _> = emails
        .iter()
        .map(|e| ((e.tenant_id, e.issuance_id), e))
        .collect();
    Ok(issuances
        .iter()
        .map(|i| {
            let i = i.borrow();
            let email = emails.get(&(i.tenant_id, i.id)).copied();
            IssuanceView::with_email(service, who, i, email)
        })
        .collect())
}

/// The view of one issuance with its offer email's state.
pub async fn issuance_view(
    service: &IssuanceService,
    store: &dyn Store,
    who: &Principal,
    issuance: &Issuance,
) -> Result<IssuanceView, Error> {
    let mut views = issuance_views(service, store, who, std::slice::from_ref(issuance)).await?;
    views
        .pop()
        .ok_or_else(|| Error::internal("no view for the issuance"))
}
use std::borrow::Borrow;

use serde::Serialize;

/// An issuance.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct IssuanceView {
    pub issuance_id: String,
    pub client_request_id: String,
    pub credential_configuration_id: String,
    #[schema(value_type = schema::IssuanceStatus)]
    pub status: IssuanceStatus,
    /// With `rejected`: `expired`, `cancelled` or `declined`; with `error`, what failed.
    pub reason: Option<String>,
    /// The offer for the wallet (`openid-credential-offer://?credential_offer_uri=...`). Only
    /// for a token with `issuance:write`: whoever holds the offer can redeem it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub credential_offer_uri: Option<String>,
    #[schema(value_type = schema::DeliveryMethod)]
    pub delivery: Delivery,
    #[serde(serialize_with = "rfc3339")]
    pub expires_at: DateTime<Utc>,
    #[serde(serialize_with = "rfc3339")]
    pub created_at: DateTime<Utc>,
    #[serde(serialize_with = "rfc3339")]
    pub updated_at: DateTime<Utc>,
    /// Where the offer email stands; only for `delivery: email`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub email_delivery: Option<EmailDeliveryView>,
    /// The batch create it came in with; absent for a single create.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub batch_id: Option<String>,
    /// Where the issued credentials stand, as the status lists publish them: `valid`,
    /// `suspended` or `revoked`; absent until a wallet takes them.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<schema::CredentialStatus>)]
    pub credential_status: Option<CredentialStatus>,
    /// How many credential copies the wallet received (one per key of its request).
    pub credentials_issued: i64,
}

/// The public shape of an issuance's offer email.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct EmailDeliveryView {
    #[schema(value_type = schema::EmailState)]
    pub state: EmailState,
    pub attempts: i64,
    pub last_error: Option<String>,
    #[serde(serialize_with = "rfc3339_opt")]
    pub sent_at: Option<DateTime<Utc>>,
    /// When `pending`: the next attempt.
    #[serde(serialize_with = "rfc3339_opt")]
    pub next_attempt_at: Option<DateTime<Utc>>,
}

impl From<&EmailDelivery> for EmailDeliveryView {
    fn from(e: &EmailDelivery) -> Self {
        Self {
            state: e.state,
            attempts: e.attempts,
            last_error: e.last_error.clone(),
            sent_at: e.sent_at,
            next_attempt_at: (e.state == EmailState::Pending).then_some(e.next_attempt_at),
        }
    }
}

pub fn rfc3339_opt<S: serde::Serializer>(
    t: &Option<DateTime<Utc>>,
    s: S,
) -> Result<S::Ok, S::Error> {
    match t {
        Some(t) => s.serialize_str(&format_time(t)),
        None => s.serialize_none(),
    }
}

impl IssuanceView {
    /// The view with its offer email's state, `email` being the issuance's outbox row if any.
    pub fn with_email(
        service: &IssuanceService,
        who: &Principal,
        i: &Issuance,
        email: Option<&EmailDelivery>,
    ) -> Self {
        Self {
            email_delivery: email.map(EmailDeliveryView::from),
            ..Self::new(service, who, i)
        }
    }

    pub fn new(service: &IssuanceService, who: &Principal, i: &Issuance) -> Self {
        Self {
            issuance_id: i.id.to_string(),
            client_request_id: i.client_request_id.clone(),
            credential_configuration_id: i.credential_configuration_id.clone(),
            status: i.status,
            reason: i.reason.map(|r| r.as_str().to_owned()),
            credential_offer_uri: who
                .scopes
                .contains(&Scope::IssuanceWrite)
                .then(|| service.credential_offer_uri(i)),
            delivery: i.delivery,
            expires_at: i.expires_at,
            created_at: i.created_at,
            updated_at: i.updated_at,
            email_delivery: None,
            batch_id: i.batch_id.map(|b| b.to_string()),
            credential_status: i.credential.map(|c| c.status),
            credentials_issued: i.credential.map_or(0, |c| c.count),
        }
    }
}

/// The public shape of an event, for the events endpoint, SSE and gRPC.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct EventView {
    pub issuance_id: String,
    pub sequence: i64,
    /// e.g. `created`, `offer_retrieved`, `issued`, `expired`, `cancelled`, `email_sent`.
    #[serde(rename = "type")]
    #[schema(value_type = String)]
    pub kind: EventKind,
    #[schema(value_type = schema::IssuanceStatus)]
    pub status: IssuanceStatus,
    pub reason: Option<String>,
    #[serde(serialize_with = "rfc3339")]
    pub occurred_at: DateTime<Utc>,
}

impl From<&IssuanceEvent> for EventView {
    fn from(e: &IssuanceEvent) -> Self {
        Self {
            issuance_id: e.issuance_id.to_string(),
            sequence: e.sequence,
            kind: e.kind,
            status: e.status,
            reason: e.reason.clone(),
            occurred_at: e.occurred_at,
        }
    }
}

/// RFC 3339, UTC with `Z`, millisecond precision.
pub fn format_time(t: &DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Millis, true)
}

pub fn rfc3339<S: serde::Serializer>(t: &DateTime<Utc>, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&format_time(t))
}

/// How the closed sets of the views appear in the OpenAPI document: lowercase words.
pub mod schema {
    use utoipa::ToSchema;

    #[derive(ToSchema)]
    #[serde(rename_all = "snake_case")]
    pub enum IssuanceStatus {
        Pending,
        Accepted,
        Rejected,
        Error,
    }

    #[derive(ToSchema)]
    #[serde(rename_all = "snake_case")]
    pub enum DeliveryMethod {
        None,
        Email,
        Link,
        Qr,
    }

    #[derive(ToSchema)]
    #[serde(rename_all = "snake_case")]
    pub enum CredentialStatus {
        Valid,
        Suspended,
        Revoked,
    }

    #[derive(ToSchema)]
    #[serde(rename_all = "snake_case")]
    pub enum EmailState {
        Pending,
        Sent,
        Failed,
        Cancelled,
    }
}
