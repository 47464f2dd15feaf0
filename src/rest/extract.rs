//! Extractors that turn transport problems into documented errors: the bearer token into a
//! `Principal`, the body into JSON (malformed JSON, wrong media type and oversized bodies are
//! problem+json, not axum's plain-text rejections).

use axum::{
    body::Bytes,
    extract::{FromRequest, FromRequestParts, Request},
    http::{StatusCode, header, request::Parts},
};
use issuer_domain::{Error, ErrorCode, service::Principal};
use serde_json::Value;

use super::{ApiError, AppState};

/// The verified caller.
pub struct Auth(pub Principal);

impl FromRequestParts<AppState> for Auth {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        app: &AppState,
    ) -> Result<Self, Self::Rejection> {
        if let Some(crate::wire::Verified(who)) = parts.extensions.get() {
            return Ok(Auth(who.clone()));
        }
        let header = parts
            .headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .ok_or_else(|| Error::new(ErrorCode::InvalidToken, "missing bearer token"))?;
        let token = crate::wire::bearer_token(header)
            .ok_or_else(|| Error::new(ErrorCode::InvalidToken, "missing bearer token"))?;
        app.tokens
            .verify(token)
            .map(Auth)
            .map_err(|e| ApiError(Error::new(ErrorCode::InvalidToken, e.0)))
    }
}

/// A JSON request body.
pub struct JsonBody(pub Value);

impl FromRequest<AppState> for JsonBody {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &AppState) -> Result<Self, Self::Rejection> {
        // The batch create has a limit of its own.
        let limit = if req.uri().path() == "/issuer/api/v1/issuances/batch" {
            state.settings.batch_max_bytes
        } else {
            state.settings.max_body_bytes
        };
        let is_json = req
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(';').next())
            .map(|m| {
                let m = m.trim().to_ascii_lowercase();
                m == "application/json" || (m.starts_with("application/") && m.ends_with("+json"))
            })
            .unwrap_or(false);
        if !is_json {
            return Err(not_json().into());
        }
        let bytes = Bytes::from_request(req, state).await.map_err(|rejection| {
            if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
                Error::new(
                    ErrorCode::PayloadTooLarge,
                    format!("the request body exceeds {limit} bytes"),
                )
            } else {
                Error::invalid_field("", format!("unreadable request body: {rejection}"))
            }
        })?;
        serde_json::from_slice(&bytes)
            .map(JsonBody)
            .map_err(|e| ApiError(Error::invalid_field("", format!("malformed JSON: {e}"))))
    }
}

/// An optional JSON request body: none at all (no `Content-Type`, nothing sent), or one as
/// [`JsonBody`] takes it.
pub struct OptionalJsonBody(pub Option<Value>);

impl FromRequest<AppState> for OptionalJsonBody {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &AppState) -> Result<Self, Self::Rejection> {
        if req.headers().contains_key(header::CONTENT_TYPE) {
            return JsonBody::from_request(req, state)
                .await
                .map(|JsonBody(v)| Self(Some(v)));
        }
        let bytes = Bytes::from_request(req, state)
            .await
            .map_err(|rejection| Error::invalid_field("", format!("{rejection}")))?;
        if bytes.is_empty() {
            Ok(Self(None))
        } else {
            Err(not_json().into())
        }
    }
}

/// A body that is not sent as JSON.
fn not_json() -> Error {
    Error::new(
        ErrorCode::UnsupportedMediaType,
        "send the body as Content-Type: application/json",
    )
}
