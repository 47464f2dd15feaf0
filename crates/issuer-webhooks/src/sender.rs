//! One webhook delivery attempt over HTTP.
//!
//! Why a dedicated client: the defaults of a general-purpose HTTP client are
//! wrong for sending to tenant-chosen URLs. Here redirects are never followed
//! (a redirect could point anywhere, including past the guard, and the spec
//! treats 3xx as failure), proxies from the environment are ignored (they
//! would make the connect-time guard judge the proxy, not the destination),
//! and every resolved address passes the [`guard`](crate::guard).
//!
//! Invariants:
//! - The guard is consulted before every attempt (URL and IP literal) and at
//!   connect time (every resolved address); a refusal never opens a socket.
//! - The signature covers exactly the bytes sent, with the timestamp of this
//!   attempt (Standard Webhooks: retries are re-signed, `webhook-id` stays).
//! - [`Attempt::error`] is short and never contains secrets, the body or the
//!   URL (which may carry tenant tokens in its query).
//! - `send` never panics and never returns an error: every failure is an
//!   [`Outcome`] the scheduler can act on.

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, NaiveDateTime, Utc};
use http::header::{CONTENT_TYPE, HeaderMap, HeaderName, HeaderValue, RETRY_AFTER};
use reqwest::{Client, redirect};

use crate::guard::{GuardedResolver, NetworkPolicy, ResolveError};
use crate::signing::{WebhookSecret, sign};

/// The longest `Retry-After` honoured; a receiver cannot park a delivery
/// for longer than this.
pub const RETRY_AFTER_CAP: Duration = Duration::from_secs(24 * 60 * 60);

/// Upper bound on establishing the TCP (and TLS) connection, so a black-holed
/// address fails fast even when the per-attempt timeout is generous.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Longest [`Attempt::error`] kept: it is stored per attempt and shown in the
/// delivery log.
const MAX_ERROR_LEN: usize = 200;

const WEBHOOK_ID: HeaderName = HeaderName::from_static("webhook-id");
const WEBHOOK_TIMESTAMP: HeaderName = HeaderName::from_static("webhook-timestamp");
const WEBHOOK_SIGNATURE: HeaderName = HeaderName::from_static("webhook-signature");
const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");

/// What to send: one message to one endpoint.
#[derive(Clone)]
pub struct Delivery {
    /// The endpoint URL; checked by the guard on every attempt.
    pub url: String,
    /// The `webhook-id`: stable across retries so receivers can de-duplicate.
    /// Must not contain `.` (the signature delimiter).
    pub msg_id: String,
    /// The JSON body, signed and sent byte for byte.
    pub body: Vec<u8>,
    /// Every secret currently valid for the endpoint (two during rotation).
    pub secrets: Vec<WebhookSecret>,
    /// W3C trace context of the event, propagated to the receiver.
    pub traceparent: Option<String>,
}

impl fmt::Debug for Delivery {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // No URL (tenant tokens), no body, no secrets: this ends up in logs.
        f.debug_struct("Delivery")
            .field("msg_id", &self.msg_id)
            .field("body_len", &self.body.len())
            .field("secrets", &self.secrets.len())
            .field("traceparent", &self.traceparent)
            .finish_non_exhaustive()
    }
}

/// How an attempt ended, as far as scheduling is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// 2xx: done.
    Delivered,
    /// Worth trying again later: 5xx, 429, 408, timeouts, connection errors,
    /// 3xx (redirects are not followed) and 4xx other than 410.
    Retry,
    /// 410 Gone: the receiver asks us to stop; the endpoint must be disabled.
    Gone,
    /// The URL itself is refused (scheme, credentials, a refused IP literal): retrying
    /// cannot help until the endpoint URL (or the allow-list) changes. A hostname that
    /// resolves to refused addresses is a `Retry`, like one that does not resolve.
    Refused,
}

/// The record of one attempt, for the delivery log and the scheduler.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attempt {
    pub outcome: Outcome,
    /// The HTTP status, when a response arrived.
    pub status: Option<u16>,
    /// From just before sending until the response head (or the failure).
    pub latency: Duration,
    /// Short description of a failure; never secrets, body or URL.
    pub error: Option<String>,
    /// The receiver's `Retry-After`, capped at [`RETRY_AFTER_CAP`].
    pub retry_after: Option<Duration>,
}

impl Attempt {
    fn failed(outcome: Outcome, latency: Duration, error: impl Into<String>) -> Self {
        Self {
            outcome,
            status: None,
            latency,
            error: Some(truncate(error.into())),
            retry_after: None,
        }
    }
}

/// Sends webhook deliveries through the SSRF guard.
///
/// Holds two clients because reqwest does not tell a resolver the URL's
/// scheme: https resolves through the filtering [`GuardedResolver`], plain
/// http through the strict allow-listed-only one. Cheap to clone.
#[derive(Clone)]
pub struct Sender {
    policy: Arc<NetworkPolicy>,
    https: Client,
    http: Client,
}

impl fmt::Debug for Sender {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Sender")
            .field("policy", &self.policy)
            .finish_non_exhaustive()
    }
}

impl Sender {
    /// A sender with the given guard policy and per-attempt timeout.
    ///
    /// # Panics
    /// If the TLS backend cannot be initialised, which is a broken build or
    /// host rather than something to handle at run time; use
    /// [`try_new`](Self::try_new) to handle it anyway.
    pub fn new(policy: NetworkPolicy, timeout: Duration) -> Self {
        Self::try_new(policy, timeout)
            .expect("webhook HTTP client (TLS backend) failed to initialise")
    }

    pub fn try_new(policy: NetworkPolicy, timeout: Duration) -> Result<Self, reqwest::Error> {
        let policy = Arc::new(policy);
        let https = builder(timeout)
            .dns_resolver(GuardedResolver::new(policy.clone()))
            .https_only(true)
            .build()?;
        let http = builder(timeout)
            .dns_resolver(GuardedResolver::allow_listed_only(policy.clone()))
            .build()?;
        Ok(Self {
            policy,
            https,
            http,
        })
    }

    pub fn policy(&self) -> &NetworkPolicy {
        &self.policy
    }

    /// Makes one attempt to deliver `req`.
    pub async fn send(&self, req: &Delivery) -> Attempt {
        let started = Instant::now();

        // IP literals never reach the resolver, so this check is the guard for
        // them; for hostnames it re-checks scheme and userinfo.
        let url = match self.policy.check_url(&req.url) {
            Ok(url) => url,
            Err(e) => return Attempt::failed(Outcome::Refused, started.elapsed(), e.to_string()),
        };
        if req.secrets.is_empty() {
            // An unsigned webhook is useless to a receiver that verifies and
            // dangerous to one that does not; this is a caller bug.
            return Attempt::failed(Outcome::Retry, started.elapsed(), "no signing secret");
        }
        let Ok(msg_id) = HeaderValue::from_str(&req.msg_id) else {
            return Attempt::failed(Outcome::Retry, started.elapsed(), "invalid webhook-id");
        };

        let timestamp = Utc::now().timestamp();
        let secrets: Vec<&WebhookSecret> = req.secrets.iter().collect();
        let signature = sign(&secrets, &req.msg_id, timestamp, &req.body);

        let mut headers = HeaderMap::with_capacity(5);
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        headers.insert(WEBHOOK_ID, msg_id);
        headers.insert(WEBHOOK_TIMESTAMP, HeaderValue::from(timestamp));
        // `v1,` + base64 entries separated by spaces: always valid header text.
        let signature = HeaderValue::from_str(&signature).expect("signature header value is ASCII");
        headers.insert(WEBHOOK_SIGNATURE, signature);
        if let Some(tp) = &req.traceparent {
            // Tracing is best effort: a malformed traceparent must not cost
            // the delivery.
            match HeaderValue::from_str(tp) {
                Ok(v) => {
                    headers.insert(TRACEPARENT, v);
                }
                Err(_) => tracing::warn!(msg_id = %req.msg_id, "dropping invalid traceparent"),
            }
        }

        let client = if url.scheme() == "https" {
            &self.https
        } else {
            &self.http
        };
        let sent = started.elapsed();
        let result = client
            .post(url)
            .headers(headers)
            .body(req.body.clone())
            .send()
            .await;
        let latency = started.elapsed().saturating_sub(sent);

        match result {
            Ok(resp) => {
                let status = resp.status();
                let outcome = classify(status.as_u16());
                let retry_after = if outcome == Outcome::Delivered {
                    None
                } else {
                    resp.headers()
                        .get(RETRY_AFTER)
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| parse_retry_after(v, Utc::now()))
                };
                let error = match outcome {
                    Outcome::Delivered => None,
                    _ if status.is_redirection() => Some(format!(
                        "HTTP {} (redirects are not followed)",
                        status.as_u16()
                    )),
                    _ => Some(format!("HTTP {}", status.as_u16())),
                };
                // The response body is not read: nothing in it matters, and a
                // receiver must not be able to hold the worker with a slow body.
                Attempt {
                    outcome,
                    status: Some(status.as_u16()),
                    latency,
                    error,
                    retry_after,
                }
            }
            Err(e) => {
                // A hostname that resolves only to refused addresses and one that does not
                // resolve at all look the same to the tenant, text and retries alike: else
                // registering endpoints would tell which internal names exist.
                if let Some(failure) = resolve_failure(&e) {
                    tracing::info!(detail = %failure, "webhook destination unreachable");
                    return Attempt::failed(Outcome::Retry, latency, UNREACHABLE);
                }
                Attempt::failed(Outcome::Retry, latency, describe(&e))
            }
        }
    }
}

fn builder(timeout: Duration) -> reqwest::ClientBuilder {
    Client::builder()
        .redirect(redirect::Policy::none())
        .no_proxy()
        .timeout(timeout)
        .connect_timeout(CONNECT_TIMEOUT.min(timeout))
        .tcp_nodelay(true)
        .user_agent(concat!("issuer-webhooks/", env!("CARGO_PKG_VERSION")))
}

/// Maps a status to an outcome (Standard Webhooks "delivery success and
/// failure"): only 2xx succeeds, 410 stops, everything else is retried.
fn classify(status: u16) -> Outcome {
    match status {
        200..=299 => Outcome::Delivered,
        410 => Outcome::Gone,
        _ => Outcome::Retry,
    }
}

/// What tenants see when a destination's name resolves to no address the guard permits, or
/// to none at all.
pub const UNREACHABLE: &str = "destination unreachable: its name must resolve to a public address";

/// The guarded lookup's failure, if that is what failed the request: the resolver's error
/// travels inside reqwest's and hyper's errors as a source.
fn resolve_failure(e: &reqwest::Error) -> Option<&ResolveError> {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if let Some(r) = err.downcast_ref::<ResolveError>() {
            return Some(r);
        }
        cur = err.source();
    }
    None
}

/// A short, URL-free description of a transport error.
fn describe(e: &reqwest::Error) -> String {
    let kind = if e.is_timeout() {
        "timeout"
    } else if e.is_connect() {
        "connection failed"
    } else if e.is_body() {
        "error sending body"
    } else {
        "request failed"
    };
    // reqwest's own Display includes the URL; the innermost cause (an io or
    // hyper error) does not, and is the informative part.
    let mut root: &(dyn std::error::Error + 'static) = e;
    while let Some(next) = root.source() {
        root = next;
    }
    if std::ptr::addr_eq(root, e) {
        kind.to_owned()
    } else {
        format!("{kind}: {root}")
    }
}

fn truncate(mut s: String) -> String {
    if s.len() > MAX_ERROR_LEN {
        let mut end = MAX_ERROR_LEN;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
        s.push('…');
    }
    s
}

/// Parses a `Retry-After` value (RFC 9110 §10.2.3): delta-seconds or an
/// HTTP-date (IMF-fixdate, or the obsolete RFC 850 and asctime forms),
/// relative to `now`. A date in the past means "now" (zero). The result is
/// capped at [`RETRY_AFTER_CAP`]; unparseable values are ignored.
pub fn parse_retry_after(value: &str, now: DateTime<Utc>) -> Option<Duration> {
    let value = value.trim();
    if !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()) {
        // Too many digits for u64 is still "very long": cap it.
        let secs = value.parse::<u64>().unwrap_or(u64::MAX);
        return Some(Duration::from_secs(secs).min(RETRY_AFTER_CAP));
    }
    let at = DateTime::parse_from_rfc2822(value)
        .map(|d| d.with_timezone(&Utc))
        .ok()
        .or_else(|| {
            ["%A, %d-%b-%y %H:%M:%S GMT", "%a %b %e %H:%M:%S %Y"]
                .iter()
                .find_map(|f| NaiveDateTime::parse_from_str(value, f).ok())
                .map(|n| n.and_utc())
        })?;
    let delta = (at - now).to_std().unwrap_or(Duration::ZERO);
    Some(delta.min(RETRY_AFTER_CAP))
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone as _;

    #[test]
    fn statuses_map_to_outcomes() {
        for s in [200, 201, 202, 204, 299] {
            assert_eq!(classify(s), Outcome::Delivered, "{s}");
        }
        assert_eq!(classify(410), Outcome::Gone);
        for s in [
            100, 301, 302, 307, 308, 400, 401, 403, 404, 408, 409, 413, 429, 500, 502, 503, 504,
        ] {
            assert_eq!(classify(s), Outcome::Retry, "{s}");
        }
    }

    #[test]
    fn retry_after_forms() {
        let now = Utc.with_ymd_and_hms(1994, 11, 6, 8, 49, 0).unwrap();
        assert_eq!(parse_retry_after("7", now), Some(Duration::from_secs(7)));
        assert_eq!(parse_retry_after(" 0 ", now), Some(Duration::ZERO));
        assert_eq!(parse_retry_after("999999", now), Some(RETRY_AFTER_CAP));
        assert_eq!(
            parse_retry_after("99999999999999999999999", now),
            Some(RETRY_AFTER_CAP)
        );
        let secs = |s| Some(Duration::from_secs(s));
        assert_eq!(
            parse_retry_after("Sun, 06 Nov 1994 08:49:37 GMT", now),
            secs(37)
        );
        assert_eq!(
            parse_retry_after("Sunday, 06-Nov-94 08:49:37 GMT", now),
            secs(37)
        );
        assert_eq!(parse_retry_after("Sun Nov  6 08:49:37 1994", now), secs(37));
        assert_eq!(
            parse_retry_after("Sun, 06 Nov 1994 08:00:00 GMT", now),
            Some(Duration::ZERO)
        );
        assert_eq!(
            parse_retry_after("Tue, 06 Dec 1994 08:49:37 GMT", now),
            Some(RETRY_AFTER_CAP)
        );
        for bad in ["", "-5", "1.5", "soon", "Sun, 06 Nov"] {
            assert_eq!(parse_retry_after(bad, now), None, "{bad:?}");
        }
    }

    #[test]
    fn errors_are_truncated_on_a_char_boundary() {
        let long = "é".repeat(300);
        let t = truncate(long);
        assert!(t.len() <= MAX_ERROR_LEN + '…'.len_utf8());
        assert!(t.ends_with('…'));
        assert_eq!(truncate("short".into()), "short");
    }

    #[test]
    fn delivery_debug_hides_url_body_and_secrets() {
        let d = Delivery {
            url: "https://example.com/hook?token=SECRETTOKEN".into(),
            msg_id: "msg_1".into(),
            body: br#"{"pii":"PERSONAL"}"#.to_vec(),
            secrets: vec![WebhookSecret::generate()],
            traceparent: None,
        };
        let shown = format!("{d:?}");
        assert!(
            !shown.contains("SECRETTOKEN") && !shown.contains("PERSONAL"),
            "{shown}"
        );
        assert!(
            !shown.contains("whsec_") || shown.contains("redacted"),
            "{shown}"
        );
    }
}
