//! The wallet-facing OID4VCI 1.0 flow end to end (DESIGN §3, §6, §7): a wallet written from the
//! specifications (see `wallet/client.rs`) resolves the offer, discovers the endpoints from the
//! metadata, redeems the pre-authorized code, proves possession of its key, receives an SD-JWT VC
//! that it verifies per RFC 9901, and notifies the issuer; the management API sees the outcome.

pub(crate) mod client;

use std::time::Duration;

use aws_lc_rs::hmac;
use issuer_domain::ids::{IssuanceId, TenantId};
use reqwest::header;
use serde_json::{Value, json};

use crate::helpers::{
    Creds, TestApp, TestDb, create_body, embedded_settings, pg_settings, redis_url,
};
use client::{
    CONFIG_ID, HolderKey, Issuer, PRE_AUTH_GRANT, assert_concealed, b64_json, compact, discover,
    expect_error, expect_json, header_of, issuer_jwks, now, pre_authorized_code, proof,
    proof_claims, proof_header, request_draft, request_v1, resolve_offer, strings, verify_sd_jwt,
};

/// Claims an SD-JWT VC carries in the clear besides the credential's own claims.
const REGISTERED: [&str; 8] = ["iss", "iat", "nbf", "exp", "vct", "cnf", "status", "sub"];

async fn pg_app() -> (TestDb, TestApp) {
    let db = TestDb::new().await;
    let app = TestApp::spawn(pg_settings(&db.url, Some(&redis_url()))).await;
    (db, app)
}

fn issuer_id(app: &TestApp) -> String {
    format!("{}/issuer", app.base)
}

async fn created(app: &TestApp, token: &str, body: &Value) -> Value {
    let res = app.create_rest(token, body).await;
    expect_json(res, 201, "create").await
}

fn id_of(issuance: &Value) -> String {
    issuance["issuance_id"].as_str().unwrap().to_owned()
}

fn offer_uri(issuance: &Value) -> &str {
    issuance["credential_offer_uri"].as_str().unwrap()
}

/// (status, reason) as the management API reads them.
async fn status_of(app: &TestApp, token: &str, id: &str) -> (String, Option<String>) {
    let read = expect_json(app.get_rest(token, id).await, 200, "get issuance").await;
    (
        read["status"].as_str().unwrap().to_owned(),
        read["reason"].as_str().map(str::to_owned),
    )
}

fn st(status: &str, reason: Option<&str>) -> (String, Option<String>) {
    (status.to_owned(), reason.map(str::to_owned))
}

/// A wallet that has resolved an offer, discovered the issuer and redeemed the code.
struct Session {
    issuance: Value,
    issuer: Issuer,
    access_token: String,
}

async fn session(app: &TestApp, token: &str, crid: &str) -> Session {
    let issuance = created(app, token, &create_body(crid)).await;
    let offer = resolve_offer(&app.http, offer_uri(&issuance)).await;
    let issuer = discover(&app.http, offer["credential_issuer"].as_str().unwrap()).await;
    let access_token = issuer
        .access_token(&app.http, &pre_authorized_code(&offer))
        .await;
    Session {
        issuance,
        issuer,
        access_token,
    }
}

impl Session {
    /// A successful OID4VCI 1.0 credential request; returns the response body.
    async fn issue(&self, app: &TestApp, key: &HolderKey) -> Value {
        let res = self
            .issuer
            .request_credential(&app.http, &self.access_token, key)
            .await;
        expect_json(res, 200, "credential request").await
    }
}

/// Verifies an issued SD-JWT VC completely: signature with the published issuer key, registered
/// claims, key binding to `key`, every disclosure referenced, the disclosed claims equal to
/// `{"mandate": payload}` and nothing of `payload` in the clear.
async fn verify_credential(app: &TestApp, sd_jwt: &str, key: &HolderKey, payload: &Value) {
    let iss = issuer_id(app);
    let jwks = issuer_jwks(&app.http, &iss).await;
    let vc = verify_sd_jwt(sd_jwt, &jwks);

    assert_eq!(vc.header["typ"], "dc+sd-jwt", "{}", vc.header);
    assert_eq!(vc.header["alg"], "ES256", "{}", vc.header);
    let signed = &vc.signed;
    assert_eq!(signed["iss"], iss.as_str(), "{signed}");
    assert_eq!(signed["vct"], CONFIG_ID, "{signed}");
    let iat = signed["iat"].as_i64().expect("iat is a NumericDate");
    assert!((iat - now()).abs() < 120, "iat {iat} is now");
    let exp = signed["exp"].as_i64().expect("exp is a NumericDate");
    assert!(exp > iat, "exp {exp} after iat {iat}");
    if let Some(nbf) = signed.get("nbf") {
        assert!(
            nbf.as_i64().unwrap() <= now() + 5,
            "nbf {nbf} is not in the future"
        );
    }
    let holder = key.jwk();
    let cnf = &signed["cnf"]["jwk"];
    for k in ["kty", "crv", "x", "y"] {
        assert_eq!(cnf[k], holder[k], "cnf.jwk.{k}: {cnf} vs {holder}");
    }
    assert!(cnf.get("d").is_none(), "{cnf}");

    // Nothing of the credential in the clear: only registered claims and digests.
    for (k, v) in signed.as_object().unwrap() {
        match k.as_str() {
            "_sd" | "_sd_alg" => {}
            k if REGISTERED.contains(&k) => {}
            "mandate" => assert_concealed(v, "mandate"),
            other => panic!("unexpected clear claim {other}: {signed}"),
        }
    }
    for d in &vc.disclosures {
        let value = d.as_array().unwrap().last().unwrap();
        assert_concealed(value, &d.to_string());
    }
    let mut secrets = Vec::new();
    strings(payload, &mut secrets);
    let mut clear = Vec::new();
    strings(signed, &mut clear);
    for s in &secrets {
        assert!(
            !clear.contains(s),
            "payload value {s:?} is in the clear: {signed}"
        );
    }
    // Every member and every array element is its own disclosure.
    let (members, elements) = count_nodes(payload);
    assert_eq!(
        vc.disclosures.len(),
        1 + members + elements,
        "mandate + {members} members + {elements} array elements"
    );

    let mut disclosed = vc.claims.as_object().unwrap().clone();
    for k in REGISTERED {
        disclosed.remove(k);
    }
    assert_eq!(Value::Object(disclosed), json!({"mandate": payload}));
}

/// Object members and array elements anywhere under `v`.
fn count_nodes(v: &Value) -> (usize, usize) {
    match v {
        Value::Object(m) => m
            .values()
            .map(count_nodes)
            .fold((m.len(), 0), |a, b| (a.0 + b.0, a.1 + b.1)),
        Value::Array(a) => a
            .iter()
            .map(count_nodes)
            .fold((0, a.len()), |a, b| (a.0 + b.0, a.1 + b.1)),
        _ => (0, 0),
    }
}

async fn stored_payload(app: &TestApp, creds: &Creds, id: &str) -> Option<Value> {
    let tenant: TenantId = creds.tenant_id.parse().unwrap();
    let iid: IssuanceId = id.parse().unwrap();
    let row = app
        .app
        .store
        .get_issuance(tenant, iid)
        .await
        .unwrap()
        .expect("the issuance exists");
    row.payload
}

async fn event_kinds(app: &TestApp, creds: &Creds, id: &str) -> Vec<String> {
    app.app
        .store
        .list_events(creds.tenant_id.parse().unwrap(), id.parse().unwrap(), 0)
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.kind.as_str().to_owned())
        .collect()
}

// ---------------------------------------------------------------------------------------------
// 1. The full flow
// ---------------------------------------------------------------------------------------------

async fn full_flow(app: &TestApp) {
    let (creds, token) = app.tenant_token().await;
    let body = create_body("wallet-full-1");
    let issuance = created(app, &token, &body).await;
    assert!(
        issuance.get("tx_code").is_none_or(Value::is_null),
        "no tx_code unless asked for: {issuance}"
    );
    let id = id_of(&issuance);

    // The offer, by reference.
    let offer = resolve_offer(&app.http, offer_uri(&issuance)).await;
    let iss = issuer_id(app);
    assert_eq!(offer["credential_issuer"], iss.as_str(), "{offer}");
    assert_eq!(offer["credential_configuration_ids"], json!([CONFIG_ID]));
    let grants = offer["grants"].as_object().unwrap();
    assert_eq!(
        grants.keys().collect::<Vec<_>>(),
        [PRE_AUTH_GRANT],
        "{offer}"
    );
    let grant = &grants[PRE_AUTH_GRANT];
    assert!(
        grant.get("tx_code").is_none(),
        "no tx_code required: {offer}"
    );
    let code = pre_authorized_code(&offer);
    assert!(code.len() >= 22, "a >=128-bit code: {code}");

    // Discovery: both metadata locations, the endpoints under the issuer identifier.
    let issuer = discover(&app.http, offer["credential_issuer"].as_str().unwrap()).await;
    let legacy = client::get_json(
        &app.http,
        &format!("{iss}/.well-known/openid-credential-issuer"),
    )
    .await;
    assert_eq!(legacy, issuer.metadata, "both metadata locations agree");
    let legacy_as = client::get_json(
        &app.http,
        &format!("{iss}/.well-known/oauth-authorization-server"),
    )
    .await;
    assert_eq!(
        legacy_as, issuer.as_metadata,
        "both AS metadata locations agree"
    );
    assert_eq!(
        issuer.credential_endpoint,
        format!("{iss}/oid4vci/v1/credential")
    );
    assert_eq!(issuer.nonce_endpoint, format!("{iss}/oid4vci/v1/nonce"));
    assert_eq!(
        issuer.notification_endpoint,
        format!("{iss}/oid4vci/v1/notification")
    );
    let config = &issuer.metadata["credential_configurations_supported"][CONFIG_ID];
    assert_eq!(config["format"], "dc+sd-jwt", "{config}");
    assert_eq!(config["vct"], CONFIG_ID, "{config}");
    let algs = config["proof_types_supported"]["jwt"]["proof_signing_alg_values_supported"]
        .as_array()
        .unwrap_or_else(|| panic!("no jwt proof algs: {config}"));
    assert!(algs.contains(&json!("ES256")), "{config}");
    // OID4VCI 1.0 §12.2.4: present whenever proof_types_supported is.
    let binding = config["cryptographic_binding_methods_supported"]
        .as_array()
        .unwrap_or_else(|| panic!("no cryptographic_binding_methods_supported: {config}"));
    assert!(binding.contains(&json!("jwk")), "{config}");
    assert_eq!(issuer.token_endpoint, format!("{iss}/oauth/token"));
    assert_eq!(
        issuer.as_metadata["pre-authorized_grant_anonymous_access_supported"],
        true
    );
    if let Some(grants) = issuer.as_metadata.get("grant_types_supported") {
        assert!(
            grants.as_array().unwrap().contains(&json!(PRE_AUTH_GRANT)),
            "{grants}"
        );
    }

    // Token, nonce, credential.
    let access_token = issuer.access_token(&app.http, &code).await;
    let key = HolderKey::generate();
    let nonce = issuer.nonce(&app.http).await;
    let res = issuer
        .credential_request(
            &app.http,
            &access_token,
            &request_v1(&proof(&key, &iss, &nonce)),
        )
        .await;
    assert!(
        header_of(&res, header::CONTENT_TYPE).starts_with("application/json"),
        "{:?}",
        res.headers()
    );
    let response = expect_json(res, 200, "credential request").await;
    let credentials = response["credentials"]
        .as_array()
        .unwrap_or_else(|| panic!("no credentials array: {response}"));
    assert_eq!(credentials.len(), 1, "{response}");
    let sd_jwt = credentials[0]["credential"].as_str().unwrap();
    assert!(
        response["notification_id"]
            .as_str()
            .is_some_and(|n| !n.is_empty()),
        "{response}"
    );
    verify_credential(app, sd_jwt, &key, &body["payload"]).await;

    // The management side.
    assert_eq!(status_of(app, &token, &id).await, st("accepted", None));
    assert_eq!(
        stored_payload(app, &creds, &id).await,
        None,
        "the payload is purged once the credential is issued"
    );
    assert_eq!(
        app.http
            .get(client::offer_url(offer_uri(&issuance)))
            .send()
            .await
            .unwrap()
            .status(),
        404,
        "the offer is gone once used"
    );

    assert_eq!(
        event_kinds(app, &creds, &id).await,
        [
            "created",
            "offer_retrieved",
            "token_issued",
            "credential_issued"
        ]
    );

    // One credential per issuance.
    let again = issuer
        .request_credential(&app.http, &access_token, &key)
        .await;
    expect_error(again, 400, "invalid_credential_request", "second request").await;
    // The code stays spent.
    let res = issuer.token_request(&app.http, &code, &[]).await;
    expect_error(res, 400, "invalid_grant", "spent code").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_flow_on_postgres_and_redis() {
    let (_db, app) = pg_app().await;
    full_flow(&app).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_flow_on_the_embedded_default() {
    let dir = tempfile::tempdir().unwrap();
    let app = TestApp::spawn(embedded_settings(dir.path())).await;
    full_flow(&app).await;
}

// ---------------------------------------------------------------------------------------------
// 2. Draft-13/15 wallets
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn draft_wallets_send_proof_and_format_and_get_credential() {
    let (_db, app) = pg_app().await;
    let (_, token) = app.tenant_token().await;
    let payload = create_body("x")["payload"].clone();
    for (i, format) in ["dc+sd-jwt", "vc+sd-jwt"].into_iter().enumerate() {
        let s = session(&app, &token, &format!("draft-{i}")).await;
        let key = HolderKey::generate();
        let nonce = s.issuer.nonce(&app.http).await;
        let p = proof(&key, &s.issuer.credential_issuer, &nonce);
        let res = s
            .issuer
            .credential_request(&app.http, &s.access_token, &request_draft(format, &p))
            .await;
        let body = expect_json(res, 200, format).await;
        let sd_jwt = body["credential"]
            .as_str()
            .unwrap_or_else(|| panic!("{format}: no `credential` string: {body}"));
        assert!(body["notification_id"].is_string(), "{format}: {body}");
        verify_credential(&app, sd_jwt, &key, &payload).await;
        assert_eq!(
            status_of(&app, &token, &id_of(&s.issuance)).await,
            st("accepted", None)
        );
    }

    // A format or type this issuer does not offer is refused, whatever the draft's code for it.
    let s = session(&app, &token, "draft-refused").await;
    let key = HolderKey::generate();
    for body in [
        json!({"format": "jwt_vc_json", "vct": CONFIG_ID}),
        json!({"format": "dc+sd-jwt", "vct": "https://other.example/vct"}),
    ] {
        let nonce = s.issuer.nonce(&app.http).await;
        let mut body = body;
        body["proof"] =
            json!({"proof_type": "jwt", "jwt": proof(&key, &s.issuer.credential_issuer, &nonce)});
        let res = s
            .issuer
            .credential_request(&app.http, &s.access_token, &body)
            .await;
        let err = expect_json(res, 400, &body.to_string()).await;
        let codes = [
            "unsupported_credential_format",
            "unknown_credential_configuration",
            "invalid_credential_request",
        ];
        assert!(
            codes.contains(&err["error"].as_str().unwrap_or("")),
            "{err}"
        );
    }
    assert_eq!(
        status_of(&app, &token, &id_of(&s.issuance)).await,
        st("pending", None)
    );
}

// ---------------------------------------------------------------------------------------------
// 3. Single-use pre-authorized codes
// ---------------------------------------------------------------------------------------------

async fn one_code_one_token(app: &TestApp) {
    let (_, token) = app.tenant_token().await;
    let issuance = created(app, &token, &create_body("race-1")).await;
    let offer = resolve_offer(&app.http, offer_uri(&issuance)).await;
    let issuer = discover(&app.http, offer["credential_issuer"].as_str().unwrap()).await;
    let code = pre_authorized_code(&offer);

    let tasks: Vec<_> = (0..20)
        .map(|_| {
            let http = app.http.clone();
            let url = issuer.token_endpoint.clone();
            let code = code.clone();
            tokio::spawn(async move {
                let res = http
                    .post(url)
                    .form(&[
                        ("grant_type", PRE_AUTH_GRANT),
                        ("pre-authorized_code", &code),
                    ])
                    .send()
                    .await
                    .unwrap();
                let status = res.status().as_u16();
                (status, res.json::<Value>().await.unwrap())
            })
        })
        .collect();
    let mut winners = Vec::new();
    for t in tasks {
        let (status, body) = t.await.unwrap();
        match status {
            200 => winners.push(body["access_token"].as_str().unwrap().to_owned()),
            400 => assert_eq!(body["error"], "invalid_grant", "{body}"),
            other => panic!("unexpected {other}: {body}"),
        }
    }
    assert_eq!(winners.len(), 1, "exactly one redemption wins");

    // The winner's token works; the code stays spent; a made-up code is no code.
    let key = HolderKey::generate();
    let res = issuer
        .request_credential(&app.http, &winners[0], &key)
        .await;
    expect_json(res, 200, "credential with the winning token").await;
    let res = issuer.token_request(&app.http, &code, &[]).await;
    expect_error(res, 400, "invalid_grant", "reused code").await;
    let res = issuer
        .token_request(&app.http, "bm90LWEtcmVhbC1jb2RlLWF0LWFsbA", &[])
        .await;
    expect_error(res, 400, "invalid_grant", "unknown code").await;
    let res = app
        .http
        .post(&issuer.token_endpoint)
        .form(&[("grant_type", PRE_AUTH_GRANT)])
        .send()
        .await
        .unwrap();
    expect_error(res, 400, "invalid_request", "no code").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_redemptions_of_one_code_yield_one_token_on_postgres() {
    let (_db, app) = pg_app().await;
    one_code_one_token(&app).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_redemptions_of_one_code_yield_one_token_embedded() {
    let dir = tempfile::tempdir().unwrap();
    let app = TestApp::spawn(embedded_settings(dir.path())).await;
    one_code_one_token(&app).await;
}

// ---------------------------------------------------------------------------------------------
// 4. Transaction codes
// ---------------------------------------------------------------------------------------------

fn tx_body(crid: &str) -> Value {
    let mut body = create_body(crid);
    body["tx_code"] = true.into();
    body
}

/// Creates with a tx code; returns the issuance, the tx code, the offer and the issuer.
async fn tx_issuance(app: &TestApp, token: &str, crid: &str) -> (Value, String, Value, Issuer) {
    let issuance = created(app, token, &tx_body(crid)).await;
    let tx = issuance["tx_code"]
        .as_str()
        .unwrap_or_else(|| panic!("no tx_code in the 201 response: {issuance}"))
        .to_owned();
    assert!(
        tx.len() == 6 && tx.bytes().all(|b| b.is_ascii_digit()),
        "six digits: {tx}"
    );
    let offer = resolve_offer(&app.http, offer_uri(&issuance)).await;
    let spec = &offer["grants"][PRE_AUTH_GRANT]["tx_code"];
    assert_eq!(spec["input_mode"], "numeric", "{offer}");
    assert_eq!(spec["length"], 6, "{offer}");
    let issuer = discover(&app.http, offer["credential_issuer"].as_str().unwrap()).await;
    (issuance, tx, offer, issuer)
}

fn wrong(tx: &str) -> String {
    let n: u32 = tx.parse().unwrap();
    format!("{:06}", (n + 1) % 1_000_000)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tx_codes_are_required_checked_and_capped() {
    let (_db, app) = pg_app().await;
    let (_, token) = app.tenant_token().await;

    // Shown once: a replay of the create does not repeat it, nor does a read.
    let (issuance, tx, offer, issuer) = tx_issuance(&app, &token, "tx-1").await;
    let replay = app.create_rest(&token, &tx_body("tx-1")).await;
    let replay = expect_json(replay, 200, "replayed create").await;
    assert_eq!(replay["issuance_id"], issuance["issuance_id"]);
    assert!(replay.get("tx_code").is_none_or(Value::is_null), "{replay}");
    let read = expect_json(app.get_rest(&token, &id_of(&issuance)).await, 200, "get").await;
    assert!(read.get("tx_code").is_none_or(Value::is_null), "{read}");

    let code = pre_authorized_code(&offer);
    let res = issuer.token_request(&app.http, &code, &[]).await;
    expect_error(res, 400, "invalid_request", "missing tx_code").await;
    let res = issuer
        .token_request(&app.http, &code, &[("tx_code", &wrong(&tx))])
        .await;
    expect_error(res, 400, "invalid_grant", "wrong tx_code").await;
    let access = issuer
        .access_token_with(&app.http, &code, &[("tx_code", &tx)])
        .await;
    let res = issuer
        .request_credential(&app.http, &access, &HolderKey::generate())
        .await;
    expect_json(res, 200, "credential after tx_code").await;

    // Legacy wallets send `user_pin`.
    let (_, tx2, offer2, issuer2) = tx_issuance(&app, &token, "tx-2").await;
    assert_ne!(tx2, "", "fresh code");
    issuer2
        .access_token_with(
            &app.http,
            &pre_authorized_code(&offer2),
            &[("user_pin", &tx2)],
        )
        .await;

    // Five wrong attempts invalidate the code, even for the right tx code.
    let (issuance3, tx3, offer3, issuer3) = tx_issuance(&app, &token, "tx-3").await;
    let code3 = pre_authorized_code(&offer3);
    for i in 0..5 {
        let res = issuer3
            .token_request(&app.http, &code3, &[("tx_code", &wrong(&tx3))])
            .await;
        expect_error(res, 400, "invalid_grant", &format!("wrong attempt {i}")).await;
    }
    let res = issuer3
        .token_request(&app.http, &code3, &[("tx_code", &tx3)])
        .await;
    expect_error(res, 400, "invalid_grant", "right code after the cap").await;
    let (status, _) = status_of(&app, &token, &id_of(&issuance3)).await;
    assert_ne!(status, "accepted");
}

/// 200 guesses at once: exactly the cap of them is compared; every other one, and the right
/// code afterwards, gets `invalid_grant`. With the right code among them, it wins only if it
/// was one of the compared few.
async fn tx_code_guesses_race(app: &TestApp) {
    let (_, token) = app.tenant_token().await;
    let path = |issuer: &Issuer| {
        issuer
            .token_endpoint
            .strip_prefix(&app.base)
            .unwrap()
            .to_owned()
    };
    let guess = |code: &str, tx: &str, path: &str| {
        crate::helpers::raw_form_post(
            path,
            &[
                ("grant_type", PRE_AUTH_GRANT),
                ("pre-authorized_code", code),
                ("tx_code", tx),
            ],
        )
    };
    let compared = |results: &[(u16, String)]| {
        results
            .iter()
            .filter(|(_, body)| body.contains("the transaction code is wrong"))
            .count()
    };

    let (issuance, tx, offer, issuer) = tx_issuance(app, &token, "race-1").await;
    let code = pre_authorized_code(&offer);
    let path1 = path(&issuer);
    let requests = (0..200)
        .map(|_| guess(&code, &wrong(&tx), &path1))
        .collect();
    let results = crate::helpers::race_http1(app.addr, requests).await;
    assert!(
        results
            .iter()
            .all(|(status, body)| *status == 400 && body.contains("invalid_grant")),
        "every wrong guess is invalid_grant: {:?}",
        results
            .iter()
            .find(|(s, b)| *s != 400 || !b.contains("invalid_grant"))
    );
    assert_eq!(compared(&results), 5, "exactly the cap is compared");
    let res = issuer
        .token_request(&app.http, &code, &[("tx_code", &tx)])
        .await;
    expect_error(res, 400, "invalid_grant", "right code after the cap").await;
    let (status, _) = status_of(app, &token, &id_of(&issuance)).await;
    assert_eq!(status, "pending");

    // The right code as the 30th of 200.
    let (_, tx, offer, issuer) = tx_issuance(app, &token, "race-2").await;
    let code = pre_authorized_code(&offer);
    let path2 = path(&issuer);
    let requests = (0..200)
        .map(|i| {
            guess(
                &code,
                &if i == 29 { tx.clone() } else { wrong(&tx) },
                &path2,
            )
        })
        .collect();
    let results = crate::helpers::race_http1(app.addr, requests).await;
    let tokens = results.iter().filter(|(s, _)| *s == 200).count();
    assert!(tokens <= 1, "one code, one token: {tokens}");
    assert_eq!(tokens, usize::from(results[29].0 == 200));
    assert!(
        compared(&results) + tokens <= 5,
        "at most the cap compared, the right code included: {} + {tokens}",
        compared(&results)
    );
    assert!(results.iter().all(|(s, _)| *s == 200 || *s == 400));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_tx_code_guesses_are_capped_on_postgres() {
    let (_db, app) = pg_app().await;
    tx_code_guesses_race(&app).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_tx_code_guesses_are_capped_embedded() {
    let dir = tempfile::tempdir().unwrap();
    let app = TestApp::spawn(embedded_settings(dir.path())).await;
    tx_code_guesses_race(&app).await;
}

// ---------------------------------------------------------------------------------------------
// 5. Key proofs and nonces
// ---------------------------------------------------------------------------------------------

type ProofFn<'a> = Box<dyn Fn(&str) -> String + 'a>;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_proofs_and_nonces_are_refused() {
    let (_db, app) = pg_app().await;
    let (_, token) = app.tenant_token().await;
    let s = session(&app, &token, "proofs-1").await;
    let http = &app.http;
    let iss = s.issuer.credential_issuer.clone();
    let key = HolderKey::generate();
    let other = HolderKey::generate();

    let with = |header: Value, claims: Value| compact(&header, &claims, |m| key.sign(m));
    let cases: Vec<(&str, ProofFn, &str)> = vec![
        (
            "typ JWT",
            Box::new(|n| {
                let mut h = proof_header(&key);
                h["typ"] = "JWT".into();
                with(h, proof_claims(&iss, n))
            }),
            "invalid_proof",
        ),
        (
            "alg none",
            Box::new(|n| {
                let mut h = proof_header(&key);
                h["alg"] = "none".into();
                format!("{}.{}.", b64_json(&h), b64_json(&proof_claims(&iss, n)))
            }),
            "invalid_proof",
        ),
        (
            "HS256",
            Box::new(|n| {
                let mut h = proof_header(&key);
                h["alg"] = "HS256".into();
                let mac = hmac::Key::new(
                    hmac::HMAC_SHA256,
                    key.jwk()["x"].as_str().unwrap().as_bytes(),
                );
                compact(&h, &proof_claims(&iss, n), |m| {
                    hmac::sign(&mac, m).as_ref().to_vec()
                })
            }),
            "invalid_proof",
        ),
        (
            "wrong aud",
            Box::new(|n| {
                with(
                    proof_header(&key),
                    proof_claims("https://other.example/issuer", n),
                )
            }),
            "invalid_proof",
        ),
        (
            "iat 10 minutes ago",
            Box::new(|n| {
                let mut c = proof_claims(&iss, n);
                c["iat"] = (now() - 600).into();
                with(proof_header(&key), c)
            }),
            "invalid_proof",
        ),
        (
            "iat in 10 minutes",
            Box::new(|n| {
                let mut c = proof_claims(&iss, n);
                c["iat"] = (now() + 600).into();
                with(proof_header(&key), c)
            }),
            "invalid_proof",
        ),
        (
            "private key in jwk",
            Box::new(|n| {
                let mut h = proof_header(&key);
                h["jwk"]["d"] = key.d().into();
                with(h, proof_claims(&iss, n))
            }),
            "invalid_proof",
        ),
        (
            "jwk and kid",
            Box::new(|n| {
                let mut h = proof_header(&key);
                h["kid"] = "did:example:123#0".into();
                with(h, proof_claims(&iss, n))
            }),
            "invalid_proof",
        ),
        (
            "signed by another key",
            Box::new(|n| {
                compact(&proof_header(&key), &proof_claims(&iss, n), |m| {
                    other.sign(m)
                })
            }),
            "invalid_proof",
        ),
        (
            "no nonce",
            Box::new(|_| {
                let mut c = proof_claims(&iss, "");
                c.as_object_mut().unwrap().remove("nonce");
                with(proof_header(&key), c)
            }),
            "invalid_proof",
        ),
        (
            "made-up nonce",
            Box::new(|_| {
                with(
                    proof_header(&key),
                    proof_claims(&iss, "bWFkZS11cC1ub25jZS1ub3QtaXNzdWVk"),
                )
            }),
            "invalid_nonce",
        ),
    ];
    for (name, make, error) in &cases {
        let nonce = s.issuer.nonce(http).await;
        let res = s
            .issuer
            .credential_request(http, &s.access_token, &request_v1(&make(&nonce)))
            .await;
        expect_error(res, 400, error, name).await;
    }

    // Malformed requests (OID4VCI 1.0 §8.3.1.2).
    let nonce = s.issuer.nonce(http).await;
    let good = proof(&key, &iss, &nonce);
    let res = s
        .issuer
        .credential_request(
            http,
            &s.access_token,
            &json!({"credential_configuration_id": CONFIG_ID}),
        )
        .await;
    expect_error(res, 400, "invalid_proof", "no proofs").await;
    let res = s
        .issuer
        .credential_request(
            http,
            &s.access_token,
            &json!({"credential_configuration_id": "no.such.config", "proofs": {"jwt": [good]}}),
        )
        .await;
    expect_error(
        res,
        400,
        "unknown_credential_configuration",
        "unknown config",
    )
    .await;

    // Bearer token problems (RFC 6750 §3).
    let body = request_v1(&proof(&key, &iss, &s.issuer.nonce(http).await));
    let res = http
        .post(&s.issuer.credential_endpoint)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 401, "no token");
    let challenge = header_of(&res, header::WWW_AUTHENTICATE);
    assert!(challenge.starts_with("Bearer"), "{challenge}");
    assert!(
        !challenge.contains("error=") || challenge.contains(r#"error="invalid_token""#),
        "{challenge}"
    );
    let res = s
        .issuer
        .credential_request(http, "garbage.token.value", &body)
        .await;
    assert_eq!(res.status(), 401, "garbage token");
    let challenge = header_of(&res, header::WWW_AUTHENTICATE);
    assert!(
        challenge.starts_with("Bearer") && challenge.contains(r#"error="invalid_token""#),
        "{challenge}"
    );
    // A management token is not a wallet token, nor the other way round.
    let res = s.issuer.credential_request(http, &token, &body).await;
    assert!(
        [401, 403].contains(&res.status().as_u16()),
        "management token on the credential endpoint: {}",
        res.status()
    );
    let res = app.get_rest(&s.access_token, &id_of(&s.issuance)).await;
    assert!(
        [401, 403].contains(&res.status().as_u16()),
        "wallet token on the management API: {}",
        res.status()
    );

    // Failures issued nothing: the issuance is pending and a valid proof still succeeds.
    assert_eq!(
        status_of(&app, &token, &id_of(&s.issuance)).await,
        st("pending", None)
    );
    let spent = s.issuer.nonce(http).await;
    let res = s
        .issuer
        .credential_request(
            http,
            &s.access_token,
            &request_v1(&proof(&key, &iss, &spent)),
        )
        .await;
    let issued = expect_json(res, 200, "valid proof after the failures").await;
    assert!(
        issued["credentials"][0]["credential"].is_string(),
        "{issued}"
    );

    // A nonce is single-use: another wallet cannot reuse the spent one.
    let s2 = session(&app, &token, "proofs-2").await;
    let res = s2
        .issuer
        .credential_request(
            http,
            &s2.access_token,
            &request_v1(&proof(&other, &iss, &spent)),
        )
        .await;
    expect_error(res, 400, "invalid_nonce", "reused nonce").await;
    let res = s2
        .issuer
        .request_credential(http, &s2.access_token, &other)
        .await;
    expect_json(res, 200, "fresh nonce").await;
}

// ---------------------------------------------------------------------------------------------
// 6. Notifications
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notifications_move_the_issuance_and_are_bound_to_their_wallet() {
    let (_db, app) = pg_app().await;
    let (creds, token) = app.tenant_token().await;
    let http = &app.http;
    let a = session(&app, &token, "notify-a").await;
    let b = session(&app, &token, "notify-b").await;
    let (ida, idb) = (id_of(&a.issuance), id_of(&b.issuance));
    let na = a.issue(&app, &HolderKey::generate()).await["notification_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let nb = b.issue(&app, &HolderKey::generate()).await["notification_id"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_ne!(na, nb);
    assert_eq!(status_of(&app, &token, &ida).await, st("accepted", None));

    let res = a
        .issuer
        .notify(
            http,
            &a.access_token,
            "no-such-notification",
            "credential_accepted",
        )
        .await;
    expect_error(res, 400, "invalid_notification_id", "unknown id").await;
    let res = a
        .issuer
        .notify(http, &b.access_token, &na, "credential_deleted")
        .await;
    expect_error(res, 400, "invalid_notification_id", "B's token, A's id").await;
    assert_eq!(status_of(&app, &token, &ida).await, st("accepted", None));
    let res = a
        .issuer
        .notify(http, &a.access_token, &na, "credential_lost")
        .await;
    expect_error(res, 400, "invalid_notification_request", "unknown event").await;
    let res = http
        .post(&a.issuer.notification_endpoint)
        .json(&json!({"notification_id": na, "event": "credential_accepted"}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 401, "no token");

    let res = a
        .issuer
        .notify(http, &a.access_token, &na, "credential_accepted")
        .await;
    assert_eq!(res.status(), 204, "{}", res.text().await.unwrap());
    assert_eq!(status_of(&app, &token, &ida).await, st("accepted", None));
    let res = a
        .issuer
        .notify(http, &a.access_token, &na, "credential_deleted")
        .await;
    assert_eq!(res.status(), 204, "{}", res.text().await.unwrap());
    assert_eq!(
        status_of(&app, &token, &ida).await,
        st("rejected", Some("declined"))
    );

    let res = b
        .issuer
        .notify(http, &b.access_token, &nb, "credential_failure")
        .await;
    assert_eq!(res.status(), 204, "{}", res.text().await.unwrap());
    assert_eq!(status_of(&app, &token, &idb).await.0, "error");

    let tail = |mut v: Vec<String>, n: usize| v.split_off(v.len() - n);
    assert_eq!(
        tail(event_kinds(&app, &creds, &ida).await, 3),
        [
            "credential_issued",
            "credential_accepted",
            "credential_deleted"
        ]
    );
    assert_eq!(
        tail(event_kinds(&app, &creds, &idb).await, 2),
        ["credential_issued", "credential_failure"]
    );
}

// ---------------------------------------------------------------------------------------------
// 7. Expired and cancelled offers
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_issuance_has_no_offer_and_its_code_is_refused() {
    let (_db, app) = pg_app().await;
    let (_, token) = app.tenant_token().await;
    let mut body = create_body("expired-1");
    body["expires_in"] = 2.into();
    let issuance = created(&app, &token, &body).await;
    let id = id_of(&issuance);
    let offer = resolve_offer(&app.http, offer_uri(&issuance)).await;
    let issuer = discover(&app.http, offer["credential_issuer"].as_str().unwrap()).await;
    let code = pre_authorized_code(&offer);
    // A second one whose wallet redeemed its code in time but asks for the credential too late.
    let mut late_body = create_body("expired-2");
    late_body["expires_in"] = 2.into();
    let late = created(&app, &token, &late_body).await;
    let late_offer = resolve_offer(&app.http, offer_uri(&late)).await;
    let late_token = issuer
        .access_token(&app.http, &pre_authorized_code(&late_offer))
        .await;

    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while status_of(&app, &token, &id).await.0 == "pending"
        || status_of(&app, &token, &id_of(&late)).await.0 == "pending"
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "not expired in 10 s"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(
        status_of(&app, &token, &id).await,
        st("rejected", Some("expired"))
    );
    let res = app
        .http
        .get(client::offer_url(offer_uri(&issuance)))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 404);
    let res = issuer.token_request(&app.http, &code, &[]).await;
    expect_error(res, 400, "invalid_grant", "expired code").await;

    let res = issuer
        .request_credential(&app.http, &late_token, &HolderKey::generate())
        .await;
    let status = res.status().as_u16();
    assert!(
        [400, 401].contains(&status),
        "no credential for an expired issuance: {status} {}",
        res.text().await.unwrap()
    );
    assert_eq!(
        status_of(&app, &token, &id_of(&late)).await,
        st("rejected", Some("expired"))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_issuance_has_no_offer_and_its_code_is_refused() {
    let (_db, app) = pg_app().await;
    let (_, token) = app.tenant_token().await;
    let issuance = created(&app, &token, &create_body("cancelled-1")).await;
    let id = id_of(&issuance);
    let offer = resolve_offer(&app.http, offer_uri(&issuance)).await;
    let issuer = discover(&app.http, offer["credential_issuer"].as_str().unwrap()).await;
    let code = pre_authorized_code(&offer);

    let res = app.cancel_rest(&token, &id).await;
    expect_json(res, 200, "cancel").await;
    let res = app
        .http
        .get(client::offer_url(offer_uri(&issuance)))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 404);
    let res = issuer.token_request(&app.http, &code, &[]).await;
    expect_error(res, 400, "invalid_grant", "cancelled code").await;
    assert_eq!(
        status_of(&app, &token, &id).await,
        st("rejected", Some("cancelled"))
    );

    // Cancelled after the wallet redeemed its code: no credential either.
    let s = session(&app, &token, "cancelled-2").await;
    let sid = id_of(&s.issuance);
    let res = app.cancel_rest(&token, &sid).await;
    expect_json(res, 200, "cancel after token").await;
    let res = s
        .issuer
        .request_credential(&app.http, &s.access_token, &HolderKey::generate())
        .await;
    let status = res.status().as_u16();
    assert!(
        [400, 401].contains(&status),
        "no credential for a cancelled issuance: {status} {}",
        res.text().await.unwrap()
    );
    assert_eq!(
        status_of(&app, &token, &sid).await,
        st("rejected", Some("cancelled"))
    );
}

// ---------------------------------------------------------------------------------------------
// 8. What the metadata advertises works; the flow survives restarts and spans replicas
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_advertised_proof_algorithm_and_binding_method_works() {
    let (_db, app) = pg_app().await;
    let (_, token) = app.tenant_token().await;
    let payload = create_body("x")["payload"].clone();
    let probe = session(&app, &token, "algs-probe").await;
    let config = &probe.issuer.metadata["credential_configurations_supported"][CONFIG_ID];
    let algs: Vec<String> =
        config["proof_types_supported"]["jwt"]["proof_signing_alg_values_supported"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a.as_str().unwrap().to_owned())
            .collect();
    let mut tried = 0;
    for (i, alg) in algs.iter().enumerate() {
        let Some(key) = HolderKey::for_alg(alg) else {
            continue; // an algorithm this test wallet cannot produce
        };
        tried += 1;
        let s = session(&app, &token, &format!("alg-{i}")).await;
        let res = s
            .issuer
            .request_credential(&app.http, &s.access_token, &key)
            .await;
        let body = expect_json(res, 200, alg).await;
        let sd_jwt = body["credentials"][0]["credential"].as_str().unwrap();
        verify_credential(&app, sd_jwt, &key, &payload).await;
    }
    assert!(tried >= 1, "ES256 at least: {algs:?}");

    // A `did:jwk` key identifier instead of an inline `jwk`, when advertised.
    let binding = config["cryptographic_binding_methods_supported"]
        .as_array()
        .unwrap();
    if binding.contains(&json!("did:jwk")) {
        let key = HolderKey::generate();
        let nonce = probe.issuer.nonce(&app.http).await;
        let header = json!({
            "typ": client::PROOF_TYP,
            "alg": "ES256",
            "kid": format!("did:jwk:{}#0", b64_json(&key.jwk())),
        });
        let p = compact(
            &header,
            &proof_claims(&probe.issuer.credential_issuer, &nonce),
            |m| key.sign(m),
        );
        let res = probe
            .issuer
            .credential_request(&app.http, &probe.access_token, &request_v1(&p))
            .await;
        let body = expect_json(res, 200, "did:jwk proof").await;
        let sd_jwt = body["credentials"][0]["credential"].as_str().unwrap();
        verify_credential(&app, sd_jwt, &key, &payload).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_embedded_default_keeps_its_keys_and_wallet_state_across_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let app = TestApp::spawn(embedded_settings(dir.path())).await;
    let (_, token) = app.tenant_token().await;
    let payload = create_body("x")["payload"].clone();
    let first = session(&app, &token, "restart-1").await;
    let key = HolderKey::generate();
    let issued = first.issue(&app, &key).await;
    let old_sd_jwt = issued["credentials"][0]["credential"]
        .as_str()
        .unwrap()
        .to_owned();
    let second = session(&app, &token, "restart-2").await;
    let addr = app.addr;
    app.stop().await;

    // Same data directory and address, new process.
    let app = TestApp::spawn_at(embedded_settings(dir.path()), addr).await;
    let jwks = issuer_jwks(&app.http, &issuer_id(&app)).await;
    verify_sd_jwt(&old_sd_jwt, &jwks);
    // A wallet token obtained before the restart still works after it.
    let moved = discover(&app.http, &issuer_id(&app)).await;
    let key2 = HolderKey::generate();
    let res = moved
        .request_credential(&app.http, &second.access_token, &key2)
        .await;
    let body = expect_json(res, 200, "credential after restart").await;
    verify_credential(
        &app,
        body["credentials"][0]["credential"].as_str().unwrap(),
        &key2,
        &payload,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nonce_from_one_replica_is_good_at_another_and_only_once() {
    let db = TestDb::new().await;
    let a = TestApp::spawn(pg_settings(&db.url, Some(&redis_url()))).await;
    let b = TestApp::spawn(pg_settings(&db.url, Some(&redis_url()))).await;
    let (_, token) = a.tenant_token().await;
    let s1 = session(&a, &token, "replicas-1").await;
    let s2 = session(&a, &token, "replicas-2").await;
    let on_b = discover(&b.http, &issuer_id(&b)).await;
    let nonce = on_b.nonce(&b.http).await;
    let key = HolderKey::generate();
    let res = s1
        .issuer
        .credential_request(
            &a.http,
            &s1.access_token,
            &request_v1(&proof(&key, &s1.issuer.credential_issuer, &nonce)),
        )
        .await;
    expect_json(res, 200, "nonce from replica B at replica A").await;
    let res = s2
        .issuer
        .credential_request(
            &a.http,
            &s2.access_token,
            &request_v1(&proof(&key, &s2.issuer.credential_issuer, &nonce)),
        )
        .await;
    expect_error(res, 400, "invalid_nonce", "the same nonce again").await;
}

/// A nonce spent in one tenant is refused in another: nonces are issued for the whole issuer.
async fn nonce_spent_in_one_tenant_is_refused_in_another(app: &TestApp) {
    let (_, token_a) = app.tenant_token().await;
    let (_, token_b) = app.tenant_token().await;
    let a = session(app, &token_a, "nonce-tenant-a").await;
    let b = session(app, &token_b, "nonce-tenant-b").await;
    let nonce = a.issuer.nonce(&app.http).await;
    let key = HolderKey::generate();
    let request = |s: &Session| request_v1(&proof(&key, &s.issuer.credential_issuer, &nonce));
    let res = a
        .issuer
        .credential_request(&app.http, &a.access_token, &request(&a))
        .await;
    expect_json(res, 200, "nonce spent in tenant A").await;
    let res = b
        .issuer
        .credential_request(&app.http, &b.access_token, &request(&b))
        .await;
    expect_error(res, 400, "invalid_nonce", "the same nonce in tenant B").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nonces_are_single_use_across_tenants_on_postgres() {
    let (_db, app) = pg_app().await;
    nonce_spent_in_one_tenant_is_refused_in_another(&app).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nonces_are_single_use_across_tenants_embedded() {
    let dir = tempfile::tempdir().unwrap();
    let app = TestApp::spawn(embedded_settings(dir.path())).await;
    nonce_spent_in_one_tenant_is_refused_in_another(&app).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tx_codes_over_grpc_are_shown_once() {
    let (_db, app) = pg_app().await;
    let (_, token) = app.tenant_token().await;
    let mut grpc = app.grpc().await;
    let body = tx_body("tx-grpc-1");
    let msg = grpc
        .create_issuance(crate::helpers::authed(
            &token,
            crate::helpers::create_request_pb(&body),
        ))
        .await
        .unwrap()
        .into_inner();
    let tx = msg.tx_code.clone();
    assert!(
        tx.len() == 6 && tx.bytes().all(|b| b.is_ascii_digit()),
        "six digits: {tx:?}"
    );
    let replay = grpc
        .create_issuance(crate::helpers::authed(
            &token,
            crate::helpers::create_request_pb(&body),
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(replay.issuance_id, msg.issuance_id);
    assert_eq!(replay.tx_code, "", "a replay does not repeat the tx code");
    let read = grpc
        .get_issuance(crate::helpers::authed(
            &token,
            issuer::grpc::pb::GetIssuanceRequest {
                issuance_id: msg.issuance_id.clone(),
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(read.tx_code, "");

    // The code works at the token endpoint; the REST view is the same issuance.
    let offer = resolve_offer(&app.http, &msg.credential_offer_uri).await;
    assert_eq!(
        offer["grants"][PRE_AUTH_GRANT]["tx_code"]["length"], 6,
        "{offer}"
    );
    let issuer = discover(&app.http, offer["credential_issuer"].as_str().unwrap()).await;
    let code = pre_authorized_code(&offer);
    let res = issuer.token_request(&app.http, &code, &[]).await;
    expect_error(res, 400, "invalid_request", "missing tx_code").await;
    issuer
        .access_token_with(&app.http, &code, &[("tx_code", &tx)])
        .await;
}

// ---------------------------------------------------------------------------------------------
// The test wallet itself: its verifier refuses what it must refuse
// ---------------------------------------------------------------------------------------------

fn refused(sd_jwt: &str, jwks: &Value) -> bool {
    let (sd_jwt, jwks) = (sd_jwt.to_owned(), jwks.clone());
    std::panic::catch_unwind(move || {
        verify_sd_jwt(&sd_jwt, &jwks);
    })
    .is_err()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_test_wallet_refuses_tampered_sd_jwts() {
    let dir = tempfile::tempdir().unwrap();
    let app = TestApp::spawn(embedded_settings(dir.path())).await;
    let (_, token) = app.tenant_token().await;
    let s = session(&app, &token, "tamper-1").await;
    let issued = s.issue(&app, &HolderKey::generate()).await;
    let sd_jwt = issued["credentials"][0]["credential"].as_str().unwrap();
    let jwks = issuer_jwks(&app.http, &issuer_id(&app)).await;
    assert!(!refused(sd_jwt, &jwks), "the genuine credential verifies");

    let parts: Vec<&str> = sd_jwt.split('~').collect();
    let (jwt, disclosures) = (parts[0], &parts[1..parts.len() - 1]);

    // A disclosure with a changed value is not referenced by any digest.
    let mut d: Value = serde_json::from_slice(
        &base64::Engine::decode(
            &base64::engine::general_purpose::URL_SAFE_NO_PAD,
            disclosures[0],
        )
        .unwrap(),
    )
    .unwrap();
    let last = d.as_array().unwrap().len() - 1;
    d[last] = "forged".into();
    let mut forged: Vec<String> = disclosures.iter().map(|s| (*s).to_owned()).collect();
    forged[0] = b64_json(&d);
    assert!(refused(&format!("{jwt}~{}~", forged.join("~")), &jwks));
    // A disclosure twice.
    assert!(refused(
        &format!("{jwt}~{}~{}~", disclosures.join("~"), disclosures[0]),
        &jwks
    ));
    // A payload changed under the signature.
    let segs: Vec<&str> = jwt.split('.').collect();
    let mut payload: Value = serde_json::from_slice(
        &base64::Engine::decode(&base64::engine::general_purpose::URL_SAFE_NO_PAD, segs[1])
            .unwrap(),
    )
    .unwrap();
    payload["exp"] = (now() + 10 * 365 * 86400).into();
    let resigned = format!("{}.{}.{}", segs[0], b64_json(&payload), segs[2]);
    assert!(refused(
        &format!("{resigned}~{}~", disclosures.join("~")),
        &jwks
    ));
    // Signed by another key under the same kid.
    let other = HolderKey::generate();
    let header: Value = serde_json::from_slice(
        &base64::Engine::decode(&base64::engine::general_purpose::URL_SAFE_NO_PAD, segs[0])
            .unwrap(),
    )
    .unwrap();
    let fake = compact(&header, &payload, |m| other.sign(m));
    assert!(refused(
        &format!("{fake}~{}~", disclosures.join("~")),
        &jwks
    ));
    // Keys that are not the issuer's.
    assert!(refused(sd_jwt, &json!({"keys": []})));
}

/// Key rotation: retired credential keys stay published beside the current one, so
/// credentials they signed keep verifying until they expire.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retired_credential_keys_stay_published() {
    let dir = tempfile::tempdir().unwrap();
    let current = issuer_auth::SigningKey::generate();
    let retired = [
        issuer_auth::SigningKey::generate(),
        issuer_auth::SigningKey::generate(),
    ];
    let bundle = dir.path().join("previous.pem");
    std::fs::write(
        &bundle,
        format!("{}\n{}", retired[0].to_pem(), retired[1].to_pem()),
    )
    .unwrap();
    let settings = issuer::Settings {
        credential_signing_key: Some(issuer::config::Secret::new(current.to_pem())),
        credential_previous_keys_file: Some(bundle),
        ..crate::helpers::embedded_settings(dir.path())
    };
    let app = TestApp::spawn(settings).await;
    let meta: Value = app
        .http
        .get(app.url("/.well-known/jwt-vc-issuer/issuer"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(meta["issuer"], app.url("/issuer"));
    let kids: Vec<&str> = meta["jwks"]["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["kid"].as_str().unwrap())
        .collect();
    assert_eq!(kids, [current.kid(), retired[0].kid(), retired[1].kid()]);
    assert!(
        meta["jwks"]["keys"]
            .as_array()
            .unwrap()
            .iter()
            .all(|k| k.get("d").is_none()),
        "only public keys are published"
    );
}

/// Web wallets can call the wallet-facing endpoints from any origin; the management API
/// grants no origin anything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wallet_endpoints_allow_cross_origin_calls_and_management_does_not() {
    let dir = tempfile::tempdir().unwrap();
    let app = TestApp::spawn(crate::helpers::embedded_settings(dir.path())).await;
    let preflight = |path: &str| {
        app.http
            .request(reqwest::Method::OPTIONS, app.url(path))
            .header("origin", "https://wallet.example")
            .header("access-control-request-method", "POST")
            .header(
                "access-control-request-headers",
                "authorization, content-type",
            )
            .send()
    };
    for path in [
        "/issuer/oid4vci/v1/credential",
        "/issuer/oid4vci/v1/nonce",
        "/issuer/oauth/token",
    ] {
        let res = preflight(path).await.unwrap();
        assert!(res.status().is_success(), "{path}: {}", res.status());
        assert_eq!(res.headers()["access-control-allow-origin"], "*", "{path}");
        let allowed = res.headers()["access-control-allow-headers"]
            .to_str()
            .unwrap()
            .to_lowercase();
        assert!(allowed.contains("authorization"), "{path}: {allowed}");
    }
    let meta = app
        .http
        .get(app.url("/.well-known/openid-credential-issuer/issuer"))
        .header("origin", "https://wallet.example")
        .send()
        .await
        .unwrap();
    assert_eq!(meta.headers()["access-control-allow-origin"], "*");

    let res = preflight("/issuer/api/v1/issuances").await.unwrap();
    assert!(res.headers().get("access-control-allow-origin").is_none());
}

/// Once a wallet has redeemed the code, the recipient's landing page says the offer is used,
/// before and after the credential is issued, and shows no link.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_landing_page_says_used_once_a_wallet_redeemed_the_offer() {
    let (_db, app) = pg_app().await;
    let (_, token) = app.tenant_token().await;
    let session = session(&app, &token, "landing-used").await;
    let offer_id = offer_uri(&session.issuance)
        .rsplit("%2F")
        .next()
        .unwrap()
        .to_owned();
    let landing = || async {
        let res = app
            .http
            .get(app.url(&format!("/issuer/offer/{offer_id}")))
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 200);
        res.text().await.unwrap()
    };
    let html = landing().await;
    assert!(html.contains("This offer has already been used"), "{html}");
    assert!(!html.contains("openid-credential-offer"));
    session.issue(&app, &HolderKey::generate()).await;
    let html = landing().await;
    assert!(html.contains("This offer has already been used"), "{html}");
}
