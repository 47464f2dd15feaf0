//! The service under hostile use (issue: hold up under hostile traffic): what a token with too
//! little scope may see, what an anonymous holder of an offer link can do, and how much of it.

use reqwest::StatusCode;
use serde_json::Value;

use crate::{
    helpers::{
        Creds, TestApp, TestDb, authed, create_body, embedded_settings, pg_settings, redis_url,
    },
    wallet::client::{PRE_AUTH_GRANT, discover, expect_error, pre_authorized_code, resolve_offer},
};
use issuer::grpc::pb::{self, issuance::State};
use issuer_domain::model::Scope;

/// Runs `$check` against a fresh instance on Postgres + Redis (`$pg`) and on the embedded
/// default (`$embedded`), each with its settings passed through `$tune`.
macro_rules! on_both {
    ($pg:ident, $embedded:ident, $check:ident, $tune:expr) => {
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $pg() {
            let db = TestDb::new().await;
            let app = TestApp::spawn($tune(pg_settings(&db.url, Some(&redis_url())))).await;
            $check(&app).await;
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $embedded() {
            let dir = tempfile::tempdir().unwrap();
            let app = TestApp::spawn($tune(embedded_settings(dir.path()))).await;
            $check(&app).await;
        }
    };
}

fn as_is(s: issuer::Settings) -> issuer::Settings {
    s
}

async fn on_postgres() -> (TestDb, TestApp) {
    let db = TestDb::new().await;
    let app = TestApp::spawn(pg_settings(&db.url, Some(&redis_url()))).await;
    (db, app)
}

async fn embedded() -> (tempfile::TempDir, TestApp) {
    let dir = tempfile::tempdir().unwrap();
    let app = TestApp::spawn(embedded_settings(dir.path())).await;
    (dir, app)
}

/// A second client of `creds`' tenant holding only `scopes`, and its token.
async fn client_with(app: &TestApp, creds: &Creds, scopes: &[Scope]) -> String {
    let tenant = creds.tenant_id.parse().unwrap();
    let c = issuer::admin::create_client(&app.app, tenant, scopes)
        .await
        .unwrap();
    app.token(&Creds {
        tenant_id: c.tenant_id,
        client_id: c.client_id,
        client_secret: c.client_secret,
    })
    .await
}

async fn created(app: &TestApp, token: &str, crid: &str) -> Value {
    let res = app.create_rest(token, &create_body(crid)).await;
    assert_eq!(res.status(), StatusCode::CREATED);
    res.json().await.unwrap()
}

// ---------------------------------------------------------------------------------------------
// Scopes: the offer is a secret of issuance:write
// ---------------------------------------------------------------------------------------------

async fn read_scope_sees_no_offer(app: &TestApp) {
    let (creds, writer) = app.tenant_token().await;
    let reader = client_with(app, &creds, &[Scope::IssuanceRead]).await;
    let issuance = created(app, &writer, "scoped-1").await;
    let id = issuance["issuance_id"].as_str().unwrap();
    assert!(issuance["credential_offer_uri"].is_string(), "{issuance}");

    // REST: get and list without the offer for the reader, with it for the writer.
    let read: Value = app.get_rest(&reader, id).await.json().await.unwrap();
    assert_eq!(read["status"], "pending", "{read}");
    assert!(read.get("credential_offer_uri").is_none(), "{read}");
    assert!(read.get("tx_code").is_none(), "{read}");
    let written: Value = app.get_rest(&writer, id).await.json().await.unwrap();
    assert_eq!(
        written["credential_offer_uri"], issuance["credential_offer_uri"],
        "{written}"
    );
    let list: Value = app
        .http
        .get(app.url("/issuer/api/v1/issuances"))
        .bearer_auth(&reader)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let items = list["issuances"].as_array().unwrap();
    assert_eq!(items.len(), 1, "{list}");
    assert!(items[0].get("credential_offer_uri").is_none(), "{list}");
    // History stays readable.
    assert!(
        !app.events_rest(&reader, id).await["events"]
            .as_array()
            .unwrap()
            .is_empty()
    );

    // The QR image is the offer too.
    let qr = |token: &str| {
        app.http
            .get(app.url(&format!("/issuer/api/v1/issuances/{id}/qr")))
            .bearer_auth(token)
            .send()
    };
    let res = qr(&reader).await.unwrap();
    assert_eq!(res.status(), StatusCode::FORBIDDEN);
    let problem: Value = res.json().await.unwrap();
    assert_eq!(problem["code"], "insufficient_scope", "{problem}");
    assert_eq!(qr(&writer).await.unwrap().status(), StatusCode::OK);

    // gRPC: the field is empty for the reader.
    let mut grpc = app.grpc().await;
    let get = |token: &str| {
        authed(
            token,
            pb::GetIssuanceRequest {
                issuance_id: id.to_owned(),
            },
        )
    };
    let msg = grpc.get_issuance(get(&reader)).await.unwrap().into_inner();
    assert_eq!(msg.state(), State::Pending);
    assert_eq!(msg.credential_offer_uri, "");
    let listed = grpc
        .list_issuances(authed(&reader, pb::ListIssuancesRequest::default()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.issuances.len(), 1);
    assert_eq!(listed.issuances[0].credential_offer_uri, "");
    let msg = grpc.get_issuance(get(&writer)).await.unwrap().into_inner();
    assert_eq!(
        msg.credential_offer_uri,
        issuance["credential_offer_uri"].as_str().unwrap()
    );
}

on_both!(
    read_scope_sees_status_but_not_the_offer_on_postgres,
    read_scope_sees_status_but_not_the_offer_embedded,
    read_scope_sees_no_offer,
    as_is
);

// ---------------------------------------------------------------------------------------------
// Offers: served while open, recorded once
// ---------------------------------------------------------------------------------------------

fn offer_url(issuance: &Value) -> String {
    let uri = issuance["credential_offer_uri"].as_str().unwrap();
    let encoded = uri.split_once("credential_offer_uri=").unwrap().1;
    percent_encoding::percent_decode_str(encoded)
        .decode_utf8()
        .unwrap()
        .into_owned()
}

fn landing_url(app: &TestApp, offer_url: &str) -> String {
    let offer_id = offer_url.rsplit('/').next().unwrap();
    app.url(&format!("/issuer/offer/{offer_id}"))
}

async fn kinds(app: &TestApp, token: &str, id: &str) -> Vec<String> {
    app.events_rest(token, id).await["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["type"].as_str().unwrap().to_owned())
        .collect()
}

async fn expect_gone(app: &TestApp, url: &str, what: &str) {
    let res = app.http.get(url).send().await.unwrap();
    assert_eq!(res.status(), StatusCode::NOT_FOUND, "{what}");
    assert_eq!(
        res.headers()[reqwest::header::CONTENT_TYPE],
        "application/problem+json",
        "{what}"
    );
    let problem: Value = res.json().await.unwrap();
    assert_eq!(problem["code"], "not_found", "{what}: {problem}");
}

async fn offers_close_and_record_once(app: &TestApp) {
    let (_, token) = app.tenant_token().await;

    // Fetched ten times, recorded once.
    let issuance = created(app, &token, "offer-1").await;
    let id = issuance["issuance_id"].as_str().unwrap();
    let url = offer_url(&issuance);
    let mut offers = Vec::new();
    for _ in 0..10 {
        offers.push(
            resolve_offer(
                &app.http,
                issuance["credential_offer_uri"].as_str().unwrap(),
            )
            .await,
        );
    }
    assert!(
        offers.windows(2).all(|w| w[0] == w[1]),
        "the same offer each time"
    );
    assert_eq!(kinds(app, &token, id).await, ["created", "offer_retrieved"]);

    // Redeemed: the offer is gone, the landing page says it was used.
    let issuer = discover(&app.http, offers[0]["credential_issuer"].as_str().unwrap()).await;
    issuer
        .access_token(&app.http, &pre_authorized_code(&offers[0]))
        .await;
    expect_gone(app, &url, "offer after redemption").await;
    let page = app.http.get(landing_url(app, &url)).send().await.unwrap();
    assert_eq!(page.status(), StatusCode::OK);
    assert!(page.text().await.unwrap().contains("already been used"));
    assert_eq!(
        kinds(app, &token, id).await,
        ["created", "offer_retrieved", "token_issued"],
        "fetches of a closed offer record nothing"
    );
    let res = issuer
        .token_request(&app.http, &pre_authorized_code(&offers[0]), &[])
        .await;
    expect_error(res, 400, "invalid_grant", "code again").await;
    assert_eq!(offers[0]["grants"][PRE_AUTH_GRANT]["tx_code"], Value::Null);

    // Cancelled before any fetch: gone, and nothing recorded by the attempt.
    let issuance = created(app, &token, "offer-2").await;
    let id = issuance["issuance_id"].as_str().unwrap();
    assert_eq!(app.cancel_rest(&token, id).await.status(), StatusCode::OK);
    expect_gone(app, &offer_url(&issuance), "offer after cancel").await;
    assert_eq!(kinds(app, &token, id).await, ["created", "cancelled"]);
}

on_both!(
    offers_are_served_while_open_and_recorded_once_on_postgres,
    offers_are_served_while_open_and_recorded_once_embedded,
    offers_close_and_record_once,
    as_is
);

/// Fifty first fetches at once record one event between them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_first_fetches_record_one_event() {
    let (_db, app) = on_postgres().await;
    let (_, token) = app.tenant_token().await;
    let issuance = created(&app, &token, "offer-race").await;
    let id = issuance["issuance_id"].as_str().unwrap();
    let path = offer_url(&issuance)
        .strip_prefix(&app.base)
        .unwrap()
        .to_owned();
    let request = format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n");
    let results = crate::helpers::race_http1(app.addr, vec![request.into_bytes(); 50]).await;
    assert!(results.iter().all(|(s, _)| *s == 200), "{results:?}");
    assert_eq!(
        kinds(&app, &token, id).await,
        ["created", "offer_retrieved"]
    );
}

// ---------------------------------------------------------------------------------------------
// Rate limits
// ---------------------------------------------------------------------------------------------

/// The header through which these tests name their client address (as a trusted proxy
/// would), so that each test has budgets of its own in the shared Redis.
const IP_HEADER: &str = "x-test-client-ip";

fn random_ip() -> String {
    let b = issuer_domain::ids::random_token(6).into_bytes();
    format!("10.{}.{}.{}", b[0], b[1], b[2])
}

fn limited(mut s: issuer::Settings, ip: (u32, u32), client: (u32, u32)) -> issuer::Settings {
    s.client_ip_header = IP_HEADER.into();
    (s.rate_limit_ip_per_sec, s.rate_limit_ip_burst) = ip;
    (s.rate_limit_client_per_sec, s.rate_limit_client_burst) = client;
    s
}

fn header<'a>(res: &'a reqwest::Response, name: &str) -> &'a str {
    res.headers()
        .get(name)
        .unwrap_or_else(|| panic!("no {name} header"))
        .to_str()
        .unwrap()
}

/// Two replicas sharing Redis share one address budget: wrong-secret token requests spread
/// over both are refused once the burst is spent, in the OAuth format, and the offer endpoint
/// and landing page refuse that address too, while another address is unaffected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_share_one_address_budget_through_redis() {
    let db = TestDb::new().await;
    let settings = || {
        limited(
            pg_settings(&db.url, Some(&redis_url())),
            (1, 10),
            (200, 400),
        )
    };
    let a = TestApp::spawn(settings()).await;
    let b = TestApp::spawn(settings()).await;
    let ip = random_ip();
    let guess = |app: &TestApp, ip: &str| {
        app.http
            .post(app.url("/issuer/oauth/token"))
            .header(IP_HEADER, ip)
            .basic_auth("cli_nobody", Some("cs_wrong"))
            .form(&[("grant_type", "client_credentials")])
            .send()
    };
    let mut statuses = Vec::new();
    let mut refusal = None;
    for i in 0..14 {
        let res = guess(if i % 2 == 0 { &a } else { &b }, &ip).await.unwrap();
        statuses.push(res.status().as_u16());
        if res.status() == StatusCode::TOO_MANY_REQUESTS && refusal.is_none() {
            refusal = Some(res);
        }
    }
    let admitted = statuses.iter().filter(|s| **s == 401).count();
    assert!(
        (10..=11).contains(&admitted),
        "the burst of 10 is shared by both replicas (one more may refill): {statuses:?}"
    );
    assert_eq!(
        statuses.iter().filter(|s| **s == 429).count(),
        14 - admitted
    );
    let res = refusal.unwrap();
    assert!(header(&res, "retry-after").parse::<u64>().unwrap() >= 1);
    assert_eq!(header(&res, "ratelimit-policy"), "\"ip\";q=10;w=10");
    assert!(header(&res, "ratelimit").starts_with("\"ip\";r=0;t="));
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["error"], "rate_limited", "{body}");

    // The same address on the other unauthenticated endpoints.
    for path in ["/issuer/oid4vci/v1/credential-offer/x", "/issuer/offer/x"] {
        let res = a
            .http
            .get(a.url(path))
            .header(IP_HEADER, &ip)
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), StatusCode::TOO_MANY_REQUESTS, "{path}");
        let problem: Value = res.json().await.unwrap();
        assert_eq!(problem["code"], "rate_limited", "{path}: {problem}");
    }
    let res = b
        .http
        .post(b.url("/issuer/oid4vci/v1/nonce"))
        .header(IP_HEADER, &ip)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(res.json::<Value>().await.unwrap()["error"], "rate_limited");
    // Another address has its own budget.
    assert_eq!(guess(&b, &random_ip()).await.unwrap().status(), 401);
}

/// An API client's budget over REST and gRPC, with its tenant's own limit: headers on every
/// answer, then 429 `rate_limited` / RESOURCE_EXHAUSTED with RetryInfo, and a count in the
/// metrics; another tenant's client is unaffected.
async fn client_budget(app: &TestApp) {
    let (creds, token) = app.tenant_token().await;
    let (_, other) = app.tenant_token().await;
    let tenant = creds.tenant_id.parse().unwrap();
    issuer::admin::limit_tenant(
        &app.app,
        tenant,
        Some(issuer_domain::model::RateLimit::new(1, 4).unwrap()),
    )
    .await
    .unwrap();
    // The token request above spent one of the default budget (200/s): let it refill, or the
    // first answer here would count it as part of a request of the tenant's budget.
    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    let list = |token: &str| {
        app.http
            .get(app.url("/issuer/api/v1/issuances"))
            .bearer_auth(token)
            .send()
    };
    let mut remaining = Vec::new();
    let refused = loop {
        let res = list(&token).await.unwrap();
        if res.status() == StatusCode::TOO_MANY_REQUESTS {
            break res;
        }
        assert_eq!(res.status(), StatusCode::OK);
        assert_eq!(header(&res, "ratelimit-policy"), "\"client\";q=4;w=4");
        remaining.push(header(&res, "ratelimit").to_owned());
        assert!(remaining.len() <= 5, "never refused: {remaining:?}");
    };
    assert!(remaining.len() >= 4, "the burst passes: {remaining:?}");
    assert!(remaining[0].starts_with("\"client\";r=3;"), "{remaining:?}");
    assert!(header(&refused, "retry-after").parse::<u64>().unwrap() >= 1);
    let problem: Value = refused.json().await.unwrap();
    assert_eq!(problem["code"], "rate_limited", "{problem}");
    assert_eq!(problem["status"], 429);

    // A slow machine may take a second between calls, and the budget refills one a second:
    // each check below spends what refilled until it is refused.
    let mut grpc = app.grpc().await;
    let mut err = None;
    for _ in 0..5 {
        match grpc
            .list_issuances(authed(&token, pb::ListIssuancesRequest::default()))
            .await
        {
            Ok(_) => continue,
            Err(e) => {
                err = Some(e);
                break;
            }
        }
    }
    let err = err.expect("gRPC is refused once the budget is spent");
    assert_eq!(err.code(), tonic::Code::ResourceExhausted, "{err:?}");
    use tonic_types::StatusExt;
    let retry = err.get_details_retry_info().expect("RetryInfo");
    assert!(retry.retry_delay.is_some_and(|d| !d.is_zero()), "{retry:?}");
    assert_eq!(
        err.get_details_error_info().map(|i| i.reason),
        Some("RATE_LIMITED".to_owned())
    );
    // The token endpoint spends the same client's budget.
    let mut res = None;
    for _ in 0..5 {
        let r = crate::helpers::token_request(&app.http, &app.base, &creds)
            .send()
            .await
            .unwrap();
        if r.status() != StatusCode::OK {
            res = Some(r);
            break;
        }
    }
    let res = res.expect("the token endpoint is refused once the budget is spent");
    assert_eq!(res.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(res.json::<Value>().await.unwrap()["error"], "rate_limited");

    let res = list(&other).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK, "another tenant's client");
    assert!(header(&res, "ratelimit-policy").starts_with("\"client\";q=400;"));
    let metrics = app.metrics_text().await;
    assert!(
        metrics.contains(r#"issuer_rate_limited_total{class="management"}"#)
            && metrics.contains(r#"issuer_rate_limited_total{class="token"}"#),
        "{metrics}"
    );
}

on_both!(
    an_api_client_has_its_tenants_budget_on_postgres,
    an_api_client_has_its_tenants_budget_embedded,
    client_budget,
    as_is
);

/// With Redis unreachable, each replica keeps budgets of its own: requests within the burst
/// pass, the rest are refused; nothing refuses everything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_redis_budgets_fall_back_to_the_replica() {
    let db = TestDb::new().await;
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("redis://{}", l.local_addr().unwrap())
    };
    let app = TestApp::spawn(limited(
        pg_settings(&db.url, Some(&dead)),
        (1, 5),
        (200, 400),
    ))
    .await;
    let ip = random_ip();
    let mut statuses = Vec::new();
    for _ in 0..8 {
        let res = app
            .http
            .post(app.url("/issuer/oid4vci/v1/nonce"))
            .header(IP_HEADER, &ip)
            .send()
            .await
            .unwrap();
        statuses.push(res.status().as_u16());
    }
    let ok = statuses.iter().filter(|s| **s == 200).count();
    assert!((5..=6).contains(&ok), "{statuses:?}");
    assert!(statuses.contains(&429), "{statuses:?}");
}

/// `issuer tenant limits` sets a tenant's client budget that the running service applies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_sets_a_tenants_client_budget() {
    let db = TestDb::new().await;
    let service = crate::helpers::ServiceProcess::start(&db.url, &[], false).await;
    let creds = service.provision("issuance:read").await;
    let out = service
        .cli(&[
            "tenant",
            "limits",
            "--tenant",
            &creds.tenant_id,
            "--per-sec",
            "3",
            "--burst",
            "6",
            "--output",
            "json",
        ])
        .await;
    assert_eq!(
        out["rate_limit"],
        serde_json::json!({"per_sec": 3, "burst": 6}),
        "{out}"
    );
    let token = service.token(&creds).await;
    let res = reqwest::Client::new()
        .get(format!("{}/issuer/api/v1/issuances", service.base))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(header(&res, "ratelimit-policy"), "\"client\";q=6;w=2");
    let out = service
        .cli(&[
            "tenant",
            "limits",
            "--tenant",
            &creds.tenant_id,
            "--clear",
            "--output",
            "json",
        ])
        .await;
    assert_eq!(out["rate_limit"], Value::Null, "{out}");
}

// ---------------------------------------------------------------------------------------------
// Timeouts and caps
// ---------------------------------------------------------------------------------------------

use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Whether the server closes `stream` within `limit` (EOF or reset on read).
async fn closed_within(stream: &mut tokio::net::TcpStream, limit: Duration) -> bool {
    let mut buf = [0u8; 1024];
    let deadline = Instant::now() + limit;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, stream.read(&mut buf)).await {
            Err(_) => return false,
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => continue,
        }
    }
}

async fn slow_clients_are_cut_off(app: &TestApp) {
    // Fifty connections that send half a header.
    let mut slow = Vec::new();
    for _ in 0..50 {
        let mut s = tokio::net::TcpStream::connect(app.addr).await.unwrap();
        s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: ")
            .await
            .unwrap();
        slow.push(s);
    }
    // One that says nothing at all, and one idle between keep-alive requests.
    let mut silent = tokio::net::TcpStream::connect(app.addr).await.unwrap();
    let mut kept = tokio::net::TcpStream::connect(app.addr).await.unwrap();
    kept.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut first = [0u8; 12];
    kept.read_exact(&mut first).await.unwrap();
    assert_eq!(&first, b"HTTP/1.1 200");
    // Meanwhile the service answers others.
    let res = app.http.get(app.url("/healthz")).send().await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);

    let started = Instant::now();
    for s in &mut slow {
        assert!(
            closed_within(s, Duration::from_secs(5)).await,
            "a half-sent header is cut off"
        );
    }
    assert!(
        closed_within(&mut kept, Duration::from_secs(5)).await,
        "an idle keep-alive connection is closed"
    );
    assert!(
        closed_within(&mut silent, Duration::from_secs(5)).await,
        "a silent connection is closed"
    );
    assert!(started.elapsed() < Duration::from_secs(8));
}

fn tight(mut s: issuer::Settings) -> issuer::Settings {
    s.http_header_timeout_ms = 500;
    s.http_idle_timeout_secs = 1;
    s
}

on_both!(
    slow_and_idle_connections_are_closed_on_postgres,
    slow_and_idle_connections_are_closed_embedded,
    slow_clients_are_cut_off,
    tight
);

/// Past the connection cap new clients wait; when a connection closes, the next is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_past_the_cap_wait_for_a_free_one() {
    let db = TestDb::new().await;
    let mut settings = pg_settings(&db.url, Some(&redis_url()));
    settings.http_max_connections = 3;
    let app = TestApp::spawn(settings).await;
    let mut held = Vec::new();
    for _ in 0..3 {
        let mut s = tokio::net::TcpStream::connect(app.addr).await.unwrap();
        s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let mut first = [0u8; 12];
        s.read_exact(&mut first).await.unwrap();
        held.push(s);
    }
    let fourth = tokio::spawn({
        let url = app.url("/healthz");
        async move { reqwest::get(url).await.map(|r| r.status()) }
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!fourth.is_finished(), "the fourth connection waits");
    drop(held.pop());
    let status = tokio::time::timeout(Duration::from_secs(5), fourth)
        .await
        .expect("served once a connection closed")
        .unwrap()
        .unwrap();
    assert_eq!(status, StatusCode::OK);
}

/// A unary call that cannot finish in time is abandoned with 503 / DEADLINE_EXCEEDED.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stuck_call_times_out() {
    let db = TestDb::new().await;
    let mut settings = pg_settings(&db.url, Some(&redis_url()));
    settings.request_timeout_ms = 500;
    let app = TestApp::spawn(settings).await;
    let (_, token) = app.tenant_token().await;
    let issuance = created(&app, &token, "stuck").await;
    let id = issuance["issuance_id"].as_str().unwrap().to_owned();
    // Another session holds the issuance's row: a cancel waits for it.
    let mut blocker = <sqlx::PgConnection as sqlx::Connection>::connect(&db.url)
        .await
        .unwrap();
    sqlx::query("BEGIN").execute(&mut blocker).await.unwrap();
    sqlx::query("SELECT 1 FROM issuances WHERE id = $1::uuid FOR UPDATE")
        .bind(&id)
        .execute(&mut blocker)
        .await
        .unwrap();
    let started = Instant::now();
    let res = app.cancel_rest(&token, &id).await;
    assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(started.elapsed() < Duration::from_secs(3));
    let problem: Value = res.json().await.unwrap();
    assert_eq!(problem["code"], "unavailable", "{problem}");
    let err = app
        .grpc()
        .await
        .cancel_issuance(authed(
            &token,
            pb::CancelIssuanceRequest {
                issuance_id: id.clone(),
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::DeadlineExceeded, "{err:?}");
    sqlx::query("ROLLBACK").execute(&mut blocker).await.unwrap();
    // Free again: the cancel goes through.
    assert_eq!(app.cancel_rest(&token, &id).await.status(), StatusCode::OK);
}

fn sse(app: &TestApp, token: &str, id: &str) -> reqwest::RequestBuilder {
    app.http
        .get(app.url(&format!("/issuer/api/v1/issuances/{id}/events")))
        .bearer_auth(token)
        .header("accept", "text/event-stream")
}

fn watch_request(token: &str, id: &str) -> tonic::Request<pb::WatchIssuanceRequest> {
    authed(
        token,
        pb::WatchIssuanceRequest {
            issuance_id: id.to_owned(),
            after_sequence: 0,
        },
    )
}

/// Open streams are capped per tenant, over SSE and gRPC together; another tenant is not
/// affected, and a closed stream frees its place.
async fn watch_streams_are_capped(app: &TestApp) {
    let (_, token) = app.tenant_token().await;
    let (_, other) = app.tenant_token().await;
    let id = created(app, &token, "watched").await["issuance_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let other_id = created(app, &other, "watched").await["issuance_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let mut open = Vec::new();
    for _ in 0..2 {
        let res = sse(app, &token, &id).send().await.unwrap();
        assert_eq!(res.status(), StatusCode::OK);
        open.push(res);
    }
    let mut grpc = app.grpc().await;
    let stream = grpc
        .watch_issuance(watch_request(&token, &id))
        .await
        .unwrap()
        .into_inner();
    let res = sse(app, &token, &id).send().await.unwrap();
    assert_eq!(res.status(), StatusCode::TOO_MANY_REQUESTS);
    let problem: Value = res.json().await.unwrap();
    assert_eq!(problem["code"], "rate_limited", "{problem}");
    let err = grpc
        .watch_issuance(watch_request(&token, &id))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::ResourceExhausted, "{err:?}");
    let res = sse(app, &other, &other_id).send().await.unwrap();
    assert_eq!(
        res.status(),
        StatusCode::OK,
        "another tenant has its own cap"
    );
    drop(res);
    drop(stream);
    // The server notices the closed stream at its next write or heartbeat.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let res = sse(app, &token, &id).send().await.unwrap();
        if res.status() == StatusCode::OK {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "a closed stream never freed its place"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn capped(mut s: issuer::Settings) -> issuer::Settings {
    s.watch_max_per_tenant = 3;
    s.watch_heartbeat_secs = 1;
    s
}

on_both!(
    watch_streams_are_capped_per_tenant_on_postgres,
    watch_streams_are_capped_per_tenant_embedded,
    watch_streams_are_capped,
    capped
);

/// A token that expires in two seconds: its streams end then, gRPC with UNAUTHENTICATED and
/// SSE with an `error` event.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_ends_when_its_token_expires() {
    let db = TestDb::new().await;
    let app = TestApp::spawn(pg_settings(&db.url, Some(&redis_url()))).await;
    let (creds, token) = app.tenant_token().await;
    let id = created(&app, &token, "expiring").await["issuance_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let ttl = app.app.settings.token_ttl_secs;
    let short = app
        .app
        .tokens
        .issue(
            creds.tenant_id.parse().unwrap(),
            &creds.client_id,
            &Scope::ALL,
            chrono::Utc::now() - chrono::Duration::seconds(ttl - 2),
        )
        .access_token;
    let started = Instant::now();
    let mut stream = app
        .grpc()
        .await
        .watch_issuance(watch_request(&short, &id))
        .await
        .unwrap()
        .into_inner();
    let mut sse = sse(&app, &short, &id).send().await.unwrap();
    assert_eq!(sse.status(), StatusCode::OK);
    let end = loop {
        match tokio::time::timeout(Duration::from_secs(10), stream.message()).await {
            Ok(Ok(Some(_))) => continue,
            Ok(other) => break other,
            Err(_) => panic!("the stream outlived its token"),
        }
    };
    let err = end.unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unauthenticated, "{err:?}");
    let mut text = String::new();
    while let Ok(Ok(Some(chunk))) = tokio::time::timeout(Duration::from_secs(10), sse.chunk()).await
    {
        text.push_str(&String::from_utf8_lossy(&chunk));
    }
    assert!(
        text.contains("event: error") && text.contains("invalid_token"),
        "{text}"
    );
    assert!(started.elapsed() < Duration::from_secs(8));
}

// ---------------------------------------------------------------------------------------------
// Retention
// ---------------------------------------------------------------------------------------------

/// An ended issuance is gone once its retention has passed: 404 for it and its history, its
/// key free for a new one; a pending one stays; the metrics count what went.
async fn ended_issuances_are_purged(app: &TestApp) {
    let (_, token) = app.tenant_token().await;
    let ended = created(app, &token, "kept-briefly").await;
    let ended_id = ended["issuance_id"].as_str().unwrap().to_owned();
    let pending = created(app, &token, "still-pending").await;
    let pending_id = pending["issuance_id"].as_str().unwrap().to_owned();
    assert_eq!(
        app.cancel_rest(&token, &ended_id).await.status(),
        StatusCode::OK
    );
    let deadline = Instant::now() + Duration::from_secs(15);
    while app.get_rest(&token, &ended_id).await.status() != StatusCode::NOT_FOUND {
        assert!(
            Instant::now() < deadline,
            "the ended issuance was never purged"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let history = app
        .http
        .get(app.url(&format!("/issuer/api/v1/issuances/{ended_id}/events")))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(history.status(), StatusCode::NOT_FOUND);
    let again = created(app, &token, "kept-briefly").await;
    assert_ne!(
        again["issuance_id"], ended["issuance_id"],
        "the key is free again"
    );
    assert_eq!(
        app.get_rest(&token, &pending_id).await.status(),
        StatusCode::OK
    );
    let metrics = app.metrics_text().await;
    assert!(
        metrics.contains(r#"issuer_retention_purged_total{kind="issuances"}"#)
            && metrics.contains(r#"issuer_retention_purged_total{kind="events"}"#),
        "{metrics}"
    );
}

fn short_retention(mut s: issuer::Settings) -> issuer::Settings {
    s.retention_secs = 1;
    s.retention_interval_secs = 1;
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ended_issuances_are_purged_after_retention_on_postgres() {
    let db = TestDb::new().await;
    let app = TestApp::spawn(short_retention(pg_settings(&db.url, Some(&redis_url())))).await;
    ended_issuances_are_purged(&app).await;
    // Nothing of it is left in any table.
    let mut conn = <sqlx::PgConnection as sqlx::Connection>::connect(&db.url)
        .await
        .unwrap();
    for table in ["issuance_events", "email_deliveries", "webhook_deliveries"] {
        let orphans: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
            "SELECT count(*) FROM {table} t WHERE NOT EXISTS \
             (SELECT 1 FROM issuances i WHERE i.tenant_id = t.tenant_id AND i.id = t.issuance_id)"
        )))
        .fetch_one(&mut conn)
        .await
        .unwrap();
        assert_eq!(orphans, 0, "{table}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ended_issuances_are_purged_after_retention_embedded() {
    let dir = tempfile::tempdir().unwrap();
    let app = TestApp::spawn(short_retention(embedded_settings(dir.path()))).await;
    ended_issuances_are_purged(&app).await;
}

// ---------------------------------------------------------------------------------------------
// Smaller items
// ---------------------------------------------------------------------------------------------

/// Oversized bodies on the OAuth and OID4VCI endpoints get those endpoints' JSON errors.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_bodies_get_oauth_errors_on_the_oauth_endpoints() {
    let (_dir, app) = embedded().await;
    let big = "x".repeat(app.app.settings.max_body_bytes + 1);
    for (path, content_type, code) in [
        (
            "/issuer/oauth/token",
            "application/x-www-form-urlencoded",
            "invalid_request",
        ),
        (
            "/issuer/oid4vci/v1/credential",
            "application/json",
            "invalid_credential_request",
        ),
        (
            "/issuer/oid4vci/v1/notification",
            "application/json",
            "invalid_notification_request",
        ),
    ] {
        let res = app
            .http
            .post(app.url(path))
            .header("content-type", content_type)
            .bearer_auth("x")
            .body(big.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), StatusCode::PAYLOAD_TOO_LARGE, "{path}");
        let body: Value = res.json().await.unwrap();
        assert_eq!(body["error"], code, "{path}: {body}");
        assert!(
            body["error_description"]
                .as_str()
                .unwrap()
                .contains("exceeds"),
            "{path}: {body}"
        );
    }
}

/// A tenant name with a line break could forge email headers or log lines.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenant_names_refuse_control_characters() {
    let (_dir, app) = embedded().await;
    for name in ["Acme\r\nBcc: victim@example.com", "Acme\tCorp", "Acme\u{0}"] {
        let err = issuer::admin::create_tenant(&app.app, name)
            .await
            .unwrap_err();
        assert_eq!(
            err.code,
            issuer_domain::ErrorCode::InvalidRequest,
            "{name:?}"
        );
    }
    assert!(
        issuer::admin::create_tenant(&app.app, "Acme Corp")
            .await
            .is_ok()
    );
}

/// gRPC errors say in `ErrorInfo.metadata` what a client can act on: the offending field, the
/// missing scope, the issuance's current status.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_error_info_carries_the_field_the_scope_and_the_status() {
    use tonic_types::StatusExt;
    let (_db, app) = on_postgres().await;
    let (creds, token) = app.tenant_token().await;
    let reader = client_with(&app, &creds, &[Scope::IssuanceRead]).await;
    let mut grpc = app.grpc().await;
    let info = |e: &tonic::Status| e.get_details_error_info().expect("ErrorInfo").metadata;

    let mut body = create_body("meta-1");
    body["payload"]["mandator"]
        .as_object_mut()
        .unwrap()
        .remove("organizationIdentifier");
    let err = grpc
        .create_issuance(authed(&token, crate::helpers::create_request_pb(&body)))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert_eq!(
        info(&err).get("field").map(String::as_str),
        Some("payload.mandator.organizationIdentifier")
    );

    let err = grpc
        .create_issuance(authed(
            &reader,
            crate::helpers::create_request_pb(&create_body("meta-2")),
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied);
    assert_eq!(
        info(&err).get("scope").map(String::as_str),
        Some("issuance:write")
    );

    let mut body = create_body("meta-3");
    body["expires_in"] = 1.into();
    let expiring = app
        .create_rest(&token, &body)
        .await
        .json::<Value>()
        .await
        .unwrap();
    let expiring_id = expiring["issuance_id"].as_str().unwrap().to_owned();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let read: Value = app
            .get_rest(&token, &expiring_id)
            .await
            .json()
            .await
            .unwrap();
        if read["status"] == "rejected" {
            break;
        }
        assert!(Instant::now() < deadline, "never expired: {read}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let err = grpc
        .cancel_issuance(authed(
            &token,
            pb::CancelIssuanceRequest {
                issuance_id: expiring_id,
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition);
    assert_eq!(
        info(&err).get("status").map(String::as_str),
        Some("rejected")
    );
}
