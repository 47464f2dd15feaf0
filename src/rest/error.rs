//! The one mapping from domain errors to HTTP: RFC 9457 problem+json with a stable `code` and
//! field violations, `WWW-Authenticate` for token problems (RFC 6750), `Retry-After` when a
//! dependency is down.

use axum::{
    http::{HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
};
use issuer_domain::{Error, ErrorCode};
use serde_json::json;

pub struct ApiError(pub Error);

impl From<Error> for ApiError {
    fn from(e: Error) -> Self {
        Self(e)
    }
}

pub fn status_of(code: ErrorCode) -> StatusCode {
    match code {
        ErrorCode::InvalidRequest => StatusCode::BAD_REQUEST,
        ErrorCode::InvalidToken => StatusCode::UNAUTHORIZED,
        ErrorCode::InsufficientScope => StatusCode::FORBIDDEN,
        ErrorCode::NotFound => StatusCode::NOT_FOUND,
        ErrorCode::IdempotencyKeyReused => StatusCode::UNPROCESSABLE_ENTITY,
        ErrorCode::AlreadyExists => StatusCode::CONFLICT,
        ErrorCode::InvalidState => StatusCode::CONFLICT,
        ErrorCode::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
        ErrorCode::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
        ErrorCode::RateLimited => StatusCode::TOO_MANY_REQUESTS,
        ErrorCode::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        ErrorCode::Internal => StatusCode::INTERNAL_SERVER_ERROR,
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

/// The RFC 9457 object of an error, as its response body (and as a batch item's `problem`).
pub fn problem(e: &Error) -> serde_json::Value {
    let status = status_of(e.code);
    let mut body = json!({
        "type": format!("urn:issuer:problem:{}", e.code),
        "title": status.canonical_reason().unwrap_or("Error"),
        "status": status.as_u16(),
        "detail": e.message,
        "code": e.code.as_str(),
    });
    if !e.violations.is_empty() {
        body["errors"] = serde_json::to_value(&e.violations).unwrap_or_default();
    }
    body
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
