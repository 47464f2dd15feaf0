//! What the REST and gRPC transports share on the wire without depending on each other: the
//! bearer token syntax, the retry hint, the paths the middleware tells apart, and the problem
//! object of an error (the REST body, a batch item's `problem`, a line of an import's results).

use http::StatusCode;
use issuer_domain::{Error, ErrorCode};
use serde_json::json;

/// Seconds a client should wait before retrying after `Unavailable`.
pub const RETRY_AFTER_SECS: u64 = 5;

/// Where the OpenAPI document is served (public, and no management call).
pub const OPENAPI_PATH: &str = "/issuer/api/v1/openapi.json";

/// The caller whose bearer token the budget middleware already verified, in the request's
/// extensions: the transports take it from there instead of verifying the token twice.
#[derive(Debug, Clone)]
pub struct Verified(pub issuer_domain::service::Principal);

/// The token of an `Authorization: Bearer <token>` value (scheme case-insensitive).
pub fn bearer_token(header: &str) -> Option<&str> {
    let (scheme, token) = header.split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

/// The HTTP status of an error code.
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_tokens_are_found_case_insensitively_and_never_empty() {
        assert_eq!(bearer_token("Bearer abc"), Some("abc"));
        assert_eq!(bearer_token("bearer  abc "), Some("abc"));
        assert_eq!(bearer_token("Basic abc"), None);
        assert_eq!(bearer_token("Bearer "), None);
        assert_eq!(bearer_token("Bearer"), None);
    }
}
