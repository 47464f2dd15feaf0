//! What the REST and gRPC transports share on the wire without depending on each other: the
//! bearer token syntax, the retry hint, and the paths the middleware tells apart.

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
