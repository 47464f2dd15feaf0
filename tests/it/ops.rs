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
    use std::{
        process::Stdio,
        sync::{Arc, Mutex},
    };

    use serde_json::Value;

    use crate::helpers::{create_body, shared_credential_key, shared_keys};

    let db = TestDb::new().await;
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let base = format!("http://127.0.0.1:{port}");
    let data = tempfile::tempdir().unwrap();
    let (pem, secret) = shared_keys();
    let env = |cmd: &mut tokio::process::Command| {
        cmd.env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("ISSUER_LISTEN_ADDR", format!("127.0.0.1:{port}"))
            .env("ISSUER_PUBLIC_URL", &base)
            .env("ISSUER_DATABASE_URL", &db.url)
            .env("ISSUER_REDIS_URL", redis_url())
            .env("ISSUER_SECRET_KEY", secret)
            .env("ISSUER_TOKEN_SIGNING_KEY", pem)
            .env("ISSUER_CREDENTIAL_SIGNING_KEY", shared_credential_key())
            .env("ISSUER_DATA_DIR", data.path())
            .env("ISSUER_LOG_LEVEL", "warn")
            .stdin(Stdio::null());
    };
    let cli = |args: &[&str]| {
        let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_issuer"));
        env(&mut cmd);
        cmd.args(args).stderr(Stdio::inherit());
        let what = format!("{args:?}");
        async move {
            let out = cmd.output().await.unwrap();
            assert!(out.status.success(), "issuer {what} failed");
            serde_json::from_slice::<Value>(&out.stdout).unwrap()
        }
    };
    let tenant = cli(&["tenant", "create", "--name", "drain", "--output", "json"]).await;
    let tenant = tenant["tenant_id"].as_str().unwrap().to_owned();
    let client = cli(&[
        "client",
        "create",
        "--tenant",
        &tenant,
        "--scopes",
        "issuance:write,issuance:read",
        "--output",
        "json",
    ])
    .await;

    let mut server = tokio::process::Command::new(env!("CARGO_BIN_EXE_issuer"));
    env(&mut server);
    let mut server = server
        .arg("serve")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let http = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !matches!(http.get(format!("{base}/readyz")).send().await, Ok(r) if r.status() == 200) {
        assert!(
            Instant::now() < deadline,
            "the service did not become ready"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let token: Value = http
        .post(format!("{base}/issuer/oauth/token"))
        .basic_auth(
            client["client_id"].as_str().unwrap(),
            client["client_secret"].as_str(),
        )
        .form(&[("grant_type", "client_credentials")])
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let token = token["access_token"].as_str().unwrap().to_owned();

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
