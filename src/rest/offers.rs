//! The wallet-facing credential offer (OID4VCI 1.0 §4.1.3), fetched by reference from the
//! `credential_offer_uri`.

use axum::{
    Json,
    extract::{Path, State},
    http::header,
    response::IntoResponse,
};

use super::{ApiError, AppState, apidoc};

/// The offer JSON while the issuance is pending; 404 once it is used, expired or cancelled.
#[utoipa::path(
    get,
    path = "/issuer/oid4vci/v1/credential-offer/{offer_id}",
    operation_id = "credential_offer",
    tag = "oid4vci",
    params(("offer_id" = String, Path, description = "From the `credential_offer_uri`")),
    responses(
        (status = 200, description = "The credential offer (OID4VCI 1.0 §4.1.1), `Cache-Control: no-store`", body = Object),
        (status = 404, description = "`not_found`: unknown, used, expired or cancelled", body = apidoc::Problem, content_type = "application/problem+json"),
        (status = 429, description = "`rate_limited`: the client address's budget is spent (`Retry-After`)", body = apidoc::Problem, content_type = "application/problem+json"),
        (status = 503, description = "`unavailable`", body = apidoc::Problem, content_type = "application/problem+json"),
    )
)]
pub async fn credential_offer(
    State(app): State<AppState>,
    Path(offer_id): Path<String>,
) -> Result<impl IntoResponse, ApiError> {
    let offer = app.issuances.credential_offer(&offer_id).await?;
    // It carries a pre-authorized code: no cache may keep it.
    Ok(([(header::CACHE_CONTROL, "no-store")], Json(offer)))
}
