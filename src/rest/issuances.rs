//! `/issuer/api/v1/issuances`: create (idempotent), get, list.

use std::collections::HashMap;

use axum::{
    Json,
    extract::{Path, Query, State},
    http::{HeaderMap, HeaderValue, StatusCode, header},
    response::{
        IntoResponse, Response,
        sse::{Event as SseEvent, Sse},
    },
};
use issuer_domain::{Error, FieldViolation, service::ListParams, status::CredentialStatus};
use serde_json::json;

use super::{
    ApiError, AppState, apidoc,
    extract::{Auth, JsonBody, OptionalJsonBody},
};
use crate::{
    view::{EventView, issuance_view, issuance_views},
    watch::WatchItem,
};

/// 201 + `Location` for a new issuance; 200 + `Idempotent-Replayed: true` for a replay.
#[utoipa::path(
    post,
    path = "/issuer/api/v1/issuances",
    operation_id = "create_issuance",
    tag = "issuances",
    request_body(content = apidoc::CreateIssuanceRequest, content_type = "application/json"),
    responses(
        (status = 201, description = "Created", body = apidoc::IssuanceCreated, headers(
            ("Location" = String, description = "The issuance's URL"),
            ("Idempotent-Replayed" = String, description = "`false`"),
        )),
        (status = 200, description = "A replay of an earlier identical request: the same issuance", body = apidoc::IssuanceCreated, headers(
            ("Location" = String, description = "The issuance's URL"),
            ("Idempotent-Replayed" = String, description = "`true`"),
        )),
        (status = 413, description = "`payload_too_large`", body = apidoc::Problem, content_type = "application/problem+json"),
        (status = 415, description = "`unsupported_media_type`: send `application/json`", body = apidoc::Problem, content_type = "application/problem+json"),
        (status = 422, description = "`idempotency_key_reused`: the key was used with another request", body = apidoc::Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = ["issuance:write"]))
)]
pub async fn create(
    State(app): State<AppState>,
    Auth(who): Auth,
    JsonBody(body): JsonBody,
) -> Result<Response, ApiError> {
    let out = app.issuances.create(&who, &body).await?;
    crate::metrics::create("rest", out.replayed);
    let view = issuance_view(&app.issuances, app.store.as_ref(), &who, &out.issuance).await?;
    let location = format!(
        "{}/issuer/api/v1/issuances/{}",
        app.settings.public_url, view.issuance_id
    );
    let mut body = serde_json::to_value(&view).map_err(issuer_domain::Error::internal)?;
    if let Some(tx_code) = out.tx_code {
        body["tx_code"] = tx_code.into();
    }
    let status = if out.replayed {
        StatusCode::OK
    } else {
        StatusCode::CREATED
    };
    let mut res = (status, Json(body)).into_response();
    let h = res.headers_mut();
    if let Ok(v) = HeaderValue::from_str(&location) {
        h.insert(header::LOCATION, v);
    }
    h.insert(
        "idempotent-replayed",
        HeaderValue::from_static(if out.replayed { "true" } else { "false" }),
    );
    Ok(res)
}

#[utoipa::path(
    get,
    path = "/issuer/api/v1/issuances/{issuance_id}",
    operation_id = "get_issuance",
    tag = "issuances",
    params(("issuance_id" = String, Path, description = "The issuance's id")),
    responses(
        (status = 200, description = "The issuance", body = crate::view::IssuanceView),
        (status = 404, description = "`not_found` (also another tenant's issuance)", body = apidoc::Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = ["issuance:read"]))
)]
pub async fn get(
    State(app): State<AppState>,
    Auth(who): Auth,
    Path(issuance_id): Path<String>,
) -> Result<Json<crate::view::IssuanceView>, ApiError> {
    let issuance = app.issuances.get(&who, &issuance_id).await?;
    Ok(Json(
        issuance_view(&app.issuances, app.store.as_ref(), &who, &issuance).await?,
    ))
}

/// The offer's QR code: `format=png` (default) or `svg`, `size` in pixels (128 to 2048). The
/// offer is a secret of `issuance:write`: whoever scans it can redeem it.
#[utoipa::path(
    get,
    path = "/issuer/api/v1/issuances/{issuance_id}/qr",
    operation_id = "issuance_qr",
    tag = "issuances",
    params(
        ("issuance_id" = String, Path, description = "The issuance's id"),
        ("format" = Option<apidoc::QrFormat>, Query, description = "`png` (default) or `svg`"),
        ("size" = Option<u32>, Query, minimum = 128, maximum = 2048, description = "Pixels (default 320)"),
    ),
    responses(
        (status = 200, description = "The QR code of the credential offer URI (`Cache-Control: no-store`)", content(
            ("image/png"),
            ("image/svg+xml"),
        )),
        (status = 404, description = "`not_found`", body = apidoc::Problem, content_type = "application/problem+json"),
        (status = 409, description = "`invalid_state`: the offer is no longer open", body = apidoc::Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = ["issuance:write"]))
)]
pub async fn qr(
    State(app): State<AppState>,
    Auth(who): Auth,
    Path(id): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Response, ApiError> {
    let mut violations = Vec::new();
    let format = q.get("format").map_or("png", String::as_str);
    if !matches!(format, "png" | "svg") {
        violations.push(FieldViolation::new("format", "must be `png` or `svg`"));
    }
    let size = match q.get("size").map(|s| s.parse::<u32>()) {
        None => crate::qr::DEFAULT_SIZE,
        Some(Ok(n)) if crate::qr::SIZES.contains(&n) => n,
        Some(_) => {
            violations.push(FieldViolation::new(
                "size",
                format!(
                    "must be an integer from {} to {}",
                    crate::qr::SIZES.start(),
                    crate::qr::SIZES.end()
                ),
            ));
            0
        }
    };
    if !violations.is_empty() {
        return Err(Error::invalid(violations).into());
    }
    let uri = app.issuances.open_offer_uri(&who, &id).await?;
    // The image is the offer: as private as the offer itself.
    let headers = [(header::CACHE_CONTROL, "no-store")];
    let (format, content_type) = if format == "svg" {
        (crate::qr::Format::Svg, "image/svg+xml")
    } else {
        (crate::qr::Format::Png, "image/png")
    };
    let image = crate::qr::image(&uri, size, format).await?;
    Ok((
        headers,
        [(header::CONTENT_TYPE, content_type)],
        axum::body::Bytes::from_owner(image),
    )
        .into_response())
}

/// Many creates in one call (bulk issuance): every item is answered as its own create would
/// be, in input order; one bad item fails alone. Whole-request problems (token, scope,
/// malformed body, too many items, too large) are one problem, as for a single create.
#[utoipa::path(
    post,
    path = "/issuer/api/v1/issuances/batch",
    operation_id = "create_issuance_batch",
    tag = "issuances",
    request_body(content = apidoc::BatchCreateRequest, content_type = "application/json"),
    responses(
        (status = 200, description = "Every item's answer", body = apidoc::BatchCreateResponse),
        (status = 413, description = "`payload_too_large`: above `ISSUER_BATCH_MAX_BYTES`", body = apidoc::Problem, content_type = "application/problem+json"),
        (status = 415, description = "`unsupported_media_type`: send `application/json`", body = apidoc::Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = ["issuance:write"]))
)]
pub async fn create_batch(
    State(app): State<AppState>,
    Auth(who): Auth,
    JsonBody(body): JsonBody,
) -> Result<Json<serde_json::Value>, ApiError> {
    let max = app.settings.batch_max_items;
    let items = match body.get("issuances").and_then(serde_json::Value::as_array) {
        Some(items) if (1..=max).contains(&items.len()) => items,
        _ => {
            return Err(Error::invalid_field(
                "issuances",
                format!("must be an array of 1 to {max} create bodies"),
            )
            .into());
        }
    };
    let batch = uuid::Uuid::new_v4();
    let outcomes = app.issuances.create_many(&who, items, Some(batch)).await?;
    let created: Vec<_> = outcomes
        .iter()
        .filter_map(|o| o.as_ref().ok().map(|o| &o.issuance))
        .collect();
    let mut views = issuance_views(&app.issuances, app.store.as_ref(), &who, &created)
        .await?
        .into_iter();
    let results: Vec<serde_json::Value> = outcomes
        .into_iter()
        .enumerate()
        .map(|(index, outcome)| match outcome {
            Ok(out) => {
                crate::metrics::create("rest", out.replayed);
                let mut issuance = views
                    .next()
                    .and_then(|v| serde_json::to_value(v).ok())
                    .unwrap_or_default();
                if let Some(tx_code) = out.tx_code {
                    issuance["tx_code"] = tx_code.into();
                }
                json!({
                    "index": index,
                    "status": if out.replayed { 200 } else { 201 },
                    "issuance": issuance,
                })
            }
            Err(e) => json!({
                "index": index,
                "status": super::error::status_of(e.code).as_u16(),
                "problem": super::error::problem(&e),
            }),
        })
        .collect();
    Ok(Json(
        json!({"batch_id": batch.to_string(), "results": results}),
    ))
}

#[utoipa::path(
    get,
    path = "/issuer/api/v1/issuances",
    operation_id = "list_issuances",
    tag = "issuances",
    params(
        ("status" = Option<apidoc::IssuanceStatus>, Query, description = "Only issuances in this status"),
        ("client_request_id" = Option<String>, Query, description = "Only the issuance with this key"),
        ("batch_id" = Option<String>, Query, description = "Only the issuances of this batch create"),
        ("page_size" = Option<i64>, Query, minimum = 1, maximum = 200, description = "Default 50"),
        ("page_token" = Option<String>, Query, description = "`next_page_token` of the previous page"),
    ),
    responses((status = 200, description = "A page of issuances, newest first", body = apidoc::IssuanceList)),
    security(("bearer" = ["issuance:read"]))
)]
pub async fn list(
    State(app): State<AppState>,
    Auth(who): Auth,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let page_size = match q.get("page_size") {
        None => None,
        Some(s) => Some(
            s.parse::<i64>()
                .map_err(|_| Error::invalid_field("page_size", "must be an integer"))?,
        ),
    };
    let page = app
        .issuances
        .list(
            &who,
            ListParams {
                page_size,
                page_token: q.get("page_token").cloned(),
                status: q.get("status").cloned(),
                client_request_id: q.get("client_request_id").cloned(),
                batch_id: q.get("batch_id").cloned(),
            },
        )
        .await?;
    let items = issuance_views(&app.issuances, app.store.as_ref(), &who, &page.issuances).await?;
    Ok(Json(
        json!({"issuances": items, "next_page_token": page.next_page_token}),
    ))
}

/// `POST /issuer/api/v1/issuances/{id}/cancel`.
#[utoipa::path(
    post,
    path = "/issuer/api/v1/issuances/{issuance_id}/cancel",
    operation_id = "cancel_issuance",
    tag = "issuances",
    params(("issuance_id" = String, Path, description = "The issuance's id")),
    responses(
        (status = 200, description = "The issuance, now `rejected` / `cancelled` (or already so)", body = crate::view::IssuanceView),
        (status = 404, description = "`not_found`", body = apidoc::Problem, content_type = "application/problem+json"),
        (status = 409, description = "`invalid_state`: the issuance has another outcome already", body = apidoc::Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = ["issuance:write"]))
)]
pub async fn cancel(
    State(app): State<AppState>,
    Auth(who): Auth,
    Path(issuance_id): Path<String>,
) -> Result<Json<crate::view::IssuanceView>, ApiError> {
    let issuance = app.issuances.cancel(&who, &issuance_id).await?;
    Ok(Json(
        issuance_view(&app.issuances, app.store.as_ref(), &who, &issuance).await?,
    ))
}

/// The optional body of a credential status change: `{"reason": "..."}`.
fn status_reason(body: Option<&serde_json::Value>) -> Result<Option<&str>, Error> {
    let Some(body) = body else { return Ok(None) };
    let Some(obj) = body.as_object() else {
        return Err(Error::invalid_field("", "the body must be a JSON object"));
    };
    if let Some(name) = obj.keys().find(|k| *k != "reason") {
        return Err(Error::invalid_field(name, "unknown field"));
    }
    match obj.get("reason") {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(serde_json::Value::String(r)) => Ok(Some(r)),
        Some(_) => Err(Error::invalid_field("reason", "must be a string")),
    }
}

/// Revoke, suspend or reinstate: the same handler with another target status.
async fn set_credential_status(
    app: AppState,
    who: issuer_domain::service::Principal,
    issuance_id: String,
    body: Option<serde_json::Value>,
    to: CredentialStatus,
) -> Result<Json<crate::view::IssuanceView>, ApiError> {
    let reason = status_reason(body.as_ref())?;
    let issuance = app
        .issuances
        .set_credential_status(&who, &issuance_id, to, reason)
        .await?;
    Ok(Json(
        issuance_view(&app.issuances, app.store.as_ref(), &who, &issuance).await?,
    ))
}

/// `POST /issuer/api/v1/issuances/{id}/revoke`.
#[utoipa::path(
    post,
    path = "/issuer/api/v1/issuances/{issuance_id}/revoke",
    operation_id = "revoke_credential",
    tag = "issuances",
    params(("issuance_id" = String, Path, description = "The issuance's id")),
    request_body(content = Option<apidoc::StatusChange>, description = "Optional: why", content_type = "application/json"),
    responses(
        (status = 200, description = "The issuance, its credentials now `revoked` (or already so): every copy's status-list entry is INVALID, for good", body = crate::view::IssuanceView),
        (status = 400, description = "`invalid_request`: a bad `reason`", body = apidoc::Problem, content_type = "application/problem+json"),
        (status = 404, description = "`not_found`", body = apidoc::Problem, content_type = "application/problem+json"),
        (status = 409, description = "`invalid_state`: no credential was issued (a pending issuance: cancel it instead)", body = apidoc::Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = ["issuance:write"]))
)]
pub async fn revoke(
    State(app): State<AppState>,
    Auth(who): Auth,
    Path(issuance_id): Path<String>,
    OptionalJsonBody(body): OptionalJsonBody,
) -> Result<Json<crate::view::IssuanceView>, ApiError> {
    set_credential_status(app, who, issuance_id, body, CredentialStatus::Revoked).await
}

/// `POST /issuer/api/v1/issuances/{id}/suspend`.
#[utoipa::path(
    post,
    path = "/issuer/api/v1/issuances/{issuance_id}/suspend",
    operation_id = "suspend_credential",
    tag = "issuances",
    params(("issuance_id" = String, Path, description = "The issuance's id")),
    request_body(content = Option<apidoc::StatusChange>, description = "Optional: why", content_type = "application/json"),
    responses(
        (status = 200, description = "The issuance, its credentials now `suspended` (or already so)", body = crate::view::IssuanceView),
        (status = 400, description = "`invalid_request`: a bad `reason`", body = apidoc::Problem, content_type = "application/problem+json"),
        (status = 404, description = "`not_found`", body = apidoc::Problem, content_type = "application/problem+json"),
        (status = 409, description = "`invalid_state`: no credential was issued, or it is revoked", body = apidoc::Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = ["issuance:write"]))
)]
pub async fn suspend(
    State(app): State<AppState>,
    Auth(who): Auth,
    Path(issuance_id): Path<String>,
    OptionalJsonBody(body): OptionalJsonBody,
) -> Result<Json<crate::view::IssuanceView>, ApiError> {
    set_credential_status(app, who, issuance_id, body, CredentialStatus::Suspended).await
}

/// `POST /issuer/api/v1/issuances/{id}/reinstate`.
#[utoipa::path(
    post,
    path = "/issuer/api/v1/issuances/{issuance_id}/reinstate",
    operation_id = "reinstate_credential",
    tag = "issuances",
    params(("issuance_id" = String, Path, description = "The issuance's id")),
    request_body(content = Option<apidoc::StatusChange>, description = "Optional: why", content_type = "application/json"),
    responses(
        (status = 200, description = "The issuance, its credentials `valid` again (or already so)", body = crate::view::IssuanceView),
        (status = 400, description = "`invalid_request`: a bad `reason`", body = apidoc::Problem, content_type = "application/problem+json"),
        (status = 404, description = "`not_found`", body = apidoc::Problem, content_type = "application/problem+json"),
        (status = 409, description = "`invalid_state`: no credential was issued, or it is revoked", body = apidoc::Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = ["issuance:write"]))
)]
pub async fn reinstate(
    State(app): State<AppState>,
    Auth(who): Auth,
    Path(issuance_id): Path<String>,
    OptionalJsonBody(body): OptionalJsonBody,
) -> Result<Json<crate::view::IssuanceView>, ApiError> {
    set_credential_status(app, who, issuance_id, body, CredentialStatus::Valid).await
}

/// `GET /issuer/api/v1/issuances/{id}/events`: the history as JSON, or with
/// `Accept: text/event-stream` a live SSE stream (resumable with `Last-Event-ID`) that ends
/// after the outcome.
#[utoipa::path(
    get,
    path = "/issuer/api/v1/issuances/{issuance_id}/events",
    operation_id = "issuance_events",
    tag = "issuances",
    params(
        ("issuance_id" = String, Path, description = "The issuance's id"),
        ("after" = Option<i64>, Query, description = "Only events with a larger sequence"),
        ("Last-Event-ID" = Option<String>, Header, description = "SSE resume point (an event id this service sent)"),
    ),
    responses(
        (status = 200, description = "The history as JSON; with `Accept: text/event-stream` a live stream that ends after the outcome", content(
            (apidoc::EventList = "application/json"),
            ("text/event-stream"),
        )),
        (status = 404, description = "`not_found`", body = apidoc::Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = ["issuance:read"]))
)]
pub async fn events(
    State(app): State<AppState>,
    Auth(who): Auth,
    Path(issuance_id): Path<String>,
    Query(q): Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    // Access first, as over gRPC: another tenant's id is 404 whatever the parameters. The
    // history read for that check is the JSON answer too.
    let (_, history) = app.issuances.events(&who, &issuance_id, 0).await?;
    let after = match (q.get("after"), headers.get("last-event-id")) {
        (Some(s), _) => s
            .parse::<i64>()
            .map_err(|_| Error::invalid_field("after", "must be an integer"))?,
        (None, Some(v)) => v
            .to_str()
            .ok()
            .and_then(|v| v.trim().parse::<i64>().ok())
            .ok_or_else(|| {
                Error::invalid_field("Last-Event-ID", "must be an event id this service sent")
            })?,
        (None, None) => 0,
    };
    let wants_stream = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("text/event-stream"));
    if !wants_stream {
        let events: Vec<EventView> = history
            .iter()
            .filter(|e| e.sequence > after)
            .map(EventView::from)
            .collect();
        return Ok(Json(json!({ "events": events })).into_response());
    }
    let rx = app.watches.open(who, issuance_id, after).await?;
    let stream = futures::stream::unfold(rx, |mut rx| async move {
        let item = rx.recv().await?;
        let event = match item {
            Ok(WatchItem::Event(e)) => {
                let view = EventView::from(&e);
                SseEvent::default()
                    .id(view.sequence.to_string())
                    .event(view.kind.as_str())
                    .json_data(&view)
                    .unwrap_or_else(|_| SseEvent::default().comment("unserialisable event"))
            }
            Ok(WatchItem::Heartbeat) => SseEvent::default().comment("heartbeat"),
            // The stream's last event; the watch ends after it.
            Err(e) => {
                if e.code == issuer_domain::ErrorCode::InvalidToken {
                    tracing::debug!("event stream ended: the token expired");
                } else {
                    tracing::error!(error = %e.chain(), "event stream failed");
                }
                SseEvent::default()
                    .event("error")
                    .json_data(json!({"code": e.code.as_str(), "detail": e.message}))
                    .unwrap_or_else(|_| SseEvent::default().event("error"))
            }
        };
        Some((Ok::<_, std::convert::Infallible>(event), rx))
    });
    Ok(Sse::new(stream).into_response())
}
