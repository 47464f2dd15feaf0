//! DESIGN §5, end to end: `client_request_id` replays, key reuse, per-tenant scope, concurrent
//! duplicates across replicas (with Redis up and down) and on the embedded default, and that a
//! request refused by validation leaves no trace.

use std::{
    process::{Child, Command, Stdio},
    sync::Arc,
    time::{Duration, Instant},
};

use chrono::{DateTime, SecondsFormat, Utc};
use issuer::grpc::pb::{self, issuance_service_client::IssuanceServiceClient};
use issuer_domain::{
    ids::{IssuanceId, TenantId},
    model::{IssuanceStatus, Scope},
};
use prost_types::{ListValue, Struct, value::Kind};
use serde_json::{Map, Value, json};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    sync::Barrier,
};
use tonic::{Code, transport::Channel};
use tonic_types::StatusExt;

use crate::helpers::{
    Creds, TestApp, TestDb, authed, create_body, embedded_settings, pg_settings, redis_url,
};

// ---------------------------------------------------------------------------------------------
// Client-side helpers of this module.

/// The create body as a gRPC message, converted on the client side (independently of the
/// server's own `Struct` conversion).
fn grpc_request(body: &Value) -> pb::CreateIssuanceRequest {
    pb::CreateIssuanceRequest {
        payload: body
            .get("payload")
            .and_then(Value::as_object)
            .map(to_struct),
        ..crate::helpers::create_request_pb(body)
    }
}

fn to_struct(m: &Map<String, Value>) -> Struct {
    Struct {
        fields: m.iter().map(|(k, v)| (k.clone(), to_value(v))).collect(),
    }
}

fn to_value(v: &Value) -> prost_types::Value {
    let kind = match v {
        Value::Null => Kind::NullValue(0),
        Value::Bool(b) => Kind::BoolValue(*b),
        Value::Number(n) => Kind::NumberValue(n.as_f64().unwrap()),
        Value::String(s) => Kind::StringValue(s.clone()),
        Value::Array(a) => Kind::ListValue(ListValue {
            values: a.iter().map(to_value).collect(),
        }),
        Value::Object(m) => Kind::StructValue(to_struct(m)),
    };
    prost_types::Value { kind: Some(kind) }
}

/// A gRPC timestamp as the REST API renders times (RFC 3339, UTC, milliseconds).
fn rfc3339(t: &Option<prost_types::Timestamp>) -> String {
    let t = t.as_ref().expect("timestamp is set");
    DateTime::<Utc>::from_timestamp(t.seconds, t.nanos as u32)
        .expect("valid timestamp")
        .to_rfc3339_opts(SecondsFormat::Millis, true)
}

fn header<'a>(res: &'a reqwest::Response, name: &str) -> Option<&'a str> {
    res.headers().get(name).map(|v| v.to_str().unwrap())
}

/// `idempotent-replayed` of a gRPC response.
fn grpc_replayed<T>(res: &tonic::Response<T>) -> Option<String> {
    res.metadata()
        .get("idempotent-replayed")
        .map(|v| v.to_str().unwrap().to_owned())
}

async fn grpc_create(
    client: &mut IssuanceServiceClient<Channel>,
    token: &str,
    body: &Value,
) -> Result<tonic::Response<pb::Issuance>, tonic::Status> {
    client
        .create_issuance(authed(token, grpc_request(body)))
        .await
}

/// The store's events of one issuance.
async fn events(
    app: &TestApp,
    creds: &Creds,
    issuance_id: &str,
) -> Vec<issuer_domain::model::IssuanceEvent> {
    let tenant: TenantId = creds.tenant_id.parse().unwrap();
    let id: IssuanceId = issuance_id.parse().unwrap();
    app.app.store.list_events(tenant, id, 0).await.unwrap()
}

/// Exactly one `created` event, in `pending`, and nothing else the calls could have written.
/// The mailer's outcome of an emailed offer (`email_sent` / `email_failed`) may follow at any
/// moment: it comes from the outbox, not from the calls, and is left out.
async fn assert_one_created_event(app: &TestApp, creds: &Creds, issuance_id: &str) {
    use issuer_domain::model::EventKind;
    let events: Vec<_> = events(app, creds, issuance_id)
        .await
        .into_iter()
        .filter(|e| !matches!(e.kind, EventKind::EmailSent | EventKind::EmailFailed))
        .collect();
    assert_eq!(
        events.len(),
        1,
        "exactly one event for {issuance_id}: {events:?}"
    );
    assert_eq!(events[0].sequence, 1);
    assert_eq!(events[0].kind.as_str(), "created");
    assert_eq!(events[0].status, IssuanceStatus::Pending);
    assert_eq!(events[0].issuance_id.to_string(), issuance_id);
}

/// A unique idempotency key per test run.
fn key(label: &str) -> String {
    format!(
        "{label}-{}",
        issuer_domain::ids::random_token(8).to_lowercase()
    )
}

// ---------------------------------------------------------------------------------------------
// Concurrent duplicates.

/// One service instance as a target of concurrent creates, with a token it accepts (each
/// instance's token issuer is its own `public_url`) and a connected gRPC client.
struct Target {
    app: Arc<TestApp>,
    token: String,
    grpc: IssuanceServiceClient<Channel>,
}

impl Target {
    async fn new(app: Arc<TestApp>, creds: &Creds) -> Self {
        let token = app.token(creds).await;
        let grpc = app.grpc().await;
        Self { app, token, grpc }
    }
}

#[derive(Debug)]
struct Outcome {
    via: String,
    issuance_id: String,
    replayed: bool,
}

async fn rest_outcome(
    app: &TestApp,
    token: &str,
    body: &Value,
    via: String,
) -> Result<Outcome, String> {
    let res = app
        .http
        .post(app.url("/issuer/api/v1/issuances"))
        .bearer_auth(token)
        .json(body)
        .send()
        .await
        .map_err(|e| format!("{via}: {e}"))?;
    let status = res.status().as_u16();
    let replayed = header(&res, "idempotent-replayed").map(str::to_owned);
    let location = header(&res, "location").map(str::to_owned);
    let text = res.text().await.map_err(|e| format!("{via}: {e}"))?;
    let json: Value = serde_json::from_str(&text).map_err(|_| format!("{via}: {status} {text}"))?;
    let id = json["issuance_id"].as_str().unwrap_or_default().to_owned();
    let replayed = match (status, replayed.as_deref()) {
        (201, Some("false")) => {
            if location.as_deref() != Some(&app.url(&format!("/issuer/api/v1/issuances/{id}"))) {
                return Err(format!("{via}: 201 with Location {location:?}"));
            }
            false
        }
        (200, Some("true")) => true,
        _ => {
            return Err(format!(
                "{via}: {status} idempotent-replayed={replayed:?} {text}"
            ));
        }
    };
    Ok(Outcome {
        via,
        issuance_id: id,
        replayed,
    })
}

async fn grpc_outcome(
    mut client: IssuanceServiceClient<Channel>,
    token: &str,
    body: &Value,
    via: String,
) -> Result<Outcome, String> {
    let res = grpc_create(&mut client, token, body)
        .await
        .map_err(|s| format!("{via}: {:?} {}", s.code(), s.message()))?;
    let replayed = match grpc_replayed(&res).as_deref() {
        Some("true") => true,
        Some("false") => false,
        other => return Err(format!("{via}: idempotent-replayed={other:?}")),
    };
    Ok(Outcome {
        via,
        issuance_id: res.into_inner().issuance_id,
        replayed,
    })
}

/// `n` identical creates launched at once, spread round-robin over `targets` and alternating
/// REST and gRPC per round, so each target gets both transports.
async fn concurrent_creates(
    targets: &[Target],
    body: &Value,
    n: usize,
) -> Vec<Result<Outcome, String>> {
    let barrier = Arc::new(Barrier::new(n));
    let mut tasks = Vec::with_capacity(n);
    for i in 0..n {
        let t = &targets[i % targets.len()];
        let over_grpc = (i / targets.len()) % 2 == 1;
        let via = format!(
            "#{i} instance {} {}",
            i % targets.len(),
            if over_grpc { "gRPC" } else { "REST" }
        );
        let (app, token, grpc) = (t.app.clone(), t.token.clone(), t.grpc.clone());
        let (body, barrier) = (body.clone(), barrier.clone());
        tasks.push(tokio::spawn(async move {
            barrier.wait().await;
            if over_grpc {
                grpc_outcome(grpc, &token, &body, via).await
            } else {
                rest_outcome(&app, &token, &body, via).await
            }
        }));
    }
    let mut out = Vec::with_capacity(n);
    for t in tasks {
        out.push(t.await.unwrap_or_else(|e| Err(format!("task failed: {e}"))));
    }
    out
}

/// Every caller succeeded, exactly one created and the rest replayed, all with one issuance id,
/// which is returned.
fn assert_one_winner(results: Vec<Result<Outcome, String>>, n: usize) -> String {
    assert_eq!(results.len(), n);
    let failures: Vec<&String> = results.iter().filter_map(|r| r.as_ref().err()).collect();
    assert!(
        failures.is_empty(),
        "{} of {n} concurrent creates failed: {failures:#?}",
        failures.len()
    );
    let outcomes: Vec<Outcome> = results.into_iter().map(Result::unwrap).collect();
    let rest = outcomes.iter().filter(|o| o.via.ends_with("REST")).count();
    assert_eq!(rest, n / 2, "half of the calls go over REST");
    let created: Vec<&Outcome> = outcomes.iter().filter(|o| !o.replayed).collect();
    assert_eq!(
        created.len(),
        1,
        "exactly one caller creates, every other one gets a replay: {created:#?}"
    );
    let id = created[0].issuance_id.clone();
    assert!(id.parse::<IssuanceId>().is_ok(), "issuance id {id:?}");
    let others: Vec<&Outcome> = outcomes.iter().filter(|o| o.issuance_id != id).collect();
    assert!(
        others.is_empty(),
        "every caller gets issuance {id}: {others:#?}"
    );
    id
}

/// A `redis-server` child process on a free port, killed when dropped (also on panic).
pub(crate) struct RedisProcess {
    child: Child,
    port: u16,
}

impl RedisProcess {
    pub(crate) async fn start() -> Self {
        for _ in 0..5 {
            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port();
            let child = Command::new("redis-server")
                .args(["--port", &port.to_string()])
                .args(["--save", "", "--appendonly", "no", "--bind", "127.0.0.1"])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("redis-server is on PATH");
            let mut redis = Self { child, port };
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if redis.child.try_wait().unwrap().is_some() {
                    break; // most likely lost the port to someone else: try another
                }
                if redis.answers_ping().await {
                    return redis;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            redis.kill();
        }
        panic!("could not start a redis-server");
    }

    pub(crate) fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    async fn answers_ping(&self) -> bool {
        let attempt = async {
            let mut s = tokio::net::TcpStream::connect(("127.0.0.1", self.port))
                .await
                .ok()?;
            s.write_all(b"PING\r\n").await.ok()?;
            let mut buf = [0u8; 16];
            let n = s.read(&mut buf).await.ok()?;
            Some(buf[..n].starts_with(b"+PONG"))
        };
        tokio::time::timeout(Duration::from_secs(1), attempt)
            .await
            .ok()
            .flatten()
            .unwrap_or(false)
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for RedisProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

async fn readyz(app: &TestApp) -> (u16, Value) {
    let res = app.http.get(app.url("/readyz")).send().await.unwrap();
    let status = res.status().as_u16();
    (status, res.json().await.unwrap())
}

// ---------------------------------------------------------------------------------------------
// Tests.

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn replays_return_the_same_issuance_over_rest_and_grpc() {
    let db = TestDb::new().await;
    let app = TestApp::spawn(pg_settings(&db.url, Some(&redis_url()))).await;
    let (creds, token) = app.tenant_token().await;
    let crid = key("replay");
    let body = create_body(&crid);

    // First create: 201 + Location.
    let res = app.create_rest(&token, &body).await;
    assert_eq!(res.status(), 201);
    assert_eq!(header(&res, "idempotent-replayed"), Some("false"));
    let location = header(&res, "location")
        .expect("Location on 201")
        .to_owned();
    let first: Value = res.json().await.unwrap();
    let id = first["issuance_id"].as_str().unwrap().to_owned();
    assert!(id.parse::<IssuanceId>().is_ok(), "{first}");
    assert_eq!(location, app.url(&format!("/issuer/api/v1/issuances/{id}")));
    assert_eq!(first["client_request_id"], crid.as_str());
    assert_eq!(first["status"], "pending");
    let offer_uri = first["credential_offer_uri"].as_str().unwrap().to_owned();
    assert!(
        offer_uri.starts_with("openid-credential-offer://?credential_offer_uri="),
        "{offer_uri}"
    );
    let expires_at = first["expires_at"].as_str().unwrap().to_owned();

    // The identical request: 200, replayed, the identical body.
    let res = app.create_rest(&token, &body).await;
    assert_eq!(res.status(), 200);
    assert_eq!(header(&res, "idempotent-replayed"), Some("true"));
    let replay: Value = res.json().await.unwrap();
    assert_eq!(replay["issuance_id"], id.as_str());
    assert_eq!(replay["credential_offer_uri"], offer_uri.as_str());
    assert_eq!(replay["expires_at"], expires_at.as_str());
    assert_eq!(replay, first);

    // The same JSON with keys reordered (at every level) and other whitespace is a replay too.
    let reordered = format!(
        r#"
        {{ "delivery" : "none",
           "payload": {{
              "power": [ {{ "action": ["Execute"], "function": "Onboarding", "domain": "DOME", "type": "Domain" }} ],
              "mandatee": {{ "email": "ada@acme.example", "lastName": "Lovelace", "firstName": "Ada" }},
              "mandator": {{ "country": "ES", "email": "boss@acme.example", "commonName": "Jane Boss",
                             "organization": "Acme Corp", "organizationIdentifier": "VATES-B12345678" }}
           }},
           "credential_configuration_id":"learcredential.employee.sd.1",
           "client_request_id": "{crid}"
        }}
        "#
    );
    let raw: Value = serde_json::from_str(&reordered).unwrap();
    assert_eq!(raw, body, "the reordered text is the same JSON");
    let res = app
        .http
        .post(app.url("/issuer/api/v1/issuances"))
        .bearer_auth(&token)
        .header("content-type", "application/json")
        .body(reordered)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(header(&res, "idempotent-replayed"), Some("true"));
    assert_eq!(res.json::<Value>().await.unwrap(), first);

    // Created over REST, replayed over gRPC: the same issuance.
    let mut grpc = app.grpc().await;
    let res = grpc_create(&mut grpc, &token, &body)
        .await
        .expect("gRPC replay");
    assert_eq!(grpc_replayed(&res).as_deref(), Some("true"));
    let msg = res.into_inner();
    assert_eq!(msg.issuance_id, id);
    assert_eq!(msg.client_request_id, crid);
    assert_eq!(msg.credential_offer_uri, offer_uri);
    assert_eq!(rfc3339(&msg.expires_at), expires_at);
    assert_eq!(
        rfc3339(&msg.created_at),
        first["created_at"].as_str().unwrap()
    );
    assert_eq!(msg.state(), pb::issuance::State::Pending);
    assert_eq!(msg.delivery_method(), pb::DeliveryMethod::None);

    // Created over gRPC, replayed over gRPC (the same message) and over REST.
    let crid2 = key("replay-grpc");
    let body2 = create_body(&crid2);
    let res = grpc_create(&mut grpc, &token, &body2)
        .await
        .expect("gRPC create");
    assert_eq!(grpc_replayed(&res).as_deref(), Some("false"));
    let created = res.into_inner();
    assert_ne!(created.issuance_id, id);
    let res = grpc_create(&mut grpc, &token, &body2)
        .await
        .expect("gRPC replay");
    assert_eq!(grpc_replayed(&res).as_deref(), Some("true"));
    assert_eq!(res.into_inner(), created);
    let res = app.create_rest(&token, &body2).await;
    assert_eq!(res.status(), 200);
    assert_eq!(header(&res, "idempotent-replayed"), Some("true"));
    let rest: Value = res.json().await.unwrap();
    assert_eq!(rest["issuance_id"], created.issuance_id.as_str());
    assert_eq!(
        rest["credential_offer_uri"],
        created.credential_offer_uri.as_str()
    );
    assert_eq!(rest["expires_at"], rfc3339(&created.expires_at).as_str());

    // Optional fields too: delivery by email, an explicit lifetime and the grant type's short
    // alias over gRPC replay over REST with the full grant type URN.
    let crid3 = key("replay-optional");
    let mut body3 = create_body(&crid3);
    body3["delivery"] = json!("email");
    body3["email"] = json!("ada@acme.example");
    body3["expires_in"] = json!(900);
    body3["grant_type"] = json!("pre-authorized_code");
    let res = grpc_create(&mut grpc, &token, &body3)
        .await
        .expect("gRPC create with optional fields");
    assert_eq!(grpc_replayed(&res).as_deref(), Some("false"));
    let created3 = res.into_inner();
    assert_eq!(created3.delivery_method(), pb::DeliveryMethod::Email);
    let lifetime = created3.expires_at.unwrap().seconds - created3.created_at.unwrap().seconds;
    assert!(
        (899..=900).contains(&lifetime),
        "expires_in 900 gives {lifetime}"
    );
    body3["grant_type"] = json!("urn:ietf:params:oauth:grant-type:pre-authorized_code");
    let res = app.create_rest(&token, &body3).await;
    assert_eq!(res.status(), 200);
    assert_eq!(header(&res, "idempotent-replayed"), Some("true"));
    let rest3: Value = res.json().await.unwrap();
    assert_eq!(rest3["issuance_id"], created3.issuance_id.as_str());
    assert_eq!(rest3["expires_at"], rfc3339(&created3.expires_at).as_str());

    // Nine calls, three issuances, one event each.
    assert_eq!(app.count_issuances(&creds).await, 3);
    assert_one_created_event(&app, &creds, &id).await;
    assert_one_created_event(&app, &creds, &created.issuance_id).await;
    assert_one_created_event(&app, &creds, &created3.issuance_id).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn same_key_with_a_different_request_is_refused_and_changes_nothing() {
    let db = TestDb::new().await;
    let app = TestApp::spawn(pg_settings(&db.url, Some(&redis_url()))).await;
    let (creds, token) = app.tenant_token().await;
    let crid = key("reuse");
    let body = create_body(&crid);
    let res = app.create_rest(&token, &body).await;
    assert_eq!(res.status(), 201);
    let original: Value = res.json().await.unwrap();
    let id = original["issuance_id"].as_str().unwrap().to_owned();

    let mut other_name = body.clone();
    other_name["payload"]["mandatee"]["firstName"] = json!("Grace");
    let mut other_delivery = body.clone();
    other_delivery["delivery"] = json!("qr");
    let mut explicit_ttl = body.clone();
    explicit_ttl["expires_in"] = json!(600);

    for (what, changed) in [
        ("firstName", &other_name),
        ("delivery", &other_delivery),
        ("expires_in", &explicit_ttl),
    ] {
        let res = app.create_rest(&token, changed).await;
        assert_eq!(res.status(), 422, "REST, different {what}");
        assert_eq!(
            header(&res, "content-type"),
            Some("application/problem+json"),
            "REST, different {what}"
        );
        assert_eq!(header(&res, "idempotent-replayed"), None);
        let problem: Value = res.json().await.unwrap();
        assert_eq!(problem["code"], "idempotency_key_reused", "{problem}");
        assert_eq!(problem["status"], 422, "{problem}");

        let mut grpc = app.grpc().await;
        let status = grpc_create(&mut grpc, &token, changed)
            .await
            .expect_err("gRPC, different request, same key");
        assert_eq!(
            status.code(),
            Code::FailedPrecondition,
            "gRPC, different {what}: {status:?}"
        );
        let info = status
            .get_details_error_info()
            .expect("ErrorInfo in the status details");
        assert_eq!(info.reason, "IDEMPOTENCY_KEY_REUSED");
        assert_eq!(info.domain, "issuer");
    }

    // Nothing changed: the original reads back identically, one issuance, one event.
    let res = app.get_rest(&token, &id).await;
    assert_eq!(res.status(), 200);
    let got: Value = res.json().await.unwrap();
    assert_eq!(got, original);
    assert_eq!(got["delivery"], "none");
    assert_eq!(app.count_issuances(&creds).await, 1);
    assert_one_created_event(&app, &creds, &id).await;
    let stored = app
        .app
        .store
        .get_issuance(creds.tenant_id.parse().unwrap(), id.parse().unwrap())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        stored.payload.as_ref().unwrap()["mandatee"]["firstName"],
        "Ada"
    );

    // And the original request still replays.
    let res = app.create_rest(&token, &body).await;
    assert_eq!(res.status(), 200);
    assert_eq!(res.json::<Value>().await.unwrap(), original);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn keys_are_scoped_per_tenant() {
    let db = TestDb::new().await;
    let app = TestApp::spawn(pg_settings(&db.url, Some(&redis_url()))).await;
    let (creds_a, token_a) = app.tenant_token().await;
    let (creds_b, token_b) = app.tenant_token().await;
    let (creds_c, token_c) = app.tenant_token().await;
    assert_ne!(creds_a.tenant_id, creds_b.tenant_id);
    let crid = key("tenant-scope");
    let body = create_body(&crid);

    let res = app.create_rest(&token_a, &body).await;
    assert_eq!(res.status(), 201);
    let a: Value = res.json().await.unwrap();

    // The identical request in tenant B: a new issuance, not a replay of A's.
    let res = app.create_rest(&token_b, &body).await;
    assert_eq!(res.status(), 201);
    assert_eq!(header(&res, "idempotent-replayed"), Some("false"));
    let b: Value = res.json().await.unwrap();
    assert_ne!(a["issuance_id"], b["issuance_id"]);
    assert_ne!(a["credential_offer_uri"], b["credential_offer_uri"]);
    assert_eq!(b["client_request_id"], crid.as_str());

    // A different request under the same key in tenant C (over gRPC): created, not refused.
    let mut changed = body.clone();
    changed["payload"]["mandatee"]["firstName"] = json!("Grace");
    let mut grpc = app.grpc().await;
    let res = grpc_create(&mut grpc, &token_c, &changed)
        .await
        .expect("tenant C's key is its own");
    assert_eq!(grpc_replayed(&res).as_deref(), Some("false"));
    let c = res.into_inner();
    assert_ne!(c.issuance_id, a["issuance_id"].as_str().unwrap());
    assert_ne!(c.issuance_id, b["issuance_id"].as_str().unwrap());

    // Each tenant replays its own.
    let res = app.create_rest(&token_b, &body).await;
    assert_eq!(res.status(), 200);
    assert_eq!(res.json::<Value>().await.unwrap(), b);
    let res = app.create_rest(&token_a, &body).await;
    assert_eq!(res.status(), 200);
    assert_eq!(res.json::<Value>().await.unwrap(), a);

    for creds in [&creds_a, &creds_b, &creds_c] {
        assert_eq!(
            app.count_issuances(creds).await,
            1,
            "tenant {}",
            creds.tenant_id
        );
    }
    // A's issuance is not B's to read.
    let res = app
        .get_rest(&token_b, a["issuance_id"].as_str().unwrap())
        .await;
    assert_eq!(res.status(), 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_duplicates_across_two_instances_create_one_issuance() {
    const N: usize = 100;
    let db = TestDb::new().await;
    let a = Arc::new(TestApp::spawn(pg_settings(&db.url, Some(&redis_url()))).await);
    let b = Arc::new(TestApp::spawn(pg_settings(&db.url, Some(&redis_url()))).await);
    let creds = a.provision(&Scope::ALL).await;
    let targets = [
        Target::new(a.clone(), &creds).await,
        Target::new(b.clone(), &creds).await,
    ];
    let body = create_body(&key("burst"));

    let results = tokio::time::timeout(
        Duration::from_secs(60),
        concurrent_creates(&targets, &body, N),
    )
    .await
    .expect("100 concurrent creates finish within 60 s");
    let id = assert_one_winner(results, N);

    assert_eq!(a.count_issuances(&creds).await, 1);
    assert_eq!(b.count_issuances(&creds).await, 1);
    assert_one_created_event(&a, &creds, &id).await;
    // Both instances read it.
    for t in &targets {
        let res = t.app.get_rest(&t.token, &id).await;
        assert_eq!(res.status(), 200);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_duplicates_with_redis_down_create_one_issuance() {
    const N: usize = 100;
    let mut redis = RedisProcess::start().await;
    let db = TestDb::new().await;
    let a = Arc::new(TestApp::spawn(pg_settings(&db.url, Some(&redis.url()))).await);
    let b = Arc::new(TestApp::spawn(pg_settings(&db.url, Some(&redis.url()))).await);
    let creds = a.provision(&Scope::ALL).await;
    let targets = [
        Target::new(a.clone(), &creds).await,
        Target::new(b.clone(), &creds).await,
    ];

    // With Redis up: ready, and a create plus its replay on the other instance work.
    for t in &targets {
        let (status, body) = readyz(&t.app).await;
        assert_eq!(status, 200);
        assert_eq!(body["redis"], "ok", "{body}");
        assert_eq!(body["status"], "ok", "{body}");
    }
    let warmup = create_body(&key("warmup"));
    let res = a.create_rest(&targets[0].token, &warmup).await;
    assert_eq!(res.status(), 201);
    let res = b.create_rest(&targets[1].token, &warmup).await;
    assert_eq!(res.status(), 200);

    redis.kill();
    assert!(!redis.answers_ping().await, "redis-server is down");

    // Degraded but ready.
    for t in &targets {
        let (status, body) = tokio::time::timeout(Duration::from_secs(10), readyz(&t.app))
            .await
            .expect("readyz answers while Redis is down");
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["redis"], "unavailable", "{body}");
        assert_eq!(body["database"], "ok", "{body}");
        assert_eq!(body["status"], "degraded", "{body}");
    }

    let body = create_body(&key("burst-no-redis"));
    let started = Instant::now();
    let results = tokio::time::timeout(
        Duration::from_secs(60),
        concurrent_creates(&targets, &body, N),
    )
    .await
    .expect("100 concurrent creates finish within 60 s while Redis is down");
    let elapsed = started.elapsed();
    let id = assert_one_winner(results, N);

    assert_eq!(
        a.count_issuances(&creds).await,
        2,
        "the warm-up and the burst"
    );
    assert_one_created_event(&a, &creds, &id).await;
    let (status, body) = readyz(&b).await;
    assert_eq!(
        (status, &body["redis"]),
        (200, &json!("unavailable")),
        "{body}"
    );
    eprintln!("100 creates with Redis down took {elapsed:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_duplicates_on_the_embedded_default_create_one_issuance() {
    const N: usize = 50;
    let dir = tempfile::tempdir().unwrap();
    let app = Arc::new(TestApp::spawn(embedded_settings(dir.path())).await);
    let creds = app.provision(&Scope::ALL).await;
    let targets = [Target::new(app.clone(), &creds).await];
    let body = create_body(&key("embedded-burst"));

    let results = tokio::time::timeout(
        Duration::from_secs(60),
        concurrent_creates(&targets, &body, N),
    )
    .await
    .expect("50 concurrent creates finish within 60 s");
    let id = assert_one_winner(results, N);

    assert_eq!(app.count_issuances(&creds).await, 1);
    assert_one_created_event(&app, &creds, &id).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_request_refused_by_validation_is_not_recorded() {
    let db = TestDb::new().await;
    let app = TestApp::spawn(pg_settings(&db.url, Some(&redis_url()))).await;
    let (creds, token) = app.tenant_token().await;

    // REST: missing payload, then an invalid payload field, each followed by the valid request
    // under the same key.
    let no_payload = key("invalid-no-payload");
    let mut invalid = create_body(&no_payload);
    invalid.as_object_mut().unwrap().remove("payload");
    let bad_email = key("invalid-email");
    let mut invalid_email = create_body(&bad_email);
    invalid_email["payload"]["mandatee"]["email"] = json!("not an email");
    for (created_before, (crid, invalid, field)) in [
        (&no_payload, &invalid, "payload"),
        (&bad_email, &invalid_email, "payload.mandatee.email"),
    ]
    .into_iter()
    .enumerate()
    {
        let res = app.create_rest(&token, invalid).await;
        assert_eq!(res.status(), 400);
        let problem: Value = res.json().await.unwrap();
        assert_eq!(problem["code"], "invalid_request", "{problem}");
        assert!(
            problem["errors"]
                .as_array()
                .unwrap()
                .iter()
                .any(|e| e["field"] == field),
            "{problem}"
        );
        assert_eq!(app.count_issuances(&creds).await, created_before);

        let res = app.create_rest(&token, &create_body(crid)).await;
        assert_eq!(
            res.status(),
            201,
            "the corrected retry of {crid} is created"
        );
        assert_eq!(header(&res, "idempotent-replayed"), Some("false"));
    }

    // gRPC: the same.
    let crid = key("invalid-grpc");
    let mut invalid = create_body(&crid);
    invalid.as_object_mut().unwrap().remove("payload");
    let mut grpc = app.grpc().await;
    let status = grpc_create(&mut grpc, &token, &invalid)
        .await
        .expect_err("no payload");
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    let res = grpc_create(&mut grpc, &token, &create_body(&crid))
        .await
        .expect("the corrected retry is created");
    assert_eq!(grpc_replayed(&res).as_deref(), Some("false"));

    assert_eq!(app.count_issuances(&creds).await, 3);
}
