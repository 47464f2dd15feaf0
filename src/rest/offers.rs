//! The wallet-facing credential offer (OID4VCI 1.0 §4.1.3), fetched by reference from the
//! `credential_offer_uri`.

use axum::{
    Json,
    extract::{Path, State},
    http::header,
    response::IntoResponse,
};

use super::{ApiError, AppState};

/// The offer JSON while the issuance is pending; 404 once it is used, expired or cancelled.
pub async fn credential_offer(
    State(app): State<AppState>,
    Path(offer_id): Path<String>,
) -> Result<impl IntoResponse, ApiError> {
    let offer = app.issuances.credential_offer(&offer_id).await?;
    // It carries a pre-authorized code: no cache may keep it.
    Ok(([(header::CACHE_CONTROL, "no-store")], Json(offer)))
}
