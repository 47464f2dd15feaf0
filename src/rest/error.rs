//! The one mapping from domain errors to HTTP: RFC 9457 problem+json with a stable `code` and
//! field violations, `WWW-Authenticate` for token problems (RFC 6750), `Retry-After` when a
//! dependency is down.

use axum::{
    http::{HeaderValue, header},
    response::{IntoResponse, Response},
};
use issuer_domain::{Error, ErrorCode};

pub use crate::wire::{problem, status_of};

pub struct ApiError(pub Error);

impl From<Error> for ApiError {
    fn from(e: Error) -> Self {
        Self(e)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let e = self.0;
        let status = status_of(e.code);
        match e.code {
            ErrorCode::Internal | ErrorCode::Unavailable => {
                tracing::error!(code = %e.code, error = %e.chain(), "request failed")
            }
            _ => tracing::debug!(code = %e.code, error = %e.message, "request refused"),
        }
        let body = problem(&e);
        let mut res = (status, body.to_string()).into_response();
        let h = res.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        );
        match e.code {
            ErrorCode::InvalidToken => {
                h.insert(
                    header::WWW_AUTHENTICATE,
                    bearer_challenge("invalid_token", &e.message, None),
                );
            }
            ErrorCode::InsufficientScope => {
                h.insert(
                    header::WWW_AUTHENTICATE,
                    bearer_challenge("insufficient_scope", &e.message, e.meta("scope")),
                );
            }
            ErrorCode::Unavailable => {
                h.insert(header::RETRY_AFTER, HeaderValue::from(crate::wire::RETRY_AFTER_SECS));
            }
            ErrorCode::InvalidRequest
            | ErrorCode::NotFound
            | ErrorCode::IdempotencyKeyReused
            | ErrorCode::AlreadyExists
            | ErrorCode::InvalidState
            | ErrorCode::PayloadTooLarge
            | ErrorCode::UnsupportedMediaType
            // Its Retry-After and RateLimit headers come from the limiter's decision.
            | ErrorCode::RateLimited
            | ErrorCode::Internal => {}
        }
        res
    }
}

pub(super) fn bearer_challenge(error: &str, description: &str, scope: Option<&str>) -> HeaderValue {
    let description: String = description
        .chars()
        .filter(|c| *c != '"' && *c != '\\' && !c.is_control())
        .collect();
    let mut v =
        format!(r#"Bearer realm="issuer", error="{error}", error_description="{description}""#);
    if let Some(scope) = scope {
        v.push_str(&format!(r#", scope="{scope}""#));
    }
    HeaderValue::from_str(&v)
        .unwrap_or_else(|_| HeaderValue::from_static("Bearer realm=\"issuer\""))
}

/// A refused budget as a 429 problem+json `rate_limited`, with the RateLimit fields.
pub fn rate_limited(verdict: &crate::limits::Verdict) -> Response {
    let mut res = ApiError(Error::new(ErrorCode::RateLimited, verdict.message())).into_response();
    verdict.write_headers(res.headers_mut());
    res
}
