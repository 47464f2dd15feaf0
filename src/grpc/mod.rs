//! The gRPC API (`issuer.v1.IssuanceService`): proto types stay here and map to the domain;
//! errors leave through `status()` only, with `google.rpc` ErrorInfo and BadRequest details.

use std::collections::HashMap;

use issuer_domain::{Error, ErrorCode, service::Principal};
use tonic::{Code, Request, Status};
use tonic_types::{ErrorDetails, StatusExt};

use crate::app::App;

mod enums;
mod issuances;
pub mod structs;

pub use issuances::IssuanceGrpc;

/// Generated code of `proto/issuer/v1`.
pub mod pb {
    // The deprecated string fields are still filled in for older clients.
    #![allow(clippy::all, missing_docs, deprecated)]
    tonic::include_proto!("issuer.v1");

    /// Encoded descriptors, for reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("issuer_descriptor");
}

/// `ErrorInfo.domain` of every error this service returns.
pub const ERROR_DOMAIN: &str = "issuer";

pub fn code_of(code: ErrorCode) -> Code {
    match code {
        ErrorCode::InvalidRequest => Code::InvalidArgument,
        ErrorCode::InvalidToken => Code::Unauthenticated,
        ErrorCode::InsufficientScope => Code::PermissionDenied,
        ErrorCode::NotFound => Code::NotFound,
        ErrorCode::IdempotencyKeyReused => Code::FailedPrecondition,
        ErrorCode::AlreadyExists => Code::AlreadyExists,
        ErrorCode::InvalidState => Code::FailedPrecondition,
        ErrorCode::PayloadTooLarge => Code::ResourceExhausted,
        ErrorCode::UnsupportedMediaType => Code::InvalidArgument,
        ErrorCode::RateLimited => Code::ResourceExhausted,
        ErrorCode::Unavailable => Code::Unavailable,
        ErrorCode::Internal => Code::Internal,
    }
}

/// The one mapping from domain errors to gRPC statuses.
pub fn status(e: Error) -> Status {
    match e.code {
        ErrorCode::Internal | ErrorCode::Unavailable => {
            tracing::error!(code = %e.code, error = %e.chain(), "rpc failed")
        }
        _ => tracing::debug!(code = %e.code, error = %e.message, "rpc refused"),
    }
    let mut details = ErrorDetails::new();
    details.set_error_info(
        e.code.as_str().to_ascii_uppercase(),
        ERROR_DOMAIN,
        e.metadata
            .iter()
            .map(|(k, v)| ((*k).to_owned(), v.clone()))
            .collect::<HashMap<_, _>>(),
    );
    for v in &e.violations {
        details.add_bad_request_violation(v.field.clone(), v.message.clone());
    }
    if e.code == ErrorCode::Unavailable {
        details.set_retry_info(Some(std::time::Duration::from_secs(
            crate::wire::RETRY_AFTER_SECS,
        )));
    }
    Status::with_error_details(code_of(e.code), e.message, details)
}

/// The caller, from `authorization: Bearer <token>` metadata.
pub fn authenticate<T>(app: &App, req: &Request<T>) -> Result<Principal, Status> {
    if let Some(crate::wire::Verified(who)) = req.extensions().get() {
        return Ok(who.clone());
    }
    let header = req
        .metadata()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .ok_or_else(|| status(Error::new(ErrorCode::InvalidToken, "missing bearer token")))?;
    let token = crate::wire::bearer_token(header)
        .ok_or_else(|| status(Error::new(ErrorCode::InvalidToken, "missing bearer token")))?;
    app.tokens
        .verify(token)
        .map_err(|e| status(Error::new(ErrorCode::InvalidToken, e.0)))
}

/// A refused budget: `RESOURCE_EXHAUSTED` with `RetryInfo` and an `ErrorInfo` naming the budget.
pub fn rate_limited(verdict: &crate::limits::Verdict) -> axum::response::Response {
    let mut details = ErrorDetails::new();
    details
        .set_retry_info(Some(verdict.decision.retry_after))
        .set_error_info(
            "RATE_LIMITED",
            ERROR_DOMAIN,
            HashMap::from([
                ("policy".to_owned(), verdict.policy.to_owned()),
                ("per_sec".to_owned(), verdict.quota.per_sec.to_string()),
                ("burst".to_owned(), verdict.quota.burst.to_string()),
            ]),
        );
    Status::with_error_details(Code::ResourceExhausted, verdict.message(), details).into_http()
}
