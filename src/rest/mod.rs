//! The REST shim: the documented `/issuer/...` JSON paths over the same use cases as gRPC.
//! One module per resource; errors leave through `error::ApiError` only.

use std::sync::Arc;

use axum::{
    Json, Router,
    extract::{DefaultBodyLimit, State},
    http::{Method, StatusCode, header},
    response::IntoResponse,
    routing::{get, post},
};
use serde_json::json;
use tower_http::{
    cors::{Any, CorsLayer},
    trace::TraceLayer,
};

use crate::app::App;

pub mod apidoc;
mod error;
mod extract;
mod issuances;
pub mod landing;
mod oauth;
mod offers;
mod oid4vci;
mod webhooks;

pub use error::{ApiError, rate_limited};
pub use oauth::rate_limited as oauth_rate_limited;

pub type AppState = Arc<App>;

pub fn router(app: AppState) -> Router {
    let limit = app.settings.max_body_bytes;
    Router::new()
        .merge(management(app.settings.batch_max_bytes))
        .merge(wallet_facing())
        // The recipient's page: a browser's, not an API client's.
        .route("/issuer/offer/{offer_id}", get(landing::page))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .merge(docs())
        .layer(DefaultBodyLimit::max(limit))
        .layer(TraceLayer::new_for_http())
        .with_state(app)
}

/// The OpenAPI document and a Swagger UI for it, served from the binary (no CDN).
fn docs() -> Router<AppState> {
    let json = apidoc::json();
    Router::new()
        .route(
            apidoc::PATH,
            get(move || async move {
                (
                    [
                        (header::CONTENT_TYPE, "application/json"),
                        (header::CACHE_CONTROL, "public, max-age=300"),
                    ],
                    json,
                )
            }),
        )
        .merge(
            utoipa_swagger_ui::SwaggerUi::new("/issuer/api/docs")
                .config(utoipa_swagger_ui::Config::new([apidoc::PATH])),
        )
}

/// The backends' API: no CORS, since browsers have no business holding client secrets.
fn management(batch_limit: usize) -> Router<AppState> {
    Router::new()
        .route("/issuer/oauth/jwks", get(oauth::jwks))
        .route(
            "/issuer/api/v1/issuances",
            post(issuances::create).get(issuances::list),
        )
        .route(
            "/issuer/api/v1/issuances/batch",
            post(issuances::create_batch).layer(DefaultBodyLimit::max(batch_limit)),
        )
        .route(
            "/issuer/api/v1/issuances/{issuance_id}",
            get(issuances::get),
        )
        .route(
            "/issuer/api/v1/issuances/{issuance_id}/cancel",
            post(issuances::cancel),
        )
        .route(
            "/issuer/api/v1/issuances/{issuance_id}/revoke",
            post(issuances::revoke),
        )
        .route(
            "/issuer/api/v1/issuances/{issuance_id}/suspend",
            post(issuances::suspend),
        )
        .route(
            "/issuer/api/v1/issuances/{issuance_id}/reinstate",
            post(issuances::reinstate),
        )
        .route(
            "/issuer/api/v1/issuances/{issuance_id}/events",
            get(issuances::events),
        )
        .route(
            "/issuer/api/v1/issuances/{issuance_id}/qr",
            get(issuances::qr),
        )
        .route(
            "/issuer/api/v1/webhook-endpoints",
            post(webhooks::create).get(webhooks::list),
        )
        .route(
            "/issuer/api/v1/webhook-endpoints/{id}",
            get(webhooks::get)
                .patch(webhooks::update)
                .delete(webhooks::delete),
        )
        .route(
            "/issuer/api/v1/webhook-endpoints/{id}/rotate-secret",
            post(webhooks::rotate_secret),
        )
        .route(
            "/issuer/api/v1/webhook-endpoints/{id}/deliveries",
            get(webhooks::deliveries),
        )
        .route(
            "/issuer/api/v1/webhook-endpoints/{id}/deliveries/{delivery_id}/retry",
            post(webhooks::retry),
        )
}

/// What wallets call, open to any origin so that web wallets work: nothing here relies on
/// ambient credentials (cookies); access tokens travel in `Authorization`, which CORS must
/// allow explicitly.
fn wallet_facing() -> Router<AppState> {
    let cors = CorsLayer::new()
        .allow_origin(Any)
        .allow_methods([Method::GET, Method::POST])
        .allow_headers([header::AUTHORIZATION, header::CONTENT_TYPE])
        .max_age(std::time::Duration::from_secs(600));
    Router::new()
        .route("/issuer/oauth/token", post(oauth::token))
        .route(
            "/issuer/oid4vci/v1/credential-offer/{offer_id}",
            get(offers::credential_offer),
        )
        .route(
            "/.well-known/openid-credential-issuer/issuer",
            get(oid4vci::credential_issuer),
        )
        .route(
            "/issuer/.well-known/openid-credential-issuer",
            get(oid4vci::credential_issuer),
        )
        .route(
            "/.well-known/oauth-authorization-server/issuer",
            get(oid4vci::authorization_server),
        )
        .route(
            "/issuer/.well-known/oauth-authorization-server",
            get(oid4vci::authorization_server),
        )
        .route(
            "/.well-known/jwt-vc-issuer/issuer",
            get(oid4vci::jwt_vc_issuer),
        )
        .route("/issuer/oid4vci/v1/nonce", post(oid4vci::nonce))
        .route("/issuer/oid4vci/v1/credential", post(oid4vci::credential))
        .route(
            "/issuer/oid4vci/v1/notification",
            post(oid4vci::notification),
        )
        .route("/issuer/status-lists/{list_id}", get(oid4vci::status_list))
        .layer(cors)
}

#[utoipa::path(
    get,
    path = "/healthz",
    operation_id = "healthz",
    tag = "operations",
    responses((status = 200, description = "The process is up", body = apidoc::Health))
)]
async fn healthz() -> impl IntoResponse {
    Json(json!({"status": "ok"}))
}

/// Ready when the database answers; a Redis outage only degrades idempotency to the database.
#[utoipa::path(
    get,
    path = "/readyz",
    operation_id = "readyz",
    tag = "operations",
    responses(
        (status = 200, description = "`ok`, or `degraded` without Redis", body = apidoc::Readiness),
        (status = 503, description = "`unavailable` (no database) or `stopping`", body = apidoc::Readiness),
    )
)]
async fn readyz(State(app): State<AppState>) -> impl IntoResponse {
    if app.is_stopping() {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "stopping"})),
        );
    }
    let db = app.store.ping().await;
    let redis = app.lock.ping().await;
    let body = json!({
        "status": if db.is_err() { "unavailable" } else if redis.is_err() { "degraded" } else { "ok" },
        "database": if db.is_ok() { "ok" } else { "unavailable" },
        "redis": if redis.is_ok() { "ok" } else { "unavailable" },
    });
    let status = if db.is_ok() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(body))
}
