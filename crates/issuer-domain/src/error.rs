//! One error type for the whole domain. `ErrorCode` is the stable, documented vocabulary:
//! the REST adapter maps it once to an HTTP status and the gRPC adapter once to a `tonic::Code`,
//! both with exhaustive matches.

use std::fmt;

/// A stable error code, rendered as the `code` member of problem+json bodies and as the
/// `ErrorInfo.reason` of gRPC errors.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    /// The request is malformed or fails validation; see the field violations.
    InvalidRequest,
    /// No valid access token: missing, expired, badly signed, wrong issuer or audience.
    InvalidToken,
    /// The token is valid but lacks the scope the operation needs.
    InsufficientScope,
    /// The resource does not exist for this tenant.
    NotFound,
    /// The idempotency key was used before with a different request.
    IdempotencyKeyReused,
    /// A resource with this identity already exists.
    AlreadyExists,
    /// The resource is in a state that does not allow the operation (e.g. cancelling an
    /// accepted issuance).
    InvalidState,
    /// The request body exceeds the size limit.
    PayloadTooLarge,
    /// The request body is not in a media type the endpoint accepts.
    UnsupportedMediaType,
    /// The caller spent its request budget; retry after the time given.
    RateLimited,
    /// A dependency (database) is unreachable; retry later.
    Unavailable,
    /// A bug or an unexpected failure; details are in the server log only.
    Internal,
}

impl ErrorCode {
    /// Every code, as documented (the REST API's OpenAPI document lists them from here).
    pub const ALL: [ErrorCode; 12] = [
        ErrorCode::InvalidRequest,
        ErrorCode::InvalidToken,
        ErrorCode::InsufficientScope,
        ErrorCode::NotFound,
        ErrorCode::IdempotencyKeyReused,
        ErrorCode::AlreadyExists,
        ErrorCode::InvalidState,
        ErrorCode::PayloadTooLarge,
        ErrorCode::UnsupportedMediaType,
        ErrorCode::RateLimited,
        ErrorCode::Unavailable,
        ErrorCode::Internal,
    ];

    pub const fn as_str(self) -> &'static str {
        match self {
            ErrorCode::InvalidRequest => "invalid_request",
            ErrorCode::InvalidToken => "invalid_token",
            ErrorCode::InsufficientScope => "insufficient_scope",
            ErrorCode::NotFound => "not_found",
            ErrorCode::IdempotencyKeyReused => "idempotency_key_reused",
            ErrorCode::AlreadyExists => "already_exists",
            ErrorCode::InvalidState => "invalid_state",
            ErrorCode::PayloadTooLarge => "payload_too_large",
            ErrorCode::UnsupportedMediaType => "unsupported_media_type",
            ErrorCode::RateLimited => "rate_limited",
            ErrorCode::Unavailable => "unavailable",
            ErrorCode::Internal => "internal",
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The error codes of the OAuth and OID4VCI endpoints, each endpoint in its own vocabulary:
/// RFC 6749 §5.2 at the token endpoint, RFC 6750 §3.1 for wallet tokens, OID4VCI 1.0 §8.3.1.2
/// at the credential endpoint and §11.3 at the notification endpoint. These answer with
/// `{"error", "error_description"}`, not problem+json; each code knows its HTTP status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum OAuthCode {
    InvalidRequest,
    InvalidClient,
    InvalidGrant,
    InvalidScope,
    UnsupportedGrantType,
    InvalidToken,
    InvalidCredentialRequest,
    UnknownCredentialConfiguration,
    UnknownCredentialIdentifier,
    /// Draft-13/15 wallets: the `format` or `vct` asked for is not the offer's.
    UnsupportedCredentialFormat,
    InvalidProof,
    InvalidNonce,
    InvalidNotificationId,
    InvalidNotificationRequest,
    RateLimited,
    ServerError,
    TemporarilyUnavailable,
}

impl OAuthCode {
    pub const ALL: [OAuthCode; 17] = [
        OAuthCode::InvalidRequest,
        OAuthCode::InvalidClient,
        OAuthCode::InvalidGrant,
        OAuthCode::InvalidScope,
        OAuthCode::UnsupportedGrantType,
        OAuthCode::InvalidToken,
        OAuthCode::InvalidCredentialRequest,
        OAuthCode::UnknownCredentialConfiguration,
        OAuthCode::UnknownCredentialIdentifier,
        OAuthCode::UnsupportedCredentialFormat,
        OAuthCode::InvalidProof,
        OAuthCode::InvalidNonce,
        OAuthCode::InvalidNotificationId,
        OAuthCode::InvalidNotificationRequest,
        OAuthCode::RateLimited,
        OAuthCode::ServerError,
        OAuthCode::TemporarilyUnavailable,
    ];

    pub const fn as_str(self) -> &'static str {
        match self {
            OAuthCode::InvalidRequest => "invalid_request",
            OAuthCode::InvalidClient => "invalid_client",
            OAuthCode::InvalidGrant => "invalid_grant",
            OAuthCode::InvalidScope => "invalid_scope",
            OAuthCode::UnsupportedGrantType => "unsupported_grant_type",
            OAuthCode::InvalidToken => "invalid_token",
            OAuthCode::InvalidCredentialRequest => "invalid_credential_request",
            OAuthCode::UnknownCredentialConfiguration => "unknown_credential_configuration",
            OAuthCode::UnknownCredentialIdentifier => "unknown_credential_identifier",
            OAuthCode::UnsupportedCredentialFormat => "unsupported_credential_format",
            OAuthCode::InvalidProof => "invalid_proof",
            OAuthCode::InvalidNonce => "invalid_nonce",
            OAuthCode::InvalidNotificationId => "invalid_notification_id",
            OAuthCode::InvalidNotificationRequest => "invalid_notification_request",
            OAuthCode::RateLimited => "rate_limited",
            OAuthCode::ServerError => "server_error",
            OAuthCode::TemporarilyUnavailable => "temporarily_unavailable",
        }
    }

    /// The HTTP status of an answer with this code.
    pub const fn http_status(self) -> u16 {
        match self {
            OAuthCode::InvalidClient | OAuthCode::InvalidToken => 401,
            OAuthCode::RateLimited => 429,
            OAuthCode::ServerError => 500,
            OAuthCode::TemporarilyUnavailable => 503,
            OAuthCode::InvalidRequest
            | OAuthCode::InvalidGrant
            | OAuthCode::InvalidScope
            | OAuthCode::UnsupportedGrantType
            | OAuthCode::InvalidCredentialRequest
            | OAuthCode::UnknownCredentialConfiguration
            | OAuthCode::UnknownCredentialIdentifier
            | OAuthCode::UnsupportedCredentialFormat
            | OAuthCode::InvalidProof
            | OAuthCode::InvalidNonce
            | OAuthCode::InvalidNotificationId
            | OAuthCode::InvalidNotificationRequest => 400,
        }
    }
}

impl fmt::Display for OAuthCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One invalid field: a dotted path into the request (`payload.mandator.organizationIdentifier`,
/// `payload.power[0].action`) and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct FieldViolation {
    pub field: String,
    pub message: String,
}

impl FieldViolation {
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            message: message.into(),
        }
    }
}

/// A domain error: a code, a message safe to show to the caller, field violations for
/// `InvalidRequest`, and for internal errors a cause that is logged but never returned.
#[derive(Debug, thiserror::Error)]
#[error("{code}: {message}")]
pub struct Error {
    pub code: ErrorCode,
    pub message: String,
    pub violations: Vec<FieldViolation>,
    /// Facts a client can act on, by name (`scope`, `status`, `limit`): gRPC sends them as
    /// `ErrorInfo.metadata`, REST uses `scope` in `WWW-Authenticate`.
    pub metadata: Vec<(&'static str, String)>,
    #[source]
    pub source: Option<Box<dyn std::error::Error + Send + Sync + 'static>>,
}

impl Error {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
            violations: Vec::new(),
            metadata: Vec::new(),
            source: None,
        }
    }

    /// The error with one more metadata entry.
    pub fn with(mut self, key: &'static str, value: impl Into<String>) -> Self {
        self.metadata.push((key, value.into()));
        self
    }

    /// The metadata entry `key`, if any.
    pub fn meta(&self, key: &str) -> Option<&str> {
        self.metadata
            .iter()
            .find(|(k, _)| *k == key)
            .map(|(_, v)| v.as_str())
    }

    pub fn invalid(violations: Vec<FieldViolation>) -> Self {
        let message = match violations.as_slice() {
            [one] => format!("{}: {}", one.field, one.message),
            _ => format!("{} fields are invalid", violations.len()),
        };
        let field = violations.first().map(|v| v.field.clone());
        let mut e = Self {
            violations,
            ..Self::new(ErrorCode::InvalidRequest, message)
        };
        if let Some(field) = field.filter(|f| !f.is_empty()) {
            e = e.with("field", field);
        }
        e
    }

    pub fn invalid_field(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self::invalid(vec![FieldViolation::new(field, message)])
    }

    pub fn not_found(what: &str) -> Self {
        Self::new(ErrorCode::NotFound, format!("{what} not found"))
    }

    pub fn insufficient_scope(scope: &str) -> Self {
        Self::new(
            ErrorCode::InsufficientScope,
            format!("the access token lacks the scope `{scope}`"),
        )
        .with("scope", scope)
    }

    /// An unexpected failure; `cause` goes to the log, the caller sees a generic message.
    pub fn internal(cause: impl Into<Box<dyn std::error::Error + Send + Sync + 'static>>) -> Self {
        Self {
            source: Some(cause.into()),
            ..Self::new(ErrorCode::Internal, "internal error")
        }
    }

    /// A dependency is down; the caller should retry.
    pub fn unavailable(
        cause: impl Into<Box<dyn std::error::Error + Send + Sync + 'static>>,
    ) -> Self {
        Self {
            source: Some(cause.into()),
            ..Self::new(
                ErrorCode::Unavailable,
                "service temporarily unavailable, retry later",
            )
        }
    }

    /// The same error for another caller (the items of a batch that share one write): code,
    /// message, violations and metadata; the cause stays with the original, which is logged.
    pub fn for_another(&self) -> Self {
        Self {
            code: self.code,
            message: self.message.clone(),
            violations: self.violations.clone(),
            metadata: self.metadata.clone(),
            source: None,
        }
    }

    /// The cause chain, for logs.
    pub fn chain(&self) -> String {
        let mut out = self.to_string();
        let mut cur: Option<&(dyn std::error::Error + 'static)> =
            self.source.as_deref().map(|e| e as _);
        while let Some(e) = cur {
            out.push_str(": ");
            out.push_str(&e.to_string());
            cur = e.source();
        }
        out
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod all_codes {
    use super::ErrorCode;

    /// `ALL` lists each code once; a new code without an entry there fails the exhaustive
    /// match below, which must then be extended together with `ALL`.
    #[test]
    fn all_lists_every_code_once() {
        let position = |c: ErrorCode| match c {
            ErrorCode::InvalidRequest => 0,
            ErrorCode::InvalidToken => 1,
            ErrorCode::InsufficientScope => 2,
            ErrorCode::NotFound => 3,
            ErrorCode::IdempotencyKeyReused => 4,
            ErrorCode::AlreadyExists => 5,
            ErrorCode::InvalidState => 6,
            ErrorCode::PayloadTooLarge => 7,
            ErrorCode::UnsupportedMediaType => 8,
            ErrorCode::RateLimited => 9,
            ErrorCode::Unavailable => 10,
            ErrorCode::Internal => 11,
        };
        for (i, c) in ErrorCode::ALL.into_iter().enumerate() {
            assert_eq!(position(c), i, "{c}");
        }
    }
}
