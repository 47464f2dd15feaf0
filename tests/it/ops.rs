//! What operators and platform tooling talk to: gRPC health and server reflection.

use std::time::{Duration, Instant};

use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

use crate::helpers::{TestApp, TestDb, pg_settings, redis_url};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_health_reports_serving_while_the_database_answers() {
    let db = TestDb::new().await;
    let app = TestApp::spawn(pg_settings(&db.url, Some(&redis_url()))).await;
    let channel = tonic::transport::Channel::from_shared(app.base.clone())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health = HealthClient::new(channel);
    for service in ["", "issuer.v1.IssuanceService"] {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let res = health
                .check(HealthCheckRequest {
                    service: service.into(),
                })
                .await;
            if matches!(&res, Ok(r) if r.get_ref().status == ServingStatus::Serving as i32) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "`{service}` never became SERVING: {res:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let unknown = health
        .check(HealthCheckRequest {
            service: "no.such.Service".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), tonic::Code::NotFound);
}

/// `buf curl --list-methods` (npm `@bufbuild/buf`, installed by scripts/test.sh) finds every
/// method through server reflection, as grpcurl-style tools and gateways do.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reflection_lists_the_services_to_buf_curl() {
    let db = TestDb::new().await;
    let app = TestApp::spawn(pg_settings(&db.url, Some(&redis_url()))).await;
    let buf = std::env::var("ISSUER_TEST_BUF").unwrap_or_else(|_| {
        format!(
            "{}/.tools/node_modules/.bin/buf",
            env!("CARGO_MANIFEST_DIR")
        )
    });
    let out = tokio::process::Command::new(&buf)
        .args([
            "curl",
            "--protocol",
            "grpc",
            "--http2-prior-knowledge",
            "--list-methods",
        ])
        .arg(&app.base)
        .output()
        .await
        .unwrap_or_else(|e| panic!("run {buf} (scripts/test.sh installs it): {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "buf curl failed: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let methods: Vec<&str> = stdout.lines().map(str::trim).collect();
    for m in [
        "issuer.v1.IssuanceService/CreateIssuance",
        "issuer.v1.IssuanceService/GetIssuance",
        "issuer.v1.IssuanceService/ListIssuances",
        "issuer.v1.IssuanceService/CancelIssuance",
        "issuer.v1.IssuanceService/WatchIssuance",
        "grpc.health.v1.Health/Check",
        "grpc.health.v1.Health/Watch",
    ] {
        assert!(methods.contains(&m), "{m} missing from {methods:?}");
    }
}

/// SIGTERM to the real binary during a burst of creates and with a `WatchIssuance` open: every
/// create that was answered is committed, the stream ends cleanly (no error), and the process
/// exits 0 well within the chart's grace period.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_drains_creates_and_ends_watch_streams_then_exits_0() {
    use std::sync::{Arc, Mutex};

    use serde_json::Value;

    use crate::helpers::{ServiceProcess, create_body};

    let db = TestDb::new().await;
    let mut service = ServiceProcess::start(&db.url, &[], false).await;
    let base = service.base.clone();
    let creds = service.provision("issuance:write,issuance:read").await;
    let token = service.token(&creds).await;
    let server = &mut service.child;
    let http = reqwest::Client::new();

    // A watch on a pending issuance: it would stay open until the outcome.
    let watched: Value = http
        .post(format!("{base}/issuer/api/v1/issuances"))
        .bearer_auth(&token)
        .json(&create_body("drain-watched"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let channel = tonic::transport::Channel::from_shared(base.clone())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut grpc = issuer::grpc::pb::issuance_service_client::IssuanceServiceClient::new(channel);
    let mut req = tonic::Request::new(issuer::grpc::pb::WatchIssuanceRequest {
        issuance_id: watched["issuance_id"].as_str().unwrap().to_owned(),
        after_sequence: 0,
    });
    req.metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    let mut stream = grpc.watch_issuance(req).await.unwrap().into_inner();
    let watcher = tokio::spawn(async move {
        let mut messages = 0;
        loop {
            match stream.message().await {
                Ok(Some(_)) => messages += 1,
                Ok(None) => return Ok(messages),
                Err(status) => return Err(status),
            }
        }
    });

    // A burst of creates from 8 callers, each on its own connection, until the service stops.
    let answered = Arc::new(Mutex::new(Vec::<String>::new()));
    let callers: Vec<_> = (0..8)
        .map(|w| {
            let (base, token, answered) = (base.clone(), token.clone(), answered.clone());
            tokio::spawn(async move {
                let http = reqwest::Client::builder()
                    .pool_max_idle_per_host(1)
                    .build()
                    .unwrap();
                for n in 0..10_000 {
                    let crid = format!("drain-{w}-{n}");
                    let res = http
                        .post(format!("{base}/issuer/api/v1/issuances"))
                        .bearer_auth(&token)
                        .json(&create_body(&crid))
                        .send()
                        .await;
                    match res {
                        Ok(r) => {
                            let status = r.status();
                            assert!(
                                status == 201 || status == 503,
                                "an answered create is created or refused as unavailable: {status}"
                            );
                            if status == 201 {
                                answered.lock().unwrap().push(crid);
                            }
                        }
                        // The listener has stopped accepting: not an accepted create.
                        Err(_) => return,
                    }
                }
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(700)).await;
    let pid = server.id().unwrap().to_string();
    let killed = tokio::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .await
        .unwrap();
    assert!(killed.success());
    let exit = tokio::time::timeout(Duration::from_secs(30), server.wait())
        .await
        .expect("the process exits within the grace period")
        .unwrap();
    assert!(exit.success(), "exit status {exit}");
    for c in callers {
        c.await.unwrap();
    }
    let streamed = tokio::time::timeout(Duration::from_secs(5), watcher)
        .await
        .expect("the watch ended")
        .unwrap();
    assert!(
        matches!(streamed, Ok(n) if n >= 1),
        "the stream ended cleanly after its history: {streamed:?}"
    );

    let answered = answered.lock().unwrap().clone();
    assert!(
        answered.len() >= 10,
        "the burst ran: {} creates",
        answered.len()
    );
    let mut conn = <sqlx::PgConnection as sqlx::Connection>::connect(&db.url)
        .await
        .unwrap();
    let stored: i64 =
        sqlx::query_scalar("SELECT count(*) FROM issuances WHERE client_request_id = ANY($1)")
            .bind(&answered)
            .fetch_one(&mut conn)
            .await
            .unwrap();
    assert_eq!(
        stored,
        answered.len() as i64,
        "every answered create is committed"
    );
}
