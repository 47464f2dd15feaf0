//! Wallet-facing OID4VCI 1.0 endpoints: metadata (both the RFC 8615 well-known form and the
//! older suffix form), nonce, credential and notification. Errors use the OID4VCI error codes:
//! 400 `{"error", "error_description"}`, or 401 with `WWW-Authenticate` for a bad token.

use axum::{
    Json,
    body::Bytes,
    extract::{State, rejection::BytesRejection},
    http::{HeaderMap, HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
};
use issuer_domain::{ErrorCode, OAuthCode};
use issuer_oid4vci::{
    ConfigurationView, WalletError, authorization_server_metadata,
    credential_issuer_metadata_with_display, jwt_vc_issuer_metadata,
};
use serde_json::{Value, json};

use super::{AppState, apidoc};
use crate::wire::bearer_token;

/// Metadata changes only with a deploy; let wallets cache it briefly.
const METADATA_CACHE: &str = "public, max-age=300";

#[utoipa::path(
    get,
    path = "/.well-known/openid-credential-issuer/issuer",
    operation_id = "credential_issuer_metadata",
    tag = "oid4vci",
    responses((status = 200, description = "Credential issuer metadata (OID4VCI 1.0 §12.2)", body = Object))
)]
pub async fn credential_issuer(State(app): State<AppState>) -> impl IntoResponse {
    let issuer = app.issuances.credential_issuer();
    let configs: Vec<ConfigurationView> = app
        .issuances
        .catalog()
        .iter()
        .map(|c| ConfigurationView {
            id: c.id.clone(),
            format: c.format.clone(),
            vct: c.vct.clone(),
            display: c.display.clone(),
            schema: c.schema.clone(),
        })
        .collect();
    let display = json!([{"name": "Issuer", "locale": "en"}]);
    let body = credential_issuer_metadata_with_display(
        &issuer,
        Some(&display),
        app.settings.batch_credential_size,
        &configs,
    );
    ([(header::CACHE_CONTROL, METADATA_CACHE)], Json(body))
}

#[utoipa::path(
    get,
    path = "/.well-known/oauth-authorization-server/issuer",
    operation_id = "authorization_server_metadata",
    tag = "oid4vci",
    responses((status = 200, description = "Authorization server metadata (RFC 8414)", body = Object))
)]
pub async fn authorization_server(State(app): State<AppState>) -> impl IntoResponse {
    let issuer = app.issuances.credential_issuer();
    let body = authorization_server_metadata(
        &issuer,
        &format!("{issuer}/oauth/token"),
        &format!("{issuer}/oauth/jwks"),
    );
    ([(header::CACHE_CONTROL, METADATA_CACHE)], Json(body))
}

#[utoipa::path(
    get,
    path = "/.well-known/jwt-vc-issuer/issuer",
    operation_id = "jwt_vc_issuer_metadata",
    tag = "oid4vci",
    responses((status = 200, description = "The keys that verify issued credentials (SD-JWT VC issuer metadata)", body = Object))
)]
pub async fn jwt_vc_issuer(State(app): State<AppState>) -> impl IntoResponse {
    let body = jwt_vc_issuer_metadata(
        &app.issuances.credential_issuer(),
        app.credential_jwks.clone(),
    );
    ([(header::CACHE_CONTROL, METADATA_CACHE)], Json(body))
}

/// `POST /issuer/oid4vci/v1/nonce`.
#[utoipa::path(
    post,
    path = "/issuer/oid4vci/v1/nonce",
    operation_id = "nonce",
    tag = "oid4vci",
    responses(
        (status = 200, description = "A fresh `c_nonce` for key proofs (`Cache-Control: no-store`)", body = apidoc::NonceResponse),
        (status = 429, description = "`rate_limited`: the client address's budget is spent (`Retry-After`)", body = apidoc::OAuthError),
    )
)]
pub async fn nonce(State(app): State<AppState>) -> impl IntoResponse {
    (
        [(header::CACHE_CONTROL, "no-store")],
        Json(json!({"c_nonce": app.wallet.nonce()})),
    )
}

/// `POST /issuer/oid4vci/v1/credential`.
#[utoipa::path(
    post,
    path = "/issuer/oid4vci/v1/credential",
    operation_id = "credential",
    tag = "oid4vci",
    request_body(content = Object, content_type = "application/json", description = "Credential request (OID4VCI 1.0 §8.2)"),
    responses(
        (status = 200, description = "The SD-JWT VC (OID4VCI 1.0 §8.3)", body = Object),
        (status = 400, description = "`invalid_credential_request`, `invalid_proof`, `invalid_nonce`, `unknown_credential_configuration`", body = apidoc::OAuthError),
        (status = 401, description = "`invalid_token` (`WWW-Authenticate`)", body = apidoc::OAuthError),
        (status = 413, description = "The body is too large (`ISSUER_MAX_BODY_BYTES`), in this endpoint's error format", body = apidoc::OAuthError),
        (status = 429, description = "`rate_limited`: the client address's budget is spent (`Retry-After`)", body = apidoc::OAuthError),
        (status = 500, description = "`server_error`", body = apidoc::OAuthError),
        (status = 503, description = "`temporarily_unavailable` (`Retry-After`)", body = apidoc::OAuthError),
    ),
    security(("wallet_token" = []))
)]
pub async fn credential(
    State(app): State<AppState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let body = match body {
        Ok(body) => body,
        Err(rejection) => {
            return body_refused(&app, &rejection, OAuthCode::InvalidCredentialRequest);
        }
    };
    let result = async {
        let token = wallet_token(&headers)?;
        let body: Value = serde_json::from_slice(&body).map_err(|_| WalletError::Refused {
            code: OAuthCode::InvalidCredentialRequest,
            description: "the body must be JSON".into(),
        })?;
        app.wallet.credential(token, &body).await
    }
    .await;
    match result {
        Ok(issued) => ([(header::CACHE_CONTROL, "no-store")], Json(issued.body())).into_response(),
        Err(e) => wallet_error(e),
    }
}

/// `POST /issuer/oid4vci/v1/notification`.
#[utoipa::path(
    post,
    path = "/issuer/oid4vci/v1/notification",
    operation_id = "notification",
    tag = "oid4vci",
    request_body(content = Object, content_type = "application/json", description = "Notification (OID4VCI 1.0 §11.1)"),
    responses(
        (status = 204, description = "Recorded"),
        (status = 400, description = "`invalid_notification_id`, `invalid_notification_request`", body = apidoc::OAuthError),
        (status = 401, description = "`invalid_token` (`WWW-Authenticate`)", body = apidoc::OAuthError),
        (status = 413, description = "The body is too large (`ISSUER_MAX_BODY_BYTES`), in this endpoint's error format", body = apidoc::OAuthError),
        (status = 429, description = "`rate_limited`: the client address's budget is spent (`Retry-After`)", body = apidoc::OAuthError),
        (status = 500, description = "`server_error`", body = apidoc::OAuthError),
        (status = 503, description = "`temporarily_unavailable` (`Retry-After`)", body = apidoc::OAuthError),
    ),
    security(("wallet_token" = []))
)]
pub async fn notification(
    State(app): State<AppState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let body = match body {
        Ok(body) => body,
        Err(rejection) => {
            return body_refused(&app, &rejection, OAuthCode::InvalidNotificationRequest);
        }
    };
    let result = async {
        let token = wallet_token(&headers)?;
        let body: Value = serde_json::from_slice(&body).map_err(|_| WalletError::Refused {
            code: OAuthCode::InvalidNotificationRequest,
            description: "the body must be JSON".into(),
        })?;
        app.wallet.notify(token, &body).await
    }
    .await;
    match result {
        Ok(()) => StatusCode::NO_CONTENT.into_response(),
        Err(e) => wallet_error(e),
    }
}

/// An unreadable or oversized body, in the OAuth / OID4VCI error format with the endpoint's own
/// `code` (413 when too large, else 400).
pub fn body_refused(app: &AppState, rejection: &BytesRejection, code: OAuthCode) -> Response {
    let (status, description) = if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
        (
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "the request body exceeds {} bytes",
                app.settings.max_body_bytes
            ),
        )
    } else {
        (
            StatusCode::BAD_REQUEST,
            "unreadable request body".to_owned(),
        )
    };
    (
        status,
        [(header::CACHE_CONTROL, "no-store")],
        Json(json!({"error": code.as_str(), "error_description": description})),
    )
        .into_response()
}

fn wallet_token(headers: &HeaderMap) -> Result<&str, WalletError> {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(bearer_token)
        .ok_or_else(|| WalletError::Refused {
            code: OAuthCode::InvalidToken,
            description: "missing bearer token".into(),
        })
}

/// The one mapping of wallet-flow errors to HTTP for the OID4VCI endpoints.
pub fn wallet_error(e: WalletError) -> Response {
    match e {
        WalletError::Refused { code, description } => {
            let status =
                StatusCode::from_u16(code.http_status()).unwrap_or(StatusCode::BAD_REQUEST);
            let mut res = (
                status,
                [(header::CACHE_CONTROL, "no-store")],
                Json(json!({"error": code.as_str(), "error_description": description})),
            )
                .into_response();
            if status == StatusCode::UNAUTHORIZED {
                res.headers_mut().insert(
                    header::WWW_AUTHENTICATE,
                    super::error::bearer_challenge("invalid_token", &description, None),
                );
            }
            res
        }
        WalletError::Internal(e) => {
            tracing::error!(error = %e.chain(), "wallet request failed");
            let unavailable = e.code == ErrorCode::Unavailable;
            let code = if unavailable {
                OAuthCode::TemporarilyUnavailable
            } else {
                OAuthCode::ServerError
            };
            let status = StatusCode::from_u16(code.http_status())
                .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            let mut res = (status, Json(json!({"error": code.as_str()}))).into_response();
            if unavailable {
                res.headers_mut().insert(
                    header::RETRY_AFTER,
                    HeaderValue::from(crate::wire::RETRY_AFTER_SECS),
                );
            }
            res
        }
    }
}

/// `GET /issuer/status-lists/{list_id}`: a Status List Token (draft-ietf-oauth-status-list),
/// for verifiers checking the `status.status_list` of our credentials. Unauthenticated; lists
/// are shared by every tenant, so a list says nothing about whose credentials it holds.
#[utoipa::path(
    get,
    path = "/issuer/status-lists/{list_id}",
    operation_id = "status_list",
    tag = "oid4vci",
    params(
        ("list_id" = String, Path, description = "The list's id, as credentials name it in `status.status_list.uri`"),
        ("If-None-Match" = Option<String>, Header, description = "An entity tag of a token the client holds"),
    ),
    responses(
        (status = 200, description = "The list as a signed JWT (`typ: statuslist+jwt`, `status_list: {bits: 2, lst}`), with `ETag` and `Cache-Control: max-age` = its `ttl`", body = String, content_type = "application/statuslist+jwt"),
        (status = 304, description = "The token the client holds (by `If-None-Match`) still says the same"),
        (status = 404, description = "`not_found`: no such list", body = apidoc::Problem, content_type = "application/problem+json"),
    )
)]
pub async fn status_list(
    State(app): State<AppState>,
    axum::extract::Path(list_id): axum::extract::Path<String>,
    headers: HeaderMap,
) -> Result<Response, super::ApiError> {
    let not_found = || issuer_domain::Error::not_found("status list");
    let list_id: uuid::Uuid = list_id.parse().map_err(|_| not_found())?;
    let token = app
        .status_lists
        .token(list_id)
        .await?
        .ok_or_else(not_found)?;
    let cache_control = format!("public, max-age={}", app.status_lists.ttl().as_secs());
    let matches = headers
        .get_all(header::IF_NONE_MATCH)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .any(|tag| tag == "*" || weak_eq(tag, &token.etag));
    let mut response = if matches {
        StatusCode::NOT_MODIFIED.into_response()
    } else {
        (
            [(header::CONTENT_TYPE, "application/statuslist+jwt")],
            token.jwt.clone(),
        )
            .into_response()
    };
    let h = response.headers_mut();
    if let Ok(v) = HeaderValue::from_str(&token.etag) {
        h.insert(header::ETAG, v);
    }
    if let Ok(v) = HeaderValue::from_str(&cache_control) {
        h.insert(header::CACHE_CONTROL, v);
    }
    Ok(response)
}

/// The weak comparison of RFC 9110 §8.8.3.2: equal opaque tags, `W/` or not.
fn weak_eq(a: &str, b: &str) -> bool {
    a.trim_start_matches("W/") == b.trim_start_matches("W/")
}
