//! The OAuth 2.0 token endpoint (RFC 6749 §4.4 client credentials) and the JWKS of the access
//! token keys. Errors use RFC 6749 §5.2 bodies, never problem+json, and every response carries
//! `Cache-Control: no-store`.

use axum::{
    Json,
    body::Bytes,
    extract::State,
    http::{HeaderMap, HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
};
use base64::{Engine, engine::general_purpose::STANDARD};
use issuer_domain::{ErrorCode, OAuthCode, model::PRE_AUTHORIZED_CODE_GRANT};
use issuer_oid4vci::WalletError;
use serde_json::json;

use super::{AppState, apidoc};
use crate::grant::GrantError;

const CLIENT_CREDENTIALS: &str = "client_credentials";

/// An RFC 6749 §5.2 error.
struct OAuthError {
    code: OAuthCode,
    description: String,
}

impl OAuthError {
    fn new(code: OAuthCode, description: impl Into<String>) -> Self {
        Self {
            code,
            description: description.into(),
        }
    }

    fn status(&self) -> StatusCode {
        StatusCode::from_u16(self.code.http_status()).unwrap_or(StatusCode::BAD_REQUEST)
    }
}

impl From<issuer_domain::Error> for OAuthError {
    fn from(e: issuer_domain::Error) -> Self {
        tracing::error!(error = %e.chain(), "token endpoint failed");
        if e.code == ErrorCode::Unavailable {
            Self::new(
                OAuthCode::TemporarilyUnavailable,
                "the service is temporarily unavailable",
            )
        } else {
            Self::new(OAuthCode::ServerError, "internal error")
        }
    }
}

impl IntoResponse for OAuthError {
    fn into_response(self) -> Response {
        let status = self.status();
        let body = json!({"error": self.code.as_str(), "error_description": self.description});
        let mut res = (status, Json(body)).into_response();
        no_store(res.headers_mut());
        if status == StatusCode::UNAUTHORIZED {
            res.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static(r#"Basic realm="issuer""#),
            );
        }
        if status == StatusCode::SERVICE_UNAVAILABLE {
            res.headers_mut().insert(
                header::RETRY_AFTER,
                HeaderValue::from(crate::wire::RETRY_AFTER_SECS),
            );
        }
        res
    }
}

fn no_store(h: &mut HeaderMap) {
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(header::PRAGMA, HeaderValue::from_static("no-cache"));
}

/// `POST /issuer/oauth/token`.
#[utoipa::path(
    post,
    path = "/issuer/oauth/token",
    operation_id = "token",
    tag = "oauth",
    request_body(content = apidoc::TokenRequest, content_type = "application/x-www-form-urlencoded"),
    responses(
        (status = 200, description = "An access token (`Cache-Control: no-store`)", body = apidoc::TokenResponse),
        (status = 400, description = "`invalid_request`, `invalid_grant`, `invalid_scope`, `unsupported_grant_type`", body = apidoc::OAuthError),
        (status = 401, description = "`invalid_client` (`WWW-Authenticate: Basic`)", body = apidoc::OAuthError),
        (status = 413, description = "`invalid_request`: the body is too large", body = apidoc::OAuthError),
        (status = 429, description = "`rate_limited`: the client's or the address's budget is spent (`Retry-After`, `RateLimit-Policy`, `RateLimit`)", body = apidoc::OAuthError),
        (status = 500, description = "`server_error`", body = apidoc::OAuthError),
        (status = 503, description = "`temporarily_unavailable` (`Retry-After`)", body = apidoc::OAuthError),
    ),
    security((), ("client_basic" = []))
)]
pub async fn token(
    State(app): State<AppState>,
    headers: HeaderMap,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> Response {
    let body = match body {
        Ok(body) => body,
        Err(rejection) => {
            crate::metrics::token_grant("", "invalid_request");
            return super::oid4vci::body_refused(&app, &rejection, OAuthCode::InvalidRequest);
        }
    };
    // Set by `issue` once the form is read, for the metrics.
    let mut grant_type = String::new();
    match issue(&app, &headers, &body, &mut grant_type).await {
        Ok(res) => {
            let outcome = if res.status() == StatusCode::TOO_MANY_REQUESTS {
                "rate_limited"
            } else {
                "issued"
            };
            crate::metrics::token_grant(&grant_type, outcome);
            res
        }
        Err(e) => {
            crate::metrics::token_grant(&grant_type, e.code.as_str());
            e.into_response()
        }
    }
}

async fn issue(
    app: &AppState,
    headers: &HeaderMap,
    body: &[u8],
    grant: &mut String,
) -> Result<Response, OAuthError> {
    let params = form_params(headers, body)?;

    let grant_type = params
        .get("grant_type")
        .ok_or_else(|| OAuthError::new(OAuthCode::InvalidRequest, "grant_type is required"))?;
    grant.clone_from(grant_type);
    if grant_type == PRE_AUTHORIZED_CODE_GRANT {
        // Anonymous access: the wallet holds the code, not client credentials.
        let tx_code = params.get("tx_code").or_else(|| params.get("user_pin"));
        let token = app
            .wallet
            .token(
                params.get("pre-authorized_code").map(String::as_str),
                tx_code.map(String::as_str),
            )
            .await
            .map_err(|e| match e {
                WalletError::Refused { code, description } => OAuthError::new(code, description),
                WalletError::Internal(e) => e.into(),
            })?;
        let body = json!({
            "access_token": token.access_token,
            "token_type": "Bearer",
            "expires_in": token.expires_in,
        });
        let mut res = Json(body).into_response();
        no_store(res.headers_mut());
        return Ok(res);
    }
    if grant_type != CLIENT_CREDENTIALS {
        return Err(OAuthError::new(
            OAuthCode::UnsupportedGrantType,
            format!("grant type `{grant_type}` is not supported here"),
        ));
    }

    let (client_id, secret) = client_credentials(headers, &params)?;
    let issued = match app
        .client_credentials
        .grant(&client_id, &secret, params.get("scope").map(String::as_str))
        .await
    {
        Ok(issued) => issued,
        Err(GrantError::RateLimited(verdict)) => return Ok(rate_limited(&verdict)),
        Err(GrantError::Refused { code, description }) => {
            return Err(OAuthError::new(code, description));
        }
        Err(GrantError::Internal(e)) => return Err(e.into()),
    };
    let body = json!({
        "access_token": issued.access_token,
        "token_type": "Bearer",
        "expires_in": issued.expires_in,
        "scope": issued.scope,
    });
    let mut res = Json(body).into_response();
    no_store(res.headers_mut());
    Ok(res)
}

/// The client's id and secret from `client_secret_basic` or `client_secret_post`, never both.
/// The token request's parameters: an `application/x-www-form-urlencoded` body, each
/// parameter at most once (RFC 6749 §3.2).
fn form_params(
    headers: &HeaderMap,
    body: &[u8],
) -> Result<std::collections::HashMap<String, String>, OAuthError> {
    let form_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|m| {
            m.trim()
                .eq_ignore_ascii_case("application/x-www-form-urlencoded")
        });
    if !form_type {
        return Err(OAuthError::new(
            OAuthCode::InvalidRequest,
            "send the parameters as application/x-www-form-urlencoded",
        ));
    }
    let pairs: Vec<(String, String)> = serde_urlencoded::from_bytes(body)
        .map_err(|_| OAuthError::new(OAuthCode::InvalidRequest, "malformed form body"))?;
    let mut params = std::collections::HashMap::new();
    for (k, v) in pairs {
        if params.insert(k.clone(), v).is_some() {
            return Err(OAuthError::new(
                OAuthCode::InvalidRequest,
                format!("parameter `{k}` is repeated"),
            ));
        }
    }

    Ok(params)
}

fn client_credentials(
    headers: &HeaderMap,
    params: &std::collections::HashMap<String, String>,
) -> Result<(String, String), OAuthError> {
    let basic = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("basic"))
        .map(|(_, creds)| creds.trim().to_owned());
    let post = params.get("client_secret").is_some();
    match (basic, post) {
        (Some(_), true) => Err(OAuthError::new(
            OAuthCode::InvalidRequest,
            "use one client authentication method, not two",
        )),
        (Some(b64), false) => {
            let decoded = STANDARD
                .decode(b64)
                .ok()
                .and_then(|b| String::from_utf8(b).ok())
                .ok_or_else(|| {
                    OAuthError::new(OAuthCode::InvalidClient, "malformed Basic credentials")
                })?;
            let (id, secret) = decoded.split_once(':').ok_or_else(|| {
                OAuthError::new(OAuthCode::InvalidClient, "malformed Basic credentials")
            })?;
            // RFC 6749 §2.3.1: both parts are form-urlencoded before base64.
            let id = form_decode(id).ok_or_else(|| {
                OAuthError::new(OAuthCode::InvalidClient, "malformed Basic credentials")
            })?;
            let secret = form_decode(secret).ok_or_else(|| {
                OAuthError::new(OAuthCode::InvalidClient, "malformed Basic credentials")
            })?;
            if params.get("client_id").is_some_and(|p| *p != id) {
                return Err(OAuthError::new(
                    OAuthCode::InvalidRequest,
                    "client_id does not match the credentials",
                ));
            }
            Ok((id, secret))
        }
        (None, true) => {
            let id = params.get("client_id").ok_or_else(|| {
                OAuthError::new(
                    OAuthCode::InvalidRequest,
                    "client_id is required with client_secret",
                )
            })?;
            Ok((id.clone(), params["client_secret"].clone()))
        }
        (None, false) => Err(OAuthError::new(
            OAuthCode::InvalidClient,
            "client authentication is required",
        )),
    }
}

fn form_decode(s: &str) -> Option<String> {
    let pairs: Vec<(String, String)> =
        serde_urlencoded::from_str(&format!("v={}", s.replace('&', "%26"))).ok()?;
    pairs.into_iter().next().map(|(_, v)| v)
}

/// `GET /issuer/oauth/jwks`: the keys that verify access tokens.
#[utoipa::path(
    get,
    path = "/issuer/oauth/jwks",
    operation_id = "token_jwks",
    tag = "oauth",
    responses((status = 200, description = "The keys that verify access tokens (JWK Set)", body = Object))
)]
pub async fn jwks(State(app): State<AppState>) -> impl IntoResponse {
    (
        [(header::CACHE_CONTROL, "public, max-age=300")],
        Json(app.tokens.jwks().clone()),
    )
}

/// A refused budget as a 429 with an RFC 6749 §5.2 body, for the OAuth and OID4VCI endpoints.
pub fn rate_limited(verdict: &crate::limits::Verdict) -> Response {
    let body = serde_json::json!({
        "error": OAuthCode::RateLimited.as_str(),
        "error_description": verdict.message(),
    });
    let mut res = (
        StatusCode::TOO_MANY_REQUESTS,
        [(header::CACHE_CONTROL, "no-store")],
        Json(body),
    )
        .into_response();
    verdict.write_headers(res.headers_mut());
    res
}

#[cfg(test)]
mod proptests {
    //! Whatever a caller sends to the token endpoint, the form and client-authentication
    //! parsers accept it or refuse it with an RFC 6749 §5.2 code; they never panic.

    use std::collections::HashMap;

    use proptest::prelude::*;

    use super::*;

    const CODES: [OAuthCode; 5] = [
        OAuthCode::InvalidRequest,
        OAuthCode::InvalidClient,
        OAuthCode::InvalidGrant,
        OAuthCode::InvalidScope,
        OAuthCode::UnsupportedGrantType,
    ];

    fn param() -> impl Strategy<Value = String> {
        prop_oneof![
            Just("grant_type".to_owned()),
            Just("client_id".to_owned()),
            Just("client_secret".to_owned()),
            Just("scope".to_owned()),
            Just("pre-authorized_code".to_owned()),
            Just("tx_code".to_owned()),
            ".{0,10}",
        ]
    }

    fn headers(content_type: Option<String>, authorization: Option<String>) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (name, value) in [
            (header::CONTENT_TYPE, content_type),
            (header::AUTHORIZATION, authorization),
        ] {
            if let Some(v) = value.and_then(|v| HeaderValue::from_str(&v).ok()) {
                h.insert(name, v);
            }
        }
        h
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn any_body_is_a_form_or_invalid_request(
            content_type in prop::option::of(prop_oneof![
                Just("application/x-www-form-urlencoded".to_owned()),
                Just("application/x-www-form-urlencoded; charset=UTF-8".to_owned()),
                Just("application/json".to_owned()),
                ".{0,30}",
            ]),
            body in prop_oneof![
                prop::collection::vec(any::<u8>(), 0..200),
                prop::collection::vec((param(), ".{0,20}"), 0..6)
                    .prop_map(|p| serde_urlencoded::to_string(p).unwrap().into_bytes()),
            ],
        ) {
            if let Err(e) = form_params(&headers(content_type, None), &body) {
                prop_assert_eq!(e.code, OAuthCode::InvalidRequest);
            }
        }

        #[test]
        fn any_client_authentication_is_read_or_refused_with_an_oauth_code(
            authorization in prop::option::of(prop_oneof![
                ".{0,40}".prop_map(|s| format!("Basic {}", STANDARD.encode(s))),
                "[A-Za-z0-9+/=]{0,40}".prop_map(|s| format!("Basic {s}")),
                ".{0,40}",
            ]),
            params in prop::collection::hash_map(param(), ".{0,20}", 0..5),
        ) {
            let params: HashMap<String, String> = params;
            if let Err(e) = client_credentials(&headers(None, authorization), &params) {
                prop_assert!(CODES.contains(&e.code), "undocumented {}", e.code);
            }
        }
    }
}
