//! `/issuer/api/v1/webhook-endpoints`: register, list, read, change, delete, rotate the
//! secret, and the delivery log with manual retry. Scope `webhooks:manage`.

use axum::{
    Json,
    extract::{Path, State},
    http::StatusCode,
    response::{IntoResponse, Response},
};
use serde_json::Value;

use crate::webhooks::{DeliveryList, EndpointList, EndpointView, EndpointWithSecret};

use super::{
    ApiError, AppState, apidoc,
    extract::{Auth, JsonBody},
};

#[utoipa::path(
    post,
    path = "/issuer/api/v1/webhook-endpoints",
    operation_id = "create_webhook_endpoint",
    tag = "webhooks",
    request_body(content = apidoc::CreateWebhookEndpoint, content_type = "application/json"),
    responses(
        (status = 201, description = "Registered; the secret is shown this once", body = apidoc::WebhookEndpointWithSecret),
        (status = 413, description = "`payload_too_large`", body = apidoc::Problem, content_type = "application/problem+json"),
        (status = 415, description = "`unsupported_media_type`", body = apidoc::Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = ["webhooks:manage"]))
)]
pub async fn create(
    State(app): State<AppState>,
    Auth(who): Auth,
    JsonBody(body): JsonBody,
) -> Result<Response, ApiError> {
    let view = app.webhooks.create(&who, &body).await?;
    Ok((StatusCode::CREATED, Json(view)).into_response())
}

#[utoipa::path(
    get,
    path = "/issuer/api/v1/webhook-endpoints",
    operation_id = "list_webhook_endpoints",
    tag = "webhooks",
    responses((status = 200, description = "The tenant's endpoints", body = apidoc::WebhookEndpointList)),
    security(("bearer" = ["webhooks:manage"]))
)]
pub async fn list(
    State(app): State<AppState>,
    Auth(who): Auth,
) -> Result<Json<EndpointList>, ApiError> {
    Ok(Json(app.webhooks.list(&who).await?))
}

#[utoipa::path(
    get,
    path = "/issuer/api/v1/webhook-endpoints/{id}",
    operation_id = "get_webhook_endpoint",
    tag = "webhooks",
    params(("id" = String, Path, description = "The endpoint's id")),
    responses(
        (status = 200, description = "The endpoint", body = apidoc::WebhookEndpoint),
        (status = 404, description = "`not_found`", body = apidoc::Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = ["webhooks:manage"]))
)]
pub async fn get(
    State(app): State<AppState>,
    Auth(who): Auth,
    Path(id): Path<String>,
) -> Result<Json<EndpointView>, ApiError> {
    Ok(Json(app.webhooks.get(&who, &id).await?))
}

#[utoipa::path(
    patch,
    path = "/issuer/api/v1/webhook-endpoints/{id}",
    operation_id = "update_webhook_endpoint",
    tag = "webhooks",
    params(("id" = String, Path, description = "The endpoint's id")),
    request_body(content = apidoc::UpdateWebhookEndpoint, content_type = "application/json"),
    responses(
        (status = 200, description = "The endpoint as changed", body = apidoc::WebhookEndpoint),
        (status = 404, description = "`not_found`", body = apidoc::Problem, content_type = "application/problem+json"),
        (status = 413, description = "`payload_too_large`", body = apidoc::Problem, content_type = "application/problem+json"),
        (status = 415, description = "`unsupported_media_type`", body = apidoc::Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = ["webhooks:manage"]))
)]
pub async fn update(
    State(app): State<AppState>,
    Auth(who): Auth,
    Path(id): Path<String>,
    JsonBody(body): JsonBody,
) -> Result<Json<EndpointView>, ApiError> {
    Ok(Json(app.webhooks.update(&who, &id, &body).await?))
}

#[utoipa::path(
    delete,
    path = "/issuer/api/v1/webhook-endpoints/{id}",
    operation_id = "delete_webhook_endpoint",
    tag = "webhooks",
    params(("id" = String, Path, description = "The endpoint's id")),
    responses(
        (status = 204, description = "Deleted, with its pending deliveries"),
        (status = 404, description = "`not_found`", body = apidoc::Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = ["webhooks:manage"]))
)]
pub async fn delete(
    State(app): State<AppState>,
    Auth(who): Auth,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    app.webhooks.delete(&who, &id).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// The body is optional: `{"overlap_secs": N}`.
#[utoipa::path(
    post,
    path = "/issuer/api/v1/webhook-endpoints/{id}/rotate-secret",
    operation_id = "rotate_webhook_secret",
    tag = "webhooks",
    params(("id" = String, Path, description = "The endpoint's id")),
    request_body(content = Option<apidoc::RotateSecret>, content_type = "application/json", description = "Optional"),
    responses(
        (status = 200, description = "The new secret, shown this once", body = apidoc::WebhookEndpointWithSecret),
        (status = 404, description = "`not_found`", body = apidoc::Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = ["webhooks:manage"]))
)]
pub async fn rotate_secret(
    State(app): State<AppState>,
    Auth(who): Auth,
    Path(id): Path<String>,
    body: axum::body::Bytes,
) -> Result<Json<EndpointWithSecret>, ApiError> {
    let body: Value = if body.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&body)
            .map_err(|e| issuer_domain::Error::invalid_field("", format!("malformed JSON: {e}")))?
    };
    Ok(Json(app.webhooks.rotate_secret(&who, &id, &body).await?))
}

#[utoipa::path(
    get,
    path = "/issuer/api/v1/webhook-endpoints/{id}/deliveries",
    operation_id = "list_webhook_deliveries",
    tag = "webhooks",
    params(("id" = String, Path, description = "The endpoint's id")),
    responses(
        (status = 200, description = "The endpoint's deliveries, newest first", body = apidoc::WebhookDeliveryList),
        (status = 404, description = "`not_found`", body = apidoc::Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = ["webhooks:manage"]))
)]
pub async fn deliveries(
    State(app): State<AppState>,
    Auth(who): Auth,
    Path(id): Path<String>,
) -> Result<Json<DeliveryList>, ApiError> {
    Ok(Json(app.webhooks.deliveries(&who, &id).await?))
}

#[utoipa::path(
    post,
    path = "/issuer/api/v1/webhook-endpoints/{id}/deliveries/{delivery_id}/retry",
    operation_id = "retry_webhook_delivery",
    tag = "webhooks",
    params(("id" = String, Path, description = "The endpoint's id"), ("delivery_id" = String, Path, description = "The delivery's id")),
    responses(
        (status = 202, description = "Queued for an attempt now"),
        (status = 404, description = "`not_found`", body = apidoc::Problem, content_type = "application/problem+json"),
        (status = 409, description = "`invalid_state`: the endpoint is disabled", body = apidoc::Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = ["webhooks:manage"]))
)]
pub async fn retry(
    State(app): State<AppState>,
    Auth(who): Auth,
    Path((id, delivery)): Path<(String, String)>,
) -> Result<StatusCode, ApiError> {
    app.webhooks.retry(&who, &id, &delivery).await?;
    Ok(StatusCode::ACCEPTED)
}
