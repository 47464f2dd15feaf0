//! The public shape of an issuance, shared by the REST JSON and the gRPC message so both
//! adapters always show the same fields.

use chrono::{DateTime, SecondsFormat, Utc};
use issuer_domain::{
    model::{Issuance, IssuanceEvent},
    service::IssuanceService,
};
use serde::Serialize;

#[derive(Debug, Clone, Serialize)]
pub struct IssuanceView {
    pub issuance_id: String,
    pub client_request_id: String,
    pub credential_configuration_id: String,
    pub status: &'static str,
    pub reason: Option<String>,
    pub credential_offer_uri: String,
    pub delivery: &'static str,
    #[serde(serialize_with = "rfc3339")]
    pub expires_at: DateTime<Utc>,
    #[serde(serialize_with = "rfc3339")]
    pub created_at: DateTime<Utc>,
    #[serde(serialize_with = "rfc3339")]
    pub updated_at: DateTime<Utc>,
}

impl IssuanceView {
    pub fn new(service: &IssuanceService, i: &Issuance) -> Self {
        Self {
            issuance_id: i.id.to_string(),
            client_request_id: i.client_request_id.clone(),
            credential_configuration_id: i.credential_configuration_id.clone(),
            status: i.status.as_str(),
            reason: i.reason.clone(),
            credential_offer_uri: service.credential_offer_uri(i),
            delivery: i.delivery.as_str(),
            expires_at: i.expires_at,
            created_at: i.created_at,
            updated_at: i.updated_at,
        }
    }
}

/// The public shape of an event, for the events endpoint, SSE and gRPC.
#[derive(Debug, Clone, Serialize)]
pub struct EventView {
    pub issuance_id: String,
    pub sequence: i64,
    #[serde(rename = "type")]
    pub kind: String,
    pub status: &'static str,
    pub reason: Option<String>,
    #[serde(serialize_with = "rfc3339")]
    pub occurred_at: DateTime<Utc>,
}

impl From<&IssuanceEvent> for EventView {
    fn from(e: &IssuanceEvent) -> Self {
        Self {
            issuance_id: e.issuance_id.to_string(),
            sequence: e.sequence,
            kind: e.kind.clone(),
            status: e.status.as_str(),
            reason: e.reason.clone(),
            occurred_at: e.occurred_at,
        }
    }
}

/// RFC 3339, UTC with `Z`, millisecond precision.
pub fn format_time(t: &DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Millis, true)
}

fn rfc3339<S: serde::Serializer>(t: &DateTime<Utc>, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&format_time(t))
}
