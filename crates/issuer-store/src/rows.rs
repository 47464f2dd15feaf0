//! Row → domain mapping and sqlx → domain error mapping shared by both backends.
//!
//! The backends store the same columns under the same names and differ only in how ids,
//! timestamps and JSON are encoded. Each backend implements [`RowAccess`] for its row type to
//! hide that difference, and the entity mapping is written once against the trait.

use std::str::FromStr;

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use chrono::{DateTime, SubsecRound, Utc};
use issuer_domain::{
    Error, ErrorCode,
    ids::{IssuanceId, TenantId},
    model::{
        ApiClient, Branding, Delivery, EmailDelivery, EventKind, Issuance, IssuanceEvent,
        IssuanceStatus, RateLimit, Scope, StoreGauges, Tenant,
    },
    status::{IssuedCredentials, StatusBlock},
    webhook::{self, DeliveryState, WebhookDelivery, WebhookEndpoint},
};
use serde_json::Value;
use uuid::Uuid;

/// Truncates a timestamp to whole microseconds, the precision both backends store.
///
/// The store applies it to every timestamp it writes, so what it returns equals what it was
/// given after this truncation; callers comparing a stored entity with their input apply it to
/// the input.
pub fn trunc_micros(t: DateTime<Utc>) -> DateTime<Utc> {
    t.trunc_subsecs(6)
}

/// Outbox backlogs in one statement; both backends understand it.
pub(crate) const GAUGES_SQL: &str = "SELECT \
    (SELECT count(*) FROM webhook_deliveries WHERE state = 'pending') AS webhooks_pending, \
    (SELECT min(next_attempt_at) FROM webhook_deliveries WHERE state = 'pending') AS webhook_oldest_due, \
    (SELECT count(*) FROM email_deliveries WHERE state = 'pending') AS emails_pending, \
    (SELECT min(next_attempt_at) FROM email_deliveries WHERE state = 'pending') AS email_oldest_due";

pub(crate) fn gauges(
    row: &impl RowAccess,
    pool_size: u32,
    pool_idle: u32,
    pool_max: u32,
) -> Result<StoreGauges, Error> {
    let map = || -> Result<StoreGauges, sqlx::Error> {
        Ok(StoreGauges {
            webhooks_pending: u64::try_from(row.int("webhooks_pending")?).unwrap_or(0),
            webhook_oldest_due: row.opt_time("webhook_oldest_due")?,
            emails_pending: u64::try_from(row.int("emails_pending")?).unwrap_or(0),
            email_oldest_due: row.opt_time("email_oldest_due")?,
            pool_size,
            pool_idle,
            pool_max,
        })
    };
    map().map_err(Error::internal)
}

/// What a store holds after writing `issuance`: the same entity at stored precision.
pub(crate) fn as_stored(issuance: &Issuance) -> Issuance {
    Issuance {
        expires_at: trunc_micros(issuance.expires_at),
        created_at: trunc_micros(issuance.created_at),
        updated_at: trunc_micros(issuance.updated_at),
        code_redeemed_at: issuance.code_redeemed_at.map(trunc_micros),
        offer_retrieved_at: issuance.offer_retrieved_at.map(trunc_micros),
        credential: issuance.credential.map(|c| IssuedCredentials {
            expires_at: trunc_micros(c.expires_at),
            ..c
        }),
        ..issuance.clone()
    }
}

/// The columns of `issuances` a create writes, in the order both backends insert them.
macro_rules! issuance_insert_columns {
    () => {
        "tenant_id, id, client_request_id, request_fingerprint, credential_configuration_id, \
         status, reason, payload, delivery, email, grant_type, offer_id, \
         pre_authorized_code_hash, pre_authorized_code_sealed, expires_at, created_at, updated_at, \
         tx_code_hash, tx_code_failures, code_redeemed_at, notification_id, batch_id"
    };
}
pub(crate) use issuance_insert_columns;

/// The columns of `issuances` that [`issuance`] reads: those a create writes, and those only
/// later transitions set (a new issuance's `version` is the column default, 1).
macro_rules! issuance_columns {
    () => {
        concat!(
            $crate::rows::issuance_insert_columns!(),
            ", offer_retrieved_at, version, credential_status, credentials_issued, \
             credential_expires_at"
        )
    };
}
pub(crate) use issuance_columns;

macro_rules! event_columns {
    () => {
        "tenant_id, issuance_id, sequence, global_sequence, kind, status, reason, occurred_at"
    };
}
pub(crate) use event_columns;

macro_rules! tenant_columns {
    () => {
        "id, name, default_offer_ttl_secs, max_offer_ttl_secs, created_at, require_tx_code, \
         display_name, logo_url, support_contact, rate_limit_per_sec, rate_limit_burst"
    };
}
pub(crate) use tenant_columns;

macro_rules! email_columns {
    () => {
        "tenant_id, issuance_id, state, attempts, next_attempt_at, last_error, sent_at, \
         created_at, updated_at"
    };
}
pub(crate) use email_columns;

macro_rules! client_columns {
    () => {
        "tenant_id, client_id, secret_hash, scopes, active, created_at"
    };
}
pub(crate) use client_columns;

macro_rules! endpoint_columns {
    () => {
        "tenant_id, id, url, event_types, secret_sealed, previous_secret_sealed, \
         previous_secret_expires_at, enabled, disabled_reason, failing_since, created_at, updated_at"
    };
}
pub(crate) use endpoint_columns;

macro_rules! delivery_columns {
    () => {
        "tenant_id, id, endpoint_id, issuance_id, sequence, event_type, message_id, payload, state, \
         attempts, next_attempt_at, last_status, last_error, last_latency_ms, traceparent, created_at, \
         updated_at"
    };
}
pub(crate) use delivery_columns;

/// Typed column access over a backend's row.
pub(crate) trait RowAccess {
    fn uuid(&self, col: &str) -> Result<Uuid, sqlx::Error>;
    fn opt_uuid(&self, col: &str) -> Result<Option<Uuid>, sqlx::Error>;
    fn time(&self, col: &str) -> Result<DateTime<Utc>, sqlx::Error>;
    fn opt_time(&self, col: &str) -> Result<Option<DateTime<Utc>>, sqlx::Error>;
    fn opt_int(&self, col: &str) -> Result<Option<i64>, sqlx::Error>;
    fn text(&self, col: &str) -> Result<String, sqlx::Error>;
    fn opt_text(&self, col: &str) -> Result<Option<String>, sqlx::Error>;
    fn int(&self, col: &str) -> Result<i64, sqlx::Error>;
    fn flag(&self, col: &str) -> Result<bool, sqlx::Error>;
    fn json(&self, col: &str) -> Result<Option<Value>, sqlx::Error>;

    /// A text column holding a value of an enum-like type.
    fn parsed<T>(&self, col: &str) -> Result<T, sqlx::Error>
    where
        T: FromStr,
        T::Err: std::fmt::Display,
    {
        let raw = self.text(col)?;
        raw.parse()
            .map_err(|e: T::Err| decode_error(col, format!("`{raw}`: {e}")))
    }
}

/// A decoding failure of one column, shaped like the ones sqlx reports itself.
pub(crate) fn decode_error(col: &str, msg: impl Into<String>) -> sqlx::Error {
    sqlx::Error::ColumnDecode {
        index: format!("{col:?}"),
        source: msg.into().into(),
    }
}

pub(crate) fn tenant(row: &impl RowAccess) -> Result<Tenant, Error> {
    let map = || -> Result<Tenant, sqlx::Error> {
        Ok(Tenant {
            id: TenantId(row.uuid("id")?),
            name: row.text("name")?,
            default_offer_ttl_secs: row.int("default_offer_ttl_secs")?,
            max_offer_ttl_secs: row.int("max_offer_ttl_secs")?,
            require_tx_code: row.flag("require_tx_code")?,
            branding: Branding {
                display_name: row.opt_text("display_name")?,
                logo_url: row.opt_text("logo_url")?,
                support_contact: row.opt_text("support_contact")?,
            },
            client_rate_limit: match (
                row.opt_int("rate_limit_per_sec")?,
                row.opt_int("rate_limit_burst")?,
            ) {
                (Some(per_sec), Some(burst)) => Some(RateLimit {
                    per_sec: u32::try_from(per_sec).unwrap_or(u32::MAX),
                    burst: u32::try_from(burst).unwrap_or(u32::MAX),
                }),
                _ => None,
            },
            created_at: row.time("created_at")?,
        })
    };
    map().map_err(Error::internal)
}

pub(crate) fn email_delivery(row: &impl RowAccess) -> Result<EmailDelivery, Error> {
    let map = || -> Result<EmailDelivery, sqlx::Error> {
        Ok(EmailDelivery {
            tenant_id: TenantId(row.uuid("tenant_id")?),
            issuance_id: IssuanceId(row.uuid("issuance_id")?),
            state: row.parsed("state")?,
            attempts: row.int("attempts")?,
            next_attempt_at: row.time("next_attempt_at")?,
            last_error: row.opt_text("last_error")?,
            sent_at: row.opt_time("sent_at")?,
            created_at: row.time("created_at")?,
            updated_at: row.time("updated_at")?,
        })
    };
    map().map_err(Error::internal)
}

pub(crate) fn client(row: &impl RowAccess) -> Result<ApiClient, Error> {
    let map = || -> Result<ApiClient, sqlx::Error> {
        let scopes = row.text("scopes")?;
        Ok(ApiClient {
            tenant_id: TenantId(row.uuid("tenant_id")?),
            client_id: row.text("client_id")?,
            secret_hash: row.text("secret_hash")?,
            scopes: Scope::parse_list(&scopes)
                .map_err(|e| decode_error("scopes", format!("`{scopes}`: {e}")))?,
            active: row.flag("active")?,
            created_at: row.time("created_at")?,
        })
    };
    map().map_err(Error::internal)
}

pub(crate) fn webhook_endpoint(row: &impl RowAccess) -> Result<WebhookEndpoint, Error> {
    let map = || -> Result<WebhookEndpoint, sqlx::Error> {
        Ok(WebhookEndpoint {
            tenant_id: TenantId(row.uuid("tenant_id")?),
            id: row.uuid("id")?,
            url: row.text("url")?,
            event_types: row
                .text("event_types")?
                .split_whitespace()
                .map(str::to_owned)
                .collect(),
            secret_sealed: row.text("secret_sealed")?,
            previous_secret_sealed: row.opt_text("previous_secret_sealed")?,
            previous_secret_expires_at: row.opt_time("previous_secret_expires_at")?,
            enabled: row.flag("enabled")?,
            disabled_reason: row.opt_text("disabled_reason")?,
            failing_since: row.opt_time("failing_since")?,
            created_at: row.time("created_at")?,
            updated_at: row.time("updated_at")?,
        })
    };
    map().map_err(Error::internal)
}

pub(crate) fn webhook_delivery(row: &impl RowAccess) -> Result<WebhookDelivery, Error> {
    let map = || -> Result<WebhookDelivery, sqlx::Error> {
        Ok(WebhookDelivery {
            tenant_id: TenantId(row.uuid("tenant_id")?),
            id: row.uuid("id")?,
            endpoint_id: row.uuid("endpoint_id")?,
            issuance_id: IssuanceId(row.uuid("issuance_id")?),
            sequence: row.int("sequence")?,
            event_type: row.text("event_type")?,
            message_id: row.text("message_id")?,
            payload: row.json("payload")?.unwrap_or(Value::Null),
            state: row.parsed::<DeliveryState>("state")?,
            attempts: row.int("attempts")?,
            next_attempt_at: row.time("next_attempt_at")?,
            last_status: row.opt_int("last_status")?,
            last_error: row.opt_text("last_error")?,
            last_latency_ms: row.opt_int("last_latency_ms")?,
            traceparent: row.opt_text("traceparent")?,
            created_at: row.time("created_at")?,
            updated_at: row.time("updated_at")?,
        })
    };
    map().map_err(Error::internal)
}

/// The W3C `traceparent` of `span`, if it is traced. The stores write the caller's with each
/// webhook delivery, so that its attempts join the trace of the request that caused it.
pub fn traceparent(span: &tracing::Span) -> Option<String> {
    use opentelemetry::trace::TraceContextExt;
    use tracing_opentelemetry::OpenTelemetrySpanExt;
    let cx = span.context();
    let span = cx.span();
    let sc = span.span_context();
    sc.is_valid().then(|| {
        format!(
            "00-{}-{}-{:02x}",
            sc.trace_id(),
            sc.span_id(),
            sc.trace_flags().to_u8() & 0x01
        )
    })
}

/// The webhook an event announces, with its body: `(type, message id, payload)`.
pub(crate) fn webhook_message(
    issuance: &Issuance,
    event: &IssuanceEvent,
    status_changed: bool,
) -> Option<(&'static str, String, Value)> {
    let kind = webhook::event_type(event, status_changed)?;
    Some((
        kind,
        webhook::message_id(issuance.id, event.sequence),
        webhook::payload(issuance, event, kind),
    ))
}

pub(crate) fn issuance(row: &impl RowAccess) -> Result<Issuance, Error> {
    let map = || -> Result<Issuance, sqlx::Error> {
        Ok(Issuance {
            tenant_id: TenantId(row.uuid("tenant_id")?),
            id: IssuanceId(row.uuid("id")?),
            client_request_id: row.text("client_request_id")?,
            request_fingerprint: row.text("request_fingerprint")?,
            credential_configuration_id: row.text("credential_configuration_id")?,
            status: row.parsed::<IssuanceStatus>("status")?,
            reason: row
                .opt_text("reason")?
                .map(|r| r.parse().map_err(|e: String| decode_error("reason", e)))
                .transpose()?,
            version: row.int("version")?,
            batch_id: row.opt_uuid("batch_id")?,
            payload: row.json("payload")?,
            delivery: row.parsed::<Delivery>("delivery")?,
            email: row.opt_text("email")?,
            grant_type: row.text("grant_type")?,
            offer_id: row.text("offer_id")?,
            pre_authorized_code_hash: row.text("pre_authorized_code_hash")?,
            pre_authorized_code_sealed: row.text("pre_authorized_code_sealed")?,
            expires_at: row.time("expires_at")?,
            created_at: row.time("created_at")?,
            updated_at: row.time("updated_at")?,
            tx_code_hash: row.opt_text("tx_code_hash")?,
            tx_code_failures: row.int("tx_code_failures")?,
            code_redeemed_at: row.opt_time("code_redeemed_at")?,
            notification_id: row.opt_text("notification_id")?,
            offer_retrieved_at: row.opt_time("offer_retrieved_at")?,
            credential: match row.opt_text("credential_status")? {
                None => None,
                Some(status) => Some(IssuedCredentials {
                    status: status
                        .parse()
                        .map_err(|e: String| decode_error("credential_status", e))?,
                    count: row.int("credentials_issued")?,
                    expires_at: row
                        .opt_time("credential_expires_at")?
                        .ok_or_else(|| decode_error("credential_expires_at", "missing"))?,
                }),
            },
        })
    };
    map().map_err(Error::internal)
}

pub(crate) fn event(row: &impl RowAccess) -> Result<IssuanceEvent, Error> {
    let map = || -> Result<IssuanceEvent, sqlx::Error> {
        Ok(IssuanceEvent {
            tenant_id: TenantId(row.uuid("tenant_id")?),
            issuance_id: IssuanceId(row.uuid("issuance_id")?),
            sequence: row.int("sequence")?,
            global_sequence: row.int("global_sequence")?,
            kind: row.parsed::<EventKind>("kind")?,
            status: row.parsed::<IssuanceStatus>("status")?,
            reason: row.opt_text("reason")?,
            occurred_at: row.time("occurred_at")?,
        })
    };
    map().map_err(Error::internal)
}

/// Rejects a first event that does not belong to the issuance it is written with: the
/// foreign key would only catch a wrong issuance id if that issuance happened not to exist.
pub(crate) fn check_first_event(issuance: &Issuance, event: &IssuanceEvent) -> Result<(), Error> {
    if issuance.version != 1 {
        return Err(Error::internal(format!(
            "a new issuance starts at version 1, not {}",
            issuance.version
        )));
    }
    if event.tenant_id != issuance.tenant_id || event.issuance_id != issuance.id {
        return Err(Error::internal(format!(
            "first event belongs to issuance {}/{}, not {}/{}",
            event.tenant_id, event.issuance_id, issuance.tenant_id, issuance.id
        )));
    }
    Ok(())
}

/// Which backend an error came from; SQLSTATEs and SQLite result codes share `code()`.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Backend {
    Postgres,
    Sqlite,
}

/// Maps a sqlx error to the domain: failures to reach the database become `Unavailable` (the
/// caller may retry), everything else `Internal`.
pub(crate) fn db_error(backend: Backend, e: sqlx::Error) -> Error {
    if is_unavailable(backend, &e) {
        Error::unavailable(e)
    } else {
        Error::internal(e)
    }
}

/// Like [`db_error`], looking through the migrator's wrapper so that an unreachable database
/// during migration still reads as `Unavailable`.
pub(crate) fn migrate_error(backend: Backend, e: sqlx::migrate::MigrateError) -> Error {
    match e {
        sqlx::migrate::MigrateError::Execute(e) => db_error(backend, e),
        other => Error::internal(other),
    }
}

fn is_unavailable(backend: Backend, e: &sqlx::Error) -> bool {
    matches!(
        e,
        sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed | sqlx::Error::WorkerCrashed
    ) || is_connection_lost(backend, e)
}

/// Whether `e` says the connection or the server is gone (as opposed to a busy pool), or, on
/// SQLite, that the database stayed locked.
pub(crate) fn is_connection_lost(backend: Backend, e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Io(_) | sqlx::Error::Tls(_) => true,
        sqlx::Error::Database(db) => {
            let Some(code) = db.code() else { return false };
            match backend {
                // Class 08: connection exceptions. 57P01..57P03: admin shutdown, crash
                // shutdown, cannot connect now (starting up or in recovery).
                Backend::Postgres => {
                    code.starts_with("08") || matches!(&*code, "57P01" | "57P02" | "57P03")
                }
                // SQLITE_BUSY (any extended variant) after busy_timeout ran out: another writer
                // held the database for too long; retrying later is the right answer.
                Backend::Sqlite => code.parse::<i32>().is_ok_and(|c| c & 0xff == SQLITE_BUSY),
            }
        }
        _ => false,
    }
}

const SQLITE_BUSY: i32 = 5;

/// `AlreadyExists` when `e` is a unique violation of one of `constraints`, otherwise the usual
/// mapping. SQLite does not report constraint names, so there any unique violation counts;
/// callers pass only statements whose every unique constraint means "already exists".
pub(crate) fn conflict_or_db_error(
    backend: Backend,
    e: sqlx::Error,
    constraints: &[&str],
    message: impl FnOnce() -> String,
) -> Error {
    if let Some(db) = e.as_database_error()
        && db.is_unique_violation()
        && db.constraint().is_none_or(|c| constraints.contains(&c))
    {
        return Error {
            source: Some(Box::new(e)),
            ..Error::new(ErrorCode::AlreadyExists, message())
        };
    }
    db_error(backend, e)
}

/// Whether `t` applies to `current`: its status is one of `from`, and a code redemption finds
/// the code unredeemed.
/// The block of `take` allocations that a reservation returned: the list's row after it.
pub(crate) fn status_block(row: &impl RowAccess, take: i64) -> Result<StatusBlock, Error> {
    let map = || -> Result<StatusBlock, sqlx::Error> {
        let seed = URL_SAFE_NO_PAD
            .decode(row.text("seed")?)
            .ok()
            .and_then(|b| <[u8; 16]>::try_from(b).ok())
            .ok_or_else(|| decode_error("seed", "not 16 bytes of base64url"))?;
        Ok(StatusBlock {
            list_id: row.uuid("id")?,
            size: row.int("size")?,
            seed,
            first: row.int("allocated")? - take,
            count: take,
        })
    };
    map().map_err(Error::internal)
}

/// How a list's permutation key is stored: base64url.
pub(crate) fn status_seed_text(seed: &[u8; 16]) -> String {
    URL_SAFE_NO_PAD.encode(seed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trunc_micros_drops_only_sub_microsecond_digits() {
        let t = DateTime::parse_from_rfc3339("2025-01-02T03:04:05.123456789Z")
            .unwrap()
            .with_timezone(&Utc);
        let expected = DateTime::parse_from_rfc3339("2025-01-02T03:04:05.123456Z")
            .unwrap()
            .with_timezone(&Utc);
        assert_eq!(trunc_micros(t), expected);
        assert_eq!(trunc_micros(expected), expected);
    }

    #[test]
    fn connection_failures_are_unavailable() {
        let io = sqlx::Error::Io(std::io::Error::from(std::io::ErrorKind::ConnectionRefused));
        assert_eq!(db_error(Backend::Postgres, io).code, ErrorCode::Unavailable);
        assert_eq!(
            db_error(Backend::Sqlite, sqlx::Error::PoolTimedOut).code,
            ErrorCode::Unavailable
        );
        assert_eq!(
            db_error(Backend::Postgres, sqlx::Error::RowNotFound).code,
            ErrorCode::Internal
        );
    }
}
