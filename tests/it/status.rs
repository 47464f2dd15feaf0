//! Credential status after issuance (issue: revocation, suspension, batch copies): the status
//! lists a verifier reads, decoded here by an implementation of draft-ietf-oauth-status-list
//! written from the draft's text; the management calls over REST and gRPC; freshness across
//! replicas; conditional requests; batch credential requests.

use std::{
    collections::HashSet,
    io::Read,
    time::{Duration, Instant},
};

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use issuer::{config::Settings, grpc::pb};
use issuer_domain::model::Scope;
use reqwest::{StatusCode, header};
use serde_json::{Value, json};

use crate::{
    helpers::{TestApp, TestDb, authed, create_body, embedded_settings, pg_settings, redis_url},
    wallet::client::{
        CONFIG_ID, HolderKey, Issuer, discover, expect_error, expect_json, issuer_jwks,
        pre_authorized_code, proof, resolve_offer, verify_sd_jwt,
    },
};

// ---------------------------------------------------------------------------------------------
// A verifier's side, from the draft's text.

/// A Status List Token as a relying party checks it: the signature verifies with a key the
/// issuer publishes for its credentials (by `kid`), `typ` is `statuslist+jwt`, `sub` is the URL
/// it was fetched from, and `exp` is in the future.
fn verified_list(jwt: &str, jwks: &Value, url: &str) -> Value {
    let header = jsonwebtoken::decode_header(jwt).expect("a JWS header");
    assert_eq!(header.typ.as_deref(), Some("statuslist+jwt"), "{header:?}");
    let kid = header.kid.clone().expect("a kid");
    let jwk = jwks["keys"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["kid"] == kid.as_str())
        .unwrap_or_else(|| panic!("kid {kid} is not published in {jwks}"));
    let key =
        jsonwebtoken::DecodingKey::from_jwk(&serde_json::from_value(jwk.clone()).unwrap()).unwrap();
    let mut validation = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::ES256);
    validation.validate_aud = false;
    validation.set_required_spec_claims(&["exp", "sub", "iat"]);
    let claims = jsonwebtoken::decode::<Value>(jwt, &key, &validation)
        .expect("the list's signature verifies with the published key")
        .claims;
    assert_eq!(claims["sub"], url, "{claims}");
    assert!(claims["ttl"].as_u64().is_some(), "{claims}");
    claims
}

/// The statuses of a `status_list` claim: `lst` is base64url of the ZLIB-compressed byte
/// array; with `bits` 2, byte `i / 4` holds status `i` at bits `2 * (i % 4)` from the least
/// significant one.
fn decoded_statuses(status_list: &Value) -> (u32, Vec<u8>) {
    let bits = status_list["bits"].as_u64().unwrap() as u32;
    assert_eq!(bits, 2, "{status_list}");
    let compressed = URL_SAFE_NO_PAD
        .decode(status_list["lst"].as_str().unwrap())
        .expect("lst is base64url");
    let mut bytes = Vec::new();
    flate2::read::ZlibDecoder::new(&compressed[..])
        .read_to_end(&mut bytes)
        .expect("lst is ZLIB");
    let per_byte = 8 / bits;
    let statuses = (0..bytes.len() as u32 * per_byte)
        .map(|i| (bytes[(i / per_byte) as usize] >> (bits * (i % per_byte))) & 0b11)
        .collect();
    (bits, statuses)
}

/// A credential's `status.status_list` reference: `(idx, uri)`.
fn status_ref(signed: &Value) -> (usize, String) {
    let r = &signed["status"]["status_list"];
    (
        r["idx"]
            .as_u64()
            .unwrap_or_else(|| panic!("no idx in {signed}")) as usize,
        r["uri"].as_str().unwrap().to_owned(),
    )
}

/// What the list at `uri` says of entry `idx` now, after verifying it.
async fn status_at(app: &TestApp, jwks: &Value, uri: &str, idx: usize) -> u8 {
    let res = app.http.get(uri).send().await.unwrap();
    assert_eq!(res.status(), 200, "GET {uri}");
    assert_eq!(
        res.headers()[header::CONTENT_TYPE],
        "application/statuslist+jwt"
    );
    let claims = verified_list(&res.text().await.unwrap(), jwks, uri);
    let (_, statuses) = decoded_statuses(&claims["status_list"]);
    statuses[idx]
}

// ---------------------------------------------------------------------------------------------
// The wallet's side.

/// A wallet that redeemed an offer: its issuer and access token.
async fn redeemed(app: &TestApp, token: &str, crid: &str) -> (String, Issuer, String) {
    let created = expect_json(
        app.create_rest(token, &create_body(crid)).await,
        201,
        "create",
    )
    .await;
    let offer = resolve_offer(&app.http, created["credential_offer_uri"].as_str().unwrap()).await;
    let issuer = discover(&app.http, offer["credential_issuer"].as_str().unwrap()).await;
    let access = issuer
        .access_token(&app.http, &pre_authorized_code(&offer))
        .await;
    (
        created["issuance_id"].as_str().unwrap().to_owned(),
        issuer,
        access,
    )
}

/// A credential request with one proof per key, all over one fresh nonce.
async fn batch_request(
    app: &TestApp,
    issuer: &Issuer,
    access: &str,
    keys: &[&HolderKey],
) -> reqwest::Response {
    let nonce = issuer.nonce(&app.http).await;
    let proofs: Vec<String> = keys
        .iter()
        .map(|k| proof(k, &issuer.credential_issuer, &nonce))
        .collect();
    issuer
        .credential_request(
            &app.http,
            access,
            &json!({"credential_configuration_id": CONFIG_ID, "proofs": {"jwt": proofs}}),
        )
        .await
}

/// An accepted issuance with `copies` credentials: its id and each copy's `(idx, uri)`.
async fn accepted_with_copies(
    app: &TestApp,
    token: &str,
    crid: &str,
    copies: usize,
) -> (String, Vec<(usize, String)>) {
    let (id, issuer, access) = redeemed(app, token, crid).await;
    let keys: Vec<HolderKey> = (0..copies).map(|_| HolderKey::generate()).collect();
    let res = batch_request(app, &issuer, &access, &keys.iter().collect::<Vec<_>>()).await;
    let body = expect_json(res, 200, "batch credential request").await;
    let credentials = body["credentials"].as_array().unwrap();
    assert_eq!(credentials.len(), copies, "{body}");
    let jwks = issuer_jwks(&app.http, &issuer.credential_issuer).await;
    let mut cnfs = HashSet::new();
    let mut refs = Vec::new();
    for (c, key) in credentials.iter().zip(&keys) {
        let vc = verify_sd_jwt(c["credential"].as_str().unwrap(), &jwks);
        assert_eq!(
            vc.signed["cnf"]["jwk"]["x"],
            key.jwk()["x"],
            "each copy is bound to its key"
        );
        assert!(
            cnfs.insert(vc.signed["cnf"].to_string()),
            "distinct cnf keys"
        );
        refs.push(status_ref(&vc.signed));
    }
    let distinct: HashSet<_> = refs.iter().collect();
    assert_eq!(distinct.len(), copies, "distinct status entries: {refs:?}");
    (id, refs)
}

async fn post_status(
    app: &TestApp,
    token: &str,
    id: &str,
    action: &str,
    body: Option<Value>,
) -> reqwest::Response {
    let req = app
        .http
        .post(app.url(&format!("/issuer/api/v1/issuances/{id}/{action}")))
        .bearer_auth(token);
    match body {
        Some(b) => req.json(&b),
        None => req,
    }
    .send()
    .await
    .unwrap()
}

// ---------------------------------------------------------------------------------------------

/// The whole story on one backend: three copies from one batch request, each in the list;
/// suspend, reinstate, revoke reach every copy; the calls are idempotent and refused where
/// the rules say; another tenant sees nothing; 304 on `If-None-Match`.
async fn revoke_suspend_reinstate_on(settings: Settings) {
    let app = TestApp::spawn(settings).await;
    let (_, token) = app.tenant_token().await;
    let (id, copies) = accepted_with_copies(&app, &token, "status-1", 3).await;
    let jwks = issuer_jwks(&app.http, &format!("{}/issuer", app.base)).await;
    for (idx, uri) in &copies {
        assert!(
            uri.starts_with(&format!("{}/issuer/status-lists/", app.base)),
            "{uri}"
        );
        assert_eq!(
            status_at(&app, &jwks, uri, *idx).await,
            0,
            "valid after issuance"
        );
    }
    let read = expect_json(app.get_rest(&token, &id).await, 200, "get").await;
    assert_eq!(read["credential_status"], "valid", "{read}");
    assert_eq!(read["credentials_issued"], 3, "{read}");

    for (action, body, word, value) in [
        (
            "suspend",
            Some(json!({"reason": "under review"})),
            "suspended",
            2,
        ),
        ("reinstate", None, "valid", 0),
        (
            "revoke",
            Some(json!({"reason": "left the company"})),
            "revoked",
            1,
        ),
    ] {
        let changed = expect_json(
            post_status(&app, &token, &id, action, body).await,
            200,
            action,
        )
        .await;
        assert_eq!(changed["credential_status"], word, "{changed}");
        assert_eq!(
            changed["status"], "accepted",
            "the issuance's own status stays: {changed}"
        );
        for (idx, uri) in &copies {
            assert_eq!(
                status_at(&app, &jwks, uri, *idx).await,
                value,
                "{action} reaches copy {idx}"
            );
        }
    }
    // Idempotent, and final.
    let again = expect_json(
        post_status(&app, &token, &id, "revoke", None).await,
        200,
        "revoke again",
    )
    .await;
    assert_eq!(again["credential_status"], "revoked");
    for action in ["suspend", "reinstate"] {
        let p = expect_json(
            post_status(&app, &token, &id, action, None).await,
            409,
            action,
        )
        .await;
        assert_eq!(p["code"], "invalid_state", "{p}");
    }
    let kinds: Vec<String> = app.events_rest(&token, &id).await["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["type"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(
        &kinds[kinds.len() - 3..],
        [
            "credential_suspended",
            "credential_reinstated",
            "credential_revoked"
        ],
        "{kinds:?}"
    );

    // A pending issuance has no credential: cancel it instead.
    let pending = expect_json(
        app.create_rest(&token, &create_body("status-2")).await,
        201,
        "create",
    )
    .await;
    let pending_id = pending["issuance_id"].as_str().unwrap();
    let p = expect_json(
        post_status(&app, &token, pending_id, "revoke", None).await,
        409,
        "revoke pending",
    )
    .await;
    assert_eq!(p["code"], "invalid_state", "{p}");
    assert!(p["detail"].as_str().unwrap().contains("cancel"), "{p}");
    // Bad input.
    for body in [
        json!({"reason": 5}),
        json!({"why": "x"}),
        json!({"reason": "x".repeat(201)}),
    ] {
        let p = expect_json(
            post_status(&app, &token, &id, "revoke", Some(body)).await,
            400,
            "bad body",
        )
        .await;
        assert_eq!(p["code"], "invalid_request", "{p}");
    }

    // Another tenant cannot change (or tell apart) the entries: 404 as for any unknown id.
    let (_, other) = app.tenant_token().await;
    let (other_id, other_copies) = accepted_with_copies(&app, &other, "status-1", 1).await;
    for action in ["revoke", "suspend", "reinstate"] {
        let p = expect_json(
            post_status(&app, &other, &id, action, None).await,
            404,
            action,
        )
        .await;
        assert_eq!(p["code"], "not_found", "{p}");
        expect_json(
            post_status(&app, &token, &other_id, action, None).await,
            404,
            action,
        )
        .await;
    }
    let (idx, uri) = &other_copies[0];
    assert_eq!(
        status_at(&app, &jwks, uri, *idx).await,
        0,
        "the other tenant's copy is untouched"
    );
    // A scope of reading only may not change anything.
    let reader = app.provision(&[Scope::IssuanceRead]).await;
    let read_token = app.token(&reader).await;
    expect_json(
        post_status(&app, &read_token, &other_id, "revoke", None).await,
        403,
        "read scope",
    )
    .await;

    // Conditional requests: the tag of what the client holds answers 304.
    let (_, uri) = &copies[0];
    let res = app.http.get(uri).send().await.unwrap();
    let etag = res.headers()[header::ETAG].to_str().unwrap().to_owned();
    assert_eq!(res.headers()[header::CACHE_CONTROL], "public, max-age=300");
    let res = app
        .http
        .get(uri)
        .header(header::IF_NONE_MATCH, &etag)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::NOT_MODIFIED);
    assert_eq!(res.headers()[header::ETAG].to_str().unwrap(), etag);
    assert!(res.bytes().await.unwrap().is_empty());
    let res = app
        .http
        .get(uri)
        .header(header::IF_NONE_MATCH, "W/\"other\"")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    // Unknown lists are 404 in the documented format.
    for bad in ["not-a-uuid", "00000000-0000-4000-8000-000000000000"] {
        let res = app
            .http
            .get(app.url(&format!("/issuer/status-lists/{bad}")))
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 404);
        assert_eq!(
            res.headers()[header::CONTENT_TYPE],
            "application/problem+json"
        );
    }
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn revoke_suspend_and_reinstate_reach_every_copy_on_postgres() {
    let db = TestDb::new().await;
    revoke_suspend_reinstate_on(pg_settings(&db.url, Some(&redis_url()))).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn revoke_suspend_and_reinstate_reach_every_copy_on_the_embedded_default() {
    let dir = tempfile::tempdir().unwrap();
    revoke_suspend_reinstate_on(embedded_settings(dir.path())).await;
}

/// The same calls over gRPC, with the credential status on the message.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn credentials_are_revoked_over_grpc_too() {
    use pb::issuance::CredentialStatus as S;
    let db = TestDb::new().await;
    let app = TestApp::spawn(pg_settings(&db.url, Some(&redis_url()))).await;
    let (_, token) = app.tenant_token().await;
    let (id, copies) = accepted_with_copies(&app, &token, "grpc-status", 2).await;
    let grpc = app.grpc().await;
    // One call by its target status, as the service names it.
    let call = |to: S, reason: &str| {
        let (mut grpc, token, issuance_id, reason) =
            (grpc.clone(), token.clone(), id.clone(), reason.to_owned());
        async move {
            match to {
                S::Suspended => {
                    let req = pb::SuspendCredentialRequest {
                        issuance_id,
                        reason,
                    };
                    grpc.suspend_credential(authed(&token, req)).await
                }
                S::Valid => {
                    let req = pb::ReinstateCredentialRequest {
                        issuance_id,
                        reason,
                    };
                    grpc.reinstate_credential(authed(&token, req)).await
                }
                _ => {
                    let req = pb::RevokeCredentialRequest {
                        issuance_id,
                        reason,
                    };
                    grpc.revoke_credential(authed(&token, req)).await
                }
            }
            .map(tonic::Response::into_inner)
        }
    };
    for (to, reason) in [
        (S::Suspended, "audit"),
        (S::Valid, ""),
        (S::Revoked, "left"),
    ] {
        let changed = call(to, reason).await.unwrap();
        assert_eq!(changed.credential_status(), to);
        assert_eq!(changed.credentials_issued, 2);
    }
    let refused = call(S::Valid, "").await.unwrap_err();
    assert_eq!(
        refused.code(),
        tonic::Code::FailedPrecondition,
        "{refused:?}"
    );
    let jwks = issuer_jwks(&app.http, &format!("{}/issuer", app.base)).await;
    for (idx, uri) in &copies {
        assert_eq!(status_at(&app, &jwks, uri, *idx).await, 1);
    }
    let read = grpc
        .clone()
        .get_issuance(authed(&token, pb::GetIssuanceRequest { issuance_id: id }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(read.credential_status(), S::Revoked);
    app.stop().await;
}

/// Once a revoke call answered on replica A, replica B serves a list showing it within 1 s,
/// though B had the list cached before.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_revocation_on_one_replica_is_served_by_another_within_a_second() {
    let db = TestDb::new().await;
    let a = TestApp::spawn(pg_settings(&db.url, Some(&redis_url()))).await;
    let b = TestApp::spawn(pg_settings(&db.url, Some(&redis_url()))).await;
    let (_, token) = a.tenant_token().await;
    let (id, copies) = accepted_with_copies(&a, &token, "replicas", 1).await;
    let jwks = issuer_jwks(&a.http, &format!("{}/issuer", a.base)).await;
    let (idx, uri_a) = &copies[0];
    // The same list on B: the path is the same, the host B's.
    let uri_b = uri_a.replace(&a.base, &b.base);
    let read_b = || async {
        let jwt = b
            .http
            .get(&uri_b)
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        // B signs with the key every replica shares and names the list by its own public URL.
        let claims = verified_list(&jwt, &jwks, &uri_b);
        decoded_statuses(&claims["status_list"]).1[*idx]
    };
    assert_eq!(read_b().await, 0, "B caches the list as valid");
    assert_eq!(read_b().await, 0);
    expect_json(
        post_status(&a, &token, &id, "revoke", None).await,
        200,
        "revoke on A",
    )
    .await;
    let answered = Instant::now();
    loop {
        if read_b().await == 1 {
            break;
        }
        assert!(
            answered.elapsed() < Duration::from_secs(1),
            "B still serves the credential as valid 1 s after the revoke answered"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    a.stop().await;
    b.stop().await;
}

/// Batch requests: the metadata advertises the batch size; more proofs than that, or two
/// proofs over one key, are refused; lists fill and new ones open.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn batch_requests_are_bounded_and_fill_lists() {
    let db = TestDb::new().await;
    let app = TestApp::spawn(Settings {
        batch_credential_size: 4,
        status_list_size: 16,
        ..pg_settings(&db.url, Some(&redis_url()))
    })
    .await;
    let (_, token) = app.tenant_token().await;
    let metadata = expect_json(
        app.http
            .get(app.url("/.well-known/openid-credential-issuer/issuer"))
            .send()
            .await
            .unwrap(),
        200,
        "metadata",
    )
    .await;
    assert_eq!(
        metadata["batch_credential_issuance"],
        json!({"batch_size": 4})
    );

    let (_, issuer, access) = redeemed(&app, &token, "batch-1").await;
    let keys: Vec<HolderKey> = (0..5).map(|_| HolderKey::generate()).collect();
    let refs: Vec<&HolderKey> = keys.iter().collect();
    let res = batch_request(&app, &issuer, &access, &refs).await;
    expect_error(res, 400, "invalid_credential_request", "five proofs").await;
    let res = batch_request(&app, &issuer, &access, &[&keys[0], &keys[1], &keys[0]]).await;
    expect_error(res, 400, "invalid_proof", "a key twice").await;

    // 4 × 4 + 4 copies of 16-entry lists: at least two lists, no entry twice, and every list
    // served (a verifier decodes 16 entries of 2 bits from 4 bytes).
    let mut all = HashSet::new();
    for n in 0..5 {
        let (_, copies) = accepted_with_copies(&app, &token, &format!("fill-{n}"), 4).await;
        for c in copies {
            assert!(all.insert(c.clone()), "{c:?} handed out twice");
        }
    }
    let lists: HashSet<&String> = all.iter().map(|(_, uri)| uri).collect();
    assert!(lists.len() >= 2, "{lists:?}");
    let jwks = issuer_jwks(&app.http, &format!("{}/issuer", app.base)).await;
    for uri in lists {
        let jwt = app
            .http
            .get(uri)
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        let claims = verified_list(&jwt, &jwks, uri);
        assert_eq!(decoded_statuses(&claims["status_list"]).1.len(), 16);
    }
    app.stop().await;
}

/// A watch resumed after the outcome follows the credential until it is revoked.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_watch_resumed_after_the_outcome_follows_the_credential() {
    let db = TestDb::new().await;
    let app = TestApp::spawn(pg_settings(&db.url, Some(&redis_url()))).await;
    let (_, token) = app.tenant_token().await;
    let (id, _) = accepted_with_copies(&app, &token, "watch-status", 1).await;
    let history = app.events_rest(&token, &id).await;
    let outcome = history["events"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["type"] == "credential_issued")
        .unwrap()["sequence"]
        .as_i64()
        .unwrap();
    let mut grpc = app.grpc().await;
    let mut stream = grpc
        .watch_issuance(authed(
            &token,
            pb::WatchIssuanceRequest {
                issuance_id: id.clone(),
                after_sequence: outcome,
            },
        ))
        .await
        .unwrap()
        .into_inner();
    expect_json(
        post_status(&app, &token, &id, "suspend", None).await,
        200,
        "suspend",
    )
    .await;
    expect_json(
        post_status(&app, &token, &id, "revoke", None).await,
        200,
        "revoke",
    )
    .await;
    let mut kinds = Vec::new();
    while let Some(item) = tokio::time::timeout(Duration::from_secs(10), stream.message())
        .await
        .expect("the stream moves")
        .unwrap()
    {
        if let Some(pb::watch_issuance_response::Item::Event(e)) = item.item {
            kinds.push(e.event_type());
        }
    }
    assert_eq!(
        kinds,
        [
            pb::EventType::CredentialSuspended,
            pb::EventType::CredentialRevoked
        ],
        "then the stream ends"
    );
    app.stop().await;
}

/// 50 status changes of one issuance arriving together (25 revocations, 25 suspensions, each
/// held back by its last byte): the credentials end revoked, with at most one event of each
/// kind, and every answer agrees with the rules: a revocation always succeeds, a suspension
/// succeeds unless the revocation came first.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fifty_concurrent_status_changes_apply_once() {
    let db = TestDb::new().await;
    let app = TestApp::spawn(pg_settings(&db.url, Some(&redis_url()))).await;
    let (_, token) = app.tenant_token().await;
    let (id, copies) = accepted_with_copies(&app, &token, "race", 2).await;
    let requests = (0..50)
        .map(|n| {
            let action = if n % 2 == 0 { "revoke" } else { "suspend" };
            crate::helpers::raw_json_post(
                &format!("/issuer/api/v1/issuances/{id}/{action}"),
                &token,
                &json!({"reason": action}),
            )
        })
        .collect();
    let answers = crate::helpers::race_http1(app.addr, requests).await;
    for (n, (status, body)) in answers.iter().enumerate() {
        let body: Value = serde_json::from_str(body).unwrap_or_default();
        if n % 2 == 0 {
            assert_eq!(*status, 200, "revoke: {body}");
            assert_eq!(body["credential_status"], "revoked", "{body}");
        } else {
            assert!(
                (*status == 200 && body["credential_status"] == "suspended")
                    || (*status == 409 && body["code"] == "invalid_state"),
                "suspend: {status} {body}"
            );
        }
    }
    let kinds: Vec<String> = app.events_rest(&token, &id).await["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["type"].as_str().unwrap().to_owned())
        .collect();
    let count = |k: &str| kinds.iter().filter(|x| *x == k).count();
    assert_eq!(count("credential_revoked"), 1, "{kinds:?}");
    assert!(count("credential_suspended") <= 1, "{kinds:?}");
    assert_eq!(kinds.last().map(String::as_str), Some("credential_revoked"));
    let jwks = issuer_jwks(&app.http, &format!("{}/issuer", app.base)).await;
    for (idx, uri) in &copies {
        assert_eq!(status_at(&app, &jwks, uri, *idx).await, 1);
    }
    app.stop().await;
}
