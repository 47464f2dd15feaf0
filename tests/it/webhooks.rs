//! Webhooks end to end (DESIGN §9): endpoint management, deliveries from the outbox to a real
//! HTTP receiver, Standard Webhooks signatures verified here from the specification (HMAC-SHA256
//! with aws-lc-rs, not the service's signing code), retries, `Retry-After`, 410, secret rotation,
//! exactly-once delivery across two replicas, lease takeover, and the SSRF guard.

use std::{
    collections::{HashMap, HashSet, VecDeque},
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use aws_lc_rs::hmac;
use axum::{
    Router,
    body::Bytes,
    extract::State,
    http::{HeaderMap, StatusCode},
    response::{IntoResponse, Response},
    serve::ListenerExt,
};
use base64::{Engine, engine::general_purpose::STANDARD};
use futures::StreamExt;
use issuer::Settings;
use issuer_domain::model::Scope;
use serde_json::{Value, json};

use crate::helpers::{Creds, TestApp, TestDb, create_body, pg_settings, redis_url};
use crate::wallet::client::{HolderKey, discover, expect_json, pre_authorized_code, resolve_offer};

const EP: &str = "/issuer/api/v1/webhook-endpoints";
const CONFIG_ID: &str = "learcredential.employee.sd.1";

// ---------------------------------------------------------------------------------------------
// A real HTTP receiver.

/// What the receiver answers to one request.
#[derive(Clone, Debug)]
enum Reply {
    Status(u16, Vec<(&'static str, String)>),
    /// Never answers (the sender's timeout ends the attempt).
    Hang,
}

fn status(code: u16) -> Reply {
    Reply::Status(code, Vec::new())
}

/// One request as the receiver saw it.
#[derive(Clone, Debug)]
struct Hit {
    headers: HeaderMap,
    body: Vec<u8>,
    at: Instant,
}

impl Hit {
    fn header(&self, name: &str) -> String {
        self.headers
            .get(name)
            .unwrap_or_else(|| panic!("no `{name}` header in {:?}", self.headers))
            .to_str()
            .unwrap()
            .to_owned()
    }

    fn id(&self) -> String {
        self.header("webhook-id")
    }

    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).expect("the body is JSON")
    }

    /// The base64 part of every `v1,` entry of `webhook-signature`.
    fn signatures(&self) -> Vec<String> {
        self.header("webhook-signature")
            .split(' ')
            .map(|e| {
                e.strip_prefix("v1,")
                    .unwrap_or_else(|| panic!("signature entry without `v1,`: {e}"))
                    .to_owned()
            })
            .collect()
    }

    /// How many of the signatures verify with `secret` (Standard Webhooks: HMAC-SHA256 over
    /// `{id}.{timestamp}.{body}` with the base64-decoded part of the `whsec_` secret).
    fn verified_by(&self, secret: &str) -> usize {
        let key = STANDARD
            .decode(secret.strip_prefix("whsec_").expect("whsec_ secret"))
            .expect("base64 secret");
        let key = hmac::Key::new(hmac::HMAC_SHA256, &key);
        let mut signed =
            format!("{}.{}.", self.id(), self.header("webhook-timestamp")).into_bytes();
        signed.extend_from_slice(&self.body);
        let expected = STANDARD.encode(hmac::sign(&key, &signed).as_ref());
        self.signatures().iter().filter(|s| **s == expected).count()
    }

    /// Every Standard Webhooks header is present and well-formed and the signature verifies.
    fn assert_signed(&self, secret: &str) {
        assert!(!self.id().is_empty());
        assert_eq!(self.header("content-type"), "application/json");
        let ts: i64 = self
            .header("webhook-timestamp")
            .parse()
            .expect("unix seconds");
        let now = chrono::Utc::now().timestamp();
        assert!((now - ts).abs() < 60, "webhook-timestamp {ts} vs now {now}");
        assert_eq!(
            self.verified_by(secret),
            1,
            "webhook-signature must verify with the endpoint secret: {}",
            self.header("webhook-signature")
        );
    }
}

struct Inner {
    hits: Mutex<Vec<Hit>>,
    script: Mutex<VecDeque<Reply>>,
    default: Reply,
    connections: AtomicUsize,
}

/// An axum receiver on 127.0.0.1:0 recording every request and answering from a script (then
/// `default`).
struct Receiver {
    addr: SocketAddr,
    inner: Arc<Inner>,
}

async fn receive(State(inner): State<Arc<Inner>>, headers: HeaderMap, body: Bytes) -> Response {
    inner.hits.lock().unwrap().push(Hit {
        headers,
        body: body.to_vec(),
        at: Instant::now(),
    });
    let reply = inner
        .script
        .lock()
        .unwrap()
        .pop_front()
        .unwrap_or_else(|| inner.default.clone());
    match reply {
        Reply::Status(code, headers) => {
            let mut res = StatusCode::from_u16(code).unwrap().into_response();
            for (k, v) in headers {
                res.headers_mut().insert(k, v.parse().unwrap());
            }
            res
        }
        Reply::Hang => {
            tokio::time::sleep(Duration::from_secs(3600)).await;
            StatusCode::OK.into_response()
        }
    }
}

impl Receiver {
    async fn start(script: Vec<Reply>, default: Reply) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let inner = Arc::new(Inner {
            hits: Mutex::default(),
            script: Mutex::new(script.into()),
            default,
            connections: AtomicUsize::new(0),
        });
        let counted = inner.clone();
        let listener = listener.tap_io(move |_| {
            counted.connections.fetch_add(1, Ordering::SeqCst);
        });
        let router = Router::new().fallback(receive).with_state(inner.clone());
        tokio::spawn(async move { axum::serve(listener, router).await });
        Self { addr, inner }
    }

    async fn ok() -> Self {
        Self::start(Vec::new(), status(200)).await
    }

    fn url(&self) -> String {
        format!("http://{}/hook", self.addr)
    }

    fn hits(&self) -> Vec<Hit> {
        self.inner.hits.lock().unwrap().clone()
    }

    fn connections(&self) -> usize {
        self.inner.connections.load(Ordering::SeqCst)
    }

    /// Waits until at least `n` requests arrived.
    async fn wait_for(&self, n: usize, within: Duration) -> Vec<Hit> {
        let deadline = Instant::now() + within;
        loop {
            let hits = self.hits();
            if hits.len() >= n {
                return hits;
            }
            assert!(
                Instant::now() < deadline,
                "expected {n} webhook requests within {within:?}, got {}: {:?}",
                hits.len(),
                hits.iter().map(Hit::json).collect::<Vec<_>>()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// A bare TCP listener that only counts connections (for "no connection was made").
struct Silent {
    port: u16,
    accepted: Arc<AtomicUsize>,
}

impl Silent {
    async fn start() -> Self {
        let v4 = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = v4.local_addr().unwrap().port();
        let accepted = Arc::new(AtomicUsize::new(0));
        let mut listeners = vec![v4];
        // `localhost` may resolve to ::1 as well: listen there too when possible.
        if let Ok(v6) = tokio::net::TcpListener::bind(("::1", port)).await {
            listeners.push(v6);
        }
        for l in listeners {
            let accepted = accepted.clone();
            tokio::spawn(async move {
                while let Ok((_sock, _)) = l.accept().await {
                    accepted.fetch_add(1, Ordering::SeqCst);
                }
            });
        }
        Self { port, accepted }
    }

    fn connections(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }
}

// ---------------------------------------------------------------------------------------------
// The service side.

fn hook_settings(db: &TestDb) -> Settings {
    Settings {
        webhook_allow_networks: "127.0.0.0/8,::1/128".into(),
        webhook_retry_schedule: Some("200ms,300ms,400ms".into()),
        webhook_timeout_ms: 2_000,
        sweep_interval_ms: 200,
        ..pg_settings(&db.url, Some(&redis_url()))
    }
}

async fn send(
    req: reqwest::RequestBuilder,
    token: &str,
    body: Option<&Value>,
) -> reqwest::Response {
    let req = req.bearer_auth(token);
    let req = match body {
        Some(b) => req.json(b),
        None => req,
    };
    req.send().await.unwrap()
}

async fn json_of(res: reqwest::Response, status: u16, what: &str) -> Value {
    let code = res.status().as_u16();
    let text = res.text().await.unwrap();
    assert_eq!(code, status, "{what}: {text}");
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{what}: {e}: {text}"))
}

async fn register(app: &TestApp, token: &str, body: &Value) -> Value {
    let res = send(app.http.post(app.url(EP)), token, Some(body)).await;
    json_of(res, 201, "register endpoint").await
}

async fn endpoint(app: &TestApp, token: &str, id: &str) -> Value {
    let res = send(app.http.get(app.url(&format!("{EP}/{id}"))), token, None).await;
    json_of(res, 200, "read endpoint").await
}

async fn deliveries(app: &TestApp, token: &str, id: &str) -> Vec<Value> {
    let res = send(
        app.http.get(app.url(&format!("{EP}/{id}/deliveries"))),
        token,
        None,
    )
    .await;
    json_of(res, 200, "deliveries").await["deliveries"]
        .as_array()
        .unwrap()
        .clone()
}

/// Polls the delivery log until `pred` holds for it.
async fn wait_deliveries(
    app: &TestApp,
    token: &str,
    id: &str,
    within: Duration,
    pred: impl Fn(&[Value]) -> bool,
) -> Vec<Value> {
    let deadline = Instant::now() + within;
    loop {
        let d = deliveries(app, token, id).await;
        if pred(&d) {
            return d;
        }
        assert!(
            Instant::now() < deadline,
            "delivery log not as expected within {within:?}: {d:#?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn create(app: &TestApp, token: &str, body: &Value) -> String {
    let res = app.create_rest(token, body).await;
    json_of(res, 201, "create issuance").await["issuance_id"]
        .as_str()
        .unwrap()
        .to_owned()
}

async fn cancel(app: &TestApp, token: &str, id: &str) {
    let res = send(
        app.http
            .post(app.url(&format!("/issuer/api/v1/issuances/{id}/cancel"))),
        token,
        None,
    )
    .await;
    json_of(res, 200, "cancel").await;
}

/// Creates and cancels an issuance; returns its id.
async fn cancelled(app: &TestApp, token: &str, crid: &str) -> String {
    let id = create(app, token, &create_body(crid)).await;
    cancel(app, token, &id).await;
    id
}

/// Drives the wallet to a credential (the issuance becomes `accepted`); returns the issuance
/// id, and the wallet's issuer, access token and notification id.
async fn wallet_accepts(
    app: &TestApp,
    token: &str,
    crid: &str,
) -> (String, crate::wallet::client::Issuer, String, String) {
    let res = app.create_rest(token, &create_body(crid)).await;
    let issuance = expect_json(res, 201, "create").await;
    let offer = resolve_offer(
        &app.http,
        issuance["credential_offer_uri"].as_str().unwrap(),
    )
    .await;
    let issuer = discover(&app.http, offer["credential_issuer"].as_str().unwrap()).await;
    let access = issuer
        .access_token(&app.http, &pre_authorized_code(&offer))
        .await;
    let res = issuer
        .request_credential(&app.http, &access, &HolderKey::generate())
        .await;
    let credential = expect_json(res, 200, "credential request").await;
    let notification = credential["notification_id"].as_str().unwrap().to_owned();
    (
        issuance["issuance_id"].as_str().unwrap().to_owned(),
        issuer,
        access,
        notification,
    )
}

/// The body's `data` is the issuance's: ids, configuration, and the event at `sequence` in the
/// store's log has that status and reason.
async fn assert_payload_matches(app: &TestApp, creds: &Creds, hit: &Hit, crid: &str) {
    let body = hit.json();
    let data = &body["data"];
    assert!(
        chrono::DateTime::parse_from_rfc3339(body["timestamp"].as_str().unwrap()).is_ok(),
        "{body}"
    );
    assert_eq!(data["client_request_id"], crid, "{body}");
    assert_eq!(data["credential_configuration_id"], CONFIG_ID, "{body}");
    let tenant = creds.tenant_id.parse().unwrap();
    let id = data["issuance_id"].as_str().unwrap().parse().unwrap();
    let events = app.app.store.list_events(tenant, id, 0).await.unwrap();
    let seq = data["sequence"].as_i64().unwrap();
    let event = events
        .iter()
        .find(|e| e.sequence == seq)
        .unwrap_or_else(|| panic!("no event {seq} for {body}"));
    assert_eq!(data["status"], event.status.as_str(), "{body}");
    assert_eq!(data["reason"].as_str(), event.reason.as_deref(), "{body}");
    if event.reason.is_none() {
        assert!(data.get("reason").is_none_or(Value::is_null), "{body}");
    }
}

fn find<'a>(hits: &'a [Hit], kind: &str, issuance: &str) -> &'a Hit {
    let all: Vec<&Hit> = hits
        .iter()
        .filter(|h| {
            let b = h.json();
            b["type"] == kind && b["data"]["issuance_id"] == issuance
        })
        .collect();
    assert_eq!(
        all.len(),
        1,
        "exactly one {kind} for {issuance} in {:?}",
        hits.iter().map(Hit::json).collect::<Vec<_>>()
    );
    all[0]
}

// ---------------------------------------------------------------------------------------------
// Management.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpoints_are_managed_validated_and_tenant_scoped() {
    let db = TestDb::new().await;
    let app = TestApp::spawn(hook_settings(&db)).await;
    let (_, token) = app.tenant_token().await;
    let rx = Receiver::ok().await;

    let created = register(&app, &token, &json!({"url": rx.url()})).await;
    let id = created["id"].as_str().unwrap().to_owned();
    let secret = created["secret"].as_str().unwrap();
    assert!(secret.starts_with("whsec_"), "{created}");
    assert!(STANDARD.decode(&secret[6..]).is_ok_and(|k| k.len() >= 24));
    assert_eq!(created["url"], rx.url());
    assert_eq!(
        created["event_types"],
        json!(["issuance.accepted", "issuance.rejected", "issuance.error"])
    );
    assert_eq!(created["enabled"], true);
    assert!(created["disabled_reason"].is_null() && created["failing_since"].is_null());
    assert!(created["created_at"].is_string() && created["updated_at"].is_string());

    // The secret is shown once.
    let read = endpoint(&app, &token, &id).await;
    assert!(read.get("secret").is_none(), "{read}");
    let list = json_of(
        send(app.http.get(app.url(EP)), &token, None).await,
        200,
        "list",
    )
    .await;
    let list = list["webhook_endpoints"].as_array().unwrap();
    assert_eq!(list.len(), 1);
    assert_eq!(list[0]["id"], id.as_str());
    assert!(list[0].get("secret").is_none(), "{list:?}");

    // Validation: problem+json naming the field.
    for (body, field) in [
        (json!({"url": "not a url"}), "url"),
        (json!({"url": "ftp://example.com/"}), "url"),
        (json!({}), "url"),
        (
            json!({"url": rx.url(), "event_types": ["issuance.accepted", "issuance.nope"]}),
            "event_types[1]",
        ),
    ] {
        let res = send(app.http.post(app.url(EP)), &token, Some(&body)).await;
        assert_eq!(res.status(), 400, "{body}");
        assert_eq!(
            res.headers()["content-type"],
            "application/problem+json",
            "{body}"
        );
        let problem: Value = res.json().await.unwrap();
        let fields: Vec<&str> = problem["errors"]
            .as_array()
            .unwrap_or_else(|| panic!("{problem}"))
            .iter()
            .map(|e| e["field"].as_str().unwrap())
            .collect();
        assert!(fields.contains(&field), "{body} → {problem}");
    }

    // Opt-in types; PATCH.
    let res = send(
        app.http.patch(app.url(&format!("{EP}/{id}"))),
        &token,
        Some(&json!({"event_types": ["issuance.created", "issuance.offer_retrieved"], "enabled": false})),
    )
    .await;
    let patched = json_of(res, 200, "patch").await;
    assert_eq!(
        patched["event_types"],
        json!(["issuance.created", "issuance.offer_retrieved"])
    );
    assert_eq!(patched["enabled"], false);
    assert_eq!(endpoint(&app, &token, &id).await["enabled"], false);
    let res = send(
        app.http.patch(app.url(&format!("{EP}/{id}"))),
        &token,
        Some(&json!({"url": "http://[::1]:1/", "enabled": true})),
    )
    .await;
    let patched = json_of(res, 200, "patch").await;
    assert_eq!(patched["enabled"], true);
    assert!(patched["disabled_reason"].is_null());
    let res = send(
        app.http.patch(app.url(&format!("{EP}/{id}"))),
        &token,
        Some(&json!({"url": "gopher://x/"})),
    )
    .await;
    assert_eq!(res.status(), 400);

    // Another tenant sees nothing.
    let (_, other) = app.tenant_token().await;
    let paths = [
        format!("{EP}/{id}"),
        format!("{EP}/{id}/deliveries"),
        format!("{EP}/{id}/deliveries/{}/retry", uuid::Uuid::new_v4()),
        format!("{EP}/{id}/rotate-secret"),
    ];
    assert_eq!(
        send(app.http.get(app.url(&paths[0])), &other, None)
            .await
            .status(),
        404
    );
    assert_eq!(
        send(
            app.http.patch(app.url(&paths[0])),
            &other,
            Some(&json!({"enabled": false}))
        )
        .await
        .status(),
        404
    );
    assert_eq!(
        send(app.http.delete(app.url(&paths[0])), &other, None)
            .await
            .status(),
        404
    );
    assert_eq!(
        send(app.http.get(app.url(&paths[1])), &other, None)
            .await
            .status(),
        404
    );
    assert_eq!(
        send(app.http.post(app.url(&paths[2])), &other, None)
            .await
            .status(),
        404
    );
    assert_eq!(
        send(app.http.post(app.url(&paths[3])), &other, Some(&json!({})))
            .await
            .status(),
        404
    );
    let other_list = json_of(
        send(app.http.get(app.url(EP)), &other, None).await,
        200,
        "list",
    )
    .await;
    assert_eq!(other_list["webhook_endpoints"], json!([]));

    // The scope is required.
    let creds = app
        .provision(&[Scope::IssuanceWrite, Scope::IssuanceRead])
        .await;
    let narrow = app.token(&creds).await;
    assert_eq!(
        send(app.http.get(app.url(EP)), &narrow, None)
            .await
            .status(),
        403
    );

    // Delete.
    assert_eq!(
        send(app.http.delete(app.url(&paths[0])), &token, None)
            .await
            .status(),
        204
    );
    assert_eq!(
        send(app.http.get(app.url(&paths[0])), &token, None)
            .await
            .status(),
        404
    );
}

// ---------------------------------------------------------------------------------------------
// Test 1: every event type, signed, with the issuance's data; filters.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_outcome_is_delivered_signed_and_only_to_subscribers() {
    let db = TestDb::new().await;
    let app = TestApp::spawn(hook_settings(&db)).await;
    let (creds, token) = app.tenant_token().await;
    let outcomes = Receiver::ok().await;
    let created_only = Receiver::ok().await;
    let ep = register(&app, &token, &json!({"url": outcomes.url()})).await;
    let secret = ep["secret"].as_str().unwrap().to_owned();
    let ep2 = register(
        &app,
        &token,
        &json!({"url": created_only.url(), "event_types": ["issuance.created"]}),
    )
    .await;
    let secret2 = ep2["secret"].as_str().unwrap().to_owned();
    assert_ne!(secret, secret2);

    let mut body = create_body("wh-expired");
    body["expires_in"] = json!(2);
    let expired = create(&app, &token, &body).await;
    let cancelled_id = cancelled(&app, &token, "wh-cancelled").await;
    let (accepted, _, _, _) = wallet_accepts(&app, &token, "wh-accepted").await;
    let (failed, issuer, access, notification) = wallet_accepts(&app, &token, "wh-failed").await;
    let res = issuer
        .notify(&app.http, &access, &notification, "credential_failure")
        .await;
    assert_eq!(res.status(), 204);

    // rejected ×2, accepted ×2, error ×1.
    let hits = outcomes.wait_for(5, Duration::from_secs(20)).await;
    for h in &hits {
        h.assert_signed(&secret);
        assert_eq!(
            h.verified_by(&secret2),
            0,
            "signed with another endpoint's secret"
        );
    }
    let h = find(&hits, "issuance.rejected", &expired);
    assert_eq!(h.json()["data"]["reason"], "expired");
    assert_payload_matches(&app, &creds, h, "wh-expired").await;
    let h = find(&hits, "issuance.rejected", &cancelled_id);
    assert_eq!(h.json()["data"]["reason"], "cancelled");
    assert_eq!(h.json()["data"]["status"], "rejected");
    assert_payload_matches(&app, &creds, h, "wh-cancelled").await;
    let h = find(&hits, "issuance.accepted", &accepted);
    assert_eq!(h.json()["data"]["status"], "accepted");
    assert_payload_matches(&app, &creds, h, "wh-accepted").await;
    let h = find(&hits, "issuance.accepted", &failed);
    assert_payload_matches(&app, &creds, h, "wh-failed").await;
    let h = find(&hits, "issuance.error", &failed);
    assert_eq!(h.json()["data"]["status"], "error");
    assert_payload_matches(&app, &creds, h, "wh-failed").await;
    let ids: HashSet<String> = hits.iter().map(Hit::id).collect();
    assert_eq!(ids.len(), hits.len(), "one webhook-id per event");

    // The created-only endpoint gets the four creations and nothing else.
    created_only.wait_for(4, Duration::from_secs(10)).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let created = created_only.hits();
    assert_eq!(created.len(), 4, "only the created events");
    let mut crids = Vec::new();
    for h in &created {
        h.assert_signed(&secret2);
        let b = h.json();
        assert_eq!(b["type"], "issuance.created", "{b}");
        assert_eq!(b["data"]["status"], "pending", "{b}");
        assert_eq!(b["data"]["sequence"], 1, "{b}");
        crids.push(b["data"]["client_request_id"].as_str().unwrap().to_owned());
        assert_payload_matches(&app, &creds, h, crids.last().unwrap()).await;
    }
    crids.sort();
    assert_eq!(
        crids,
        ["wh-accepted", "wh-cancelled", "wh-expired", "wh-failed"]
    );
    // And the outcome endpoint got no creation or offer retrieval.
    assert_eq!(
        outcomes.hits().len(),
        5,
        "no opt-in events to the default endpoint"
    );

    // The delivery log agrees.
    let log = deliveries(&app, &token, ep["id"].as_str().unwrap()).await;
    assert_eq!(log.len(), 5, "{log:#?}");
    for d in &log {
        assert_eq!(d["state"], "delivered", "{d}");
        assert_eq!(d["attempts"], 1, "{d}");
        assert_eq!(d["last_status"], 200, "{d}");
        assert!(ids.contains(d["webhook_id"].as_str().unwrap()), "{d}");
    }
}

/// Revoke, suspend and reinstate are announced to the endpoints that ask for them, signed,
/// with the caller's reason and the credential status after the change.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credential_status_changes_are_delivered_signed() {
    let db = TestDb::new().await;
    let app = TestApp::spawn(hook_settings(&db)).await;
    let (creds, token) = app.tenant_token().await;
    let receiver = Receiver::ok().await;
    let ep = register(
        &app,
        &token,
        &json!({"url": receiver.url(), "event_types": [
            "credential.revoked", "credential.suspended", "credential.reinstated"
        ]}),
    )
    .await;
    let secret = ep["secret"].as_str().unwrap().to_owned();
    let (id, _, _, _) = wallet_accepts(&app, &token, "wh-status").await;
    for (action, reason) in [("suspend", "audit"), ("reinstate", ""), ("revoke", "left")] {
        let res = app
            .http
            .post(app.url(&format!("/issuer/api/v1/issuances/{id}/{action}")))
            .bearer_auth(&token)
            .json(&json!({"reason": reason}))
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 200, "{action}");
    }
    let hits = receiver.wait_for(3, Duration::from_secs(20)).await;
    for (kind, status, reason) in [
        ("credential.suspended", "suspended", Some("audit")),
        ("credential.reinstated", "valid", None),
        ("credential.revoked", "revoked", Some("left")),
    ] {
        let h = find(&hits, kind, &id);
        h.assert_signed(&secret);
        let data = &h.json()["data"];
        assert_eq!(data["status"], "accepted", "{data}");
        assert_eq!(data["reason"].as_str(), reason, "{data}");
        assert_payload_matches(&app, &creds, h, "wh-status").await;
        // The credential status right after the change it announces.
        assert_eq!(data["credential_status"], status, "{data}");
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        receiver.hits().len(),
        3,
        "no outcome webhooks to this endpoint"
    );
}

async fn rotate(app: &TestApp, token: &str, ep_id: &str, body: Value) -> Value {
    let req = app
        .http
        .post(app.url(&format!("{EP}/{ep_id}/rotate-secret")));
    json_of(send(req, token, Some(&body)).await, 200, "rotate").await
}

/// DESIGN §9: the dispatcher is woken when something commits, not only by its 1 s poll.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deliveries_follow_the_change_promptly() {
    let db = TestDb::new().await;
    let app = TestApp::spawn(hook_settings(&db)).await;
    let (_, token) = app.tenant_token().await;
    let rx = Receiver::ok().await;
    register(&app, &token, &json!({"url": rx.url()})).await;
    let mut lags = Vec::new();
    for i in 0..6 {
        let id = create(&app, &token, &create_body(&format!("wh-prompt-{i}"))).await;
        let before = Instant::now();
        cancel(&app, &token, &id).await;
        let hits = rx.wait_for(i + 1, Duration::from_secs(5)).await;
        lags.push(hits[i].at - before);
    }
    let mean = lags.iter().sum::<Duration>() / lags.len() as u32;
    assert!(
        mean < Duration::from_millis(400) && lags.iter().all(|l| *l < Duration::from_millis(900)),
        "deliveries lag behind the change: {lags:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_are_retried_with_the_same_webhook_id_until_delivered() {
    let db = TestDb::new().await;
    let app = TestApp::spawn(hook_settings(&db)).await;
    let (_, token) = app.tenant_token().await;
    let rx = Receiver::start(vec![status(500), status(500)], status(200)).await;
    let ep = register(&app, &token, &json!({"url": rx.url()})).await;
    let (ep_id, secret) = (ep["id"].as_str().unwrap(), ep["secret"].as_str().unwrap());

    let issuance = cancelled(&app, &token, "wh-retry").await;
    let hits = rx.wait_for(3, Duration::from_secs(10)).await;
    for h in &hits {
        h.assert_signed(secret);
        assert_eq!(h.json()["data"]["issuance_id"], issuance.as_str());
    }
    assert_eq!(hits[0].id(), hits[1].id());
    assert_eq!(hits[1].id(), hits[2].id());
    assert_eq!(
        hits[0].body, hits[2].body,
        "the same message on every attempt"
    );
    // 200 ms then 300 ms, ±10 % jitter.
    let gaps = [hits[1].at - hits[0].at, hits[2].at - hits[1].at];
    assert!(gaps[0] >= Duration::from_millis(170), "{gaps:?}");
    assert!(gaps[1] >= Duration::from_millis(260), "{gaps:?}");

    let log = wait_deliveries(&app, &token, ep_id, Duration::from_secs(5), |d| {
        d.len() == 1 && d[0]["state"] == "delivered"
    })
    .await;
    let d = &log[0];
    assert_eq!(d["attempts"], 3, "{d}");
    assert_eq!(d["last_status"], 200, "{d}");
    assert!(d["last_error"].is_null(), "{d}");
    assert!(d["next_attempt_at"].is_null(), "{d}");
    assert_eq!(d["webhook_id"], hits[0].id().as_str());
    assert_eq!(d["event_type"], "issuance.rejected");
    assert_eq!(d["issuance_id"], issuance.as_str());
    assert!(d["last_latency_ms"].is_i64(), "{d}");
    assert_eq!(rx.hits().len(), 3, "nothing after success");

    // A manual retry sends it again, with the same webhook-id.
    let res = send(
        app.http.post(app.url(&format!(
            "{EP}/{ep_id}/deliveries/{}/retry",
            d["id"].as_str().unwrap()
        ))),
        &token,
        None,
    )
    .await;
    assert_eq!(res.status(), 202);
    let hits = rx.wait_for(4, Duration::from_secs(5)).await;
    assert_eq!(hits[3].id(), hits[0].id());
    hits[3].assert_signed(secret);
    wait_deliveries(&app, &token, ep_id, Duration::from_secs(5), |d| {
        d[0]["state"] == "delivered" && d[0]["attempts"] == 4
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timeouts_and_429_are_retried() {
    let db = TestDb::new().await;
    let mut settings = hook_settings(&db);
    settings.webhook_timeout_ms = 500;
    let app = TestApp::spawn(settings).await;
    let (_, token) = app.tenant_token().await;
    let rx = Receiver::start(vec![Reply::Hang, status(429)], status(204)).await;
    let ep = register(&app, &token, &json!({"url": rx.url()})).await;
    let ep_id = ep["id"].as_str().unwrap();
    cancelled(&app, &token, "wh-timeout").await;
    let hits = rx.wait_for(3, Duration::from_secs(10)).await;
    assert!(hits.iter().all(|h| h.id() == hits[0].id()));
    assert!(hits[1].at - hits[0].at >= Duration::from_millis(500 + 170));
    let log = wait_deliveries(&app, &token, ep_id, Duration::from_secs(5), |d| {
        d[0]["state"] == "delivered"
    })
    .await;
    assert_eq!(log[0]["attempts"], 3, "{log:#?}");
    assert_eq!(log[0]["last_status"], 204, "{log:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_after_is_honoured() {
    let db = TestDb::new().await;
    let app = TestApp::spawn(hook_settings(&db)).await;
    let (_, token) = app.tenant_token().await;
    let rx = Receiver::start(
        vec![Reply::Status(503, vec![("retry-after", "2".into())])],
        status(200),
    )
    .await;
    let ep = register(&app, &token, &json!({"url": rx.url()})).await;
    let ep_id = ep["id"].as_str().unwrap();
    cancelled(&app, &token, "wh-retry-after").await;
    rx.wait_for(1, Duration::from_secs(5)).await;
    let log = wait_deliveries(&app, &token, ep_id, Duration::from_secs(2), |d| {
        d.len() == 1 && d[0]["attempts"] == 1
    })
    .await;
    assert_eq!(log[0]["state"], "pending", "{log:#?}");
    assert_eq!(log[0]["last_status"], 503, "{log:#?}");
    assert!(log[0]["last_error"].is_string(), "{log:#?}");
    assert!(log[0]["next_attempt_at"].is_string(), "{log:#?}");

    let hits = rx.wait_for(2, Duration::from_secs(6)).await;
    let gap = hits[1].at - hits[0].at;
    assert!(
        gap >= Duration::from_millis(1_950),
        "Retry-After: 2 overrides the 200 ms schedule, got {gap:?}"
    );
    assert_eq!(hits[0].id(), hits[1].id());
    wait_deliveries(&app, &token, ep_id, Duration::from_secs(3), |d| {
        d[0]["state"] == "delivered" && d[0]["attempts"] == 2
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gone_disables_the_endpoint() {
    let db = TestDb::new().await;
    let app = TestApp::spawn(hook_settings(&db)).await;
    let (_, token) = app.tenant_token().await;
    let rx = Receiver::start(vec![status(410)], status(200)).await;
    let ep = register(&app, &token, &json!({"url": rx.url()})).await;
    let ep_id = ep["id"].as_str().unwrap();
    cancelled(&app, &token, "wh-gone-1").await;
    rx.wait_for(1, Duration::from_secs(5)).await;
    let log = wait_deliveries(&app, &token, ep_id, Duration::from_secs(5), |d| {
        d.len() == 1 && d[0]["attempts"] == 1
    })
    .await;
    assert_eq!(log[0]["state"], "failed", "{log:#?}");
    assert_eq!(log[0]["last_status"], 410, "{log:#?}");
    let read = endpoint(&app, &token, ep_id).await;
    assert_eq!(read["enabled"], false, "{read}");
    assert_eq!(read["disabled_reason"], "gone", "{read}");

    // Later events are not sent (the receiver would now answer 200).
    cancelled(&app, &token, "wh-gone-2").await;
    let mut body = create_body("wh-gone-3");
    body["expires_in"] = json!(1);
    create(&app, &token, &body).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(rx.hits().len(), 1, "nothing sent to a disabled endpoint");
    assert_eq!(rx.connections(), 1);
    let log = deliveries(&app, &token, ep_id).await;
    assert_eq!(
        log.len(),
        1,
        "nothing queued for a disabled endpoint: {log:#?}"
    );

    // Enabling it again clears the reason; new events flow again.
    let res = send(
        app.http.patch(app.url(&format!("{EP}/{ep_id}"))),
        &token,
        Some(&json!({"enabled": true})),
    )
    .await;
    let read = json_of(res, 200, "re-enable").await;
    assert!(read["disabled_reason"].is_null(), "{read}");
    let id = cancelled(&app, &token, "wh-gone-4").await;
    let hits = rx.wait_for(2, Duration::from_secs(5)).await;
    assert!(
        hits.iter()
            .any(|h| h.json()["data"]["issuance_id"] == id.as_str()),
        "the event after re-enabling is delivered"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotation_signs_with_both_secrets_during_the_overlap() {
    let db = TestDb::new().await;
    let app = TestApp::spawn(hook_settings(&db)).await;
    let (_, token) = app.tenant_token().await;
    let rx = Receiver::ok().await;
    let ep = register(&app, &token, &json!({"url": rx.url()})).await;
    let ep_id = ep["id"].as_str().unwrap();
    let old = ep["secret"].as_str().unwrap().to_owned();

    let rotate = |overlap: Value| rotate(&app, &token, ep_id, overlap);
    let before = chrono::Utc::now();
    let rotated = rotate(json!({"overlap_secs": 3600})).await;
    let new = rotated["secret"].as_str().unwrap().to_owned();
    assert!(new.starts_with("whsec_") && new != old, "{rotated}");
    let until = chrono::DateTime::parse_from_rfc3339(
        rotated["previous_secret_expires_at"].as_str().unwrap(),
    )
    .unwrap();
    let overlap = until.with_timezone(&chrono::Utc) - before;
    assert!((3590..=3610).contains(&overlap.num_seconds()), "{rotated}");
    assert!(endpoint(&app, &token, ep_id).await.get("secret").is_none());

    cancelled(&app, &token, "wh-rotate-1").await;
    let hits = rx.wait_for(1, Duration::from_secs(5)).await;
    let h = &hits[0];
    assert_eq!(h.signatures().len(), 2, "{}", h.header("webhook-signature"));
    assert_eq!(h.verified_by(&old), 1, "one signature with the old secret");
    assert_eq!(h.verified_by(&new), 1, "one signature with the new secret");

    // No overlap: only the newest secret signs.
    let rotated = rotate(json!({"overlap_secs": 0})).await;
    let newest = rotated["secret"].as_str().unwrap().to_owned();
    tokio::time::sleep(Duration::from_millis(50)).await;
    cancelled(&app, &token, "wh-rotate-2").await;
    let hits = rx.wait_for(2, Duration::from_secs(5)).await;
    let h = &hits[1];
    assert_eq!(h.verified_by(&newest), 1);
    assert_eq!(
        h.verified_by(&new),
        0,
        "the previous secret expired at once"
    );
    assert_eq!(h.verified_by(&old), 0);

    let res = send(
        app.http
            .post(app.url(&format!("{EP}/{ep_id}/rotate-secret"))),
        &token,
        Some(&json!({"overlap_secs": -1})),
    )
    .await;
    assert_eq!(res.status(), 400);
}

// ---------------------------------------------------------------------------------------------
// Test 3: two replicas, nothing lost, nothing twice.

async fn two_instances(db: &TestDb) -> (Arc<TestApp>, Arc<TestApp>, Creds, String, String) {
    let a = Arc::new(TestApp::spawn(hook_settings(db)).await);
    let b = Arc::new(TestApp::spawn(hook_settings(db)).await);
    let creds = a.provision(&Scope::ALL).await;
    // These tests load the service on purpose: far above the default client budget.
    issuer::admin::limit_tenant(
        &a.app,
        creds.tenant_id.parse().unwrap(),
        Some(issuer_domain::model::RateLimit::new(100_000, 100_000).unwrap()),
    )
    .await
    .unwrap();
    let ta = a.token(&creds).await;
    let tb = b.token(&creds).await;
    (a, b, creds, ta, tb)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_replicas_deliver_a_thousand_events_exactly_once() {
    const N: usize = 1_000;
    let db = TestDb::new().await;
    let (a, b, _, ta, tb) = two_instances(&db).await;
    let rx = Receiver::ok().await;
    let ep = register(&a, &ta, &json!({"url": rx.url()})).await;
    let secret = ep["secret"].as_str().unwrap().to_owned();

    let started = Instant::now();
    let ids: Vec<String> = futures::stream::iter(0..N)
        .map(|i| {
            let (app, token) = if i % 2 == 0 { (&a, &ta) } else { (&b, &tb) };
            async move {
                let mut body = create_body(&format!("wh-many-{i}"));
                body["expires_in"] = json!(1);
                create(app, token, &body).await
            }
        })
        .buffer_unordered(16)
        .collect()
        .await;
    eprintln!("created {N} in {:?}", started.elapsed());

    rx.wait_for(N, Duration::from_secs(60)).await;
    eprintln!("received {N} after {:?}", started.elapsed());
    // Anything extra would arrive shortly after.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let hits = rx.hits();
    let mut per_id: HashMap<String, usize> = HashMap::new();
    for h in &hits {
        *per_id.entry(h.id()).or_default() += 1;
    }
    let dups: Vec<_> = per_id.iter().filter(|(_, n)| **n > 1).collect();
    assert!(dups.is_empty(), "duplicates: {dups:?}");
    assert_eq!(hits.len(), N);
    let got: HashSet<String> = hits
        .iter()
        .map(|h| h.json()["data"]["issuance_id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(got, ids.into_iter().collect::<HashSet<_>>());
    for h in hits.iter().step_by(97) {
        h.assert_signed(&secret);
        assert_eq!(h.json()["data"]["reason"], "expired");
    }

    // The outbox agrees: one attempt each, all delivered.
    let pool = sqlx::PgPool::connect(&db.url).await.unwrap();
    let (total, clean): (i64, i64) = sqlx::query_as(
        "SELECT count(*), count(*) FILTER (WHERE state = 'delivered' AND attempts = 1) \
         FROM webhook_deliveries",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!((total, clean), (N as i64, N as i64));
    pool.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn events_committed_by_a_stopped_replica_are_delivered_by_the_other() {
    const N: usize = 20;
    let db = TestDb::new().await;
    let (a, b, creds, ta, tb) = two_instances(&db).await;
    let rx = Receiver::ok().await;
    register(&b, &tb, &json!({"url": rx.url()})).await;
    let mut ids = Vec::new();
    for i in 0..2 * N {
        ids.push(create(&a, &ta, &create_body(&format!("wh-stop-{i}"))).await);
    }
    // Cancel through A's REST API, then stop A at once.
    futures::future::join_all(ids[..N].iter().map(|id| cancel(&a, &ta, id))).await;
    let a = Arc::try_unwrap(a).ok().expect("sole owner of A");
    let a_service = a.app.clone();
    a.stop().await;
    // Commits by A after its dispatcher is gone (a replica dying right after its commits):
    // nothing on A will ever claim these, B must.
    let who = issuer_domain::service::Principal {
        tenant_id: creds.tenant_id.parse().unwrap(),
        client_id: creds.client_id.clone(),
        scopes: Scope::ALL.to_vec(),
        expires_at: chrono::Utc::now() + chrono::Duration::minutes(5),
    };
    let committed = Instant::now();
    for id in &ids[N..] {
        a_service.issuances.cancel(&who, id).await.unwrap();
    }
    rx.wait_for(2 * N, Duration::from_secs(10)).await;
    eprintln!(
        "all delivered {:?} after A's last commit",
        committed.elapsed()
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    let hits = rx.hits();
    assert_eq!(hits.len(), 2 * N, "each event once");
    let got: HashSet<String> = hits
        .iter()
        .map(|h| h.json()["data"]["issuance_id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(got, ids.into_iter().collect());
    drop(b);
}

// ---------------------------------------------------------------------------------------------
// Test 4: the SSRF guard.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn internal_destinations_are_refused_without_an_allow_list() {
    let db = TestDb::new().await;
    let settings = Settings {
        webhook_retry_schedule: Some("200ms,300ms,400ms".into()),
        webhook_timeout_ms: 2_000,
        ..pg_settings(&db.url, Some(&redis_url()))
    };
    let app = TestApp::spawn(settings).await;
    let (_, token) = app.tenant_token().await;
    let silent = Silent::start().await;
    let port = silent.port;

    for url in [
        format!("http://127.0.0.1:{port}/"),
        format!("http://[::1]:{port}/"),
        format!("http://[::ffff:127.0.0.1]:{port}/"),
        format!("https://127.0.0.1:{port}/"),
        format!("https://[::ffff:127.0.0.1]:{port}/"),
        format!("https://[::ffff:7f00:1]:{port}/"),
        format!("https://2130706433:{port}/"),
        "https://10.0.0.1/".to_owned(),
        "https://169.254.169.254/".to_owned(),
        "https://100.64.0.1/".to_owned(),
        "https://[fd00:ec2::254]/".to_owned(),
        format!("http://0.0.0.0:{port}/"),
        format!("https://0.0.0.0:{port}/"),
        format!("http://localhost:{port}/"),
    ] {
        let res = send(
            app.http.post(app.url(EP)),
            &token,
            Some(&json!({"url": url})),
        )
        .await;
        let code = res.status();
        let problem: Value = res.json().await.unwrap();
        assert_eq!(
            code, 400,
            "{url} must be refused at registration: {problem}"
        );
        assert_eq!(problem["errors"][0]["field"], "url", "{url}: {problem}");
    }

    // A hostname resolving to loopback passes registration but is refused at connect time.
    let ep = register(
        &app,
        &token,
        &json!({"url": format!("https://localhost:{port}/hook")}),
    )
    .await;
    let ep_id = ep["id"].as_str().unwrap();
    cancelled(&app, &token, "wh-ssrf").await;
    let log = wait_deliveries(&app, &token, ep_id, Duration::from_secs(10), |d| {
        d.len() == 1 && d[0]["state"] == "failed"
    })
    .await;
    assert!(log[0]["last_status"].is_null(), "{log:#?}");
    let error = log[0]["last_error"].as_str().unwrap_or_default();
    assert_eq!(error, issuer_webhooks::sender::UNREACHABLE, "{log:#?}");
    assert_eq!(
        log[0]["attempts"], 4,
        "retried like any unreachable host: {log:#?}"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(silent.connections(), 0, "no connection to loopback");

    // A name that does not resolve at all reads exactly the same.
    let ep = register(
        &app,
        &token,
        &json!({"url": "https://no-such-host.invalid/hook"}),
    )
    .await;
    let missing_id = ep["id"].as_str().unwrap();
    cancelled(&app, &token, "wh-ssrf-2").await;
    let missing = wait_deliveries(&app, &token, missing_id, Duration::from_secs(10), |d| {
        d.len() == 1 && d[0]["state"] == "failed"
    })
    .await;
    assert_eq!(
        missing[0]["last_error"], log[0]["last_error"],
        "{missing:#?}"
    );
    assert_eq!(missing[0]["attempts"], log[0]["attempts"], "{missing:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redirects_are_not_followed() {
    let db = TestDb::new().await;
    let app = TestApp::spawn(hook_settings(&db)).await;
    let (_, token) = app.tenant_token().await;
    let target = Receiver::ok().await;
    let redirector = Receiver::start(
        Vec::new(),
        Reply::Status(302, vec![("location", target.url())]),
    )
    .await;
    let ep = register(&app, &token, &json!({"url": redirector.url()})).await;
    let ep_id = ep["id"].as_str().unwrap();
    cancelled(&app, &token, "wh-redirect").await;
    // 1 attempt + 3 retries (200, 300, 400 ms), then failed.
    let log = wait_deliveries(&app, &token, ep_id, Duration::from_secs(10), |d| {
        d.len() == 1 && d[0]["state"] == "failed"
    })
    .await;
    assert_eq!(log[0]["attempts"], 4, "{log:#?}");
    assert_eq!(log[0]["last_status"], 302, "{log:#?}");
    assert!(
        log[0]["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("redirect")),
        "{log:#?}"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(redirector.hits().len(), 4);
    assert_eq!(
        target.connections(),
        0,
        "the redirect target was never contacted"
    );
    assert!(target.hits().is_empty());
}
