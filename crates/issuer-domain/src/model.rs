//! Entities: tenants, API clients, issuances and their events.

use std::{fmt, str::FromStr};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::ids::{IssuanceId, TenantId};

/// An organisation. Its offer lifetimes bound what its backends may ask for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tenant {
    pub id: TenantId,
    pub name: String,
    /// Offer lifetime when a create request names none.
    pub default_offer_ttl_secs: i64,
    /// The longest offer lifetime a create request may ask for.
    pub max_offer_ttl_secs: i64,
    /// Every offer of this tenant needs a transaction code (delivered over a second channel).
    pub require_tx_code: bool,
    pub created_at: DateTime<Utc>,
}

impl Tenant {
    pub const DEFAULT_OFFER_TTL_SECS: i64 = 24 * 3600;
    pub const MAX_OFFER_TTL_SECS: i64 = 30 * 24 * 3600;

    pub fn new(name: impl Into<String>, now: DateTime<Utc>) -> Self {
        Self {
            id: TenantId::new(),
            name: name.into(),
            default_offer_ttl_secs: Self::DEFAULT_OFFER_TTL_SECS,
            max_offer_ttl_secs: Self::MAX_OFFER_TTL_SECS,
            require_tx_code: false,
            created_at: now,
        }
    }
}

/// An access scope of the management API.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Scope {
    IssuanceWrite,
    IssuanceRead,
    WebhooksManage,
}

impl Scope {
    pub const ALL: [Scope; 3] = [
        Scope::IssuanceWrite,
        Scope::IssuanceRead,
        Scope::WebhooksManage,
    ];

    pub const fn as_str(self) -> &'static str {
        match self {
            Scope::IssuanceWrite => "issuance:write",
            Scope::IssuanceRead => "issuance:read",
            Scope::WebhooksManage => "webhooks:manage",
        }
    }

    /// Parses a space- or comma-separated scope list; unknown names are an error.
    pub fn parse_list(s: &str) -> Result<Vec<Scope>, String> {
        let mut out: Vec<Scope> = Vec::new();
        for name in s.split([' ', ',']).filter(|p| !p.is_empty()) {
            let scope = name.parse()?;
            if !out.contains(&scope) {
                out.push(scope);
            }
        }
        out.sort();
        Ok(out)
    }

    pub fn join(scopes: &[Scope]) -> String {
        scopes
            .iter()
            .map(|s| s.as_str())
            .collect::<Vec<_>>()
            .join(" ")
    }
}

impl FromStr for Scope {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Scope::ALL
            .into_iter()
            .find(|x| x.as_str() == s)
            .ok_or_else(|| format!("unknown scope `{s}`"))
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A machine client of a tenant (OAuth 2.0 client credentials).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiClient {
    pub tenant_id: TenantId,
    pub client_id: String,
    /// Peppered hash of the secret; the secret itself is never stored.
    pub secret_hash: String,
    pub scopes: Vec<Scope>,
    pub active: bool,
    pub created_at: DateTime<Utc>,
}

/// Lifecycle state of an issuance (DESIGN §6).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum IssuanceStatus {
    Pending,
    Accepted,
    Rejected,
    Error,
}

impl IssuanceStatus {
    pub const ALL: [IssuanceStatus; 4] = [
        IssuanceStatus::Pending,
        IssuanceStatus::Accepted,
        IssuanceStatus::Rejected,
        IssuanceStatus::Error,
    ];

    pub const fn as_str(self) -> &'static str {
        match self {
            IssuanceStatus::Pending => "pending",
            IssuanceStatus::Accepted => "accepted",
            IssuanceStatus::Rejected => "rejected",
            IssuanceStatus::Error => "error",
        }
    }
}

impl FromStr for IssuanceStatus {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        IssuanceStatus::ALL
            .into_iter()
            .find(|x| x.as_str() == s)
            .ok_or_else(|| format!("must be one of pending, accepted, rejected, error; got `{s}`"))
    }
}

impl fmt::Display for IssuanceStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How the offer reaches the recipient.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Delivery {
    /// The issuer emails the recipient.
    Email,
    /// The caller delivers the offer itself.
    None,
    /// The caller shows or sends the deep link.
    Link,
    /// The caller shows the QR code.
    Qr,
}

impl Delivery {
    pub const ALL: [Delivery; 4] = [
        Delivery::Email,
        Delivery::None,
        Delivery::Link,
        Delivery::Qr,
    ];

    pub const fn as_str(self) -> &'static str {
        match self {
            Delivery::Email => "email",
            Delivery::None => "none",
            Delivery::Link => "link",
            Delivery::Qr => "qr",
        }
    }
}

impl FromStr for Delivery {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Delivery::ALL
            .into_iter()
            .find(|x| x.as_str() == s)
            .ok_or_else(|| format!("must be one of email, none, link, qr; got `{s}`"))
    }
}

/// The grant type the wallet redeems the offer with.
pub const PRE_AUTHORIZED_CODE_GRANT: &str = "urn:ietf:params:oauth:grant-type:pre-authorized_code";

/// An issuance as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct Issuance {
    pub tenant_id: TenantId,
    pub id: IssuanceId,
    pub client_request_id: String,
    /// SHA-256 over the canonical create request; tells a replay from a reused key.
    pub request_fingerprint: String,
    pub credential_configuration_id: String,
    pub status: IssuanceStatus,
    pub reason: Option<String>,
    /// The credential subject data; `None` once purged (terminal issuances).
    pub payload: Option<Value>,
    pub delivery: Delivery,
    pub email: Option<String>,
    pub grant_type: String,
    pub offer_id: String,
    /// SHA-256 of the pre-authorized code, base64url.
    pub pre_authorized_code_hash: String,
    /// The pre-authorized code encrypted at rest, for repeated offer fetches.
    pub pre_authorized_code_sealed: String,
    /// Keyed hash of the transaction code, when the offer needs one.
    pub tx_code_hash: Option<String>,
    /// Wrong transaction codes tried so far; at the cap the code is dead.
    pub tx_code_failures: i64,
    /// When a wallet redeemed the pre-authorized code; codes are single-use.
    pub code_redeemed_at: Option<DateTime<Utc>>,
    /// Handed to the wallet with the credential; its notifications must quote it.
    pub notification_id: Option<String>,
    pub expires_at: DateTime<Utc>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// One entry of an issuance's event log (the transactional outbox of DESIGN §6).
#[derive(Debug, Clone, PartialEq)]
pub struct IssuanceEvent {
    pub tenant_id: TenantId,
    pub issuance_id: IssuanceId,
    /// 1, 2, 3, ... per issuance.
    pub sequence: i64,
    /// Assigned by the store; increases across all issuances.
    pub global_sequence: i64,
    pub kind: String,
    pub status: IssuanceStatus,
    pub reason: Option<String>,
    pub occurred_at: DateTime<Utc>,
}

/// Event kinds written by this crate.
pub mod event_kind {
    pub const CREATED: &str = "created";
    pub const OFFER_RETRIEVED: &str = "offer_retrieved";
    pub const CANCELLED: &str = "cancelled";
    pub const EXPIRED: &str = "expired";
    pub const TOKEN_ISSUED: &str = "token_issued";
    pub const TX_CODE_FAILED: &str = "tx_code_failed";
    pub const CREDENTIAL_ISSUED: &str = "credential_issued";
    pub const CREDENTIAL_ACCEPTED: &str = "credential_accepted";
    pub const CREDENTIAL_DELETED: &str = "credential_deleted";
    pub const CREDENTIAL_FAILURE: &str = "credential_failure";
}

/// Reasons of `rejected` / `error` issuances.
pub mod reason {
    pub const EXPIRED: &str = "expired";
    pub const CANCELLED: &str = "cancelled";
    pub const DECLINED: &str = "declined";
    pub const CREDENTIAL_FAILURE: &str = "credential_failure";
}

impl IssuanceStatus {
    /// Only a pending issuance still needs its payload (to issue the credential); every other
    /// status purges it.
    pub fn keeps_payload(self) -> bool {
        self == IssuanceStatus::Pending
    }
}

/// A state change (or, with `to: None`, a plain event) applied atomically with its event.
#[derive(Debug, Clone, PartialEq)]
pub struct Transition {
    /// Applies only while the issuance is in one of these statuses.
    pub from: Vec<IssuanceStatus>,
    /// The new status and reason; `None` records the event without a status change.
    pub to: Option<(IssuanceStatus, Option<String>)>,
    /// The event's kind.
    pub kind: String,
    pub at: DateTime<Utc>,
    /// Also marks the pre-authorized code redeemed; applies only while it is not yet.
    pub redeem_code: bool,
    /// Also stores the notification id handed to the wallet.
    pub notification_id: Option<String>,
}

impl Transition {
    /// A status change from any of `from`.
    pub fn status(
        from: &[IssuanceStatus],
        to: IssuanceStatus,
        reason: Option<&str>,
        kind: &str,
        at: DateTime<Utc>,
    ) -> Self {
        Self {
            to: Some((to, reason.map(str::to_owned))),
            ..Self::event(from, kind, at)
        }
    }

    /// An event without a status change, recorded while the issuance is in one of `from`.
    pub fn event(from: &[IssuanceStatus], kind: &str, at: DateTime<Utc>) -> Self {
        Self {
            from: from.to_vec(),
            to: None,
            kind: kind.to_owned(),
            at,
            redeem_code: false,
            notification_id: None,
        }
    }
}

/// What applying a transition did.
#[derive(Debug, Clone, PartialEq)]
pub enum TransitionOutcome {
    /// Applied; the issuance as it is now (payload purged when it left `pending`).
    Applied(Issuance),
    /// The issuance is in a status the transition does not apply to; nothing changed.
    Skipped(Issuance),
    NotFound,
}

/// Filter and page of a list request.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ListFilter {
    pub status: Option<IssuanceStatus>,
    pub client_request_id: Option<String>,
    /// Return issuances older than this one (the previous page's last id).
    pub before: Option<IssuanceId>,
    pub limit: u32,
}

/// What inserting an issuance did.
#[derive(Debug, Clone, PartialEq)]
pub enum InsertOutcome {
    Inserted(Issuance),
    /// Another issuance of the tenant holds this `client_request_id`; here it is.
    Duplicate(Issuance),
}
