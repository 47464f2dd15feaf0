//! Machine-to-machine authentication (DESIGN §3, §4, §12): the client-credentials token endpoint
//! with RFC 6749 §5.2 errors, the published JWKS, RFC 9068 access tokens, and how the management
//! API over REST and gRPC treats missing, forged and foreign tokens, scopes and tenants.

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use chrono::Utc;
use issuer::grpc::pb;
use issuer_domain::model::Scope;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use reqwest::{Response, StatusCode, header};
use serde_json::{Value, json};
use tonic::Code;

use crate::helpers::{
    Creds, TestApp, TestDb, authed, create_body, create_request_pb, pg_settings, redis_url,
    shared_keys,
};

const TOKEN_PATH: &str = "/issuer/oauth/token";

async fn spawn() -> (TestDb, TestApp) {
    let db = TestDb::new().await;
    let app = TestApp::spawn(pg_settings(&db.url, Some(&redis_url()))).await;
    (db, app)
}

async fn json_of(res: Response) -> Value {
    let text = res.text().await.unwrap();
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

fn header_of(res: &Response, name: header::HeaderName) -> Option<String> {
    res.headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
}

async fn token_request(
    app: &TestApp,
    form: &[(&str, &str)],
    basic: Option<(&str, &str)>,
) -> Response {
    let mut req = app.http.post(app.url(TOKEN_PATH)).form(form);
    if let Some((id, secret)) = basic {
        req = req.basic_auth(id, Some(secret));
    }
    req.send().await.unwrap()
}

/// An RFC 6749 §5.2 error response: status, JSON `error`, `Cache-Control: no-store`. Returns
/// its `WWW-Authenticate` header.
async fn assert_oauth_error(res: Response, status: StatusCode, error: &str) -> Option<String> {
    assert_eq!(res.status(), status, "expected {error}");
    assert_eq!(
        header_of(&res, header::CACHE_CONTROL).as_deref(),
        Some("no-store"),
        "{error} must not be cached"
    );
    assert!(
        header_of(&res, header::CONTENT_TYPE).is_some_and(|c| c.starts_with("application/json")),
        "{error}: content type {:?}",
        header_of(&res, header::CONTENT_TYPE)
    );
    let www = header_of(&res, header::WWW_AUTHENTICATE);
    let body = json_of(res).await;
    assert_eq!(body["error"], error, "{body}");
    assert!(body.get("access_token").is_none(), "{body}");
    www
}

fn decode_segment(token: &str, n: usize) -> Value {
    let part = token.split('.').nth(n).expect("JWT segment");
    serde_json::from_slice(&URL_SAFE_NO_PAD.decode(part).unwrap()).unwrap()
}

// ---------------------------------------------------------------------------------------------
// C. The token endpoint, the JWKS, the access token
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_wrong_secret_is_invalid_client() {
    let (_db, app) = spawn().await;
    let creds = app.provision(&Scope::ALL).await;
    let wrong = format!("{}x", creds.client_secret);
    let res = token_request(
        &app,
        &[("grant_type", "client_credentials")],
        Some((&creds.client_id, &wrong)),
    )
    .await;
    let www = assert_oauth_error(res, StatusCode::UNAUTHORIZED, "invalid_client").await;
    assert!(www.is_some(), "401 without WWW-Authenticate");

    // The same through client_secret_post.
    let res = token_request(
        &app,
        &[
            ("grant_type", "client_credentials"),
            ("client_id", &creds.client_id),
            ("client_secret", &wrong),
        ],
        None,
    )
    .await;
    let www = assert_oauth_error(res, StatusCode::UNAUTHORIZED, "invalid_client").await;
    assert!(www.is_some(), "401 without WWW-Authenticate");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_unknown_client_is_invalid_client() {
    let (_db, app) = spawn().await;
    let creds = app.provision(&Scope::ALL).await;
    let res = token_request(
        &app,
        &[("grant_type", "client_credentials")],
        Some(("no-such-client", &creds.client_secret)),
    )
    .await;
    let www = assert_oauth_error(res, StatusCode::UNAUTHORIZED, "invalid_client").await;
    assert!(www.is_some(), "401 without WWW-Authenticate");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_without_client_credentials_is_invalid_client() {
    let (_db, app) = spawn().await;
    app.provision(&Scope::ALL).await;
    let res = token_request(&app, &[("grant_type", "client_credentials")], None).await;
    let www = assert_oauth_error(res, StatusCode::UNAUTHORIZED, "invalid_client")
        .await
        .expect("WWW-Authenticate");
    assert!(www.starts_with("Basic"), "{www}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_password_grant_is_unsupported_grant_type() {
    let (_db, app) = spawn().await;
    let creds = app.provision(&Scope::ALL).await;
    let res = token_request(
        &app,
        &[
            ("grant_type", "password"),
            ("username", "u"),
            ("password", "p"),
        ],
        Some((&creds.client_id, &creds.client_secret)),
    )
    .await;
    assert_oauth_error(res, StatusCode::BAD_REQUEST, "unsupported_grant_type").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_missing_grant_type_is_invalid_request() {
    let (_db, app) = spawn().await;
    let creds = app.provision(&Scope::ALL).await;
    let res = token_request(
        &app,
        &[("scope", "issuance:read")],
        Some((&creds.client_id, &creds.client_secret)),
    )
    .await;
    assert_oauth_error(res, StatusCode::BAD_REQUEST, "invalid_request").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_scope_not_granted_is_invalid_scope() {
    let (_db, app) = spawn().await;
    let creds = app.provision(&[Scope::IssuanceRead]).await;
    for scope in ["issuance:write", "issuance:read issuance:write"] {
        let res = token_request(
            &app,
            &[("grant_type", "client_credentials"), ("scope", scope)],
            Some((&creds.client_id, &creds.client_secret)),
        )
        .await;
        assert_oauth_error(res, StatusCode::BAD_REQUEST, "invalid_scope").await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_unknown_scope_is_invalid_scope() {
    let (_db, app) = spawn().await;
    let creds = app.provision(&Scope::ALL).await;
    let res = token_request(
        &app,
        &[("grant_type", "client_credentials"), ("scope", "admin")],
        Some((&creds.client_id, &creds.client_secret)),
    )
    .await;
    assert_oauth_error(res, StatusCode::BAD_REQUEST, "invalid_scope").await;
}

/// A successful token response per RFC 6749 §5.1; returns the token.
async fn assert_token_success(res: Response) -> (String, Value) {
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(
        header_of(&res, header::CACHE_CONTROL).as_deref(),
        Some("no-store")
    );
    let body = json_of(res).await;
    assert_eq!(body["token_type"], "Bearer", "{body}");
    let expires_in = body["expires_in"].as_i64().expect("expires_in is a number");
    assert!((300..=900).contains(&expires_in), "expires_in {expires_in}");
    assert!(body.get("refresh_token").is_none(), "{body}");
    let token = body["access_token"]
        .as_str()
        .filter(|t| !t.is_empty())
        .expect("access_token")
        .to_owned();
    (token, body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_client_secret_basic_succeeds() {
    let (_db, app) = spawn().await;
    let creds = app.provision(&Scope::ALL).await;
    let res = token_request(
        &app,
        &[("grant_type", "client_credentials")],
        Some((&creds.client_id, &creds.client_secret)),
    )
    .await;
    let (token, body) = assert_token_success(res).await;
    let scopes: Vec<&str> = body["scope"].as_str().unwrap().split(' ').collect();
    assert_eq!(scopes.len(), 3, "{body}");
    for s in ["issuance:write", "issuance:read", "webhooks:manage"] {
        assert!(scopes.contains(&s), "{body}");
    }
    // The token works.
    let res = app
        .http
        .get(app.url("/issuer/api/v1/issuances"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_client_secret_post_succeeds() {
    let (_db, app) = spawn().await;
    let creds = app.provision(&Scope::ALL).await;
    let res = token_request(
        &app,
        &[
            ("grant_type", "client_credentials"),
            ("client_id", &creds.client_id),
            ("client_secret", &creds.client_secret),
        ],
        None,
    )
    .await;
    let (token, _) = assert_token_success(res).await;
    let res = app.create_rest(&token, &create_body("post-auth-1")).await;
    assert_eq!(res.status(), StatusCode::CREATED);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_for_a_subset_scope_carries_only_that_scope() {
    let (_db, app) = spawn().await;
    let creds = app.provision(&Scope::ALL).await;
    let res = token_request(
        &app,
        &[
            ("grant_type", "client_credentials"),
            ("scope", "issuance:read"),
        ],
        Some((&creds.client_id, &creds.client_secret)),
    )
    .await;
    let (token, body) = assert_token_success(res).await;
    assert_eq!(body["scope"], "issuance:read");
    assert_eq!(decode_segment(&token, 1)["scope"], "issuance:read");

    // Reading works, creating needs the scope the token lacks.
    let res = app
        .http
        .get(app.url("/issuer/api/v1/issuances"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    let res = app.create_rest(&token, &create_body("subset-1")).await;
    assert_eq!(res.status(), StatusCode::FORBIDDEN);
    assert_eq!(json_of(res).await["code"], "insufficient_scope");
    assert_eq!(app.count_issuances(&creds).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_token_is_an_es256_at_jwt() {
    let (_db, app) = spawn().await;
    let (creds, token) = app.tenant_token().await;
    let header = jsonwebtoken::decode_header(&token).unwrap();
    assert_eq!(header.alg, Algorithm::ES256);
    assert_eq!(header.typ.as_deref(), Some("at+jwt"));
    let kid = header.kid.expect("kid");
    assert_eq!(
        kid,
        issuer_auth::SigningKey::from_pem(shared_keys().0)
            .unwrap()
            .kid()
    );

    let claims = decode_segment(&token, 1);
    assert_eq!(claims["iss"], format!("{}/issuer", app.base));
    assert_eq!(claims["aud"], format!("{}/issuer/api", app.base));
    assert_eq!(claims["client_id"], creds.client_id.as_str());
    assert_eq!(claims["tenant_id"], creds.tenant_id.as_str());
    let (iat, exp) = (
        claims["iat"].as_i64().unwrap(),
        claims["exp"].as_i64().unwrap(),
    );
    assert!((300..=900).contains(&(exp - iat)), "lifetime {}", exp - iat);
    assert!(claims["jti"].as_str().is_some_and(|j| !j.is_empty()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwks_publishes_the_p256_key_that_verifies_tokens() {
    let (_db, app) = spawn().await;
    let (_creds, token) = app.tenant_token().await;
    let res = app
        .http
        .get(app.url("/issuer/oauth/jwks"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    let jwks = json_of(res).await;
    let kid = jsonwebtoken::decode_header(&token).unwrap().kid.unwrap();
    let key = jwks["keys"]
        .as_array()
        .expect("keys[]")
        .iter()
        .find(|k| k["kid"] == kid.as_str())
        .unwrap_or_else(|| panic!("no key with kid {kid} in {jwks}"));
    assert_eq!(key["kty"], "EC");
    assert_eq!(key["crv"], "P-256");
    assert!(key.get("d").is_none(), "the JWKS leaks the private key");

    // The published key verifies the token, with the documented issuer and audience.
    let dk =
        DecodingKey::from_ec_components(key["x"].as_str().unwrap(), key["y"].as_str().unwrap())
            .unwrap();
    let mut v = Validation::new(Algorithm::ES256);
    v.set_issuer(&[format!("{}/issuer", app.base)]);
    v.set_audience(&[format!("{}/issuer/api", app.base)]);
    jsonwebtoken::decode::<Value>(&token, &dk, &v).expect("the JWKS key verifies the token");
}

// ---------------------------------------------------------------------------------------------
// D. Bad tokens, scopes and tenants on the management API
// ---------------------------------------------------------------------------------------------

/// Claims like the service's own, for `creds`' tenant, valid now.
fn claims(app: &TestApp, creds: &Creds) -> Value {
    let now = Utc::now().timestamp();
    json!({
        "iss": format!("{}/issuer", app.base),
        "aud": format!("{}/issuer/api", app.base),
        "sub": creds.client_id,
        "client_id": creds.client_id,
        "scope": "issuance:write issuance:read",
        "tenant_id": creds.tenant_id,
        "exp": now + 300,
        "iat": now,
        "nbf": now,
        "jti": uuid::Uuid::new_v4().to_string(),
    })
}

fn real_key() -> issuer_auth::SigningKey {
    issuer_auth::SigningKey::from_pem(shared_keys().0).unwrap()
}

fn at_jwt_header(alg: Algorithm, kid: &str) -> Header {
    let mut h = Header::new(alg);
    h.typ = Some("at+jwt".into());
    h.kid = Some(kid.to_owned());
    h
}

/// Signs `claims` with the service's real signing key and kid.
fn forge(claims: &Value) -> String {
    let pem = shared_keys().0;
    let key = EncodingKey::from_ec_pem(pem.as_bytes()).unwrap();
    jsonwebtoken::encode(
        &at_jwt_header(Algorithm::ES256, real_key().kid()),
        claims,
        &key,
    )
    .unwrap()
}

/// A tenant with every scope, one issuance created with a real token, and that token.
async fn tenant_with_issuance(app: &TestApp) -> (Creds, String, String) {
    let (creds, token) = app.tenant_token().await;
    let res = app.create_rest(&token, &create_body("existing-1")).await;
    assert_eq!(res.status(), StatusCode::CREATED);
    let id = json_of(res).await["issuance_id"]
        .as_str()
        .unwrap()
        .to_owned();
    (creds, token, id)
}

fn grpc_request<T>(token: Option<&str>, msg: T) -> tonic::Request<T> {
    match token {
        Some(t) => authed(t, msg),
        None => tonic::Request::new(msg),
    }
}

/// Every management call with `token` (or none) is refused as unauthenticated, and nothing is
/// written. `id` is an existing issuance of `creds`' tenant, so a 404 would be a leak.
async fn assert_token_refused(
    app: &TestApp,
    creds: &Creds,
    id: &str,
    token: Option<&str>,
    what: &str,
) {
    let with = |req: reqwest::RequestBuilder| match token {
        Some(t) => req.bearer_auth(t),
        None => req,
    };
    let calls = [
        (
            "GET one",
            with(
                app.http
                    .get(app.url(&format!("/issuer/api/v1/issuances/{id}"))),
            ),
        ),
        (
            "GET list",
            with(app.http.get(app.url("/issuer/api/v1/issuances"))),
        ),
        (
            "POST",
            with(app.http.post(app.url("/issuer/api/v1/issuances")))
                .json(&create_body(&format!("refused-{what}"))),
        ),
    ];
    for (call, req) in calls {
        let res = req.send().await.unwrap();
        assert_eq!(
            res.status(),
            StatusCode::UNAUTHORIZED,
            "{what}: REST {call}"
        );
        assert_eq!(
            header_of(&res, header::CONTENT_TYPE).as_deref(),
            Some("application/problem+json"),
            "{what}: REST {call}"
        );
        let www = header_of(&res, header::WWW_AUTHENTICATE)
            .unwrap_or_else(|| panic!("{what}: REST {call}: no WWW-Authenticate"));
        assert!(www.starts_with("Bearer"), "{what}: {www}");
        assert!(www.contains(r#"error="invalid_token""#), "{what}: {www}");
        let body = json_of(res).await;
        assert_eq!(body["code"], "invalid_token", "{what}: REST {call}: {body}");
        assert_eq!(body["status"], 401);
    }

    let mut grpc = app.grpc().await;
    let err = grpc
        .get_issuance(grpc_request(
            token,
            pb::GetIssuanceRequest {
                issuance_id: id.to_owned(),
            },
        ))
        .await
        .expect_err("GetIssuance is refused");
    assert_eq!(
        err.code(),
        Code::Unauthenticated,
        "{what}: GetIssuance {err:?}"
    );
    let err = grpc
        .create_issuance(grpc_request(
            token,
            create_request_pb(&create_body(&format!("refused-grpc-{what}"))),
        ))
        .await
        .expect_err("CreateIssuance is refused");
    assert_eq!(
        err.code(),
        Code::Unauthenticated,
        "{what}: CreateIssuance {err:?}"
    );
    let err = grpc
        .list_issuances(grpc_request(token, pb::ListIssuancesRequest::default()))
        .await
        .expect_err("ListIssuances is refused");
    assert_eq!(
        err.code(),
        Code::Unauthenticated,
        "{what}: ListIssuances {err:?}"
    );

    assert_eq!(
        app.count_issuances(creds).await,
        1,
        "{what}: a refused create wrote"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn management_calls_without_a_token_are_unauthenticated() {
    let (_db, app) = spawn().await;
    let (creds, _token, id) = tenant_with_issuance(&app).await;
    assert_token_refused(&app, &creds, &id, None, "no token").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn management_calls_with_a_garbage_token_are_unauthenticated() {
    let (_db, app) = spawn().await;
    let (creds, _token, id) = tenant_with_issuance(&app).await;
    assert_token_refused(&app, &creds, &id, Some("garbage"), "garbage").await;
    assert_token_refused(&app, &creds, &id, Some("e30.e30.e30"), "garbage-jwt").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn management_calls_with_an_expired_token_are_unauthenticated() {
    let (_db, app) = spawn().await;
    let (creds, _token, id) = tenant_with_issuance(&app).await;
    let mut c = claims(&app, &creds);
    let now = Utc::now().timestamp();
    c["iat"] = json!(now - 1200);
    c["nbf"] = json!(now - 1200);
    c["exp"] = json!(now - 600);
    assert_token_refused(&app, &creds, &id, Some(&forge(&c)), "expired").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn management_calls_with_a_not_yet_valid_token_are_unauthenticated() {
    let (_db, app) = spawn().await;
    let (creds, _token, id) = tenant_with_issuance(&app).await;
    let mut c = claims(&app, &creds);
    let now = Utc::now().timestamp();
    c["nbf"] = json!(now + 600);
    c["exp"] = json!(now + 900);
    assert_token_refused(&app, &creds, &id, Some(&forge(&c)), "nbf-future").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn management_calls_with_a_wrong_audience_are_unauthenticated() {
    let (_db, app) = spawn().await;
    let (creds, _token, id) = tenant_with_issuance(&app).await;
    for aud in [
        format!("{}/issuer", app.base),
        format!("{}/issuer/api/", app.base),
        "https://other.example/issuer/api".to_owned(),
    ] {
        let mut c = claims(&app, &creds);
        c["aud"] = json!(aud);
        assert_token_refused(&app, &creds, &id, Some(&forge(&c)), &format!("aud {aud}")).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn management_calls_with_a_wrong_issuer_are_unauthenticated() {
    let (_db, app) = spawn().await;
    let (creds, _token, id) = tenant_with_issuance(&app).await;
    for iss in [
        format!("{}/issuer/", app.base),
        app.base.clone(),
        "https://evil.example/issuer".to_owned(),
    ] {
        let mut c = claims(&app, &creds);
        c["iss"] = json!(iss);
        assert_token_refused(&app, &creds, &id, Some(&forge(&c)), &format!("iss {iss}")).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn management_calls_with_an_alg_none_token_are_unauthenticated() {
    let (_db, app) = spawn().await;
    let (creds, _token, id) = tenant_with_issuance(&app).await;
    let c = claims(&app, &creds);
    for alg in ["none", "None", "NONE"] {
        let header = json!({"alg": alg, "typ": "at+jwt", "kid": real_key().kid()});
        let token = format!(
            "{}.{}.",
            URL_SAFE_NO_PAD.encode(header.to_string()),
            URL_SAFE_NO_PAD.encode(c.to_string())
        );
        assert_token_refused(&app, &creds, &id, Some(&token), &format!("alg {alg}")).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn management_calls_with_hs256_signed_by_the_public_key_are_unauthenticated() {
    let (_db, app) = spawn().await;
    let (creds, _token, id) = tenant_with_issuance(&app).await;
    let jwks_text = app
        .http
        .get(app.url("/issuer/oauth/jwks"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let jwks: Value = serde_json::from_str(&jwks_text).unwrap();
    let kid = real_key().kid().to_owned();
    let jwk = jwks["keys"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["kid"] == kid.as_str())
        .unwrap()
        .clone();
    let x = URL_SAFE_NO_PAD.decode(jwk["x"].as_str().unwrap()).unwrap();
    let y = URL_SAFE_NO_PAD.decode(jwk["y"].as_str().unwrap()).unwrap();
    let sec1: Vec<u8> = [&[4u8][..], &x, &y].concat();
    let secrets: [(&str, Vec<u8>); 4] = [
        ("sec1 point", sec1),
        ("x||y", [x.clone(), y.clone()].concat()),
        ("jwk json", jwk.to_string().into_bytes()),
        ("jwks document", jwks_text.into_bytes()),
    ];
    let c = claims(&app, &creds);
    for (name, secret) in secrets {
        let token = jsonwebtoken::encode(
            &at_jwt_header(Algorithm::HS256, &kid),
            &c,
            &EncodingKey::from_secret(&secret),
        )
        .unwrap();
        assert_token_refused(&app, &creds, &id, Some(&token), &format!("hs256 {name}")).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn management_calls_with_an_unknown_kid_are_unauthenticated() {
    let (_db, app) = spawn().await;
    let (creds, _token, id) = tenant_with_issuance(&app).await;
    let stranger = issuer_auth::SigningKey::generate();
    let c = claims(&app, &creds);
    let token = jsonwebtoken::encode(
        &at_jwt_header(Algorithm::ES256, stranger.kid()),
        &c,
        &stranger.encoding_key(),
    )
    .unwrap();
    assert_token_refused(&app, &creds, &id, Some(&token), "unknown kid").await;

    // A foreign key that claims the real kid fails on the signature.
    let token = jsonwebtoken::encode(
        &at_jwt_header(Algorithm::ES256, real_key().kid()),
        &c,
        &stranger.encoding_key(),
    )
    .unwrap();
    assert_token_refused(&app, &creds, &id, Some(&token), "foreign key, real kid").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn management_calls_with_a_token_not_typed_at_jwt_are_unauthenticated() {
    let (_db, app) = spawn().await;
    let (creds, _token, id) = tenant_with_issuance(&app).await;
    let pem = shared_keys().0;
    let key = EncodingKey::from_ec_pem(pem.as_bytes()).unwrap();
    for typ in [Some("JWT"), None] {
        let mut h = at_jwt_header(Algorithm::ES256, real_key().kid());
        h.typ = typ.map(str::to_owned);
        let token = jsonwebtoken::encode(&h, &claims(&app, &creds), &key).unwrap();
        assert_token_refused(&app, &creds, &id, Some(&token), &format!("typ {typ:?}")).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn management_calls_with_a_tampered_token_are_unauthenticated() {
    let (_db, app) = spawn().await;
    let (creds, token, id) = tenant_with_issuance(&app).await;
    // Same signature, claims widened to another tenant.
    let mut c = decode_segment(&token, 1);
    c["tenant_id"] = json!(uuid::Uuid::now_v7().to_string());
    let parts: Vec<&str> = token.split('.').collect();
    let tampered = format!(
        "{}.{}.{}",
        parts[0],
        URL_SAFE_NO_PAD.encode(c.to_string()),
        parts[2]
    );
    assert_token_refused(&app, &creds, &id, Some(&tampered), "tampered").await;
}

/// The control for the forged-token tests: the same forging with correct claims is accepted,
/// so the refusals above are about the claims, not the forging.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_token_with_correct_claims_is_accepted() {
    let (_db, app) = spawn().await;
    let (creds, _token, id) = tenant_with_issuance(&app).await;
    let token = forge(&claims(&app, &creds));

    let res = app.get_rest(&token, &id).await;
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(json_of(res).await["issuance_id"], id.as_str());
    let res = app.create_rest(&token, &create_body("forged-ok-1")).await;
    assert_eq!(res.status(), StatusCode::CREATED);

    let mut grpc = app.grpc().await;
    let got = grpc
        .get_issuance(authed(
            &token,
            pb::GetIssuanceRequest {
                issuance_id: id.clone(),
            },
        ))
        .await
        .expect("GetIssuance with a correctly forged token")
        .into_inner();
    assert_eq!(got.issuance_id, id);
    grpc.create_issuance(authed(
        &token,
        create_request_pb(&create_body("forged-ok-2")),
    ))
    .await
    .expect("CreateIssuance with a correctly forged token");
    assert_eq!(app.count_issuances(&creds).await, 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_without_write_scope_is_insufficient_scope() {
    let (_db, app) = spawn().await;
    let creds = app.provision(&[Scope::IssuanceRead]).await;
    let token = app.token(&creds).await;

    let res = app.create_rest(&token, &create_body("no-scope-1")).await;
    assert_eq!(res.status(), StatusCode::FORBIDDEN);
    assert_eq!(
        header_of(&res, header::CONTENT_TYPE).as_deref(),
        Some("application/problem+json")
    );
    let www = header_of(&res, header::WWW_AUTHENTICATE).expect("WWW-Authenticate");
    assert!(www.starts_with("Bearer"), "{www}");
    assert!(www.contains(r#"error="insufficient_scope""#), "{www}");
    assert!(www.contains(r#"scope="issuance:write""#), "{www}");
    let body = json_of(res).await;
    assert_eq!(body["code"], "insufficient_scope", "{body}");
    assert_eq!(body["status"], 403);

    let mut grpc = app.grpc().await;
    let err = grpc
        .create_issuance(authed(
            &token,
            create_request_pb(&create_body("no-scope-2")),
        ))
        .await
        .expect_err("CreateIssuance needs issuance:write");
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    assert_eq!(app.count_issuances(&creds).await, 0);

    // The scope it has still works.
    let res = app
        .http
        .get(app.url("/issuer/api/v1/issuances"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_without_read_scope_is_insufficient_scope() {
    let (_db, app) = spawn().await;
    let (_owner, _owner_token, id) = tenant_with_issuance(&app).await;
    let creds = app.provision(&[Scope::IssuanceWrite]).await;
    let token = app.token(&creds).await;
    let res = app.get_rest(&token, &id).await;
    assert_eq!(res.status(), StatusCode::FORBIDDEN);
    assert_eq!(json_of(res).await["code"], "insufficient_scope");
    let mut grpc = app.grpc().await;
    let err = grpc
        .get_issuance(authed(&token, pb::GetIssuanceRequest { issuance_id: id }))
        .await
        .expect_err("GetIssuance needs issuance:read");
    assert_eq!(err.code(), Code::PermissionDenied);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_tenants_issuance_is_indistinguishable_from_a_missing_one() {
    let (_db, app) = spawn().await;
    let (_owner, owner_token, id) = tenant_with_issuance(&app).await;
    let (intruder, token) = app.tenant_token().await;
    let unknown = uuid::Uuid::now_v7().to_string();

    // REST: the same 404 body, byte for byte.
    let foreign = app.get_rest(&token, &id).await;
    let missing = app.get_rest(&token, &unknown).await;
    assert_eq!(foreign.status(), StatusCode::NOT_FOUND);
    assert_eq!(missing.status(), StatusCode::NOT_FOUND);
    assert_eq!(
        header_of(&foreign, header::CONTENT_TYPE),
        header_of(&missing, header::CONTENT_TYPE)
    );
    let foreign = foreign.text().await.unwrap();
    let missing = missing.text().await.unwrap();
    assert_eq!(foreign, missing);
    let body: Value = serde_json::from_str(&foreign).unwrap();
    assert_eq!(body["code"], "not_found");
    assert!(
        !foreign.contains(&id),
        "the 404 names the issuance: {foreign}"
    );

    // gRPC: the same status and message.
    let mut grpc = app.grpc().await;
    let get = |issuance_id: &str| {
        authed(
            &token,
            pb::GetIssuanceRequest {
                issuance_id: issuance_id.to_owned(),
            },
        )
    };
    let foreign = grpc.get_issuance(get(&id)).await.expect_err("foreign");
    let missing = grpc.get_issuance(get(&unknown)).await.expect_err("missing");
    assert_eq!(foreign.code(), Code::NotFound);
    assert_eq!(missing.code(), Code::NotFound);
    assert_eq!(foreign.message(), missing.message());
    assert_eq!(foreign.details(), missing.details());

    // Lists: the intruder sees nothing of it.
    let res = app
        .http
        .get(app.url("/issuer/api/v1/issuances"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    let list = json_of(res).await;
    assert_eq!(list["issuances"], json!([]), "{list}");
    let res = app
        .http
        .get(app.url("/issuer/api/v1/issuances?client_request_id=existing-1"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(json_of(res).await["issuances"], json!([]));
    let list = grpc
        .list_issuances(authed(&token, pb::ListIssuancesRequest::default()))
        .await
        .unwrap()
        .into_inner();
    assert!(list.issuances.is_empty());
    assert_eq!(app.count_issuances(&intruder).await, 0);

    // The owner still sees it (the control).
    let res = app.get_rest(&owner_token, &id).await;
    assert_eq!(res.status(), StatusCode::OK);
    let owner_list = grpc
        .list_issuances(authed(&owner_token, pb::ListIssuancesRequest::default()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(owner_list.issuances.len(), 1);
    assert_eq!(owner_list.issuances[0].issuance_id, id);
}
