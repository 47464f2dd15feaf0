//! Entities: tenants, API clients, issuances and their events.

use std::{fmt, str::FromStr};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use uuid::Uuid;

use crate::{
    ids::{IssuanceId, TenantId},
    status::IssuedCredentials,
};

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
    /// How the tenant appears to recipients.
    pub branding: Branding,
    /// The rate limit of each of the tenant's API clients; the service default when unset.
    pub client_rate_limit: Option<RateLimit>,
    pub created_at: DateTime<Utc>,
}

/// What one retention pass deleted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Purged {
    pub issuances: u64,
    pub events: u64,
    pub webhook_deliveries: u64,
}

/// A request budget: `per_sec` sustained, `burst` at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimit {
    pub per_sec: u32,
    pub burst: u32,
}

impl RateLimit {
    /// Both at least 1, the burst at least the rate, and below a million.
    pub fn new(per_sec: u32, burst: u32) -> Result<Self, String> {
        if per_sec == 0 || burst < per_sec || burst > 1_000_000 {
            return Err(format!(
                "a rate limit needs 1 <= per_sec <= burst <= 1000000 (got {per_sec}/s, burst {burst})"
            ));
        }
        Ok(Self { per_sec, burst })
    }
}

/// How a tenant appears to recipients: in offer emails and on the offer landing page.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Branding {
    /// The organisation's name as recipients know it; the tenant name when unset.
    pub display_name: Option<String>,
    /// An `https` URL of the organisation's logo.
    pub logo_url: Option<String>,
    /// Where recipients get help: an email address or an `https` URL.
    pub support_contact: Option<String>,
}

impl Branding {
    /// Checks every field; an empty string is refused (unset a field with `None`).
    pub fn validate(&self) -> Result<(), crate::Error> {
        let mut v = Vec::new();
        if let Some(name) = &self.display_name
            && (name.trim().is_empty()
                || name.chars().count() > 100
                || name.chars().any(char::is_control))
        {
            v.push(crate::FieldViolation::new(
                "display_name",
                "must be 1 to 100 characters, without control characters",
            ));
        }
        if let Some(url) = &self.logo_url
            && !is_https_url(url)
        {
            v.push(crate::FieldViolation::new(
                "logo_url",
                "must be an https URL of at most 2048 characters",
            ));
        }
        if let Some(contact) = &self.support_contact
            && !is_https_url(contact)
            && !crate::create::is_valid_email(contact)
        {
            v.push(crate::FieldViolation::new(
                "support_contact",
                "must be an email address or an https URL",
            ));
        }
        if v.is_empty() {
            Ok(())
        } else {
            Err(crate::Error::invalid(v))
        }
    }
}

/// An absolute `https` URL with a host, of printable ASCII without quotes, angle brackets or
/// spaces: safe to place in an HTML attribute or an email once escaped.
fn is_https_url(s: &str) -> bool {
    let Some(rest) = s.strip_prefix("https://") else {
        return false;
    };
    let host = rest.split(['/', '?', '#']).next().unwrap_or("");
    s.len() <= 2048
        && !host.is_empty()
        && !host.contains('@')
        && s.bytes()
            .all(|b| b.is_ascii_graphic() && !matches!(b, b'"' | b'\'' | b'<' | b'>' | b'`'))
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
            branding: Branding::default(),
            client_rate_limit: None,
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
    /// Why it is `rejected` or `error`.
    pub reason: Option<Reason>,
    /// The sequence of its last event: every change adds one, and a store applies a change
    /// only while the version it was planned from is still current.
    pub version: i64,
    /// The batch it came in with (a bulk create), if any.
    pub batch_id: Option<Uuid>,
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
    /// Transaction codes compared so far (each attempt is counted before it is compared, so
    /// the right one counts too: it redeems the code, which then is dead anyway); at the cap
    /// the code is dead.
    pub tx_code_failures: i64,
    /// When a wallet redeemed the pre-authorized code; codes are single-use.
    pub code_redeemed_at: Option<DateTime<Utc>>,
    /// Handed to the wallet with the credential; its notifications must quote it.
    pub notification_id: Option<String>,
    /// When the offer was first fetched; later fetches record nothing.
    pub offer_retrieved_at: Option<DateTime<Utc>>,
    /// The credentials the wallet received; `None` until it takes them.
    pub credential: Option<IssuedCredentials>,
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
    pub kind: EventKind,
    pub status: IssuanceStatus,
    pub reason: Option<String>,
    pub occurred_at: DateTime<Utc>,
}
/// What happened to an issuance: the kind of each event in its log.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    Created,
    OfferRetrieved,
    Cancelled,
    Expired,
    TokenIssued,
    CredentialIssued,
    CredentialAccepted,
    CredentialDeleted,
    CredentialFailure,
    EmailSent,
    EmailFailed,
    CredentialRevoked,
    CredentialSuspended,
    CredentialReinstated,
}

impl EventKind {
    pub const ALL: [EventKind; 14] = [
        EventKind::Created,
        EventKind::OfferRetrieved,
        EventKind::Cancelled,
        EventKind::Expired,
        EventKind::TokenIssued,
        EventKind::CredentialIssued,
        EventKind::CredentialAccepted,
        EventKind::CredentialDeleted,
        EventKind::CredentialFailure,
        EventKind::EmailSent,
        EventKind::EmailFailed,
        EventKind::CredentialRevoked,
        EventKind::CredentialSuspended,
        EventKind::CredentialReinstated,
    ];

    /// The word stored and shown (`type` of an event in the API).
    pub const fn as_str(self) -> &'static str {
        match self {
            EventKind::Created => "created",
            EventKind::OfferRetrieved => "offer_retrieved",
            EventKind::Cancelled => "cancelled",
            EventKind::Expired => "expired",
            EventKind::TokenIssued => "token_issued",
            EventKind::CredentialIssued => "credential_issued",
            EventKind::CredentialAccepted => "credential_accepted",
            EventKind::CredentialDeleted => "credential_deleted",
            EventKind::CredentialFailure => "credential_failure",
            EventKind::EmailSent => "email_sent",
            EventKind::EmailFailed => "email_failed",
            EventKind::CredentialRevoked => "credential_revoked",
            EventKind::CredentialSuspended => "credential_suspended",
            EventKind::CredentialReinstated => "credential_reinstated",
        }
    }
}

impl FromStr for EventKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        EventKind::ALL
            .into_iter()
            .find(|k| k.as_str() == s)
            .ok_or_else(|| format!("unknown event kind `{s}`"))
    }
}

impl fmt::Display for EventKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why an issuance is `rejected` or `error`: the reason a status change records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reason {
    Expired,
    Cancelled,
    Declined,
    CredentialFailure,
}

impl Reason {
    pub const ALL: [Reason; 4] = [
        Reason::Expired,
        Reason::Cancelled,
        Reason::Declined,
        Reason::CredentialFailure,
    ];

    /// The word stored and shown (`reason` in the API and webhooks).
    pub const fn as_str(self) -> &'static str {
        match self {
            Reason::Expired => "expired",
            Reason::Cancelled => "cancelled",
            Reason::Declined => "declined",
            Reason::CredentialFailure => "credential_failure",
        }
    }
}

impl FromStr for Reason {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Reason::ALL
            .into_iter()
            .find(|r| r.as_str() == s)
            .ok_or_else(|| format!("unknown reason `{s}`"))
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a wallet reports about the credential it received (OID4VCI §11).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum WalletEvent {
    Accepted,
    Deleted,
    Failure,
}

impl IssuanceStatus {
    /// Only a pending issuance still needs its payload (to issue the credential); every other
    /// status purges it.
    pub fn keeps_payload(self) -> bool {
        self == IssuanceStatus::Pending
    }
}

/// Where an offer email stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum EmailState {
    /// Not sent yet; the next attempt is due at `next_attempt_at`.
    Pending,
    Sent,
    /// Given up: a permanent refusal, or every retry failed.
    Failed,
    /// The issuance ended before the email went out.
    Cancelled,
}

impl EmailState {
    pub const fn as_str(self) -> &'static str {
        match self {
            EmailState::Pending => "pending",
            EmailState::Sent => "sent",
            EmailState::Failed => "failed",
            EmailState::Cancelled => "cancelled",
        }
    }
}

impl std::str::FromStr for EmailState {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "pending" => Ok(EmailState::Pending),
            "sent" => Ok(EmailState::Sent),
            "failed" => Ok(EmailState::Failed),
            "cancelled" => Ok(EmailState::Cancelled),
            other => Err(format!("unknown email state `{other}`")),
        }
    }
}

/// The email outbox row of an issuance with `delivery: email`, written with the issuance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EmailDelivery {
    pub tenant_id: TenantId,
    pub issuance_id: IssuanceId,
    pub state: EmailState,
    /// Attempts made so far.
    pub attempts: i64,
    pub next_attempt_at: DateTime<Utc>,
    /// Why the last attempt failed, without the address or message content.
    pub last_error: Option<String>,
    pub sent_at: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// Point-in-time figures a store reports for monitoring.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StoreGauges {
    /// Webhook deliveries waiting for an attempt (due or not), and the earliest due time.
    pub webhooks_pending: u64,
    pub webhook_oldest_due: Option<DateTime<Utc>>,
    /// Offer emails not sent yet, and the earliest due time.
    pub emails_pending: u64,
    pub email_oldest_due: Option<DateTime<Utc>>,
    /// Connections of the pool: open, idle, and the most it may open.
    pub pool_size: u32,
    pub pool_idle: u32,
    pub pool_max: u32,
}

/// Filter and page of a list request.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ListFilter {
    pub status: Option<IssuanceStatus>,
    pub client_request_id: Option<String>,
    pub batch_id: Option<Uuid>,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_kinds_and_reasons_round_trip_through_their_words() {
        for kind in EventKind::ALL {
            assert_eq!(kind.as_str().parse::<EventKind>(), Ok(kind));
            assert_eq!(serde_json::to_value(kind).unwrap(), kind.as_str());
        }
        for state in [
            EmailState::Pending,
            EmailState::Sent,
            EmailState::Failed,
            EmailState::Cancelled,
        ] {
            assert_eq!(serde_json::to_value(state).unwrap(), state.as_str());
        }
        assert!("tx_code_guessed".parse::<EventKind>().is_err());
        for reason in Reason::ALL {
            assert_eq!(reason.as_str().parse::<Reason>(), Ok(reason));
        }
        assert!("bored".parse::<Reason>().is_err());
    }

    fn fields(b: &Branding) -> Vec<String> {
        match b.validate() {
            Ok(()) => Vec::new(),
            Err(e) => e.violations.iter().map(|v| v.field.clone()).collect(),
        }
    }

    #[test]
    fn branding_accepts_names_https_urls_and_contacts() {
        let b = Branding {
            display_name: Some("Acme Credentials".into()),
            logo_url: Some("https://cdn.acme.example/logo.png?v=2".into()),
            support_contact: Some("help@acme.example".into()),
        };
        assert!(fields(&b).is_empty());
        let url_contact = Branding {
            support_contact: Some("https://acme.example/help".into()),
            ..Branding::default()
        };
        assert!(fields(&url_contact).is_empty());
        assert!(fields(&Branding::default()).is_empty());
    }

    #[test]
    fn branding_refuses_what_could_break_a_page_or_a_header() {
        for (b, field) in [
            (
                Branding {
                    display_name: Some(" ".into()),
                    ..Branding::default()
                },
                "display_name",
            ),
            (
                Branding {
                    display_name: Some("Acme\r\nBcc: x@y".into()),
                    ..Branding::default()
                },
                "display_name",
            ),
            (
                Branding {
                    logo_url: Some("http://acme.example/logo.png".into()),
                    ..Branding::default()
                },
                "logo_url",
            ),
            (
                Branding {
                    logo_url: Some("https://acme.example/\"onerror=\"x".into()),
                    ..Branding::default()
                },
                "logo_url",
            ),
            (
                Branding {
                    logo_url: Some("javascript:alert(1)".into()),
                    ..Branding::default()
                },
                "logo_url",
            ),
            (
                Branding {
                    support_contact: Some("not a contact".into()),
                    ..Branding::default()
                },
                "support_contact",
            ),
        ] {
            assert_eq!(fields(&b), vec![field.to_owned()], "{b:?}");
        }
    }
}
