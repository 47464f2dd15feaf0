//! The OpenAPI 3.1 document of the REST API, served at `GET /issuer/api/v1/openapi.json` with an
//! offline Swagger UI at `/issuer/api/docs/`, and committed as `docs/openapi.json`.
//!
//! Operations are declared on the handlers (`#[utoipa::path]`); the bodies the handlers build
//! as JSON values are described here. CI checks the document both ways: the committed copy
//! must equal what the code generates (`tests/it/openapi.rs`), and schemathesis drives every
//! operation with valid and invalid input and checks each answer against it.

// The types below describe JSON the handlers build; they are never constructed.
#![allow(dead_code)]

use utoipa::{
    Modify, OpenApi, ToSchema,
    openapi::{
        self, Content, Ref, ResponseBuilder,
        security::{Http, HttpAuthScheme, SecurityScheme},
    },
};

use crate::view::{EventView, IssuanceView};

#[derive(OpenApi)]
#[openapi(
    info(
        title = "issuer",
        description = "Issues verifiable credentials (SD-JWT VC over OpenID4VCI 1.0) to people's \
                       wallets on behalf of organisations' backends. Management calls take an \
                       access token from `POST /issuer/oauth/token` (client credentials). The \
                       same operations exist over gRPC (`issuer.v1.IssuanceService`).",
    ),
    paths(
        super::issuances::create,
        super::issuances::create_batch,
        super::issuances::list,
        super::issuances::get,
        super::issuances::cancel,
        super::issuances::revoke,
        super::issuances::suspend,
        super::issuances::reinstate,
        super::issuances::events,
        super::issuances::qr,
        super::webhooks::create,
        super::webhooks::list,
        super::webhooks::get,
        super::webhooks::update,
        super::webhooks::delete,
        super::webhooks::rotate_secret,
        super::webhooks::deliveries,
        super::webhooks::retry,
        super::oauth::token,
        super::oauth::jwks,
        super::offers::credential_offer,
        super::oid4vci::credential_issuer,
        credential_issuer_suffix,
        super::oid4vci::authorization_server,
        authorization_server_suffix,
        super::oid4vci::jwt_vc_issuer,
        super::oid4vci::nonce,
        super::oid4vci::credential,
        super::oid4vci::notification,
        super::oid4vci::status_list,
        super::landing::page,
        super::healthz,
        super::readyz,
    ),
    components(schemas(Problem, FieldViolation, ErrorCode, QrFormat, IssuanceStatus)),
    modifiers(&SecuritySchemes, &CommonResponses),
    tags(
        (name = "issuances", description = "Credential offers and their outcome"),
        (name = "webhooks", description = "Signed event notifications (scope `webhooks:manage`)"),
        (name = "oauth", description = "Access tokens: client credentials for backends, pre-authorized code for wallets"),
        (name = "oid4vci", description = "What wallets call: metadata, offers, nonce, credential, notification"),
        (name = "operations", description = "Probes"),
    )
)]
pub struct ApiDoc;

/// Where the document is served.
pub const PATH: &str = crate::wire::OPENAPI_PATH;

/// The document as served and committed (`docs/openapi.json`): pretty JSON, ending in a newline.
pub fn json() -> &'static str {
    static JSON: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    JSON.get_or_init(|| {
        let mut doc = ApiDoc::openapi()
            .to_pretty_json()
            .expect("the OpenAPI document serialises");
        doc.push('\n');
        doc
    })
}

/// The well-known suffix form of the credential issuer metadata (same answer).
#[utoipa::path(
    get,
    path = "/issuer/.well-known/openid-credential-issuer",
    operation_id = "credential_issuer_metadata_suffix",
    tag = "oid4vci",
    responses((status = 200, description = "Credential issuer metadata (OID4VCI 1.0 §12.2)", body = Object))
)]
fn credential_issuer_suffix() {}

/// The well-known suffix form of the authorization server metadata (same answer).
#[utoipa::path(
    get,
    path = "/issuer/.well-known/oauth-authorization-server",
    operation_id = "authorization_server_metadata_suffix",
    tag = "oid4vci",
    responses((status = 200, description = "Authorization server metadata (RFC 8414)", body = Object))
)]
fn authorization_server_suffix() {}

/// `bearer`: management access tokens. `client_basic`: client_secret_basic at the token
/// endpoint.
struct SecuritySchemes;

impl Modify for SecuritySchemes {
    fn modify(&self, api: &mut openapi::OpenApi) {
        let c = api.components.get_or_insert_with(Default::default);
        c.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                openapi::security::HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .bearer_format("JWT")
                    .description(Some(
                        "Access token from `POST /issuer/oauth/token` (grant_type=client_credentials)",
                    ))
                    .build(),
            ),
        );
        c.add_security_scheme(
            "client_basic",
            SecurityScheme::Http(Http::new(HttpAuthScheme::Basic)),
        );
        c.add_security_scheme(
            "wallet_token",
            SecurityScheme::Http(
                openapi::security::HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some(
                        "A wallet's access token from `POST /issuer/oauth/token` \
                         (grant_type=urn:ietf:params:oauth:grant-type:pre-authorized_code)",
                    ))
                    .build(),
            ),
        );
    }
}

/// The problem answers every management operation can give, added where an operation does not
/// list its own: 400, 401/403 (authenticated calls), 429, 500 and 503.
struct CommonResponses;

impl Modify for CommonResponses {
    fn modify(&self, api: &mut openapi::OpenApi) {
        for (path, item) in api.paths.paths.iter_mut() {
            if !path.starts_with("/issuer/api/v1/") {
                continue;
            }
            for op in [
                &mut item.get,
                &mut item.post,
                &mut item.put,
                &mut item.patch,
                &mut item.delete,
            ]
            .into_iter()
            .flatten()
            {
                let mut add = |code: &str, description: &str| {
                    op.responses
                        .responses
                        .entry(code.to_owned())
                        .or_insert_with(|| {
                            ResponseBuilder::new()
                                .description(description)
                                .content(
                                    "application/problem+json",
                                    Content::new(Some(Ref::from_schema_name("Problem"))),
                                )
                                .build()
                                .into()
                        });
                };
                add(
                    "400",
                    "`invalid_request`, with the offending fields in `errors`",
                );
                add(
                    "401",
                    "`invalid_token`: missing, expired or invalid access token (`WWW-Authenticate`)",
                );
                add(
                    "403",
                    "`insufficient_scope` (`WWW-Authenticate` names the scope)",
                );
                add(
                    "429",
                    "`rate_limited`: the API client's budget is spent; retry after `Retry-After` \
                     (`RateLimit-Policy` and `RateLimit` describe the budget on every answer)",
                );
                add("500", "`internal`");
                add(
                    "503",
                    "`unavailable`: the database cannot be reached; retry after `Retry-After`",
                );
            }
        }
    }
}

/// The optional body of a revoke, suspend or reinstate call.
#[derive(ToSchema)]
pub struct StatusChange {
    /// Why, in the caller's words (at most 200 characters); recorded with the event and sent
    /// with the webhook.
    reason: Option<String>,
}

/// An error (RFC 9457 problem details).
#[derive(ToSchema)]
pub struct Problem {
    /// `urn:issuer:problem:{code}`.
    #[serde(rename = "type")]
    kind: String,
    title: String,
    status: u16,
    detail: String,
    code: ErrorCode,
    /// Field violations of an `invalid_request`.
    #[serde(skip_serializing_if = "Option::is_none")]
    errors: Option<Vec<FieldViolation>>,
}

/// One invalid field of a request.
#[derive(ToSchema)]
pub struct FieldViolation {
    /// JSON path of the field, e.g. `payload.mandatee.email`.
    field: String,
    message: String,
}

/// Machine-readable error codes (the same set over gRPC as `ErrorInfo.reason`), listed from
/// the domain's own [`issuer_domain::ErrorCode::ALL`].
pub struct ErrorCode;

impl utoipa::PartialSchema for ErrorCode {
    fn schema() -> openapi::RefOr<openapi::schema::Schema> {
        openapi::ObjectBuilder::new()
            .schema_type(openapi::schema::Type::String)
            .description(Some(
                "Machine-readable error code (the same set over gRPC as `ErrorInfo.reason`)",
            ))
            .enum_values(Some(
                issuer_domain::ErrorCode::ALL.map(issuer_domain::ErrorCode::as_str),
            ))
            .into()
    }
}

impl ToSchema for ErrorCode {}

pub use crate::view::schema::{DeliveryMethod, EmailState, IssuanceStatus};

/// A create request. `payload` is validated against the credential configuration's schema
/// (see `GET /issuer/.well-known/openid-credential-issuer`); unknown fields are refused.
#[derive(ToSchema)]
pub struct CreateIssuanceRequest {
    /// Idempotency key, unique per tenant: 1 to 255 printable ASCII characters.
    #[schema(min_length = 1, max_length = 255)]
    client_request_id: String,
    /// e.g. `learcredential.employee.sd.1`.
    credential_configuration_id: String,
    /// The credential's claims.
    #[schema(value_type = Object)]
    payload: serde_json::Value,
    /// How the offer reaches the recipient (default `none`).
    delivery: Option<DeliveryMethod>,
    /// The recipient's address; required with `delivery: email`.
    email: Option<String>,
    /// Only `urn:ietf:params:oauth:grant-type:pre-authorized_code` (the default).
    grant_type: Option<String>,
    /// Offer lifetime in seconds, up to the tenant's maximum (default: the tenant's, 24 h).
    #[schema(minimum = 1)]
    expires_in: Option<i64>,
    /// Whether the wallet must also present a transaction code (returned once, in the answer).
    tx_code: Option<bool>,
}

/// A created (or replayed) issuance; `tx_code` only when one was asked for, and only in the
/// answer that created it.
#[derive(ToSchema)]
pub struct IssuanceCreated {
    #[serde(flatten)]
    issuance: IssuanceView,
    #[serde(skip_serializing_if = "Option::is_none")]
    tx_code: Option<String>,
}

/// A batch create: 1 to `ISSUER_BATCH_MAX_ITEMS` create bodies.
#[derive(ToSchema)]
pub struct BatchCreateRequest {
    issuances: Vec<CreateIssuanceRequest>,
}

/// The answer to every item of a batch create, in input order.
#[derive(ToSchema)]
pub struct BatchCreateResponse {
    /// Recorded on every issuance the batch created; `GET /issuer/api/v1/issuances?batch_id=`.
    batch_id: String,
    results: Vec<BatchItemResult>,
}

/// The answer to one item: what its own create would have answered.
#[derive(ToSchema)]
pub struct BatchItemResult {
    /// The item's position in `issuances`, from 0.
    index: usize,
    /// The HTTP status of the item's own create: 201 created, 200 replay, 400, 422, ...
    status: u16,
    /// With 201 and 200: the issuance, `tx_code` only when created now.
    #[serde(skip_serializing_if = "Option::is_none")]
    issuance: Option<IssuanceCreated>,
    /// Otherwise: the problem the item's own create would have answered.
    #[serde(skip_serializing_if = "Option::is_none")]
    problem: Option<Problem>,
}

/// A page of issuances, newest first.
#[derive(ToSchema)]
pub struct IssuanceList {
    issuances: Vec<IssuanceView>,
    /// Pass as `page_token` for the next page; `null` on the last.
    next_page_token: Option<String>,
}

/// An issuance's history.
#[derive(ToSchema)]
pub struct EventList {
    events: Vec<EventView>,
}

#[derive(ToSchema)]
pub enum QrFormat {
    #[serde(rename = "png")]
    Png,
    #[serde(rename = "svg")]
    Svg,
}

// The webhook bodies are the use cases' own types: the document cannot drift from them.
pub use crate::webhooks::{
    CreateEndpoint as CreateWebhookEndpoint, DeliveryList as WebhookDeliveryList,
    DeliveryStateSchema as DeliveryState, DeliveryView as WebhookDelivery,
    EndpointList as WebhookEndpointList, EndpointView as WebhookEndpoint,
    EndpointWithSecret as WebhookEndpointWithSecret, RotateSecret,
    UpdateEndpoint as UpdateWebhookEndpoint, WebhookEventType,
};

/// The token request (`application/x-www-form-urlencoded`).
#[derive(ToSchema)]
pub struct TokenRequest {
    /// `client_credentials` (backends) or
    /// `urn:ietf:params:oauth:grant-type:pre-authorized_code` (wallets).
    grant_type: String,
    /// `client_secret_post`; otherwise HTTP Basic.
    client_id: Option<String>,
    client_secret: Option<String>,
    /// Space-separated subset of the client's scopes.
    scope: Option<String>,
    /// The offer's pre-authorized code.
    #[serde(rename = "pre-authorized_code")]
    pre_authorized_code: Option<String>,
    /// The transaction code, when the offer asks for one.
    tx_code: Option<String>,
}

#[derive(ToSchema)]
pub struct TokenResponse {
    access_token: String,
    /// `Bearer`.
    token_type: String,
    expires_in: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    scope: Option<String>,
}

/// An OAuth 2.0 (RFC 6749 §5.2) or OID4VCI error.
#[derive(ToSchema)]
pub struct OAuthError {
    error: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    error_description: Option<String>,
}

#[derive(ToSchema)]
pub struct NonceResponse {
    c_nonce: String,
}

#[derive(ToSchema)]
pub struct Health {
    status: String,
}

#[derive(ToSchema)]
pub struct Readiness {
    /// `ok`, `degraded` (Redis down), `unavailable` (database down) or `stopping`.
    status: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    database: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    redis: Option<String>,
}
