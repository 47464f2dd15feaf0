//! `/issuer/api/v1/webhook-endpoints`: register, list, read, change, delete, rotate the
//! secret, and the delivery log with manual retry. Scope `webhooks:manage`.

use axum::{
    Json,
    extract::{Path, State},
    http::StatusCode,
    response::{IntoResponse, Response},
};
use serde_json::Value;

use super::{
    ApiError, AppState,
    extract::{Auth, JsonBody},
};

pub async fn create(
    State(app): State<AppState>,
    Auth(who): Auth,
    JsonBody(body): JsonBody,
) -> Result<Response, ApiError> {
    let view = app.create_webhook_endpoint(&who, &body).await?;
    Ok((StatusCode::CREATED, Json(view)).into_response())
}

pub async fn list(State(app): State<AppState>, Auth(who): Auth) -> Result<Json<Value>, ApiError> {
    Ok(Json(app.list_webhook_endpoints(&who).await?))
}

pub async fn get(
    State(app): State<AppState>,
    Auth(who): Auth,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    Ok(Json(app.get_webhook_endpoint(&who, &id).await?))
}

pub async fn update(
    State(app): State<AppState>,
    Auth(who): Auth,
    Path(id): Path<String>,
    JsonBody(body): JsonBody,
) -> Result<Json<Value>, ApiError> {
    Ok(Json(app.update_webhook_endpoint(&who, &id, &body).await?))
}

pub async fn delete(
    State(app): State<AppState>,
    Auth(who): Auth,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    app.delete_webhook_endpoint(&who, &id).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// The body is optional: `{"overlap_secs": N}`.
pub async fn rotate_secret(
    State(app): State<AppState>,
    Auth(who): Auth,
    Path(id): Path<String>,
    body: axum::body::Bytes,
) -> Result<Json<Value>, ApiError> {
    let body: Value = if body.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&body)
            .map_err(|e| issuer_domain::Error::invalid_field("", format!("malformed JSON: {e}")))?
    };
    Ok(Json(app.rotate_webhook_secret(&who, &id, &body).await?))
}

pub async fn deliveries(
    State(app): State<AppState>,
    Auth(who): Auth,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    Ok(Json(app.list_webhook_deliveries(&who, &id).await?))
}

pub async fn retry(
    State(app): State<AppState>,
    Auth(who): Auth,
    Path((id, delivery)): Path<(String, String)>,
) -> Result<StatusCode, ApiError> {
    app.retry_webhook_delivery(&who, &id, &delivery).await?;
    Ok(StatusCode::ACCEPTED)
}
